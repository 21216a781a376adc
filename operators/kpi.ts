import { crmstream } from '../api/proto/gen/crmstream.js';
import type { EventColumns } from '../engine/batch.js';
import { Calendar, monthFirstDay, monthOfDay } from '../engine/calendar.js';
import { EventType, isActivity } from '../engine/event-types.js';
import { Topic } from '../engine/outbox.js';
import { BinReader, BinWriter } from '../state/codec.js';
import type { KvStore, WriteOp } from '../state/store.js';
import type { CohortGrain, CohortKind, CohortRow, FunnelRow, KpiGrain, KpiRow } from './kpi-rows.js';
import { KPI_FIELDS } from './kpi-rows.js';
import type { Operator, OperatorContext, StateSlot, UserRecord } from './operator.js';

/**
 * Exact, incremental CRM KPIs (SPEC §4; the precise definitions are docs/KPIS.md).
 *
 * How it stays exact under late events, identity stitching and first-touch changes:
 * a user's contribution to every KPI cell is a pure function of a small set of per-user facts (a
 * *track*: first activity, first sign-up, first purchase, and one (day, purchases, net revenue)
 * entry per active local day). When an event changes a track's facts, the operator generates the
 * track's contribution before and after the change into a scratch netting table (−old, +new) and
 * applies only the entries that differ to the aggregate cells. That is the `rem`/`add` of the
 * init/add/rem/merge/value algebra, done per user; unchanged entries cancel exactly and are never
 * touched, so sums do not drift. Events that change no fact (a second page view on the same day —
 * most events) cost one binary search.
 *
 * Distinct counts over windows ("users active in the week") are exact because each user is one
 * contribution of 1 per window, whatever the number of its events. Counts over instants ("customers
 * with a purchase in the 90 days before d", rolling 7/30-day actives, dormancy) are difference
 * arrays over days: a user contributes +1 where its covered interval starts and −1 where it ends.
 *
 * Tracks: track 0 holds all of a user's events and feeds the `(*,*)` and `(channel,*)` rows; one
 * track per platform holds that platform's events and feeds `(*,platform)`.
 *
 * Aggregates live in a cell table keyed by (window, cell grain, dimension): plain sums, so
 * partitions (disjoint users) and checkpoints merge by addition. Rates are derived when a row is
 * read (`value`). Windows older than `retentionDays` are final: written once more and dropped from
 * memory; per-user facts older than they can matter are trimmed.
 */

const DAY = 86_400_000;

// ---------------------------------------------------------------------------------------------
// Cell grains and fields. A contribution key is ((window * 8 + cellGrain) * 16 + field); a cell key
// is ((window * 8 + cellGrain) * DIM_SPAN + dim). Both are exact integers in a double.

const CG_DAY = 0;
const CG_WEEK = 1;
const CG_MONTH = 2;
/** Difference arrays over local days (window = day). */
const CG_COVER = 3;
/** Cohort cells: 4 + kind * 2 + (grain − 1); window = cohort * AGE_SPAN + age. */
const CG_COHORT = 4;
const AGE_SPAN = 1 << 14;
const NF = 16;
const DIM_SPAN = 4096;
/** Dimension values beyond this many share one overflow dimension (hostile streams stay bounded). */
const MAX_DIMS = DIM_SPAN - 2;

// Window cell fields.
const F_ACTIVE = 0;
const F_PURCHASERS = 1;
const F_REPEATERS = 2;
const F_ORDERS = 3;
const F_REVENUE = 4;
const F_NEW = 5;
const F_SIGNUPS = 6;
const F_FIRST_PURCHASERS = 7;
const F_FPC = 8;
const F_REVISIT = 9;
const F_RETAINED = 10;
const F_FUN_FP = 11;
const F_FUN_REVISIT = 12;
const F_FUN_REPEAT = 13;
const F_SPEND = 14;
const F_COST_EVENTS = 15;
// Coverage fields (difference arrays).
const C_ACT7 = 0;
const C_ACT30 = 1;
const C_CUST = 2;
const C_DORM30 = 3;
const C_DORM60 = 4;
const NC = 5;
// Cohort fields.
const K_SIZE = 0;
const K_ACTIVE = 1;
const K_PURCHASERS = 2;
const K_REVENUE = 3;

const CELL_PREFIX = 'k/';
const META_KEY = 'm/kpi';

export interface KpiOptions {
  readonly timeZone: string;
  /** N of first_purchase_conversion (days, default 7). */
  readonly firstPurchaseDays: number;
  /** R of customers_at (local days, default 90). */
  readonly activeCustomerDays: number;
  /** Windows whose last day is this many days before the watermark's day are final (default 400). */
  readonly retentionDays: number;
}

function winOf(g: number, day: number): number {
  return g === CG_DAY ? day : g === CG_WEEK ? Math.floor((day + 3) / 7) : monthOfDay(day);
}
function firstDayOf(g: number, w: number): number {
  return g === CG_DAY ? w : g === CG_WEEK ? w * 7 - 3 : monthFirstDay(w);
}
function lastDayOf(g: number, w: number): number {
  return g === CG_DAY ? w : g === CG_WEEK ? w * 7 + 3 : monthFirstDay(w + 1) - 1;
}

// ---------------------------------------------------------------------------------------------
// Per-user facts

/** One user's facts over one track (all events, or one platform's). NaN = never. */
export class KpiTrack {
  /** '' = all events (track 0); else the platform. */
  readonly platform: string;
  firstTs = Number.NaN;
  /** Channel of the first activity; min (ts, channel) decides ties. Only track 0 uses it. */
  firstChannel = '';
  signupTs = Number.NaN;
  firstPurchaseTs = Number.NaN;
  /** Purchases ever (not trimmed). */
  purchases = 0;
  /** [day, purchases, net revenue] triples in ascending day order: one per active local day. */
  days: number[] = [];

  constructor(platform: string) {
    this.platform = platform;
  }
}

export class KpiUser {
  /** Track 0 = all events; then one per platform, in platform order. */
  readonly tracks: KpiTrack[] = [new KpiTrack('')];
}

/** Index of the triple for `day`, or −(insertion index) − 1. */
function findDay(days: readonly number[], day: number): number {
  let lo = 0;
  let hi = days.length / 3 - 1;
  while (lo <= hi) {
    const mid = (lo + hi) >> 1;
    const d = days[mid * 3]!;
    if (d < day) lo = mid + 1;
    else if (d > day) hi = mid - 1;
    else return mid * 3;
  }
  return -(lo * 3) - 1;
}

