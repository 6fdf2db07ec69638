/**
 * The queue book's own bookkeeping: each agent's queued seqs in order, the fleet total, and
 * what a load, a put-back and a resync do to them. Intake and executor tests cover the book
 * together with the store.
 */
import { describe, expect, test } from "bun:test";
import { QueueBook } from "../gateway/fleet/index.ts";
import type { AgentId } from "../gateway/types.ts";

const A = "mon/a" as AgentId;
const B = "mon/b" as AgentId;

describe("queue book", () => {
  test("keeps each agent's queued seqs oldest first; a put-back older stimulus becomes the head, once", () => {
    const woken: AgentId[] = [];
    const book = new QueueBook({ onQueued: (a) => woken.push(a) });
    for (const seq of [5, 9]) {
      expect(book.admit(A, 10).ok).toBe(true);
      book.recorded(A, seq);
    }
    book.recorded(A, 3); // a quarantined stimulus retried
    book.recorded(A, 3);
    expect(book.seqs(A)).toEqual([3, 5, 9]);
    expect(book.head(A)).toBe(3);
    expect(book.queued(A)).toBe(3);
    expect(book.total()).toBe(3);
    expect(book.pending(A)).toBe(3); // both admissions were recorded
    expect(woken).toEqual([A, A, A]);
  });

  test("left and rejected take out exactly the seqs named, and an empty queue has no head", () => {
    const book = new QueueBook();
    for (const seq of [3, 5, 9]) book.recorded(A, seq);
    book.recorded(B, 4);
    book.left(A, 3);
    expect(book.head(A)).toBe(5);
    book.rejected(A, [9, 42]);
    expect(book.seqs(A)).toEqual([5]);
    expect(book.total()).toBe(2);
    book.left(A, 5);
    book.left(A, 5);
    expect(book.head(A)).toBeNull();
    expect(book.queued(A)).toBe(0);
    expect(book.total()).toBe(1);
    expect(book.seqs(B)).toEqual([4]);
  });

  test("a resync takes the rows' word for an agent's queue and keeps the fleet total right", () => {
    const book = new QueueBook();
    for (const seq of [3, 5]) book.recorded(A, seq);
    book.recorded(B, 4);
    book.resync(A, [5, 7, 8]);
    expect(book.seqs(A)).toEqual([5, 7, 8]);
    expect(book.total()).toBe(4);
    book.resync(A, []);
    expect(book.head(A)).toBeNull();
    expect(book.total()).toBe(1);
  });

  test("a load reads every queued stimulus of the store, and retirements", async () => {
    const book = new QueueBook();
    await book.load({
      queuedSeqs: async () => [
        { agent: A, seq: 2 },
        { agent: B, seq: 3 },
        { agent: A, seq: 6 },
      ],
      listAgents: (async (f: { status?: string }) => ({
        rows: f.status === "retired" ? [{ id: B }] : [],
        nextCursor: null,
      })) as never,
    });
    expect(book.seqs(A)).toEqual([2, 6]);
    expect(book.head(B)).toBe(3);
    expect(book.total()).toBe(3);
    expect(book.isRetired(B)).toBe(true);
    expect(book.admit(B, 10)).toMatchObject({ ok: false, code: "retired" });
  });
});
