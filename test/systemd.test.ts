/**
 * systemd's service notifications (gateway/systemd.ts, docs/deploy.md): the protocol's parsing and
 * datagrams, the lifecycle's messages, the watchdog's gate on stalled commits, and a real
 * `fleet start` notifying a socket. test/systemd-unit.test.ts runs the unit under a real systemd.
 */
import { afterAll, describe, expect, test } from "bun:test";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { Store } from "../gateway/store/index.ts";
import { Notifier, notifyTarget, SystemdService, socketAddress, type Watched } from "../gateway/systemd.ts";
import { cleanupAll, scratchDir, TestFleet } from "./helpers/gateway.ts";
import { NotifySocket } from "./helpers/notify-socket.ts";
import { counterType, fleetHeader } from "./helpers/toml.ts";

afterAll(cleanupAll);

describe("what the environment asks", () => {
  test("no NOTIFY_SOCKET: nothing to notify", () => {
    expect(notifyTarget({}, 10)).toBeNull();
    expect(notifyTarget({ NOTIFY_SOCKET: "" }, 10)).toBeNull();
  });

  test("a path or an abstract name, with the watchdog when WATCHDOG_USEC is set for this pid", () => {
    expect(notifyTarget({ NOTIFY_SOCKET: "/run/systemd/notify" }, 10)).toEqual({
      socket: "/run/systemd/notify",
      watchdogMs: null,
    });
    expect(notifyTarget({ NOTIFY_SOCKET: "@sd-abc", WATCHDOG_USEC: "30000000", WATCHDOG_PID: "10" }, 10)).toEqual({
      socket: "@sd-abc",
      watchdogMs: 30_000,
    });
    expect(notifyTarget({ NOTIFY_SOCKET: "/n", WATCHDOG_USEC: "2500000" }, 10)?.valueOf()).toMatchObject({
      watchdogMs: 2500,
    });
  });

  test("a watchdog meant for another process (an inherited WATCHDOG_PID) or a bad interval watches nothing", () => {
    expect(notifyTarget({ NOTIFY_SOCKET: "/n", WATCHDOG_USEC: "30000000", WATCHDOG_PID: "11" }, 10)).toMatchObject({
      watchdogMs: null,
    });
    for (const bad of ["0", "-5", "abc", "1.5e400"])
      expect(notifyTarget({ NOTIFY_SOCKET: "/n", WATCHDOG_USEC: bad }, 10)).toMatchObject({ watchdogMs: null });
  });

  test("an address this cannot send to is an error naming it", () => {
    expect(notifyTarget({ NOTIFY_SOCKET: "relative/sock" }, 1)).toEqual({
      error: "NOTIFY_SOCKET=relative/sock is not a Unix socket path (absolute or @abstract)",
    });
    expect(notifyTarget({ NOTIFY_SOCKET: "vsock:2:1234" }, 1)).toHaveProperty("error");
    expect(notifyTarget({ NOTIFY_SOCKET: `/${"x".repeat(120)}` }, 1)).toEqual({
      error: "NOTIFY_SOCKET is longer than 108 bytes",
    });
  });

  test("an abstract address starts with a NUL and counts no terminator; a path counts its NUL", () => {
    const abs = socketAddress("@sd");
    expect([...abs.bytes.subarray(0, 5)]).toEqual([1, 0, 0, "s".charCodeAt(0), "d".charCodeAt(0)]);
    expect(abs.length).toBe(2 + 3);
    expect(socketAddress("/a/b").length).toBe(2 + 4 + 1);
  });

  test("the variables leave the environment, so no process started from the gateway inherits them", () => {
    const env: Record<string, string | undefined> = {
      NOTIFY_SOCKET: "rel",
      WATCHDOG_USEC: "1",
      WATCHDOG_PID: "1",
      A: "b",
    };
    const warnings: string[] = [];
    const log = { warn: (_o: object, m: string) => void warnings.push(m), info: () => undefined };
    expect(SystemdService.fromEnv(log, env, 1)).toBeNull();
    expect(env).toEqual({ A: "b" });
    expect(warnings).toEqual(["systemd: not notifying the service manager"]);
  });
});