function mergeTrack(into: KpiTrack, from: KpiTrack): void {
  if (!Number.isNaN(from.firstTs) && (Number.isNaN(into.firstTs) || from.firstTs < into.firstTs || (from.firstTs === into.firstTs && from.firstChannel < into.firstChannel))) {
    into.firstTs = from.firstTs;
    into.firstChannel = from.firstChannel;
  }
  if (!Number.isNaN(from.signupTs) && !(into.signupTs <= from.signupTs)) into.signupTs = from.signupTs;
  if (!Number.isNaN(from.firstPurchaseTs) && !(into.firstPurchaseTs <= from.firstPurchaseTs)) into.firstPurchaseTs = from.firstPurchaseTs;
  into.purchases += from.purchases;
  const a = into.days;
  const b = from.days;
  const out: number[] = [];
  let i = 0;
  let j = 0;
  while (i < a.length || j < b.length) {
    if (j >= b.length || (i < a.length && a[i]! < b[j]!)) {
      out.push(a[i]!, a[i + 1]!, a[i + 2]!);
      i += 3;
    } else if (i >= a.length || b[j]! < a[i]!) {
      out.push(b[j]!, b[j + 1]!, b[j + 2]!);
      j += 3;
    } else {
      out.push(a[i]!, a[i + 1]! + b[j + 1]!, a[i + 2]! + b[j + 2]!);
      i += 3;
      j += 3;
    }
  }
  into.days = out;
}

function trackOf(u: KpiUser, platform: string): KpiTrack {
  const ts = u.tracks;
  for (let k = 1; k < ts.length; k++) if (ts[k]!.platform === platform) return ts[k]!;
  const t = new KpiTrack(platform);
  let at = ts.length;
  while (at > 1 && ts[at - 1]!.platform > platform) at--;
  ts.splice(at, 0, t);
  return t;
}

export const kpiSlot: StateSlot<KpiUser> = {
  id: 2,
  create: () => new KpiUser(),
  encode(u, w: BinWriter) {
    w.uint(u.tracks.length);
    for (const t of u.tracks) {
      w.str(t.platform).optUint(t.firstTs).str(t.firstChannel).optUint(t.signupTs).optUint(t.firstPurchaseTs).uint(t.purchases);
      const d = t.days;
      w.uint(d.length / 3);
      let prev = 0;
      for (let k = 0; k < d.length; k += 3) {
        // Day deltas as varints (days are ≥ 0 for the accepted time range); the flag bit says
        // whether a revenue double follows, so plain activity days cost 2–3 bytes.
        w.uint(d[k]! - prev);
        prev = d[k]!;
        const rev = d[k + 2]!;
        w.uint(d[k + 1]! * 2 + (rev !== 0 ? 1 : 0));
        if (rev !== 0) w.f64(rev);
      }
    }
  },
  decode(r: BinReader) {
    const u = new KpiUser();
    const n = r.uint();
    u.tracks.length = 0;
    for (let i = 0; i < n; i++) {
      const t = new KpiTrack(r.str());
      t.firstTs = r.optUint();
      t.firstChannel = r.str();
      t.signupTs = r.optUint();
      t.firstPurchaseTs = r.optUint();
      t.purchases = r.uint();
      const nd = r.uint();
      const d = new Array<number>(nd * 3);
      let prev = 0;
      for (let k = 0; k < nd; k++) {
        prev += r.uint();
        const pf = r.uint();
        d[k * 3] = prev;
        d[k * 3 + 1] = Math.floor(pf / 2);
        d[k * 3 + 2] = pf % 2 === 1 ? r.f64() : 0;
      }
      t.days = d;
      u.tracks.push(t);
    }
    if (u.tracks.length === 0) u.tracks.push(new KpiTrack(''));
    return u;
  },
  merge(into, from) {
    for (const ft of from.tracks) mergeTrack(ft.platform === '' ? into.tracks[0]! : trackOf(into, ft.platform), ft);
  },
};

// ---------------------------------------------------------------------------------------------
// Scratch netting table: contribution key → signed sum, reset by generation stamp (no clearing).

class Netting {
  private mask: number;
  private keys: Float64Array;
  private vals: Float64Array;
  private stamp: Int32Array;
  private gen = 1;
  /** Slots used in this generation, in first-use order. */
  used: Int32Array;
  n = 0;

  constructor(capacity = 1 << 12) {
    this.mask = capacity - 1;
    this.keys = new Float64Array(capacity);
    this.vals = new Float64Array(capacity);
    this.stamp = new Int32Array(capacity);
    this.used = new Int32Array(capacity);
  }

  reset(): void {
    this.gen++;
    this.n = 0;
  }

  add(key: number, v: number): void {
    if (this.n * 2 >= this.mask) this.grow();
    const hi = Math.floor(key / 4_294_967_296);
    let h = Math.imul((key >>> 0) ^ Math.imul(hi, 0x9e3779b1), 0x85ebca6b);
    h = (h ^ (h >>> 15)) & this.mask;
    for (;;) {
      if (this.stamp[h] !== this.gen) {
        this.stamp[h] = this.gen;
        this.keys[h] = key;
        this.vals[h] = v;
        this.used[this.n++] = h;
        return;
      }
      if (this.keys[h] === key) {
        this.vals[h]! += v;
        return;
      }
      h = (h + 1) & this.mask;
    }
  }

  key(slot: number): number {
    return this.keys[slot]!;
  }

  val(slot: number): number {
    return this.vals[slot]!;
  }

  private grow(): void {
    const keys = this.keys;
    const vals = this.vals;
    const used = this.used.subarray(0, this.n);
    const cap = (this.mask + 1) * 2;
    this.mask = cap - 1;
    this.keys = new Float64Array(cap);
    this.vals = new Float64Array(cap);
    this.stamp = new Int32Array(cap);
    this.used = new Int32Array(cap);
    const n = this.n;
    this.n = 0;
    for (let i = 0; i < n; i++) this.add(keys[used[i]!]!, vals[used[i]!]!);
  }
}

// ---------------------------------------------------------------------------------------------
// Aggregate cells

const FLAG_DIRTY = 1;
const FLAG_CORRECTED = 2;

/**
 * Aggregate cells: one row of NF doubles per cell key, in growable typed arrays. The index is an
 * open-addressing hash over the double keys (most exceed the small-integer range, and a Map would
 * box every one of them on the hot path).
 */
class CellTable {
  private hmask = (1 << 12) - 1;
  private hkeys = new Float64Array(1 << 12);
  /** Cell index + 1 per hash slot; 0 = empty. */
  private hidx = new Int32Array(1 << 12);
  keys = new Float64Array(1024);
  vals = new Float64Array(1024 * NF);
  flags = new Uint8Array(1024);
  dirty: number[] = [];
  count = 0;

  private hash(key: number): number {
    const hi = Math.floor(key / 4_294_967_296);
    const h = Math.imul((key >>> 0) ^ Math.imul(hi, 0x9e3779b1), 0x85ebca6b);
    return (h ^ (h >>> 15)) & this.hmask;
  }

