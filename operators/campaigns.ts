import { crmstream } from '../api/proto/gen/crmstream.js';
import type { EventColumns } from '../engine/batch.js';
import { Calendar } from '../engine/calendar.js';
import { EventType } from '../engine/event-types.js';
import { hashA, hashB } from '../engine/hash.js';
import { upperBound } from '../engine/sorted.js';
import { Topic } from '../engine/outbox.js';
import type { BinReader, BinWriter } from '../state/codec.js';
import type { KvStore, WriteOp } from '../state/store.js';
import { durationMs } from './segment-rules.js';
import type { Audience, CampaignDef, CampaignFile } from './campaign-rules.js';
import type { Operator, OperatorContext, StateSlot, UserRecord } from './operator.js';
import type { SegmentOperator } from './segments.js';

/**
 * Campaigns (SPEC §6, docs/CAMPAIGNS.md): the "act" half of the loop. A campaign decides, per user,
 * at an event-time instant t — an event's time, a segment change's instant, a follow-up's due time
 * or a daily slot — whether a message goes out, and every decision that passes the guardrails is a
 * `Trigger` in the outbox, in the same checkpoint as the state that made it (caps, re-entry,
 * follow-ups): nothing is emitted that the state does not reflect, and after a crash nothing the
 * state reflects is lost.
 *
 * Order of checks for one decision: audience → re-entry → (eligible) → marketing consent
 * (promotional) → consented channels → quiet hours (promotional: deferred, never dropped) → caps
 * at the send time → variant. Control users pass the same checks (so the arms are comparable) and
 * get a Trigger marked control that senders do not send; it does not count against caps.
 *
 * Determinism: decisions for one batch happen in row order whatever the batch cut — segment
 * changes an event caused are queued with its row and decided just before the row's own event
 * trigger; timers fire in (time, kind, user) order between runs. The trigger_id is a digest of
 * (campaign, user, what caused it), so a replay makes the same ids.
 */

const NEVER = Number.POSITIVE_INFINITY;
export const CAMP_TIMER = 'camp';

/** Flags of a recent trigger, for the outcomes reported back by senders and purchases. */
const F_DELIVERED = 1;
const F_OPENED = 2;
const F_CLICKED = 4;
const F_CONVERTED = 8;
const F_BOUNCED = 16;
const F_CONTROL = 32;

/** Campaign KPI cell fields, per (campaign, variant, local day of the decision). */
export const CAMPAIGN_FIELDS = [
  'eligible', 'sent', 'control', 'suppressed_consent', 'suppressed_channel', 'suppressed_cap', 'deferred_quiet_hours',
  'reentry_skipped', 'followups_cancelled', 'delivered', 'opened', 'clicked', 'bounced', 'converted', 'revenue',
] as const;
export type CampaignField = (typeof CAMPAIGN_FIELDS)[number];
const FI = Object.fromEntries(CAMPAIGN_FIELDS.map((f, i) => [f, i])) as Record<CampaignField, number>;
const NF = CAMPAIGN_FIELDS.length;

// ---------------------------------------------------------------------------------------------
// Per-user state

export class CampUser {
  /** Consent props: key → [ts, value] of the latest one (ties: larger value). */
  consent = new Map<string, [number, string]>();
  /** Sent (non-control) messages, for caps: send time, campaign, first channel. Sorted by time. */
  sendTs: number[] = [];
  sendCamp: string[] = [];
  sendChan: string[] = [];
  /** Campaign → time of its last decision that was not skipped (re-entry). */
  last = new Map<string, number>();
  /** Pending follow-ups: campaign, anchor event id, anchor time, next step, rendered params (JSON), stop time. */
  fCamp: string[] = [];
  fAnchor: string[] = [];
  fTs: number[] = [];
  fStep: number[] = [];
  fParams: string[] = [];
  /** The earliest `unless` event after the anchor (Infinity: none yet): steps due after it are cancelled. */
  fStop: number[] = [];
  /** Recent `unless`-type event times per type (sorted), for follow-ups anchored before them. */
  unless = new Map<string, number[]>();
  /** Daily campaigns: campaign → the next slot this user is scheduled for. */
  daily = new Map<string, number>();
  /** Recent triggers (attribution and sender outcomes): id, campaign, variant, send time, flags, decision day. */
  rId: string[] = [];
  rCamp: string[] = [];
  rVar: string[] = [];
  rTs: number[] = [];
  rFlags: number[] = [];
  rDay: number[] = [];
  /** The registered timer (NaN: none). */
  timerTs = Number.NaN;
}