describe("datagrams", () => {
  for (const kind of ["path", "abstract"] as const)
    test(`each send is one datagram of KEY=VALUE lines, to a ${kind} socket`, async () => {
      const path = kind === "path" ? join(scratchDir("fleet-notify-"), "notify") : `@fleet-test-${process.pid}`;
      const socket = new NotifySocket(path);
      const n = new Notifier({ socket: path, watchdogMs: null });
      try {
        expect(n.send({ READY: 1, STATUS: "two\nlines" })).toBe(0);
        expect(n.send({ WATCHDOG: 1 })).toBe(0);
        const got = await socket.next("WATCHDOG");
        expect(socket.received.map((m) => m.fields)).toEqual([{ READY: "1", STATUS: "two lines" }, { WATCHDOG: "1" }]);
        expect(got.fields).toEqual({ WATCHDOG: "1" });
      } finally {
        n.close();
        socket.close();
      }
    });

  test("a manager that does not read its socket never blocks the sender: a full queue is EAGAIN", () => {
    const path = join(scratchDir("fleet-notify-"), "notify");
    const socket = new NotifySocket(path);
    const n = new Notifier({ socket: path, watchdogMs: null });
    try {
      const results = new Set<number>();
      // Unix datagram queues hold max_dgram_qlen messages (10 by default) or their bytes: far fewer than this.
      for (let i = 0; i < 5000; i++) results.add(n.send({ WATCHDOG: 1, STATUS: "x".repeat(200) }));
      expect([...results].sort()).toEqual([0, 11]);
      // What was queued is still there to read.
      expect(socket.poll().length).toBeGreaterThan(0);
    } finally {
      n.close();
      socket.close();
    }
  });

  test("a socket nobody listens on: the send fails with its errno", () => {
    const n = new Notifier({ socket: join(scratchDir("fleet-notify-"), "absent"), watchdogMs: null });
    try {
      expect(n.send({ READY: 1 })).toBe(2); // ENOENT
    } finally {
      n.close();
    }
  });
});

/**
 * A service whose notifier keeps what it is asked to send (`errno` is what each send returns) and whose
 * repeating timer runs when `tick()` says, every `interval` ms of it.
 */
function recorder(watchdogMs: number | null) {
  const sent: Record<string, string | number>[] = [];
  const timer = { fn: null as (() => void) | null, interval: 0 };
  const repeat = (fn: () => void, ms: number) => {
    Object.assign(timer, { fn, interval: ms });
    return () => void (timer.fn = null);
  };
  const warnings: string[] = [];
  const state = { errno: 0 };
  const notifier = {
    target: { socket: "/fake", watchdogMs },
    send: (f: Readonly<Record<string, string | number>>) => {
      sent.push({ ...f });
      return state.errno;
    },
    close: () => undefined,
  };
  const log = { warn: (_o: object, m: string) => void warnings.push(m), info: () => undefined };
  const tick = (n = 1) => {
    for (let i = 0; i < n; i++) timer.fn?.();
  };
  return { sent, warnings, state, timer, tick, service: new SystemdService(notifier, log, repeat) };
}

function gateway(stall: { ms: number }): Watched {
  return { serviceStatus: () => "ready: 0 episode(s) running", commitStallMs: () => stall.ms };
}

