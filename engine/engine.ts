import { performance } from 'node:perf_hooks';
import path from 'node:path';
import { crmstream } from '../api/proto/gen/crmstream.js';
import type { RecordBatch, Table } from 'apache-arrow';
import type { ExportOptions, ExportWhat } from './arrow-export.js';
import { EventColumns } from './batch.js';
import { resolveConfig, type ConfigInput, type EngineConfig } from './config.js';
import { DedupeIndex } from './dedupe.js';
import { Quarantine } from './quarantine.js';
import { setTimeout as sleep } from 'node:timers/promises';
import { CrmError, cleanupAll, errorText, isCode } from './errors.js';
import { EventType, REJECT_NAMES, ROUTED, Reject, TypeRegistry, rejectName, type RejectName } from './event-types.js';
import { Outbox, Topic, type OutboxRecord, type OutboxSink, type SinkStatus } from './outbox.js';
import { ProfileTable, USER_PREFIX } from './profiles.js';
import { JsonlFileSink } from './sinks/jsonl-file.js';
import { TimerService, type DueTimer } from './timers.js';
import { validateStatic } from './validate.js';
import { InputWatermarks } from './watermarks.js';
import { appendObjectEvent } from './codec.js';
import { ALIAS_PREFIX, IdentityResolver } from '../operators/identity.js';
import { FilterNs, KeyFilter } from './key-filter.js';
import { ANON_PREFIX, type Operator, type StateSlot, type UserRecord } from '../operators/operator.js';
import { KpiOperator, type KpiPartials } from '../operators/kpi.js';
import { parseSegments, withBuiltins, type SegmentDef } from '../operators/segment-rules.js';
import { SegmentOperator, type SegmentReloadReport, type SegmentSizeRow, type SegmentStatus } from '../operators/segments.js';
import { CampaignOperator, type CampaignRow } from '../operators/campaigns.js';
import { parseCampaigns } from '../operators/campaign-rules.js';
import type { CohortGrain, CohortKind, CohortRow, FunnelRow, KpiGrain, KpiRow } from '../operators/kpi-rows.js';
import { ProfileOperator, profileView, type ProfileState, type ProfileView } from '../operators/profile.js';
import { openStore } from '../state/index.js';
import type { KvStore, WriteOp } from '../state/store.js';

/**
 * The event-time runtime. One instance owns one state store (one partition of the key space).
 *
 * Data flows one way: a batch (EventColumns) is validated (static checks), then walked row by row
 * for the checks that depend on order — lateness against the watermark, de-duplication — and for
 * identity; the keyed operators then process runs of rows with `processBatch`. A run ends where the
 * watermark moves (timers up to the new watermark fire there, in event-time order) and where an
 * identity merge happens, so the result never depends on how the input was cut into batches: a
 * replay from a checkpoint, cut differently, reaches the same state bit for bit.
 *
 * The watermark is `max event time − outOfOrdernessMs`, advanced in whole ticks of `tickMs`
 * (default 1 s) so runs stay long on dense streams. With per-input watermarks
 * (`inputWatermarks()`, a Kafka source's partitions) it is the minimum over the inputs
 * (engine/watermarks.ts), so a partition read behind the others never has its events `too_late`.
 *
 * Checkpoints are taken at batch boundaries: dirty profiles, aliases, timer changes, de-duplication
 * ids, outbox records, operator snapshots and the source position go into ONE atomic write.
 * Restarting from the store resumes at that position: exactly-once state.
 */

export const META_KEY = 'm/engine';
const META_VERSION = 1;

/** Control messages travel in band with the data (STYLE practice 9). */
export type SourceItem =
  | { readonly kind: 'batch'; readonly batch: EventColumns; readonly position: unknown }
  | { readonly kind: 'watermark'; readonly ts: number }
  | { readonly kind: 'barrier' }
  | { readonly kind: 'end'; readonly asOf?: number };

/**
 * Scale-out (engine/kafka/tasks.ts): which profiles this engine's partition holds. A row whose
 * profile lives elsewhere is forwarded (outbox topic `route`) instead of processed; an anonymous
 * profile merged into a member held elsewhere moves with the forwarded row.
 */
export interface PartitionRouter {
  owns(canonical: string): boolean;
}

export interface EngineOptions {
  /** Scale-out: this engine holds one partition of the profiles (default: all of them). */
  readonly router?: PartitionRouter;
  /** Operators after the built-in ones (profile), in order. */
  readonly operators?: readonly Operator[];
  /** Extra outbox sinks. The dead-letter file sink is added from the config. */
  readonly sinks?: readonly OutboxSink[];
  /** Use this store instead of opening one from the config (tests). */
  readonly store?: KvStore;
  /** Watermark granularity in ms (default 1000; 1 = advance on every new max event time). */
  readonly tickMs?: number;
  /**
   * Use the time zone and segment definitions the stored state was built with instead of the
   * configured ones (exports and queries of an existing data dir). Without it a different zone is CONFIG_INVALID: windows
   * already cut in one zone cannot be continued in another.
   */
  readonly adoptStoredTimeZone?: boolean;
}

export interface BatchResult {
  accepted: number;
  rejected: number;
  /** Scale-out: rows forwarded to the partition that holds their profile (neither accepted nor rejected here). */
  forwarded?: number;
}

/** What `engine.health()` reports (the server's /readyz and metrics read it). */
export interface EngineHealth {
  /** Set once the engine has failed closed (a batch failed half-way, or checkpoints kept failing). */
  readonly failed: { readonly code: string; readonly message: string } | null;
  readonly checkpointFailuresTotal: number;
  /** Failed checkpoint attempts since the last one that succeeded. */
  readonly consecutiveCheckpointFailures: number;
  readonly lastCheckpointError: string | null;
  /** Wall clock (ms) of the last durable checkpoint; 0 = none in this process. */
  readonly lastCheckpointAt: number;
  readonly sinks: readonly SinkStatus[];
}

interface Meta {
  version: number;
  epoch: number;
  watermark: number | null;
  maxTs: number | null;
  position: unknown;
  rejects: Record<string, number>;
  nextSeq: number;
  customTypes: string[];
  dedupeOldestDay: number;
  accepted: number;
  /** Zone the calendar windows were cut in (absent in stores written before KPIs existed). */
  timeZone?: string;
  /** The configured segment definitions (before built-ins are added) the state was written with. */
  segments?: unknown[];
  /** Segments were on for every event up to this checkpoint (false/absent: events went by without them). */
  segmentsOn?: boolean;
}

const utf8 = new TextEncoder();
const utf8d = new TextDecoder();

