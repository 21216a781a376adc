import { crmstream } from '../api/proto/gen/crmstream.js';
import type { EventColumns } from '../engine/batch.js';
import { Calendar } from '../engine/calendar.js';
import { EventType, isActivity } from '../engine/event-types.js';
import { Topic } from '../engine/outbox.js';
import type { BinReader, BinWriter } from '../state/codec.js';
import type { KvStore, WriteOp } from '../state/store.js';
import type { Operator, OperatorContext, StateSlot, UserRecord } from './operator.js';
import { durationMs, type Condition, type SegmentDef } from './segment-rules.js';

/**
 * Real-time segments (SPEC §5, docs/SEGMENTS.md).
 *
 * Rules are compiled once into evaluator trees: `holds(user, t)` and `next(user, t)` — the
 * earliest instant after t at which the value can change if no new event arrives (an event the
 * watermark has not reached, a window edge, a cart's time + 1 day, a month boundary). A user is
 * re-evaluated when an event of a type a segment depends on arrives (only those segments, at the
 * watermark) and when its one durable timer — at the minimum `next` over its segments — fires (at
 * that exact instant). No scans: time passing costs one timer per user that can change.
 *
 * Per-user state is what the rules need, nothing more: per referenced event type, the event times
 * (and amounts, for sums) inside the longest window any rule looks back over plus the allowed
 * lateness, and a compacted prefix (count, sum, latest) of older ones — which keeps every rule
 * exact: windows only reach back from instants at or after the watermark. Attributes keep their
 * values from the latest one at or before the watermark on.
 *
 * Every membership change is a SegmentChange record in the outbox, in the same checkpoint as the
 * state that produced it.
 */

const NEVER = Number.POSITIVE_INFINITY;

// ---------------------------------------------------------------------------------------------
// Per-user state

/** Times (and amounts) of one event type, sorted; older ones folded into the prefix. */
export class TypeHist {
  ts: number[] = [];
  amt: number[] = [];
  preCount = 0;
  preSum = 0;
  preMax = Number.NaN;
}

/** Values of one attribute over time, sorted by (ts, value). */
export class AttrHist {
  ts: number[] = [];
  val: string[] = [];
}

export class SegUser {
  /** Per tracked event type (program order); null until the user has one. */
  hist: (TypeHist | null)[];
  /** Per tracked attribute (program order). */
  attrs: (AttrHist | null)[];
  /** First sign_up time (NaN: none). */
  signupTs = Number.NaN;
  /** First event of any kind: before it the user has no history and is in no segment. */
  firstTs = Number.NaN;
  /** Per segment: 0 = not a member, k = member in tier k − 1 (1 for untiered). */
  member: number[];
  /** Per segment: when the current membership began (NaN when out). */
  since: number[];
  /** Per segment: the next instant its value can change (Infinity: only an event can). */
  next: number[];
  /** The timer registered for this user (NaN: none). */
  timerTs = Number.NaN;

  constructor(nTypes: number, nAttrs: number, nSegs: number) {
    this.hist = new Array<TypeHist | null>(nTypes).fill(null);
    this.attrs = new Array<AttrHist | null>(nAttrs).fill(null);
    this.member = new Array<number>(nSegs).fill(0);
    this.since = new Array<number>(nSegs).fill(Number.NaN);
    this.next = new Array<number>(nSegs).fill(NEVER);
  }
}

