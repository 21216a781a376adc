/**
 * A deterministic, fixed-seed, realistic e-commerce traffic generator (SPEC §1 events) for the demo,
 * the tests and the benchmarks.
 *
 * The model, in event time:
 * - A population of `users` slots. New visitors arrive anonymously (anonymous_id only) through a
 *   first-touch channel (organic / ad / kakao / email / offline) on web or app, view pages, add to
 *   and remove from their cart; some of them (`1 − anonymousShare`) are prospects who `sign_up` in
 *   one of their sessions (the sign_up carries both ids: that is the identity stitch).
 * - Members come back over hours, days and weeks with a probability that decays with every session
 *   (those who do not come back go dormant), `login` (both ids) on later sessions, sometimes from a
 *   new device (a new anonymous_id, stitched by that login) or in a store (platform `offline`,
 *   user_id only), `purchase` (order_id, KRW amount: the sum of log-normal catalogue prices plus
 *   shipping, `props.items`), sometimes `refund` (same order_id, amount ≤ the purchase) or `review`.
 *   Carts survive between sessions (cart abandoners come back more often).
 * - Sessions interleave: `concurrentSessions` are open at once and each emitted event belongs to a
 *   random open one, so the mean gap between two events of a session is about
 *   concurrentSessions / eventsPerSecond seconds.
 * - One `cost` event per paid channel per day (KST calendar day, stamped at the day's last
 *   millisecond and emitted as the day ends): spend, no user ids, proportional to the new visitors
 *   the channel brought that day. A day still running when you stop has no cost events yet.
 * - `message_*` events are never generated (the campaign features produce them).
 * - Event time has a day/night rhythm (Korean hours) averaging `eventsPerSecond`; it never decreases
 *   in emission order, except for the noise below.
 *
 * Noise, drawn from a second random stream so that the journeys (and every fresh event) are the same
 * with or without it:
 * - late events (`lateRate`): held back and emitted when event time has moved on by a log-uniform
 *   delay between one minute and `maxLateMs` (2 days), i.e. inside the engine's allowed lateness;
 * - too-late events (`tooLateRate`): held back 3 days + 1 hour to 6 days (beyond allowed lateness);
 * - duplicates (`duplicateRate`): an exact copy (same event_id, same content) of one of the last
 *   1024 events emitted;
 * - bad records (`badRate`): a separate kind of output, {@link BadRecord}, carrying the reason the
 *   engine is expected to reject it with and its raw JSON line and protobuf bytes.
 *
 * Memory: about 40 bytes per user slot in typed arrays (40 MB for 1 M users), a few arrays of
 * `concurrentSessions` entries, a 1024-event ring for duplicates, and the held-back late events:
 * about lateRate × eventsPerSecond × 6.6 h of events (the mean late delay) — 24 k events at
 * 100 events/s with the default 1 %.
 *
 * Determinism: the same options give the same sequence, byte for byte (JSON and protobuf): all
 * randomness comes from {@link Rng} (xoshiro128**, integer arithmetic), never Math.random or a clock;
 * the few Math.exp/log/cos calls are computed by V8 in software, the same on every platform.
 *
 * @example
 * ```ts
 * const gen = new TrafficGenerator({ seed: 7, users: 100_000, eventsPerSecond: 50 });
 * for (const e of gen.take(1000)) process.stdout.write(toJsonLine(e) + '\n');
 * const bytes = encodeProto(gen.nextEvent()); // crmstream.v1.Event wire bytes
 * ```
 */
import { crmstream } from '../../api/proto/gen/crmstream.js';
import { CrmError } from '../errors.js';
import type { RejectName } from '../event-types.js';

const MINUTE = 60_000;
const HOUR = 3_600_000;
const DAY = 86_400_000;
/** Korea Standard Time offset: calendar days and the day/night rhythm follow Asia/Seoul (no DST). */
const KST_OFFSET = 9 * HOUR;

// ---------------------------------------------------------------------------------------------------
// PRNG

/**
 * A small seeded PRNG: xoshiro128** (period 2^128 − 1; a long benchmark draws billions of numbers,
 * beyond mulberry32's 2^32 period), seeded through splitmix32. Pure 32-bit integer arithmetic, so
 * every platform gives the same sequence.
 *
 * @example
 * ```ts
 * const rng = new Rng(42);
 * rng.next();            // float in [0, 1)
 * rng.int(6);            // integer in [0, 6)
 * rng.pick(['a', 'b']);  // one element
 * ```
 */
export class Rng {
  private s0: number;
  private s1: number;
  private s2: number;
  private s3: number;

  constructor(seed: number) {
    // splitmix32 expands one 32-bit seed into four well-mixed state words (never all zero).
    let x = seed >>> 0;
    const sm = (): number => {
      x = (x + 0x9e3779b9) | 0;
      let z = x;
      z = Math.imul(z ^ (z >>> 16), 0x85ebca6b);
      z = Math.imul(z ^ (z >>> 13), 0xc2b2ae35);
      return (z ^ (z >>> 16)) >>> 0;
    };
    this.s0 = sm();
    this.s1 = sm();
    this.s2 = sm();
    this.s3 = sm();
    if ((this.s0 | this.s1 | this.s2 | this.s3) === 0) this.s0 = 1;
  }

  /** Next 32-bit unsigned integer. */
  u32(): number {
    const s1 = this.s1;
    const r = Math.imul(rotl(Math.imul(s1, 5), 7), 9);
    const t = s1 << 9;
    this.s2 ^= this.s0;
    this.s3 ^= s1;
    this.s1 ^= this.s2;
    this.s0 ^= this.s3;
    this.s2 ^= t;
    this.s3 = rotl(this.s3, 11);
    return r >>> 0;
  }

  /** Uniform float in [0, 1) (32 bits of resolution). */
  next(): number {
    return this.u32() / 4294967296;
  }

  /** Uniform integer in [0, n), n ≤ 2^32. */
  int(n: number): number {
    return Math.floor(this.next() * n);
  }

  /** Uniform integer in [lo, hi]. */
  range(lo: number, hi: number): number {
    return lo + this.int(hi - lo + 1);
  }

  /** True with probability p. */
  chance(p: number): boolean {
    return this.next() < p;
  }

  /** One element of a non-empty array. */
  pick<T>(items: readonly T[]): T {
    return items[this.int(items.length)] as T;
  }

  /** Exponentially distributed with the given mean. */
  exp(mean: number): number {
    return -Math.log(1 - this.next()) * mean;
  }