export class Engine {
  readonly config: EngineConfig;
  private readonly store: KvStore;
  private readonly types = new TypeRegistry();
  private readonly operators: readonly Operator[];
  private readonly opByTimerKind = new Map<string, Operator>();
  /** Operators that adjust aggregates around identity merges (beforeMerge/afterMerge). */
  private readonly mergeAware: readonly Operator[];
  private readonly kpi: KpiOperator | null;
  private readonly segments: SegmentOperator | null;
  private readonly campaigns: CampaignOperator | null;
  /** The configured segment definitions in effect (before built-ins); changed by reloadSegments. */
  private segmentDefs: SegmentDef[];
  /** The per-user state slots, in record order (operators without per-user state have none). */
  private readonly slots: readonly StateSlot<unknown>[];
  private readonly profiles: ProfileTable;
  private readonly profileSlotIndex: number;
  private readonly identity: IdentityResolver;
  private readonly timers = new TimerService();
  private readonly keyFilter = new KeyFilter();
  private readonly dedupe: DedupeIndex;
  private readonly outbox: Outbox;
  private readonly quarantine = new Quarantine();
  /** The run of rows an operator failed on (set with the failure; written down as suspects or poison). */
  private failedRun: { start: number; end: number; alone: boolean } | null = null;
  private failedTimer: string | null = null;
  private readonly ctx: { watermark: number; timers: TimerService; timeZone: string; emit(topic: number, payload: Uint8Array): void };
  private readonly tickMs: number;
  private recs: (UserRecord | null)[] = [];
  private scratchBatch: EventColumns | null = null;
  private readonly due: DueTimer = { ts: 0, kind: '', user: '' };
  private wm = Number.NEGATIVE_INFINITY;
  private maxTs = Number.NEGATIVE_INFINITY;
  private epoch = 0;
  private positionValue: unknown = null;
  private readonly rejects = new Float64Array(REJECT_NAMES.length + 1);
  private acceptedTotal = 0;
  private lastCheckpointAt = performance.now();
  /** Duration of the last checkpoint and the sum of all (ms; metrics). */
  private checkpointMsLast = 0;
  private checkpointMsTotal = 0;
  private lastCheckpointWall = 0;
  private checkpointFailures = 0;
  private checkpointFailStreak = 0;
  private lastCheckpointError: unknown = null;
  /** Something was processed that no checkpoint holds yet. */
  private uncommitted = false;
  /** The idle checkpoint's timer, and its run while it writes (calls wait for it). */
  private idleTimer: NodeJS.Timeout | null = null;
  private idleRun: Promise<void> | null = null;
  private onFailed: ((err: unknown) => void) | null = null;
  /** Per-input watermarks, once switched on by inputWatermarks() (null: every accepted event moves the watermark). */
  private inputWms: InputWatermarks | null = null;
  private readonly checkpointListeners: ((position: unknown, epoch: number) => void)[] = [];
  private busy = false;
  private closed = false;
  /**
   * Set when processing failed half-way: memory may hold part of a batch. Nothing more is
   * processed and nothing more is checkpointed, so the durable state stays the last consistent
   * one and a restart resumes from it (exactly-once is kept, not papered over).
   */
  private failure: unknown = null;
  /** Reused by ingestArrow. */
  private arrowBatch: EventColumns | null = null;
  /** Timers that fired for a kind no operator owns (config changed): counted, not lost silently. */
  orphanTimers = 0;
  private readonly router: PartitionRouter | null;
  /** Scale-out counters: rows forwarded, anonymous profiles moved out and in, timers of profiles held elsewhere, adopt conflicts. */
  private readonly routing = { forwarded: 0, movedOut: 0, movedIn: 0, strayTimers: 0, adoptConflicts: 0 };
  /** Segment scans (after a rule reload) a restart found unfinished and resumed. */
  private segmentScanResumes = 0;

  private constructor(config: EngineConfig, store: KvStore, opts: EngineOptions) {
    this.config = config;
    this.store = store;
    this.tickMs = opts.tickMs ?? 1000;
    this.router = opts.router ?? null;
    const profileOp = new ProfileOperator();
    this.kpi = config.kpi.enabled ? new KpiOperator({ timeZone: config.time.timeZone, ...config.kpi }) : null;
    this.segmentDefs = config.segments.enabled ? parseSegments({ segments: config.segments.definitions }, 'segments.definitions') : [];
    this.segments = config.segments.enabled
      ? new SegmentOperator(withBuiltins(this.segmentDefs), { timeZone: config.time.timeZone, allowedLatenessMs: config.time.allowedLatenessMs })
      : null;
    this.campaigns = config.campaigns.definitions === null || this.segments === null
      ? null
      : new CampaignOperator(parseCampaigns(config.campaigns.definitions, this.segments.tierNames(), 'campaigns.definitions'), this.segments, {
        timeZone: config.time.timeZone, allowedLatenessMs: config.time.allowedLatenessMs,
      });
    this.operators = [
      profileOp, ...(this.kpi === null ? [] : [this.kpi]), ...(this.segments === null ? [] : [this.segments]),
      ...(this.campaigns === null ? [] : [this.campaigns]), ...(opts.operators ?? []),
    ];
    this.mergeAware = this.operators.filter((op) => op.beforeMerge !== undefined && op.afterMerge !== undefined);
    const slots: StateSlot<unknown>[] = [];
    for (const op of this.operators) {
      if (op.slot !== null) {
        (op as { slotIndex?: number }).slotIndex = slots.length;
        slots.push(op.slot);
      }
      for (const kind of op.timerKinds) this.opByTimerKind.set(kind, op);
    }
    this.profileSlotIndex = profileOp.slotIndex;
    this.slots = slots;
    this.profiles = new ProfileTable(slots, config.state.cacheUsers, this.keyFilter);
    this.identity = new IdentityResolver(config.state.cacheUsers, this.keyFilter);
    this.dedupe = new DedupeIndex(config.dedupe.horizonMs);
    this.outbox = new Outbox(config.outbox);
    const outbox = this.outbox;
    this.ctx = {
      watermark: this.wm,
      timers: this.timers,
      timeZone: config.time.timeZone,
      emit(topic: number, payload: Uint8Array) {
        outbox.append(topic, payload);
      },
    };
    const rotation = { maxBytes: config.jsonl.maxFileBytes, maxFiles: config.jsonl.maxFiles };
    const dlPath = config.deadLetter.path ?? (config.dataDir === null ? null : path.join(config.dataDir, 'deadletter.jsonl'));
    if (dlPath !== null) this.outbox.addSink(new JsonlFileSink('deadletter', [Topic.deadLetter], dlPath, formatDeadLetter, rotation));
    const segPath = config.segments.changesPath ?? (config.dataDir === null ? null : path.join(config.dataDir, 'segment-changes.jsonl'));
    if (segPath !== null && this.segments !== null) this.outbox.addSink(new JsonlFileSink('segment-changes', [Topic.segmentChange], segPath, formatSegmentChange, rotation));
    const trigPath = config.campaigns.triggersPath ?? (config.dataDir === null ? null : path.join(config.dataDir, 'triggers.jsonl'));
    if (trigPath !== null && this.campaigns !== null) this.outbox.addSink(new JsonlFileSink('triggers', [Topic.trigger], trigPath, formatTrigger, rotation));
    for (const s of opts.sinks ?? []) this.outbox.addSink(s);
  }

  /**
   * Creates an engine and restores it from its state store (resuming after the last checkpoint).
   *
   * @example
   * const engine = await Engine.create({ dataDir: './state' });
   * await engine.ingest([{ event_id: 'e1', type: 'visit', anonymous_id: 'a1', ts: Date.now() }]);
   * await engine.close();
   */
  static async create(input: ConfigInput = {}, opts: EngineOptions = {}): Promise<Engine> {
    let config = resolveConfig(input);
    const store = opts.store ?? openStore(config.state.backend, config.dataDir === null ? null : path.join(config.dataDir, 'state'));
    await store.open();
    if (opts.adoptStoredTimeZone === true) {
      // Read-side tools (exports) open a data dir as it was written: its zone and its segment
      // rules (the per-user segment state is laid out by the rules).
      const meta = await readMeta(store);
      const zone = meta?.timeZone ?? config.time.timeZone;
      const defs = meta?.segments ?? config.segments.definitions;
      if (zone !== config.time.timeZone || meta?.segments !== undefined) {
        config = resolveConfig({ ...input, time: { ...input.time, timeZone: zone }, segments: { ...input.segments, definitions: defs } });
      }
    }
    const engine = new Engine(config, store, opts);
    try {
      await engine.restore();
    } catch (err) {
      await store.close().catch(() => undefined); // the restore error is the one to report
      throw err;
    }
    return engine;
  }

