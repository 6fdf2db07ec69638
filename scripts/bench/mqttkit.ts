/**
 * The bench's MQTT side (mqtt.js, the same client against every broker): a QoS 1 publisher
 * that keeps a fixed window of unacknowledged publishes, and a subscriber that waits for
 * messages matching a predicate.
 */
import { connectAsync, type MqttClient } from "mqtt";
import { matchTopic } from "../../broker/index.ts";
import { defer } from "./harness.ts";

/** Connect an mqtt.js client (MQTT 3.1.1, no reconnects); closed at exit. */
export async function connect(port: number, id: string): Promise<MqttClient> {
  const client = await connectAsync(`mqtt://127.0.0.1:${port}`, {
    clientId: `${id}-${process.pid}`,
    protocolVersion: 4,
    clean: true,
    reconnectPeriod: 0,
    connectTimeout: 10_000,
  });
  defer(() =>
    client.disconnected ? undefined : new Promise<void>((resolve) => client.end(true, {}, () => resolve())),
  );
  return client;
}

/** When the first publish left and the last PUBACK came back, ms (performance.now clock). */
export interface PublishRun {
  readonly firstAt: number;
  readonly lastAckAt: number;
  readonly count: number;
}

/**
 * Publish `count` QoS 1 messages (`message(i)` gives topic and payload), keeping at most
 * `window` unacknowledged. Rejects on the first error (a refused publish closes the socket).
 */
export function publishWindowed(
  client: MqttClient,
  count: number,
  window: number,
  message: (i: number) => { topic: string; payload: string },
): Promise<PublishRun> {
  return new Promise((resolve, reject) => {
    let next = 0;
    let acked = 0;
    let failed = false;
    const firstAt = performance.now();
    const onClose = () => fail(new Error(`connection closed after ${acked}/${count} acks (publish refused?)`));
    const fail = (err: Error) => {
      if (failed) return;
      failed = true;
      client.off("close", onClose);
      reject(err);
    };
    client.on("close", onClose);
    const send = () => {
      const i = next++;
      const m = message(i);
      client.publish(m.topic, m.payload, { qos: 1 }, (err) => {
        if (failed) return;
        if (err) return fail(err);
        acked++;
        if (acked === count) {
          client.off("close", onClose);
          return resolve({ firstAt, lastAckAt: performance.now(), count });
        }
        if (next < count) send();
      });
    };
    if (count === 0) return resolve({ firstAt, lastAckAt: firstAt, count });
    for (let k = 0; k < Math.min(window, count); k++) send();
  });
}

/**
 * A subscription that collects messages; `waitFor` resolves once `n` matched. Waits are woken by
 * arrivals, not by polling: the bench's own process shares the cores with what it measures.
 */
export interface Collector<T> {
  readonly matched: T[];
  /** Resolves with performance.now() at the moment the n-th match arrived. */
  waitFor(n: number, timeoutMs: number): Promise<number>;
  /** Resolves once `check` holds; checked now and after each match. */
  when(what: string, check: () => boolean, timeoutMs: number): Promise<void>;
  /** Stop collecting. */
  close(): void;
}

/** Subscribe to `filter` and keep every message on it that `pick` maps to a value (null/undefined: ignore). */
export async function collect<T>(
  client: MqttClient,
  filter: string,
  pick: (topic: string, payload: Buffer) => T | null,
): Promise<Collector<T>> {
  const matched: T[] = [];
  const arrivals: number[] = [];
  /** Waits to wake when a message arrives (`when`). */
  const waiting = new Set<() => void>();
  const onMessage = (topic: string, payload: Buffer) => {
    // mqtt.js hands every subscription's messages to every listener: keep ours only.
    if (!matchTopic(filter, topic)) return;
    let v: T | null;
    try {
      v = pick(topic, payload);
    } catch {
      v = null; // a malformed message must not tear down the client's stream
    }
    if (v === null || v === undefined) return;
    matched.push(v);
    arrivals.push(performance.now());
    for (const wake of waiting) wake();
  };
  const when = (what: string, check: () => boolean, timeoutMs: number) =>
    new Promise<void>((resolve, reject) => {
      if (check()) return resolve();
      const settle = () => {
        clearTimeout(timer);
        waiting.delete(wake);
      };
      const wake = () => {
        if (!check()) return;
        settle();
        resolve();
      };
      const timer = setTimeout(() => {
        settle();
        reject(new Error(`timed out after ${timeoutMs} ms waiting for ${what} (have ${matched.length} messages)`));
      }, timeoutMs);
      waiting.add(wake);
    });
  client.on("message", onMessage);
  await client.subscribeAsync(filter, { qos: 1 });
  return {
    matched,
    when,
    waitFor: async (n, timeoutMs) => {
      await when(`${n} messages on ${filter}`, () => arrivals.length >= n, timeoutMs);
      return arrivals[n - 1]!;
    },
    close: () => {
      client.off("message", onMessage);
      void client.unsubscribeAsync(filter).catch(() => undefined);
    },
  };
}

/** Parse a JSON payload, or null. */
export function json<T>(payload: Buffer): T | null {
  try {
    return JSON.parse(payload.toString("utf8")) as T;
  } catch {
    return null;
  }
}
