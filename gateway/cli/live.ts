/**
 * Calling the running gateway's HTTP API from the `fleet` command on the same machine.
 * Every call sends `content-type: application/json` (the API refuses state-changing calls
 * without it) and, when the gateway wrote one, its per-run local admin token.
 */
import { OperatorError } from "../errors.ts";

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

/**
 * GET `path` from the running gateway and parse its JSON body. An answer other than 2xx (a 503 while it is
 * busy, a 401, …) is an OperatorError naming `what` and the server's message: the CLI prints it and exits 1,
 * where reading the error body as the answer would print it as data, or guess.
 */
export async function liveRead<T>(live: LiveEndpoint, path: string, what: string): Promise<T> {
  const res = await liveFetch(live, path);
  const text = await res.text();
  let body: unknown;
  try {
    body = JSON.parse(text);
  } catch {
    body = undefined; // a proxy's HTML page, an empty body: the status says enough
  }
  if (!res.ok) {
    const message = (body as { error?: { message?: unknown } } | undefined)?.error?.message;
    throw new OperatorError(
      `${what}: the running gateway answered HTTP ${res.status}${typeof message === "string" ? `: ${message}` : ""}`,
    );
  }
  if (body === undefined) throw new OperatorError(`${what}: the running gateway's answer is not JSON`);
  return body as T;
}