  private async restore(): Promise<void> {
    const meta = await readMeta(this.store);
    if (meta !== null) {
      if (meta.version !== META_VERSION) throw new CrmError('STATE_CORRUPT', `checkpoint format ${meta.version} is not supported`);
      if (meta.timeZone !== undefined && meta.timeZone !== this.config.time.timeZone) {
        throw new CrmError('CONFIG_INVALID', `this state was built with time zone ${meta.timeZone}, not ${this.config.time.timeZone}: pass --tz ${meta.timeZone} (time.timeZone) or use a new data dir`);
      }
      this.epoch = meta.epoch;
      this.wm = meta.watermark ?? Number.NEGATIVE_INFINITY;
      this.maxTs = meta.maxTs ?? Number.NEGATIVE_INFINITY;
      this.positionValue = meta.position;
      this.acceptedTotal = meta.accepted;
      this.types.restoreCustom(meta.customTypes);
      for (const [name, n] of Object.entries(meta.rejects)) {
        const code = Reject[name as RejectName];
        if (code !== undefined) this.rejects[code] = n;
      }
    }
    this.ctx.watermark = this.wm;
    // Every stored profile and alias key goes into the filter that spares the hot path its
    // store reads for never-seen ids (one keys scan; the price of a fast first event per user).
    await this.keyFilter.load(this.store, USER_PREFIX, 'u0', FilterNs.user);
    await this.keyFilter.load(this.store, ALIAS_PREFIX, 'a0', FilterNs.alias);
    this.profiles.open(this.store);
    this.identity.open(this.store);
    await this.dedupe.open(this.store, meta?.dedupeOldestDay ?? 0);
    await this.timers.open(this.store, Number.isFinite(this.wm) ? this.wm : -1);
    await this.outbox.open(this.store, meta?.nextSeq ?? 1);
    await this.quarantine.open(this.store);
    for (const op of this.operators) await op.open(this.store, this.ctx);
    // Records committed before a crash but not yet handed to sinks go out now.
    await this.outbox.drain();
    if (this.segments !== null) {
      // Rules different from the stored ones are a reload; a scan cut short by a crash resumes.
      const fresh = meta === null || meta.accepted === 0;
      const pending = this.segments.reconcile({
        fresh, gap: !fresh && meta?.segmentsOn !== true, watermark: this.wm, maxTs: this.maxTs, profileSlot: this.profileSlotIndex,
      });
      if (pending === 'resume') this.segmentScanResumes++;
      if (pending !== 'none') await this.runSegmentScan();
    }
  }

  /** The source position stored with the last checkpoint (null on a fresh store). */
  get position(): unknown {
    return this.positionValue;
  }

  get watermark(): number {
    return this.wm;
  }

  /** The largest accepted event time (ms; -Infinity before the first event). */
  get maxEventTs(): number {
    return this.maxTs;
  }

  /** Rejected events per reason code since the store was created. */
  rejectCounts(): Record<RejectName, number> {
    const out = {} as Record<RejectName, number>;
    for (const name of REJECT_NAMES) out[name] = this.rejects[Reject[name]]!;
    return out;
  }

  get acceptedCount(): number {
    return this.acceptedTotal;
  }

  /** Consumes a source of batches and control messages until it ends. */
  async run(source: AsyncIterable<SourceItem>): Promise<void> {
    for await (const item of source) {
      switch (item.kind) {
        case 'batch':
          await this.ingestColumns(item.batch, item.position);
          break;
        case 'watermark':
          await this.advanceTo(item.ts);
          break;
        case 'barrier':
          await this.checkpoint();
          break;
        case 'end':
          if (item.asOf !== undefined) await this.advanceTo(item.asOf);
          else if (Number.isFinite(this.maxTs)) await this.advanceTo(this.maxTs);
          await this.checkpoint();
          return;
      }
    }
  }

  /**
   * Ingests events given as objects with the SPEC §1 field names (JSON-shaped; `ts` in ms or
   * ISO-8601). Bad ones are rejected with a reason code and dead-lettered; the rest are processed.
   * Returns the counts and, per input event, its reject reason ('' = accepted). `position` (any
   * JSON value, e.g. a source offset) is stored with the checkpoint that covers these events and
   * read back as `engine.position` after a restart, to resume the source there.
   *
   * @example
   * const r = await engine.ingest([{ event_id: 'e1', type: 'sign_up', user_id: 'u1', anonymous_id: 'a1', ts: Date.now() }]);
   * // r.accepted === 1, r.reasons[0] === ''
   */
  async ingest(events: readonly unknown[], position: unknown = this.positionValue, opts: { durable?: boolean } = {}): Promise<BatchResult & { reasons: string[] }> {
    const rows = this.config.batchRows;
    const b = this.scratchBatch ?? (this.scratchBatch = new EventColumns(rows));
    const reasons: string[] = [];
    let accepted = 0;
    let rejected = 0;
    for (let start = 0; start < events.length; start += rows) {
      b.reset();
      const end = Math.min(events.length, start + rows);
      for (let j = start; j < end; j++) appendObjectEvent(b, events[j], 0, null, 'api', this.config.time.timeZone);
      // Only the last chunk carries the new position: a checkpoint after an earlier chunk must
      // not claim the whole array.
      const r = await this.ingestColumns(b, end === events.length ? position : this.positionValue);
      accepted += r.accepted;
      rejected += r.rejected;
      for (let i = 0; i < b.length; i++) reasons.push(b.status[i] === Reject.ok ? '' : rejectName(b.status[i]!));
    }
    if (opts.durable === true) await this.sync();
    return { accepted, rejected, reasons };
  }

  /**
   * Processes one batch. `position` is the source position just after it; it becomes durable with
   * the checkpoint that follows. Checkpoints are taken here when due (interval or dirty profiles).
   */
  async ingestColumns(b: EventColumns, position: unknown = this.positionValue): Promise<BatchResult> {
    if (this.idleRun !== null) await this.waitIdle();
    this.enter();
    this.uncommitted = true;
    try {
      validateStatic(b, this.config, this.types);
      // The timers this batch can fire must be in memory before the synchronous row loop.
      let batchMax = Number.NEGATIVE_INFINITY;
      for (let i = 0; i < b.length; i++) if (b.status[i] === Reject.ok && b.ts[i]! > batchMax) batchMax = b.ts[i]!;
      if (Number.isFinite(batchMax)) await this.timers.preload(this.tickFloor(batchMax - this.config.time.outOfOrdernessMs));
      let result: BatchResult;
      try {
        result = this.processRows(b);
        this.positionValue = position;
        this.deadLetterRejected(b);
      } catch (err) {
        this.fail(err);
        await this.writeDownFailure(b);
        throw err;
      }
      await this.activateReadySegments();
      if (this.checkpointDue()) await this.checkpointNow();
      return result;
    } finally {
      this.busy = false;
      this.armIdleCheckpoint();
    }
  }

  /**
   * Processes an Arrow record batch with the event columns of SPEC §1 (docs/ARROW.md), column by
   * column in engine batches of `batchRows` — no object per event. `position` is stored with the
   * checkpoints it reaches, as for ingestColumns.
   *
   * @example
   * for await (const rb of RecordBatchReader.from(stream)) await engine.ingestArrow(rb);
   */
  async ingestArrow(rb: RecordBatch, position: unknown = this.positionValue): Promise<BatchResult> {
    // Loaded on first use: apache-arrow is not part of every engine's start-up.
    const { appendArrowRows, arrowReaders } = await import('./sources/arrow.js');
    const readers = arrowReaders(rb, 'ingestArrow');
    const b = (this.arrowBatch ??= new EventColumns(this.config.batchRows));
    const total: BatchResult = { accepted: 0, rejected: 0 };
    for (let from = 0; from < rb.numRows; from += b.capacity) {
      b.reset();
      const to = Math.min(rb.numRows, from + b.capacity);
      appendArrowRows(b, rb, from, to, 'arrow:', readers);
      const r = await this.ingestColumns(b, position);
      total.accepted += r.accepted;
      total.rejected += r.rejected;
    }
    return total;
  }

  private tickFloor(t: number): number {
    return Math.floor(t / this.tickMs) * this.tickMs;
  }

