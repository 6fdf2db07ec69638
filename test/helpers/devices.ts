/**
 * Device-test helpers on top of helpers/gateway.ts: CONNACK codes, SUBACK grants,
 * mosquitto_pub runs, connection-close waits and `fleet device` / `fleet quarantine` calls.
 */
import type { IClientOptions, MqttClient } from "mqtt";
import { connectMqtt, runCli, within, type CliResult, type TestFleet } from "./gateway.ts";

/** The CONNACK return code of a refused connect, or 0 when it was accepted (the client is then closed). */
export async function connackCode(port: number, opts: IClientOptions): Promise<number> {
  return connectMqtt(port, opts).then(
    (c) => {
      c.end(true);
      return 0;
    },
    (e: { code?: number }) => e.code ?? -1,
  );
}

/** The QoS granted per filter; 128 = refused (mqtt.js rejects such a SUBACK but carries the packet). */
export function grantedQos(client: MqttClient, filters: string[]): Promise<number[]> {
  const p = client.subscribeAsync(filters, { qos: 1 }).then(
    (grants) => grants.map((g) => g.qos as number),
    (err: { packet?: { granted?: number[] } }) => {
      if (!err.packet?.granted) throw err;
      return err.packet.granted;
    },
  );
  return within(p, 10_000, `SUBACK for ${filters.join(", ")}`);
}

/** Resolves when the client's connection closes. */
export function closed(client: MqttClient): Promise<void> {
  if (client.disconnected || !client.connected) return Promise.resolve();
  return new Promise((resolve) => client.once("close", () => resolve()));
}

/**
 * Publish QoS 1 and report what happened: "acked" (recorded, or refused for good and dropped), or
 * "closed" when the broker dropped the connection instead (a transient refusal, or a session closed).
 */
export async function publishOutcome(client: MqttClient, topic: string, payload: string): Promise<"acked" | "closed"> {
  const close = closed(client).then(() => "closed" as const);
  const ack = client.publishAsync(topic, payload, { qos: 1 }).then(
    () => "acked" as const,
    () => close,
  );
  return within(Promise.race([ack, close]), 10_000, `PUBACK or close for ${topic}`);
}

/** Run mosquitto_pub once (QoS 1) and return its exit code and output. */
export async function mosquittoPub(
  port: number,
  args: { id: string; user?: string; password?: string; topic: string; message: string },
): Promise<{ code: number; stderr: string }> {
  const cmd = [
    "mosquitto_pub",
    "-h",
    "127.0.0.1",
    "-p",
    String(port),
    "-i",
    args.id,
    "-q",
    "1",
    "-t",
    args.topic,
    "-m",
    args.message,
  ];
  if (args.user !== undefined) cmd.push("-u", args.user);
  if (args.password !== undefined) cmd.push("-P", args.password);
  const proc = Bun.spawn(cmd, { stdin: "ignore", stdout: "pipe", stderr: "pipe" });
  const timer = setTimeout(() => proc.kill("SIGKILL"), 15_000);
  const [stderr, code] = await Promise.all([new Response(proc.stderr).text(), proc.exited]);
  clearTimeout(timer);
  return { code, stderr };
}

/** `fleet device ...` against this fleet's fleet.toml (human output unless `--json` is passed). */
export function deviceCli(f: TestFleet, ...args: string[]): Promise<CliResult> {
  return runCli(["device", ...args, "--config", f.configPath, "--data-dir", f.dataDir]);
}

/** A quarantined stimulus as `fleet quarantine --json` prints it. */
export interface QuarantineJson {
  seq: number;
  agent: string;
  sid: string;
  attempts: number;
  last_error: string | null;
  episodes: string[];
}

/** `fleet quarantine --json` (through HTTP when the gateway runs, from the file when stopped). */
export async function quarantined(f: TestFleet): Promise<QuarantineJson[]> {
  const r = await runCli(["quarantine", "--config", f.configPath, "--data-dir", f.dataDir, "--json"]);
  if (r.code !== 0) throw new Error(`fleet quarantine exited ${r.code}: ${r.stderr}`);
  return (r.json as { stimuli: QuarantineJson[] }).stimuli;
}

/** `fleet quarantine retry|drop <seq> --json`. */
export function quarantineAction(f: TestFleet, action: "retry" | "drop", seq: number): Promise<CliResult> {
  return runCli(["quarantine", action, String(seq), "--config", f.configPath, "--data-dir", f.dataDir, "--json"]);
}