  slot(key: number): number {
    let h = this.hash(key);
    for (;;) {
      const at = this.hidx[h]!;
      if (at === 0) break;
      if (this.hkeys[h] === key) return at - 1;
      h = (h + 1) & this.hmask;
    }
    const i = this.count++;
    if (i >= this.keys.length) this.grow();
    this.keys[i] = key;
    this.hkeys[h] = key;
    this.hidx[h] = i + 1;
    if (this.count * 2 > this.hmask) this.rehash(this.hmask + 1 < this.count * 4 ? (this.hmask + 1) * 2 : this.hmask + 1);
    return i;
  }

  find(key: number): number {
    let h = this.hash(key);
    for (;;) {
      const at = this.hidx[h]!;
      if (at === 0) return -1;
      if (this.hkeys[h] === key) return at - 1;
      h = (h + 1) & this.hmask;
    }
  }

  private rehash(cap: number): void {
    this.hmask = cap - 1;
    this.hkeys = new Float64Array(cap);
    this.hidx = new Int32Array(cap);
    for (let i = 0; i < this.count; i++) {
      const key = this.keys[i]!;
      let h = this.hash(key);
      while (this.hidx[h] !== 0) h = (h + 1) & this.hmask;
      this.hkeys[h] = key;
      this.hidx[h] = i + 1;
    }
  }

  add(key: number, f: number, v: number, corrected: boolean): void {
    const i = this.slot(key);
    this.vals[i * NF + f]! += v;
    const fl = this.flags[i]!;
    if ((fl & FLAG_DIRTY) === 0) this.dirty.push(i);
    this.flags[i] = fl | FLAG_DIRTY | (corrected ? FLAG_CORRECTED : 0);
  }

  private grow(): void {
    const cap = this.keys.length * 2;
    const k = new Float64Array(cap);
    k.set(this.keys);
    const v = new Float64Array(cap * NF);
    v.set(this.vals);
    const f = new Uint8Array(cap);
    f.set(this.flags);
    this.keys = k;
    this.vals = v;
    this.flags = f;
  }

  /** Drops the cells `drop` says to (they are durable and final); keeps the rest in place order. */
  compact(drop: (key: number, index: number) => boolean): number {
    let w = 0;
    for (let i = 0; i < this.count; i++) {
      const key = this.keys[i]!;
      if (drop(key, i)) continue;
      if (w !== i) {
        this.keys[w] = key;
        this.vals.copyWithin(w * NF, i * NF, i * NF + NF);
        this.flags[w] = this.flags[i]!;
      }
      w++;
    }
    const dropped = this.count - w;
    this.vals.fill(0, w * NF, this.count * NF);
    this.flags.fill(0, w, this.count);
    this.count = w;
    this.rehash(this.hmask + 1);
    this.dirty = [];
    for (let i = 0; i < w; i++) if ((this.flags[i]! & FLAG_DIRTY) !== 0) this.dirty.push(i);
    return dropped;
  }
}

function cellWin(key: number): number {
  return Math.floor(key / (8 * DIM_SPAN));
}
function cellGrain(key: number): number {
  return Math.floor(key / DIM_SPAN) - cellWin(key) * 8;
}
function cellDim(key: number): number {
  return key - Math.floor(key / DIM_SPAN) * DIM_SPAN;
}

/** Last local day a cell's values can change for: below the horizon it is final. */
function cellLastDay(key: number): number {
  const g = cellGrain(key);
  const w = cellWin(key);
  if (g <= CG_MONTH) return lastDayOf(g, w);
  if (g === CG_COVER) return w;
  const cohort = Math.floor(w / AGE_SPAN);
  const grain = (g - CG_COHORT) % 2 === 0 ? CG_WEEK : CG_MONTH;
  return lastDayOf(grain, cohort + (w - cohort * AGE_SPAN));
}

function encodeCell(vals: Float64Array, at: number, w: BinWriter): boolean {
  let mask = 0;
  for (let f = 0; f < NF; f++) if (vals[at + f] !== 0) mask |= 1 << f;
  if (mask === 0) return false;
  w.reset().uint(mask);
  for (let f = 0; f < NF; f++) if ((mask & (1 << f)) !== 0) w.f64(vals[at + f]!);
  return true;
}

function decodeCell(buf: Uint8Array, out: Float64Array, at: number): void {
  const r = new BinReader(buf);
  const mask = r.uint();
  for (let f = 0; f < NF; f++) out[at + f] = (mask & (1 << f)) !== 0 ? r.f64() : 0;
}

const cellStoreKey = (key: number): string => CELL_PREFIX + key.toString(36);

// ---------------------------------------------------------------------------------------------
// Read side: cells from the store overlaid with memory, difference arrays as prefix sums.

/** A consistent view of every cell (final ones from the store, live ones from memory). */
class CellView {
  readonly vals = new Map<number, Float64Array>();
  /** Per dim: sums of coverage entries no longer listed (compacted), or null to list them all. */
  private readonly base: ReadonlyMap<number, Float64Array> | null;

  constructor(base: ReadonlyMap<number, Float64Array> | null) {
    this.base = base;
  }
  /** Per dim: sorted coverage days and running sums (NC per day). */
  private readonly cover = new Map<number, { days: number[]; sums: Float64Array }>();

  finish(): void {
    const perDim = new Map<number, { day: number; v: Float64Array }[]>();
    for (const [key, v] of this.vals) {
      if (cellGrain(key) !== CG_COVER) continue;
      const dim = cellDim(key);
      let list = perDim.get(dim);
      if (list === undefined) perDim.set(dim, (list = []));
      list.push({ day: cellWin(key), v });
    }
    for (const [dim, list] of perDim) {
      list.sort((a, b) => a.day - b.day);
      const sums = new Float64Array(list.length * NC);
      const acc = Float64Array.from(this.base?.get(dim) ?? new Float64Array(NC));
      list.forEach((e, i) => {
        for (let f = 0; f < NC; f++) sums[i * NC + f] = acc[f]! += e.v[f]!;
      });
      this.cover.set(dim, { days: list.map((e) => e.day), sums });
    }
  }

  /** Value of difference array `f` of `dim` at local day `day` (sum of entries at days ≤ day). */
  coverage(dim: number, f: number, day: number): number {
    const c = this.cover.get(dim);
    if (c === undefined) return this.base?.get(dim)?.[f] ?? 0;
    let lo = 0;
    let hi = c.days.length - 1;
    let at = -1;
    while (lo <= hi) {
      const mid = (lo + hi) >> 1;
      if (c.days[mid]! <= day) {
        at = mid;
        lo = mid + 1;
      } else hi = mid - 1;
    }
    return at < 0 ? (this.base?.get(dim)?.[f] ?? 0) : c.sums[at * NC + f]!;
  }
}

const ratio = (n: number, d: number): number | null => (d === 0 ? null : n / d);

// ---------------------------------------------------------------------------------------------

/** One engine's KPI cells for merging: see {@link KpiOperator.partials}. */
export interface KpiPartials {
  /** Dimension id → 'c:<channel>' | 'p:<platform>' ('*' at 0): the names the cell keys' dims stand for. */
  readonly dims: readonly string[];
  readonly cells: ReadonlyMap<number, Float64Array>;
  readonly watermark: number;
}