  private processRows(b: EventColumns): BatchResult {
    if (this.recs.length < b.length) this.recs = new Array<UserRecord | null>(b.capacity).fill(null);
    const recs = this.recs;
    const { status, ts, eventId, userId, anonymousId, typeCode, given, moved } = b;
    const router = this.router;
    const lateness = this.config.time.allowedLatenessMs;
    const ooo = this.config.time.outOfOrdernessMs;
    // Per-input watermarks (inputWatermarks()): the batch's input, −1 for rows from no input.
    const inputs = this.inputWms;
    const input = inputs === null ? -1 : inputs.begin(b);
    let accepted = 0;
    let forwarded = 0;
    let runStart = 0;
    // Non-null only after an operator failure was written down (rare): the ids are checked then.
    const q = this.quarantine.active ? this.quarantine : null;
    for (let i = 0; i < b.length; i++) {
      recs[i] = null;
      if (status[i] !== Reject.ok) continue;
      if (q !== null && q.isPoison(eventId[i]!)) {
        b.reject(i, Reject.poison, 'an operator failed on this record before; quarantined (docs/GUARANTEES.md "Poison records")');
        q.quarantined++;
        continue;
      }
      const t = ts[i]!;
      if (t < this.wm - lateness) {
        b.reject(i, Reject.too_late, `event time ${t} is more than ${lateness} ms behind the watermark ${this.wm}`);
        continue;
      }
      if (this.dedupe.checkAndAdd(eventId[i]!, t)) {
        b.reject(i, Reject.duplicate, `event_id ${eventId[i]} already seen`);
        continue;
      }
      accepted++;
      if (t > this.maxTs) this.maxTs = t;
      // With inputs: the minimum over them (engine/watermarks.ts), never past the timers loaded
      // for this batch (an input declared idle between batches is caught up by advanceTo).
      const w = inputs === null ? this.tickFloor(t - ooo) : Math.min(inputs.observe(input, t), this.timers.loadedHorizon);
      if (w > this.wm) {
        this.flushRun(b, runStart, i);
        runStart = i;
        this.setWatermark(w);
      }
      if (typeCode[i] === EventType.cost) continue; // spend, not a user event: no profile
      const u = userId[i]!;
      const a = anonymousId[i]!;
      let canon = given[i]!;
      let movedOut: Uint8Array | null = null;
      if (canon !== '') {
        // Resolved by the partition of the anonymous id (scale-out); with it may come that
        // anonymous profile, to fold in here exactly as a local stitch would.
        const m = moved[i] ?? null;
        if (m !== null && a !== '') {
          this.flushRun(b, runStart, i);
          runStart = i;
          this.identity.link(a, canon);
          if (this.profiles.adopt(ANON_PREFIX + a, m)) this.routing.movedIn++;
          else this.routing.adoptConflicts++;
          this.mergeProfiles(ANON_PREFIX + a, canon);
        }
      } else if (u !== '') {
        canon = u;
        if (a !== '' && this.identity.link(a, u)) {
          // Rows before this one may still hold the anonymous profile: they go through the
          // operators first (a merge or a move takes the profile as those rows left it).
          this.flushRun(b, runStart, i);
          runStart = i;
          if (router === null || router.owns(u)) this.mergeProfiles(ANON_PREFIX + a, u);
          else movedOut = this.detach(ANON_PREFIX + a);
        }
      } else {
        canon = this.identity.canonicalOfAnonymous(a);
      }
      if (router !== null && given[i] === '' && !router.owns(canon)) {
        status[i] = ROUTED;
        accepted--;
        forwarded++;
        this.forward(b, i, canon, movedOut);
        continue;
      }
      b.canon[i] = canon;
      recs[i] = this.profiles.load(canon);
      if (q !== null && q.isSuspect(eventId[i]!)) {
        // A row of a run an operator failed on: alone through the operators, to tell whether it is the poison.
        this.flushRun(b, runStart, i);
        this.flushRun(b, i, i + 1, true);
        q.clear(eventId[i]!);
        runStart = i + 1;
      }
    }
    this.flushRun(b, runStart, b.length);
    inputs?.end(b);
    this.acceptedTotal += accepted;
    this.routing.forwarded += forwarded;
    return { accepted, rejected: b.length - accepted - forwarded, ...(router === null ? {} : { forwarded }) };
  }

  /**
   * Scale-out: the anonymous profile leaves this engine for the member's partition. Its timers are
   * cancelled here (release); its aggregate contributions stay, and the target's merge retracts
   * them there, so the sum over partitions is what one engine would have.
   */
  private detach(id: string): Uint8Array | null {
    const rec = this.profiles.loadExisting(id);
    if (rec === undefined) return null;
    for (const op of this.operators) op.release?.(rec, this.ctx);
    const bytes = this.profiles.encode(rec);
    this.profiles.remove(rec);
    this.routing.movedOut++;
    return bytes;
  }

  /** Scale-out: row `i` goes to the partition holding `canon`, through the outbox (exactly once with this state). */
  private forward(b: EventColumns, i: number, canon: string, moved: Uint8Array | null): void {
    const event = crmstream.v1.Event.encode(rowToEvent(b, i)).finish();
    this.outbox.append(Topic.route, crmstream.v1.Routed.encode({ event, canonical: canon, origin: b.originOf(i), ...(moved === null ? {} : { moved }) }).finish());
  }

  private flushRun(b: EventColumns, start: number, end: number, alone = false): void {
    if (end <= start) return;
    for (const op of this.operators) {
      try {
        op.processBatch(b, this.recs, start, end, this.ctx);
      } catch (err) {
        this.failedRun = { start, end, alone };
        throw new CrmError('OPERATOR_FAILED', `operator ${op.name} failed on rows ${start}..${end}`, { cause: err });
      }
    }
  }

  /**
   * An operator failed: the rows of its run become suspects, or the row is poison when it ran
   * alone, or the timer is (engine/quarantine.ts), so a restart does not fail on them forever.
   */
  private async writeDownFailure(b: EventColumns | null): Promise<void> {
    const run = this.failedRun;
    const timer = this.failedTimer;
    this.failedRun = null;
    this.failedTimer = null;
    try {
      if (timer !== null) await this.quarantine.record(this.store, { timer });
      else if (run !== null && b !== null) {
        const ids: string[] = [];
        for (let i = run.start; i < run.end; i++) if (b.status[i] === Reject.ok) ids.push(b.eventId[i]!);
        if (run.alone && ids.length === 1) await this.quarantine.record(this.store, { poison: ids[0]! });
        else await this.quarantine.record(this.store, { suspects: ids });
      }
    } catch {
      // The store is failing too: the failure stands as it is (a restart meets the record again).
    }
  }

  /** Moves the watermark and fires, in event-time order, every timer it passed. */
  private setWatermark(w: number): void {
    this.wm = w;
    this.ctx.watermark = w;
    this.kpi?.observeWatermark(w);
    for (let t = this.timers.popDue(w, this.due); t !== undefined; t = this.timers.popDue(w, this.due)) this.fire(t);
    this.dedupe.expire(w);
  }

  /**
   * For a bounded step of advanceTo: the time up to which timers can fire before the dirty profiles
   * pass `checkpoint.maxDirtyUsers` — the time of a due timer (all timers at that time fire in the
   * step), or `upTo` when the bound is not reached.
   */
  private fireUntilBound(upTo: number): number {
    const limit = this.config.checkpoint.maxDirtyUsers;
    // Handlers see the target watermark, as in one unbounded step; only the checkpoint between
    // steps records the intermediate one.
    this.ctx.watermark = upTo;
    for (;;) {
      const next = this.timers.nextDue();
      if (next > upTo) return upTo;
      for (let t = this.timers.popDue(next, this.due); t !== undefined; t = this.timers.popDue(next, this.due)) this.fire(t);
      if (this.profiles.dirtyCount >= limit && this.timers.nextDue() <= upTo) {
        this.wm = Math.max(this.wm, next);
        this.ctx.watermark = this.wm;
        return next;
      }
    }
  }

