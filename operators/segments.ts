import { createHash } from 'node:crypto';
import { crmstream } from '../api/proto/gen/crmstream.js';
import type { EventColumns } from '../engine/batch.js';
import { Calendar } from '../engine/calendar.js';
import { EventType, isActivity } from '../engine/event-types.js';
import { upperBound } from '../engine/sorted.js';
import { Topic } from '../engine/outbox.js';
import type { BinReader, BinWriter } from '../state/codec.js';
import type { KvStore, WriteOp } from '../state/store.js';
import type { Operator, OperatorContext, StateSlot, UserRecord } from './operator.js';
import { CrmError } from '../engine/errors.js';
import type { ProfileState } from './profile.js';
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
  /**
   * Not stored. Memberships read from a record written under earlier rules whose segment (or tier)
   * no longer exists: [segment id, tier, tiered]. The reload scan turns them into exits.
   */
  dropped: [string, string, boolean][] | null = null;

  constructor(nTypes: number, nAttrs: number, nSegs: number) {
    this.hist = new Array<TypeHist | null>(nTypes).fill(null);
    this.attrs = new Array<AttrHist | null>(nAttrs).fill(null);
    this.member = new Array<number>(nSegs).fill(0);
    this.since = new Array<number>(nSegs).fill(Number.NaN);
    this.next = new Array<number>(nSegs).fill(NEVER);
  }
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