export class KpiOperator implements Operator {
  readonly name = 'kpi';
  readonly slot = kpiSlot as StateSlot<unknown>;
  readonly timerKinds: readonly string[] = [];
  /** Index of this operator's slot in UserRecord.slots; set by the runtime. */
  slotIndex = -1;

  private readonly opts: KpiOptions;
  private readonly cal: Calendar;
  private readonly fpMs: number;
  private readonly R: number;
  private readonly net = new Netting();
  private readonly cells = new CellTable();
  /**
   * Per dim: the sum of the coverage (difference-array) cells compacted away. Their days are below
   * the horizon, so every live window's running sums start from here.
   */
  private readonly coverBase = new Map<number, Float64Array>();
  private readonly writer = new BinWriter(256);
  /**
   * Per dim, since the last checkpoint: [first day whose running (coverage) count changed, last
   * day that had closed when one did] — the closed rows to re-emit as corrections.
   */
  private readonly coverFrom = new Map<number, [number, number]>();
  private store: KvStore | null = null;
  /** dimension id → 'c:<channel>' | 'p:<platform>'; 0 = all. */
  private readonly dimNames: string[] = ['*'];
  private readonly dimIds = new Map<string, number>([['*', 0]]);
  private dimsDirty = false;
  /** Watermark's local day (−∞ before any event) and the first day whose windows are live. */
  private wmDay = Number.NEGATIVE_INFINITY;
  private horizon = Number.NEGATIVE_INFINITY;
  private compactedAt = Number.NEGATIVE_INFINITY;
  private watermark = Number.NEGATIVE_INFINITY;
  /** Cells changed after their window had closed (late data, stitching): corrections recorded. */
  corrections = 0;
  /** Fact changes processed (each one a −old/+new contribution pass). */
  updates = 0;
  cellsCompacted = 0;

  constructor(opts: KpiOptions) {
    this.opts = opts;
    this.cal = new Calendar(opts.timeZone);
    this.fpMs = opts.firstPurchaseDays * DAY;
    this.R = opts.activeCustomerDays;
  }

  async open(store: KvStore, ctx: OperatorContext): Promise<void> {
    this.store = store;
    const meta = await store.get(META_KEY);
    if (meta !== undefined) {
      const m = JSON.parse(new TextDecoder().decode(meta)) as { dims: string[] };
      for (let i = 1; i < m.dims.length; i++) {
        this.dimNames.push(m.dims[i]!);
        this.dimIds.set(m.dims[i]!, i);
      }
    }
    this.observeWatermark(ctx.watermark);
    const horizon = this.horizon;
    for await (const entries of store.scan({ gte: CELL_PREFIX, lt: 'k0' }, 1024)) {
      for (const e of entries) {
        const key = parseInt(e.key.slice(CELL_PREFIX.length), 36);
        // Final windows are read from the store by queries only.
        if (cellLastDay(key) < horizon) {
          if (cellGrain(key) === CG_COVER) {
            const v = new Float64Array(NF);
            decodeCell(e.value, v, 0);
            this.addCoverBase(cellDim(key), v, 0);
          }
          continue;
        }
        const i = this.cells.slot(key);
        decodeCell(e.value, this.cells.vals, i * NF);
      }
    }
    this.compactedAt = horizon;
  }

  private addCoverBase(dim: number, vals: Float64Array, at: number): void {
    let b = this.coverBase.get(dim);
    if (b === undefined) this.coverBase.set(dim, (b = new Float64Array(NC)));
    for (let f = 0; f < NC; f++) b[f]! += vals[at + f]!;
  }

  /**
   * The watermark the windows are read at (maturing flags, dormancy, the compaction horizon). The
   * engine calls it whenever its watermark moves, so queries after an idle advance (end of input,
   * `--as-of`, a scale-out hint) see it without waiting for the next batch.
   */
  observeWatermark(wm: number): void {
    if (wm === this.watermark) return;
    this.watermark = wm;
    if (!Number.isFinite(wm)) return;
    this.wmDay = this.cal.dayOf(wm);
    this.horizon = this.wmDay - this.opts.retentionDays;
  }

  private dim(kind: 'c' | 'p', value: string): number {
    const name = kind + ':' + value;
    let id = this.dimIds.get(name);
    if (id === undefined) {
      if (this.dimNames.length >= MAX_DIMS && value !== '(other)') return this.dim(kind, '(other)');
      id = this.dimNames.length;
      this.dimNames.push(name);
      this.dimIds.set(name, id);
      this.dimsDirty = true;
    }
    return id;
  }

  processBatch(b: EventColumns, recs: readonly (UserRecord | null)[], start: number, end: number, ctx: OperatorContext): void {
    this.observeWatermark(ctx.watermark);
    const slot = this.slotIndex;
    const { status, typeCode, ts, channel, platform, amount } = b;
    for (let i = start; i < end; i++) {
      if (status[i] !== 0) continue;
      const code = typeCode[i]!;
      const rec = recs[i];
      const a = amount[i]!;
      const amt = Number.isFinite(a) ? a : 0;
      if (rec == null) {
        if (code === EventType.cost) this.addSpend(ts[i]!, channel[i]!, platform[i]!, amt);
        continue;
      }
      if (!isActivity(code)) continue;
      const u = rec.slots[slot] as KpiUser;
      const t = ts[i]!;
      const day = this.cal.dayOf(t);
      this.update(u, u.tracks[0]!, code, t, day, channel[i]!, amt);
      const p = platform[i]!;
      if (p !== '') this.update(u, trackOf(u, p), code, t, day, '', amt);
    }
  }

  /** Applies one event to one track: −old and +new contributions when a fact changes. */
  private update(u: KpiUser, tr: KpiTrack, code: number, ts: number, day: number, ch: string, amt: number): void {
    const idx = findDay(tr.days, day);
    const firstChanges = Number.isNaN(tr.firstTs) || ts < tr.firstTs || (ts === tr.firstTs && ch < tr.firstChannel);
    const changes = idx < 0 || firstChanges || code === EventType.purchase ||
      (code === EventType.sign_up && !(tr.signupTs <= ts)) || (code === EventType.refund && amt !== 0);
    if (!changes) return;
    this.updates++;
    const n = tr.days.length;
    if (idx === -n - 1 && n > 0 && !firstChanges && code !== EventType.purchase && !(code === EventType.refund && amt !== 0) &&
      !(code === EventType.sign_up && !(tr.signupTs <= ts))) {
      this.appendDay(tr, day);
      return;
    }
    const all = tr.platform === '';
    const chBefore = tr.firstChannel;
    const net = this.net;
    net.reset();
    // A track that has never been seen has no contribution to retract.
    if (n > 0 || !Number.isNaN(tr.firstTs)) this.contribute(tr, -1);
    // Mutate the facts.
    let at = idx;
    if (at < 0) {
      at = -at - 1;
      tr.days.splice(at, 0, day, 0, 0);
    }
    if (firstChanges) {
      tr.firstTs = ts;
      tr.firstChannel = ch;
    }
    if (code === EventType.sign_up) {
      if (!(tr.signupTs <= ts)) tr.signupTs = ts;
    } else if (code === EventType.purchase) {
      tr.days[at + 1]!++;
      tr.days[at + 2]! += amt;
      tr.purchases++;
      if (!(tr.firstPurchaseTs <= ts)) tr.firstPurchaseTs = ts;
    } else if (code === EventType.refund) {
      tr.days[at + 2]! -= amt;
    }
    this.trim(tr);
    if (all && tr.firstChannel !== chBefore) {
      // The first touch moved to another channel: the whole contribution moves rows.
      this.flush(0, chBefore === '' ? -1 : this.dim('c', chBefore));
      net.reset();
      this.contribute(tr, 1);
      this.flush(0, tr.firstChannel === '' ? -1 : this.dim('c', tr.firstChannel));
    } else {
      this.contribute(tr, 1);
      this.flushTrack(tr);
    }
  }