  private fire(t: DueTimer): void {
    const op = this.opByTimerKind.get(t.kind);
    if (op === undefined) {
      this.orphanTimers++;
      return;
    }
    const canon = this.identity.resolve(t.user);
    if (this.router !== null && !this.router.owns(canon)) {
      // The profile moved away (release cancels its timers, so this is only a safety net).
      this.routing.strayTimers++;
      return;
    }
    if (this.quarantine.hasPoisonTimers && this.quarantine.isPoisonTimer(`${t.kind}|${t.user}|${t.ts}`)) {
      this.quarantine.quarantined++;
      this.rejects[Reject.poison]!++;
      this.outbox.append(Topic.deadLetter, crmstream.v1.DeadLetter.encode({
        reason: 'poison', detail: `timer ${t.kind}@${t.ts} for ${t.user}: an operator failed on it before; skipped`, source: 'timer', payload: new Uint8Array(0), ts: t.ts,
      }).finish());
      return;
    }
    const rec = this.profiles.load(canon);
    try {
      op.onTimer(rec, t.kind, t.ts, this.ctx);
    } catch (err) {
      this.failedTimer = `${t.kind}|${t.user}|${t.ts}`;
      throw new CrmError('OPERATOR_FAILED', `operator ${op.name} failed on timer ${t.kind}@${t.ts} for ${t.user}`, { cause: err });
    }
  }

  /** Folds the anonymous profile (if any) into the member's and deletes it. */
  private mergeProfiles(anonId: string, member: string): void {
    const from = this.profiles.loadExisting(anonId);
    if (from === undefined) return;
    const into = this.profiles.load(member);
    for (const op of this.mergeAware) op.beforeMerge!(into, from, this.ctx);
    const slots = this.slots;
    for (let k = 0; k < slots.length; k++) slots[k]!.merge(into.slots[k], from.slots[k]);
    for (const op of this.mergeAware) op.afterMerge!(into, this.ctx);
    this.profiles.remove(from);
  }

  /**
   * Advances the watermark to `ts` (end of input, `--as-of`, or an idle source) and fires every
   * timer up to it.
   */
  async advanceTo(ts: number, position: unknown = this.positionValue): Promise<void> {
    if (this.idleRun !== null) await this.waitIdle();
    this.enter();
    try {
      if (position !== this.positionValue) this.uncommitted = true;
      this.positionValue = position;
      if (ts <= this.wm) return;
      this.uncommitted = true;
      await this.timers.preload(ts);
      // A long jump (end of input, --as-of, an idle source) can make a timer of every user due. Fire
      // them in steps that stop at a timer-time boundary once the dirty profiles reach their bound,
      // with a checkpoint between steps: memory stays bounded, and each checkpoint's watermark has
      // every timer at or before it fired. The state at the end does not depend on the steps.
      for (;;) {
        let stepTo = ts;
        const next = this.timers.nextDue();
        if (next <= ts && this.profiles.dirtyCount >= this.config.checkpoint.maxDirtyUsers) {
          await this.checkpointNow();
        }
        try {
          stepTo = this.fireUntilBound(ts);
          this.setWatermark(stepTo);
        } catch (err) {
          this.fail(err);
          await this.writeDownFailure(null);
          throw err;
        }
        if (stepTo >= ts) break;
        await this.checkpointNow();
      }
      await this.activateReadySegments();
      if (this.checkpointDue()) await this.checkpointNow();
    } finally {
      this.busy = false;
      this.armIdleCheckpoint();
    }
  }

  /**
   * Scale-out: the largest event time another input partition has seen moves this engine's
   * watermark as one of its own events would (`max event time − outOfOrdernessMs`, in ticks). With
   * per-input watermarks (inputWatermarks(); scale-out tasks) it is that input's stream time, and
   * the watermark is the minimum over the inputs, as one engine reading all of them would keep it.
   */
  async observeEventTime(maxTs: number, position: unknown = this.positionValue): Promise<void> {
    const inputs = this.inputWms;
    if (inputs === null) {
      await this.advanceTo(this.tickFloor(maxTs - this.config.time.outOfOrdernessMs), position);
      return;
    }
    // Per-input: maxTs is the stream time of the input `position` was bound to (InputWatermarks.bind);
    // the watermark is the minimum over the inputs, and the times go into that position.
    inputs.observe(inputs.begin(position), maxTs);
    inputs.end(position);
    await this.advanceTo(inputs.watermark(), position);
  }

  /**
   * Switches this engine to per-input watermarks and returns the tracker its source feeds
   * (engine/watermarks.ts): the watermark becomes the minimum over the source's inputs (Kafka
   * partitions) of their largest event time − outOfOrdernessMs, idle inputs excepted. Call before
   * the first batch; the source assigns its inputs, binds each batch to one, and restores the
   * times from `engine.position`.
   *
   * @example
   * const source = await KafkaSource.connect(kafka, { position: engine.position, inputs: engine.inputWatermarks(), batchRows: 4096, timeZone: 'UTC' });
   */
  inputWatermarks(): InputWatermarks {
    return (this.inputWms ??= new InputWatermarks({ outOfOrdernessMs: this.config.time.outOfOrdernessMs, tickMs: this.tickMs }));
  }

  private deadLetterRejected(b: EventColumns): void {
    const maxPayload = this.config.deadLetter.maxPayloadBytes;
    for (let i = 0; i < b.length; i++) {
      const code = b.status[i]!;
      if (code === Reject.ok || code === ROUTED) continue;
      this.rejects[code]!++;
      const raw = b.raw[i];
      let payload: Uint8Array;
      if (raw == null) payload = crmstream.v1.Event.encode(rowToEvent(b, i)).finish();
      else payload = typeof raw === 'string' ? utf8.encode(raw) : raw;
      if (payload.length > maxPayload) payload = payload.subarray(0, maxPayload);
      const ts = b.ts[i]!;
      const dl = crmstream.v1.DeadLetter.encode({
        reason: rejectName(code), detail: b.detail[i]!, source: b.originOf(i), payload,
        ts: Number.isFinite(ts) ? Math.trunc(ts) : 0,
      }).finish();
      this.outbox.append(Topic.deadLetter, dl);
    }
  }

  private checkpointDue(): boolean {
    return (
      performance.now() - this.lastCheckpointAt >= this.config.checkpoint.intervalMs ||
      this.profiles.dirtyCount >= this.config.checkpoint.maxDirtyUsers ||
      this.outbox.pendingCount >= 100_000 ||
      performance.now() - this.outbox.oldestPendingTriggerAt >= this.config.checkpoint.triggerLatencyMs
    );
  }

  /** Takes a checkpoint now: one atomic write of everything changed since the last one. */
  async checkpoint(): Promise<void> {
    if (this.idleRun !== null) await this.waitIdle();
    this.enter();
    try {
      await this.checkpointNow();
    } finally {
      this.busy = false;
    }
  }

  /**
   * One checkpoint with retries: a failed write changed nothing (prepare → commit / abort), so it
   * is simply tried again after a backoff, with whatever it held. When every retry failed the
   * engine fails closed: nothing more is processed or acknowledged, health says so, and a restart
   * resumes from the last durable checkpoint.
   */
  private async checkpointNow(): Promise<void> {
    const { retries, retryBackoffMs } = this.config.checkpoint;
    for (let attempt = 0; ; attempt++) {
      try {
        await this.checkpointOnce();
        this.checkpointFailStreak = 0;
        return;
      } catch (err) {
        if (!isCode(err, 'CHECKPOINT_FAILED')) throw err;
        this.checkpointFailures++;
        this.checkpointFailStreak++;
        this.lastCheckpointError = err;
        if (attempt >= retries) {
          this.fail(err);
          throw err;
        }
        await sleep(retryBackoffMs * 2 ** attempt);
      }
    }
  }