  /** Standard normal (Box–Muller; one value per call, the second is dropped for simplicity). */
  normal(): number {
    const u = 1 - this.next();
    const v = this.next();
    return Math.sqrt(-2 * Math.log(u)) * Math.cos(2 * Math.PI * v);
  }

  /** Index into a cumulative weight table (see {@link cumulative}). */
  weighted(cum: Float64Array): number {
    const u = this.next();
    let i = 0;
    while (u >= cum[i]!) i++;
    return i;
  }
}

function rotl(x: number, k: number): number {
  return (x << k) | (x >>> (32 - k));
}

/** Cumulative table for {@link Rng.weighted}; the last entry is pushed past 1 so rounding never overruns. */
export function cumulative(weights: readonly number[]): Float64Array {
  const total = weights.reduce((a, b) => a + b, 0);
  const cum = new Float64Array(weights.length);
  let acc = 0;
  for (let i = 0; i < weights.length; i++) {
    acc += (weights[i] ?? 0) / total;
    cum[i] = acc;
  }
  cum[weights.length - 1] = 2;
  return cum;
}

// ---------------------------------------------------------------------------------------------------
// Output types

/**
 * One generated event: exactly the fields of `crmstream.v1.Event` with their JSON (snake_case) names,
 * always all present ('' / 0 / {} when absent), always in this order — one hidden class for every
 * event, and `JSON.stringify` gives the same field order every time.
 */
export interface GenEvent {
  event_id: string;
  type: string;
  user_id: string;
  anonymous_id: string;
  /** Event time, ms since epoch (UTC). */
  ts: number;
  /** KRW (whole won) for purchase / refund / cost; 0 otherwise. */
  amount: number;
  currency: string;
  order_id: string;
  channel: string;
  platform: string;
  campaign_id: string;
  variant: string;
  trigger_id: string;
  props: Record<string, string>;
}

/** The reject reasons bad records are built to trigger (SPEC §1 reason codes). */
export type BadReason = Extract<
  RejectName,
  'bad_encoding' | 'missing_id' | 'missing_type' | 'bad_timestamp' | 'unknown_currency' | 'bad_amount' | 'too_large'
>;
const BAD_REASONS: readonly BadReason[] = [
  'bad_encoding', 'missing_id', 'missing_type', 'bad_timestamp', 'unknown_currency', 'bad_amount', 'too_large',
];

/**
 * A malformed input record, for the bad-input paths. It is a separate kind of output: only
 * {@link TrafficGenerator.nextRecord} returns it; `nextEvent()` / `take()` skip it.
 */
export class BadRecord {
  readonly kind = 'bad' as const;
  constructor(
    /** The reason code the engine is expected to reject it with. */
    readonly reason: BadReason,
    /** The decoded form when it has one (null for `bad_encoding`). */
    readonly event: GenEvent | null,
    /** The record as a JSON line (invalid JSON for `bad_encoding`). */
    readonly json: string,
    /** The record as protobuf bytes (undecodable for `bad_encoding`). */
    readonly proto: Uint8Array,
  ) {}
}

export type GenRecord = GenEvent | BadRecord;

/** True when a record from {@link TrafficGenerator.nextRecord} is a bad one. */
export function isBad(r: GenRecord): r is BadRecord {
  return r instanceof BadRecord;
}

function makeEvent(
  event_id: string, type: string, user_id: string, anonymous_id: string, ts: number, amount: number,
  currency: string, order_id: string, channel: string, platform: string, props: Record<string, string>,
): GenEvent {
  // One literal with every field in one order: one hidden class for every event.
  return {
    event_id, type, user_id, anonymous_id, ts, amount, currency, order_id, channel, platform,
    campaign_id: '', variant: '', trigger_id: '', props,
  };
}

function cloneEvent(e: GenEvent): GenEvent {
  const props: Record<string, string> = {};
  for (const k of Object.keys(e.props)) props[k] = e.props[k] as string;
  const c = makeEvent(e.event_id, e.type, e.user_id, e.anonymous_id, e.ts, e.amount, e.currency, e.order_id,
    e.channel, e.platform, props);
  c.campaign_id = e.campaign_id;
  c.variant = e.variant;
  c.trigger_id = e.trigger_id;
  return c;
}

/** One event as a JSON line (no trailing newline): the §9 jsonl format. */
export function toJsonLine(e: GenEvent): string {
  return JSON.stringify(e);
}

/**
 * One event as `crmstream.v1.Event` protobuf bytes. Fields at their default ('' / 0 / {}) are
 * left out, as every proto3 encoder does, so sizes are those of real producers.
 */
export function encodeProto(e: GenEvent): Uint8Array {
  const m: crmstream.v1.IEvent = {};
  if (e.event_id !== '') m.event_id = e.event_id;
  if (e.type !== '') m.type = e.type;
  if (e.user_id !== '') m.user_id = e.user_id;
  if (e.anonymous_id !== '') m.anonymous_id = e.anonymous_id;
  if (e.ts !== 0) m.ts = e.ts;
  if (e.amount !== 0) m.amount = e.amount;
  if (e.currency !== '') m.currency = e.currency;
  if (e.order_id !== '') m.order_id = e.order_id;
  if (e.channel !== '') m.channel = e.channel;
  if (e.platform !== '') m.platform = e.platform;
  if (e.campaign_id !== '') m.campaign_id = e.campaign_id;
  if (e.variant !== '') m.variant = e.variant;
  if (e.trigger_id !== '') m.trigger_id = e.trigger_id;
  for (const _ in e.props) {
    m.props = e.props;
    break;
  }
  return crmstream.v1.Event.encode(m).finish();
}

// ---------------------------------------------------------------------------------------------------
// Options

