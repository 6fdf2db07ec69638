import { describe, expect, test } from "bun:test";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { parseDuration } from "../gateway/spec/index.ts";
import { compileSpec, DEFAULT_BUDGET, loadSpec, restartNeeded } from "../gateway/spec/index.ts";
import { SpecError } from "../gateway/spec/index.ts";

const FILE = "/srv/plant/fleet.toml";
/** Any readable file stands for a PEM file in these specs: the gateway reads them at start. */
const PEM = JSON.stringify(import.meta.path);

const FULL = `
[fleet]
name = "plant-7"
max_concurrent_episodes = 8

[broker]
mqtt_port = 1884
allow_anonymous = false
devices = "devices.toml"

[http]
port = 0

[llm]
api_key_env = "OPENAI_API_KEY"

[agents.temp-monitor]
module = "agents/examples/temp-monitor.ts"
subscribe = ["sensors/+/temperature"]
instances = ["boiler-1"]
every = "30s"
dedup = "id"
tools = ["publish", "llm"]
publish = ["alerts/#"]
secrets = ["SLACK_TOKEN"]
config = { threshold = 80.0, labels = ["a", "b"] }

[agents.temp-monitor.budget]
episodes_per_hour = 100

[agents.reporter]
module = "./reporter.ts"
cron = "*/5 * * * *"
catch_up = "all"

[hooks.github]
type = "temp-monitor"
key_field = "repo"

[hooks.fixed]
agent = "reporter/default"
`;

/** Compiles `text` expecting a SpecError, and returns it. */
async function specError(text: string, file = FILE): Promise<SpecError> {
  try {
    await compileSpec(text, file);
  } catch (err) {
    if (err instanceof SpecError) return err;
    throw err;
  }
  throw new Error("expected a SpecError");
}

/** An agent type with a module plus the given extra lines. */
const agent = (lines: string) => `[agents.x]\nmodule = "x.ts"\n${lines}\n`;

describe("parseDuration", () => {
  test("reads single units and combinations as milliseconds", () => {
    expect(parseDuration("500ms")).toBe(500);
    expect(parseDuration("30s")).toBe(30_000);
    expect(parseDuration("5m")).toBe(300_000);
    expect(parseDuration("1h")).toBe(3_600_000);
    expect(parseDuration("1d")).toBe(86_400_000);
    expect(parseDuration("1m30s")).toBe(90_000);
    expect(parseDuration("1h30m15s250ms")).toBe(5_415_250);
  });

  test("rejects malformed durations", () => {
    for (const s of ["", "30", "s", "5 m", "1x", "30s1m", "1m1m", "-5s"]) expect(parseDuration(s)).toBeNull();
  });
});