function upperBound(a: readonly number[], t: number): number {
  let lo = 0;
  let hi = a.length;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (a[mid]! <= t) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

function insertSorted(h: TypeHist, ts: number, amt: number): void {
  const at = upperBound(h.ts, ts);
  h.ts.splice(at, 0, ts);
  h.amt.splice(at, 0, amt);
}

/** Count and sum of entries with lo < ts ≤ hi (lo = −Infinity: the prefix included). */
function countIn(h: TypeHist | null, lo: number, hi: number): number {
  if (h === null) return 0;
  const end = upperBound(h.ts, hi);
  if (lo === Number.NEGATIVE_INFINITY) return h.preCount + end;
  return end - upperBound(h.ts, lo);
}
function sumIn(h: TypeHist | null, lo: number, hi: number): number {
  if (h === null) return 0;
  const end = upperBound(h.ts, hi);
  let s = 0;
  let k = 0;
  if (lo === Number.NEGATIVE_INFINITY) s = h.preSum;
  else k = upperBound(h.ts, lo);
  for (; k < end; k++) s += h.amt[k]!;
  return s;
}
/** Latest time ≤ t (NaN: none). */
function latestLE(h: TypeHist | null, t: number): number {
  if (h === null) return Number.NaN;
  const end = upperBound(h.ts, t);
  return end > 0 ? h.ts[end - 1]! : h.preMax <= t ? h.preMax : Number.NaN;
}
/** Earliest time > t (Infinity: none). */
function nextAfter(ts: readonly number[] | undefined, t: number): number {
  if (ts === undefined) return NEVER;
  const at = upperBound(ts, t);
  return at < ts.length ? ts[at]! : NEVER;
}
/** Earliest instant > t at which an entry inside (t − d, t] leaves the window. */
function nextExit(h: TypeHist | null, t: number, d: number): number {
  if (h === null) return NEVER;
  const at = upperBound(h.ts, t - d);
  return at < h.ts.length && h.ts[at]! <= t ? h.ts[at]! + d : NEVER;
}
function attrAt(a: AttrHist | null, t: number): string | undefined {
  if (a === null) return undefined;
  const end = upperBound(a.ts, t);
  return end > 0 ? a.val[end - 1] : undefined;
}

// ---------------------------------------------------------------------------------------------
// Compilation

interface Evaluator {
  holds(u: SegUser, t: number): boolean;
  next(u: SegUser, t: number): number;
}

/** What evaluation of one user at one instant shares between segments (inSegment). */
interface Scratch {
  tier: Int32Array;
  next: Float64Array;
}

export interface CompiledSegment {
  readonly id: string;
  readonly tiers: readonly string[];
  readonly evals: readonly Evaluator[];
  readonly def: SegmentDef;
}

/** Rules compiled against one tracked-type / attribute layout. */
export class SegmentProgram {
  readonly segments: CompiledSegment[] = [];
  /** Tracked event types, their index and how far back their times are kept (ms; 0 = prefix only). */
  readonly types = new Map<string, { index: number; keepMs: number }>();
  /** Tracked attributes: 'platform', 'prop:<key>'. */
  readonly attrs = new Map<string, number>();
  /** Event type → the segments to re-evaluate (dependents included), sorted. '*' = every event. */
  private readonly deps = new Map<string, Set<number>>();
  readonly anyEvent = new Set<number>();
  /** Per segment: the later segments whose rules read it (inSegment), directly. */
  private readonly readers: number[][] = [];
  readonly activityDeps = new Set<number>();
  readonly birthdayMonth: boolean;
  private readonly cal: Calendar;
  readonly scratch: Scratch;
  private usesBirthday = false;

  constructor(defs: readonly SegmentDef[], timeZone: string) {
    this.cal = new Calendar(timeZone);
    const byId = new Map<string, number>();
    defs.forEach((d, s) => {
      const deps = new Set<string>();
      const tiers = d.tiers ?? [{ name: '', rule: d.rule! }];
      const refs = new Set<number>();
      const evals = tiers.map((t) => this.compile(t.rule, deps, refs, byId));
      this.segments.push({ id: d.id, tiers: tiers.map((t) => t.name), evals, def: d });
      for (const dep of deps) {
        if (dep === '*') this.anyEvent.add(s);
        else if (dep === '@activity') this.activityDeps.add(s);
        else this.dep(dep).add(s);
      }
      this.readers.push([]);
      for (const r of refs) this.readers[r]!.push(s);
      // A segment that reads another is re-evaluated with it.
      for (const r of refs) {
        if (this.anyEvent.has(r)) this.anyEvent.add(s);
        if (this.activityDeps.has(r)) this.activityDeps.add(s);
        for (const set of this.deps.values()) if (set.has(r)) set.add(s);
      }
      byId.set(d.id, s);
    });
    this.birthdayMonth = this.usesBirthday;
    this.scratch = { tier: new Int32Array(this.segments.length), next: new Float64Array(this.segments.length) };
  }

  /** `segs` plus every segment that reads one of them, directly or through others; ascending. */
  withReaders(segs: readonly number[]): number[] {
    const all = new Set(segs);
    // Readers are always later segments, so one ascending pass closes the set.
    for (let s = 0; s < this.readers.length; s++) if (all.has(s)) for (const r of this.readers[s]!) all.add(r);
    return [...all].sort((a, b) => a - b);
  }

  private dep(type: string): Set<number> {
    let s = this.deps.get(type);
    if (s === undefined) this.deps.set(type, (s = new Set()));
    return s;
  }

  /** Segments an event of this type can change (ascending), given whether it is activity. */
  affected(type: string, activity: boolean): number[] {
    const out = new Set<number>(this.anyEvent);
    for (const s of this.deps.get(type) ?? []) out.add(s);
    if (activity) for (const s of this.activityDeps) out.add(s);
    return [...out].sort((a, b) => a - b);
  }

  private typeIndex(type: string, keepMs: number): number {
    const t = this.types.get(type);
    if (t !== undefined) {
      t.keepMs = Math.max(t.keepMs, keepMs);
      return t.index;
    }
    const index = this.types.size;
    this.types.set(type, { index, keepMs });
    return index;
  }

  private attrIndex(name: string): number {
    let i = this.attrs.get(name);
    if (i === undefined) this.attrs.set(name, (i = this.attrs.size));
    return i;
  }

  private compile(c: Condition, deps: Set<string>, refs: Set<number>, byId: ReadonlyMap<string, number>): Evaluator {
    if ('did' in c || 'didNot' in c || 'sum' in c) {
      const type = 'did' in c ? c.did : 'didNot' in c ? c.didNot : c.sum;
      const d = c.within === undefined ? NEVER : durationMs(c.within);
      const k = this.typeIndex(type, d === NEVER ? 0 : d);
      deps.add(type);
      const lo = (t: number): number => (d === NEVER ? Number.NEGATIVE_INFINITY : t - d);
      const next = (u: SegUser, t: number): number => {
        const h = u.hist[k]!;
        return Math.min(nextAfter(h?.ts, t), d === NEVER ? NEVER : nextExit(h, t, d));
      };
      if ('sum' in c) {
        const min = c.atLeast ?? Number.NEGATIVE_INFINITY;
        const below = c.below ?? NEVER;
        return { holds: (u, t) => { const s = sumIn(u.hist[k]!, lo(t), t); return s >= min && s < below; }, next };
      }
      const min = 'didNot' in c ? 0 : (c.atLeast ?? 1);
      const max = 'didNot' in c ? 0 : (c.atMost ?? NEVER);
      return { holds: (u, t) => { const n = countIn(u.hist[k]!, lo(t), t); return n >= min && n <= max; }, next };
    }
    if ('sequence' in c) {
      const a = this.typeIndex(c.sequence.did, 0);
      const b = this.typeIndex(c.sequence.thenNot, 0);
      const d = durationMs(c.sequence.for);
      deps.add(c.sequence.did);
      deps.add(c.sequence.thenNot);
      // Is there a B in [a, t]? Its prefix latest, or its times from a on.
      const bSince = (u: SegUser, at: number, t: number): boolean => {
        const h = u.hist[b]!;
        if (h === null) return false;
        if (h.preMax >= at && h.preMax <= t) return true;
        const i = upperBound(h.ts, at - 1);
        return i < h.ts.length && h.ts[i]! <= t;
      };
      return {
        holds: (u, t) => {
          const at = latestLE(u.hist[a]!, t);
          return !Number.isNaN(at) && !bSince(u, at, t) && t - at >= d;
        },
        next: (u, t) => {
          let n = Math.min(nextAfter(u.hist[a]?.ts, t), nextAfter(u.hist[b]?.ts, t));
          const at = latestLE(u.hist[a]!, t);
          if (!Number.isNaN(at) && !bSince(u, at, t) && at + d > t) n = Math.min(n, at + d);
          return n;
        },
      };
    }
    if ('signedUp' in c) {
      const within = c.signedUp.within === undefined ? NEVER : durationMs(c.signedUp.within);
      const ago = c.signedUp.atLeastAgo === undefined ? 0 : durationMs(c.signedUp.atLeastAgo);
      deps.add('sign_up');
      return {
        holds: (u, t) => u.signupTs <= t && t - u.signupTs < within && t - u.signupTs >= ago,
        next: (u, t) => {
          const s = u.signupTs;
          if (Number.isNaN(s)) return NEVER;
          if (s > t) return s;
          let n = NEVER;
          if (within !== NEVER && s + within > t) n = s + within;
          if (s + ago > t) n = Math.min(n, s + ago);
          return n;
        },
      };
    }
    if ('attr' in c) {
      const k = this.attrIndex(c.attr);
      const values = new Set(c.in);
      deps.add(c.attr === 'platform' ? '@activity' : '*');
      return {
        holds: (u, t) => { const v = attrAt(u.attrs[k]!, t); return v !== undefined && values.has(v); },
        next: (u, t) => nextAfter(u.attrs[k]?.ts, t),
      };
    }
    if ('birthdayMonth' in c) {
      const k = this.attrIndex('prop:birthday');
      this.usesBirthday = true;
      deps.add('*');
      const cal = this.cal;
      return {
        holds: (u, t) => {
          const v = attrAt(u.attrs[k]!, t);
          const m = v === undefined ? null : /^(?:\d{4}-)?(\d{2})-\d{2}$/.exec(v);
          if (m === null || !Number.isFinite(t)) return false;
          return Number(m[1]) - 1 === ((cal.monthOfDay(cal.dayOf(t)) % 12) + 12) % 12;
        },
        next: (u, t) => {
          if (!Number.isFinite(t)) return nextAfter(u.attrs[k]?.ts, t);
          return Math.min(nextAfter(u.attrs[k]?.ts, t), cal.dayStart(cal.monthFirstDay(cal.monthOfDay(cal.dayOf(t)) + 1)));
        },
      };
    }
    if ('inSegment' in c) {
      const s = byId.get(c.inSegment)!;
      refs.add(s);
      const tier = c.tier === undefined ? -1 : this.segments[s]!.tiers.indexOf(c.tier);
      const scratch = (): Scratch => this.scratch;
      return {
        holds: () => (tier < 0 ? scratch().tier[s]! >= 0 : scratch().tier[s] === tier),
        next: () => scratch().next[s]!,
      };
    }
    if ('all' in c || 'any' in c) {
      const parts = ('all' in c ? c.all : c.any).map((x) => this.compile(x, deps, refs, byId));
      const all = 'all' in c;
      return {
        holds: all ? (u, t) => parts.every((p) => p.holds(u, t)) : (u, t) => parts.some((p) => p.holds(u, t)),
        next: (u, t) => parts.reduce((m, p) => Math.min(m, p.next(u, t)), NEVER),
      };
    }
    const inner = this.compile(c.not, deps, refs, byId);
    return { holds: (u, t) => !inner.holds(u, t), next: (u, t) => inner.next(u, t) };
  }
}

// ---------------------------------------------------------------------------------------------

export const SEG_TIMER = 'seg';
const CHANGE_KIND = ['enter', 'exit', 'tier_change'] as const;

export interface SegmentOptions {
  readonly timeZone: string;
  /** Allowed lateness (ms): how far behind the watermark late events can land. */
  readonly allowedLatenessMs: number;
}

/** The segment operator. Definitions are fixed per engine instance (a reload builds a new program). */
export class SegmentOperator implements Operator {
  readonly name = 'segments';
  readonly slot: StateSlot<unknown>;
  readonly timerKinds: readonly string[] = [SEG_TIMER];
  slotIndex = -1;
  readonly program: SegmentProgram;
  private readonly opts: SegmentOptions;
  private readonly typeIndexByName: ReadonlyMap<string, number>;
  /** Cache: event type name → affected segments, for activity / non-activity. */
  private readonly affectedCache = new Map<string, number[]>();
  private readonly platformAttr: number;
  /** Per tracked type: how far back (ms) before the lateness floor its times stay listed. */
  private readonly keepMs: number[];
  private readonly propAttrs: readonly [string, number][];
  private readonly allSegments: readonly number[];
  private readonly sizes: SizeLog;
  /** Membership changes since start (metrics). */
  changes = 0;
  evaluations = 0;

  constructor(defs: readonly SegmentDef[], opts: SegmentOptions) {
    this.program = new SegmentProgram(defs, opts.timeZone);
    this.opts = opts;
    const p = this.program;
    this.typeIndexByName = new Map([...p.types].map(([name, v]) => [name, v.index]));
    this.platformAttr = p.attrs.get('platform') ?? -1;
    this.allSegments = p.segments.map((_, s) => s);
    this.sizes = new SizeLog(new Calendar(opts.timeZone), p.segments);
    this.keepMs = [];
    for (const v of p.types.values()) this.keepMs[v.index] = v.keepMs;
    this.propAttrs = [...p.attrs].filter(([n]) => n.startsWith('prop:')).map(([n, i]) => [n.slice(5), i]);
    this.slot = makeSlot(p.types.size, p.attrs.size, p.segments.length);
  }

  async open(store: KvStore, _ctx: OperatorContext): Promise<void> {
    await this.sizes.open(store);
  }

  private affected(type: string, activity: boolean): number[] {
    const key = (activity ? '1' : '0') + type;
    let a = this.affectedCache.get(key);
    if (a === undefined) {
      if (this.affectedCache.size > 4096) this.affectedCache.clear(); // custom type names are bounded upstream; this is a second guard
      this.affectedCache.set(key, (a = this.program.affected(type, activity)));
    }
    return a;
  }

  processBatch(b: EventColumns, recs: readonly (UserRecord | null)[], start: number, end: number, ctx: OperatorContext): void {
    const slot = this.slotIndex;
    const { status, typeCode, type, ts, amount, platform, props } = b;
    const types = this.typeIndexByName;
    const keepFloor = ctx.watermark - this.opts.allowedLatenessMs;
    for (let i = start; i < end; i++) {
      const rec = recs[i];
      if (status[i] !== 0 || rec == null) continue;
      const u = rec.slots[slot] as SegUser;
      const name = type[i]!;
      const code = typeCode[i]!;
      const t = ts[i]!;
      const activity = isActivity(code);
      // Fold the event into the facts the rules read.
      const k = types.get(name);
      if (k !== undefined) {
        let h = u.hist[k]!;
        if (h === null) u.hist[k] = h = new TypeHist();
        const a = amount[i]!;
        insertSorted(h, t, Number.isFinite(a) ? a : 0);
        this.compactHist(h, k, keepFloor);
      }
      if (code === EventType.sign_up && !(u.signupTs <= t)) u.signupTs = t;
      // A new start of the user's history: every segment is looked at (rules that read no event
      // type, like `{"all": []}`, hold from the first event on).
      const first = !(u.firstTs <= t);
      if (first) u.firstTs = t;
      if (activity && this.platformAttr >= 0) this.setAttr(u, this.platformAttr, t, platform[i]!, keepFloor);
      const pr = props[i];
      if (pr != null) for (const [key, ai] of this.propAttrs) { const v = pr[key]; if (v !== undefined) this.setAttr(u, ai, t, v, keepFloor); }
      const segs = first ? this.allSegments : this.affected(name, activity);
      if (segs.length > 0) this.evaluate(rec, u, segs, ctx.watermark, `event:${name}`, ctx);
    }
  }

  /** Keeps times newer than the longest window (+ lateness) as a list; folds older ones into the prefix. */
  private compactHist(h: TypeHist, k: number, keepFloor: number): void {
    if (!Number.isFinite(keepFloor)) return;
    const keep = this.keepMs[k]!;
    const cut = keepFloor - keep;
    let n = 0;
    while (n < h.ts.length && h.ts[n]! < cut) {
      h.preCount++;
      h.preSum += h.amt[n]!;
      if (!(h.preMax >= h.ts[n]!)) h.preMax = h.ts[n]!;
      n++;
    }
    if (n > 0) {
      h.ts.splice(0, n);
      h.amt.splice(0, n);
    }
  }

  /** Inserts (ts, value) in (ts, value) order; drops values older than the latest one at or before the lateness floor. */
  private setAttr(u: SegUser, k: number, t: number, v: string, keepFloor: number): void {
    let a = u.attrs[k]!;
    if (a === null) u.attrs[k] = a = new AttrHist();
    let at = upperBound(a.ts, t);
    while (at > 0 && a.ts[at - 1] === t && a.val[at - 1]! > v) at--;
    a.ts.splice(at, 0, t);
    a.val.splice(at, 0, v);
    if (Number.isFinite(keepFloor)) {
      const last = upperBound(a.ts, keepFloor) - 1;
      if (last > 0) {
        a.ts.splice(0, last);
        a.val.splice(0, last);
      }
    }
  }

  /**
   * Evaluates segments `segs` (ascending) for one user at instant t, writes a SegmentChange for
   * every change, and moves the user's timer to the earliest next change.
   */
  private evaluate(rec: UserRecord, u: SegUser, segs: readonly number[], t: number, cause: string, ctx: OperatorContext): void {
    const p = this.program;
    const scratch = p.scratch;
    // Segments not re-evaluated keep their current tier for inSegment readers.
    for (let s = 0; s < p.segments.length; s++) {
      scratch.tier[s] = u.member[s]! - 1;
      scratch.next[s] = u.next[s]!;
    }
    // Membership is over the events at or before t: a user whose history starts later is in no
    // segment yet, and is looked at again when it starts.
    const known = u.firstTs <= t;
    for (const s of segs) {
      const sg = p.segments[s]!;
      let tier = -1;
      let next = NEVER;
      if (known) {
        for (let k = 0; k < sg.evals.length; k++) {
          const e = sg.evals[k]!;
          next = Math.min(next, e.next(u, t));
          if (tier < 0 && e.holds(u, t)) tier = k;
        }
      } else if (!Number.isNaN(u.firstTs)) next = u.firstTs;
      this.evaluations++;
      scratch.tier[s] = tier;
      scratch.next[s] = next;
      u.next[s] = next;
      const before = u.member[s]! - 1;
      if (tier !== before) {
        const kind = before < 0 ? 0 : tier < 0 ? 1 : 2;
        u.member[s] = tier + 1;
        if (kind !== 2) u.since[s] = tier < 0 ? Number.NaN : t;
        this.changes++;
        this.sizes.change(s, before, tier, t);
        ctx.emit(Topic.segmentChange, crmstream.v1.SegmentChange.encode({
          user_id: rec.id, segment_id: sg.id, change: CHANGE_KIND[kind], enter: kind === 0, event_ts: Number.isFinite(t) ? t : 0, cause,
          tier: tier < 0 ? (before < 0 ? '' : sg.tiers[before]!) : sg.tiers[tier]!,
          previous_tier: before < 0 ? '' : sg.tiers[before]!,
        }).finish());
      }
    }
    let due = NEVER;
    for (let s = 0; s < u.next.length; s++) if (u.next[s]! < due) due = u.next[s]!;
    if (due !== u.timerTs && !(Number.isNaN(u.timerTs) && due === NEVER)) {
      if (!Number.isNaN(u.timerTs)) ctx.timers.cancel(rec.id, SEG_TIMER, u.timerTs);
      if (due !== NEVER) ctx.timers.register(rec.id, SEG_TIMER, due);
      u.timerTs = due === NEVER ? Number.NaN : due;
    }
  }

  onTimer(rec: UserRecord, _kind: string, ts: number, ctx: OperatorContext): void {
    const u = rec.slots[this.slotIndex] as SegUser;
    if (u.timerTs === ts) u.timerTs = Number.NaN; // fired: no longer registered
    const due: number[] = [];
    for (let s = 0; s < u.next.length; s++) if (u.next[s]! <= ts) due.push(s);
    // Dependents of a due segment are evaluated with it (inSegment).
    this.evaluate(rec, u, this.program.withReaders(due), ts, 'timer', ctx);
  }

  /** Identity stitch: after the fold, the member's segments are re-evaluated at the watermark. */
  afterMerge(into: UserRecord, ctx: OperatorContext): void {
    const u = into.slots[this.slotIndex] as SegUser;
    // ctx.watermark, not the one of the last batch: a stitch can come with a watermark move.
    this.evaluate(into, u, this.allSegments, ctx.watermark, 'merge', ctx);
  }

  beforeMerge(_into: UserRecord, from: UserRecord, ctx: OperatorContext): void {
    // The anonymous profile leaves every segment it was in (its timer is cancelled; the member's
    // evaluation after the fold decides the merged membership).
    const u = from.slots[this.slotIndex] as SegUser;
    for (let s = 0; s < u.member.length; s++) {
      if (u.member[s] === 0) continue;
      const sg = this.program.segments[s]!;
      ctx.emit(Topic.segmentChange, crmstream.v1.SegmentChange.encode({
        user_id: from.id, segment_id: sg.id, change: 'exit', enter: false, event_ts: Number.isFinite(ctx.watermark) ? ctx.watermark : 0, cause: 'merge',
        tier: sg.tiers[u.member[s]! - 1]!, previous_tier: sg.tiers[u.member[s]! - 1]!,
      }).finish());
      this.sizes.change(s, u.member[s]! - 1, -1, ctx.watermark);
      u.member[s] = 0;
      u.since[s] = Number.NaN;
      this.changes++;
    }
    if (!Number.isNaN(u.timerTs)) ctx.timers.cancel(from.id, SEG_TIMER, u.timerTs);
    u.timerTs = Number.NaN;
  }

  snapshot(ops: WriteOp[]): void {
    this.sizes.snapshot(ops);
  }

  async close(): Promise<void> {}

  /** Segment sizes per window (SPEC §5: segment sizes are KPIs per window). */
  sizeRows(grain: 'day' | 'week' | 'month', watermark: number): SegmentSizeRow[] {
    return this.sizes.rows(grain, watermark);
  }

  /** Segment ids in definition order. */
  get ids(): string[] {
    return this.program.segments.map((s) => s.id);
  }

  /** A user's memberships: segment id → { tier, since }. */
  membershipOf(rec: UserRecord): { segment: string; tier: string; since: number }[] {
    const u = rec.slots[this.slotIndex] as SegUser;
    const out: { segment: string; tier: string; since: number }[] = [];
    this.program.segments.forEach((sg, s) => {
      if (u.member[s]! > 0) out.push({ segment: sg.id, tier: sg.tiers[u.member[s]! - 1]!, since: u.since[s]! });
    });
    return out;
  }
}

/**
 * The per-user slot for a program's layout. Merging folds the anonymous profile's facts in (the
 * membership is then re-evaluated by afterMerge).
 */
function makeSlot(nTypes: number, nAttrs: number, nSegs: number): StateSlot<SegUser> {
  return {
    id: 3,
    create: () => new SegUser(nTypes, nAttrs, nSegs),
    encode(u, w: BinWriter) {
      w.uint(nTypes).uint(nAttrs).uint(nSegs);
      for (const h of u.hist) {
        if (h === null) {
          w.u8(0);
          continue;
        }
        w.u8(1).uint(h.preCount).f64(h.preSum).optUint(h.preMax).uint(h.ts.length);
        for (let i = 0; i < h.ts.length; i++) w.uint(h.ts[i]!).f64(h.amt[i]!);
      }
      for (const a of u.attrs) {
        if (a === null) {
          w.u8(0);
          continue;
        }
        w.u8(1).uint(a.ts.length);
        for (let i = 0; i < a.ts.length; i++) w.uint(a.ts[i]!).str(a.val[i]!);
      }
      w.optUint(u.signupTs).optUint(u.firstTs).optUint(u.timerTs);
      for (let s = 0; s < nSegs; s++) {
        w.uint(u.member[s]!).optUint(u.since[s]!);
        w.optUint(u.next[s] === NEVER ? Number.NaN : u.next[s]!);
      }
    },
    decode(r: BinReader) {
      const nt = r.uint();
      const na = r.uint();
      const ns = r.uint();
      const u = new SegUser(nTypes, nAttrs, nSegs);
      // A record written under another rule layout is read as empty: the reload path rebuilds it.
      if (nt !== nTypes || na !== nAttrs || ns !== nSegs) return u;
      for (let k = 0; k < nt; k++) {
        if (r.u8() === 0) continue;
        const h = new TypeHist();
        h.preCount = r.uint();
        h.preSum = r.f64();
        h.preMax = r.optUint();
        const n = r.uint();
        for (let i = 0; i < n; i++) {
          h.ts.push(r.uint());
          h.amt.push(r.f64());
        }
        u.hist[k] = h;
      }
      for (let k = 0; k < na; k++) {
        if (r.u8() === 0) continue;
        const a = new AttrHist();
        const n = r.uint();
        for (let i = 0; i < n; i++) {
          a.ts.push(r.uint());
          a.val.push(r.str());
        }
        u.attrs[k] = a;
      }
      u.signupTs = r.optUint();
      u.firstTs = r.optUint();
      u.timerTs = r.optUint();
      for (let s = 0; s < ns; s++) {
        u.member[s] = r.uint();
        u.since[s] = r.optUint();
        const nx = r.optUint();
        u.next[s] = Number.isNaN(nx) ? NEVER : nx;
      }
      return u;
    },
    merge(into, from) {
      for (let k = 0; k < nTypes; k++) {
        const f = from.hist[k]!;
        if (f === null) continue;
        let h = into.hist[k]!;
        if (h === null) into.hist[k] = h = new TypeHist();
        h.preCount += f.preCount;
        h.preSum += f.preSum;
        if (!Number.isNaN(f.preMax) && !(h.preMax >= f.preMax)) h.preMax = f.preMax;
        for (let i = 0; i < f.ts.length; i++) insertSorted(h, f.ts[i]!, f.amt[i]!);
      }
      for (let k = 0; k < nAttrs; k++) {
        const f = from.attrs[k]!;
        if (f === null) continue;
        let a = into.attrs[k]!;
        if (a === null) into.attrs[k] = a = new AttrHist();
        for (let i = 0; i < f.ts.length; i++) {
          let at = upperBound(a.ts, f.ts[i]!);
          while (at > 0 && a.ts[at - 1] === f.ts[i] && a.val[at - 1]! > f.val[i]!) at--;
          a.ts.splice(at, 0, f.ts[i]!);
          a.val.splice(at, 0, f.val[i]!);
        }
      }
      if (!Number.isNaN(from.signupTs) && !(into.signupTs <= from.signupTs)) into.signupTs = from.signupTs;
      if (!Number.isNaN(from.firstTs) && !(into.firstTs <= from.firstTs)) into.firstTs = from.firstTs;
    },
  };
}

// ---------------------------------------------------------------------------------------------
// Segment sizes

export interface SegmentSizeRow {
  grain: 'day' | 'week' | 'month';
  window: string;
  segment: string;
  /** '*' = all tiers (and the only row of an untiered segment). */
  tier: string;
  /** Members at the end of the window (at the watermark for the window it is in). */
  size: number;
  entered: number;
  exited: number;
}

const SIZE_PREFIX = 'g/';

/**
 * Entries and exits per (segment, tier, local day): sizes at any day end are running sums. Keyed
 * by segment id and tier name (not index), so a changed rule file keeps the history of the others.
 * Grows by one small entry per segment, tier and day with changes.
 */
class SizeLog {
  private readonly cal: Calendar;
  /** 'segment|tier|day' → [entered, exited]. */
  private readonly cells = new Map<string, [number, number]>();
  private readonly dirty = new Set<string>();

  constructor(cal: Calendar, segments: readonly CompiledSegment[]) {
    this.cal = cal;
    this.segments = segments;
  }

  async open(store: KvStore): Promise<void> {
    for await (const entries of store.scan({ gte: SIZE_PREFIX, lt: 'g0' }, 1024)) {
      for (const e of entries) {
        const [a, b] = new TextDecoder().decode(e.value).split(',');
        this.cells.set(e.key.slice(SIZE_PREFIX.length), [Number(a), Number(b)]);
      }
    }
  }

  private bump(seg: string, tier: string, day: number, enter: number, exit: number): void {
    const key = `${seg}|${tier}|${day}`;
    let c = this.cells.get(key);
    if (c === undefined) this.cells.set(key, (c = [0, 0]));
    c[0] += enter;
    c[1] += exit;
    this.dirty.add(key);
  }

  /** Segment `s` went from tier `from` to tier `to` (−1 = out) at instant t. Settled into cells lazily. */
  change(s: number, from: number, to: number, t: number): void {
    const day = Number.isFinite(t) ? this.cal.dayOf(t) : 0;
    this.pending.push([s, from, to, day]);
  }

  private pending: [number, number, number, number][] = [];
  private readonly segments: readonly CompiledSegment[];

  private settle(): void {
    for (const [s, from, to, day] of this.pending) {
      const sg = this.segments[s]!;
      const tiered = sg.tiers.length > 1 || sg.tiers[0] !== '';
      if (from < 0) this.bump(sg.id, '*', day, 1, 0);
      if (to < 0) this.bump(sg.id, '*', day, 0, 1);
      if (tiered) {
        if (from >= 0) this.bump(sg.id, sg.tiers[from]!, day, 0, 1);
        if (to >= 0) this.bump(sg.id, sg.tiers[to]!, day, 1, 0);
      }
    }
    this.pending = [];
  }

  snapshot(ops: WriteOp[]): void {
    this.settle();
    const enc = new TextEncoder();
    for (const key of this.dirty) {
      const c = this.cells.get(key)!;
      ops.push({ type: 'put', key: SIZE_PREFIX + key, value: enc.encode(`${c[0]},${c[1]}`) });
    }
    this.dirty.clear();
  }

  rows(grain: 'day' | 'week' | 'month', watermark: number): SegmentSizeRow[] {
    this.settle();
    const cal = this.cal;
    const win = (day: number): number => (grain === 'day' ? day : grain === 'week' ? Math.floor((day + 3) / 7) : cal.monthOfDay(day));
    const label = (w: number): string => (grain === 'day' ? cal.dayLabel(w) : grain === 'week' ? cal.weekLabel(w) : cal.monthLabel(w));
    // Per (segment, tier): the days with changes, in order; size = running sum.
    const series = new Map<string, { day: number; e: number; x: number }[]>();
    for (const [key, [e, x]] of this.cells) {
      const cut = key.lastIndexOf('|');
      const st = key.slice(0, cut);
      let list = series.get(st);
      if (list === undefined) series.set(st, (list = []));
      list.push({ day: Number(key.slice(cut + 1)), e, x });
    }
    const out: SegmentSizeRow[] = [];
    const wmDay = Number.isFinite(watermark) ? cal.dayOf(watermark) : Number.NEGATIVE_INFINITY;
    for (const [st, list] of series) {
      const [segment, tier] = st.split('|') as [string, string];
      list.sort((a, b) => a.day - b.day);
      let size = 0;
      let i = 0;
      // Every window from the first change to the watermark's window, so sizes carry across quiet ones.
      if (list.length === 0 || !Number.isFinite(wmDay)) continue;
      for (let w = win(list[0]!.day); w <= win(Math.max(wmDay, list[list.length - 1]!.day)); w++) {
        let entered = 0;
        let exited = 0;
        while (i < list.length && win(list[i]!.day) === w) {
          entered += list[i]!.e;
          exited += list[i]!.x;
          i++;
        }
        size += entered - exited;
        out.push({ grain, window: label(w), segment, tier, size, entered, exited });
      }
    }
    const order = new Map(this.segments.map((s, k) => [s.id, k]));
    return out.sort((a, b) => (order.get(a.segment) ?? 1e9) - (order.get(b.segment) ?? 1e9) || (a.tier < b.tier ? -1 : a.tier > b.tier ? 1 : 0) || (a.window < b.window ? -1 : a.window > b.window ? 1 : 0));
  }
}
