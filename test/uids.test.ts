/**
 * The pool of sandbox uids: every sandboxed process runs as a uid of its own, so RLIMIT_NPROC
 * (counted per uid by the kernel) is each episode's own limit.
 */
import { describe, expect, test } from "bun:test";
import { UidPool } from "../gateway/episode/index.ts";

describe("UidPool", () => {
  test("hands out the range's uids in turn, each to one process at a time", () => {
    const pool = new UidPool({ first: 5000, count: 3 });
    expect([pool.take(), pool.take(), pool.take()]).toEqual([5000, 5001, 5002]);
    expect(pool.inUse).toBe(3);
  });

  test("a uid given back is handed out again only after the rest of the range", () => {
    const pool = new UidPool({ first: 5000, count: 4 });
    const a = pool.take();
    pool.give(a);
    expect([pool.take(), pool.take(), pool.take(), pool.take()]).toEqual([5001, 5002, 5003, 5000]);
  });

  test("uids still in use are skipped when the turn comes round to them", () => {
    const pool = new UidPool({ first: 5000, count: 3 });
    const held = pool.take();
    pool.give(pool.take());
    pool.give(pool.take());
    expect(held).toBe(5000);
    expect(pool.take()).toBe(5001);
    expect(pool.inUse).toBe(2);
  });

  test("when every uid is in use the next in turn is shared, and stays in use until both give it back", () => {
    const pool = new UidPool({ first: 7, count: 2 });
    pool.take();
    pool.take();
    const shared = pool.take();
    expect(shared).toBe(7);
    expect(pool.inUse).toBe(2);
    pool.give(shared);
    expect(pool.inUse).toBe(2);
    pool.give(7);
    expect(pool.inUse).toBe(1);
    expect(pool.take()).toBe(7);
  });

  test("giving back a uid nobody holds changes nothing", () => {
    const pool = new UidPool({ first: 100, count: 2 });
    pool.give(100);
    pool.give(12345);
    expect(pool.inUse).toBe(0);
    expect(pool.take()).toBe(100);
  });

  test("it names its range as first-last", () => {
    expect(String(new UidPool({ first: 100, count: 2 }))).toBe("100-101");
  });

  test("a range holding root, or no uid, is refused", () => {
    expect(() => new UidPool({ first: 0, count: 10 })).toThrow(RangeError);
    expect(() => new UidPool({ first: 10, count: 0 })).toThrow(RangeError);
  });
});