  /** Prepare (every part describes its changes in `ops`, memory untouched) → write → commit, or abort. */
  private async checkpointOnce(): Promise<void> {
    const started = performance.now();
    const epoch = this.epoch + 1;
    const ops: WriteOp[] = [];
    const mark = this.outbox.mark();
    this.profiles.snapshot(ops);
    this.identity.snapshot(ops);
    this.timers.snapshot(ops);
    this.dedupe.snapshot(ops, epoch);
    this.quarantine.snapshot(ops);
    // Operators first: what they emit while snapshotting belongs to this checkpoint's outbox.
    for (const op of this.operators) op.snapshot(ops, this.ctx);
    this.outbox.snapshot(ops);
    const rejects: Record<string, number> = {};
    for (const name of REJECT_NAMES) rejects[name] = this.rejects[Reject[name]]!;
    const meta: Meta = {
      version: META_VERSION, epoch, watermark: Number.isFinite(this.wm) ? this.wm : null,
      maxTs: Number.isFinite(this.maxTs) ? this.maxTs : null, position: this.positionValue, rejects,
      nextSeq: this.outbox.next, customTypes: this.types.customNames(), dedupeOldestDay: this.dedupe.oldest,
      accepted: this.acceptedTotal, timeZone: this.config.time.timeZone, segments: [...this.segmentDefs],
      segmentsOn: this.segments !== null,
    };
    ops.push({ type: 'put', key: META_KEY, value: utf8.encode(JSON.stringify(meta)) });
    try {
      await this.store.write(ops);
    } catch (err) {
      // Abort: the records the operators emitted while preparing go back; everything else was
      // only described in `ops`, so memory is as it was before this checkpoint.
      this.outbox.rollback(mark);
      throw new CrmError('CHECKPOINT_FAILED', `checkpoint ${epoch} was not written`, { cause: err });
    }
    this.epoch = epoch;
    this.profiles.committed();
    this.identity.committed();
    this.timers.committed();
    this.dedupe.committed();
    this.quarantine.committed();
    for (const op of this.operators) op.committed();
    this.outbox.committed();
    this.uncommitted = false;
    this.lastCheckpointAt = performance.now();
    this.lastCheckpointWall = Date.now();
    this.checkpointMsLast = this.lastCheckpointAt - started;
    this.checkpointMsTotal += this.checkpointMsLast;
    for (const fn of this.checkpointListeners) fn(this.positionValue, epoch);
    await this.outbox.drain();
  }

  /**
   * Makes everything processed so far durable: a checkpoint if anything changed since the last
   * one, else nothing. `ingest(events, { durable: true })` and the HTTP server (group commit: the
   * requests of one engine turn share one checkpoint) answer only after it.
   */
  async sync(): Promise<void> {
    if (this.idleRun !== null) await this.waitIdle();
    if (!this.uncommitted) {
      this.enter();
      this.busy = false;
      return;
    }
    await this.checkpoint();
  }

  /** True while something processed is not yet in a checkpoint. */
  get hasUncommitted(): boolean {
    return this.uncommitted;
  }

  /**
   * For health checks (/readyz): fail-closed state, checkpoint failures, and each outbox sink's
   * cursor and failures.
   */
  health(): EngineHealth {
    const f = this.failure;
    return {
      failed: f === null ? null : { code: f instanceof CrmError ? f.code : 'OPERATOR_FAILED', message: f instanceof Error ? f.message : String(f) },
      checkpointFailuresTotal: this.checkpointFailures,
      consecutiveCheckpointFailures: this.checkpointFailStreak,
      lastCheckpointError: this.lastCheckpointError === null ? null : errorText(this.lastCheckpointError),
      lastCheckpointAt: this.lastCheckpointWall,
      sinks: this.outbox.sinkStatus(),
    };
  }

  /**
   * After a call that left changes outside a checkpoint (an ingest between due checkpoints), a
   * timer takes one when the engine has sat idle for `checkpoint.idleMs`: dirty state never
   * waits for the next event to become durable. It runs only when no call is in progress; calls
   * that arrive while it writes wait for it (`enter`).
   */
  private armIdleCheckpoint(): void {
    const idleMs = this.config.checkpoint.idleMs;
    if (idleMs === null || !this.uncommitted || this.idleTimer !== null || this.closed || this.failure !== null) return;
    // The timer holds the engine only weakly: an engine its owner dropped without close() is
    // collected (with a long checkpoint.intervalMs a strong reference would pin every such engine
    // and its whole state until the timer fired).
    const self = new WeakRef<Engine>(this);
    this.idleTimer = setTimeout(() => self.deref()?.idleCheckpoint(), idleMs);
    this.idleTimer.unref();
  }

  private idleCheckpoint(): void {
    this.idleTimer = null;
    if (!this.uncommitted || this.busy || this.closed || this.failure !== null) return;
    this.busy = true; // synchronously: a call arriving now waits for idleRun, never sees ENGINE_BUSY
    this.idleRun = this.checkpointNow().catch(() => undefined /* in health(); failure set when retries ran out */).finally(() => {
      this.busy = false;
      this.idleRun = null;
      this.armIdleCheckpoint();
    });
  }

  /**
   * Listens to durable checkpoints: `position` is the source position the state now covers (a
   * Kafka source commits its offsets to the group here).
   */
  onCheckpoint(fn: (position: unknown, epoch: number) => void): void {
    this.checkpointListeners.push(fn);
  }

  /** Listens to committed outbox records (after the checkpoint that made them durable). */
  onOutput(fn: (r: OutboxRecord) => void): void {
    this.outbox.listen(fn);
  }

  /** A profile by member id or anonymous id, or null. Reads through the cache, never marks dirty. */
  profile(id: string): ProfileView | null {
    const rec = this.peekProfile(id);
    return rec === undefined ? null : profileView(rec.id, rec.slots[this.profileSlotIndex] as ProfileState);
  }

  /** The profile of a member id, or of the member (or anonymous profile) an anonymous id resolves to; never marks dirty. */
  private peekProfile(id: string): UserRecord | undefined {
    return this.profiles.peek(id) ?? this.profiles.peek(this.identity.resolve(ANON_PREFIX + id));
  }

  /** Every stored profile in id order (after a checkpoint; for exports and tests). */
  async *profilesStored(): AsyncGenerator<ProfileView> {
    for await (const entries of this.store.scan({ gte: USER_PREFIX, lt: 'u0' }, 1024)) {
      for (const e of entries) {
        const id = e.key.slice(USER_PREFIX.length);
        const rec = this.profiles.decode(id, e.value);
        yield profileView(id, rec.slots[this.profileSlotIndex] as ProfileState);
      }
    }
  }

  /**
   * KPI rows of one grain (docs/KPIS.md), reflecting every event processed so far.
   *
   * @example
   * const months = await engine.kpis('month');
   * const total = months.filter((r) => r.channel === '*' && r.platform === '*');
   */
  async kpis(grain: KpiGrain): Promise<KpiRow[]> {
    return this.kpiOperator().kpis(grain);
  }

  /** Cohort matrix rows (first-activity or sign-up cohorts) by week or month. */
  async cohorts(grain: CohortGrain, kind: CohortKind = 'first_activity'): Promise<CohortRow[]> {
    return this.kpiOperator().cohorts(grain, kind);
  }

  /** Journey funnel rows per sign-up cohort window. */
  async funnel(grain: KpiGrain): Promise<FunnelRow[]> {
    return this.kpiOperator().funnel(grain);
  }

  /**
   * One export (SPEC §9 `crmstream export`) as an Arrow table with typed columns — categorical
   * strings dictionary-encoded, times as `Timestamp<ms, UTC>`, counts Int32, money and rates
   * Float64 with nulls, flags Bool (schemas in engine/arrow-export.ts, shared with the CLI).
   * `grain` for kpis / cohorts / funnel, `kind` for cohorts, `segment` for segment members;
   * `triggers` reads the triggers file. The whole export is built in memory.
   *
   * @example
   * const t = await engine.exportArrow('kpis', { grain: 'month' });
   * writeFileSync('kpis.arrow', tableToIPC(t, 'file'));
   */
  async exportArrow(what: ExportWhat, opts: ExportOptions = {}): Promise<Table> {
    const { exportTable } = await import('./arrow-export.js');
    return exportTable(this, what, opts);
  }

  /**
   * This engine's additive KPI cells, to merge with other engines over disjoint users
   * (partitions keyed by canonical id) through {@link mergeKpis}.
   */
  async kpiPartials(): Promise<KpiPartials> {
    return this.kpiOperator().partials();
  }

