/**
 * The embedded broker against a real Mosquitto on the same seeded client operations (scripts/diff-mqtt.ts):
 * sessions clean and persistent, takeovers, wills, subscriptions at each QoS, retained messages, clients
 * coming back while messages for them are published, and restarts of both brokers. What each client
 * receives, and each CONNACK's session present, must be the same on both. Found: session present for a
 * session with no subscription, messages sent twice to a returning session, wills published at a takeover.
 */
import { describe, expect, test } from "bun:test";
import { join } from "node:path";
import { ROOT } from "./helpers/gateway.ts";

async function diff(...args: string[]): Promise<{ code: number; out: string }> {
  const proc = Bun.spawn([process.execPath, join(ROOT, "scripts/diff-mqtt.ts"), ...args], {
    cwd: ROOT,
    stdout: "pipe",
    stderr: "pipe",
  });
  const [out, err] = await Promise.all([new Response(proc.stdout).text(), new Response(proc.stderr).text()]);
  return { code: await proc.exited, out: out + err };
}

/** The summary line's counts: what the run compared. */
function compared(out: string): Record<"resumed" | "messages" | "retained" | "wills", number> {
  const m = /(\d+) sessions resumed, (\d+) messages, (\d+) retained copies, (\d+) wills/.exec(out);
  if (!m) throw new Error(`no summary in the output:\n${out}`);
  return { resumed: Number(m[1]), messages: Number(m[2]), retained: Number(m[3]), wills: Number(m[4]) };
}

/** Each run: its flags, and what it must have compared besides messages (at least one of each). */
const RUNS = [
  {
    name: "on the libSQL persistence, both brokers restarted now and then",
    args: ["--ops", "60", "--seed", "4"],
    saw: ["resumed", "retained"],
  },
  { name: "on the memory persistence", args: ["--ops", "100", "--seed", "1", "--memory"], saw: ["resumed", "wills"] },
] as const;

describe("the embedded broker and Mosquitto 2 answer the same client operations the same", () => {
  for (const run of RUNS) {
    test(run.name, async () => {
      const { code, out } = await diff(...run.args);
      expect({ code, out }).toEqual({ code: 0, out: expect.stringContaining("the same on both brokers") });
      const c = compared(out);
      expect(c.messages).toBeGreaterThan(20);
      for (const what of run.saw) expect({ what, any: c[what] > 0 }).toEqual({ what, any: true });
    }, 120_000);
  }
});
