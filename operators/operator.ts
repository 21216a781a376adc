import type { EventColumns } from '../engine/batch.js';
import type { BinReader, BinWriter } from '../state/codec.js';
import type { WriteOp, KvStore } from '../state/store.js';

/**
 * The piece of a user's state one operator owns, and how it is stored and merged. `merge` folds an
 * anonymous profile into the member it turned out to be (identity stitching), so it must be the
 * same whatever order the two profiles' events arrived in: min/max/sum, never "last write wins".
 */
export interface StateSlot<S> {
  /** Stable small integer stored with the record; never reuse a retired id. */
  readonly id: number;
  create(): S;
  encode(s: S, w: BinWriter): void;
  decode(r: BinReader): S;
  merge(into: S, from: S): void;
}

/**
 * One user's state: a fixed array of slots, one per keyed operator, in operator order. A class with
 * every field set in the constructor, so every record has the same hidden class.
 */
export class UserRecord {
  /** Canonical profile id (member id, or ANON_PREFIX + anonymous id). */
  readonly id: string;
  readonly slots: unknown[];
  /** Changed since the last checkpoint: must be written before it may be evicted. */
  dirty = false;
  /** Merged into another profile: deleted at the next checkpoint. */
  deleted = false;
  /** Second-chance bit for the cache's CLOCK eviction. */
  touched = true;

  constructor(id: string, slots: unknown[]) {
    this.id = id;
    this.slots = slots;
  }
}

/** Timers: durable, per user, in event time (engine/timers.ts). */
export interface TimerApi {
  /** Schedules `kind` for `userId` at event time `ts`; idempotent for the same (user, kind, ts). */
  register(userId: string, kind: string, ts: number): void;
  /** Cancels it if scheduled. Operators must still check their state when a timer fires (it may have been registered for a profile since merged). */
  cancel(userId: string, kind: string, ts: number): void;
}

/** What the runtime hands an operator. One object per engine, fields updated in place. */
export interface OperatorContext {
  /** The watermark in effect for the rows being processed (constant within one processBatch call). */
  readonly watermark: number;
  readonly timers: TimerApi;
  /** Appends an output record to the durable outbox (written in the same checkpoint as the state). */
  emit(topic: number, payload: Uint8Array): void;
  /** The IANA time zone of calendar windows. */
  readonly timeZone: string;
}

/**
 * A keyed (or global) operator. Lifecycle, driven by the runtime:
 * `open` (restore from the store) → repeated `processBatch` / `onTimer` (event-time order) →
 * at every checkpoint barrier `snapshot` (prepare: describe non-keyed state in the atomic batch)
 * then `committed` once the batch is durable (or nothing, if the write failed: abort) →
 * `close`. Per-user state lives in the operator's slot of each `UserRecord` and is persisted by the
 * runtime; only state that is not per user (e.g. KPI aggregates) goes through `snapshot`.
 *
 * Prepare / commit is what makes a failed checkpoint change nothing: `snapshot` must leave memory
 * exactly as it found it (dirty marks, compaction, retention all wait for `committed`), so the
 * runtime can retry the checkpoint — with the same ops plus whatever happened since — and the
 * running differences that aggregates are kept as never lose a step.
 */
export interface Operator {
  readonly name: string;
  /** Per-user state, or null for an operator that keeps none. */
  readonly slot: StateSlot<unknown> | null;
  /** Timer kinds this operator owns (no '|' in a kind). */
  readonly timerKinds: readonly string[];
  open(store: KvStore, ctx: OperatorContext): Promise<void>;
  /**
   * Rows [start, end) of `batch`. Skip rows with `batch.status[i] !== 0` (rejected). `recs[i]` is the
   * row's profile, or null for rows without a user (`cost`).
   */
  processBatch(batch: EventColumns, recs: readonly (UserRecord | null)[], start: number, end: number, ctx: OperatorContext): void;
  /** A timer of one of `timerKinds` fired for `rec` at event time `ts` (the watermark has passed it). */
  onTimer(rec: UserRecord, kind: string, ts: number, ctx: OperatorContext): void;
  /**
   * Prepare: adds this operator's non-keyed state to the checkpoint batch WITHOUT changing memory.
   * Records emitted here (`ctx.emit`) are part of the same checkpoint (the runtime takes them back
   * if the write fails). May be called again after a failed write: it must then describe
   * everything not yet committed.
   */
  snapshot(ops: WriteOp[], ctx: OperatorContext): void;
  /** Commit: the batch of the last `snapshot` is durable; clear dirty marks, compact, drop what is final. */
  committed(): void;
  /**
   * Identity stitch: `from` (an anonymous profile) is about to be folded into `into` with the
   * slots' `merge`. Operators whose aggregates depend on per-user facts retract both profiles'
   * contributions here…
   */
  beforeMerge?(into: UserRecord, from: UserRecord, ctx: OperatorContext): void;
  /** …and add the merged profile's contribution here. */
  afterMerge?(into: UserRecord, ctx: OperatorContext): void;
  /**
   * Scale-out: `rec` leaves this engine as it is (it merges into a member whose profile lives in
   * another partition, where beforeMerge/afterMerge run). Cancel what this engine would still do
   * for it (its timers); its contributions stay in this engine's aggregates, which the target's
   * beforeMerge retracts from its own: the sum over partitions stays exact.
   */
  release?(rec: UserRecord, ctx: OperatorContext): void;
  close(): Promise<void>;
}

/** Canonical ids of profiles that have not (yet) been stitched to a member id. */
export const ANON_PREFIX = 'anon:';