  /**
   * Replaces the configured segment rules in the running engine (`definitions`: the list of a rule
   * file, docs/SEGMENTS.md). Invalid rules throw CONFIG_INVALID and change nothing. Otherwise every
   * profile is visited once (checkpointed as it goes; a crash resumes the pass): unchanged segments
   * keep their members, removed ones exit theirs, and added or changed ones are evaluated from the
   * kept state where it is complete for them, or marked building until the watermark reaches the
   * instant from which it is (see `segmentStatus`). Returns what changed.
   *
   * @example
   * const r = await engine.reloadSegments([{ id: 'loyal', rule: { did: 'purchase', within: '90d', atLeast: 3 } }]);
   * // r.added = ['loyal'], r.building = [] (purchases are kept for the built-ins' 365-day window)
   */
  async reloadSegments(definitions: unknown, source = 'reloaded segment rules'): Promise<SegmentReloadReport> {
    const op = this.segmentOperator();
    const defs = parseSegments({ segments: definitions }, source); // before anything changes
    if (this.idleRun !== null) await this.waitIdle();
    this.enter();
    try {
      await this.checkpointNow();
      // Every record is durable and clean: the cache goes, so each is read again in the new layout.
      this.profiles.dropCache();
      const report = op.reload(withBuiltins(defs), this.wm, this.maxTs);
      this.segmentDefs = defs;
      await this.runSegmentScan();
      return report;
    } catch (err) {
      this.fail(err);
      throw err;
    } finally {
      this.busy = false;
    }
  }

  /** The configured segment definitions in effect (built-ins not included). */
  get segmentDefinitions(): readonly SegmentDef[] {
    return this.segmentDefs;
  }

  /** Per segment: live, or building until the watermark reaches `ready_at` (after a reload). */
  segmentStatus(): SegmentStatus[] {
    return this.segmentOperator().status();
  }

  /** Building segments whose rules the kept state now answers exactly go live (a scan of the profiles). */
  private async activateReadySegments(): Promise<void> {
    const op = this.segments;
    if (op === null || !op.activationDue(this.wm)) return;
    op.startActivation(this.wm);
    await this.runSegmentScan();
  }

  /**
   * Visits every stored profile in id order for the segment operator's pending scan, checkpointing
   * after each chunk with the scan's position, so memory stays bounded and a crash resumes the pass
   * where the last checkpoint left it. Profiles only in memory are written first.
   */
  private async runSegmentScan(): Promise<void> {
    const op = this.segments!;
    const chunk = Math.max(64, Math.min(this.config.checkpoint.maxDirtyUsers, 8192));
    await this.checkpointNow();
    for (;;) {
      const cursor = op.scanCursor;
      if (cursor === undefined) return;
      const ids: string[] = [];
      // '\0' after the cursor: the first key greater than it.
      const gte = USER_PREFIX + (cursor === null ? '' : `${cursor}\u0000`);
      for await (const keys of this.store.scanKeys({ gte, lt: 'u0', limit: chunk }, chunk)) for (const k of keys) ids.push(k.slice(USER_PREFIX.length));
      if (ids.length === 0) op.scanDone();
      else {
        for (const id of ids) op.scanRecord(this.profiles.load(id), this.ctx);
        op.scanAdvance(ids[ids.length - 1]!);
      }
      await this.checkpointNow();
    }
  }

  /**
   * Campaign KPI rows per (campaign, variant, local day of the decision): eligible, sent, control,
   * suppressed by reason, deferred, outcomes reported back, conversions and revenue within the
   * attribution window (docs/CAMPAIGNS.md). `campaignReport` (api/campaign-report.ts) adds totals
   * and statistics.
   */
  campaignRows(): CampaignRow[] {
    if (this.campaigns === null) throw new CrmError('CAMPAIGNS_DISABLED', 'no campaigns are configured in this engine (campaigns.definitions)');
    return this.campaigns.rows();
  }

  /** A profile's recent triggers (by member or anonymous id); [] without campaigns, null if unknown. */
  recentTriggers(id: string): ReturnType<CampaignOperator['recentOf']> | null {
    const rec = this.peekProfile(id);
    if (rec === undefined) return null;
    return this.campaigns === null ? [] : this.campaigns.recentOf(rec);
  }

  /** The campaign operator (definitions, for reports), or null. */
  get campaignOperator(): CampaignOperator | null {
    return this.campaigns;
  }

  /** Listens to committed triggers (after the checkpoint that made them durable), decoded. */
  onTrigger(fn: (t: crmstream.v1.Trigger, seq: number) => void): void {
    this.outbox.listen((r) => {
      if (r.topic === Topic.trigger) fn(crmstream.v1.Trigger.decode(r.payload), r.seq);
    });
  }

  /** Segment ids in definition order (built-ins first). */
  segmentIds(): string[] {
    return this.segmentOperator().ids;
  }

  /**
   * Members of a segment: checkpoints (so the store holds every profile) and scans the profiles.
   * O(users): for exports and tools, not per request.
   *
   * @example
   * for await (const m of engine.segmentMembers('cart_abandoners')) console.log(m.user_id, new Date(m.since));
   */
  async *segmentMembers(id: string): AsyncGenerator<{ user_id: string; tier: string; since: number }> {
    const op = this.segmentOperator();
    if (!op.ids.includes(id)) throw new CrmError('CONFIG_INVALID', `no segment '${id}' (segments: ${op.ids.join(', ')})`);
    for await (const m of this.segmentMemberships()) if (m.segment === id) yield { user_id: m.user_id, tier: m.tier, since: m.since };
  }

  /**
   * One page of a segment's members in user-id order, after `after` (exclusive): at most `limit`,
   * and the cursor of the next page (null at the end). Read-only: the stored profiles from the
   * cursor on, with the ones changed since the last checkpoint read from memory instead — no
   * checkpoint and no scan of the profiles before the cursor, so paging through members never
   * stalls ingest (docs/API.md `GET /v1/segments/:id/members`).
   */
  async segmentMembersPage(id: string, after: string, limit: number): Promise<{ members: { user_id: string; tier: string; since: number }[]; next: string | null }> {
    const op = this.segmentOperator();
    if (!op.ids.includes(id)) throw new CrmError('CONFIG_INVALID', `no segment '${id}' (segments: ${op.ids.join(', ')})`);
    const dirty = this.profiles.dirtyRecords().filter((r) => r.id > after).sort((a, b) => (a.id < b.id ? -1 : a.id > b.id ? 1 : 0));
    const members: { user_id: string; tier: string; since: number }[] = [];
    const visit = (rec: UserRecord): boolean => {
      if (!rec.deleted) {
        for (const m of op.membershipOf(rec)) if (m.segment === id) members.push({ user_id: rec.id, tier: m.tier, since: m.since });
      }
      return members.length > limit; // one more than asked: there is a next page
    };
    let d = 0;
    const gte = USER_PREFIX + (after === '' ? '' : `${after}\u0000`);
    scan: for await (const entries of this.store.scan({ gte, lt: 'u0' }, 256)) {
      for (const e of entries) {
        const key = e.key.slice(USER_PREFIX.length);
        while (d < dirty.length && dirty[d]!.id < key) if (visit(dirty[d++]!)) break scan;
        const mem = d < dirty.length && dirty[d]!.id === key ? dirty[d++]! : this.profiles.decode(key, e.value);
        if (visit(mem)) break scan;
      }
    }
    while (members.length <= limit && d < dirty.length) visit(dirty[d++]!);
    if (members.length > limit) {
      members.length = limit;
      return { members, next: members[limit - 1]!.user_id };
    }
    return { members, next: null };
  }

  /** Every (user, segment) membership in one scan of the profiles (after a checkpoint). */
  async *segmentMemberships(): AsyncGenerator<{ user_id: string; segment: string; tier: string; since: number }> {
    const op = this.segmentOperator();
    await this.checkpoint();
    for await (const entries of this.store.scan({ gte: USER_PREFIX, lt: 'u0' }, 1024)) {
      for (const e of entries) {
        const rec = this.profiles.decode(e.key.slice(USER_PREFIX.length), e.value);
        for (const m of op.membershipOf(rec)) yield { user_id: rec.id, ...m };
      }
    }
  }

