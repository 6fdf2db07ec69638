/**
 * Every call the dashboard makes to the gateway, in one place. The session cookie set at
 * sign-in goes with every call by itself (same origin); a 401 means the session ended, so the
 * page reloads into the sign-in form.
 */
import type {
  Activity,
  AgentDetail,
  AgentPage,
  AuditRecord,
  Episode,
  EpisodeDetail,
  Health,
  OutputItem,
  PatchOp,
  Quarantined,
  ReplayResult,
  Session,
  StateAt,
  Trace,
  Wakeup,
} from "./types.ts";

/** A non-2xx answer: its status and the API's `error.message`. */
export class ApiError extends Error {
  constructor(
    readonly status: number,
    message: string,
  ) {
    super(message);
  }
}

async function request<T>(method: "GET" | "POST" | "DELETE", path: string): Promise<T> {
  // The API refuses state changes without a JSON content type (no cross-site form posts).
  const headers = { accept: "application/json", "content-type": "application/json" };
  const res = await fetch(path, { method, headers });
  if (res.status === 401) location.reload(); // signed out or revoked: back to the sign-in form
  const body = (await res.json().catch(() => null)) as { error?: { message?: string } } | null;
  if (!res.ok) throw new ApiError(res.status, body?.error?.message ?? `${res.status} ${res.statusText}`);
  return body as T;
}

const agentPath = (type: string, key: string) => `/api/agents/${encodeURIComponent(type)}/${encodeURIComponent(key)}`;

/** The gateway's API as the dashboard uses it. */
export const api = {
  health: () => request<Health>("GET", "/api/fleet"),
  agents: (query: URLSearchParams) => request<AgentPage>("GET", `/api/agents?${query}`),
  agent: (type: string, key: string) => request<AgentDetail>("GET", agentPath(type, key)),
  /** Newest first; `filter` may hold `kind` (stimulus kind) and `status`. */
  episodes: (type: string, key: string, limit: number, filter: Record<string, string> = {}) =>
    request<{ episodes: Episode[] }>(
      "GET",
      `${agentPath(type, key)}/episodes?${new URLSearchParams({ limit: String(limit), ...filter })}`,
    ),
  episode: (id: string) => request<EpisodeDetail>("GET", `/api/episodes/${encodeURIComponent(id)}`),
  /** The agent's durable wake-ups, latest due first. */
  wakeups: (type: string, key: string, limit: number) =>
    request<{ wakeups: Wakeup[] }>("GET", `${agentPath(type, key)}/wakeups?limit=${limit}`),
  lifecycle: (type: string, key: string, action: "pause" | "resume" | "retire") =>
    request<unknown>("POST", `${agentPath(type, key)}/${action}`),
  state: (type: string, key: string, seq?: number) =>
    request<StateAt>("GET", `${agentPath(type, key)}/state${seq === undefined ? "" : `?at=${seq}`}`),
  stateDiff: (type: string, key: string, from: number, to: number) =>
    request<{ patch: PatchOp[] }>("GET", `${agentPath(type, key)}/state/diff?from=${from}&to=${to}`),
  trace: (id: string) => request<Trace>("GET", `/api/episodes/${encodeURIComponent(id)}/trace`),
  /** Who is signed in. */
  session: () => request<Session>("GET", "/api/session"),
  signOut: () => request<unknown>("DELETE", "/api/session"),
  /** Operator actions, newest first (admin tokens only: 403 otherwise). */
  audit: (limit: number) => request<{ records: AuditRecord[] }>("GET", `/api/audit?limit=${limit}`),
  /** Outputs of committed episodes (emits and publishes), newest first. */
  outputs: (limit: number, agent?: string) =>
    request<{ outputs: OutputItem[] }>(
      "GET",
      `/api/outputs?${new URLSearchParams({ limit: String(limit), ...(agent ? { agent } : {}) })}`,
    ),
  /** Per-minute episodes, failures and lag of the last `minutes`. */
  activity: (minutes: number) => request<Activity>("GET", `/api/activity?minutes=${minutes}`),
  quarantine: (limit: number) => request<{ stimuli: Quarantined[] }>("GET", `/api/quarantine?limit=${limit}`),
  /** Put a quarantined stimulus back in its agent's queue, or drop it (the dashboard's "discard"). */
  resolveQuarantined: (seq: number, action: "retry" | "drop") =>
    request<{ state: string }>("POST", `/api/quarantine/${seq}/${action}`),
  /** Re-run an episode on its recorded inputs. */
  replay: (id: string) => request<ReplayResult>("POST", `/api/episodes/${encodeURIComponent(id)}/replay`),
  /** The live event stream (server-sent events). */
  events: () => new EventSource("/api/events"),
};
