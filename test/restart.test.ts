/** Which fleet.toml edits a running gateway can apply, and which need a restart. */
import { describe, expect, test } from "bun:test";
import { compileSpec, restartNeeded } from "../gateway/spec/index.ts";

const spec = async (extra: string) =>
  (await compileSpec(`[fleet]\nname = "r"\n[http]\nhost = "127.0.0.1"\n${extra}`, "/tmp/fleet.toml")).spec;

describe("restartNeeded", () => {
  test("telemetry keys are read at start: changing them needs a restart", async () => {
    const before = await spec("");
    const after = await spec('[telemetry]\notlp_endpoint = "http://127.0.0.1:4318"\n');
    expect(restartNeeded(before, after)).toEqual(['telemetry.otlp_endpoint (null -> "http://127.0.0.1:4318")']);
  });

  test("renaming the fleet applies live unless a span exporter or the replicator read the name at start", async () => {
    const named = async (name: string, extra = "") =>
      (await compileSpec(`[fleet]\nname = "${name}"\n${extra}`, "/tmp/fleet.toml")).spec;
    expect(restartNeeded(await named("a7"), await named("a7-renamed"))).toEqual([]);
    const otlp = '[telemetry]\notlp_endpoint = "http://127.0.0.1:4318"\n';
    expect(restartNeeded(await named("a7", otlp), await named("a7-renamed", otlp))).toEqual([
      'telemetry.service_name ("a7" -> "a7-renamed")',
      'fleet.name ("a7" -> "a7-renamed")',
    ]);
    const central = '[replication]\nurl = "http://127.0.0.1:8080"\n';
    expect(restartNeeded(await named("a7", central), await named("a7-renamed", central))).toEqual([
      'fleet.name ("a7" -> "a7-renamed")',
    ]);
  });

  test("the broker persistence, queue bound and session expiry are read at start: changes need a restart", async () => {
    const before = await spec("");
    const after = await spec('[broker]\npersistence = "libsql"\nmax_offline_messages = 10\nsession_expiry_days = 14\n');
    expect(restartNeeded(before, after)).toEqual([
      'broker.persistence ("memory" -> "libsql")',
      "broker.max_offline_messages (1000 -> 10)",
      "broker.session_expiry_days (0 -> 14)",
    ]);
  });

  test("certificate user names are read at start: turning them on needs a restart", async () => {
    const file = import.meta.path;
    const tls = `[broker]\nallow_anonymous = false\ndevices = "d.toml"\ntls_port = 8883\ntls_cert = "${file}"
tls_key = "${file}"\ntls_ca = "${file}"\n`;
    expect(restartNeeded(await spec(tls), await spec(`${tls}use_identity_as_username = true\n`))).toEqual([
      "broker.use_identity_as_username (false -> true)",
    ]);
  });

  test("with no [broker] host, allow_anonymous goes off live; turning it on needs the listener moved", async () => {
    const on = await spec('[broker]\nallow_anonymous = true\ndevices = "devices.toml"\n');
    const off = await spec('[broker]\nallow_anonymous = false\ndevices = "devices.toml"\n');
    expect(restartNeeded(on, off)).toEqual([]);
    expect(restartNeeded(off, on)).toEqual([
      'broker.host ("0.0.0.0" -> "127.0.0.1": its default follows allow_anonymous = true: ' +
        "the listener must move to loopback)",
    ]);
    // A host the operator wrote is compared as written.
    const lan = await spec('[broker]\nhost = "0.0.0.0"\nallow_anonymous = false\ndevices = "devices.toml"\n');
    expect(restartNeeded(on, lan)).toEqual(['broker.host ("127.0.0.1" -> "0.0.0.0")']);
  });

  test("the [replication] table is read at start: adding or changing it needs a restart", async () => {
    const before = await spec("");
    const after = await spec('[replication]\nurl = "http://127.0.0.1:8080"\n');
    expect(restartNeeded(before, after)).toEqual(["replication (the [replication] table changed)"]);
  });

  test("the external broker's url and keys are read at start: switching modes or brokers needs a restart", async () => {
    const embedded = await spec("");
    const a = await spec('[broker]\nurl = "mqtt://127.0.0.1:1883"\n');
    const b = await spec('[broker]\nurl = "mqtt://127.0.0.1:1883"\nclient_id = "gw-2"\n');
    expect(restartNeeded(embedded, a)).toHaveLength(1);
    expect(restartNeeded(embedded, a)[0]).toStartWith("broker.url (with username, password_env, client_id");
    expect(restartNeeded(a, b)[0]).toContain('"client_id":"gw-2"');
  });

  const SHARD =
    "the shard is read at start: a change is refused, shown as i/N; a new count points to fleet reshard, a new " +
    "index of the same count to that shard's data dir";
  test(SHARD, async () => {
    const sharded = async (shard: string | null) =>
      (
        await compileSpec(
          `[fleet]\n${shard === null ? "" : `shard = "${shard}"`}\n[broker]\nurl = "mqtt://127.0.0.1:1883"\n`,
          "/tmp/fleet.toml",
        )
      ).spec;
    const [a, b, c] = [await sharded("1/2"), await sharded("1/3"), await sharded("2/2")];
    expect(restartNeeded(a, b)).toEqual([
      'fleet.shard ("1/2" -> "1/3": not by a restart either: a new shard count needs `fleet reshard`)',
    ]);
    expect(restartNeeded(await sharded(null), a)).toEqual([
      'fleet.shard (none -> "1/2": not by a restart either: a new shard count needs `fleet reshard`)',
    ]);
    expect(restartNeeded(a, c)).toEqual([
      'fleet.shard ("1/2" -> "2/2": each shard keeps its own data dir: a restart is refused unless data_dir ' +
        "names shard 2/2's)",
    ]);
    // One shard of one owns what an unsharded gateway does: a restart is enough (its session's name changes).
    expect(restartNeeded(await sharded(null), await sharded("1/1"))).toEqual(['fleet.shard (none -> "1/1")']);
  });

  test("an unchanged file needs nothing", async () => {
    expect(restartNeeded(await spec(""), await spec(""))).toEqual([]);
  });
});