const campSlot: StateSlot<CampUser> = {
  id: 4,
  create: () => new CampUser(),
  encode(u, w: BinWriter) {
    w.uint(u.consent.size);
    for (const [k, [ts, v]] of u.consent) w.str(k).uint(ts).str(v);
    w.uint(u.sendTs.length);
    for (let i = 0; i < u.sendTs.length; i++) w.uint(u.sendTs[i]!).str(u.sendCamp[i]!).str(u.sendChan[i]!);
    w.uint(u.last.size);
    for (const [k, ts] of u.last) w.str(k).uint(ts);
    w.uint(u.fCamp.length);
    for (let i = 0; i < u.fCamp.length; i++) {
      w.str(u.fCamp[i]!).str(u.fAnchor[i]!).uint(u.fTs[i]!).uint(u.fStep[i]!).str(u.fParams[i]!).optUint(u.fStop[i] === NEVER ? Number.NaN : u.fStop[i]!);
    }
    w.uint(u.unless.size);
    for (const [k, list] of u.unless) {
      w.str(k).uint(list.length);
      for (const ts of list) w.uint(ts);
    }
    w.uint(u.daily.size);
    for (const [k, ts] of u.daily) w.str(k).uint(ts);
    w.uint(u.rId.length);
    for (let i = 0; i < u.rId.length; i++) w.str(u.rId[i]!).str(u.rCamp[i]!).str(u.rVar[i]!).uint(u.rTs[i]!).uint(u.rFlags[i]!).uint(u.rDay[i]! + DAY_BIAS);
    w.optUint(u.timerTs);
  },
  decode(r: BinReader) {
    const u = new CampUser();
    for (let n = r.uint(); n > 0; n--) {
      const k = r.str();
      const ts = r.uint();
      u.consent.set(k, [ts, r.str()]);
    }
    for (let n = r.uint(); n > 0; n--) {
      u.sendTs.push(r.uint());
      u.sendCamp.push(r.str());
      u.sendChan.push(r.str());
    }
    for (let n = r.uint(); n > 0; n--) {
      const k = r.str();
      u.last.set(k, r.uint());
    }
    for (let n = r.uint(); n > 0; n--) {
      u.fCamp.push(r.str());
      u.fAnchor.push(r.str());
      u.fTs.push(r.uint());
      u.fStep.push(r.uint());
      u.fParams.push(r.str());
      const stop = r.optUint();
      u.fStop.push(Number.isNaN(stop) ? NEVER : stop);
    }
    for (let n = r.uint(); n > 0; n--) {
      const k = r.str();
      const list: number[] = [];
      for (let m = r.uint(); m > 0; m--) list.push(r.uint());
      u.unless.set(k, list);
    }
    for (let n = r.uint(); n > 0; n--) {
      const k = r.str();
      u.daily.set(k, r.uint());
    }
    for (let n = r.uint(); n > 0; n--) {
      u.rId.push(r.str());
      u.rCamp.push(r.str());
      u.rVar.push(r.str());
      u.rTs.push(r.uint());
      u.rFlags.push(r.uint());
      u.rDay.push(r.uint() - DAY_BIAS);
    }
    u.timerTs = r.optUint();
    return u;
  },
  merge(into, from) {
    for (const [k, [ts, v]] of from.consent) {
      const c = into.consent.get(k);
      if (c === undefined || ts > c[0] || (ts === c[0] && v > c[1])) into.consent.set(k, [ts, v]);
    }
    for (let i = 0; i < from.sendTs.length; i++) {
      const at = upperBound(into.sendTs, from.sendTs[i]!);
      into.sendTs.splice(at, 0, from.sendTs[i]!);
      into.sendCamp.splice(at, 0, from.sendCamp[i]!);
      into.sendChan.splice(at, 0, from.sendChan[i]!);
    }
    for (const [k, ts] of from.last) if (!(into.last.get(k)! >= ts)) into.last.set(k, ts);
    for (let i = 0; i < from.fCamp.length; i++) {
      into.fCamp.push(from.fCamp[i]!);
      into.fAnchor.push(from.fAnchor[i]!);
      into.fTs.push(from.fTs[i]!);
      into.fStep.push(from.fStep[i]!);
      into.fParams.push(from.fParams[i]!);
      into.fStop.push(from.fStop[i]!);
    }
    for (const [k, list] of from.unless) {
      const to = into.unless.get(k) ?? [];
      for (const ts of list) to.splice(upperBound(to, ts), 0, ts);
      into.unless.set(k, to);
    }
    for (const [k, ts] of from.daily) if (!(into.daily.get(k)! <= ts)) into.daily.set(k, ts);
    for (let i = 0; i < from.rId.length; i++) {
      into.rId.push(from.rId[i]!);
      into.rCamp.push(from.rCamp[i]!);
      into.rVar.push(from.rVar[i]!);
      into.rTs.push(from.rTs[i]!);
      into.rFlags.push(from.rFlags[i]!);
      into.rDay.push(from.rDay[i]!);
    }
  },
};

/** Local day indices can be negative (before 1970); stored biased as unsigned. */
const DAY_BIAS = 1 << 20;

// ---------------------------------------------------------------------------------------------
// Compiled campaigns

interface Compiled {
  readonly def: CampaignDef;
  readonly id: string;
  readonly promotional: boolean;
  readonly delays: readonly number[];
  readonly caps: readonly { max: number; within: number }[];
  readonly cooldown: number;
  readonly once: boolean;
  /** Holdout fraction, then variants with cumulative weights in [control, 1). */
  readonly control: number;
  readonly variants: readonly { name: string; upTo: number; template: string; params: Record<string, string> }[];
  /** Every placeholder name the variants' params use: what a follow-up keeps of its anchor event. */
  readonly paramKeys: readonly string[];
  readonly dailyMinute: number;
  readonly audience: ((rec: UserRecord) => boolean) | null;
  /** Segment ids the audience reads (daily campaigns re-check on their changes). */
  readonly audienceSegments: ReadonlySet<string>;
}

/** What caused a decision: the id digest's input and the Trigger's `reason`. */
interface Cause {
  key: string;
  reason: string;
  /** The values params may use (event fields, segment, tier) — built only for a decision that sends. */
  values: () => Record<string, string>;
  /**
   * Follow-ups: what was kept of the anchor event (JSON). Since issue 17: `{"=": {name: value}}`,
   * the anchor's values of the placeholders the params use; before: the params pre-rendered
   * against the anchor, per `variant.param` (still read from older checkpoints).
   */
  anchored?: string;
}