export interface TrafficOptions {
  /** Seed of every random choice (uint32, default 1). Same options → same sequence. */
  seed?: number;
  /** Population size: user slots, each ~40 B of typed arrays (default 1,000,000). */
  users?: number;
  /** Event time of the first event, ms since epoch (default 2024-01-01 00:00 Asia/Seoul). */
  startTs?: number;
  /**
   * Event-time density: fresh events per second of event time, averaged over a day (default 100).
   * Small values stretch a fixed number of events over days and weeks (returns, dormancy, windows);
   * large values pack them into minutes.
   */
  eventsPerSecond?: number;
  /** Fraction of fresh events emitted late, inside allowed lateness (default 0.01). */
  lateRate?: number;
  /** Longest delay of a late event, ms of event time (default 2 days; the shortest is 1 minute). */
  maxLateMs?: number;
  /** Fraction of emitted records that re-emit one of the last 1024 events, same event_id (default 0.005). */
  duplicateRate?: number;
  /** Fraction of fresh events emitted more than 3 days late (default 0): expected `too_late`. */
  tooLateRate?: number;
  /** Fraction of emitted records that are malformed {@link BadRecord}s (default 0). */
  badRate?: number;
  /** Share of new visitors who never sign up (default 0.6); the rest sign up in one of their sessions. */
  anonymousShare?: number;
  /** Currency of purchase / refund / cost amounts (default 'KRW'; amounts are whole won either way). */
  currency?: string;
  /**
   * Sessions open at once (default eventsPerSecond × 20, clamped to [8, 100,000] and to `users`):
   * the mean gap between two events of one session is about this / eventsPerSecond seconds.
   */
  concurrentSessions?: number;
  /** Day/night rhythm of traffic in Korean hours (default true); false = flat rate. */
  diurnal?: boolean;
  /** Products in the catalogue (default 5,000, at most 65,535). */
  products?: number;
  /** Generate daily `cost` events per paid channel (default true). */
  costEvents?: boolean;
}

export type ResolvedTrafficOptions = Readonly<Required<TrafficOptions>>;

/** Validates and defaults generator options once; throws CONFIG_INVALID naming each bad option. */
export function resolveTrafficOptions(o: TrafficOptions = {}): ResolvedTrafficOptions {
  const eps = o.eventsPerSecond ?? 100;
  const users = o.users ?? 1_000_000;
  const r: Required<TrafficOptions> = {
    seed: o.seed ?? 1,
    users,
    startTs: o.startTs ?? Date.UTC(2024, 0, 1) - KST_OFFSET,
    eventsPerSecond: eps,
    lateRate: o.lateRate ?? 0.01,
    maxLateMs: o.maxLateMs ?? 2 * DAY,
    duplicateRate: o.duplicateRate ?? 0.005,
    tooLateRate: o.tooLateRate ?? 0,
    badRate: o.badRate ?? 0,
    anonymousShare: o.anonymousShare ?? 0.6,
    currency: o.currency ?? 'KRW',
    concurrentSessions: o.concurrentSessions ?? Math.min(100_000, Math.max(8, Math.round(eps * 20))),
    diurnal: o.diurnal ?? true,
    products: o.products ?? 5_000,
    costEvents: o.costEvents ?? true,
  };
  const problems: string[] = [];
  const rate = (name: keyof TrafficOptions, v: number, max = 1): void => {
    if (!(v >= 0 && v <= max)) problems.push(`${name}: must be in [0, ${max}], got ${v}`);
  };
  if (!Number.isInteger(r.seed) || r.seed < 0 || r.seed > 0xffffffff) problems.push(`seed: must be an integer in [0, 2^32), got ${r.seed}`);
  if (!Number.isInteger(users) || users < 1 || users > 0x7fffffff) problems.push(`users: must be an integer in [1, 2^31), got ${users}`);
  if (!Number.isFinite(r.startTs)) problems.push(`startTs: must be ms since epoch, got ${r.startTs}`);
  if (!(eps > 0 && Number.isFinite(eps))) problems.push(`eventsPerSecond: must be > 0, got ${eps}`);
  rate('lateRate', r.lateRate, 0.5);
  rate('tooLateRate', r.tooLateRate, 0.5);
  rate('duplicateRate', r.duplicateRate, 0.5);
  rate('badRate', r.badRate, 0.5);
  rate('anonymousShare', r.anonymousShare);
  if (r.lateRate + r.tooLateRate > 0.5) problems.push('lateRate + tooLateRate: must be ≤ 0.5');
  if (r.duplicateRate + r.badRate > 0.5) problems.push('duplicateRate + badRate: must be ≤ 0.5');
  if (!(r.maxLateMs >= 2 * MINUTE && r.maxLateMs <= 3 * DAY)) problems.push(`maxLateMs: must be in [2 min, 3 days] (later is too late), got ${r.maxLateMs}`);
  if (!/^[A-Z]{3}$/.test(r.currency)) problems.push(`currency: an ISO 4217 code such as KRW, got '${r.currency}'`);
  if (!Number.isInteger(r.concurrentSessions) || r.concurrentSessions < 1) problems.push(`concurrentSessions: must be an integer ≥ 1, got ${r.concurrentSessions}`);
  if (!Number.isInteger(r.products) || r.products < 1 || r.products > 65_535) problems.push(`products: must be an integer in [1, 65535], got ${r.products}`);
  if (problems.length > 0) {
    throw new CrmError('CONFIG_INVALID', `invalid traffic generator options:\n  ${problems.join('\n  ')}`);
  }
  // Never more open sessions than users: a new session always finds a user who is not in one.
  r.concurrentSessions = Math.min(r.concurrentSessions, users);
  return Object.freeze(r);
}

// ---------------------------------------------------------------------------------------------------
// Vocabularies

/** Channel names; indices are stored per user / session. */
const CHANNELS = ['organic', 'ad', 'kakao', 'email', 'offline', 'push', 'sms'] as const;
const CH_ORGANIC = 0, CH_AD = 1, CH_KAKAO = 2, CH_OFFLINE = 4, CH_PUSH = 5;
/** First-touch mix of new visitors (channel indices 0..4). */
const FIRST_TOUCH_WEIGHTS = [0.42, 0.26, 0.14, 0.06, 0.12];
const FIRST_TOUCH = cumulative(FIRST_TOUCH_WEIGHTS);
/** How members come back (0..5: organic, ad retargeting, kakao message, email, -, app push). */
const RETURN_CHANNEL = cumulative([0.46, 0.06, 0.2, 0.1, 0, 0.18]);
/** Won of spend per new visitor, per first-touch channel (0 = no cost events: organic). */
const COST_PER_VISITOR = [0, 420, 160, 25, 300, 0, 0];

const PLATFORMS = ['web', 'app', 'offline'] as const;
const PF_WEB = 0, PF_APP = 1, PF_OFFLINE = 2;

const SIGNUP_METHODS = ['kakao', 'kakao', 'kakao', 'naver', 'email', 'apple'] as const;
const REFUND_REASONS = ['changed_mind', 'changed_mind', 'defective', 'wrong_size', 'late_delivery'] as const;
const RATINGS = cumulative([0.04, 0.05, 0.11, 0.25, 0.55]);
const RATING_STR = ['1', '2', '3', '4', '5'] as const;
const PAGES = ['home', 'category', 'search', 'event'] as const;