describe("compileSpec", () => {
  test("a full valid file compiles with defaults filled and is deeply frozen", async () => {
    const v = await compileSpec(FULL, FILE);
    const { spec } = v;
    expect(spec.fleet).toEqual({
      name: "plant-7",
      data_dir: ".fleet",
      max_concurrent_episodes: 8,
      synchronous: "full",
      sandbox: "auto",
      warm_spares: 4,
      allow_weak_sandbox: false,
      shard: null,
      sandbox_uids: { first: 1_879_048_192, count: 65_536 },
      drain_timeout_ms: 10_000,
      max_send_hops: 16,
      disk_free_limit_mb: 50,
    });
    expect(spec.broker).toEqual({
      host: "0.0.0.0",
      host_default: true,
      mqtt_port: 1884,
      ws_port: null,
      max_packet_bytes: 262_144,
      max_connections: 5000,
      max_keepalive: 0,
      allow_anonymous: false,
      allow_anonymous_network: false,
      devices_file: "/srv/plant/devices.toml",
      tls_port: null,
      wss_port: null,
      tls: null,
      use_identity_as_username: false,
      connection_messages: false,
      persistence: "memory",
      max_offline_messages: 1000,
      max_offline_bytes: 0,
      max_offline_bytes_total: 0,
      session_expiry_days: 0,
      sys_interval: 10,
      trust_dup: false,
      external: null,
    });
    expect(spec.http).toEqual({
      host: "127.0.0.1",
      port: 0,
      tls: null,
      allowed_hosts: [],
      open_metrics: false,
      allow_unauthenticated: false,
      max_concurrent_requests: 256,
      max_body_bytes_in_flight: 16 * 1_048_576,
    });
    expect(spec.llm).toEqual({
      url: "http://127.0.0.1:11434/v1",
      model: "llama3.2",
      api_key_env: "OPENAI_API_KEY",
      timeout_ms: 30_000,
    });
    expect(spec.retention).toEqual({ episodes_days: 30, dedup_days: 7, quarantine_days: 30, redelivery_minutes: 60 });

    const tm = spec.agents["temp-monitor"]!;
    expect(tm.key).toBe("{1}");
    expect(tm.timer).toEqual({ kind: "every", ms: 30_000, catch_up: "one" });
    expect(tm.budget).toEqual({ ...DEFAULT_BUDGET, episodes_per_hour: 100 });
    expect(tm.config).toEqual({ threshold: 80, labels: ["a", "b"] });
    expect(tm.checkpoint).toEqual({ keep: 50 });
    expect(tm.retry).toEqual({ max_attempts: 3, backoff_ms: 1000 });
    expect(tm.rollout).toEqual({
      require_check: false,
      canary: 0,
      min_episodes: 50,
      max_failure_rate: 0.05,
      bake_ms: 600_000,
    });
    expect(tm.max_queue).toBe(10_000);
    expect(tm.max_agents).toBe(100_000);
    expect(tm.http_hosts).toEqual([]);

    const rep = spec.agents.reporter!;
    expect(rep.key).toBe("default");
    expect(rep.subscribe).toEqual([]);
    expect(rep.tools).toEqual([]);
    expect(rep.dedup).toBeNull();
    expect(rep.timer).toEqual({ kind: "cron", expr: "*/5 * * * *", catch_up: "all" });

    expect(spec.hooks.github).toEqual({
      name: "github",
      agent: null,
      type: "temp-monitor",
      key_field: "repo",
      dedup: null,
      secret_env: null,
      max_body_bytes: 1_048_576,
    });
    expect(spec.hooks.fixed?.agent).toBe("reporter/default");

    expect(Object.isFrozen(v)).toBe(true);
    expect(Object.isFrozen(spec.broker)).toBe(true);
    expect(Object.isFrozen(tm.budget.tool_costs)).toBe(true);
    expect(Object.isFrozen(tm.config.labels)).toBe(true);
    expect(() => {
      (tm.subscribe as string[]).push("more/#");
    }).toThrow();
  });

  test("max_agents 0 is no limit, and instances up to max_agents are fine", async () => {
    const none = await compileSpec(agent('max_agents = 0\ninstances = ["a", "b", "c"]'), FILE);
    expect(none.spec.agents.x!.max_agents).toBe(0);
    const full = await compileSpec(agent('max_agents = 3\ninstances = ["a", "b", "c"]'), FILE);
    expect(full.spec.agents.x!.instances).toHaveLength(3);
  });

  test("bytes_per_day defaults to 256 MiB a day per agent; 0 (no limit) and other integers are kept", async () => {
    const budget = async (line: string) =>
      (await compileSpec(`[agents.x]\nmodule = "m.ts"\n[agents.x.budget]\n${line}\n`, FILE)).spec.agents.x!.budget
        .bytes_per_day;
    expect(DEFAULT_BUDGET.bytes_per_day).toBe(268_435_456);
    expect(await budget("")).toBe(268_435_456);
    expect(await budget("bytes_per_day = 0")).toBe(0);
    expect(await budget("bytes_per_day = 1048576")).toBe(1_048_576);
  });

  test("an empty file is a fleet of defaults", async () => {
    const { spec } = await compileSpec("", FILE);
    expect(spec.fleet.name).toBe("fleet");
    expect(spec.broker.allow_anonymous).toBe(true);
    expect(spec.agents).toEqual({});
    expect(spec.hooks).toEqual({});
  });

  test("a syntax error reports the file, line and column", async () => {
    const err = await specError(`[fleet]\nname = "a"\n\nmax_concurrent_episodes = = 3\n`);
    expect(err.file).toBe(FILE);
    expect(err.line).toBe(4);
    expect(err.column).toBe(27);
    expect(err.keyPath).toBeNull();
    expect(err.message).toStartWith(`${FILE}:4:27: invalid TOML`);
  });

  test("module and devices paths resolve against the fleet.toml directory", async () => {
    const { spec } = await compileSpec(`${agent("")}[agents.y]\nmodule = "/opt/y.ts"\n`, "/etc/fleets/a/fleet.toml");
    expect(spec.agents.x?.module).toBe("x.ts");
    expect(spec.agents.x?.module_path).toBe("/etc/fleets/a/x.ts");
    expect(spec.agents.y?.module_path).toBe("/opt/y.ts");
  });

  test("the hash is stable for the same text and differs for different text", async () => {
    const a = await compileSpec(FULL, FILE);
    const b = await compileSpec(FULL, "/elsewhere/fleet.toml");
    const c = await compileSpec(`${FULL}\n# edited\n`, FILE);
    expect(a.hash).toMatch(/^[0-9a-f]{64}$/);
    expect(b.hash).toBe(a.hash);
    expect(c.hash).not.toBe(a.hash);
  });

  test("a key template may use captures that every subscribe pattern has", async () => {
    const { spec } = await compileSpec(agent(`subscribe = ["a/+/+/x", "b/+/#"]\nkey = "{1}:{2}"`), FILE);
    expect(spec.agents.x?.key).toBe("{1}:{2}");
  });
});