export interface CampaignOptions {
  readonly timeZone: string;
  readonly allowedLatenessMs: number;
}

/** A row of campaign KPIs (per campaign, variant and local day, or totals with day = '*'). */
export interface CampaignRow {
  campaign: string;
  variant: string;
  day: string;
  values: Record<CampaignField, number>;
}

/** Campaign KPI cells: `n/<campaign>|<arm>|<day>` (outbox cursors own `c/`). */
const CELL_PREFIX = 'n/';

export class CampaignOperator implements Operator {
  readonly name = 'campaigns';
  readonly slot = campSlot as StateSlot<unknown>;
  readonly timerKinds: readonly string[] = [CAMP_TIMER];
  slotIndex = -1;
  readonly file: CampaignFile;
  private readonly campaigns: Compiled[];
  private readonly byId = new Map<string, Compiled>();
  private readonly byEvent = new Map<string, Compiled[]>();
  private readonly byAfter = new Map<string, Compiled[]>();
  private readonly unlessTypes = new Set<string>();
  private readonly bySegment = new Map<string, Compiled[]>();
  private readonly daily: Compiled[];
  private readonly cal: Calendar;
  private readonly quietCal: Calendar | null;
  private readonly quiet: { start: number; end: number } | null;
  private readonly attributionMs: number;
  /** How long recent triggers, sends and unless times are kept after they stop mattering. */
  private readonly keepSendsMs: number;
  /** The file's caps across campaigns, windows in ms. */
  private readonly globalCaps: readonly { scope: 'user' | 'channel'; channel: string; max: number; within: number }[];
  private readonly keepRecentMs: number;
  private readonly keepUnlessMs: number;
  private readonly segments: SegmentOperator;
  private readonly opts: CampaignOptions;
  /** Segment changes caused by batch rows, decided in row order by processBatch. */
  private queue: { rec: UserRecord; segment: string; change: string; tier: string; previous: string; t: number; row: number }[] = [];
  private readonly cells = new Map<string, Float64Array>();
  private readonly dirty = new Set<string>();
  /** Decisions since start (metrics). */
  triggers = 0;

  constructor(file: CampaignFile, segments: SegmentOperator, opts: CampaignOptions) {
    this.file = file;
    this.segments = segments;
    this.opts = opts;
    this.cal = new Calendar(opts.timeZone);
    this.quietCal = file.quietHours === false ? null : new Calendar(file.quietHours.timeZone);
    this.quiet = file.quietHours === false ? null : { start: minuteOf(file.quietHours.start), end: minuteOf(file.quietHours.end) };
    this.attributionMs = durationMs(file.attribution);
    this.campaigns = file.campaigns.map((c) => this.compile(c));
    for (const c of this.campaigns) {
      this.byId.set(c.id, c);
      const t = c.def.trigger;
      const add = (m: Map<string, Compiled[]>, k: string): void => {
        let l = m.get(k);
        if (l === undefined) m.set(k, (l = []));
        l.push(c);
      };
      if ('event' in t) add(this.byEvent, t.event);
      else if ('after' in t) {
        add(this.byAfter, t.after);
        if (t.unless !== undefined) this.unlessTypes.add(t.unless);
      } else if ('segment' in t) add(this.bySegment, t.segment);
    }
    this.daily = this.campaigns.filter((c) => 'daily' in c.def.trigger);
    this.globalCaps = file.caps.map((c) => ({ scope: c.scope, channel: c.channel ?? '', max: c.max, within: durationMs(c.within) }));
    const maxCap = Math.max(0, ...this.campaigns.flatMap((c) => c.caps.map((x) => x.within)), ...this.globalCaps.map((c) => c.within));
    this.keepSendsMs = maxCap;
    this.keepRecentMs = Math.max(this.attributionMs, 7 * 86_400_000) + opts.allowedLatenessMs;
    this.keepUnlessMs = Math.max(0, ...this.campaigns.flatMap((c) => c.delays)) + opts.allowedLatenessMs;
    segments.listener = (rec, segment, change, tier, previous, t, row, cause) => {
      if (!this.bySegment.has(segment) && !this.dailyReads(segment)) return;
      // Members a rule reload or a segment going live brings in are not news: no segment
      // triggers for them (no blast to every member of a new segment); daily audiences do follow.
      const scan = cause === 'reload' || cause === 'rule_ready';
      if (row >= 0) this.queue.push({ rec, segment, change, tier, previous, t, row });
      else this.onSegmentChange(rec, segment, change, tier, previous, t, this.ctxRef!, scan);
    };
  }

  private ctxRef: OperatorContext | null = null;

  private dailyReads(segment: string): boolean {
    for (const c of this.daily) if (c.audienceSegments.has(segment)) return true;
    return false;
  }

