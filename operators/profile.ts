import type { EventColumns } from '../engine/batch.js';
import { EventType, isActivity } from '../engine/event-types.js';
import type { BinReader, BinWriter } from '../state/codec.js';
import type { WriteOp } from '../state/store.js';
import type { Operator, OperatorContext, StateSlot, UserRecord } from './operator.js';

/**
 * The core profile every other operator can rely on. All fields are order-independent folds
 * (min / max / sum with deterministic tie-breaks), so merging an anonymous profile into its member
 * gives the same result as if the events had arrived under the member id all along.
 * NaN = "never".
 */
export class ProfileState {
  /** First activity (SPEC §4: any event except cost and message_*). */
  firstTs = Number.NaN;
  /** Channel of the first activity = first-touch acquisition channel ('' if it carried none). */
  firstChannel = '';
  lastTs = Number.NaN;
  /** Platform of the latest activity. */
  lastPlatform = '';
  signupTs = Number.NaN;
  firstPurchaseTs = Number.NaN;
  lastPurchaseTs = Number.NaN;
  purchases = 0;
  refunds = 0;
  /** Net revenue: purchases − refunds, in the reporting currency. */
  revenue = 0;
  /** Accepted events of any type. */
  events = 0;
}

function minTs(a: number, b: number): number {
  return Number.isNaN(a) || b < a ? b : a;
}
function maxTs(a: number, b: number): number {
  return Number.isNaN(a) || b > a ? b : a;
}

// Ties on ts are broken by the smaller channel / larger platform string: arbitrary but independent
// of arrival order, which is what makes merge and replay exact.
function foldFirst(p: ProfileState, ts: number, channel: string): void {
  if (Number.isNaN(p.firstTs) || ts < p.firstTs || (ts === p.firstTs && channel < p.firstChannel)) {
    p.firstTs = ts;
    p.firstChannel = channel;
  }
}
function foldLast(p: ProfileState, ts: number, platform: string): void {
  if (Number.isNaN(p.lastTs) || ts > p.lastTs || (ts === p.lastTs && platform > p.lastPlatform)) {
    p.lastTs = ts;
    p.lastPlatform = platform;
  }
}

export const profileSlot: StateSlot<ProfileState> = {
  id: 1,
  create: () => new ProfileState(),
  encode(p, w: BinWriter) {
    w.optUint(p.firstTs).str(p.firstChannel).optUint(p.lastTs).str(p.lastPlatform)
      .optUint(p.signupTs).optUint(p.firstPurchaseTs).optUint(p.lastPurchaseTs)
      .uint(p.purchases).uint(p.refunds).f64(p.revenue).uint(p.events);
  },
  decode(r: BinReader) {
    const p = new ProfileState();
    p.firstTs = r.optUint();
    p.firstChannel = r.str();
    p.lastTs = r.optUint();
    p.lastPlatform = r.str();
    p.signupTs = r.optUint();
    p.firstPurchaseTs = r.optUint();
    p.lastPurchaseTs = r.optUint();
    p.purchases = r.uint();
    p.refunds = r.uint();
    p.revenue = r.f64();
    p.events = r.uint();
    return p;
  },
  merge(into, from) {
    if (!Number.isNaN(from.firstTs)) foldFirst(into, from.firstTs, from.firstChannel);
    if (!Number.isNaN(from.lastTs)) foldLast(into, from.lastTs, from.lastPlatform);
    into.signupTs = Number.isNaN(from.signupTs) ? into.signupTs : minTs(into.signupTs, from.signupTs);
    into.firstPurchaseTs = Number.isNaN(from.firstPurchaseTs) ? into.firstPurchaseTs : minTs(into.firstPurchaseTs, from.firstPurchaseTs);
    into.lastPurchaseTs = Number.isNaN(from.lastPurchaseTs) ? into.lastPurchaseTs : maxTs(into.lastPurchaseTs, from.lastPurchaseTs);
    into.purchases += from.purchases;
    into.refunds += from.refunds;
    into.revenue += from.revenue;
    into.events += from.events;
  },
};

/** Maintains `ProfileState` for every user event. Keeps no non-keyed state and sets no timers. */
export class ProfileOperator implements Operator {
  readonly name = 'profile';
  readonly slot = profileSlot as StateSlot<unknown>;
  readonly timerKinds: readonly string[] = [];
  /** Index of this operator's slot in UserRecord.slots; set by the runtime. */
  slotIndex = -1;

  async open(): Promise<void> {}

  processBatch(b: EventColumns, recs: readonly (UserRecord | null)[], start: number, end: number, _ctx: OperatorContext): void {
    const slot = this.slotIndex;
    for (let i = start; i < end; i++) {
      const rec = recs[i];
      if (b.status[i] !== 0 || rec == null) continue;
      const p = rec.slots[slot] as ProfileState;
      const code = b.typeCode[i]!;
      const ts = b.ts[i]!;
      p.events++;
      if (isActivity(code)) {
        foldFirst(p, ts, b.channel[i]!);
        foldLast(p, ts, b.platform[i]!);
      }
      if (code === EventType.sign_up) {
        p.signupTs = minTs(p.signupTs, ts);
      } else if (code === EventType.purchase) {
        p.purchases++;
        p.revenue += b.amount[i]!;
        p.firstPurchaseTs = minTs(p.firstPurchaseTs, ts);
        p.lastPurchaseTs = maxTs(p.lastPurchaseTs, ts);
      } else if (code === EventType.refund) {
        p.refunds++;
        p.revenue -= b.amount[i]!;
      }
    }
  }

  onTimer(): void {}
  snapshot(_ops: WriteOp[]): void {}

  committed(): void {}
  async close(): Promise<void> {}
}

/** A profile as plain JSON for queries and exports. Timestamps are ms since epoch or null. */
export interface ProfileView {
  user_id: string;
  first_ts: number | null;
  first_channel: string;
  last_ts: number | null;
  last_platform: string;
  signup_ts: number | null;
  first_purchase_ts: number | null;
  last_purchase_ts: number | null;
  purchases: number;
  refunds: number;
  revenue: number;
  events: number;
}

const orNull = (v: number): number | null => (Number.isNaN(v) ? null : v);

export function profileView(id: string, p: ProfileState): ProfileView {
  return {
    user_id: id, first_ts: orNull(p.firstTs), first_channel: p.firstChannel, last_ts: orNull(p.lastTs),
    last_platform: p.lastPlatform, signup_ts: orNull(p.signupTs), first_purchase_ts: orNull(p.firstPurchaseTs),
    last_purchase_ts: orNull(p.lastPurchaseTs), purchases: p.purchases, refunds: p.refunds, revenue: p.revenue,
    events: p.events,
  };
}
