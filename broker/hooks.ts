/**
 * The aedes hooks that enforce the device rules (docs/mqtt.md): authentication, the publish
 * topic rules + ACL + durable intake before any ack, the subscribe ACL, and counting.
 */
import type { AedesOptions, AuthenticateError, Client, PublishPacket } from "aedes";
import type { Logger } from "pino";
import { dedupeExactly, type RetainedCopies } from "./deliveries.ts";
import type { GrantedSubscriptions } from "./granted.ts";
import { isSessionMark } from "./persistence/index.ts";
import { checkDevicePublishTopic, checkDeviceSubscribeFilter } from "./topics.ts";
import { SYS_PREFIX } from "./sys.ts";
import {
  BrokerBusy,
  type BrokerAuth,
  type BrokerOptions,
  type ClientInfo,
  type IntakeVerdict,
  type PublishedMessage,
} from "./types.ts";

/** Mutable broker state the hooks read and count into. */
export interface HookState {
  intakeOpen: boolean;
  messagesIn: number;
  messagesOut: number;
  refused: number;
  /** Permanent refusals: acknowledged and dropped (a subset of `refused`). */
  dropped: number;
  /** When a permanent refusal was last logged, and how many since (one line per 10 s at most). */
  droppedLog: { at: number; since: number };
  /** When a refused login (bad credentials) was last logged, and how many since (one line per 10 s at most). */
  badLoginLog: { at: number; since: number };
  /** The same for logins refused unchecked because too many were waiting (BrokerBusy). */
  busyLoginLog: { at: number; since: number };
  /** CONNECTs refused for their credentials (CONNACK 4, or 5 for anonymous clients). */
  loginsRefused: number;
  /** CONNECTs refused unverified, too many logins for their user name waiting (CONNACK 3). */
  loginsBusy: number;
  /**
   * When a transient refusal (no PUBACK, closed: a full disk, a full queue) was last logged, and how many
   * since (one line per 10 s at most): a device reconnects and resends at once, over and over.
   */
  refusedLog: { at: number; since: number };
  /** When an intake that failed (a commit the disk refused) was last logged, and how many since (as above). */
  intakeFailedLog: { at: number; since: number };
  /** Who may connect and what they may do; replaced whole when auth changes live. */
  auth: BrokerAuth;
  /** Connections to refuse at CONNECT with this CONNACK code (set before aedes authenticates). */
  readonly refuseAtConnect: WeakMap<Client, { code: 2 | 3; reason: string }>;
  /** Each connection's peer address, for the login queue's fairness (`ClientInfo.host`). */
  readonly hosts: WeakMap<Client, string>;
  /**
   * Connections whose user name is their client certificate's CN (`tls.useIdentityAsUsername`): the CN, or null
   * for a certificate without one (refused at CONNECT).
   */
  readonly identities: WeakMap<Client, string | null>;
  /** Largest keep alive a CONNECT may ask for, seconds; 0: any (`BrokerOptions.maxKeepaliveSeconds`). */
  maxKeepalive: number;
  /** The keep alive each client's CONNECT asked for, seconds (for `connectionMessages`). */
  readonly keepalives: WeakMap<Client, number>;
  /** The user name each client connected with (aedes' Client does not keep it). */
  readonly usernames: WeakMap<Client, string | null>;
  /**
   * With a durable persistence: publish an accepted QoS 1 message (its retained copy and the offline
   * queues it joins written) before its PUBACK, where aedes would ack first (handlers/publish.js), so
   * a `kill -9` right after the ack cannot lose what the ack promised. Null: aedes' own order.
   */
  publishFirst: ((packet: PublishPacket, client: Client) => Promise<void>) | null;
  /** Drops a retained copy a new subscription would get after a newer message of its topic went live. */
  readonly retained: RetainedCopies;
  /** The subscriptions granted here that a session is to store (./granted.ts). */
  readonly granted: GrantedSubscriptions;
}

/** Why a device publish was refused; aedes emits it as `clientError` and drops the connection. */
export class PublishRefused extends Error {
  constructor(
    readonly topic: string,
    readonly reason: string,
  ) {
    super(`publish to ${JSON.stringify(topic)} refused: ${reason}`);
    this.name = "PublishRefused";
  }
}

