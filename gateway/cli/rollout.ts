/**
 * `fleet rollout promote|abort <type>` (docs/upgrading.md): decide a canary rollout by hand on the
 * running gateway. Promote: every agent of the type runs the new code now. Abort: the canaries return
 * to the previous bundle and the stimuli the new code quarantined are retried there.
 */
import type { Cli } from "./context.ts";
import { UsageError } from "./context.ts";
import { liveFetch } from "./live.ts";

/** Run `fleet rollout …`; exit 1 when there is nothing to decide. */
export async function cmdRollout(cli: Cli, action: string | undefined, type: string | undefined): Promise<number> {
  if (action !== "promote" && action !== "abort")
    throw new UsageError(`rollout needs promote or abort, got ${JSON.stringify(action ?? "")}`);
  if (!type) throw new UsageError(`rollout ${action} needs an agent type`);
  const live = await cli.running();
  if (!live) {
    console.error("fleet: rollout needs the running gateway (it decides what its agents run next)");
    return 1;
  }
  const res = await liveFetch(live, `/api/rollouts/${encodeURIComponent(type)}/${action}`, { method: "POST" });
  const body = (await res.json()) as { message?: string; error?: { message: string } };
  if (!res.ok) {
    if (cli.json) cli.print({ ok: false, type, error: body.error?.message }, () => "");
    console.error(`fleet: ${body.error?.message ?? `HTTP ${res.status}`}`);
    return 1;
  }
  cli.print({ ok: true, type, action, message: body.message }, () => body.message ?? "ok");
  return 0;
}
