/**
 * The queue book's own bookkeeping: each agent's queued seqs in order with their receive
 * times, the fleet total, the per-type counts and lag, and what a load, a put-back and a
 * resync do to them. Intake and executor tests cover the book together with the store.
 */
import { describe, expect, test } from "bun:test";
import { agentCapNotices, QueueBook } from "../gateway/fleet/index.ts";
import { FleetEvents } from "../gateway/events.ts";
import type { StoredAgentStatus } from "../gateway/store/index.ts";
import type { AgentId } from "../gateway/types.ts";

const A = "mon/a" as AgentId;
const B = "mon/b" as AgentId;
const C = "door/c" as AgentId;

describe("queue book", () => {
  test("keeps each agent's queued seqs oldest first; a put-back older stimulus becomes the head, once", () => {
    const woken: AgentId[] = [];
    const book = new QueueBook({ onQueued: (a) => woken.push(a) });
    for (const seq of [5, 9]) {
      expect(book.admit(A, 10).ok).toBe(true);
      book.recorded(A, seq, 100 + seq);
    }
    book.recorded(A, 3, 50); // a quarantined stimulus retried
    book.recorded(A, 3, 50);
    expect(book.seqs(A)).toEqual([3, 5, 9]);
    expect(book.head(A)).toBe(3);
    expect(book.queued(A)).toBe(3);
    expect(book.total()).toBe(3);
    expect(book.pending(A)).toBe(3); // both admissions were recorded
    expect(woken).toEqual([A, A, A]);
    expect(book.oldestReceivedAt()).toBe(50);
  });

  test("left and rejected take out exactly the seqs named, and an empty queue has no head", () => {
    const book = new QueueBook();
    for (const seq of [3, 5, 9]) book.recorded(A, seq, seq);
    book.recorded(B, 4, 4);
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

  test("counts and lag per type take the oldest receive time, not the oldest seq", () => {
    const book = new QueueBook();
    expect(book.byType()).toEqual([]);
    expect(book.oldestReceivedAt()).toBeNull();
    // A timer fire or a send can carry a receive time older than stimuli recorded before it.
    book.recorded(A, 1, 500);
    book.recorded(A, 2, 200);
    book.recorded(B, 3, 400);
    book.recorded(C, 4, 300);
    const byType = book.byType().sort((x, y) => x.type.localeCompare(y.type));
    expect(byType).toEqual([
      { type: "door", n: 1, oldest: 300 },
      { type: "mon", n: 3, oldest: 200 },
    ]);
    expect(book.oldestReceivedAt()).toBe(200);
    book.left(A, 1);
    book.rejected(A, [2]);
    expect(book.byType().find((t) => t.type === "mon")).toEqual({ type: "mon", n: 1, oldest: 400 });
  });

  test("a resync takes the rows' word for an agent's queue and keeps the fleet total right", () => {
    const woken: AgentId[] = [];
    const book = new QueueBook({ onQueued: (a) => woken.push(a) });
    for (const seq of [3, 5]) book.recorded(A, seq, seq);
    book.recorded(B, 4, 4);
    woken.length = 0;
    book.resync(
      A,
      [5, 7, 8].map((seq) => ({ seq, receivedAt: seq * 10 })),
    );
    expect(woken).toEqual([A]);
    expect(book.seqs(A)).toEqual([5, 7, 8]);
    expect(book.total()).toBe(4);
    expect(book.byType()).toEqual([{ type: "mon", n: 4, oldest: 4 }]);
    book.resync(A, []);
    expect(book.head(A)).toBeNull();
    expect(book.total()).toBe(1);
  });

  test("a load reads every queued stimulus of the store and retirements; each agent is announced once", async () => {
    const woken: AgentId[] = [];
    const book = new QueueBook({ onQueued: (a) => woken.push(a) });
    await book.load({
      queuedSeqs: async () => [
        { agent: A, seq: 2, receivedAt: 20 },
        { agent: B, seq: 3, receivedAt: 10 },
        { agent: A, seq: 6, receivedAt: 60 },
      ],
      agentStatuses: async () => [{ id: B, status: "retired" }],
    });
    expect(book.seqs(A)).toEqual([2, 6]);
    expect(woken.sort()).toEqual([A, B]);
    expect(book.head(B)).toBe(3);
    expect(book.total()).toBe(3);
    expect(book.oldestReceivedAt()).toBe(10);
    expect(book.isRetired(B)).toBe(true);
    expect(book.admit(B, 10)).toMatchObject({ ok: false, code: "retired" });
  });
});

describe("max_agents in the queue book", () => {
  const mon = (key: string) => `mon/${key}` as AgentId;
  /** A store page of agents, as the book reads them at start. */
  const page = (rows: { id: AgentId; status: StoredAgentStatus }[]) => ({
    queuedSeqs: async () => [],
    agentStatuses: async () => rows,
  });

  test("a stimulus for a new agent takes a place until it is written; past the cap it is refused", () => {
    const capped: string[] = [];
    const book = new QueueBook({ onCapped: (type, max) => capped.push(`${type}:${max}`) });
    expect(book.admit(mon("a"), 10, 2).ok).toBe(true);
    expect(book.admit(mon("a"), 10, 2).ok).toBe(true); // the same new agent: the same place
    expect(book.admit(mon("b"), 10, 2).ok).toBe(true);
    expect(book.admit(mon("c"), 10, 2)).toMatchObject({ ok: false, code: "max_agents" });
    expect(book.admit(C, 10, 2).ok).toBe(true); // another type counts its own
    expect(capped).toEqual(["mon:2"]);
    book.recorded(mon("a"), 1, 1);
    book.released(mon("a"));
    book.released(mon("b")); // its write failed: no agent, its place is free
    expect(book.agents("mon")).toBe(1);
    expect(book.admit(mon("c"), 10, 2).ok).toBe(true);
    book.recorded(mon("c"), 2, 2);
    expect(book.agents("mon")).toBe(2);
    expect(book.admit(mon("d"), 10, 2)).toMatchObject({ ok: false, code: "max_agents" });
    // An agent that exists is admitted whatever the count; 0 is no limit.
    expect(book.admit(mon("a"), 10, 1).ok).toBe(true);
    expect(book.admit(mon("d"), 10, 0).ok).toBe(true);
  });

  test("retiring an agent frees its place; bringing it back takes one, even past the cap", () => {
    const book = new QueueBook();
    for (const [i, k] of ["a", "b"].entries()) {
      book.admit(mon(k), 10, 2);
      book.recorded(mon(k), i + 1, 0);
    }
    expect(book.admit(mon("c"), 10, 2).ok).toBe(false);
    book.retire(mon("a"));
    book.retire(mon("a"));
    expect(book.agents("mon")).toBe(1);
    expect(book.admit(mon("c"), 10, 2).ok).toBe(true);
    book.recorded(mon("c"), 3, 0);
    book.unretire(mon("a")); // a removed type that came back: its agents return, the cap retires none
    expect(book.agents("mon")).toBe(3);
    expect(book.admit(mon("d"), 10, 3).ok).toBe(false);
  });

  test("a load counts every agent not retired, per type; deployed instances count once", async () => {
    const book = new QueueBook();
    await book.load(
      page([
        { id: mon("a"), status: "active" },
        { id: mon("b"), status: "paused" },
        { id: mon("c"), status: "draining" },
        { id: mon("d"), status: "failed" },
        { id: mon("e"), status: "retired" },
        { id: C, status: "active" },
      ]),
    );
    expect(book.agents("mon")).toBe(4);
    expect(book.agents("door")).toBe(1);
    book.unretire(mon("a")); // already counted
    book.deployed([mon("a"), mon("e"), mon("f")]); // e stays retired
    expect(book.agents("mon")).toBe(5);
    expect(book.isRetired(mon("e"))).toBe(true);
  });

  test("each refusal is a fact on the bus; the log says so once a minute per type, with how many", () => {
    let now = 0;
    const lines: { type: string; refused: number }[] = [];
    const events = new FleetEvents();
    const facts: string[] = [];
    events.on("agentRefused", (e) => facts.push(`${e.type}:${e.max}`));
    const notice = agentCapNotices(
      { warn: ((o: { type: string; refused: number }) => lines.push(o)) as never },
      events,
      () => now,
    );
    for (let i = 0; i < 5; i++) notice("mon", 3);
    notice("door", 1);
    now = 59_999;
    notice("mon", 3);
    now = 60_000;
    notice("mon", 3);
    expect(facts).toHaveLength(8);
    expect(lines.map((l) => `${l.type}:${l.refused}`)).toEqual(["mon:1", "door:1", "mon:6"]);
  });
});
