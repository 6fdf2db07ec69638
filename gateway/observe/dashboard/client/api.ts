/**
 * Every call the dashboard makes to the gateway, in one place (a sign-in would add its
 * credentials here and nowhere else).
 */
import type { AgentDetail, AgentPage, Episode, EpisodeDetail, Health, PatchOp, StateAt, Trace } from "./types.ts";

/** A non-2xx answer: its status and the API's `error.message`. */
export class ApiError extends Error {
  constructor(
    readonly status: number,
    message: string,
  ) {
    super(message);
  }
}

async function request<T>(method: "GET" | "POST", path: string): Promise<T> {
  const res = await fetch(path, { method, headers: { accept: "application/json" } });
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
  episodes: (type: string, key: string, limit: number) =>
    request<{ episodes: Episode[] }>("GET", `${agentPath(type, key)}/episodes?limit=${limit}`),
  episode: (id: string) => request<EpisodeDetail>("GET", `/api/episodes/${encodeURIComponent(id)}`),
  lifecycle: (type: string, key: string, action: "pause" | "resume") =>
    request<unknown>("POST", `${agentPath(type, key)}/${action}`),
  state: (type: string, key: string, seq?: number) =>
    request<StateAt>("GET", `${agentPath(type, key)}/state${seq === undefined ? "" : `?at=${seq}`}`),
  stateDiff: (type: string, key: string, from: number, to: number) =>
    request<{ patch: PatchOp[] }>("GET", `${agentPath(type, key)}/state/diff?from=${from}&to=${to}`),
  trace: (id: string) => request<Trace>("GET", `/api/episodes/${encodeURIComponent(id)}/trace`),
  /** The live event stream (server-sent events). */
  events: () => new EventSource("/api/events"),
};
