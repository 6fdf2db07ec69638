/**
 * The order logins are verified in. argon2id costs about 50 ms on a quiet core and over a second
 * on a loaded edge box, and the hashing thread takes one at a time: in one FIFO, a device's login
 * waited behind every guess made before it (a 6 s fuzz on a slow box never saw its device log in).
 *
 * Here each device has a lane of its own, and every login naming no device shares one more; the
 * thread serves the lanes in turn, so a login waits behind at most one hash per other lane that
 * has work. The same secret checked against the same hash while a check of it is waiting or
 * running joins that check (a device reconnecting before its first CONNACK, a guesser repeating
 * itself). A lane holds at most `perLane` checks; past that a login is refused at once as busy,
 * unhashed, so a flood of guesses costs one core and bounded memory, and delays only its lane.
 * Inside a lane, the peer addresses take turns too, and a full lane gives a place to an address
 * holding fewer than another (`makeRoom`): a flood from one host at a device's id neither keeps the
 * device, logging in from elsewhere, out of its lane nor ahead of it by more than one hash.
 * A check whose every asker's connection closed while it waited is not run when its turn comes
 * (refused, unhashed): a client that connects and hangs up at once costs no hash.
 */
import { BrokerBusy } from "../../broker/types.ts";

/** One check's identity: which lane it waits in, and what makes two checks the same. */
export interface LoginCheck {
  /** The device the login names, or "" for a user name that is not a device. */
  readonly lane: string;
  /** Equal keys in one lane are one check (e.g. the secret's digest and the stored hash). */
  readonly key: string;
  /** Whether the asker's connection has closed, so its answer is wanted no more (absent: always wanted). */
  readonly gone?: () => boolean;
  /** Where the login comes from (the peer address); logins without one count as one more address. */
  readonly source?: string | undefined;
}

interface Waiting {
  readonly key: string;
  readonly run: () => Promise<boolean>;
  readonly resolve: (ok: boolean) => void;
  readonly reject: (err: unknown) => void;
  /** Each asker's `gone`, the first one's and those that joined it. */
  readonly askers: (() => boolean)[];
  /** An asker without `gone` joined: the check runs whatever the others did. */
  wanted: boolean;
  readonly result: Promise<boolean>;
  readonly source: string | undefined;
  /** The lane it waits in (its user name's). */
  readonly lane: string;
}

/** Checks waiting per lane by default: 8 hashes are seconds on a slow box; a device needs one. */
export const LOGINS_WAITING_PER_LANE = 8;

/**
 * One user name's checks, and when each peer address last had its turn (for the turns inside the lane): kept
 * while it has checks waiting or running.
 */
interface Lane {
  readonly jobs: Waiting[];
  readonly served: Map<string, number>;
}

/** A check's source as the lane counts it ("": none given). */
const sourceOf = (job: Waiting): string => job.source ?? "";

export class LoginQueue {
  /** Lanes with work, in the order they are served (a lane served goes to the back). */
  private readonly lanes = new Map<string, Lane>();
  /** Every lane with work or a check running, by user name. */
  private readonly known = new Map<string, Lane>();
  /** Checks waiting or running, by lane and key: a second ask of the same one joins it. */
  private readonly open = new Map<string, Waiting>();
  private running = false;
  /** Turns taken so far (orders `Lane.served`). */
  private turns = 0;

  constructor(private readonly perLane = LOGINS_WAITING_PER_LANE) {}

