/**
 * The shared budget of request body bytes (issue 9, defect 10): each endpoint caps its own
 * body (413), and all requests together hold at most `[http] max_body_bytes_in_flight`. A
 * request that would pass the budget is answered 503 before more of its body is read; its
 * bytes go back to the budget when its handler is done.
 */

/** The API's error shape (responses.ts reads bodies through this file, so it cannot be imported here). */
function httpError(status: number, code: string, message: string): Response {
  return Response.json({ error: { code, message } }, { status });
}

/** Request body bytes held now across requests, with a ceiling. */
export class BodyBudget {
  private heldNow = 0;
  private readonly byRequest = new WeakMap<Request, number>();

  /** `cap`: the ceiling now, read at each take (a reload may change it). */
  constructor(private readonly capNow: () => number) {}

  /** The ceiling in force. */
  get cap(): number {
    return this.capNow();
  }

  /** Bytes held now. */
  get held(): number {
    return this.heldNow;
  }

  /** Hold `n` more bytes for `req`, or false when that would pass the cap. */
  take(req: Request, n: number): boolean {
    if (this.heldNow + n > this.cap) return false;
    this.heldNow += n;
    this.byRequest.set(req, (this.byRequest.get(req) ?? 0) + n);
    return true;
  }

  /** Give back everything `req` holds (its handler is done). */
  release(req: Request): void {
    const n = this.byRequest.get(req) ?? 0;
    this.heldNow -= n;
    this.byRequest.delete(req);
  }

  /** What `req` holds now. */
  heldBy(req: Request): number {
    return this.byRequest.get(req) ?? 0;
  }
}

/** The budget a request is read under (set by the access guard). */
const budgets = new WeakMap<Request, BodyBudget>();

/** Read `req`'s body under `budget` (the guard calls this before the handler runs). */
export function underBudget(req: Request, budget: BodyBudget): void {
  budgets.set(req, budget);
}

/** 503 for a body that does not fit the shared budget. */
function overBudget(budget: BodyBudget): Response {
  const res = httpError(
    503,
    "busy",
    `too busy: request bodies in flight would pass ${budget.cap} bytes (max_body_bytes_in_flight); retry shortly`,
  );
  res.headers.set("retry-after", "1");
  return res;
}

/**
 * A request body of at most `cap` bytes, read under the shared budget without buffering past
 * either: the bytes, or the response to send (413 too large, 503 over the budget).
 */
export async function readRequestBody(
  req: Request,
  cap: number,
): Promise<{ ok: true; bytes: Uint8Array } | { ok: false; res: Response }> {
  const budget = budgets.get(req);
  const tooLarge = () => ({ ok: false as const, res: httpError(413, "too_large", `body larger than ${cap} bytes`) });
  const declared = Number(req.headers.get("content-length") ?? "0");
  if (declared > cap) return tooLarge();
  if (budget && declared > 0 && !budget.take(req, declared)) return { ok: false, res: overBudget(budget) };
  const reader = req.body?.getReader();
  if (!reader) return { ok: true, bytes: new Uint8Array(0) };
  const parts: Uint8Array[] = [];
  let total = 0;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    total += value.byteLength;
    if (total > cap) {
      await reader.cancel().catch(() => undefined);
      return tooLarge();
    }
    // A body without (or beyond) its Content-Length takes from the budget as it arrives.
    const more = budget ? total - budget.heldBy(req) : 0;
    if (budget && more > 0 && !budget.take(req, more)) {
      await reader.cancel().catch(() => undefined);
      return { ok: false, res: overBudget(budget) };
    }
    parts.push(value);
  }
  return { ok: true, bytes: new Uint8Array(Buffer.concat(parts)) };
}
