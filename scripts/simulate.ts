/**
 * Device simulator: N boilers publishing temperature (and, less often, humidity) readings.
 *
 *   bun scripts/simulate.ts [--url mqtt://127.0.0.1:1883] [--devices 10] [--rate 1]
 *     [--duration 0] [--qos 1] [--prefix sensors] [--anomaly-rate 0.01]
 *     [--excursions-per-hour 2] [--seed N] [--seq-start N]
 *
 * The reading model is pure and seeded (exported for tests); the MQTT part runs only as a script.
 */
import { connectAsync } from "mqtt";
import type { MqttClient } from "mqtt";
import { scriptArgs } from "./bench/cli.ts";

/** Seeded uniform [0, 1) generator (mulberry32). */
export function mulberry32(seed: number): () => number {
  const s = stream(seed);
  return () => s.next();
}

/** mulberry32 whose state can be read back, so a step can hand it on inside a plain value. */
function stream(seed: number): { next(): number; readonly state: number } {
  let a = seed | 0;
  return {
    next() {
      a = (a + 0x6d2b79f5) | 0;
      let t = Math.imul(a ^ (a >>> 15), 1 | a);
      t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
      return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
    },
    get state() {
      return a;
    },
  };
}

/** Standard normal draw (Box-Muller). */
function gaussian(next: () => number): number {
  const u1 = 1 - next(); // (0, 1]: log(0) would be -Infinity
  return Math.sqrt(-2 * Math.log(u1)) * Math.cos(2 * Math.PI * next());
}

/** A boiler's fixed character, drawn once from the seed. */
export interface DeviceProfile {
  readonly name: string;
  /** Resting temperature, 60–75 °C. */
  readonly base: number;
  readonly driftAmp: number;
  readonly driftPeriodS: number;
  readonly driftPhase: number;
  readonly noiseSd: number;
  readonly humidityBase: number;
}

/** A slow rise above 80 °C: smooth ramp up, hold around `peak`, smooth ramp down. */
export interface Excursion {
  readonly startS: number;
  readonly durationS: number;
  readonly peak: number;
}

/** Everything a device's next reading depends on; plain data, so steps are pure. */
export interface DeviceState {
  readonly profile: DeviceProfile;
  /** mulberry32 state. */
  readonly rng: number;
  /** Next temperature / humidity sequence numbers (the payload `id` suffix). */
  readonly seq: number;
  readonly humSeq: number;
  /** Simulated time of the previous temperature reading, in seconds. */
  readonly lastS: number;
  readonly excursion: Excursion | null;
}

/** What a device publishes, minus the wall-clock `ts` the CLI adds. */
export interface Reading {
  readonly id: string;
  readonly value: number;
  readonly unit: "C" | "%";
}

/** Knobs of the temperature model. */
export interface ModelOptions {
  /** Probability that a reading is a one-off spike. */
  readonly anomalyRate: number;
  /** Mean rate at which a device starts an excursion above 80 °C. */
  readonly excursionsPerHour: number;
}

/** `count` devices named `boiler-1..count`, deterministic for `seed`; ids start at `seqStart`. */
export function makeDevices(count: number, seed: number, seqStart = 1): DeviceState[] {
  const next = mulberry32(seed);
  const devices: DeviceState[] = [];
  for (let i = 1; i <= count; i++) {
    const profile: DeviceProfile = {
      name: `boiler-${i}`,
      base: 60 + 15 * next(),
      driftAmp: 1 + 2 * next(),
      driftPeriodS: 600 + 3000 * next(),
      driftPhase: 2 * Math.PI * next(),
      noiseSd: 0.2 + 0.3 * next(),
      humidityBase: 35 + 20 * next(),
    };
    // Each device gets its own stream so adding a device does not change the others' readings.
    devices.push({
      profile,
      rng: Math.floor(next() * 4294967296) | 0,
      seq: seqStart,
      humSeq: seqStart,
      lastS: 0,
      excursion: null,
    });
  }
  return devices;
}

/** 0..1 envelope of an excursion at time `t`: smoothstep up over 25 %, hold, smoothstep down. */
function envelope(ex: Excursion, t: number): number {
  const f = (t - ex.startS) / ex.durationS;
  if (f <= 0 || f >= 1) return 0;
  const ramp = (x: number) => x * x * (3 - 2 * x);
  if (f < 0.25) return ramp(f / 0.25);
  if (f > 0.75) return ramp((1 - f) / 0.25);
  return 1;
}

const round = (x: number, digits: number) => Math.round(x * 10 ** digits) / 10 ** digits;