  /**
   * The most common change, done as its delta: plain activity on a day after every day the track
   * has. `contribute` over the old and new facts would give exactly these entries (the oracle
   * tests hold both paths to the SQL definitions): the new windows become active (and so do their
   * cohort cells), the revisit flag may flip, and the rolling-activity runs extend or start.
   */
  private appendDay(tr: KpiTrack, day: number): void {
    const net = this.net;
    net.reset();
    const d = tr.days;
    const last = d[d.length - 3]!;
    const H = this.horizon;
    const cal = this.cal;
    const fDay = cal.dayOf(tr.firstTs);
    const sDay = Number.isNaN(tr.signupTs) ? Number.NaN : cal.dayOf(tr.signupTs);
    const pDay = Number.isNaN(tr.firstPurchaseTs) ? Number.NaN : cal.dayOf(tr.firstPurchaseTs);
    for (let g = CG_DAY; g <= CG_MONTH; g++) {
      const w = winOf(g, day);
      if (w === winOf(g, last) || lastDayOf(g, w) < H) continue;
      net.add((w * 8 + g) * NF + F_ACTIVE, 1);
      if (g !== CG_DAY) {
        const cg = CG_COHORT + (g - 1);
        const fa = winOf(g, fDay);
        if (w >= fa) this.cohortEntry(cg, fa, w - fa, 0, 0, 1);
        if (!Number.isNaN(sDay)) {
          const su = winOf(g, sDay);
          if (w >= su) this.cohortEntry(cg + 2, su, w - su, 0, 0, 1);
        }
      }
    }
    if (!Number.isNaN(pDay) && day > pDay && day <= pDay + 3) {
      let k = findDay(d, pDay + 1);
      if (k < 0) k = -k - 1;
      const had = k < d.length && d[k]! <= pDay + 3;
      if (!had) {
        for (let g = CG_DAY; g <= CG_MONTH; g++) {
          const w = winOf(g, pDay);
          if (lastDayOf(g, w) >= H) net.add((w * 8 + g) * NF + F_REVISIT, 1);
          if (!Number.isNaN(sDay)) {
            const su = winOf(g, sDay);
            if (lastDayOf(g, su) >= H) {
              net.add((su * 8 + g) * NF + F_FUN_REVISIT, 1);
              if (tr.purchases >= 2) net.add((su * 8 + g) * NF + F_FUN_REPEAT, 1);
            }
          }
        }
      }
    }
    this.extendRun(last, day, 7, C_ACT7);
    this.extendRun(last, day, 30, C_ACT30);
    d.push(day, 0, 0);
    this.flushTrack(tr);
  }

  /** A covered run [.., last + span) meets a new day after it: extend it, or start a new run. */
  private extendRun(last: number, day: number, span: number, f: number): void {
    if (day <= last + span) this.coverEdge(last + span, f, 1);
    else this.coverEdge(day, f, 1);
    this.coverEdge(day + span, f, -1);
  }

  private flushTrack(tr: KpiTrack): void {
    if (tr.platform === '') this.flush(0, tr.firstChannel === '' ? -1 : this.dim('c', tr.firstChannel));
    else this.flush(this.dim('p', tr.platform), -1);
  }

  /** Applies the netting table's non-zero entries to the cells of dims `d1` and `d2` (−1 = none). */
  private flush(d1: number, d2: number): void {
    const net = this.net;
    const cells = this.cells;
    for (let k = 0; k < net.n; k++) {
      const s = net.used[k]!;
      const v = net.val(s);
      if (v === 0) continue;
      const key = net.key(s);
      const base = Math.floor(key / NF);
      const f = key - base * NF;
      const w = Math.floor(base / 8);
      const g = base - w * 8;
      const corrected = g <= CG_MONTH && lastDayOf(g, w) < this.wmDay;
      if (corrected) this.corrections++;
      else if (g === CG_COVER) {
        // A running count changed from day w on: the rows that read it and have closed are
        // corrected too (customers_end of the window ending the day before reads the count at w).
        const from = f === C_CUST ? w - 1 : w;
        if (from < this.wmDay) {
          this.coverChanged(d1, from);
          if (d2 >= 0) this.coverChanged(d2, from);
        }
      }
      cells.add(base * DIM_SPAN + d1, f, v, corrected);
      if (d2 >= 0) cells.add(base * DIM_SPAN + d2, f, v, corrected);
    }
  }

  private coverChanged(dim: number, day: number): void {
    const r = this.coverFrom.get(dim);
    if (r === undefined) this.coverFrom.set(dim, [day, this.wmDay - 1]);
    else {
      if (day < r[0]) r[0] = day;
      if (this.wmDay - 1 > r[1]) r[1] = this.wmDay - 1;
    }
  }