  private compile(def: CampaignDef): Compiled {
    const t = def.trigger;
    const exp = def.experiment ?? {};
    const control = exp.control ?? 0;
    const vs = exp.variants ?? [{ name: 'a', weight: 1 }];
    const total = vs.reduce((s, v) => s + v.weight, 0);
    let acc = control;
    const variants = vs.map((v) => {
      acc += ((1 - control) * v.weight) / total;
      return { name: v.name, upTo: acc, template: v.template ?? def.action.template, params: { ...def.action.params, ...v.params } };
    });
    const segs = new Set<string>();
    const audience = def.audience === undefined ? null : this.compileAudience(def.audience, segs);
    const paramKeys = new Set<string>();
    for (const v of variants) for (const tpl of Object.values(v.params)) for (const m of tpl.matchAll(PLACEHOLDER)) paramKeys.add(m[1]!);
    return {
      def, id: def.id, promotional: def.promotional ?? true,
      delays: 'after' in t ? t.delays.map(durationMs) : [],
      caps: (def.caps ?? []).map((c) => ({ max: c.max, within: durationMs(c.within) })),
      cooldown: typeof def.reentry === 'object' ? durationMs(def.reentry.cooldown) : 0,
      once: def.reentry === 'once',
      control, variants, paramKeys: [...paramKeys],
      dailyMinute: 'daily' in t ? minuteOf(t.daily) : -1,
      audience, audienceSegments: segs,
    };
  }

  private compileAudience(a: Audience, segs: Set<string>): (rec: UserRecord) => boolean {
    if ('segment' in a) {
      segs.add(a.segment);
      const { segment, tier } = a;
      return (rec) => this.segments.isMember(rec, segment, tier);
    }
    if ('not' in a) {
      const inner = this.compileAudience(a.not, segs);
      return (rec) => !inner(rec);
    }
    const parts = ('all' in a ? a.all : a.any).map((x) => this.compileAudience(x, segs));
    return 'all' in a ? (rec) => parts.every((p) => p(rec)) : (rec) => parts.some((p) => p(rec));
  }

  async open(store: KvStore, ctx: OperatorContext): Promise<void> {
    this.ctxRef = ctx;
    for await (const entries of store.scan({ gte: CELL_PREFIX, lt: 'n0' }, 1024)) {
      for (const e of entries) {
        const vals = new Float64Array(NF);
        const parts = new TextDecoder().decode(e.value).split(',');
        for (let i = 0; i < NF && i < parts.length; i++) vals[i] = Number(parts[i]);
        this.cells.set(e.key.slice(CELL_PREFIX.length), vals);
      }
    }
  }

  // -------------------------------------------------------------------------------------------
  // Events

  processBatch(b: EventColumns, recs: readonly (UserRecord | null)[], start: number, end: number, ctx: OperatorContext): void {
    const { status, type, typeCode, ts, eventId, props, amount, triggerId } = b;
    let q = 0;
    const queue = this.queue;
    for (let i = start; i < end; i++) {
      // Segment changes this row caused come first, in the order they were made.
      while (q < queue.length && queue[q]!.row <= i) {
        const c = queue[q++]!;
        this.onSegmentChange(c.rec, c.segment, c.change, c.tier, c.previous, c.t, ctx);
      }
      const rec = recs[i];
      if (status[i] !== 0 || rec == null) continue;
      const u = rec.slots[this.slotIndex] as CampUser;
      const t = ts[i]!;
      const name = type[i]!;
      const code = typeCode[i]!;
      const pr = props[i];
      if (pr != null) this.foldConsent(u, pr, t);
      if (code === EventType.purchase) this.attribute(u, t, amount[i]!);
      else if (code >= EventType.message_sent && code <= EventType.message_clicked || name === 'message_bounced') this.outcome(u, name, triggerId[i]!);
      if (this.unlessTypes.has(name)) this.noteUnless(u, name, t, ctx.watermark);
      const evs = this.byEvent.get(name);
      if (evs !== undefined) {
        const values = (): Record<string, string> => eventParams(b, i, rec.id);
        for (const c of evs) this.decide(rec, u, c, t, { key: `e:${eventId[i]}`, reason: `event:${eventId[i]}`, values }, ctx);
      }
      const after = this.byAfter.get(name);
      if (after !== undefined) {
        for (const c of after) this.anchor(rec, u, c, eventId[i]!, t, b, i, ctx);
      }
    }
    for (; q < queue.length; q++) {
      const c = queue[q]!;
      this.onSegmentChange(c.rec, c.segment, c.change, c.tier, c.previous, c.t, ctx);
    }
    queue.length = 0;
  }

  private foldConsent(u: CampUser, pr: Readonly<Record<string, string>>, t: number): void {
    const { marketing, channelPrefix } = this.file.consent;
    for (const k in pr) {
      if (k !== marketing && !k.startsWith(channelPrefix)) continue;
      const v = pr[k]!;
      const c = u.consent.get(k);
      if (c === undefined || t > c[0] || (t === c[0] && v > c[1])) u.consent.set(k, [t, v]);
    }
  }

  /** A purchase converts every recent trigger whose attribution window holds it; revenue adds up. */
  private attribute(u: CampUser, t: number, amount: number): void {
    const a = Number.isFinite(amount) ? amount : 0;
    for (let k = 0; k < u.rId.length; k++) {
      const s = u.rTs[k]!;
      if (!(t > s && t <= s + this.attributionMs)) continue;
      const cell = this.cell(u.rCamp[k]!, u.rVar[k]!, u.rDay[k]!);
      if ((u.rFlags[k]! & F_CONVERTED) === 0) {
        u.rFlags[k]! |= F_CONVERTED;
        cell[FI.converted]! += 1;
      }
      cell[FI.revenue]! += a;
    }
  }