describe("schema errors name the key path", () => {
  const cases: [string, string, string, RegExp][] = [
    [
      "negative episodes_per_hour",
      agent("[agents.x.budget]\nepisodes_per_hour = -5"),
      "agents.x.budget.episodes_per_hour",
      /must be a positive integer$/,
    ],
    ["unknown top-level table", "[colours]\nred = 1\n", "colours", /is not a known key/],
    ["unknown nested key", agent('colour = "red"'), "agents.x.colour", /is not a known key/],
    ["unknown budget key", agent("[agents.x.budget]\nfuel = 1"), "agents.x.budget.fuel", /is not a known key/],
    ["# not last", agent('subscribe = ["a/#/b"]'), "agents.x.subscribe[0]", /# must be a whole level and the last one/],
    ["+ inside a level", agent('subscribe = ["ok/+", "a/b+"]'), "agents.x.subscribe[1]", /\+ must be a whole level/],
    ["subscribe under fleet/", agent('subscribe = ["fleet/agents/#"]'), "agents.x.subscribe[0]", /fleet\//],
    ["subscribe to $SYS", agent('subscribe = ["$SYS/#"]'), "agents.x.subscribe[0]", /\$/],
    [
      "key template beyond the wildcards",
      agent('subscribe = ["a/+/t", "b/+/+"]\nkey = "{2}"'),
      "agents.x.key",
      /references \{2\} but "a\/\+\/t" has 1/,
    ],
    [
      "default key with a literal pattern",
      agent('subscribe = ["a/+/t", "b/c"]'),
      "agents.x.key",
      /defaults to "\{1\}"/,
    ],
    [
      "both every and cron",
      agent('every = "1m"\ncron = "* * * * *"'),
      "agents.x.cron",
      /cannot be combined with every/,
    ],
    ["bad cron", agent('cron = "61 * * * *"'), "agents.x.cron", /is not a valid cron expression/],
    ["cron with too few fields", agent('cron = "* * *"'), "agents.x.cron", /is not a valid cron expression/],
    ["bad duration", agent('every = "often"'), "agents.x.every", /must be a positive duration/],
    ["dedup template never closed", agent('dedup = "{device}-{seq"'), "agents.x.dedup", /opens or closes no field/],
    ["dedup brace alone", agent('dedup = "id}"'), "agents.x.dedup", /opens or closes no field/],
    ["dedup empty field", agent('dedup = "{device}:{}"'), "agents.x.dedup", /field \{\} that is not a field path/],
    ["dedup empty path part", agent('dedup = "device..seq"'), "agents.x.dedup", /must be a field path/],
    [
      "hook dedup never closed",
      '[hooks.h]\nagent = "x/a"\ndedup = "{id"\n',
      "hooks.h.dedup",
      /opens or closes no field/,
    ],
    [
      "unknown tool",
      agent('tools = ["publish", "shell"]'),
      "agents.x.tools[1]",
      /must be one of publish, http, llm, send/,
    ],
    ["missing module", "[agents.x]\nsubscribe = []\n", "agents.x.module", /is required/],
    ["negative max_connections", "[broker]\nmax_connections = -1\n", "broker.max_connections", /non-negative integer/],
    ["fractional max_keepalive", "[broker]\nmax_keepalive = 1.5\n", "broker.max_keepalive", /non-negative integer/],
    ["max_keepalive past 65535", "[broker]\nmax_keepalive = 70000\n", "broker.max_keepalive", /at most 65535/],
    ["tls_port without a certificate", "[broker]\ntls_port = 8883\n", "broker.tls_port", /needs tls_cert and tls_key/],
    ["tls_cert without tls_key", '[http]\ntls_cert = "c.pem"\n', "http.tls_key", /both or neither/],
    [
      "a CRL without tls_ca",
      `[broker]\ntls_port = 8883\ntls_cert = ${PEM}\ntls_key = ${PEM}\ntls_crl = ${PEM}\n`,
      "broker.tls_crl",
      /needs tls_ca: it revokes client certificates that CA signed/,
    ],
    [
      "an unreadable CRL",
      `[broker]\ntls_port = 8883\ntls_cert = ${PEM}\ntls_key = ${PEM}\ntls_ca = ${PEM}\ntls_crl = "/no/such/crl.pem"\n`,
      "broker.tls_crl",
      /cannot read \/no\/such\/crl.pem \(ENOENT\)/,
    ],
    [
      "certificate user names without client certificates",
      '[broker]\nuse_identity_as_username = true\nallow_anonymous = false\ndevices = "d.toml"\n',
      "broker.use_identity_as_username",
      /needs tls_ca and tls_port: .*mqtts listener/,
    ],
    [
      "certificate user names without a devices file",
      "[broker]\nuse_identity_as_username = true\n" +
        `tls_port = 8883\ntls_cert = ${PEM}\ntls_key = ${PEM}\ntls_ca = ${PEM}\n`,
      "broker.use_identity_as_username",
      /needs devices: a certificate's CN is a device id there/,
    ],
    [
      "certificate user names with an external broker",
      '[broker]\nurl = "mqtt://b"\nuse_identity_as_username = true\n',
      "broker.use_identity_as_username",
      /with url the gateway runs none/,
    ],
    [
      "unreadable certificate",
      '[broker]\ntls_port = 8883\ntls_cert = "/no/such/cert.pem"\ntls_key = "/no/such/key.pem"\n',
      "broker.tls_cert",
      /cannot read \/no\/such\/cert.pem \(ENOENT\)/,
    ],
    ["bad type name", '[agents."a b"]\nmodule = "m.ts"\n', 'agents."a b"', /is not a valid agent type name/],
    [
      "type named ..",
      '[agents.".."]\nmodule = "m.ts"\n',
      'agents.".."',
      /is not a valid agent type name .*not \. or \.\./,
    ],
    [
      "hook at unknown type",
      agent('[hooks.h]\ntype = "nope"\nkey_field = "k"'),
      "hooks.h.type",
      /"nope", which is not defined/,
    ],
    ["hook at unknown agent", agent('[hooks.h]\nagent = "nope/1"'), "hooks.h.agent", /"nope", which is not defined/],
    [
      "hook with both forms",
      agent('[hooks.h]\nagent = "x/1"\ntype = "x"\nkey_field = "k"'),
      "hooks.h.type",
      /cannot be combined with agent/,
    ],
    ["hook with neither form", agent("[hooks.h]\nmax_body_bytes = 10"), "hooks.h.agent", /is required/],
    [
      "closed broker without devices",
      "[broker]\nallow_anonymous = false\n",
      "broker.devices",
      /is required when allow_anonymous = false/,
    ],
    [
      "anonymous broker on the network",
      '[broker]\nhost = "0.0.0.0"\n',
      "broker.host",
      /anyone on the network could publish to the fleet.*allow_anonymous_network = true/,
    ],
    ["port out of range", "[http]\nport = 70000\n", "http.port", /must be a port number/],
    [
      "a negative quarantine_days",
      "[retention]\nquarantine_days = -1\n",
      "retention.quarantine_days",
      /must be a number of days, 0 for no limit/,
    ],
    [
      "wrong type",
      '[fleet]\nmax_concurrent_episodes = "four"\n',
      "fleet.max_concurrent_episodes",
      /must be a positive integer/,
    ],
    ["bad enum", '[fleet]\nsynchronous = "off"\n', "fleet.synchronous", /must be "full" or "normal"/],
    [
      "unknown broker persistence",
      '[broker]\npersistence = "disk"\n',
      "broker.persistence",
      /must be "libsql" or "memory"/,
    ],
    [
      "no offline queue",
      "[broker]\nmax_offline_messages = 0\n",
      "broker.max_offline_messages",
      /must be a positive integer/,
    ],
    ["external broker URL of another scheme", '[broker]\nurl = "http://b:1883"\n', "broker.url", /"mqtt:\/\/"/],
    [
      "external broker URL with credentials",
      '[broker]\nurl = "mqtt://u:p@b:1883"\n',
      "broker.url",
      /must not carry credentials/,
    ],
    ["trust_dup not a boolean", '[broker]\ntrust_dup = "yes"\n', "broker.trust_dup", /must be true or false/],
    [
      "replication URL with credentials",
      '[replication]\nurl = "http://alice:s3cret@central:8080"\n',
      "replication.url",
      /must not carry credentials .*auth_token_env/,
    ],
    [
      // @libsql/client would send it as the token; fleet.toml (and so the center's spec_versions) would hold it.
      "replication URL with a token in its query",
      '[replication]\nurl = "http://central:8080?authToken=eyJhbGciOiJFZERTQSJ9.e30.sig"\n',
      "replication.url",
      /must not carry a token as \?authToken= .*auth_token_env/,
    ],
    [
      "replication URL with a query parameter the libSQL client refuses",
      '[replication]\nurl = "http://central:8080?x=1"\n',
      "replication.url",
      /query parameter the libSQL client does not take \("x"\): only tls=0 or tls=1/,
    ],
    ["replication URL with tls=2", '[replication]\nurl = "https://central?tls=2"\n', "replication.url", /not 0 or 1/],
    [
      "password_env without username",
      '[broker]\nurl = "mqtt://b"\npassword_env = "PW"\n',
      "broker.password_env",
      /needs username/,
    ],
    [
      "ca_file with a plain mqtt url",
      `[broker]\nurl = "mqtt://b"\nca_file = ${JSON.stringify(FILE)}\n`,
      "broker.ca_file",
      /needs an "mqtts:\/\/" url/,
    ],
    [
      "a listener key with an external broker",
      '[broker]\nurl = "mqtt://b"\nws_port = 9001\n',
      "broker.ws_port",
      /with url the gateway runs none/,
    ],
    [
      "the MQTT port with an external broker",
      '[broker]\nurl = "mqtt://b"\nmqtt_port = 1883\n',
      "broker.mqtt_port",
      /with url the gateway runs none/,
    ],
    [
      "connection_messages with an external broker",
      '[broker]\nurl = "mqtt://b"\nconnection_messages = true\n',
      "broker.connection_messages",
      /an external broker logs its own \(Mosquitto: connection_messages\)/,
    ],
    [
      "max_keepalive with an external broker",
      '[broker]\nurl = "mqtt://b"\nmax_keepalive = 60\n',
      "broker.max_keepalive",
      /an external broker bounds its own \(Mosquitto: max_keepalive\)/,
    ],
    [
      "a connection limit with an external broker",
      '[broker]\nurl = "mqtt://b"\nmax_connections = 10\n',
      "broker.max_connections",
      /an external broker sets its own \(Mosquitto: max_connections\)/,
    ],
    [
      "session persistence with an external broker",
      '[broker]\nurl = "mqtt://b"\npersistence = "libsql"\n',
      "broker.persistence",
      /an external broker keeps its own \(Mosquitto: persistence\)/,
    ],
    [
      "an offline queue bound with an external broker",
      '[broker]\nurl = "mqtt://b"\nmax_offline_messages = 10\n',
      "broker.max_offline_messages",
      /Mosquitto: max_queued_messages/,
    ],
    [
      "an offline byte bound with an external broker",
      '[broker]\nurl = "mqtt://b"\nmax_offline_bytes = 0\n',
      "broker.max_offline_bytes",
      /Mosquitto: max_queued_bytes/,
    ],
    [
      "a bound on all offline queues with an external broker",
      '[broker]\nurl = "mqtt://b"\nmax_offline_bytes_total = 1000000\n',
      "broker.max_offline_bytes_total",
      /Mosquitto: memory_limit/,
    ],
    [
      "a $SYS interval with an external broker",
      '[broker]\nurl = "mqtt://b"\nsys_interval = 10\n',
      "broker.sys_interval",
      /Mosquitto: sys_interval/,
    ],
    ["a negative $SYS interval", "[broker]\nsys_interval = -1\n", "broker.sys_interval", /non-negative integer/],
    [
      "trust_dup with an external broker",
      '[broker]\nurl = "mqtt://b"\ntrust_dup = false\n',
      "broker.trust_dup",
      /only the embedded broker sees/,
    ],
    [
      "allow_anonymous_network with an external broker",
      '[broker]\nurl = "mqtt://b"\nallow_anonymous_network = true\n',
      "broker.allow_anonymous_network",
      /with url the gateway runs none/,
    ],
    ["username without url", '[broker]\nusername = "gw"\n', "broker.username", /needs url/],
    [
      "session expiry with an external broker",
      '[broker]\nurl = "mqtt://b"\nsession_expiry_days = 14\n',
      "broker.session_expiry_days",
      /an external broker expires its own sessions/,
    ],
    [
      "a negative max_offline_bytes",
      "[broker]\nmax_offline_bytes = -1\n",
      "broker.max_offline_bytes",
      /non-negative integer/,
    ],
    [
      "a fractional max_offline_bytes_total",
      "[broker]\nmax_offline_bytes_total = 1.5\n",
      "broker.max_offline_bytes_total",
      /non-negative integer/,
    ],
    ["a negative session expiry", "[broker]\nsession_expiry_days = -1\n", "broker.session_expiry_days", /0 for never/],
    [
      "a session expiry in words",
      '[broker]\nsession_expiry_days = "2w"\n',
      "broker.session_expiry_days",
      /0 for never/,
    ],
    [
      "MQTT 5 on the embedded broker",
      '[broker]\nmqtt_version = "5"\n',
      "broker.mqtt_version",
      /embedded broker speaks MQTT 3.1.1 only/,
    ],
    ["small memory", agent("[agents.x.budget]\nmemory_mb = 8"), "agents.x.budget.memory_mb", /at least 16/],
    ["bad secret name", agent('secrets = ["slack-token"]'), "agents.x.secrets[0]", /environment variable name/],
    ["a shard on the embedded broker", '[fleet]\nshard = "1/2"\n', "fleet.shard", /needs an external broker/],
    ["a shard that is not i/N", '[fleet]\nshard = "two"\n[broker]\nurl = "mqtt://b"\n', "fleet.shard", /"i\/N"/],
    ["a shard index past N", '[fleet]\nshard = "3/2"\n[broker]\nurl = "mqtt://b"\n', "fleet.shard", /from 1 to N/],
    ["shard index 0", '[fleet]\nshard = "0/2"\n[broker]\nurl = "mqtt://b"\n', "fleet.shard", /from 1 to N/],
    ["too many shards", '[fleet]\nshard = "1/65"\n[broker]\nurl = "mqtt://b"\n', "fleet.shard", /from 1 to 64/],
    ["a shard that is a number", "[fleet]\nshard = 2\n", "fleet.shard", /must be a string/],
    [
      "sandbox uids that are not first:count",
      '[fleet]\nsandbox_uids = "100000"\n',
      "fleet.sandbox_uids",
      /first:count/,
    ],
    ["sandbox uids from root", '[fleet]\nsandbox_uids = "0:1000"\n', "fleet.sandbox_uids", /uid 0/],
    ["no sandbox uids", '[fleet]\nsandbox_uids = "100000:0"\n', "fleet.sandbox_uids", /at least one uid/],
    [
      "sandbox uids past the last valid uid",
      '[fleet]\nsandbox_uids = "4294967000:1000"\n',
      "fleet.sandbox_uids",
      /at or below uid 4294967294/,
    ],
    [
      "require_check not a boolean",
      agent('[agents.x.rollout]\nrequire_check = "yes"'),
      "agents.x.rollout.require_check",
      /must be true or false/,
    ],
    ["unknown rollout key", agent("[agents.x.rollout]\nsurge = 2"), "agents.x.rollout.surge", /is not a known key/],
    [
      "an episode timeout longer than a timer holds",
      agent("[agents.x.budget]\nepisode_timeout_ms = 3000000000"),
      "agents.x.budget.episode_timeout_ms",
      /must be at most 2147483647 ms \(about 24.8 days, the longest delay a timer holds\)/,
    ],
    [
      "a retry backoff longer than a timer holds",
      agent("[agents.x.retry]\nbackoff_ms = 2147483648"),
      "agents.x.retry.backoff_ms",
      /must be at most 2147483647 ms/,
    ],
    [
      "a drain timeout longer than a timer holds",
      "[fleet]\ndrain_timeout_ms = 1e10\n",
      "fleet.drain_timeout_ms",
      /at most/,
    ],
    ["an llm timeout longer than a timer holds", "[llm]\ntimeout_ms = 9999999999\n", "llm.timeout_ms", /at most/],
    [
      "a replication interval longer than a timer holds",
      '[replication]\nurl = "http://127.0.0.1:8080"\ninterval = "30d"\n',
      "replication.interval",
      /must be at most 24 days/,
    ],
    ["a negative max_send_hops", "[fleet]\nmax_send_hops = -1\n", "fleet.max_send_hops", /must be a non-negative/],
    ["max_send_hops as a string", '[fleet]\nmax_send_hops = "16"\n', "fleet.max_send_hops", /must be a non-negative/],
    [
      "a negative disk_free_limit_mb",
      "[fleet]\ndisk_free_limit_mb = -1\n",
      "fleet.disk_free_limit_mb",
      /must be a non-negative integer/,
    ],
    [
      "disk_free_limit_mb in other units",
      '[fleet]\ndisk_free_limit_mb = "1GB"\n',
      "fleet.disk_free_limit_mb",
      /must be a non-negative integer/,
    ],
    ["a negative max_agents", agent("max_agents = -1"), "agents.x.max_agents", /must be a non-negative integer/],
    ["a fractional max_agents", agent("max_agents = 2.5"), "agents.x.max_agents", /must be a non-negative integer/],
    ["max_agents as a string", agent('max_agents = "10"'), "agents.x.max_agents", /must be a non-negative integer/],
    [
      "more instances than max_agents",
      agent('max_agents = 2\ninstances = ["a", "b", "c"]'),
      "agents.x.instances",
      /lists 3 instances, more than max_agents \(2\)/,
    ],
    [
      "fractional bytes_per_day",
      agent("[agents.x.budget]\nbytes_per_day = 1.5"),
      "agents.x.budget.bytes_per_day",
      /must be a non-negative integer/,
    ],
    [
      "negative bytes_per_day",
      agent("[agents.x.budget]\nbytes_per_day = -1"),
      "agents.x.budget.bytes_per_day",
      /must be a non-negative integer/,
    ],
    [
      "bytes_per_day as a string",
      agent('[agents.x.budget]\nbytes_per_day = "1GB"'),
      "agents.x.budget.bytes_per_day",
      /must be a non-negative integer/,
    ],
  ];
  for (const [what, text, keyPath, message] of cases) {
    test(`${what} is reported at ${keyPath}`, async () => {
      const err = await specError(text);
      expect(err.keyPath).toBe(keyPath);
      expect(err.detail.split("\n")[0]).toStartWith(`${keyPath} `);
      expect(err.detail.split("\n")[0]).toMatch(message);
      // Placed where its key is written, or (a key that is missing) at its table's header.
      expect(err.line).not.toBeNull();
      expect(err.message).toStartWith(`${FILE}:${err.line}:${err.column}: ${keyPath} `);
      const written = text.split("\n")[err.line! - 1]!.slice(err.column! - 1);
      const key = keyPath
        .split(".")
        .at(-1)!
        .replace(/\[\d+\]$/, "")
        .replaceAll('"', "");
      if (keyPath.endsWith("]")) expect(text.split("\n")[err.line! - 1]).toContain(`${key} = [`);
      else if (!written.startsWith("[")) expect(written).toStartWith(key);
    });
  }

  test("a replication URL takes tls=0 or tls=1, the libSQL client's one query parameter but the token", async () => {
    for (const url of ["libsql://central:8080?tls=0", "https://central?tls=1", "http://central:8080"]) {
      const { spec } = await compileSpec(`[replication]\nurl = "${url}"\n`, FILE);
      expect(spec.replication?.url).toBe(url);
    }
  });

  test("http_hosts entries are normalised as the http tool compares them, or refused naming why", async () => {
    const { spec } = await compileSpec(
      agent('http_hosts = ["LOCALHOST:21903", "Example.COM", "127.1:80", "[0:0::1]:8080", "[::1]"]'),
      FILE,
    );
    expect(spec.agents.x!.http_hosts).toEqual([
      "localhost:21903",
      "example.com",
      "127.0.0.1:80",
      "[::1]:8080",
      "[::1]",
    ]);
    for (const [entry, why] of [
      [
        "::1",
        'agents.x.http_hosts[0] "::1" is an IPv6 address: write it in brackets ([::1], or [::1]:8080 with a port)',
      ],
      ["host:0", 'agents.x.http_hosts[0] "host:0" has a port that is not a number from 1 to 65535'],
      ["host:http", 'agents.x.http_hosts[0] "host:http" has a port that is not a number from 1 to 65535'],
      [
        "https://host/x",
        'agents.x.http_hosts[0] "https://host/x" must be a host name or address, with an optional :port, ' +
          "without scheme or path",
      ],
    ] as const)
      expect((await specError(agent(`http_hosts = ["${entry}"]`))).detail).toBe(why);
  });

  test("the documented example message is produced word for word", async () => {
    const err = await specError(
      '[agents.temp-monitor]\nmodule = "m.ts"\n[agents.temp-monitor.budget]\nepisodes_per_hour = 0\n',
    );
    expect(err.detail).toBe("agents.temp-monitor.budget.episodes_per_hour must be a positive integer");
  });

  test("every problem is listed, one per line, the first one giving keyPath", async () => {
    const err = await specError(agent('colour = "red"\ntools = ["shell"]'));
    // The first is placed by the error's own prefix, each later one on its line (colour is on line 3).
    expect(err.detail.split("\n")).toEqual([
      "agents.x.tools[0] must be one of publish, http, llm, send",
      `${FILE}:3:1: agents.x.colour is not a known key`,
    ]);
    expect([err.line, err.column]).toEqual([4, 10]);
    expect(err.keyPath).toBe("agents.x.tools[0]");
  });
});

describe("loadSpec", () => {
  test("loads a file and resolves module paths against its directory", async () => {
    const dir = await mkdtemp(join(tmpdir(), "fleet-spec-"));
    try {
      const file = join(dir, "fleet.toml");
      await writeFile(file, agent(""));
      const v = await loadSpec(file);
      expect(v.path).toBe(file);
      expect(v.spec.agents.x?.module_path).toBe(join(dir, "x.ts"));
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });

  test("a missing file is a SpecError naming it", async () => {
    const file = join(tmpdir(), "no-such-dir-fleet", "fleet.toml");
    const err = await loadSpec(file).then(
      () => null,
      (e: unknown) => e,
    );
    expect(err).toBeInstanceOf(SpecError);
    expect((err as SpecError).file).toBe(file);
    expect((err as SpecError).message).toContain(file);
    expect((err as SpecError).detail).toBe("file not found");
  });
});

describe("restartNeeded", () => {
  const base = '[broker]\nhost = "127.0.0.1"\n';
  const spec = async (extra: string) => (await compileSpec(base + extra, FILE)).spec;

  test("listener and start-time keys need a restart; auth, ACL and the connection limit do not", async () => {
    const before = await spec("");
    for (const [edit, key] of [
      ["mqtt_port = 1999", "broker.mqtt_port (1883 -> 1999)"],
      ["ws_port = 9001", "broker.ws_port (null -> 9001)"],
      ["max_packet_bytes = 1000", "broker.max_packet_bytes (262144 -> 1000)"],
      ['tls_port = 8883\ntls_cert = "/etc/hostname"\ntls_key = "/etc/hostname"', "broker.tls_port (null -> 8883)"],
    ] as const) {
      expect(restartNeeded(before, await spec(edit))).toContain(key);
    }
    expect(restartNeeded(before, await spec("[http]\nport = 9090"))).toEqual(["http.port (8080 -> 9090)"]);
    expect(restartNeeded(before, await spec('[fleet]\nsandbox = "none"'))).toEqual([
      'fleet.sandbox ("auto" -> "none")',
    ]);
    for (const live of ["max_connections = 10", 'allow_anonymous = false\ndevices = "d.toml"']) {
      expect(restartNeeded(before, await spec(live))).toEqual([]);
    }
    expect(restartNeeded(before, await spec("[fleet]\nmax_concurrent_episodes = 9"))).toEqual([]);
  });

  test("a key a command-line flag overrides is ignored", async () => {
    expect(restartNeeded(await spec(""), await spec("mqtt_port = 1999"), ["broker.mqtt_port"])).toEqual([]);
  });
});

describe("listen addresses", () => {
  test("HTTP, and MQTT without device logins, listen on loopback by default", async () => {
    const { spec } = await compileSpec("", FILE);
    expect(spec.http.host).toBe("127.0.0.1");
    expect(spec.broker.host).toBe("127.0.0.1");
  });

  test("MQTT with device logins required listens on every interface by default", async () => {
    const { spec } = await compileSpec('[broker]\nallow_anonymous = false\ndevices = "d.toml"\n', FILE);
    expect(spec.broker.host).toBe("0.0.0.0");
  });

  test("[broker] url compiles to an external broker with a default client id; MQTT 3.1.1 unless told", async () => {
    const { spec } = await compileSpec(
      '[fleet]\nname = "plant 7"\n[broker]\nurl = "mqtts://broker.local"\nusername = "gw"\npassword_env = "PW"\n',
      FILE,
    );
    expect(spec.broker.external).toEqual({
      url: "mqtts://broker.local",
      username: "gw",
      password_env: "PW",
      client_id: "fleet-plant_7",
      ca_file: null,
      protocol_version: 4,
    });
    const v5 = await compileSpec('[broker]\nurl = "mqtt://b"\nmqtt_version = "5"\nclient_id = "gw-1"\n', FILE);
    expect(v5.spec.broker.external).toMatchObject({ client_id: "gw-1", protocol_version: 5 });
  });

  test("with [broker] url, the keys that still mean something are accepted: host, logins, packet size", async () => {
    // The devices file feeds `fleet device export --mosquitto`; max_packet_bytes caps agents' publishes.
    const { spec } = await compileSpec(
      '[broker]\nurl = "mqtt://b"\nhost = "127.0.0.1"\nallow_anonymous = false\ndevices = "devices.toml"\n' +
        "max_packet_bytes = 4096\n",
      FILE,
    );
    expect(spec.broker).toMatchObject({
      allow_anonymous: false,
      max_packet_bytes: 4096,
      external: { url: "mqtt://b" },
    });
    expect(spec.broker.devices_file).toEndWith("devices.toml");
  });

  test("an anonymous broker on the network is accepted only with allow_anonymous_network = true", async () => {
    const { spec } = await compileSpec('[broker]\nhost = "0.0.0.0"\nallow_anonymous_network = true\n', FILE);
    expect(spec.broker).toMatchObject({ host: "0.0.0.0", allow_anonymous: true, allow_anonymous_network: true });
  });
});