/**
 * Where a permanently refused publish is sent instead: aedes then acknowledges it (PUBACK/PUBREC)
 * and publishes it to a topic no client can subscribe to (`$` filters are refused, and `#` does
 * not match `$` topics, MQTT-4.7.2-1), so it reaches no one and is stored nowhere.
 */
export const DROPPED_TOPIC = "$fleet/dropped";

/**
 * The field a stored will carries its client's user name in. aedes stores a will with the client id
 * only, and after a crash publishes it with no client (aedes.js `_clearWills`:
 * `authorizePublish(null, will)`); the ACL must still judge it as the device that set it.
 */
export const WILL_USERNAME = "fleetUsername";

/** aedes' CONNACK return codes we use (MQTT 3.1.1 §3.2.2.3). */
const SERVER_UNAVAILABLE = 3;
const IDENTIFIER_REJECTED = 2;
const BAD_CREDENTIALS = 4;
const NOT_AUTHORIZED = 5;

/**
 * Count one occurrence in `l`; when its log line is due (none in the last 10 s), the occurrences it
 * stands for, this one included, else null. The embedded and the external broker throttle alike.
 */
export function logDue(l: { at: number; since: number }): number | null {
  l.since++;
  const now = Date.now();
  if (now - l.at < 10_000) return null;
  const count = l.since;
  l.at = now;
  l.since = 0;
  return count;
}

function connackError(returnCode: 2 | 3 | 4 | 5, message: string): AuthenticateError {
  return Object.assign(new Error(message), { returnCode }) as AuthenticateError;
}

/**
 * A payload's bytes. A Buffer is a Uint8Array already, and goes on as it is: a view of it costs
 * the path of every device message an allocation, and libSQL binds a Buffer faster than a view.
 */
function bytes(data: Buffer | string | undefined): Uint8Array {
  if (data === undefined) return new Uint8Array(0);
  if (typeof data === "string") return new TextEncoder().encode(data);
  return data;
}

/** Builds the aedes hooks for one broker. */
export function createHooks(
  opts: BrokerOptions,
  state: HookState,
  log: Logger,
): Required<
  Pick<AedesOptions, "preConnect" | "authenticate" | "authorizePublish" | "authorizeSubscribe" | "authorizeForward">