/** The device's temperature at simulated time `tS` seconds, and its next state. Pure. */
export function nextTemperature(
  state: DeviceState,
  tS: number,
  opts: ModelOptions,
): { reading: Reading; state: DeviceState; spike: boolean } {
  const rng = stream(state.rng);
  const next = () => rng.next();
  const p = state.profile;

  let excursion =
    state.excursion !== null && tS < state.excursion.startS + state.excursion.durationS ? state.excursion : null;
  // Poisson start, scaled by the real gap so the rate does not depend on --rate.
  if (excursion === null && next() < (opts.excursionsPerHour * Math.max(0, tS - state.lastS)) / 3600) {
    excursion = { startS: tS, durationS: 120 + 480 * next(), peak: 82 + 6 * next() };
  }

  const drift = p.driftAmp * Math.sin((2 * Math.PI * tS) / p.driftPeriodS + p.driftPhase);
  const resting = p.base + drift;
  const env = excursion === null ? 0 : envelope(excursion, tS);
  // Blend toward the peak rather than add to it, so every excursion clears 80 whatever the base.
  let value = resting + env * ((excursion?.peak ?? resting) - resting) + p.noiseSd * gaussian(next);

  const spike = next() < opts.anomalyRate;
  if (spike) value += (next() < 0.8 ? 1 : -1) * (8 + 7 * next());

  return {
    reading: { id: `${p.name}-${state.seq}`, value: round(value, 2), unit: "C" },
    state: { ...state, rng: rng.state, seq: state.seq + 1, lastS: tS, excursion },
    spike,
  };
}

/** The device's relative humidity at simulated time `tS` seconds, and its next state. Pure. */
export function nextHumidity(state: DeviceState, tS: number): { reading: Reading; state: DeviceState } {
  const rng = stream(state.rng);
  const p = state.profile;
  const value =
    p.humidityBase +
    5 * Math.sin((2 * Math.PI * tS) / (p.driftPeriodS * 1.7) + p.driftPhase) +
    0.8 * gaussian(() => rng.next());
  return {
    // A distinct id space: a dedup key shared with the temperature stream would drop readings.
    reading: { id: `${p.name}-h-${state.humSeq}`, value: round(Math.min(100, Math.max(0, value)), 1), unit: "%" },
    state: { ...state, rng: rng.state, humSeq: state.humSeq + 1 },
  };
}

/** One humidity reading per this many temperature readings. */
const HUMIDITY_EVERY = 10;
const TICK_MS = 20;
const PROGRESS_MS = 5000;
/** Unacknowledged QoS 1 publishes allowed before the simulator waits for the broker. */
const MAX_INFLIGHT = 1000;

interface CliOptions {
  readonly url: string;
  readonly devices: number;
  readonly rate: number;
  readonly durationS: number;
  readonly qos: 0 | 1;
  readonly prefix: string;
  readonly model: ModelOptions;
  readonly seed: number;
  readonly seqStart: number;
}

function fail(message: string): never {
  process.stderr.write(`simulate: ${message}\n`);
  process.exit(2);
}

const SIMULATE_USAGE =
  "usage: bun scripts/simulate.ts [--url mqtt://127.0.0.1:1883] [--devices 10] [--rate 1] [--duration 0]\n" +
  "  [--qos 1] [--prefix sensors] [--anomaly-rate 0.01] [--excursions-per-hour 2] [--seed N] [--seq-start N]";

function parseCli(argv: string[]): CliOptions {
  const { values } = scriptArgs(SIMULATE_USAGE, {
    args: argv,
    options: {
      url: { type: "string", default: "mqtt://127.0.0.1:1883" },
      devices: { type: "string", default: "10" },
      rate: { type: "string", default: "1" },
      duration: { type: "string", default: "0" },
      qos: { type: "string", default: "1" },
      prefix: { type: "string", default: "sensors" },
      "anomaly-rate": { type: "string", default: "0.01" },
      "excursions-per-hour": { type: "string", default: "2" },
      seed: { type: "string" },
      "seq-start": { type: "string" },
    },
  });
  const num = (name: string, raw: string, ok: (n: number) => boolean, what: string): number => {
    const n = Number(raw);
    if (raw.trim() === "" || !Number.isFinite(n) || !ok(n)) fail(`--${name} must be ${what}, got "${raw}"`);
    return n;
  };
  const qos = num("qos", values.qos, (n) => n === 0 || n === 1, "0 or 1");
  return {
    url: values.url,
    devices: num("devices", values.devices, (n) => Number.isInteger(n) && n >= 1, "a positive integer"),
    rate: num("rate", values.rate, (n) => n > 0, "a positive number"),
    durationS: num("duration", values.duration, (n) => n >= 0, "seconds >= 0"),
    qos: qos === 0 ? 0 : 1,
    prefix: values.prefix.replace(/\/+$/, ""),
    model: {
      anomalyRate: num("anomaly-rate", values["anomaly-rate"], (n) => n >= 0 && n <= 1, "a probability in [0, 1]"),
      excursionsPerHour: num("excursions-per-hour", values["excursions-per-hour"], (n) => n >= 0, "a number >= 0"),
    },
    seed: values.seed === undefined ? Date.now() | 0 : num("seed", values.seed, Number.isInteger, "an integer"),
    // The gateway remembers stimulus ids for days (docs/fleet-toml.md retention.dedup_days): starting a rerun's
    // sequence at the clock keeps its ids from colliding with an earlier run's and being dropped.
    seqStart:
      values["seq-start"] === undefined
        ? Date.now()
        : num("seq-start", values["seq-start"], Number.isInteger, "an integer"),
  };
}

