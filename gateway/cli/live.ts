/**
 * Calling the running gateway's HTTP API from the `fleet` command on the same machine.
 * Every call sends `content-type: application/json` (the API refuses state-changing calls
 * without it) and, when the gateway wrote one, its per-run local admin token.
 */

/** A running gateway as the CLI reaches it. */
export interface LiveEndpoint {
  /** Base URL, e.g. `http://127.0.0.1:8080`. */
  readonly http: string;
  /** The gateway's per-run local admin token, or null when it wrote none. */
  readonly token: string | null;
}

/** `fetch` against the running gateway's API as the local operator. */
export function liveFetch(live: LiveEndpoint, path: string, init: RequestInit = {}): Promise<Response> {
  const headers = new Headers(init.headers);
  if (!headers.has("content-type")) headers.set("content-type", "application/json");
  if (live.token !== null) headers.set("authorization", `Bearer ${live.token}`);
  // HTTPS on loopback: the certificate names the machine's public name, not 127.0.0.1, and
  // the endpoint came from our own data dir's gateway.json, so the name is not checked here.
  const tls = live.http.startsWith("https://127.0.0.1:") ? { tls: { rejectUnauthorized: false } } : {};
  return fetch(`${live.http}${path}`, { ...init, headers, ...tls });
}
