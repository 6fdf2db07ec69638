/**
 * What the HTTP surface needs from the gateway. Handlers take the narrowest slice they
 * use (a `Pick` of this), never the `Gateway` class: the composition root imports the
 * HTTP folder, not the other way round.
 */
import type { Logger } from "pino";
import type { TokenAuth } from "../auth/index.ts";
import type { AuditEntry } from "./access.ts";
import type { FleetEvents } from "../events.ts";
import type { LifecycleResult } from "../fleet/index.ts";
import type { LifecycleAction } from "../types.ts";
import type { Intake, Route } from "../intake/index.ts";
import type { GcOutcome, QuarantineAction, ReplayResult, TraceMiss } from "../ops/index.ts";
import type { DeployCheckOptions, DeployCheckReport } from "../ops/index.ts";
import type { SpecVersion } from "../spec/index.ts";
import type { Store } from "../store/index.ts";
import type { AgentId, GatewayState } from "../types.ts";

/** The metrics registry as the `/metrics` route and the SSE gauge see it. */
export interface MetricsView {
  readonly registry: import("prom-client").Registry;
  readonly contentType: string;
  text(): Promise<string>;
}

/** Everything any HTTP handler may ask of the gateway. */
export interface HttpHost {
  readonly state: GatewayState;
  readonly spec: SpecVersion;
  readonly store: Store;
  readonly intake: Intake;
  readonly events: FleetEvents;
  readonly log: Logger;
  readonly metrics: MetricsView;
  /** Who may call the API (the tokens file and the local CLI token). */
  readonly tokens: TokenAuth;
  /** Append an operator action to the audit log (durable when it resolves). */
  audit(entry: AuditEntry): Promise<void>;
  /** Where webhook secrets come from. */
  readonly secrets: Readonly<Record<string, string | undefined>>;
  /** `/readyz`: running and commits not failing (else the reason). */
  readiness(): { readonly ready: boolean; readonly state: GatewayState; readonly reason?: string };
  /** The body of `fleet/health` and `/api/fleet`. */
  health(): Promise<unknown>;
  /** Stimuli waiting for an agent. */
  queued(agent: string): number;
  /** The gateway's clock (epoch ms): what retention, budgets and the activity buckets run on. */
  readonly now: () => number;
  /** Promote or abort a type's canary rollout by hand (docs/upgrading.md). */
  decideRollout(type: string, action: "promote" | "abort"): Promise<{ ok: boolean; message: string }>;
  /** Retry (admitted like a new stimulus) or drop a quarantined stimulus. */
  resolveQuarantined(seq: number, action: "retry" | "drop"): Promise<QuarantineAction>;
  /** Pause, resume or retire; `drain` (retire): after the stimuli already queued have run. */
  setLifecycle(id: AgentId, action: LifecycleAction, opts?: { drain?: boolean }): Promise<LifecycleResult>;
  /** Re-run a recorded episode (id or unique prefix) on its recorded inputs: MATCH, DIVERGED or UNREPLAYABLE. */
  replay(idOrPrefix: string): Promise<ReplayResult | TraceMiss>;
  /** The replay gate on `toml` (null: the fleet.toml file as it is now) against the running spec; throws SpecError. */
  deployCheck(toml: string | null, opts: DeployCheckOptions): Promise<DeployCheckReport>;
  /** Retention now, on the gateway's clock (never a client's). */
  gc(opts: { dryRun: boolean }): Promise<GcOutcome>;
  routeTopic(topic: string): Route;
}