async function run(opts: CliOptions): Promise<void> {
  const log = (line: string) => process.stderr.write(`[sim] ${line}\n`);
  let client: MqttClient;
  try {
    // No retries before the first CONNACK: a wrong URL should fail now, not loop silently.
    client = await connectAsync(
      opts.url,
      { clientId: `simulator-${process.pid}`, connectTimeout: 5000, reconnectPeriod: 1000 },
      false,
    );
  } catch (err) {
    log(`cannot connect to ${opts.url}: ${(err as Error).message}`);
    process.exit(1);
  }
  client.on("offline", () => log("broker connection lost; reconnecting"));
  client.on("reconnect", () => log("reconnecting"));
  client.on("error", (err) => log(`mqtt error: ${err.message}`));

  const devices = makeDevices(opts.devices, opts.seed, opts.seqStart);
  const totals = { sent: 0, acked: 0, errors: 0, spikes: 0 };
  const excursionsStarted = new Set<string>();
  let issued = 0; // readings issued across all devices, round-robin
  const limit = opts.durationS > 0 ? Math.floor(opts.durationS * opts.rate * opts.devices) : Infinity;
  const started = Date.now();
  log(`${opts.devices} devices x ${opts.rate} Hz -> ${opts.url} (qos ${opts.qos}, seed ${opts.seed})`);

  const publish = (topic: string, reading: Reading) => {
    totals.sent += 1;
    client.publish(topic, JSON.stringify({ ...reading, ts: Date.now() }), { qos: opts.qos }, (err) => {
      if (err) totals.errors += 1;
      else totals.acked += 1;
    });
  };

  const tick = () => {
    // Catch up to where the wall clock says we should be, so timer jitter does not change the rate.
    const due = Math.min(limit, Math.floor(((Date.now() - started) / 1000) * opts.rate * opts.devices));
    while (issued < due && totals.sent - totals.acked - totals.errors < MAX_INFLIGHT) {
      const i = issued % opts.devices;
      const cycle = Math.floor(issued / opts.devices);
      const tS = cycle / opts.rate; // simulated time: exact, independent of when the tick ran
      const dev = devices[i];
      if (dev === undefined) throw new Error("device index out of range");
      const t = nextTemperature(dev, tS, opts.model);
      let state = t.state;
      if (t.spike) totals.spikes += 1;
      if (state.excursion) excursionsStarted.add(`${state.profile.name}@${state.excursion.startS}`);
      publish(`${opts.prefix}/${state.profile.name}/temperature`, t.reading);
      if (cycle % HUMIDITY_EVERY === 0) {
        const h = nextHumidity(state, tS);
        state = h.state;
        publish(`${opts.prefix}/${state.profile.name}/humidity`, h.reading);
      }
      devices[i] = state;
      issued += 1;
    }
  };

  let last = { at: started, sent: 0, acked: 0 };
  const progress = () => {
    const now = Date.now();
    const dt = (now - last.at) / 1000;
    const inflight = totals.sent - totals.acked - totals.errors;
    log(
      `t=${Math.round((now - started) / 1000)}s sent=${totals.sent} acked=${totals.acked} ` +
        `${((totals.sent - last.sent) / dt).toFixed(1)}/s acked ${((totals.acked - last.acked) / dt).toFixed(1)}/s ` +
        `inflight=${inflight} errors=${totals.errors} spikes=${totals.spikes} excursions=${excursionsStarted.size}`,
    );
    last = { at: now, sent: totals.sent, acked: totals.acked };
  };

  const ticker = setInterval(tick, TICK_MS);
  const reporter = setInterval(progress, PROGRESS_MS);

  let stopping = false;
  const stop = async (why: string) => {
    if (stopping) return;
    stopping = true;
    clearInterval(ticker);
    clearInterval(reporter);
    // Give outstanding QoS 1 publishes a moment to be acknowledged so the totals mean something.
    const deadline = Date.now() + 5000;
    while (totals.sent - totals.acked - totals.errors > 0 && Date.now() < deadline) await Bun.sleep(50);
    await client.endAsync();
    const secs = (Date.now() - started) / 1000;
    log(
      `${why}: sent=${totals.sent} acked=${totals.acked} errors=${totals.errors} ` +
        `in ${secs.toFixed(1)}s (${(totals.sent / secs).toFixed(1)}/s)`,
    );
    process.stdout.write(
      `${JSON.stringify({
        ...totals,
        unacked: totals.sent - totals.acked - totals.errors,
        excursions: excursionsStarted.size,
        seconds: secs,
      })}\n`,
    );
    process.exit(0);
  };

  process.on("SIGINT", () => {
    // A second Ctrl-C while draining means "now".
    if (stopping) process.exit(130);
    void stop("interrupted");
  });
  process.on("SIGTERM", () => void stop("terminated"));
  if (Number.isFinite(limit)) {
    const watch = setInterval(() => {
      if (issued >= limit) {
        clearInterval(watch);
        void stop("done");
      }
    }, TICK_MS);
  }
}

if (import.meta.main) {
  await run(parseCli(process.argv.slice(2)));
}