/** Traffic by Korean hour of day (index 0 = 00:00 KST), scaled to mean 1 in the constructor. */
const DIURNAL = [
  0.62, 0.4, 0.25, 0.16, 0.12, 0.14, 0.27, 0.5, 0.78, 0.95, 1.05, 1.15,
  1.32, 1.25, 1.1, 1.04, 1.05, 1.1, 1.2, 1.38, 1.58, 1.75, 1.62, 1.05,
];

// Session plan actions.
const A_VISIT = 1, A_LOGIN = 2, A_PV = 3, A_ATC = 4, A_RFC = 5, A_SIGNUP = 6, A_PURCHASE = 7, A_REFUND = 8, A_REVIEW = 9;
const PLAN_MAX = 32;
const CART_MAX = 4;
const MAX_PAGE_VIEWS = 8;

// Per-user flags.
const F_USED = 1, F_MEMBER = 2, F_PROSPECT = 4, F_ACTIVE = 8, F_SCHEDULED = 16, F_REFUNDED = 32, F_REVIEWED = 64, F_DORMANT = 128;

const DUP_RING = 1024;
const SHIPPING_FEE = 3_000;
const FREE_SHIPPING_FROM = 50_000;

/** Counters of what a generator has produced so far. */
export interface TrafficStats {
  /** Records handed out (events, duplicates, released late events and bad records). */
  emitted: number;
  /** Fresh events generated (each exactly once; includes those still held back as late). */
  fresh: number;
  /** Fresh events held back as late (within allowed lateness) / as too late. */
  late: number;
  tooLate: number;
  /** Late or too-late events still held back (not emitted yet). */
  pendingLate: number;
  duplicates: number;
  bad: number;
  cost: number;
  /** User slots used so far, and how many of them have signed up. */
  users: number;
  members: number;
  orders: number;
  /** Event time reached (ms). */
  clock: number;
}

// ---------------------------------------------------------------------------------------------------

/**
 * The traffic generator. See the module comment for the model. Cheap to construct apart from the
 * per-user typed arrays (~40 B × users).
 *
 * @example
 * ```ts
 * // Three weeks of a small shop, every late event included, for a test or a backfill file:
 * const gen = new TrafficGenerator({ seed: 11, users: 3_000, eventsPerSecond: 0.05 });
 * const events = [...gen.take(100_000), ...gen.drain()];
 * // A noisy stream for the bad-input paths:
 * const noisy = new TrafficGenerator({ seed: 1, badRate: 0.01, tooLateRate: 0.001 });
 * for (const r of noisy.takeRecords(10_000)) if (isBad(r)) console.log(r.reason, r.json.slice(0, 80));
 * ```
 */
export class TrafficGenerator {
  readonly options: ResolvedTrafficOptions;
  private readonly sim: Rng;
  private readonly noise: Rng;
  private readonly users: number;
  private readonly currency: string;
  private readonly eventIdPrefix: string;
  private readonly orderIdPrefix: string;
  private readonly badIdPrefix: string;

  // Event time.
  private clock: number;
  private readonly meanDt: number;
  private readonly rhythm: Float64Array;
  private nextDayTs: number;
  /** New visitors of the current day by first-touch channel: the basis of its spend. */
  private readonly dayNew = new Uint32Array(FIRST_TOUCH_WEIGHTS.length);

  // Catalogue.
  private readonly productIds: string[];
  private readonly prices: Uint32Array;
  private readonly priceStr: string[];

  // Per user slot.
  private readonly flags: Uint8Array;
  private readonly firstChannel: Uint8Array;
  private readonly platformPref: Uint8Array;
  private readonly devices: Uint8Array;
  private readonly sessions: Uint16Array;
  private readonly purchases: Uint16Array;
  private readonly lastOrder: Uint32Array;
  private readonly lastAmount: Uint32Array;
  private readonly cartN: Uint8Array;
  private readonly cart: Uint16Array;
  private nextSlot = 0;
  // Scheduled returns: a binary min-heap on return time; each user is in it at most once.
  private readonly retKey: Float64Array;
  private readonly retSlot: Int32Array;
  private retSize = 0;

  // Open sessions.
  private readonly k: number;
  private readonly sUser: Int32Array;
  private readonly sChannel: Uint8Array;
  private readonly sPlatform: Uint8Array;
  private readonly sLogged: Uint8Array;
  private readonly sBought: Uint8Array;
  private readonly sLen: Uint8Array;
  private readonly sPos: Uint8Array;
  private readonly sPlan: Uint8Array;
  private readonly sUid: string[];
  private readonly sAid: string[];

  // Cost events of a new day, emitted before the next simulated event.
  private readonly costQueue: GenEvent[] = [];
  private costHead = 0;

  // Noise: held-back late events (binary min-heap on release time) and the duplicate ring.
  private readonly lateKey: number[] = [];
  private readonly lateEv: GenEvent[] = [];
  private readonly ring: GenEvent[] = [];
  private ringPos = 0;
  private readonly lateLogMin: number;
  private readonly lateLogSpan: number;

  // Counters.
  private eventCounter = 0;
  private orderCounter = 0;
  private badCounter = 0;
  private nEmitted = 0;
  private nLate = 0;
  private nTooLate = 0;
  private nDup = 0;
  private nBad = 0;
  private nCost = 0;
  private nMembers = 0;