  /**
   * Segment sizes per window: members at the window's end (at the watermark for the current one),
   * with entries and exits in it; per tier and for all tiers ('*').
   */
  async segmentSizes(grain: KpiGrain): Promise<SegmentSizeRow[]> {
    return this.segmentOperator().sizeRows(grain, this.wm);
  }

  /** A profile's current segments (by member or anonymous id); null if unknown. */
  segmentsOf(id: string): { segment: string; tier: string; since: number }[] | null {
    const op = this.segmentOperator();
    const rec = this.peekProfile(id);
    return rec === undefined ? null : op.membershipOf(rec);
  }

  private segmentOperator(): SegmentOperator {
    if (this.segments === null) throw new CrmError('SEGMENTS_DISABLED', 'segments are switched off in this engine (segments.enabled = false)');
    return this.segments;
  }

  private kpiOperator(): KpiOperator {
    if (this.kpi === null) throw new CrmError('KPI_DISABLED', 'KPIs are switched off in this engine (kpi.enabled = false)');
    return this.kpi;
  }

  /** Engine counters for metrics and reports. */
  stats(): Record<string, number> {
    return {
      epoch: this.epoch, watermark: this.wm, accepted: this.acceptedTotal, cachedProfiles: this.profiles.cachedCount,
      dirtyProfiles: this.profiles.dirtyCount, profilesCreated: this.profiles.created, profileLoads: this.profiles.loads, profileMisses: this.profiles.misses,
      timersFired: this.timers.fired, orphanTimers: this.orphanTimers, aliases: this.identity.aliasesCreated,
      identityConflicts: this.identity.conflicts, dedupeIds: this.dedupe.size, outboxAppended: this.outbox.appended,
      kpiUpdates: this.kpi?.updates ?? 0, kpiCorrections: this.kpi?.corrections ?? 0, kpiLiveCells: this.kpi?.liveCells ?? 0,
      kpiCellsCompacted: this.kpi?.cellsCompacted ?? 0, segmentChanges: this.segments?.changes ?? 0,
      segmentEvaluations: this.segments?.evaluations ?? 0, segmentScanResumes: this.segmentScanResumes,
      triggers: this.campaigns?.triggers ?? 0, quarantined: this.quarantine.quarantined, checkpointFailures: this.checkpointFailures, checkpointMsLast: this.checkpointMsLast, checkpointMsTotal: this.checkpointMsTotal,
      ...(this.router === null ? {} : this.routing),
    };
  }

  /**
   * Checkpoints what is pending (unless processing failed half-way: then the last checkpoint stands),
   * then closes operators, sinks and the store (every step runs; errors are combined).
   */
  async close(): Promise<void> {
    if (this.closed) return;
    if (this.idleTimer !== null) clearTimeout(this.idleTimer);
    this.idleTimer = null;
    if (this.idleRun !== null) await this.waitIdle();
    // The last checkpoint may fail (disk full): operators, sinks and the store are closed anyway —
    // the LevelDB lock and a Kafka consumer must never outlive a failed close — and the
    // checkpoint's error is reported with any cleanup error.
    let last: unknown = null;
    if (this.failure === null) {
      try {
        await this.checkpoint();
      } catch (err) {
        last = err;
      }
    }
    this.closed = true;
    await cleanupAll([
      () => {
        if (last !== null) throw last;
      },
      ...this.operators.map((op) => () => op.close()),
      () => this.outbox.close(),
      () => this.store.close(),
    ]);
  }

  /** Fails closed: nothing more is processed or checkpointed; `failed` resolves with the cause. */
  private fail(err: unknown): void {
    if (this.failure !== null) return;
    this.failure = err;
    this.onFailed?.(err);
  }

  /**
   * Resolves with the cause once the engine has failed closed (an operator threw half-way, or a
   * checkpoint kept failing): `run` and `demo` exit non-zero on it, whatever they were doing.
   */
  readonly failed: Promise<unknown> = new Promise((resolve) => {
    this.onFailed = resolve;
  });

  private async waitIdle(): Promise<void> {
    while (this.idleRun !== null) await this.idleRun;
  }

  private enter(): void {
    if (this.closed) throw new CrmError('ENGINE_CLOSED', 'the engine is closed');
    if (this.failure !== null) {
      throw new CrmError('ENGINE_FAILED', 'an earlier batch failed half-way; restart the engine to resume from the last checkpoint', { cause: this.failure });
    }
    if (this.busy) throw new CrmError('ENGINE_BUSY', 'another ingest, checkpoint or watermark call is in progress; await it first');
    this.busy = true;
  }

  /** Read-only access for operators' tests and tools. */
  get stateStore(): KvStore {
    return this.store;
  }
}

async function readMeta(store: KvStore): Promise<Meta | null> {
  const raw = await store.get(META_KEY);
  if (raw === undefined) return null;
  try {
    return JSON.parse(utf8d.decode(raw)) as Meta;
  } catch (err) {
    throw new CrmError('STATE_CORRUPT', 'checkpoint metadata cannot be parsed', { cause: err });
  }
}

function rowToEvent(b: EventColumns, i: number): crmstream.v1.IEvent {
  const ts = b.ts[i]!;
  return {
    event_id: b.eventId[i]!, type: b.type[i]!, user_id: b.userId[i]!, anonymous_id: b.anonymousId[i]!,
    ts: Number.isFinite(ts) ? Math.trunc(ts) : 0, amount: Number.isFinite(b.amount[i]!) ? b.amount[i]! : 0,
    currency: b.currency[i]!, order_id: b.orderId[i]!, channel: b.channel[i]!, platform: b.platform[i]!,
    campaign_id: b.campaignId[i]!, variant: b.variant[i]!, trigger_id: b.triggerId[i]!, props: b.props[i] ?? {},
  };
}

/** A trigger as a JSON line (docs/CAMPAIGNS.md). */
export function formatTrigger(r: OutboxRecord): Record<string, unknown> {
  const t = crmstream.v1.Trigger.decode(r.payload);
  return {
    seq: r.seq, trigger_id: t.trigger_id, campaign_id: t.campaign_id, variant: t.variant, control: t.control, user_id: t.user_id,
    channels: t.channels, template_id: t.template_id, params: t.params, reason: t.reason, ts: Number(t.event_ts), send_after: Number(t.send_after_ts),
  };
}

/** A segment change as a JSON line. */
export function formatSegmentChange(r: OutboxRecord): Record<string, unknown> {
  const c = crmstream.v1.SegmentChange.decode(r.payload);
  return {
    seq: r.seq, segment_id: c.segment_id, user_id: c.user_id, change: c.change, tier: c.tier, previous_tier: c.previous_tier,
    ts: Number(c.event_ts), cause: c.cause,
  };
}

/** Dead letter as a JSON line: the payload as text when it is valid UTF-8, else base64. */
export function formatDeadLetter(r: OutboxRecord): Record<string, unknown> {
  const dl = crmstream.v1.DeadLetter.decode(r.payload);
  let payload: string;
  let encoding = 'utf8';
  try {
    payload = new TextDecoder('utf-8', { fatal: true }).decode(dl.payload);
  } catch {
    payload = Buffer.from(dl.payload).toString('base64');
    encoding = 'base64';
  }
  return { reason: dl.reason, detail: dl.detail, source: dl.source, ts: Number(dl.ts) || null, payload, payload_encoding: encoding };
}

/**
 * Global KPIs from the partials of engines whose users are disjoint (e.g. one per partition of a
 * topic keyed by canonical id): kpis / funnel / cohorts equal those of one engine over every event.
 * `config` supplies the time zone and KPI settings, which every partition must share.
 *
 * @example
 * const global = mergeKpis(config, await Promise.all(engines.map((e) => e.kpiPartials())));
 * const days = await global.kpis('day');
 */
export function mergeKpis(config: ConfigInput, parts: readonly KpiPartials[]): Pick<KpiOperator, 'kpis' | 'funnel' | 'cohorts'> {
  const c = resolveConfig(config);
  return KpiOperator.merged({ timeZone: c.time.timeZone, ...c.kpi }, parts);
}
