/**
 * The broker persistence's group committer (broker/persistence/writer.ts): which jobs start a
 * transaction at once, which wait to ride along with the next one, and for how long.
 */
import { describe, expect, test } from "bun:test";
import type { InStatement } from "@libsql/client";
import { SerialWriter, type BatchRunner } from "../broker/index.ts";

/** A runner that records each transaction's statements (their SQL) and answers at once. */
function recorder(): BatchRunner & { readonly batches: string[][] } {
  const batches: string[][] = [];
  return {
    batches,
    batch(statements: InStatement[]) {
      batches.push(statements.map((s) => (typeof s === "string" ? s : s.sql)));
      return Promise.resolve(statements.map(() => ({ rows: [], rowsAffected: 1 })));
    },
  };
}

describe("SerialWriter", () => {
  test("jobs queued in one turn share one transaction, in the order they were queued", async () => {
    const db = recorder();
    const w = new SerialWriter(db);
    await Promise.all([w.run(["a"]), w.run(["b", "c"])]);
    expect(db.batches).toEqual([["a", "b", "c"]]);
  });

  test("a lazy job rides along with the next transaction instead of starting one", async () => {
    const db = recorder();
    const w = new SerialWriter(db, 1000, 1000);
    const lazy = w.run(["lazy"], { lazy: true });
    const background = w.run(["background"], { lazy: "background" });
    await Bun.sleep(20);
    expect(db.batches).toEqual([]);
    await w.run(["now"]);
    await Promise.all([lazy, background]);
    expect(db.batches).toEqual([["lazy", "background", "now"]]);
  });

  test("alone, a lazy job commits after lazyMs and a background one after backgroundMs", async () => {
    const db = recorder();
    const w = new SerialWriter(db, 10, 150);
    const background = w.run(["background"], { lazy: "background" });
    await Bun.sleep(60);
    expect(db.batches).toEqual([]);
    await w.run(["lazy"], { lazy: true });
    // The lazy job's deadline came first; the background job went with it.
    expect(db.batches).toEqual([["background", "lazy"]]);
    await background;
    const alone = w.run(["later"], { lazy: "background" });
    await Bun.sleep(60);
    expect(db.batches).toHaveLength(1);
    await alone;
    expect(db.batches).toEqual([["background", "lazy"], ["later"]]);
  });

  test("drain commits a waiting background job at once", async () => {
    const db = recorder();
    const w = new SerialWriter(db, 1000, 60_000);
    const background = w.run(["background"], { lazy: "background" });
    const started = performance.now();
    await w.drain();
    await background;
    expect(db.batches).toEqual([["background"]]);
    expect(performance.now() - started).toBeLessThan(5000);
  });
});
