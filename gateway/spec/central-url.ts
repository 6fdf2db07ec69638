/**
 * The URL of a central libSQL server (sqld), as `[replication] url` and the CLI's `--central`/`--url` give it:
 * what @libsql/client would refuse, or read a secret from, is refused here, before anything connects.
 */

/** Schemes of a libSQL server the client speaks. */
const CENTRAL_SCHEME_RE = /^(https?|libsql|wss?):$/;

/**
 * Why `url` cannot name the central server, or null when it can. `secrets` finishes the sentence that
 * refuses credentials in the URL: why they must not be there and where the token goes instead.
 *
 * @libsql/client (core/lib-esm/config.js, 0.18) takes two query parameters on a server URL: `tls=0|1`,
 * and `authToken`, a secret that every display of the URL would show. Any other parameter, or a
 * fragment, makes it throw at connect: a configuration error that no retry mends.
 */
export function centralUrlProblem(url: string, secrets: string): string | null {
  if (!URL.canParse(url) || !CENTRAL_SCHEME_RE.test(new URL(url).protocol))
    return "must be an http://, https://, libsql://, ws:// or wss:// URL of a libSQL server (sqld)";
  const u = new URL(url);
  if (u.username !== "" || u.password !== "") return `must not carry credentials ${secrets}`;
  const keys = [...u.searchParams.keys()];
  // A token under any spelling of its name is refused as a token (and never echoed), not as a stray parameter.
  if (keys.some((k) => /token/i.test(k))) return `must not carry a token as ?authToken= ${secrets}`;
  const other = keys.find((k) => k !== "tls");
  if (other !== undefined)
    return `has a query parameter the libSQL client does not take (${JSON.stringify(other)}): only tls=0 or tls=1`;
  const tls = u.searchParams.getAll("tls");
  if (tls.some((v) => v !== "0" && v !== "1")) return "has a tls parameter that is not 0 or 1";
  if (u.hash !== "" || url.includes("#")) return "must not have a #fragment";
  if (u.protocol === "libsql:" && tls.at(-1) === "0" && u.port === "")
    return "is a libsql:// URL with tls=0, which needs an explicit :port";
  return null;
}

/**
 * `url` without userinfo, query or fragment: how the central server's URL is shown (status, health, logs,
 * CLI output). Spec validation refuses credentials in it; this keeps any that got past (an older data dir's
 * meta, a URL typed on a command line) out of every display. "(invalid URL)" when it does not parse.
 */
export function displayUrl(url: string): string {
  if (!URL.canParse(url)) return "(invalid URL)";
  const u = new URL(url);
  u.username = "";
  u.password = "";
  u.search = "";
  u.hash = "";
  return u.toString().replace(/\/$/, "");
}