  /** Sender outcomes: counted once per trigger. */
  private outcome(u: CampUser, type: string, id: string): void {
    if (id === '') return;
    const k = u.rId.indexOf(id);
    if (k < 0) return;
    const flag = type === 'message_delivered' ? F_DELIVERED : type === 'message_opened' ? F_OPENED : type === 'message_clicked' ? F_CLICKED : type === 'message_bounced' ? F_BOUNCED : 0;
    if (flag === 0 || (u.rFlags[k]! & flag) !== 0) return;
    u.rFlags[k]! |= flag;
    const f = flag === F_DELIVERED ? FI.delivered : flag === F_OPENED ? FI.opened : flag === F_CLICKED ? FI.clicked : FI.bounced;
    this.cell(u.rCamp[k]!, u.rVar[k]!, u.rDay[k]!)[f]! += 1;
  }

  /** An `unless` event: follow-ups anchored before it stop at it (steps due later are cancelled). */
  private noteUnless(u: CampUser, type: string, t: number, watermark: number): void {
    let list = u.unless.get(type);
    if (list === undefined) u.unless.set(type, (list = []));
    list.splice(upperBound(list, t), 0, t);
    const floor = watermark - this.keepUnlessMs;
    let drop = 0;
    while (drop < list.length - 1 && list[drop]! < floor) drop++;
    if (drop > 0) list.splice(0, drop);
    for (let k = 0; k < u.fCamp.length; k++) {
      const c = this.byId.get(u.fCamp[k]!);
      if (c === undefined || !('after' in c.def.trigger) || c.def.trigger.unless !== type) continue;
      if (t > u.fTs[k]! && t < u.fStop[k]!) u.fStop[k] = t;
    }
  }

  /** A follow-up chain for one anchor event (a cart): its first step is scheduled. */
  private anchor(rec: UserRecord, u: CampUser, c: Compiled, anchorId: string, t: number, b: EventColumns, i: number, ctx: OperatorContext): void {
    const trig = c.def.trigger as { after: string; unless?: string };
    // An unless event already seen after the anchor (out of order) stops it from the start.
    let stop = NEVER;
    if (trig.unless !== undefined) {
      const list = u.unless.get(trig.unless);
      if (list !== undefined) {
        const at = upperBound(list, t);
        if (at < list.length) stop = list[at]!;
      }
    }
    u.fCamp.push(c.id);
    u.fAnchor.push(anchorId);
    u.fTs.push(t);
    u.fStep.push(0);
    // The anchor event's values of the placeholders the params use, kept now (the event is gone
    // when the steps fire). Values, not pre-rendered text: the params are rendered once, at the
    // step, so a prop whose value holds `{{user_id}}` or `{{step}}` stays that literal text.
    const values = eventParams(b, i, rec.id);
    const kept: Record<string, string> = {};
    for (const k of c.paramKeys) {
      const v = values[k];
      if (v !== undefined) kept[k] = v;
    }
    u.fParams.push(JSON.stringify({ [ANCHOR_VALUES]: kept }));
    u.fStop.push(stop);
    this.reschedule(rec, u, ctx);
  }

  // -------------------------------------------------------------------------------------------
  // Segment changes and timers

  private onSegmentChange(rec: UserRecord, segment: string, change: string, tier: string, previous: string, t: number, ctx: OperatorContext, scan = false): void {
    if (rec.deleted) return;
    const u = rec.slots[this.slotIndex] as CampUser;
    for (const c of scan ? [] : (this.bySegment.get(segment) ?? [])) {
      const trig = c.def.trigger as { segment: string; on?: string; tier?: string };
      const on = trig.on ?? 'enter';
      let hit: boolean;
      if (on === 'enter') hit = change === 'enter';
      else if (on === 'exit') hit = change === 'exit';
      else {
        // Tier order is the definition order, highest first: a move to an earlier tier is up.
        if (change !== 'tier_change') continue;
        const up = this.segments.tierRank(segment, tier) < this.segments.tierRank(segment, previous);
        hit = on === 'tier_up' ? up : !up;
      }
      if (!hit || (trig.tier !== undefined && trig.tier !== tier)) continue;
      this.decide(rec, u, c, t, { key: `s:${segment}:${change}:${tier}:${t}`, reason: `segment:${segment}:${change}${tier === '' ? '' : `:${tier}`}`, values: () => ({ user_id: rec.id, segment, tier }) }, ctx);
    }
    // Daily campaigns: a user who came into the audience gets the next slot.
    for (const c of this.daily) {
      if (!c.audienceSegments.has(segment) || u.daily.has(c.id)) continue;
      if (c.audience!(rec)) {
        u.daily.set(c.id, this.nextSlot(c, t));
        this.reschedule(rec, u, ctx);
      }
    }
  }

  /** The first local `HH:MM` of campaign c strictly after instant t (engine time zone). */
  private nextSlot(c: Compiled, t: number): number {
    let day = this.cal.dayOf(t);
    for (;;) {
      const at = localInstant(this.cal, day, c.dailyMinute);
      if (at > t) return at;
      day++;
    }
  }

