/**
 * How a replay answers tool calls: each call with its own recorded result (by call id), in the
 * order the live episode got them. Concurrent calls complete out of call order live (a slow call
 * and a fast one under `Promise.all`), and what the agent does next follows that order; answered
 * in call order instead, unchanged code would record its tool calls, and what it did after each,
 * in another order, and be reported DIVERGED.
 */

/** A recorded call's outcome, with its call id (1-based, in the order the calls were made). */
export interface RecordedTool {
  readonly call: number;
  readonly tool: string;
  readonly ok: boolean;
  readonly result: unknown;
}

/**
 * How long a call waits for one answered before it live that the code has not made: code that
 * differs from the recording may never make it; its calls are then answered in call order.
 */
export const REPLAY_STALL_MS = 250;

/** The recorded answers of one replayed episode. */
export class ReplayAnswers {
  private readonly byCall = new Map<number, RecordedTool>();
  /** Call ids in the order the live episode got their results. */
  private readonly order: number[];
  private next = 0;
  private readonly answered = new Set<number>();
  private readonly waiting = new Map<number, () => void>();
  private stall: ReturnType<typeof setTimeout> | null = null;

  /** `tools`: the recorded calls in the order the live episode got their results. */
  constructor(tools: readonly RecordedTool[]) {
    for (const t of tools) this.byCall.set(t.call, t);
    this.order = tools.map((t) => t.call);
  }

  /** The recorded outcome of call `id` of `tool`, once the calls answered before it live are; null when none. */
  async answer(id: number, tool: string): Promise<RecordedTool | null> {
    const recorded = this.byCall.get(id);
    if (!recorded || recorded.tool !== tool) return null;
    await new Promise<void>((resolve) => {
      this.waiting.set(id, resolve);
      this.pump();
    });
    return recorded;
  }

  /** Answer the next call in live order if it was made; after an answer, let the agent react first. */
  private pump(): void {
    if (this.stall) clearTimeout(this.stall);
    this.stall = null;
    while (this.next < this.order.length && this.answered.has(this.order[this.next]!)) this.next += 1;
    const id = this.order[this.next];
    if (id !== undefined && this.waiting.has(id)) this.release(id);
    else if (this.waiting.size > 0)
      this.stall = setTimeout(() => this.release(Math.min(...this.waiting.keys())), REPLAY_STALL_MS);
  }

  private release(id: number): void {
    const resolve = this.waiting.get(id);
    this.waiting.delete(id);
    this.answered.add(id);
    resolve?.();
    // The agent's reaction to this answer (its next calls, its records) comes before the next answer, as live.
    setImmediate(() => this.pump());
  }
}