/** JSON with object keys sorted: the same rule gives the same text whatever order its fields were written in. */
function stableJson(v: unknown): string {
  if (Array.isArray(v)) return `[${v.map(stableJson).join(',')}]`;
  if (v !== null && typeof v === 'object') {
    const o = v as Record<string, unknown>;
    return `{${Object.keys(o).sort().filter((k) => o[k] !== undefined).map((k) => `${JSON.stringify(k)}:${stableJson(o[k])}`).join(',')}}`;
  }
  return JSON.stringify(v);
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
  /**
   * Identity of the rule across reloads: a digest of the definition (description aside) and of the
   * keys of the segments it reads, so a reader of a changed segment counts as changed too.
   */
  readonly key: string;
  /** Indices of the segments it reads (inSegment). */
  readonly refs: readonly number[];
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
  /** Some rule reads another segment (inSegment). */
  readonly hasReaders: boolean;
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
      const key = createHash('sha1').update(stableJson({ ...d, description: undefined })).update([...refs].map((r) => this.segments[r]!.key).join(',')).digest('hex').slice(0, 16);
      this.segments.push({ id: d.id, tiers: tiers.map((t) => t.name), evals, def: d, key, refs: [...refs] });
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
    this.hasReaders = this.readers.some((r) => r.length > 0);
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
// What the kept state can answer (rule reloads)

/**
 * Instants in the stored segment state: finite ms, or −∞ ("since the state began") and +∞
 * ("never"), which JSON cannot hold and are stored as strings.
 */
const encInstant = (t: number): number | string => (Number.isFinite(t) ? t : t > 0 ? 'inf' : '-inf');
const decInstant = (v: unknown): number => (v === 'inf' ? NEVER : v === '-inf' ? Number.NEGATIVE_INFINITY : Number(v));

/** How far back the kept state of one event type is complete. */
interface TypeProvenance {
  /** Every accepted event of the type with ts ≥ recordedFrom is folded in (−∞: every one). */
  recordedFrom: number;
  /**
   * Every recorded event with ts ≥ listedFrom is listed with its time, as far back as the current
   * keep reaches (older ones may be in the prefix only). Moves up when a reload lengthens a window.
   */
  listedFrom: number;
  /** The keep (ms) the times are listed for from now on. */
  keepMs: number;
}

interface Provenance {
  types: Map<string, TypeProvenance>;
  /** Per attribute: evaluation at instants ≥ this is exact (+∞: never, values before it are unknown). */
  attrs: Map<string, number>;
  /** Sign-up and first-event times: exact at instants ≥ this. */
  basics: number;
}

/** The earliest watermark from which a condition is exact over the kept state (−∞: always; +∞: never). */
function readyAt(c: Condition, prov: Provenance, segReady: readonly number[], byId: ReadonlyMap<string, number>): number {
  if ('did' in c || 'didNot' in c || 'sum' in c) {
    const p = prov.types.get('did' in c ? c.did : 'didNot' in c ? c.didNot : c.sum)!;
    // A window reads (t − d, t]: complete once its start is inside the listed times. An unbounded
    // one reads every event: complete only if the type was recorded from the beginning.
    if (c.within === undefined) return p.recordedFrom === Number.NEGATIVE_INFINITY ? p.recordedFrom : NEVER;
    return p.listedFrom + durationMs(c.within);
  }
  if ('sequence' in c) {
    // The latest A may be any time back: both types must have been recorded all along.
    const a = prov.types.get(c.sequence.did)!;
    const b = prov.types.get(c.sequence.thenNot)!;
    return a.recordedFrom === Number.NEGATIVE_INFINITY && b.recordedFrom === Number.NEGATIVE_INFINITY ? a.recordedFrom : NEVER;
  }
  if ('signedUp' in c) return prov.basics;
  if ('attr' in c) return prov.attrs.get(c.attr)!;
  if ('birthdayMonth' in c) return prov.attrs.get('prop:birthday')!;
  if ('inSegment' in c) return segReady[byId.get(c.inSegment)!]!;
  const parts = 'all' in c ? c.all : 'any' in c ? c.any : [c.not];
  let r = Number.NEGATIVE_INFINITY;
  for (const x of parts) r = Math.max(r, readyAt(x, prov, segReady, byId));
  return r;
}

/** The per-user slot layout of one rule set; records carry the number of the layout they were written in. */
interface SegLayout {
  types: string[];
  attrs: string[];
  segs: { id: string; key: string; tiers: string[] }[];
}

/** The same rules in the same order (descriptions aside): records and memberships need no change. */
function sameRules(layout: SegLayout, p: SegmentProgram): boolean {
  return layout.segs.length === p.segments.length && layout.segs.every((s, i) => s.key === p.segments[i]!.key);
}

function layoutOf(p: SegmentProgram): SegLayout {
  return {
    types: [...p.types.keys()],
    attrs: [...p.attrs.keys()],
    segs: p.segments.map((s) => ({ id: s.id, key: s.key, tiers: [...s.tiers] })),
  };
}

/** A pass over every stored profile after a reload or when building segments become exact. */
interface ScanState {
  /** The last profile id done (null: none yet). Scans run in id order and checkpoint as they go. */
  cursor: string | null;
  /** Segments to (re-)evaluate in each profile. */
  ids: string[];
  cause: 'reload' | 'rule_ready';
  /** Facts to take from the profile operator's state: 'basics' (sign-up, first event), 'platform'. */
  seed: string[];
  /** The highest event time seen when the scan began (seeded facts are exact from it on). */
  seedAt: number;
}

export interface SegmentStatus {
  id: string;
  /** live: exact and emitting changes; building: waiting for the watermark to reach `ready_at`. */
  state: 'live' | 'building';
  /** When a building segment turns live (ms); null: never — the rule reads history the state did not keep. */
  ready_at: number | null;
}

export interface SegmentReloadReport {
  added: string[];
  changed: string[];
  removed: string[];
  unchanged: string[];
  building: { id: string; ready_at: number | null }[];
}

const STATE_KEY = 'm/segments';

// ---------------------------------------------------------------------------------------------

export const SEG_TIMER = 'seg';

/**
 * A membership change, as it is made. `row` is the batch row whose event caused it (−1: a timer,
 * an identity merge or a reload), so a listener can order its own work by row.
 */
export type SegmentListener = (rec: UserRecord, segment: string, change: 'enter' | 'exit' | 'tier_change', tier: string, previousTier: string, t: number, row: number, cause: string) => void;
const CHANGE_KIND = ['enter', 'exit', 'tier_change'] as const;

export interface SegmentOptions {
  readonly timeZone: string;
  /** Allowed lateness (ms): how far behind the watermark late events can land. */
  readonly allowedLatenessMs: number;
}

/** What the engine tells the operator about the store when it opens (`reconcile`). */
export interface SegmentReconcileInput {
  /** No events were ever accepted into this store. */
  readonly fresh: boolean;
  /** Events were accepted while segments were switched off (or before they existed). */
  readonly gap: boolean;
  readonly watermark: number;
  readonly maxTs: number;
  /** Index of the profile operator's slot (seeding facts for rules the segment state never kept). */
  readonly profileSlot: number;
}

/**
 * The segment operator. The rules can change in a running engine (`reload`): per-user state is
 * laid out per rule set, and records written under an earlier one are translated when read.
 * A changed rule is evaluated from the kept state at once where that state is complete for it
 * (per event type and attribute the operator knows since when it has been recorded), and is
 * otherwise marked building until the watermark reaches the instant from which it is.
 */
export class SegmentOperator implements Operator {
  readonly name = 'segments';
  readonly slot: StateSlot<unknown>;
  readonly timerKinds: readonly string[] = [SEG_TIMER];
  slotIndex = -1;
  program!: SegmentProgram;
  private readonly opts: SegmentOptions;
  private typeIndexByName!: ReadonlyMap<string, number>;
  private segIndexById!: ReadonlyMap<string, number>;
  /** Cache: event type name → affected live segments, for activity / non-activity. */
  private readonly affectedCache = new Map<string, number[]>();
  private platformAttr = -1;
  /** Per tracked type: how far back (ms) before the lateness floor its times stay listed. */
  private keepMs: number[] = [];
  private propAttrs: [string, number][] = [];
  /** Per segment: live (exact, evaluated, emitting) rather than building. */
  private live: boolean[] = [];
  private liveSegments: number[] = [];
  private readonly sizes: SizeLog;
  private profileSlot = -1;
  // Stored in `m/segments`:
  private layouts: SegLayout[] = [];
  private layoutNo = 0;
  private prov: Provenance = { types: new Map(), attrs: new Map(), basics: Number.NEGATIVE_INFINITY };
  /** Building segments: id → the watermark from which they are exact (+∞: never). */
  private building = new Map<string, number>();
  private scan: ScanState | null = null;
  private stored: Record<string, unknown> | null = null;
  private stateDirty = false;
  /** Membership changes since start (metrics). */
  changes = 0;
  evaluations = 0;
  /** Told of every membership change as it is made (campaign triggers). */
  listener: SegmentListener | null = null;

  constructor(defs: readonly SegmentDef[], opts: SegmentOptions) {
    this.opts = opts;
    this.sizes = new SizeLog(new Calendar(opts.timeZone));
    this.install(new SegmentProgram(defs, opts.timeZone));
    this.slot = makeSlot(this);
  }

  /** Makes `p` the program in effect (derived lookups; the live set follows `building`). */
  private install(p: SegmentProgram): void {
    this.program = p;
    this.typeIndexByName = new Map([...p.types].map(([name, v]) => [name, v.index]));
    this.segIndexById = new Map(p.segments.map((s, i) => [s.id, i]));
    this.platformAttr = p.attrs.get('platform') ?? -1;
    this.keepMs = [];
    for (const v of p.types.values()) this.keepMs[v.index] = v.keepMs;
    this.propAttrs = [...p.attrs].filter(([n]) => n.startsWith('prop:')).map(([n, i]) => [n.slice(5), i]);
    this.sizes.segments = p.segments;
    this.refreshLive();
  }

  private refreshLive(): void {
    this.live = this.program.segments.map((s) => !this.building.has(s.id));
    this.liveSegments = this.program.segments.map((_, s) => s).filter((s) => this.live[s]);
    this.affectedCache.clear();
  }

  async open(store: KvStore, _ctx: OperatorContext): Promise<void> {
    await this.sizes.open(store);
    const raw = await store.get(STATE_KEY);
    this.stored = raw === undefined ? null : (JSON.parse(new TextDecoder().decode(raw)) as Record<string, unknown>);
  }

  /**
   * Reconciles the configured rules with the stored segment state once the store is open: resumes
   * an unfinished scan, or treats different rules as a reload. Says which scan is pending, if any.
   */
  reconcile(input: SegmentReconcileInput): 'none' | 'resume' | 'reload' {
    this.profileSlot = input.profileSlot;
    const next = this.program;
    const st = this.stored;
    this.stored = null;
    if (st !== null) {
      this.layouts = st['layouts'] as SegLayout[];
      this.layoutNo = st['layout'] as number;
      const types = new Map<string, TypeProvenance>();
      for (const [name, v] of Object.entries(st['types'] as Record<string, [unknown, unknown, number]>)) {
        types.set(name, { recordedFrom: decInstant(v[0]), listedFrom: decInstant(v[1]), keepMs: v[2] });
      }
      const attrs = new Map(Object.entries(st['attrs'] as Record<string, unknown>).map(([k, v]) => [k, decInstant(v)]));
      this.prov = { types, attrs, basics: decInstant(st['basics']) };
      this.building = new Map(Object.entries(st['building'] as Record<string, unknown>).map(([k, v]) => [k, decInstant(v)]));
      this.scan = st['scan'] as ScanState | null;
      if (this.scan !== null) this.scan.seedAt = decInstant(this.scan.seedAt);
    }
    if (st === null && input.fresh) {
      // A new store: everything is recorded from the beginning.
      this.layouts = [layoutOf(next)];
      this.layoutNo = 0;
      for (const [name, v] of next.types) this.prov.types.set(name, { recordedFrom: Number.NEGATIVE_INFINITY, listedFrom: Number.NEGATIVE_INFINITY, keepMs: v.keepMs });
      for (const name of next.attrs.keys()) this.prov.attrs.set(name, Number.NEGATIVE_INFINITY);
      this.stateDirty = true;
      this.refreshLive();
      return 'none';
    }
    if (input.gap || st === null) {
      // Events went by without the segment state: nothing it holds is complete any more.
      this.prov = { types: new Map(), attrs: new Map(), basics: NEVER };
      this.building.clear();
      this.switchTo(next, input.watermark, input.maxTs, true);
      return 'reload';
    }
    if (!sameRules(this.layouts[this.layoutNo]!, next)) {
      this.switchTo(next, input.watermark, input.maxTs, false);
      return 'reload';
    }
    this.refreshLive();
    return this.scan === null ? 'none' : 'resume';
  }

  /**
   * Replaces the rules (already validated) in a running engine; the engine then runs the scan
   * (`scanRecord` over every profile). Call with every record checkpointed and the cache emptied.
   */
  reload(defs: readonly SegmentDef[], watermark: number, maxTs: number): SegmentReloadReport {
    if (this.scan !== null) throw new CrmError('ENGINE_BUSY', 'a segment scan is still running; reload when it has finished');
    const next = new SegmentProgram(defs, this.opts.timeZone);
    if (sameRules(this.layouts[this.layoutNo]!, next)) {
      // Same rules (perhaps reworded descriptions): the layout, state and timers stay as they are.
      this.install(next);
      return {
        added: [], changed: [], removed: [], unchanged: next.segments.map((sg) => sg.id),
        building: [...this.building].map(([id, r]) => ({ id, ready_at: Number.isFinite(r) ? r : null })),
      };
    }
    return this.switchTo(next, watermark, maxTs, false);
  }

  /** The layout and provenance move from the current rules to `next`; a scan is set up. */
  private switchTo(next: SegmentProgram, w: number, maxTs: number, basicsNew: boolean): SegmentReloadReport {
    const lat = this.opts.allowedLatenessMs;
    const old = this.prov;
    // Events with ts > maxTs cannot have been seen: a type recorded from now on is complete from
    // there (−∞ when nothing was ever accepted).
    const firstNew = maxTs + 1;
    const types = new Map<string, TypeProvenance>();
    for (const [name, v] of next.types) {
      const o = old.types.get(name);
      if (o === undefined) types.set(name, { recordedFrom: firstNew, listedFrom: firstNew, keepMs: v.keepMs });
      else {
        // A longer window than before: the times folded into the prefix under the old keep are
        // gone; from max(listedFrom, the old cut) on they are all listed.
        const listedFrom = v.keepMs > o.keepMs ? Math.max(o.listedFrom, w - lat - o.keepMs) : o.listedFrom;
        types.set(name, { recordedFrom: o.recordedFrom, listedFrom, keepMs: v.keepMs });
      }
    }
    const seed: string[] = [];
    const attrs = new Map<string, number>();
    for (const name of next.attrs.keys()) {
      let from = old.attrs.get(name);
      if (from === undefined) {
        // The platform of the latest activity is in the profile: exact from the last event time
        // seen on. Props are not kept anywhere else.
        if (name === 'platform') {
          from = maxTs;
          if (Number.isFinite(maxTs)) seed.push('platform');
        } else from = Number.isFinite(maxTs) ? NEVER : Number.NEGATIVE_INFINITY;
      }
      attrs.set(name, from);
    }
    let basics = old.basics;
    if (basicsNew) {
      basics = maxTs;
      if (Number.isFinite(maxTs)) seed.push('basics');
    }
    this.prov = { types, attrs, basics };

    const ready: number[] = [];
    const byId = new Map<string, number>();
    const building = new Map<string, number>();
    next.segments.forEach((sg, s) => {
      let r = basics;
      for (const t of sg.def.tiers ?? [{ rule: sg.def.rule! }]) r = Math.max(r, readyAt(t.rule, this.prov, ready, byId));
      ready.push(r);
      byId.set(sg.id, s);
      if (r > w) building.set(sg.id, r);
    });
    const before = this.layouts[this.layoutNo];
    const oldSegs = new Map((before?.segs ?? []).map((x) => [x.id, x]));
    const report: SegmentReloadReport = { added: [], changed: [], removed: [], unchanged: [], building: [] };
    const ids: string[] = [];
    for (const sg of next.segments) {
      const o = oldSegs.get(sg.id);
      (o === undefined ? report.added : o.key === sg.key ? report.unchanged : report.changed).push(sg.id);
      const carried = o !== undefined && o.key === sg.key && !this.building.has(sg.id) && !building.has(sg.id) && !basicsNew;
      if (!carried) ids.push(sg.id);
      const r = building.get(sg.id);
      if (r !== undefined) report.building.push({ id: sg.id, ready_at: Number.isFinite(r) ? r : null });
    }
    for (const id of oldSegs.keys()) if (!byId.has(id)) report.removed.push(id);
    this.building = building;
    this.layouts.push(layoutOf(next));
    this.layoutNo = this.layouts.length - 1;
    this.scan = { cursor: null, ids, cause: 'reload', seed, seedAt: maxTs };
    this.install(next);
    this.stateDirty = true;
    return report;
  }

  /** Building segments the watermark has made exact: they go live through a scan (engine). */
  activationDue(watermark: number): boolean {
    if (this.scan !== null) return false;
    for (const r of this.building.values()) if (r <= watermark) return true;
    return false;
  }

  startActivation(watermark: number): void {
    const ids = [...this.building].filter(([, r]) => r <= watermark).map(([id]) => id);
    for (const id of ids) this.building.delete(id);
    this.scan = { cursor: null, ids, cause: 'rule_ready', seed: [], seedAt: Number.NEGATIVE_INFINITY };
    this.refreshLive();
    this.stateDirty = true;
  }

  /** The pending scan's position: undefined when there is none, null before the first profile. */
  get scanCursor(): string | null | undefined {
    return this.scan === null ? undefined : this.scan.cursor;
  }

  /** The scan has done every profile up to and including `id` (stored with the next checkpoint). */
  scanAdvance(id: string): void {
    this.scan!.cursor = id;
    this.stateDirty = true;
  }

  scanDone(): void {
    this.scan = null;
    this.stateDirty = true;
  }

  /** One profile of the scan: seeds, exits of dropped memberships, the scan's segments evaluated. */
  scanRecord(rec: UserRecord, ctx: OperatorContext): void {
    const scan = this.scan!;
    const u = rec.slots[this.slotIndex] as SegUser;
    const t = ctx.watermark;
    if (scan.seed.length > 0) this.seed(rec, u, scan, t - this.opts.allowedLatenessMs);
    if (u.dropped !== null) {
      for (const [id, tier, tiered] of u.dropped) {
        this.emitChange(ctx, rec, id, 1, tier, tier, t, scan.cause);
        this.sizes.changeNamed(id, tiered, tier, null, t);
      }
      u.dropped = null;
    }
    const segs: number[] = [];
    for (const id of scan.ids) {
      const s = this.segIndexById.get(id);
      if (s === undefined) continue;
      if (this.live[s]) {
        segs.push(s);
        continue;
      }
      // Building: no members until it is exact (no messages on a partial history).
      const m = u.member[s]!;
      if (m > 0) {
        const sg = this.program.segments[s]!;
        this.emitChange(ctx, rec, sg.id, 1, sg.tiers[m - 1]!, sg.tiers[m - 1]!, t, scan.cause);
        this.sizes.change(sg, m - 1, -1, t);
        u.member[s] = 0;
        u.since[s] = Number.NaN;
      }
      u.next[s] = NEVER;
    }
    segs.sort((a, b) => a - b);
    this.evaluate(rec, u, segs, t, scan.cause, ctx);
  }

  private seed(rec: UserRecord, u: SegUser, scan: ScanState, keepFloor: number): void {
    const p = rec.slots[this.profileSlot] as ProfileState;
    if (scan.seed.includes('basics')) {
      if (!Number.isNaN(p.signupTs) && !(u.signupTs <= p.signupTs)) u.signupTs = p.signupTs;
      // The profile knows first activity, sign-up and purchase times; a profile with only
      // message events is known from the scan's last event time on.
      let first = Math.min(...[p.firstTs, p.signupTs, p.firstPurchaseTs].filter((x) => !Number.isNaN(x)));
      if (!Number.isFinite(first) && p.events > 0) first = scan.seedAt;
      if (Number.isFinite(first) && !(u.firstTs <= first)) u.firstTs = first;
    }
    if (scan.seed.includes('platform') && this.platformAttr >= 0 && !Number.isNaN(p.lastTs)) {
      this.setAttr(u, this.platformAttr, p.lastTs, p.lastPlatform, keepFloor);
    }
  }

  /**
   * A record written under layout `no` (an earlier rule set), in the current layout: facts carried
   * by name, memberships of unchanged rules carried as they are, those of changed rules carried by
   * tier name (the scan re-evaluates them), the rest listed in `dropped` for the scan's exits.
   */
  migrate(old: SegUser, no: number): SegUser {
    const from = this.layouts[no]!;
    const p = this.program;
    const u = new SegUser(p.types.size, p.attrs.size, p.segments.length);
    from.types.forEach((name, k) => {
      const j = this.typeIndexByName.get(name);
      if (j !== undefined) u.hist[j] = old.hist[k]!;
    });
    from.attrs.forEach((name, k) => {
      const j = p.attrs.get(name);
      if (j !== undefined) u.attrs[j] = old.attrs[k]!;
    });
    u.signupTs = old.signupTs;
    u.firstTs = old.firstTs;
    u.timerTs = old.timerTs;
    from.segs.forEach((o, k) => {
      const m = old.member[k]!;
      const s = this.segIndexById.get(o.id);
      const sg = s === undefined ? undefined : p.segments[s]!;
      if (sg !== undefined && sg.key === o.key) {
        u.member[s!] = m;
        u.since[s!] = old.since[k]!;
        u.next[s!] = old.next[k]!;
        return;
      }
      if (m === 0) return;
      const tier = o.tiers[m - 1]!;
      const at = sg === undefined ? -1 : sg.tiers.indexOf(tier);
      if (at >= 0) {
        u.member[s!] = at + 1;
        u.since[s!] = old.since[k]!;
      } else {
        (u.dropped ??= []).push([o.id, tier, o.tiers.length > 1 || o.tiers[0] !== '']);
      }
    });
    return u;
  }

  /** Decodes a record's slot: the current layout directly, an earlier one through `migrate`. */
  decodeUser(r: BinReader): SegUser {
    const no = r.uint();
    const layout = this.layouts[no];
    if (layout === undefined) throw new RangeError(`segment state layout ${no} is unknown (${this.layouts.length} stored)`);
    const u = readUser(r, layout.types.length, layout.attrs.length, layout.segs.length);
    return no === this.layoutNo ? u : this.migrate(u, no);
  }

  get currentLayout(): number {
    return this.layoutNo;
  }

  /** Per segment: live or building (and from when it will be exact). */
  status(): SegmentStatus[] {
    return this.program.segments.map((sg) => {
      const r = this.building.get(sg.id);
      return { id: sg.id, state: r === undefined ? 'live' : 'building', ready_at: r === undefined ? null : Number.isFinite(r) ? r : null };
    });
  }

  private affected(type: string, activity: boolean): number[] {
    const key = (activity ? '1' : '0') + type;
    let a = this.affectedCache.get(key);
    if (a === undefined) {
      if (this.affectedCache.size > 4096) this.affectedCache.clear(); // custom type names are bounded upstream; this is a second guard
      this.affectedCache.set(key, (a = this.program.affected(type, activity).filter((s) => this.live[s])));
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
      const segs = first ? this.liveSegments : this.affected(name, activity);
      if (segs.length > 0) this.evaluate(rec, u, segs, ctx.watermark, `event:${name}`, ctx, i);
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
  private evaluate(rec: UserRecord, u: SegUser, segs: readonly number[], t: number, cause: string, ctx: OperatorContext, row = -1): void {
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
      if (!this.live[s]) continue; // building: not evaluated until exact (readers are building too)
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
        this.sizes.change(sg, before, tier, t);
        this.emitChange(ctx, rec, sg.id, kind, tier < 0 ? sg.tiers[before]! : sg.tiers[tier]!, before < 0 ? '' : sg.tiers[before]!, t, cause, row);
      }
    }
    let due = NEVER;
    for (let s = 0; s < u.next.length; s++) if (u.next[s]! < due) due = u.next[s]!;
    // The timer only ever moves earlier. A change that pushes the next instant later (a new cart, a
    // new purchase) keeps the registered one: it fires early, finds nothing due and registers the
    // real instant — one spare firing per period instead of a cancel and a register per event.
    if (due < u.timerTs || (Number.isNaN(u.timerTs) && due !== NEVER)) {
      if (!Number.isNaN(u.timerTs)) ctx.timers.cancel(rec.id, SEG_TIMER, u.timerTs);
      ctx.timers.register(rec.id, SEG_TIMER, due);
      u.timerTs = due;
    }
  }

  /** One SegmentChange record (kind: 0 enter, 1 exit, 2 tier_change) into the outbox. */
  private emitChange(ctx: OperatorContext, rec: UserRecord, segment: string, kind: number, tier: string, previous: string, t: number, cause: string, row = -1): void {
    this.changes++;
    this.listener?.(rec, segment, CHANGE_KIND[kind]!, tier, previous, t, row, cause);
    ctx.emit(Topic.segmentChange, crmstream.v1.SegmentChange.encode({
      user_id: rec.id, segment_id: segment, change: CHANGE_KIND[kind], enter: kind === 0, event_ts: Number.isFinite(t) ? t : 0, cause,
      tier, previous_tier: previous,
    }).finish());
  }

  onTimer(rec: UserRecord, _kind: string, ts: number, ctx: OperatorContext): void {
    const u = rec.slots[this.slotIndex] as SegUser;
    if (u.timerTs === ts) u.timerTs = Number.NaN; // fired: no longer registered
    const due: number[] = [];
    for (let s = 0; s < u.next.length; s++) if (u.next[s]! <= ts) due.push(s);
    // Dependents of a due segment are evaluated with it (inSegment).
    this.evaluate(rec, u, due.length === 0 || !this.program.hasReaders ? due : this.program.withReaders(due), ts, 'timer', ctx);
  }

  /** Identity stitch: after the fold, the member's segments are re-evaluated at the watermark. */
  afterMerge(into: UserRecord, ctx: OperatorContext): void {
    const u = into.slots[this.slotIndex] as SegUser;
    // ctx.watermark, not the one of the last batch: a stitch can come with a watermark move.
    this.evaluate(into, u, this.liveSegments, ctx.watermark, 'merge', ctx);
  }

  beforeMerge(_into: UserRecord, from: UserRecord, ctx: OperatorContext): void {
    // The anonymous profile leaves every segment it was in (its timer is cancelled; the member's
    // evaluation after the fold decides the merged membership).
    const u = from.slots[this.slotIndex] as SegUser;
    for (let s = 0; s < u.member.length; s++) {
      if (u.member[s] === 0) continue;
      const sg = this.program.segments[s]!;
      const tier = sg.tiers[u.member[s]! - 1]!;
      this.emitChange(ctx, from, sg.id, 1, tier, tier, ctx.watermark, 'merge');
      this.sizes.change(sg, u.member[s]! - 1, -1, ctx.watermark);
      u.member[s] = 0;
      u.since[s] = Number.NaN;
    }
    this.release(from, ctx);
    u.timerTs = Number.NaN;
  }

  release(rec: UserRecord, ctx: OperatorContext): void {
    // Its timer stays set in the record: the target's beforeMerge cancels it there (a no-op).
    const u = rec.slots[this.slotIndex] as SegUser;
    if (!Number.isNaN(u.timerTs)) ctx.timers.cancel(rec.id, SEG_TIMER, u.timerTs);
  }

  snapshot(ops: WriteOp[]): void {
    this.sizes.snapshot(ops);
    if (!this.stateDirty) return;
    const types: Record<string, [number | string, number | string, number]> = {};
    for (const [name, v] of this.prov.types) types[name] = [encInstant(v.recordedFrom), encInstant(v.listedFrom), v.keepMs];
    const state = {
      layouts: this.layouts, layout: this.layoutNo, types,
      attrs: Object.fromEntries([...this.prov.attrs].map(([k, v]) => [k, encInstant(v)])), basics: encInstant(this.prov.basics),
      building: Object.fromEntries([...this.building].map(([k, v]) => [k, encInstant(v)])),
      scan: this.scan === null ? null : { ...this.scan, seedAt: encInstant(this.scan.seedAt) },
    };
    ops.push({ type: 'put', key: STATE_KEY, value: new TextEncoder().encode(JSON.stringify(state)) });
  }

  committed(): void {
    this.sizes.committed();
    this.stateDirty = false;
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

  /** Whether a user is in segment `id` (in tier `tier` if given) now. */
  isMember(rec: UserRecord, id: string, tier?: string): boolean {
    const s = this.segIndexById.get(id);
    if (s === undefined) return false;
    const m = (rec.slots[this.slotIndex] as SegUser).member[s]!;
    return m > 0 && (tier === undefined || this.program.segments[s]!.tiers[m - 1] === tier);
  }

  /** Position of `tier` in segment `id`'s tiers (definition order, highest first); −1 if none. */
  tierRank(id: string, tier: string): number {
    const s = this.segIndexById.get(id);
    return s === undefined ? -1 : this.program.segments[s]!.tiers.indexOf(tier);
  }

  /** Segment id → tier names ([''] for an untiered one), in definition order. */
  tierNames(): Map<string, readonly string[]> {
    return new Map(this.program.segments.map((s) => [s.id, s.tiers]));
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
 * The per-user slot. Records carry the number of the rule layout they were written in, so a
 * record from before a reload is read through `migrate`. Merging folds the anonymous profile's
 * facts in (the membership is then re-evaluated by afterMerge).
 */
function makeSlot(op: SegmentOperator): StateSlot<SegUser> {
  const sizes = (): [number, number, number] => [op.program.types.size, op.program.attrs.size, op.program.segments.length];
  return {
    id: 3,
    create: () => new SegUser(...sizes()),
    encode(u, w: BinWriter) {
      w.uint(op.currentLayout);
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
      for (let s = 0; s < u.member.length; s++) {
        w.uint(u.member[s]!).optUint(u.since[s]!);
        w.optUint(u.next[s] === NEVER ? Number.NaN : u.next[s]!);
      }
    },
    decode: (r: BinReader) => op.decodeUser(r),
    merge(into, from) {
      const [nTypes, nAttrs] = sizes();
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

/** A user's segment state as written under a layout of these sizes. */
function readUser(r: BinReader, nt: number, na: number, ns: number): SegUser {
  const u = new SegUser(nt, na, ns);
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

  /** The segments in effect (row order; set by the operator on every rule change). */
  segments: readonly CompiledSegment[] = [];
  private pending: [string, boolean, string | null, string | null, number][] = [];

  constructor(cal: Calendar) {
    this.cal = cal;
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

  /** Segment `sg` went from tier `from` to tier `to` (−1 = out) at instant t. Settled into cells lazily. */
  change(sg: CompiledSegment, from: number, to: number, t: number): void {
    this.changeNamed(sg.id, sg.tiers.length > 1 || sg.tiers[0] !== '', from < 0 ? null : sg.tiers[from]!, to < 0 ? null : sg.tiers[to]!, t);
  }

  /** The same by names (also for segments a reload removed). */
  changeNamed(id: string, tiered: boolean, from: string | null, to: string | null, t: number): void {
    this.pending.push([id, tiered, from, to, Number.isFinite(t) ? this.cal.dayOf(t) : 0]);
  }

  private settle(): void {
    for (const [id, tiered, from, to, day] of this.pending) {
      if (from === null) this.bump(id, '*', day, 1, 0);
      if (to === null) this.bump(id, '*', day, 0, 1);
      if (tiered) {
        if (from !== null) this.bump(id, from, day, 0, 1);
        if (to !== null) this.bump(id, to, day, 1, 0);
      }
    }
    this.pending = [];
  }

  snapshot(ops: WriteOp[]): void {
    // Settling moves pending changes into the cells (and marks them dirty): memory means the same
    // before and after, so a failed write loses nothing — the next snapshot writes them.
    this.settle();
    const enc = new TextEncoder();
    for (const key of this.dirty) {
      const c = this.cells.get(key)!;
      ops.push({ type: 'put', key: SIZE_PREFIX + key, value: enc.encode(`${c[0]},${c[1]}`) });
    }
  }

  committed(): void {
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