  onTimer(rec: UserRecord, _kind: string, ts: number, ctx: OperatorContext): void {
    const u = rec.slots[this.slotIndex] as CampUser;
    if (u.timerTs === ts) u.timerTs = Number.NaN;
    // Follow-up steps due now, in (due, anchor) order.
    const due: [number, number][] = [];
    for (let k = 0; k < u.fCamp.length; k++) {
      const c = this.byId.get(u.fCamp[k]!);
      if (c === undefined) {
        u.fStep[k] = Number.MAX_SAFE_INTEGER; // campaign removed from the file: the chain ends
        continue;
      }
      const at = u.fTs[k]! + c.delays[u.fStep[k]!]!;
      if (at <= ts) due.push([at, k]);
    }
    due.sort((a, b) => a[0] - b[0] || (u.fAnchor[a[1]]! < u.fAnchor[b[1]]! ? -1 : 1));
    for (const [at, k] of due) {
      const c = this.byId.get(u.fCamp[k]!)!;
      const step = u.fStep[k]!;
      if (at > u.fStop[k]!) {
        // The unless event came first: this step and the later ones are cancelled.
        this.cell(c.id, '*', this.cal.dayOf(at))[FI.followups_cancelled]! += c.delays.length - step;
        u.fStep[k] = c.delays.length;
        continue;
      }
      const anchored = u.fParams[k]!;
      const values = (): Record<string, string> => ({ user_id: rec.id, step: String(step + 1) });
      this.decide(rec, u, c, at, { key: `f:${u.fAnchor[k]}:${step}`, reason: `followup:${u.fAnchor[k]}:${step + 1}`, values, anchored }, ctx);
      u.fStep[k] = step + 1;
    }
    // Finished chains leave.
    for (let k = u.fCamp.length - 1; k >= 0; k--) {
      const c = this.byId.get(u.fCamp[k]!);
      if (c !== undefined && u.fStep[k]! < c.delays.length) continue;
      u.fCamp.splice(k, 1);
      u.fAnchor.splice(k, 1);
      u.fTs.splice(k, 1);
      u.fStep.splice(k, 1);
      u.fParams.splice(k, 1);
      u.fStop.splice(k, 1);
    }
    // Daily slots due now.
    for (const [id, at] of [...u.daily]) {
      if (at > ts) continue;
      const c = this.byId.get(id);
      if (c === undefined || !c.audience!(rec)) {
        u.daily.delete(id); // out of the audience: rescheduled when it comes back in
        continue;
      }
      const label = this.cal.dayLabel(this.cal.dayOf(at));
      this.decide(rec, u, c, at, { key: `d:${label}`, reason: `daily:${label}`, values: () => ({ user_id: rec.id }) }, ctx);
      u.daily.set(id, this.nextSlot(c, at));
    }
    this.reschedule(rec, u, ctx);
  }

  /** One timer per user, at its earliest follow-up step or daily slot. */
  private reschedule(rec: UserRecord, u: CampUser, ctx: OperatorContext): void {
    let due = NEVER;
    for (let k = 0; k < u.fCamp.length; k++) {
      const c = this.byId.get(u.fCamp[k]!);
      if (c === undefined || u.fStep[k]! >= c.delays.length) continue;
      due = Math.min(due, u.fTs[k]! + c.delays[u.fStep[k]!]!);
    }
    for (const at of u.daily.values()) due = Math.min(due, at);
    if (due === u.timerTs || (due === NEVER && Number.isNaN(u.timerTs))) return;
    if (!Number.isNaN(u.timerTs)) ctx.timers.cancel(rec.id, CAMP_TIMER, u.timerTs);
    if (due !== NEVER) ctx.timers.register(rec.id, CAMP_TIMER, due);
    u.timerTs = due === NEVER ? Number.NaN : due;
  }

  release(rec: UserRecord, ctx: OperatorContext): void {
    const u = rec.slots[this.slotIndex] as CampUser;
    if (!Number.isNaN(u.timerTs)) ctx.timers.cancel(rec.id, CAMP_TIMER, u.timerTs);
  }

  beforeMerge(_into: UserRecord, from: UserRecord, ctx: OperatorContext): void {
    this.release(from, ctx);
    (from.slots[this.slotIndex] as CampUser).timerTs = Number.NaN;
  }

  afterMerge(into: UserRecord, ctx: OperatorContext): void {
    const u = into.slots[this.slotIndex] as CampUser;
    // The merged chains and slots may be due earlier than the member's own timer.
    if (!Number.isNaN(u.timerTs)) ctx.timers.cancel(into.id, CAMP_TIMER, u.timerTs);
    u.timerTs = Number.NaN;
    this.reschedule(into, u, ctx);
  }

  // -------------------------------------------------------------------------------------------
  // Decisions

  private consented(u: CampUser, key: string): boolean {
    const v = u.consent.get(key)?.[1];
    return v === undefined ? this.file.consent.unknown === 'allow' : CONSENT_YES.has(v.toLowerCase());
  }