  /**
   * Generates a track's whole contribution (live windows only) into the netting table with `sign`.
   * This function IS the definition of docs/KPIS.md on the engine side; everything else is
   * bookkeeping.
   */
  private contribute(tr: KpiTrack, sign: number): void {
    const net = this.net;
    const H = this.horizon;
    const d = tr.days;
    const nd = d.length / 3;
    const cal = this.cal;
    const fDay = Number.isNaN(tr.firstTs) ? Number.NaN : cal.dayOf(tr.firstTs);
    const sDay = Number.isNaN(tr.signupTs) ? Number.NaN : cal.dayOf(tr.signupTs);
    const pDay = Number.isNaN(tr.firstPurchaseTs) ? Number.NaN : cal.dayOf(tr.firstPurchaseTs);
    let revisit = false;
    if (!Number.isNaN(pDay)) {
      let k = findDay(d, pDay + 1);
      if (k < 0) k = -k - 1;
      revisit = k < d.length && d[k]! <= pDay + 3;
    }
    const fpc = !Number.isNaN(tr.signupTs) && tr.firstPurchaseTs >= tr.signupTs && tr.firstPurchaseTs < tr.signupTs + this.fpMs;
    const R = this.R;
    for (let g = CG_DAY; g <= CG_MONTH; g++) {
      const faCohort = Number.isNaN(fDay) ? Number.NaN : winOf(g, fDay);
      const suCohort = Number.isNaN(sDay) ? Number.NaN : winOf(g, sDay);
      // Windows with activity.
      let k = 0;
      while (k < nd) {
        const w = winOf(g, d[k * 3]!);
        let pc = 0;
        let rev = 0;
        let k2 = k;
        while (k2 < nd && winOf(g, d[k2 * 3]!) === w) {
          pc += d[k2 * 3 + 1]!;
          rev += d[k2 * 3 + 2]!;
          k2++;
        }
        if (lastDayOf(g, w) >= H) {
          const base = (w * 8 + g) * NF;
          net.add(base + F_ACTIVE, sign);
          if (pc > 0) {
            net.add(base + F_PURCHASERS, sign);
            net.add(base + F_ORDERS, sign * pc);
            if (pc > 1) net.add(base + F_REPEATERS, sign);
            const from = firstDayOf(g, w) - R;
            for (let j = k - 1; j >= 0 && d[j * 3]! >= from; j--) {
              if (d[j * 3 + 1]! > 0) {
                net.add(base + F_RETAINED, sign);
                break;
              }
            }
          }
          if (rev !== 0) net.add(base + F_REVENUE, sign * rev);
          if (g !== CG_DAY) {
            const cg = CG_COHORT + (g - 1);
            if (w >= faCohort) this.cohortEntry(cg, faCohort, w - faCohort, pc, rev, sign);
            if (w >= suCohort) this.cohortEntry(cg + 2, suCohort, w - suCohort, pc, rev, sign);
          }
        }
        k = k2;
      }
      // Once-per-user facts.
      if (!Number.isNaN(fDay) && lastDayOf(g, faCohort) >= H) {
        net.add((faCohort * 8 + g) * NF + F_NEW, sign);
        if (g !== CG_DAY) net.add(((faCohort * AGE_SPAN) * 8 + CG_COHORT + g - 1) * NF + K_SIZE, sign);
      }
      if (!Number.isNaN(sDay) && lastDayOf(g, suCohort) >= H) {
        const base = (suCohort * 8 + g) * NF;
        net.add(base + F_SIGNUPS, sign);
        if (fpc) net.add(base + F_FPC, sign);
        if (!Number.isNaN(pDay)) {
          net.add(base + F_FUN_FP, sign);
          if (revisit) {
            net.add(base + F_FUN_REVISIT, sign);
            if (tr.purchases >= 2) net.add(base + F_FUN_REPEAT, sign);
          }
        }
        if (g !== CG_DAY) net.add(((suCohort * AGE_SPAN) * 8 + CG_COHORT + 2 + g - 1) * NF + K_SIZE, sign);
      }
      if (!Number.isNaN(pDay)) {
        const w = winOf(g, pDay);
        if (lastDayOf(g, w) >= H) {
          const base = (w * 8 + g) * NF;
          net.add(base + F_FIRST_PURCHASERS, sign);
          if (revisit) net.add(base + F_REVISIT, sign);
        }
      }
    }
    // Difference arrays over days.
    this.coverRuns(d, false, 0, 7, C_ACT7, sign);
    this.coverRuns(d, false, 0, 30, C_ACT30, sign);
    this.coverRuns(d, true, 1, R, C_CUST, sign);
    this.dormancy(d, 30, C_DORM30, sign);
    this.dormancy(d, 60, C_DORM60, sign);
  }

  private cohortEntry(cg: number, cohort: number, age: number, pc: number, rev: number, sign: number): void {
    const base = ((cohort * AGE_SPAN + age) * 8 + cg) * NF;
    this.net.add(base + K_ACTIVE, sign);
    if (pc > 0) this.net.add(base + K_PURCHASERS, sign);
    if (rev !== 0) this.net.add(base + K_REVENUE, sign * rev);
  }

  private coverEdge(day: number, f: number, v: number): void {
    if (day >= this.horizon) this.net.add((day * 8 + CG_COVER) * NF + f, v);
  }

  /** Each (purchase) day x covers [x + offset, x + offset + span); overlapping runs merge. */
  private coverRuns(d: readonly number[], purchasesOnly: boolean, offset: number, span: number, f: number, sign: number): void {
    let s = Number.NaN;
    let e = 0;
    for (let k = 0; k < d.length; k += 3) {
      if (purchasesOnly && d[k + 1] === 0) continue;
      const a = d[k]! + offset;
      if (!Number.isNaN(s) && a <= e) {
        e = a + span;
      } else {
        if (!Number.isNaN(s)) {
          this.coverEdge(s, f, sign);
          this.coverEdge(e, f, -sign);
        }
        s = a;
        e = a + span;
      }
    }
    if (!Number.isNaN(s)) {
      this.coverEdge(s, f, sign);
      this.coverEdge(e, f, -sign);
    }
  }

  /** Dormant-k days: from purchase day p + k up to the day before the next purchase. */
  private dormancy(d: readonly number[], k: number, f: number, sign: number): void {
    let prev = Number.NaN;
    for (let j = 0; j < d.length; j += 3) {
      if (d[j + 1] === 0) continue;
      const p = d[j]!;
      if (!Number.isNaN(prev) && prev + k < p) {
        this.coverEdge(prev + k, f, sign);
        this.coverEdge(p, f, -sign);
      }
      prev = p;
    }
    if (!Number.isNaN(prev)) this.coverEdge(prev + k, f, sign);
  }

  /**
   * Forgets day entries too old to reach a live window: older than the horizon minus the longest
   * look-back (R days of customers, a month of windows, slack). The last purchase day among them is
   * kept: the dormancy run that starts there may end in a live window.
   */
  private trim(tr: KpiTrack): void {
    const d = tr.days;
    const cut = this.horizon - this.R - 40;
    if (d.length === 0 || !(d[0]! < cut)) return;
    let n = 0;
    let lastPurchase = -1;
    while (n < d.length && d[n]! < cut) {
      if (d[n + 1]! > 0) lastPurchase = n;
      n += 3;
    }
    if (lastPurchase >= 0) {
      d.splice(0, lastPurchase);
      d.splice(3, n - lastPurchase - 3);
    } else d.splice(0, n);
  }

  private addSpend(ts: number, ch: string, pl: string, amt: number): void {
    const day = this.cal.dayOf(ts);
    const d2 = ch === '' ? -1 : this.dim('c', ch);
    const d3 = pl === '' ? -1 : this.dim('p', pl);
    for (let g = CG_DAY; g <= CG_MONTH; g++) {
      const w = winOf(g, day);
      if (lastDayOf(g, w) < this.horizon) continue;
      const corrected = lastDayOf(g, w) < this.wmDay;
      if (corrected) this.corrections++;
      const base = (w * 8 + g) * DIM_SPAN;
      for (const dm of [0, d2, d3]) {
        if (dm < 0) continue;
        this.cells.add(base + dm, F_SPEND, amt, corrected);
        this.cells.add(base + dm, F_COST_EVENTS, 1, corrected);
      }
    }
  }