  constructor(options: TrafficOptions = {}) {
    const o = resolveTrafficOptions(options);
    this.options = o;
    this.sim = new Rng(o.seed);
    this.noise = new Rng((o.seed ^ 0x5bd1e995) >>> 0);
    this.users = o.users;
    this.currency = o.currency;
    this.eventIdPrefix = `e${o.seed}-`;
    this.orderIdPrefix = `o${o.seed}-`;
    this.badIdPrefix = `e${o.seed}-bad`;

    this.clock = o.startTs;
    this.meanDt = 1000 / o.eventsPerSecond;
    this.rhythm = new Float64Array(24);
    const mean = DIURNAL.reduce((a, b) => a + b, 0) / 24;
    for (let h = 0; h < 24; h++) this.rhythm[h] = o.diurnal ? (DIURNAL[h] as number) / mean : 1;
    // The end of startTs's (KST) day: the first day's spend is emitted then.
    this.nextDayTs = Math.floor((o.startTs + KST_OFFSET) / DAY) * DAY - KST_OFFSET + DAY;

    // A log-normal catalogue: median ~19,900 won, long tail; prices end in 900 as shops like them.
    const cat = new Rng((o.seed ^ 0x2545f491) >>> 0);
    this.productIds = new Array<string>(o.products);
    this.prices = new Uint32Array(o.products);
    this.priceStr = new Array<string>(o.products);
    for (let i = 0; i < o.products; i++) {
      const v = Math.exp(Math.log(20_000) + 0.85 * cat.normal());
      const price = Math.min(2_000_000, Math.max(1_000, Math.round(v / 1000) * 1000)) - 100;
      this.productIds[i] = `p${i}`;
      this.prices[i] = price;
      this.priceStr[i] = String(price);
    }

    const n = o.users;
    this.flags = new Uint8Array(n);
    this.firstChannel = new Uint8Array(n);
    this.platformPref = new Uint8Array(n);
    this.devices = new Uint8Array(n);
    this.sessions = new Uint16Array(n);
    this.purchases = new Uint16Array(n);
    this.lastOrder = new Uint32Array(n);
    this.lastAmount = new Uint32Array(n);
    this.cartN = new Uint8Array(n);
    this.cart = new Uint16Array(n * CART_MAX);
    this.retKey = new Float64Array(n);
    this.retSlot = new Int32Array(n);

    const k = o.concurrentSessions;
    this.k = k;
    this.sUser = new Int32Array(k).fill(-1);
    this.sChannel = new Uint8Array(k);
    this.sPlatform = new Uint8Array(k);
    this.sLogged = new Uint8Array(k);
    this.sBought = new Uint8Array(k);
    this.sLen = new Uint8Array(k);
    this.sPos = new Uint8Array(k);
    this.sPlan = new Uint8Array(k * PLAN_MAX);
    this.sUid = new Array<string>(k).fill('');
    this.sAid = new Array<string>(k).fill('');

    this.lateLogMin = Math.log(MINUTE);
    this.lateLogSpan = Math.log(o.maxLateMs) - this.lateLogMin;
  }

  // ------------------------------------------------------------------------------------------------
  // Public API

  /**
   * The next record of the stream: a {@link GenEvent} (fresh, a released late one, or a duplicate)
   * or, with `badRate` > 0, a {@link BadRecord}. Events handed out are not copied: the last 1024
   * are kept to be duplicated, so do not mutate them.
   */
  nextRecord(): GenRecord {
    this.nEmitted++;
    // Held-back events whose delay has passed go first.
    if (this.lateKey.length > 0 && (this.lateKey[0] as number) <= this.clock) return this.popLate();
    const o = this.options;
    if (o.badRate > 0 || o.duplicateRate > 0) {
      const u = this.noise.next();
      if (u < o.badRate) return this.makeBad();
      if (u < o.badRate + o.duplicateRate && this.ring.length > 0) {
        this.nDup++;
        return cloneEvent(this.ring[this.noise.int(this.ring.length)] as GenEvent);
      }
    }
    const held = o.lateRate + o.tooLateRate;
    for (;;) {
      const e = this.freshEvent();
      if (held > 0) {
        const u = this.noise.next();
        if (u < held) {
          if (u < o.tooLateRate) {
            this.nTooLate++;
            this.pushLate(e, e.ts + 3 * DAY + HOUR + this.noise.next() * (3 * DAY - HOUR));
          } else {
            this.nLate++;
            this.pushLate(e, e.ts + Math.exp(this.lateLogMin + this.noise.next() * this.lateLogSpan));
          }
          continue;
        }
      }
      if (this.ring.length < DUP_RING) this.ring.push(e);
      else {
        this.ring[this.ringPos] = e;
        this.ringPos = (this.ringPos + 1) % DUP_RING;
      }
      return e;
    }
  }

  /** The next event (bad records, if any are configured, are skipped). */
  nextEvent(): GenEvent {
    for (;;) {
      const r = this.nextRecord();
      if (!(r instanceof BadRecord)) return r;
    }
  }

  /** The next n events. */
  take(n: number): GenEvent[] {
    const out = new Array<GenEvent>(n);
    for (let i = 0; i < n; i++) out[i] = this.nextEvent();
    return out;
  }

  /** The next n records, bad ones included. */
  takeRecords(n: number): GenRecord[] {
    const out = new Array<GenRecord>(n);
    for (let i = 0; i < n; i++) out[i] = this.nextRecord();
    return out;
  }

  /**
   * Hands out every late event still held back, in release order, without advancing event time:
   * call it at the end of a finite data set so that every generated event is in it.
   */
  drain(): GenEvent[] {
    const out: GenEvent[] = [];
    while (this.lateKey.length > 0) {
      out.push(this.popLate());
      this.nEmitted++;
    }
    return out;
  }

  /** The simulated clock: the event time of the latest fresh event (ms). */
  get now(): number {
    return this.clock;
  }

  /** What has been produced so far. */
  get stats(): TrafficStats {
    return {
      emitted: this.nEmitted,
      fresh: this.eventCounter,
      late: this.nLate,
      tooLate: this.nTooLate,
      pendingLate: this.lateKey.length,
      duplicates: this.nDup,
      bad: this.nBad,
      cost: this.nCost,
      users: this.nextSlot,
      members: this.nMembers,
      orders: this.orderCounter,
      clock: Math.floor(this.clock),
    };
  }

  // ------------------------------------------------------------------------------------------------
  // Simulation

  private freshEvent(): GenEvent {
    if (this.costHead < this.costQueue.length) return this.nextCost();
    const rng = this.sim;
    const hour = Math.floor(((this.clock + KST_OFFSET) % DAY) / HOUR);
    const next = this.clock + rng.exp(this.meanDt / (this.rhythm[hour] as number));
    if (next >= this.nextDayTs) {
      // A (KST) day is over: its spend, stamped at its last millisecond, goes before anything of
      // the next day, so event time still never decreases.
      const lastMs = this.nextDayTs - 1;
      this.nextDayTs += DAY;
      if (this.options.costEvents) this.enqueueCosts(lastMs);
      this.dayNew.fill(0);
      if (this.costHead < this.costQueue.length) {
        // The event time the cost events stand in for is used up: the next event comes after them.
        this.clock = next;
        return this.nextCost();
      }
    }
    this.clock = next;
    const k = rng.int(this.k);
    if (this.sUser[k]! < 0) this.startSession(k);
    return this.emitAction(k);
  }