  /**
   * One decision for campaign c, user rec, at instant t. Emits a Trigger (or a control Trigger)
   * or counts the reason it was suppressed.
   */
  private decide(rec: UserRecord, u: CampUser, c: Compiled, t: number, cause: Cause, ctx: OperatorContext): void {
    if (c.audience !== null && !c.audience(rec)) return;
    const day = this.cal.dayOf(t);
    const last = u.last.get(c.id);
    if (last !== undefined && (c.once || t - last < c.cooldown)) {
      this.cell(c.id, '*', day)[FI.reentry_skipped]! += 1;
      return;
    }
    const userId = rec.id;
    const h = hash01(`${c.id}|${userId}`);
    const variant = h < c.control ? null : (c.variants.find((v) => h < v.upTo) ?? c.variants[c.variants.length - 1]!);
    const arm = variant === null ? 'control' : variant.name;
    const cell = this.cell(c.id, arm, day);
    cell[FI.eligible]! += 1;
    if (c.promotional && !this.consented(u, this.file.consent.marketing)) {
      cell[FI.suppressed_consent]! += 1;
      return;
    }
    const prefix = this.file.consent.channelPrefix;
    const channels = c.def.action.channels.filter((ch) => this.consented(u, prefix + ch));
    if (channels.length === 0) {
      cell[FI.suppressed_channel]! += 1;
      return;
    }
    let sendAt = t;
    if (c.promotional && this.quiet !== null) {
      sendAt = this.afterQuietHours(t);
      if (sendAt !== t) cell[FI.deferred_quiet_hours]! += 1;
    }
    this.pruneSends(u, sendAt);
    if (this.capped(u, c, channels[0]!, sendAt)) {
      cell[FI.suppressed_cap]! += 1;
      return;
    }
    const control = variant === null;
    const template = variant?.template ?? c.def.action.template;
    const params: Record<string, string> = {};
    let values = cause.values();
    const anchored = cause.anchored === undefined ? null : (JSON.parse(cause.anchored) as Record<string, unknown>);
    const kept = anchored?.[ANCHOR_VALUES];
    // The anchor event's values come first (they were the first to be filled before issue 17 too).
    if (kept !== null && typeof kept === 'object') values = { ...values, ...(kept as Record<string, string>) };
    // The holdout renders the first variant's params (what it would have been sent).
    const pv = variant ?? c.variants[0]!;
    for (const [k, v] of Object.entries(pv.params)) {
      // A follow-up from an older checkpoint holds params pre-rendered against its anchor.
      const legacy = kept === undefined ? anchored?.[`${pv.name}.${k}`] : undefined;
      params[k] = render(typeof legacy === 'string' ? legacy : v, values);
    }
    const id = triggerId(c.id, userId, cause.key);
    u.last.set(c.id, t);
    if (control) cell[FI.control]! += 1;
    else {
      cell[FI.sent]! += 1;
      const at = upperBound(u.sendTs, sendAt);
      u.sendTs.splice(at, 0, sendAt);
      u.sendCamp.splice(at, 0, c.id);
      u.sendChan.splice(at, 0, channels[0]!);
    }
    this.remember(u, id, c.id, arm, sendAt, control ? F_CONTROL : 0, day, ctx.watermark);
    this.triggers++;
    ctx.emit(Topic.trigger, crmstream.v1.Trigger.encode({
      trigger_id: id, campaign_id: c.id, variant: arm, control, user_id: userId, channels, template_id: template, params,
      reason: cause.reason, event_ts: Math.trunc(t), send_after_ts: Math.trunc(sendAt),
    }).finish());
  }

  private remember(u: CampUser, id: string, camp: string, arm: string, sendAt: number, flags: number, day: number, watermark: number): void {
    // Triggers past attribution and sender reports leave first.
    const floor = watermark - this.keepRecentMs;
    for (let k = u.rId.length - 1; k >= 0; k--) {
      if (!(u.rTs[k]! < floor)) continue;
      u.rId.splice(k, 1);
      u.rCamp.splice(k, 1);
      u.rVar.splice(k, 1);
      u.rTs.splice(k, 1);
      u.rFlags.splice(k, 1);
      u.rDay.splice(k, 1);
    }
    u.rId.push(id);
    u.rCamp.push(camp);
    u.rVar.push(arm);
    u.rTs.push(sendAt);
    u.rFlags.push(flags);
    u.rDay.push(day);
  }

  private pruneSends(u: CampUser, t: number): void {
    const floor = t - this.keepSendsMs;
    let n = 0;
    while (n < u.sendTs.length && u.sendTs[n]! <= floor - this.opts.allowedLatenessMs) n++;
    if (n > 0) {
      u.sendTs.splice(0, n);
      u.sendCamp.splice(0, n);
      u.sendChan.splice(0, n);
    }
  }

  /** Would one more message at `at` break a cap? Rolling windows (at − within, at]. */
  private capped(u: CampUser, c: Compiled, channel: string, at: number): boolean {
    const count = (within: number, match: (k: number) => boolean): number => {
      let n = 0;
      for (let k = 0; k < u.sendTs.length; k++) if (u.sendTs[k]! > at - within && u.sendTs[k]! <= at && match(k)) n++;
      return n;
    };
    for (const cap of c.caps) if (count(cap.within, (k) => u.sendCamp[k] === c.id) >= cap.max) return true;
    for (const cap of this.globalCaps) {
      if (cap.scope === 'user' && count(cap.within, () => true) >= cap.max) return true;
      if (cap.scope === 'channel' && cap.channel === channel && count(cap.within, (k) => u.sendChan[k] === channel) >= cap.max) return true;
    }
    return false;
  }

  /** t itself, or the end of the quiet hours t falls in (local time of the quiet-hours zone). */
  private afterQuietHours(t: number): number {
    const cal = this.quietCal!;
    const { start, end } = this.quiet!;
    // Minute of the local day from the zone offset at t: no day-start search on the common path.
    const local = t + cal.offset(t);
    const minute = Math.floor((((local % 86_400_000) + 86_400_000) % 86_400_000) / 60_000);
    const wraps = start > end; // 21:00–08:00 spans midnight
    const inside = wraps ? minute >= start || minute < end : minute >= start && minute < end;
    if (!inside) return t;
    const day = Math.floor(local / 86_400_000);
    return localInstant(cal, wraps && minute >= start ? day + 1 : day, end);
  }