  /** Identity stitch, before the profiles fold: both contributions leave the cells. */
  beforeMerge(into: UserRecord, from: UserRecord): void {
    for (const rec of [into, from]) {
      for (const tr of (rec.slots[this.slotIndex] as KpiUser).tracks) {
        this.net.reset();
        this.contribute(tr, -1);
        this.flushTrack(tr);
      }
    }
  }

  /** …and after it, the merged profile's contribution enters them. */
  afterMerge(into: UserRecord): void {
    for (const tr of (into.slots[this.slotIndex] as KpiUser).tracks) {
      this.trim(tr);
      this.net.reset();
      this.contribute(tr, 1);
      this.flushTrack(tr);
    }
  }

  onTimer(): void {}

  /** Prepare: writes dirty cells and emits corrections; memory is cleaned in `committed`. */
  snapshot(ops: WriteOp[], ctx: OperatorContext): void {
    const cells = this.cells;
    let corrected: number[] | null = null;
    for (const i of cells.dirty) {
      const key = cells.keys[i]!;
      if ((cells.flags[i]! & FLAG_CORRECTED) !== 0) (corrected ??= []).push(key);
      ops.push(encodeCell(cells.vals, i * NF, this.writer)
        ? { type: 'put', key: cellStoreKey(key), value: this.writer.take() }
        : { type: 'del', key: cellStoreKey(key) });
    }
    // Closed rows whose customers / dormant / rolling-active figures moved with a running count.
    for (const [dim, [from, until]] of this.coverFrom) {
      for (let g = CG_DAY; g <= CG_MONTH; g++) {
        for (let w = winOf(g, Math.max(from, this.horizon)); lastDayOf(g, w) <= until; w++) {
          const key = (w * 8 + g) * DIM_SPAN + dim;
          if (cells.find(key) >= 0) (corrected ??= []).push(key);
        }
      }
    }
    if (corrected !== null) this.emitCorrections(corrected, ctx);
    if (this.dimsDirty) ops.push({ type: 'put', key: META_KEY, value: new TextEncoder().encode(JSON.stringify({ dims: this.dimNames })) });
  }

  /** Commit: the cells are durable; windows that crossed the retention horizon are final now and leave memory. */
  committed(): void {
    const cells = this.cells;
    for (const i of cells.dirty) cells.flags[i] = 0;
    cells.dirty = [];
    this.coverFrom.clear();
    this.dimsDirty = false;
    if (this.horizon > this.compactedAt) {
      const h = this.horizon;
      const vals = cells.vals;
      this.cellsCompacted += cells.compact((key, i) => {
        if (cellLastDay(key) >= h) return false;
        if (cellGrain(key) === CG_COVER) this.addCoverBase(cellDim(key), vals, i * NF);
        return true;
      });
      this.compactedAt = h;
    }
  }

  /** A KpiUpdate (correction) per KPI of every row whose closed window changed. */
  private emitCorrections(keys: readonly number[], ctx: OperatorContext): void {
    const view = this.memoryView();
    const seen = new Set<number>();
    for (const key of keys) {
      const g = cellGrain(key);
      if (g > CG_MONTH || seen.has(key)) continue;
      seen.add(key);
      const row = this.row(view, g, cellWin(key), cellDim(key));
      if (row === null) continue;
      for (const f of KPI_FIELDS) {
        const v = row[f];
        ctx.emit(Topic.kpiUpdate, crmstream.v1.KpiUpdate.encode({
          kpi: f, grain: row.grain, window: row.window, channel: row.channel, platform: row.platform,
          value: typeof v === 'number' ? v : v === true ? 1 : 0, is_null: v === null, correction: true,
          watermark: Number.isFinite(this.watermark) ? this.watermark : 0,
        }).finish());
      }
    }
  }

  private memoryView(): CellView {
    const view = new CellView(this.coverBase);
    const c = this.cells;
    for (let i = 0; i < c.count; i++) view.vals.set(c.keys[i]!, c.vals.subarray(i * NF, i * NF + NF));
    view.finish();
    return view;
  }

  /**
   * This engine's additive KPI state: every cell (final and live) with the dimension names it is
   * keyed by, and the watermark. Cells are sums of per-user contributions, so the partials of
   * engines over disjoint users add up to the cells of one engine over all of them
   * ({@link KpiOperator.merged}).
   */
  async partials(): Promise<KpiPartials> {
    const view = await this.fullView();
    return { dims: [...this.dimNames], cells: view.vals, watermark: this.watermark };
  }

  /**
   * A read-only operator over the sum of several engines' partials (users disjoint: e.g. the
   * partitions of a topic keyed by canonical id). Dimensions are matched by name; the watermark
   * is the furthest one (each partition's rows are complete up to its own). Its kpis / funnel /
   * cohorts equal those of one engine that had processed every partition's events.
   */
  static merged(opts: KpiOptions, parts: readonly KpiPartials[]): KpiOperator {
    const op = new KpiOperator(opts);
    let wm = Number.NEGATIVE_INFINITY;
    for (const p of parts) {
      const remap = p.dims.map((name, i) => (i === 0 ? 0 : op.dim(name[0] as 'c' | 'p', name.slice(2))));
      for (const [key, v] of p.cells) {
        const i = op.cells.slot(key - cellDim(key) + remap[cellDim(key)]!);
        const vals = op.cells.vals;
        for (let f = 0; f < NF; f++) vals[i * NF + f]! += v[f]!;
      }
      if (p.watermark > wm) wm = p.watermark;
    }
    op.observeWatermark(wm);
    return op;
  }

  /** Every cell: final ones from the store, overlaid with memory (which is newer). */
  private async fullView(): Promise<CellView> {
    const view = new CellView(null);
    if (this.store !== null) {
      for await (const entries of this.store.scan({ gte: CELL_PREFIX, lt: 'k0' }, 1024)) {
        for (const e of entries) {
          const v = new Float64Array(NF);
          decodeCell(e.value, v, 0);
          view.vals.set(parseInt(e.key.slice(CELL_PREFIX.length), 36), v);
        }
      }
    }
    const c = this.cells;
    for (let i = 0; i < c.count; i++) view.vals.set(c.keys[i]!, c.vals.slice(i * NF, i * NF + NF));
    view.finish();
    return view;
  }

  private dimPair(dim: number): [string, string] {
    if (dim === 0) return ['*', '*'];
    const n = this.dimNames[dim]!;
    return n.startsWith('c:') ? [n.slice(2), '*'] : ['*', n.slice(2)];
  }

  private label(g: number, w: number): string {
    return g === CG_DAY ? this.cal.dayLabel(w) : g === CG_WEEK ? this.cal.weekLabel(w) : this.cal.monthLabel(w);
  }