> {
  const usernames = state.usernames;
  // Whether the broker publishes its `$SYS/broker/` tree (./sys.ts), which `$SYS/...` filters may then read.
  const sysOn = (opts.sysIntervalMs ?? 0) > 0;
  // Each client's publishes whose verdicts are not all acted on yet, oldest first: acks go out in
  // PUBLISH order (MQTT-4.6.0-2) even when intake resolves out of order, because aedes runs a read
  // chunk's packets concurrently. A verdict that comes early waits in its turn for those before it.
  const turns = new WeakMap<Client, TurnQueue>();
  // Each client's acks waiting on `publishFirst`, chained so they still go out in PUBLISH order.
  const acks = new WeakMap<Client, Promise<unknown>>();

  const infoOf = (client: Client | null, packet?: PublishPacket): ClientInfo => {
    // `certified` matters only at login and to a live re-check (embedded.ts `setAuth`): not asked for here.
    if (client) return { id: client.id, username: usernames.get(client) ?? null };
    // A will whose client is gone: judged as the user name stored with it (see WILL_USERNAME).
    const stored = packet as Record<string, unknown> | undefined;
    const username = stored?.[WILL_USERNAME];
    return { id: String(stored?.clientId ?? ""), username: typeof username === "string" ? username : null };
  };

  // Never ack what was not recorded: an intake that throws or rejects refuses the publish.
  const intakeFailed = (err: unknown, info: ClientInfo, msg: PublishedMessage, what: string): IntakeVerdict => {
    const failed = logDue(state.intakeFailedLog);
    if (failed !== null)
      log.error({ err, client: info.id, topic: msg.topic, failed }, `intake ${what}; publish refused`);
    return { ok: false, reason: "intake failed" };
  };
  /** Run intake; `act` gets its verdict, or a refusal if it failed (one promise reaction either way). */
  const runIntake = (msg: PublishedMessage, info: ClientInfo, act: (v: IntakeVerdict) => void): void => {
    let verdict: Promise<IntakeVerdict>;
    try {
      verdict = opts.intake(msg, info);
    } catch (err) {
      act(intakeFailed(err, info, msg, "threw"));
      return;
    }
    verdict.then(act, (err: unknown) => act(intakeFailed(err, info, msg, "failed")));
  };

  const aclAllows = (check: (() => boolean) | null, what: string, info: ClientInfo): boolean => {
    if (!check) return true;
    try {
      return check();
    } catch (err) {
      log.error({ err, client: info.id, what }, "ACL hook threw; refused");
      return false;
    }
  };

  return {
    preConnect(client, packet, done) {
      dedupeExactly(client, state.retained);
      // The certificate names the device, whatever the CONNECT says (Mosquitto's use_identity_as_username):
      // aedes passes authenticate these, and the will below keeps the name it is judged as.
      const identity = state.identities.get(client);
      if (identity !== undefined) {
        packet.username = identity ?? undefined;
        packet.password = undefined;
      }
      // aedes stores this will only once authenticate accepted this user name (handlers/connect.js).
      if (packet.will) Object.assign(packet.will, { [WILL_USERNAME]: packet.username ?? null });
      // MQTT-3.1.3-8: a zero-byte client id with CleanSession 0 gets CONNACK 0x02, then close.
      // aedes would invent an id and keep a session no one can resume; refuse it in authenticate.
      if (packet.clientId === "" && packet.clean === false && !state.refuseAtConnect.has(client)) {
        state.refuseAtConnect.set(client, {
          code: IDENTIFIER_REJECTED,
          reason: "a zero-length client id needs clean session (MQTT-3.1.3-8)",
        });
      }
      // A client that never pings (0) or pings too seldom would hold a dead connection, its client id and its
      // will for that long: Mosquitto refuses such a 3.1.1 CONNECT with "identifier rejected" too.
      const max = state.maxKeepalive;
      const keepalive = packet.keepalive ?? 0;
      state.keepalives.set(client, keepalive);
      if (max > 0 && (keepalive === 0 || keepalive > max) && !state.refuseAtConnect.has(client)) {
        state.refuseAtConnect.set(client, {
          code: IDENTIFIER_REJECTED,
          reason: `keep alive ${keepalive === 0 ? "0 (none)" : `${keepalive} s`} is not within max_keepalive ${max} s`,
        });
      }
      done(null, true);
    },

    authenticate(client, username, password, done) {
      const certified = state.identities.has(client);
      const info: ClientInfo = {
        id: client.id,
        username: username ?? null,
        host: state.hosts.get(client),
        gone: () => client.closed,
        ...(certified ? { certified } : {}),
      };
      usernames.set(client, info.username);
      if (!state.intakeOpen) return done(connackError(SERVER_UNAVAILABLE, "broker is not accepting devices"), null);
      const refusal = state.refuseAtConnect.get(client);
      if (refusal) {
        log.info({ client: info.id, reason: refusal.reason }, "connect refused");
        return done(connackError(refusal.code, refusal.reason), null);
      }
      const auth = state.auth;
      const hook = auth.authenticate;
      if (certified && info.username === null) {
        state.loginsRefused++;
        log.info({ client: info.id }, "connect refused: the client certificate has no single CN to name the device");
        return done(connackError(NOT_AUTHORIZED, "not authorized"), null);
      }
      const anonymous = info.username === null;
      if (anonymous || !hook) {
        if (!auth.allowAnonymous) {
          state.loginsRefused++;
          log.info({ client: info.id }, "connect refused: anonymous clients not allowed");
          return done(connackError(NOT_AUTHORIZED, "not authorized"), null);
        }
        if (!hook) return done(null, true);
      }
      // An allowed anonymous client is asked too, so the hook can keep it off a device's client id.
      hook.call(auth, info, password ? bytes(password) : null).then(
        (ok) => {
          if (ok) return done(null, true);
          state.loginsRefused++;
          if (anonymous) {
            log.info({ client: info.id }, "connect refused: anonymous client not authorized");
            return done(connackError(NOT_AUTHORIZED, "not authorized"), null);
          }
          if (certified) {
            // No secret to guess: a certificate the CA signed for no device here (or for another client id).
            log.info(
              { client: info.id, certificate: info.username },
              "connect refused: the certificate names no device",
            );
            return done(connackError(NOT_AUTHORIZED, "not authorized"), null);
          }
          // A guessing client must not flood the log: one line per 10 s, with the count since.
          const refused = logDue(state.badLoginLog);
          if (refused !== null)
            log.info({ client: info.id, username: info.username, refused }, "connect refused: bad credentials");
          done(connackError(BAD_CREDENTIALS, "bad user name or password"), null);
        },
        (err: unknown) => {
          if (err instanceof BrokerBusy) {
            state.loginsBusy++;
            const refused = logDue(state.busyLoginLog);
            if (refused !== null)
              log.warn({ client: info.id, username: info.username, refused }, `connect refused: ${err.message}`);
            return done(connackError(SERVER_UNAVAILABLE, "server busy: too many logins waiting"), null);
          }
          log.error({ err, client: info.id }, "authenticate hook failed; connect refused");
          done(connackError(SERVER_UNAVAILABLE, "authentication unavailable"), null);
        },
      );
    },

    // Also called for a client's will when it drops. Publishes by the gateway itself
    // (aedes.publish) never come here. Refusals (docs/mqtt.md "Refusals"), aedes 1.2.0
    // (lib/handlers/publish.js, lib/client.js):
    // - permanent (topic rules, ACL, an intake verdict that no retry can change): like Mosquitto,
    //   acknowledged and dropped. The packet is redirected to DROPPED_TOPIC and callback(null)
    //   lets aedes write the PUBACK; the connection stays, the device does not resend.
    // - transient (intake stopped, queue full, commits failing): callback(err) ends the packet's
    //   handling before enqueuePublish, so no PUBACK is written; the error becomes `clientError`
    //   and the socket is destroyed. MQTT 3.1.1 has no negative PUBACK and resends only on a new
    //   connection (MQTT-4.4.0-1), so closing it is what makes the device retry.
    authorizePublish(client, packet, callback) {
      const info = infoOf(client, packet);
      const refuse = (reason: string): void => {
        state.refused++;
        const refused = logDue(state.refusedLog);
        if (refused !== null)
          log.info(
            { client: info.id, topic: packet.topic, reason, refused },
            "publish refused for now: no PUBACK, closed",
          );
        callback(new PublishRefused(packet.topic, reason));
      };
      const drop = (reason: string): void => {
        state.refused++;
        state.dropped++;
        const dropped = logDue(state.droppedLog);
        if (dropped !== null)
          log.warn({ client: info.id, topic: packet.topic, reason, dropped }, "publish refused: acked, dropped");
        packet.topic = DROPPED_TOPIC;
        packet.retain = false;
        packet.payload = Buffer.alloc(0);
        callback(null);
      };
      const rule = checkDevicePublishTopic(packet.topic);
      if (!rule.ok) return drop(rule.reason);
      const auth = state.auth;
      // Only a will swept after a crash can get here anonymous while anonymous clients are refused.
      if (info.username === null && !auth.allowAnonymous) return drop("anonymous clients not allowed");
      const acl = auth.authorizePublishTopic;
      if (!aclAllows(acl ? () => acl.call(auth, info, packet.topic) : null, packet.topic, info)) {
        return drop("not authorized");
      }
      if (!state.intakeOpen) return refuse("intake stopped");
      const msg: { -readonly [K in keyof PublishedMessage]: PublishedMessage[K] } = {
        topic: packet.topic,
        payload: bytes(packet.payload),
        qos: packet.qos,
        retain: packet.retain,
      };
      if (packet.qos > 0 && typeof packet.messageId === "number") msg.messageId = packet.messageId;
      // Only when devices are known to set DUP on a resend: mqtt.js, for one, resends without it.
      if (opts.trustDup) msg.dup = packet.dup === true;
      const act = (v: IntakeVerdict): void => {
        try {
          if (!v.ok) {
            if (v.permanent) drop(v.reason);
            else refuse(v.reason);
            return;
          }
          state.messagesIn++;
          const first = client && packet.qos === 1 ? state.publishFirst : null;
          if (!first || !client) {
            callback(null); // only now may aedes write the PUBACK
            return;
          }
          const published = first(packet, client);
          const ack = Promise.all([acks.get(client), published]).then(
            () => callback(null),
            (err: unknown) => callback(err instanceof Error ? err : new Error(String(err))),
          );
          acks.set(client, ack);
        } catch (err) {
          log.error({ err, client: info.id, topic: msg.topic }, "publish handling failed");
        }
      };
      if (!client) {
        runIntake(msg, info, act);
        return;
      }
      let queue = turns.get(client);
      if (!queue) {
        queue = new TurnQueue();
        turns.set(client, queue);
      }
      const turn = queue.push(act);
      runIntake(msg, info, (v) => queue.settle(turn, v));
    },

    authorizeSubscribe(client, sub, done) {
      // A returning session with no subscriptions, as its persistence tells aedes (persistence/sessions.ts):
      // turned away on restore, so nothing is subscribed and CONNACK says session present = 1.
      if (isSessionMark(sub)) return done(null, null);
      const info = infoOf(client);
      const rule = checkDeviceSubscribeFilter(sub.topic, sysOn);
      const auth = state.auth;
      const acl = auth.authorizeSubscribeTopic;
      const allowed = rule.ok && aclAllows(acl ? () => acl.call(auth, info, sub.topic) : null, sub.topic, info);
      if (allowed) {
        state.granted.record(client, sub);
        return done(null, sub);
      }
      log.info({ client: info.id, filter: sub.topic }, "subscribe refused");
      // aedes restores a returning session's stored subscriptions through here too, and keeps one it was
      // refused in the store: its messages would go on filling the offline queue, and come once the right
      // was back, published while it was revoked. A filter no longer granted leaves the session.
      if (!client.clean) forgetStoredSubscription(client, sub.topic, log);
      // aedes 1.2.0 (lib/handlers/subscribe.js storeSubscriptions): a null subscription is
      // granted 128 in the SUBACK (MQTT 3.1.1 §3.9.3) and the connection stays open.
      done(null, null);
    },

    // Every delivery to a client, live or from its offline queue (aedes 1.2.0 handlers/connect.js
    // emptyQueue: a refused queued message is removed), is checked against the subscribe rights in
    // force now: a queue filled before a right was revoked must not leak on reconnect.
    authorizeForward(client, packet) {
      // aedes' own `$SYS/<broker id>/...` events name clients: only the counts of ./sys.ts go out.
      if (packet.topic.startsWith("$SYS/") && !packet.topic.startsWith(SYS_PREFIX)) return null;
      const auth = state.auth;
      const acl = auth.authorizeSubscribeTopic;
      if (acl) {
        const info = infoOf(client);
        if (!aclAllows(() => acl.call(auth, info, packet.topic), packet.topic, info)) return null;
      }
      state.messagesOut++;
      return packet;
    },
  };
}