  private nextCost(): GenEvent {
    const e = this.costQueue[this.costHead++] as GenEvent;
    if (this.costHead === this.costQueue.length) {
      this.costQueue.length = 0;
      this.costHead = 0;
    }
    return e;
  }

  private enqueueCosts(ts: number): void {
    // Spend follows the day's actual acquisitions (new visitors by first-touch channel) at a
    // per-channel cost per visitor with ±20 % noise, so CAC comes out plausible and stable.
    for (let c = 0; c < FIRST_TOUCH_WEIGHTS.length; c++) {
      const cpv = COST_PER_VISITOR[c] as number;
      const visitors = this.dayNew[c]!;
      if (cpv === 0 || visitors === 0) continue;
      const amount = Math.max(1_000, Math.round(visitors * cpv * (0.8 + 0.4 * this.sim.next()) / 1000) * 1000);
      this.nCost++;
      this.costQueue.push(makeEvent(this.eventIdPrefix + this.eventCounter++, 'cost', '', '', ts, amount,
        this.currency, '', CHANNELS[c] as string, '', {}));
    }
  }

  /** Opens a session in empty slot k: a due return, else a new visitor, else a random revisit. */
  private startSession(k: number): void {
    const rng = this.sim;
    const flags = this.flags;
    let slot = -1;
    let isNew = false;
    while (this.retSize > 0 && this.retKey[0]! <= this.clock) {
      const s = this.popReturn();
      flags[s] = flags[s]! & ~F_SCHEDULED;
      if ((flags[s]! & F_ACTIVE) === 0) {
        slot = s;
        break;
      }
    }
    if (slot < 0) {
      if (this.nextSlot < this.users) {
        slot = this.nextSlot++;
        isNew = true;
        const ch = rng.weighted(FIRST_TOUCH);
        this.firstChannel[slot] = ch;
        this.dayNew[ch] = this.dayNew[ch]! + 1;
        // Kakao links open mostly in the in-app browser (web); ads and push-heavy audiences lean app.
        const appShare = ch === CH_KAKAO ? 0.3 : ch === CH_AD ? 0.55 : ch === CH_OFFLINE ? 0.6 : 0.45;
        this.platformPref[slot] = rng.chance(appShare) ? PF_APP : PF_WEB;
        this.devices[slot] = 1;
        flags[slot] = F_USED | (rng.chance(this.options.anonymousShare) ? 0 : F_PROSPECT);
      } else {
        slot = this.randomIdleUser();
      }
    }
    flags[slot] = (flags[slot]! | F_ACTIVE) & ~F_DORMANT;
    const member = (flags[slot]! & F_MEMBER) !== 0;
    const pref = this.platformPref[slot]!;

    let channel: number;
    let platform: number;
    let dev = 0;
    if (isNew) {
      channel = this.firstChannel[slot]!;
      platform = pref;
    } else if (member && rng.chance(0.06)) {
      // A store visit: identified by the membership card, no device.
      channel = CH_OFFLINE;
      platform = PF_OFFLINE;
    } else {
      platform = rng.chance(0.85) ? pref : (pref === PF_APP ? PF_WEB : PF_APP);
      channel = rng.weighted(RETURN_CHANNEL);
      if (channel === CH_PUSH && platform !== PF_APP) channel = CH_ORGANIC;
      if (platform !== pref) {
        dev = 1;
        if (this.devices[slot]! < 2) this.devices[slot] = 2;
      }
      if (rng.chance(0.04) && this.devices[slot]! < 250) {
        dev = this.devices[slot]!;
        this.devices[slot] = dev + 1;
      }
    }
    this.sUser[k] = slot;
    this.sChannel[k] = channel;
    this.sPlatform[k] = platform;
    this.sBought[k] = 0;
    this.sUid[k] = `u${slot}`;
    this.sAid[k] = platform === PF_OFFLINE ? '' : dev === 0 ? `a${slot}` : `a${slot}_${dev}`;
    // Offline always identifies the member; the app keeps members logged in on a known device.
    const logged = platform === PF_OFFLINE || (member && platform === PF_APP && dev <= 1 && rng.chance(0.6));
    this.sLogged[k] = logged ? 1 : 0;
    this.buildPlan(k, slot, member, logged, platform === PF_OFFLINE);
  }

  /** Lays out the whole session as actions; decisions that need the user's state are taken here. */
  private buildPlan(k: number, slot: number, member: boolean, loggedIn: boolean, offline: boolean): void {
    const rng = this.sim;
    const plan = this.sPlan;
    const b = k * PLAN_MAX;
    let n = 0;
    let logged = loggedIn;
    plan[b + n++] = A_VISIT;
    if (offline) {
      if (rng.chance(0.7)) plan[b + n++] = A_PURCHASE;
      this.sLen[k] = n;
      this.sPos[k] = 0;
      return;
    }
    const f = this.flags[slot]!;
    if (member && !logged && rng.chance(0.7)) {
      plan[b + n++] = A_LOGIN;
      logged = true;
    }
    if (member && this.lastOrder[slot]! > 0 && (f & (F_REFUNDED | F_REVIEWED)) === 0) {
      const u = rng.next();
      if (u < 0.28) {
        if (!logged) {
          plan[b + n++] = A_LOGIN;
          logged = true;
        }
        plan[b + n++] = u < 0.06 ? A_REFUND : A_REVIEW;
      }
    }
    let cart = this.cartN[slot]!;
    const hadCart = cart > 0;
    // Only items added in this session are removed in it: the same device and ids as their
    // add_to_cart, so a removal is always attributable to the person who added the item.
    const cartAtStart = cart;
    const shopping = rng.chance(hadCart ? 0.55 : member ? 0.35 : 0.22);
    const pv = Math.min(MAX_PAGE_VIEWS, 1 + Math.floor(rng.exp(2.2)));
    for (let i = 0; i < pv; i++) {
      plan[b + n++] = A_PV;
      if (shopping && cart < CART_MAX && rng.chance(0.45)) {
        plan[b + n++] = A_ATC;
        cart++;
      } else if (cart > cartAtStart && rng.chance(0.08)) {
        plan[b + n++] = A_RFC;
        cart--;
      }
    }
    let canBuy = member;
    if (!member && (f & F_PROSPECT) !== 0 && rng.chance(cart > 0 ? 0.5 : this.sessions[slot] === 0 ? 0.3 : 0.2)) {
      plan[b + n++] = A_SIGNUP;
      logged = true;
      canBuy = true;
    }
    if (canBuy && cart > 0 && rng.chance(hadCart ? 0.5 : this.purchases[slot]! > 0 ? 0.45 : 0.38)) {
      if (!logged) plan[b + n++] = A_LOGIN;
      plan[b + n++] = A_PURCHASE;
    }
    this.sLen[k] = n;
    this.sPos[k] = 0;
  }

