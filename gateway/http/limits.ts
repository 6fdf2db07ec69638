/**
 * The shared budget of request body bytes (issue 9, defect 10): each endpoint caps its own
 * body (413), and all requests together hold at most `[http] max_body_bytes_in_flight`. Bytes
 * are taken as they arrive (a declared Content-Length reserves nothing: a client that declares
 * 1 MiB and sends a byte holds a byte), and requests that need no token (webhooks, sign-in)
 * together hold at most half of the budget, so they cannot starve the API's bodies. A request
 * that would pass the budget is answered 503 before more of its body is read; its bytes go
 * back to the budget when its handler is done. A body must arrive whole within the read
 * deadline (30 s), or the request is a 408: bytes trickled slowly cannot hold a slot for long.
 */

/** The API's error shape (responses.ts reads bodies through this file, so it cannot be imported here). */
function httpError(status: number, code: string, message: string): Response {
  return Response.json({ error: { code, message } }, { status });
}

/** How long a request body may take to arrive, by default. */
export const BODY_READ_DEADLINE_MS = 30_000;

/** The part of a cap that requests without a token (webhooks, sign-in) may hold together. */
export function unauthenticatedShare(cap: number, fraction: number): number {
  return Math.max(1, Math.floor(cap * fraction));
}

/** Request body bytes held now across requests, with a ceiling. */
export class BodyBudget {
  private heldNow = 0;
  private heldOpen = 0;
  private readonly byRequest = new WeakMap<Request, number>();
  private readonly open = new WeakSet<Request>();
  /** How long one body may take to arrive (ms). */
  readonly readDeadlineMs: number;

  /** `cap`: the ceiling now, read at each take (a reload may change it). */
  constructor(
    private readonly capNow: () => number,
    opts: { readDeadlineMs?: number } = {},
  ) {
    this.readDeadlineMs = opts.readDeadlineMs ?? BODY_READ_DEADLINE_MS;
  }

  /** Count `req` among the requests without a token: together they hold at most half the cap. */
  markUnauthenticated(req: Request): void {
    this.open.add(req);
  }

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
    const open = this.open.has(req);
    if (open && this.heldOpen + n > unauthenticatedShare(this.cap, 1 / 2)) return false;
    if (open) this.heldOpen += n;
    this.heldNow += n;
    this.byRequest.set(req, (this.byRequest.get(req) ?? 0) + n);
    return true;
  }

  /** Give back everything `req` holds (its handler is done). */
  release(req: Request): void {
    const n = this.byRequest.get(req) ?? 0;
    this.heldNow -= n;
    if (this.open.has(req)) this.heldOpen -= n;
    this.byRequest.delete(req);
    this.open.delete(req);
  }

  /** Whether `req` is counted among the requests without a token. */
  isUnauthenticated(req: Request): boolean {
    return this.open.has(req);
  }
}

/** The budget a request is read under (set by the access guard). */
const budgets = new WeakMap<Request, BodyBudget>();

/** Read `req`'s body under `budget` (the guard calls this before the handler runs). */
export function underBudget(req: Request, budget: BodyBudget): void {
  budgets.set(req, budget);
}

/** 503 for a body that does not fit the shared budget (or the half of it requests without a token may hold). */
function overBudget(budget: BodyBudget, req: Request): Response {
  const res = httpError(
    503,
    "busy",
    budget.isUnauthenticated(req)
      ? `too busy: webhook and sign-in bodies in flight would pass half of max_body_bytes_in_flight; retry shortly`
      : `too busy: request bodies in flight would pass ${budget.cap} bytes (max_body_bytes_in_flight); retry shortly`,
  );
  res.headers.set("retry-after", "1");
  return res;
}

/**
 * A request body of at most `cap` bytes, read under the shared budget without buffering past
 * either: the bytes, or the response to send (413 too large, 503 over the budget, 408 when it
 * did not arrive within the budget's read deadline).
 */
export async function readRequestBody(
  req: Request,
  cap: number,
): Promise<{ ok: true; bytes: Uint8Array } | { ok: false; res: Response }> {
  const budget = budgets.get(req);
  const tooLarge = () => ({ ok: false as const, res: httpError(413, "too_large", `body larger than ${cap} bytes`) });
  const declared = Number(req.headers.get("content-length") ?? "0");
  if (declared > cap) return tooLarge();
  const reader = req.body?.getReader();
  if (!reader) return { ok: true, bytes: new Uint8Array(0) };
  const deadlineMs = budget?.readDeadlineMs ?? BODY_READ_DEADLINE_MS;
  let timer: ReturnType<typeof setTimeout> | undefined;
  const late = new Promise<"late">((resolve) => {
    timer = setTimeout(() => resolve("late"), deadlineMs);
  });
  const refuse = async (res: Response) => {
    await reader.cancel().catch(() => undefined);
    return { ok: false as const, res };
  };
  const parts: Uint8Array[] = [];
  let total = 0;
  try {
    for (;;) {
      const next = await Promise.race([reader.read(), late]);
      if (next === "late")
        return refuse(
          httpError(408, "request_timeout", `body did not arrive within ${Math.round(deadlineMs / 1000)} s`),
        );
      const { value, done } = next;
      if (done) break;
      total += value.byteLength;
      if (total > cap) return refuse(tooLarge().res);
      // Bytes are taken from the budget as they arrive, never as declared.
      if (budget && !budget.take(req, value.byteLength)) return refuse(overBudget(budget, req));
      parts.push(value);
    }
  } finally {
    clearTimeout(timer);
  }
  return { ok: true, bytes: new Uint8Array(Buffer.concat(parts)) };
}