/** Drop `filter` from `client`'s stored session (a no-op when it holds none). */
function forgetStoredSubscription(client: Client, filter: string, log: Logger): void {
  const persistence = (client as unknown as { broker: { persistence: StoredSubscriptions } }).broker.persistence;
  persistence
    .removeSubscriptions(client, [filter])
    .catch((err: unknown) => log.warn({ err, client: client.id, filter }, "refused subscription not removed"));
}

/** The part of aedes' persistence that drops a client's stored subscriptions. */
interface StoredSubscriptions {
  removeSubscriptions(client: Client, filters: string[]): Promise<unknown>;
}

/** One publish waiting for its verdict, or for the verdicts of those before it. */
interface Turn {
  readonly act: (v: IntakeVerdict) => void;
  verdict: IntakeVerdict | null;
  next: Turn | null;
}

/**
 * One client's publishes in PUBLISH order, each acted on once its verdict and every earlier one's
 * are in. A plain list, not a chain of promises: on the path every device message takes, each
 * publish costs one promise reaction (its verdict's) instead of a chain of four or more.
 */
class TurnQueue {
  private head: Turn | null = null;
  private tail: Turn | null = null;

  push(act: (v: IntakeVerdict) => void): Turn {
    const turn: Turn = { act, verdict: null, next: null };
    if (this.tail) this.tail.next = turn;
    else this.head = turn;
    this.tail = turn;
    return turn;
  }

  /** `turn` has its verdict: act on it, and on every turn after it that was only waiting for it. */
  settle(turn: Turn, verdict: IntakeVerdict): void {
    turn.verdict = verdict;
    while (this.head?.verdict) {
      const t = this.head;
      this.head = t.next;
      if (!this.head) this.tail = null;
      t.act(t.verdict!);
    }
  }
}