  /** Run `verify` in `check.lane`'s turn; rejects with BrokerBusy when that lane is full. */
  check(check: LoginCheck, verify: () => Promise<boolean>): Promise<boolean> {
    const id = `${check.lane}\u0000${check.key}`;
    const joined = this.open.get(id);
    if (joined) {
      if (check.gone) joined.askers.push(check.gone);
      else joined.wanted = true;
      return joined.result;
    }
    const lane = this.known.get(check.lane) ?? { jobs: [], served: new Map<string, number>() };
    if (lane.jobs.length >= this.perLane && !this.makeRoom(lane, check.source ?? "")) {
      return Promise.reject(new BrokerBusy(`${lane.jobs.length} logins for this user name are waiting to be checked`));
    }
    let settle!: Pick<Waiting, "resolve" | "reject">;
    const result = new Promise<boolean>((resolve, reject) => {
      settle = { resolve, reject };
    });
    const job: Waiting = {
      key: id,
      run: verify,
      ...settle,
      askers: check.gone ? [check.gone] : [],
      wanted: !check.gone,
      result,
      source: check.source,
      lane: check.lane,
    };
    lane.jobs.push(job);
    this.known.set(check.lane, lane);
    if (!this.lanes.has(check.lane)) this.lanes.set(check.lane, lane);
    this.open.set(id, job);
    this.pump();
    return result;
  }

  /** Checks waiting (not counting the one running), for tests and stats. */
  get waiting(): number {
    let n = 0;
    for (const lane of this.lanes.values()) n += lane.jobs.length;
    return n;
  }

  /**
   * A full lane takes a login from `source` when another address holds more than one place more than
   * `source` does: that address's newest check gives its place up (refused as busy). So a flood from
   * one host at a device's id cannot keep the device, logging in from another, out of the lane.
   */
  private makeRoom(lane: Lane, source: string): boolean {
    const held = new Map<string, number>();
    for (const job of lane.jobs) held.set(sourceOf(job), (held.get(sourceOf(job)) ?? 0) + 1);
    let most = "";
    for (const [s, n] of held) if (n > (held.get(most) ?? 0)) most = s;
    if ((held.get(most) ?? 0) <= (held.get(source) ?? 0) + 1) return false;
    const at = lane.jobs.findLastIndex((job) => sourceOf(job) === most);
    const [evicted] = lane.jobs.splice(at, 1) as [Waiting];
    this.open.delete(evicted.key);
    evicted.reject(new BrokerBusy("a login from another address took this one's place in the queue"));
    return true;
  }

  private pump(): void {
    if (this.running) return;
    let job: Waiting;
    do {
      const next = this.lanes.entries().next();
      if (next.done) return;
      const [name, lane] = next.value;
      job = this.take(lane);
      // Served: to the back of the order, or out of it when it has nothing more.
      this.lanes.delete(name);
      if (lane.jobs.length > 0) this.lanes.set(name, lane);
    } while (this.abandoned(job));
    this.running = true;
    const settle = () => {
      this.open.delete(job.key);
      this.running = false;
      this.forgetIfIdle(job.lane);
      this.pump();
    };
    new Promise<boolean>((resolve) => resolve(job.run())) // a verify that throws fails its check only
      .then(
        (ok) => job.resolve(ok),
        (err: unknown) => job.reject(err),
      )
      .finally(settle);
  }

  /** The lane's next check: the oldest from the address whose turn in this lane is longest ago. */
  private take(lane: Lane): Waiting {
    let at = 0;
    let since = Number.POSITIVE_INFINITY;
    for (let i = 0; i < lane.jobs.length; i++) {
      const last = lane.served.get(sourceOf(lane.jobs[i]!)) ?? -1;
      if (last < since) {
        since = last;
        at = i;
      }
    }
    const [job] = lane.jobs.splice(at, 1) as [Waiting];
    lane.served.set(sourceOf(job), this.turns++);
    return job;
  }

  /** No asker wants `job`'s answer any more: refused unhashed, and out of the queue. */
  private abandoned(job: Waiting): boolean {
    if (job.wanted || !job.askers.every((gone) => gone())) return false;
    this.open.delete(job.key);
    this.forgetIfIdle(job.lane);
    job.resolve(false);
    return true;
  }

  /** A lane with nothing waiting or running is forgotten, its turns with it (user names come and go). */
  private forgetIfIdle(name: string): void {
    if (!this.lanes.has(name)) this.known.delete(name);
  }
}