  /** The `value` step: one output row from the cells (null if the row does not exist). */
  private row(view: CellView, g: number, w: number, dim: number): KpiRow | null {
    const v = view.vals.get((w * 8 + g) * DIM_SPAN + dim);
    if (v === undefined || (v[F_ACTIVE] === 0 && v[F_COST_EVENTS] === 0)) return null;
    const [channel, platform] = this.dimPair(dim);
    const first = firstDayOf(g, w);
    const last = lastDayOf(g, w);
    const active = v[F_ACTIVE]!;
    const purchasers = v[F_PURCHASERS]!;
    const revenue = v[F_REVENUE]!;
    const newUsers = v[F_NEW]!;
    const signups = v[F_SIGNUPS]!;
    const fp = v[F_FIRST_PURCHASERS]!;
    const cStart = view.coverage(dim, C_CUST, first);
    const cEnd = view.coverage(dim, C_CUST, last + 1);
    const retention = ratio(v[F_RETAINED]!, cStart);
    const churn = retention === null ? null : 1 - retention;
    const arppu = ratio(revenue, purchasers);
    const spend = v[F_SPEND]!;
    const cac = ratio(spend, fp);
    const e = Math.min(last, this.wmDay);
    let clv: number | null = null;
    if (g === CG_MONTH && arppu !== null && churn !== null && churn !== 0 && cac !== null) clv = arppu * (1 / churn) - cac;
    return {
      grain: GRAIN_NAMES[g]!, window: this.label(g, w), channel, platform,
      active_users: active, new_users: newUsers, signups, signup_conversion: ratio(signups, newUsers),
      purchasers, orders: v[F_ORDERS]!, revenue, pcr: ratio(purchasers, active), arppu, arpu: ratio(revenue, active),
      repeat_purchase_rate: ratio(v[F_REPEATERS]!, purchasers), first_purchasers: fp,
      first_purchase_conversion: ratio(v[F_FPC]!, signups), revisit_rate_d1_3: ratio(v[F_REVISIT]!, fp),
      customers_start: cStart, customers_end: cEnd, crr: ratio(cEnd - fp, cStart), cohort_retention: retention,
      churn_rate: churn, spend, cac, clv,
      first_purchase_maturing: this.cal.dayStart(last + 1) + this.fpMs > this.watermark,
      dormant_30: view.coverage(dim, C_DORM30, e), dormant_60: view.coverage(dim, C_DORM60, e),
      active_users_7d: g === CG_DAY ? view.coverage(dim, C_ACT7, w) : null,
      active_users_30d: g === CG_DAY ? view.coverage(dim, C_ACT30, w) : null,
    };
  }

  /** KPI rows of one grain, sorted by window, then channel, then platform. */
  async kpis(grain: KpiGrain): Promise<KpiRow[]> {
    const g = GRAIN_NAMES.indexOf(grain);
    const view = await this.fullView();
    const out: { w: number; row: KpiRow }[] = [];
    for (const key of view.vals.keys()) {
      if (cellGrain(key) !== g) continue;
      const row = this.row(view, g, cellWin(key), cellDim(key));
      if (row !== null) out.push({ w: cellWin(key), row });
    }
    out.sort((a, b) => a.w - b.w || cmp(a.row.channel, b.row.channel) || cmp(a.row.platform, b.row.platform));
    return out.map((o) => o.row);
  }

  /** Journey funnel rows per sign-up cohort window. */
  async funnel(grain: KpiGrain): Promise<FunnelRow[]> {
    const g = GRAIN_NAMES.indexOf(grain);
    const view = await this.fullView();
    const out: { w: number; row: FunnelRow }[] = [];
    for (const [key, v] of view.vals) {
      if (cellGrain(key) !== g) continue;
      const visit = v[F_NEW]!;
      const signUp = v[F_SIGNUPS]!;
      if (visit === 0 && signUp === 0) continue;
      const w = cellWin(key);
      const [channel, platform] = this.dimPair(cellDim(key));
      const fp = v[F_FUN_FP]!;
      const rv = v[F_FUN_REVISIT]!;
      const rp = v[F_FUN_REPEAT]!;
      out.push({ w, row: {
        grain, cohort: this.label(g, w), channel, platform, visit, sign_up: signUp, first_purchase: fp, revisit: rv,
        repeat_purchase: rp, sign_up_rate: ratio(signUp, visit), first_purchase_rate: ratio(fp, signUp),
        revisit_rate: ratio(rv, fp), repeat_purchase_rate: ratio(rp, rv),
      } });
    }
    out.sort((a, b) => a.w - b.w || cmp(a.row.channel, b.row.channel) || cmp(a.row.platform, b.row.platform));
    return out.map((o) => o.row);
  }

  /** Cohort matrix rows: every cohort with members × ages 0 .. the watermark's window. */
  async cohorts(grain: CohortGrain, kind: CohortKind): Promise<CohortRow[]> {
    const g = grain === 'week' ? CG_WEEK : CG_MONTH;
    const cg = CG_COHORT + (kind === 'signup' ? 2 : 0) + g - 1;
    if (!Number.isFinite(this.wmDay)) return [];
    const wmWin = winOf(g, this.wmDay);
    const view = await this.fullView();
    const out: { c: number; row: CohortRow }[] = [];
    for (const [key, v] of view.vals) {
      if (cellGrain(key) !== cg) continue;
      const cw = cellWin(key);
      const cohort = Math.floor(cw / AGE_SPAN);
      if (cw !== cohort * AGE_SPAN || v[K_SIZE] === 0) continue;
      const dim = cellDim(key);
      const size = v[K_SIZE]!;
      const [channel, platform] = this.dimPair(dim);
      const label = this.label(g, cohort);
      let cum = 0;
      for (let age = 0; cohort + age <= wmWin; age++) {
        const a = view.vals.get(((cohort * AGE_SPAN + age) * 8 + cg) * DIM_SPAN + dim);
        const revenue = a?.[K_REVENUE] ?? 0;
        cum += revenue;
        out.push({ c: cohort, row: {
          grain, cohort: label, size, age, active: a?.[K_ACTIVE] ?? 0, purchasers: a?.[K_PURCHASERS] ?? 0, revenue,
          kind, channel, platform, cum_revenue_per_user: cum / size,
        } });
      }
    }
    out.sort((a, b) => a.c - b.c || cmp(a.row.channel, b.row.channel) || cmp(a.row.platform, b.row.platform) || a.row.age - b.row.age);
    return out.map((o) => o.row);
  }

  /** Cells held in memory (live windows); bounded by the retention setting. */
  get liveCells(): number {
    return this.cells.count;
  }

  async close(): Promise<void> {
    this.store = null;
  }
}

const GRAIN_NAMES: readonly KpiGrain[] = ['day', 'week', 'month'];

function cmp(a: string, b: string): number {
  return a < b ? -1 : a > b ? 1 : 0;
}