describe("the service's lifecycle", () => {
  test("starting extends the start timeout; ready says READY=1 with the status line", () => {
    const r = recorder(null);
    r.service.starting();
    r.service.ready(gateway({ ms: 0 }));
    r.service.close();
    expect(r.sent[0]).toHaveProperty("STATUS");
    expect(r.sent[1]).toEqual({ EXTEND_TIMEOUT_USEC: 60_000_000 });
    expect(r.sent[2]).toEqual({ READY: 1, STATUS: "ready: 0 episode(s) running" });
  });

  test("the watchdog is pinged at half its interval while commits progress, and not once one stalls", () => {
    const r = recorder(30_000);
    const stall = { ms: 0 };
    r.service.ready(gateway(stall));
    expect(r.timer.interval).toBe(15_000);
    r.tick(2);
    expect(r.sent.slice(1)).toEqual([
      { WATCHDOG: 1, STATUS: "ready: 0 episode(s) running" },
      { WATCHDOG: 1, STATUS: "ready: 0 episode(s) running" },
    ]);
    // A commit waiting as long as WatchdogSec: no pings (systemd kills and restarts), the status says why.
    stall.ms = 30_000;
    const before = r.sent.length;
    r.tick(2);
    expect(r.sent.slice(before)).toEqual([
      { STATUS: "stalled: a commit has waited 30 s" },
      { STATUS: "stalled: a commit has waited 30 s" },
    ]);
    expect(r.warnings).toEqual([
      "watchdog: a commit has waited longer than WatchdogSec: no more pings, systemd restarts the gateway",
    ]);
    // Just short of it, or progressing again: pinged.
    stall.ms = 29_999;
    r.tick();
    expect(r.sent.at(-1)).toMatchObject({ WATCHDOG: 1 });
    r.service.close();
    expect(r.timer.fn).toBeNull();
  });

  test("without a watchdog the status line is refreshed every 10 s, and nothing pings", () => {
    const r = recorder(null);
    r.service.ready(gateway({ ms: 10 ** 9 }));
    expect(r.timer.interval).toBe(10_000);
    r.tick(3);
    r.service.close();
    expect(r.sent.slice(1)).toEqual(Array(3).fill({ STATUS: "ready: 0 episode(s) running" }));
  });

  test("a gateway whose state cannot be read gets no ping", () => {
    const r = recorder(20);
    r.service.ready({
      serviceStatus: () => "ok",
      commitStallMs: () => {
        throw new Error("boom");
      },
    });
    r.tick(3);
    r.service.close();
    expect(r.sent.filter((f) => "WATCHDOG" in f)).toEqual([]);
    expect(r.warnings).toEqual(Array(3).fill("systemd: reading the gateway's state failed"));
  });

  test("a reload says RELOADING=1 with the monotonic clock, then READY=1 whether or not it applied", async () => {
    const r = recorder(null);
    r.service.ready(gateway({ ms: 0 }));
    await r.service.reload(async () => undefined, gateway({ ms: 0 }));
    await expect(r.service.reload(() => Promise.reject(new Error("bad toml")), gateway({ ms: 0 }))).rejects.toThrow(
      "bad toml",
    );
    r.service.close();
    const kinds = r.sent.map((f) => ("RELOADING" in f ? "reloading" : "READY" in f ? "ready" : "status"));
    expect(kinds).toEqual(["ready", "reloading", "ready", "reloading", "ready"]);
    const usec = BigInt(String(r.sent[1]?.MONOTONIC_USEC));
    expect(usec).toBeGreaterThan(0n);
    expect(usec).toBeLessThanOrEqual(process.hrtime.bigint() / 1000n);
  });

  test("a reload before ready or during the stop runs without saying READY=1", async () => {
    const r = recorder(null);
    let runs = 0;
    await r.service.reload(async () => void runs++, gateway({ ms: 0 }));
    r.service.ready(gateway({ ms: 0 }));
    r.service.stopping(10_000);
    await r.service.reload(async () => void runs++, gateway({ ms: 0 }));
    r.service.close();
    expect(runs).toBe(2);
    expect(r.sent.filter((f) => "READY" in f || "RELOADING" in f)).toHaveLength(1);
  });

  test("stopping says STOPPING=1 and extends the stop timeout by the drain's bound and 30 s", () => {
    const r = recorder(1000);
    r.service.ready(gateway({ ms: 0 }));
    r.service.stopping(45_000);
    r.service.close();
    expect(r.sent.at(-1)).toMatchObject({ STOPPING: 1, EXTEND_TIMEOUT_USEC: 75_000_000 });
  });

  test("failing sends warn once, not on every tick, and again after one got through", () => {
    const r = recorder(20);
    r.state.errno = 111;
    r.service.ready(gateway({ ms: 0 }));
    r.tick(3);
    r.state.errno = 0;
    r.tick();
    r.state.errno = 111;
    r.tick();
    r.service.close();
    expect(r.sent).toHaveLength(6);
    expect(r.warnings).toEqual(["systemd: a notification failed", "systemd: a notification failed"]);
  });

  test("starting's heartbeat extends the start timeout every 10 s until ready", () => {
    const r = recorder(null);
    r.service.starting();
    expect(r.timer.interval).toBe(10_000);
    r.tick(2);
    expect(r.sent.slice(2)).toEqual([{ EXTEND_TIMEOUT_USEC: 60_000_000 }, { EXTEND_TIMEOUT_USEC: 60_000_000 }]);
    r.service.ready(gateway({ ms: 0 }));
    expect(r.sent.at(-1)).toMatchObject({ READY: 1 });
    r.service.close();
  });
});