  private emitAction(k: number): GenEvent {
    const rng = this.sim;
    const slot = this.sUser[k]!;
    const action = this.sPlan[k * PLAN_MAX + this.sPos[k]!]!;
    this.sPos[k] = this.sPos[k]! + 1;
    const ts = Math.floor(this.clock);
    const channel = CHANNELS[this.sChannel[k]!] as string;
    const platform = PLATFORMS[this.sPlatform[k]!] as string;
    const aid = this.sAid[k] as string;
    const id = this.eventIdPrefix + this.eventCounter++;
    let e: GenEvent;
    switch (action) {
      case A_VISIT:
        e = makeEvent(id, 'visit', this.sLogged[k] ? (this.sUid[k] as string) : '', aid, ts, 0, '', '', channel, platform, {});
        break;
      case A_LOGIN:
        this.sLogged[k] = 1;
        e = makeEvent(id, 'login', this.sUid[k] as string, aid, ts, 0, '', '', channel, platform, {});
        break;
      case A_PV: {
        const uid = this.sLogged[k] ? (this.sUid[k] as string) : '';
        const props: Record<string, string> = rng.chance(0.6)
          ? { page: 'product', product_id: this.productIds[this.pickProduct()] as string }
          : { page: PAGES[rng.int(PAGES.length)] as string };
        e = makeEvent(id, 'page_view', uid, aid, ts, 0, '', '', channel, platform, props);
        break;
      }
      case A_ATC: {
        const p = this.pickProduct();
        const c = this.cartN[slot]!;
        if (c < CART_MAX) {
          this.cart[slot * CART_MAX + c] = p;
          this.cartN[slot] = c + 1;
        }
        const uid = this.sLogged[k] ? (this.sUid[k] as string) : '';
        e = makeEvent(id, 'add_to_cart', uid, aid, ts, 0, '', '', channel, platform,
          { product_id: this.productIds[p] as string, price: this.priceStr[p] as string });
        break;
      }
      case A_RFC: {
        const c = this.cartN[slot]!;
        const uid = this.sLogged[k] ? (this.sUid[k] as string) : '';
        if (c === 0) {
          e = makeEvent(id, 'page_view', uid, aid, ts, 0, '', '', channel, platform, { page: 'cart' });
          break;
        }
        const p = this.cart[slot * CART_MAX + c - 1]!;
        this.cartN[slot] = c - 1;
        e = makeEvent(id, 'remove_from_cart', uid, aid, ts, 0, '', '', channel, platform,
          { product_id: this.productIds[p] as string, price: this.priceStr[p] as string });
        break;
      }
      case A_SIGNUP:
        this.flags[slot] = this.flags[slot]! | F_MEMBER;
        this.sLogged[k] = 1;
        this.nMembers++;
        e = makeEvent(id, 'sign_up', this.sUid[k] as string, aid, ts, 0, '', '', channel, platform,
          { method: SIGNUP_METHODS[rng.int(SIGNUP_METHODS.length)] as string });
        break;
      case A_PURCHASE:
        e = this.purchase(k, slot, id, ts, channel, platform, aid);
        break;
      case A_REFUND: {
        const full = this.lastAmount[slot]!;
        // Most refunds return the whole order; partial ones a share of it, never more than paid.
        const amount = rng.chance(0.6) ? full : Math.min(full, Math.max(100, Math.round(full * (0.2 + 0.6 * rng.next()) / 100) * 100));
        this.flags[slot] = this.flags[slot]! | F_REFUNDED;
        e = makeEvent(id, 'refund', this.sUid[k] as string, aid, ts, amount, this.currency,
          this.orderIdPrefix + this.lastOrder[slot]!, channel, platform,
          { reason: REFUND_REASONS[rng.int(REFUND_REASONS.length)] as string });
        break;
      }
      default: // A_REVIEW
        this.flags[slot] = this.flags[slot]! | F_REVIEWED;
        e = makeEvent(id, 'review', this.sUid[k] as string, aid, ts, 0, '', this.orderIdPrefix + this.lastOrder[slot]!,
          channel, platform, { rating: RATING_STR[rng.weighted(RATINGS)] as string });
        break;
    }
    if (this.sPos[k]! >= this.sLen[k]!) this.endSession(k, slot);
    return e;
  }

  private purchase(k: number, slot: number, id: string, ts: number, channel: string, platform: string, aid: string): GenEvent {
    const rng = this.sim;
    let c = this.cartN[slot]!;
    const offline = this.sPlatform[k] === PF_OFFLINE;
    if (c === 0) {
      // Store purchases (and a cart emptied meanwhile) take 1–3 items off the shelf.
      c = 1 + Math.min(2, Math.floor(rng.exp(0.6)));
      for (let i = 0; i < c; i++) this.cart[slot * CART_MAX + i] = this.pickProduct();
    }
    let amount = 0;
    let items = '';
    for (let i = 0; i < c; i++) {
      const p = this.cart[slot * CART_MAX + i]!;
      amount += this.prices[p]!;
      items = i === 0 ? (this.productIds[p] as string) : `${items},${this.productIds[p] as string}`;
    }
    if (!offline && amount < FREE_SHIPPING_FROM) amount += SHIPPING_FEE;
    this.cartN[slot] = 0;
    const order = ++this.orderCounter;
    this.lastOrder[slot] = order;
    this.lastAmount[slot] = amount;
    this.flags[slot] = this.flags[slot]! & ~(F_REFUNDED | F_REVIEWED);
    if (this.purchases[slot]! < 65_535) this.purchases[slot] = this.purchases[slot]! + 1;
    this.sBought[k] = 1;
    return makeEvent(id, 'purchase', this.sUid[k] as string, aid, ts, amount, this.currency, this.orderIdPrefix + order,
      channel, platform, { items, item_count: String(c) });
  }