  private cell(camp: string, variant: string, day: number): Float64Array {
    const key = `${camp}|${variant}|${day}`;
    let c = this.cells.get(key);
    if (c === undefined) this.cells.set(key, (c = new Float64Array(NF)));
    this.dirty.add(key);
    return c;
  }

  snapshot(ops: WriteOp[]): void {
    const enc = new TextEncoder();
    for (const key of this.dirty) ops.push({ type: 'put', key: CELL_PREFIX + key, value: enc.encode(Array.from(this.cells.get(key)!).join(',')) });
  }

  committed(): void {
    // Cells change only in processBatch / onTimer, never while a checkpoint is being written.
    this.dirty.clear();
  }

  async close(): Promise<void> {}

  /** Campaign KPI rows per (campaign, variant, local day), in campaign order then variant then day. */
  rows(): CampaignRow[] {
    const order = new Map(this.campaigns.map((c, i) => [c.id, i]));
    const out: CampaignRow[] = [];
    for (const [key, vals] of this.cells) {
      const [campaign, variant, day] = key.split('|') as [string, string, string];
      const values = {} as Record<CampaignField, number>;
      CAMPAIGN_FIELDS.forEach((f, i) => (values[f] = vals[i]!));
      out.push({ campaign, variant, day: this.cal.dayLabel(Number(day)), values });
    }
    return out.sort((a, b) => (order.get(a.campaign) ?? 1e9) - (order.get(b.campaign) ?? 1e9) || cmp(a.variant, b.variant) || cmp(a.day, b.day));
  }

  /** A user's recent triggers (kept for attribution and sender outcomes), oldest first. */
  recentOf(rec: UserRecord): { trigger_id: string; campaign: string; variant: string; send_after: number; delivered: boolean; opened: boolean; clicked: boolean; converted: boolean }[] {
    const u = rec.slots[this.slotIndex] as CampUser;
    return u.rId.map((id, k) => ({
      trigger_id: id, campaign: u.rCamp[k]!, variant: u.rVar[k]!, send_after: u.rTs[k]!,
      delivered: (u.rFlags[k]! & F_DELIVERED) !== 0, opened: (u.rFlags[k]! & F_OPENED) !== 0,
      clicked: (u.rFlags[k]! & F_CLICKED) !== 0, converted: (u.rFlags[k]! & F_CONVERTED) !== 0,
    }));
  }

  /** Campaign definitions in file order (ids, variants and weights, for reports). */
  get definitions(): readonly CampaignDef[] {
    return this.campaigns.map((c) => c.def);
  }
}

const cmp = (a: string, b: string): number => (a < b ? -1 : a > b ? 1 : 0);

const CONSENT_YES = new Set(['true', 'yes', 'y', '1']);

function minuteOf(hhmm: string): number {
  return Number(hhmm.slice(0, 2)) * 60 + Number(hhmm.slice(3, 5));
}

/** The instant of local time `minute` (minutes after midnight) on local day `day`. */
function localInstant(cal: Calendar, day: number, minute: number): number {
  const start = cal.dayStart(day);
  const naive = start + minute * 60_000;
  // A daylight-saving change between midnight and the slot moves it by the offset change.
  return naive - (cal.offset(naive) - cal.offset(start));
}

/** A uniform number in [0, 1) from a string: the experiment assignment (stable across runs and versions). */
export function hash01(s: string): number {
  return hashA(0x5eed, s) / 4_294_967_296;
}

/** The deterministic trigger id: 64 bits of (campaign, user, cause) as 16 hex digits. */
export function triggerId(campaign: string, user: string, key: string): string {
  const s = `${campaign}|${user}|${key}`;
  return hashA(0x7419, s).toString(16).padStart(8, '0') + hashB(0x7419, s).toString(16).padStart(8, '0');
}

/** The fields of the causing event that params may use: {{event.<field>}}, {{event.props.<key>}}, {{user_id}}. */
function eventParams(b: EventColumns, i: number, user: string): Record<string, string> {
  const out: Record<string, string> = {
    user_id: user, 'event.event_id': b.eventId[i]!, 'event.type': b.type[i]!, 'event.order_id': b.orderId[i]!,
    'event.channel': b.channel[i]!, 'event.platform': b.platform[i]!, 'event.ts': String(b.ts[i]!),
    'event.amount': Number.isFinite(b.amount[i]!) ? String(b.amount[i]!) : '',
  };
  const pr = b.props[i];
  if (pr != null) for (const k in pr) out[`event.props.${k}`] = pr[k]!;
  return out;
}

/** A `{{name}}` placeholder in a param template. */
const PLACEHOLDER = /\{\{\s*([\w.:-]+)\s*\}\}/g;
/** The key of a follow-up's kept anchor values in `fParams` (no `variant.param` key can be '='). */
const ANCHOR_VALUES = '=';

/**
 * `{{name}}` placeholders replaced by the cause's values ('' when it has none), in one pass: a
 * value is never scanned again, so text from an event (a prop holding `{{user_id}}`) stays literal.
 */
function render(template: string, values: Readonly<Record<string, string>>): string {
  if (!template.includes('{{')) return template;
  return template.replace(PLACEHOLDER, (_m, k: string) => values[k] ?? '');
}