describe("the commit stall the watchdog reads", () => {
  test("zero while idle; grows while a commit waits for its WAL sync; zero once it settles", async () => {
    const syncs: (() => void)[] = [];
    const store = await Store.open(join(scratchDir("fleet-stall-"), "s.db"), {
      synchronous: "full",
      walSync: () => new Promise<void>((resolve) => syncs.push(resolve)),
    });
    try {
      expect(store.writer.stalledMs()).toBe(0);
      const write = store.writer.write([{ sql: "CREATE TABLE t (x)", args: [] }]);
      while (syncs.length === 0) await Bun.sleep(5);
      await Bun.sleep(60);
      expect(store.writer.stalledMs()).toBeGreaterThanOrEqual(50);
      for (const release of syncs.splice(0)) release();
      await write;
      await store.writer.drain();
      expect(store.writer.stalledMs()).toBe(0);
    } finally {
      for (const release of syncs.splice(0)) release();
      await store.close();
    }
  });
});

describe("fleet start under a service manager", () => {
  test("READY=1 once listening, watchdog pings, RELOADING=1 and a refused edit, STOPPING=1 at the stop", async () => {
    const path = join(scratchDir("fleet-notify-"), "notify");
    const socket = new NotifySocket(path);
    const fleet = new TestFleet(fleetHeader("notify") + counterType("counter", "c/+/in"), {
      env: { NOTIFY_SOCKET: path, WATCHDOG_USEC: "1000000" },
    });
    try {
      const starting = fleet.start();
      const ready = await socket.next("READY", "1", 30_000);
      // Ready means listening: the HTTP API answers at once.
      const info = await starting;
      expect((await fetch(`http://127.0.0.1:${info.http_port}/healthz`)).status).toBe(200);
      expect(ready.fields.STATUS).toMatch(/^ready: 0 episode\(s\) running, 0 stimuli queued, lag 0\.0 s$/);
      const before = socket.received.slice(0, socket.received.indexOf(ready));
      expect(before.some((m) => m.fields.EXTEND_TIMEOUT_USEC === "60000000")).toBe(true);
      expect(before.some((m) => "READY" in m.fields)).toBe(false);

      const readyAt = socket.received.indexOf(ready);
      await socket.next("WATCHDOG", "1", 5000, readyAt + 1);
      const second = socket.received.findIndex((m, i) => i > readyAt && m.fields.WATCHDOG === "1");
      await socket.next("WATCHDOG", "1", 5000, second + 1);

      // A reload of a fleet.toml it refuses: the status line after it says so (`systemctl status`).
      writeFileSync(fleet.configPath, "[fleet\n");
      process.kill(fleet.pid, "SIGHUP");
      const reloading = await socket.next("RELOADING", "1");
      expect(reloading.fields.MONOTONIC_USEC).toMatch(/^\d+$/);
      const reloaded = await socket.next("READY", "1", 15_000, socket.received.indexOf(reloading) + 1);
      expect(reloaded.fields.STATUS).toStartWith("ready: 0 episode(s) running");
      expect(reloaded.fields.STATUS).toContain("; fleet.toml: ");

      expect(await fleet.stop()).toBe(0);
      const stopping = await socket.next("STOPPING", "1");
      // drain_timeout_ms's default (10 s) and 30 s for the rest of the stop.
      expect(stopping.fields.EXTEND_TIMEOUT_USEC).toBe("40000000");
    } finally {
      if (fleet.running) await fleet.kill();
      socket.close();
    }
  });
});