  /** Closes session k: the user comes back later with a probability that decays per session, or goes dormant. */
  private endSession(k: number, slot: number): void {
    const rng = this.sim;
    const f = this.flags[slot]!;
    const s = this.sessions[slot]!;
    if (s < 65_535) this.sessions[slot] = s + 1;
    let p: number;
    if ((f & F_MEMBER) !== 0) p = (this.sBought[k] ? 0.88 : 0.74) * Math.pow(0.96, Math.min(s, 200));
    else if ((f & F_PROSPECT) !== 0) p = 0.7 * Math.pow(0.85, s);
    else p = 0.3 * Math.pow(0.6, s);
    if (this.cartN[slot]! > 0 && p < 0.65) p = 0.65;
    let nf = f & ~F_ACTIVE;
    if (rng.chance(p)) {
      if ((nf & F_SCHEDULED) === 0) {
        const u = rng.next();
        // Same day (hours), within days, or weeks later.
        const delay = u < 0.25 ? 10 * MINUTE + rng.exp(3 * HOUR) : u < 0.8 ? HOUR + rng.exp(2.5 * DAY) : 7 * DAY + rng.exp(14 * DAY);
        this.pushReturn(this.clock + delay, slot);
        nf |= F_SCHEDULED;
      }
    } else if ((nf & F_SCHEDULED) === 0) {
      nf |= F_DORMANT;
    }
    this.flags[slot] = nf;
    this.sUser[k] = -1;
    this.sUid[k] = '';
    this.sAid[k] = '';
  }

  /** A user not in a session (dormant ones included: win-back), once the population is used up. */
  private randomIdleUser(): number {
    const n = this.users;
    for (let t = 0; t < 8; t++) {
      const s = this.sim.int(n);
      if ((this.flags[s]! & F_ACTIVE) === 0) return s;
    }
    // Fewer open sessions than users, so a scan always finds one.
    let s = this.sim.int(n);
    while ((this.flags[s]! & F_ACTIVE) !== 0) s = s + 1 === n ? 0 : s + 1;
    return s;
  }

  /** Popular products are viewed and bought more (density ∝ 1/√rank). */
  private pickProduct(): number {
    const u = this.sim.next();
    return Math.floor(u * u * this.prices.length);
  }

  // ------------------------------------------------------------------------------------------------
  // Heaps

  private pushReturn(key: number, slot: number): void {
    const keys = this.retKey;
    const vals = this.retSlot;
    let i = this.retSize++;
    while (i > 0) {
      const parent = (i - 1) >> 1;
      const pk = keys[parent]!;
      if (pk <= key) break;
      keys[i] = pk;
      vals[i] = vals[parent]!;
      i = parent;
    }
    keys[i] = key;
    vals[i] = slot;
  }

  private popReturn(): number {
    const keys = this.retKey;
    const vals = this.retSlot;
    const top = vals[0]!;
    const n = --this.retSize;
    if (n > 0) {
      const key = keys[n]!;
      const val = vals[n]!;
      let i = 0;
      for (;;) {
        let c = 2 * i + 1;
        if (c >= n) break;
        if (c + 1 < n && keys[c + 1]! < keys[c]!) c++;
        if (keys[c]! >= key) break;
        keys[i] = keys[c]!;
        vals[i] = vals[c]!;
        i = c;
      }
      keys[i] = key;
      vals[i] = val;
    }
    return top;
  }

  private pushLate(e: GenEvent, release: number): void {
    const keys = this.lateKey;
    const evs = this.lateEv;
    let i = keys.length;
    keys.push(release);
    evs.push(e);
    while (i > 0) {
      const parent = (i - 1) >> 1;
      const pk = keys[parent] as number;
      if (pk <= release) break;
      keys[i] = pk;
      evs[i] = evs[parent] as GenEvent;
      i = parent;
    }
    keys[i] = release;
    evs[i] = e;
  }

  private popLate(): GenEvent {
    const keys = this.lateKey;
    const evs = this.lateEv;
    const top = evs[0] as GenEvent;
    const key = keys.pop() as number;
    const ev = evs.pop() as GenEvent;
    const n = keys.length;
    if (n > 0) {
      let i = 0;
      for (;;) {
        let c = 2 * i + 1;
        if (c >= n) break;
        if (c + 1 < n && (keys[c + 1] as number) < (keys[c] as number)) c++;
        if ((keys[c] as number) >= key) break;
        keys[i] = keys[c] as number;
        evs[i] = evs[c] as GenEvent;
        i = c;
      }
      keys[i] = key;
      evs[i] = ev;
    }
    return top;
  }

  // ------------------------------------------------------------------------------------------------
  // Bad input

  private makeBad(): BadRecord {
    const rng = this.noise;
    this.nBad++;
    const reason = BAD_REASONS[rng.int(BAD_REASONS.length)] as BadReason;
    const template = this.ring.length > 0 ? (this.ring[rng.int(this.ring.length)] as GenEvent) : null;
    const e = template !== null
      ? cloneEvent(template)
      : makeEvent('', 'page_view', '', `a${rng.int(this.users)}`, Math.floor(this.clock), 0, '', '', 'organic', 'web', { page: 'home' });
    e.event_id = this.badIdPrefix + this.badCounter++;
    switch (reason) {
      case 'bad_encoding': {
        const json = toJsonLine(e);
        // Half a JSON object never parses; a length-delimited field claiming 100 bytes of which 2
        // follow never decodes.
        const good = encodeProto(e);
        const proto = new Uint8Array(good.length + 4);
        proto.set(good);
        proto.set([0x0a, 0x64, 0x61, 0x62], good.length);
        return new BadRecord(reason, null, json.slice(0, Math.max(1, json.length >> 1)), proto);
      }
      case 'missing_id':
        if (e.type === 'cost') e.type = 'page_view';
        e.user_id = '';
        e.anonymous_id = '';
        break;
      case 'missing_type':
        e.type = '';
        break;
      case 'bad_timestamp':
        // The classic: seconds where milliseconds belong (lands in January 1970).
        e.ts = Math.floor(e.ts / 1000);
        break;
      case 'unknown_currency':
        e.type = 'purchase';
        e.currency = 'USD';
        e.amount = 10 + rng.int(200);
        e.order_id = `${this.badIdPrefix}o${this.badCounter}`;
        break;
      case 'bad_amount':
        e.type = 'purchase';
        e.currency = this.currency;
        e.amount = -(1_000 + rng.int(100_000));
        e.order_id = `${this.badIdPrefix}o${this.badCounter}`;
        break;
      default: // too_large: over the default 64 KiB event limit
        e.props = { note: 'x'.repeat(70_000) };
        break;
    }
    return new BadRecord(reason, e, toJsonLine(e), encodeProto(e));
  }
}
