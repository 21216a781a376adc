import { performance } from 'node:perf_hooks';
import Kafka from 'node-rdkafka';
import type { Assignment, KafkaConsumer, LibrdKafkaError, Message, TopicPartition } from 'node-rdkafka';
import { EventColumns } from '../batch.js';
import { appendJsonEvent, appendProtoEvent } from '../codec.js';
import type { SourceItem } from '../engine.js';
import { CrmError } from '../errors.js';
import { Reject } from '../event-types.js';
import type { InputTimesHolder, InputWatermarks, StreamTimes } from '../watermarks.js';
import type { KafkaConfig } from './config.js';

/** librdkafka's logical offsets for `assign`. */
const OFFSET_BEGINNING = -2;
const OFFSET_END = -1;
const ERR_ASSIGN = -175;
const ERR_REVOKE = -174;

/**
 * The source position stored with each checkpoint: the next offset to read per partition of the
 * events topic and, with per-partition watermarks, each partition's stream time (the largest event
 * time the engine accepted from it). It is what the state covers, so it, not the group's committed
 * offsets, decides where a restart continues (the commit to Kafka happens after the checkpoint and
 * may lag behind it); the stream times make the watermark continue exactly where it was.
 */
export interface KafkaPosition {
  readonly kafka: {
    readonly topic: string;
    readonly offsets: Readonly<Record<string, number>>;
    /** Stream time per partition (ms); null without per-partition watermarks, absent in older checkpoints. */
    readonly times?: Readonly<StreamTimes> | null;
    /** Partitions idle when it was taken (informational: idleness is re-learned after a restart). */
    readonly idle?: readonly number[] | null;
  };
}

export function isKafkaPosition(p: unknown, topic: string): p is KafkaPosition {
  const k = (p as { kafka?: { topic?: unknown; offsets?: unknown } } | null)?.kafka;
  return k !== undefined && k.topic === topic && typeof k.offsets === 'object' && k.offsets !== null;
}

/** Counters the server exports to /metrics. */
export interface KafkaSourceStats {
  readonly messages: number;
  readonly batches: number;
  readonly commits: number;
  readonly commitErrors: number;
  /** Client-level errors librdkafka reported (broker down, request failures); it retries them itself. */
  readonly errors: number;
  readonly rebalances: number;
  /** Partition pauses: a partition holding its share of maxBuffered, or running maxSkewMs ahead. */
  readonly pauses: number;
  readonly buffered: number;
  readonly assigned: readonly number[];
  /** Assigned partitions paused now, and idle now (not holding the watermark back). */
  readonly paused: number;
  readonly idle: number;
  /** Stream time per assigned partition (ms; per-partition watermarks only). */
  readonly streamTimes: Readonly<Record<string, number>>;
  /** Partitions of the events topic assigned to another member of the group (should be 0). */
  readonly unowned: number;
  /** Per assigned partition: high watermark − next offset to process (last query; -1 unknown). */
  readonly lag: Readonly<Record<string, number>>;
}

export interface KafkaSourceOptions {
  /** The engine's stored position (engine.position); offsets of other topics or sources are ignored. */
  readonly position: unknown;
  /** Rows per yielded batch (the engine's batchRows). */
  readonly batchRows: number;
  /** Zone for zone-less JSON timestamps (the engine's time zone). */
  readonly timeZone: string;
  /**
   * The engine's per-input watermarks (`engine.inputWatermarks()`): the engine's watermark becomes
   * the minimum over the partitions (idle ones excepted), stream times go into the position, and
   * partitions running `maxSkewMs` ahead are paused. Without it the engine's watermark follows
   * the largest event time over all partitions (a partition read behind loses events `too_late`).
   */
  readonly inputs?: InputWatermarks | null;
  /**
   * End when every assigned partition has been read to its end (backfill from Kafka, tests):
   * the source yields `end` then. Default false: run until close().
   */
  readonly exitAtEnd?: boolean;
  /** Called with each librdkafka error event (logging). */
  readonly onError?: (err: unknown) => void;
}

/** One assigned partition's fetched messages and fetch state. */
interface PartitionQueue {
  msgs: Message[];
  /** Next message of `msgs` to hand to the engine. */
  head: number;
  /** Offset after the last message taken from librdkafka (−1: unknown); an older one is a re-delivery. */
  fetchedNext: number;
  /** performance.now() of the last message fetched (or of the assignment). */
  lastDataAt: number;
  paused: boolean;
}

/** The mutable form of a KafkaPosition's `kafka` part: the engine fills `times` after the batch. */
interface PositionPart extends InputTimesHolder {
  readonly topic: string;
  readonly offsets: Record<string, number>;
}

/**
 * The events topic as an engine source: consumer-group member, auto-commit off, batches of decoded
 * columns tagged with their offsets. Each batch holds messages of ONE partition, so the engine
 * attributes its rows to that partition's stream time.
 *
 * - A fetch loop pulls messages from librdkafka (its consume call runs off the JS thread) into one
 *   bounded queue per partition while the engine works on the previous batch. A partition holding
 *   its share of `maxBuffered` is paused (consumer.pause on it alone) and resumed at half.
 * - With per-partition watermarks (`inputs`): the next batch comes from the partition with the
 *   lowest stream time among those with messages, and stops after the first row that runs
 *   `maxSkewMs` ahead of the other active partitions; a partition that far ahead is not handed
 *   out, and its fetching is paused until the others catch up. A partition with nothing buffered
 *   that is read to its end offset (librdkafka's cached high watermark, or partition EOF), or has
 *   had no message for `partitionIdleMs`, is idle: it stops holding the watermark back, and the
 *   source yields a `watermark` item when that lets the watermark move. A message makes it active.
 * - On assignment every partition starts at the offset the state covers: the last one processed in
 *   this process, else the checkpointed one, else `startFrom`. On revocation buffered messages of
 *   the revoked partitions are dropped (their next owner reads them from its own offset).
 * - `commit(position)` (wired to engine.onCheckpoint) commits the checkpointed offsets to Kafka, so
 *   the group's lag as other tools see it follows the durable state.
 *
 * @example
 * const source = await KafkaSource.connect(kafkaConfig, { position: engine.position, inputs: engine.inputWatermarks(), batchRows: 4096, timeZone: 'Asia/Seoul' });
 * engine.onCheckpoint((p) => source.commit(p));
 * await engine.run(source);
 */
export class KafkaSource implements AsyncIterable<SourceItem> {
  private readonly topic: string;
  private readonly inputs: InputWatermarks | null;
  /** Next offset to process per partition (what the engine has been handed). */
  private readonly offsets = new Map<number, number>();
  private assignment: number[] = [];
  private readonly queues = new Map<number, PartitionQueue>();
  /** Per partition: the end offset librdkafka reported reaching (partition.eof). */
  private readonly eofAt = new Map<number, number>();
  /** Messages in the queues. */
  private buffered = 0;
  /** Without per-partition watermarks: the partition the last batch came from (round robin). */
  private lastPicked = -1;
  private closing = false;
  private fetching: Promise<void> | null = null;
  private wake: (() => void) | null = null;
  private lagTimer: NodeJS.Timeout | null = null;
  private fetchError: Error | null = null;
  private readonly lagByPartition = new Map<number, number>();
  /** Partitions of the topic held by other group members (after the last assignment). */
  private unowned = 0;
  private readonly counters = { messages: 0, batches: 0, commits: 0, commitErrors: 0, errors: 0, rebalances: 0, pauses: 0 };
  /** The two lowest stream times over the active partitions, and the partition holding the lowest (lowest2). */
  private low1 = Number.POSITIVE_INFINITY;
  private low2 = Number.POSITIVE_INFINITY;
  private lowAt = -1;

  private constructor(
    private readonly consumer: KafkaConsumer,
    private readonly cfg: KafkaConfig,
    private readonly opts: KafkaSourceOptions,
  ) {
    this.topic = cfg.topics.events;
    this.inputs = opts.inputs ?? null;
    if (isKafkaPosition(opts.position, this.topic)) {
      for (const [p, o] of Object.entries(opts.position.kafka.offsets)) this.offsets.set(Number(p), o);
      // Stream times continue exactly; idleness is learned again (a partition starts active, so a
      // restart after downtime never lets the watermark run past a partition that has new data).
      this.inputs?.restore(opts.position.kafka.times ?? null);
    }
  }

  /** Connects, subscribes and starts fetching. */
  static async connect(cfg: KafkaConfig, opts: KafkaSourceOptions): Promise<KafkaSource> {
    let self: KafkaSource | null = null;
    const consumer = new Kafka.KafkaConsumer({
      ...cfg.consumer,
      'metadata.broker.list': cfg.brokers,
      'group.id': cfg.groupId,
      'client.id': cfg.clientId,
      'enable.auto.commit': false,
      'enable.auto.offset.store': false,
      'enable.partition.eof': true,
      'partition.assignment.strategy': 'range',
      offset_commit_cb: (err: LibrdKafkaError | null) => {
        if (self === null) return;
        if (err) {
          self.counters.commitErrors++;
          self.opts.onError?.(err);
        } else {
          self.counters.commits++;
        }
      },
      rebalance_cb: (err: LibrdKafkaError, assignment: Assignment[]) => self?.rebalance(err, assignment),
    }, { 'auto.offset.reset': cfg.startFrom });
    self = new KafkaSource(consumer, cfg, opts);
    consumer.on('event.error', (err) => {
      self!.counters.errors++;
      opts.onError?.(err);
    });
    consumer.on('partition.eof', (e) => {
      if (e.topic === self!.topic) self!.eofAt.set(e.partition, e.offset);
    });
    await new Promise<void>((resolve, reject) => {
      consumer.connect({ timeout: 30_000 }, (err) => (err ? reject(new CrmError('KAFKA_ERROR', `cannot connect the consumer to ${cfg.brokers}`, { cause: err })) : resolve()));
    });
    consumer.setDefaultConsumeTimeout(cfg.pollMs);
    consumer.subscribe([self.topic]);
    self.fetching = self.fetchLoop();
    self.lagTimer = setInterval(() => self!.queryLag(), 1_000);
    self.lagTimer.unref();
    return self;
  }

  stats(): KafkaSourceStats {
    let paused = 0;
    let idle = 0;
    const streamTimes: Record<string, number> = {};
    for (const [p, q] of this.queues) {
      if (q.paused) paused++;
      if (this.inputs === null) continue;
      if (this.inputs.isIdle(p)) idle++;
      const t = this.inputs.streamTime(p);
      if (Number.isFinite(t)) streamTimes[String(p)] = t;
    }
    return {
      ...this.counters, buffered: this.buffered, assigned: [...this.assignment], unowned: this.unowned, paused, idle, streamTimes,
      lag: Object.fromEntries([...this.lagByPartition].map(([p, l]) => [String(p), l])),
    };
  }

  /** Commits a checkpointed position's offsets to the group (after the checkpoint is durable). */
  commit(position: unknown): void {
    if (this.closing || !isKafkaPosition(position, this.topic)) return;
    const owned = new Set(this.assignment);
    const tps = Object.entries(position.kafka.offsets)
      .filter(([p]) => owned.has(Number(p)))
      .map(([p, offset]) => ({ topic: this.topic, partition: Number(p), offset }));
    if (tps.length === 0) return;
    try {
      this.consumer.commit(tps);
    } catch (err) {
      this.counters.commitErrors++;
      this.opts.onError?.(err as Error);
    }
  }

  async *[Symbol.asyncIterator](): AsyncGenerator<SourceItem> {
    const batch = new EventColumns(this.opts.batchRows);
    for (;;) {
      if (this.fetchError !== null) throw this.fetchError;
      if (this.closing) return;
      const moved = this.refreshIdle();
      if (moved !== null) {
        // A partition went idle and no longer holds the watermark back: move it now (its timers fire).
        yield { kind: 'watermark', ts: moved };
        continue;
      }
      const p = this.pick();
      if (p < 0) {
        if (this.opts.exitAtEnd === true && this.atEnd()) {
          yield { kind: 'end' };
          return;
        }
        // Woken after every consume call (messages, or a poll period without): idleness and the
        // other partitions' progress are looked at again then.
        await new Promise<void>((resolve) => {
          this.wake = resolve;
        });
        continue;
      }
      this.fill(batch, p);
      this.counters.messages += batch.length;
      this.counters.batches++;
      if (batch.length === 0) continue;
      const position = this.position();
      this.inputs?.bind(batch, p, position.kafka as PositionPart);
      yield { kind: 'batch', batch, position };
    }
  }

  /** The position covering everything handed out so far (a new object: the engine keeps it). */
  position(): KafkaPosition {
    const offsets: Record<string, number> = {};
    for (const [p, o] of [...this.offsets].sort((a, b) => a[0] - b[0])) offsets[String(p)] = o;
    const s = this.inputs?.snapshot() ?? null;
    const part: PositionPart = { topic: this.topic, offsets, times: s?.times ?? null, idle: s?.idle ?? null };
    return { kafka: part };
  }

  /** Stops fetching, leaves the group and disconnects. */
  async close(): Promise<void> {
    if (this.closing) return;
    this.closing = true;
    if (this.lagTimer !== null) clearInterval(this.lagTimer);
    this.wake?.();
    await this.fetching?.catch(() => undefined);
    await new Promise<void>((resolve) => {
      this.consumer.disconnect(() => resolve());
    });
  }

  /**
   * Every assigned partition is handed out up to the end offset last reported (EOF, or the cached
   * high watermark: a partition paused for skew reports no EOF until it is fetched again).
   */
  private atEnd(): boolean {
    if (this.assignment.length === 0) return false;
    for (const p of this.assignment) {
      const q = this.queues.get(p);
      if (q !== undefined && q.head < q.msgs.length) return false;
      if (!this.caughtUp(p)) return false;
    }
    return true;
  }

  /**
   * Read to its end: everything up to the end offset librdkafka last reported (EOF, or the high
   * watermark cached from fetch responses: no broker round trip) has been handed out.
   */
  private caughtUp(p: number): boolean {
    const next = this.offsets.get(p);
    const eof = this.eofAt.get(p);
    if (eof !== undefined && (next === undefined || next >= eof)) return true;
    let w: { highOffset: number; lowOffset: number };
    try {
      w = this.consumer.getWatermarkOffsets(this.topic, p);
    } catch {
      return false; // nothing fetched yet: end unknown
    }
    if (!(w.highOffset >= 0)) return false;
    const from = next ?? (this.cfg.startFrom === 'earliest' ? Math.max(0, w.lowOffset) : w.highOffset);
    return from >= w.highOffset;
  }

  /**
   * Marks partitions idle (nothing buffered, and read to the end or, while fetched, silent for
   * partitionIdleMs) or active. Returns the new watermark when that raised it, else null.
   */
  private refreshIdle(): number | null {
    const inputs = this.inputs;
    if (inputs === null) return null;
    const before = inputs.watermark();
    const now = performance.now();
    for (const [p, q] of this.queues) {
      // Silence counts only while the partition is fetched: a paused one gets nothing by our doing.
      const idle = q.head >= q.msgs.length && (this.caughtUp(p) || (!q.paused && now - q.lastDataAt >= this.cfg.partitionIdleMs));
      inputs.setIdle(p, idle);
    }
    const after = inputs.watermark();
    return after > before ? after : null;
  }

  /** The two lowest stream times over the assigned, active partitions. */
  private lows(): void {
    const inputs = this.inputs!;
    this.low1 = Number.POSITIVE_INFINITY;
    this.low2 = Number.POSITIVE_INFINITY;
    this.lowAt = -1;
    for (const p of this.assignment) {
      if (inputs.isIdle(p)) continue;
      const t = inputs.streamTime(p);
      if (this.lowAt < 0 || t < this.low1) {
        this.low2 = this.low1;
        this.low1 = t;
        this.lowAt = p;
      } else if (t < this.low2) this.low2 = t;
    }
  }

  /** After lows(): the lowest stream time of the active partitions other than p (+∞: none). */
  private othersMin(p: number): number {
    return p === this.lowAt ? this.low2 : this.low1;
  }

  /**
   * The partition the next batch comes from, or −1. With per-partition watermarks: the one with
   * the lowest stream time among those with messages that are not maxSkewMs ahead of the others
   * (the one holding the watermark back is never ahead, so the stream always moves).
   */
  private pick(): number {
    const inputs = this.inputs;
    if (inputs === null) {
      // Round robin over the partitions with messages.
      const n = this.assignment.length;
      let from = this.assignment.indexOf(this.lastPicked) + 1;
      for (let k = 0; k < n; k++, from++) {
        const p = this.assignment[from % n]!;
        const q = this.queues.get(p);
        if (q !== undefined && q.head < q.msgs.length) return (this.lastPicked = p);
      }
      return -1;
    }
    this.lows();
    let best = -1;
    let bestT = Number.POSITIVE_INFINITY;
    for (const p of this.assignment) {
      const q = this.queues.get(p)!;
      if (q.head >= q.msgs.length) continue;
      const t = inputs.streamTime(p);
      if (t > this.othersMin(p) + this.cfg.maxSkewMs) continue;
      if (best < 0 || t < bestT) {
        best = p;
        bestT = t;
      }
    }
    return best;
  }

  /** Decodes partition p's next messages into `batch`: up to its capacity, and past the skew bound by one row at most. */
  private fill(batch: EventColumns, p: number): void {
    batch.reset();
    const q = this.queues.get(p)!;
    const json = this.cfg.format === 'json';
    // lows() ran in pick(): the other partitions' lowest stream time bounds how far this one goes.
    const limit = this.inputs === null ? Number.POSITIVE_INFINITY : this.othersMin(p) + this.cfg.maxSkewMs;
    while (q.head < q.msgs.length && batch.length < batch.capacity) {
      const m = q.msgs[q.head++]!;
      this.buffered--;
      const origin = `${m.topic}/${m.partition}@${m.offset}`;
      const value = m.value ?? EMPTY;
      const i = json ? appendJsonEvent(batch, value.toString('utf8'), origin, this.opts.timeZone) : appendProtoEvent(batch, value, origin);
      this.offsets.set(p, m.offset + 1);
      if (batch.status[i] === Reject.ok && batch.ts[i]! > limit) break;
    }
    if (q.head >= q.msgs.length) {
      q.msgs = [];
      q.head = 0;
    } else if (q.head >= 1024 && q.head * 2 >= q.msgs.length) {
      // Drop the handed-out prefix now and then, not per batch (small batches of a sparse topic).
      q.msgs = q.msgs.slice(q.head);
      q.head = 0;
    }
  }

  private async fetchLoop(): Promise<void> {
    while (!this.closing) {
      this.updatePauses();
      let msgs: Message[];
      try {
        // Paused partitions return nothing; the call still serves rebalances and waits pollMs at most.
        msgs = await new Promise<Message[]>((resolve, reject) => {
          this.consumer.consume(this.cfg.maxBatch, (err, m) => (err ? reject(err) : resolve(m)));
        });
      } catch (err) {
        if (this.closing) return;
        // consume() fails only on a fatal client state; broker trouble is retried inside librdkafka.
        this.fetchError = new CrmError('KAFKA_ERROR', `consuming ${this.topic} failed`, { cause: err });
        this.wake?.();
        return;
      }
      const now = performance.now();
      for (const m of msgs) {
        if (m.topic !== this.topic) continue;
        const q = this.queues.get(m.partition);
        if (q === undefined) continue; // revoked during that consume
        if (m.offset < q.fetchedNext) continue; // delivered again after a pause: already queued
        q.fetchedNext = m.offset + 1;
        // A message at or past the reported end: the partition grew since, the report is stale.
        if (m.offset >= (this.eofAt.get(m.partition) ?? Infinity)) this.eofAt.delete(m.partition);
        q.msgs.push(m);
        q.lastDataAt = now;
        this.buffered++;
        // Data: the partition holds the watermark again (never raises it, so safe between batches).
        if (this.inputs !== null && this.inputs.isIdle(m.partition)) this.inputs.setIdle(m.partition, false);
      }
      this.updatePauses();
      const w = this.wake;
      if (w !== null) {
        this.wake = null;
        w();
      }
    }
  }

  /**
   * Pauses a partition holding its share of maxBuffered, or (per-partition watermarks) running
   * maxSkewMs ahead of the other active partitions; resumes it at half of either. Only the
   * partitions whose state changes are passed to librdkafka (a pause drops what it prefetched
   * for them; the resume fetches again from the last message the source took). Looked at once
   * per consume call (at least every pollMs), not per batch: pause and resume are synchronous
   * calls into librdkafka, and on a sparse topic small batches would flip them every time.
   */
  private updatePauses(): void {
    const n = this.assignment.length;
    if (n === 0 || this.closing) return;
    const share = Math.max(1, Math.floor(this.cfg.maxBuffered / n));
    const skew = this.cfg.maxSkewMs;
    const inputs = this.inputs;
    if (inputs !== null) this.lows();
    let pause: TopicPartition[] | null = null;
    let resume: TopicPartition[] | null = null;
    for (const p of this.assignment) {
      const q = this.queues.get(p)!;
      const queued = q.msgs.length - q.head;
      let ahead = false;
      if (inputs !== null && !inputs.isIdle(p)) ahead = inputs.streamTime(p) > this.othersMin(p) + (q.paused ? skew / 2 : skew);
      const want = q.paused ? queued > share / 2 || ahead : queued >= share || ahead;
      if (want === q.paused) continue;
      q.paused = want;
      if (want) {
        this.counters.pauses++;
        (pause ??= []).push({ topic: this.topic, partition: p });
      } else {
        q.lastDataAt = performance.now(); // its silence counts from now
        (resume ??= []).push({ topic: this.topic, partition: p });
      }
    }
    try {
      if (pause !== null) this.consumer.pause(pause);
      if (resume !== null) this.consumer.resume(resume);
    } catch (err) {
      this.counters.errors++;
      this.opts.onError?.(err as Error);
    }
  }

  private rebalance(err: LibrdKafkaError, assignment: Assignment[]): void {
    this.counters.rebalances++;
    try {
      if (err.code === ERR_ASSIGN) {
        const start = this.cfg.startFrom === 'earliest' ? OFFSET_BEGINNING : OFFSET_END;
        const tps = assignment.map((a) => ({ topic: a.topic, partition: a.partition, offset: this.offsets.get(a.partition) ?? start }));
        this.assignment = tps.filter((t) => t.topic === this.topic).map((t) => t.partition).sort((a, b) => a - b);
        const now = performance.now();
        for (const p of this.assignment) {
          this.eofAt.delete(p);
          this.queues.set(p, { msgs: [], head: 0, fetchedNext: this.offsets.get(p) ?? -1, lastDataAt: now, paused: false });
        }
        this.consumer.assign(tps);
        this.inputs?.assign(this.assignment);
        this.checkOwnership();
      } else if (err.code === ERR_REVOKE) {
        // Paused partitions are resumed before they go, so this process does not find them
        // paused if they come back (not while closing: librdkafka refuses it then, ERR__STATE).
        const paused = [...this.queues].filter(([, q]) => q.paused).map(([partition]) => ({ topic: this.topic, partition }));
        for (const q of this.queues.values()) this.buffered -= q.msgs.length - q.head;
        this.queues.clear();
        this.assignment = [];
        // No partition: the watermark holds until the next assignment.
        this.inputs?.assign([]);
        try {
          if (paused.length > 0 && !this.closing) this.consumer.resume(paused);
        } finally {
          // Always answered: the group (and a closing disconnect) waits for it.
          this.consumer.unassign();
        }
      }
    } catch (e) {
      this.counters.errors++;
      this.opts.onError?.(e as Error);
    }
  }

  /**
   * One process keeps the state of every partition it reads: a second member of the group would
   * split the users' events between two states (scale-out with state per partition is not built
   * yet). Counted and reported, so the operator sees it at once instead of in wrong KPIs.
   */
  private checkOwnership(): void {
    const assigned = this.assignment.length;
    this.consumer.getMetadata({ topic: this.topic, timeout: 5_000 }, (err, md) => {
      if (err || this.closing) return;
      const total = md.topics.find((t) => t.name === this.topic)?.partitions.length ?? assigned;
      this.unowned = Math.max(0, total - assigned);
      if (this.unowned > 0) {
        this.opts.onError?.(new CrmError('KAFKA_ERROR', `${this.unowned} of ${total} partitions of ${this.topic} are assigned to another member of group ${this.cfg.groupId}: run one crmstream instance per group (its state must see every partition)`));
      }
    });
  }

  /**
   * Lag from librdkafka's cached high watermarks (updated by every fetch response): no broker
   * round trip and no libuv thread. An awaited query per partition per second shares the thread
   * pool with consume() and, once partitions sit at their end, can pile up and starve it.
   */
  private queryLag(): void {
    for (const p of this.assignment) {
      let w: { highOffset: number; lowOffset: number };
      try {
        w = this.consumer.getWatermarkOffsets(this.topic, p);
      } catch {
        continue; // not fetched yet: no cached watermark
      }
      if (!(w.highOffset >= 0)) continue;
      const next = this.offsets.get(p);
      this.lagByPartition.set(p, next === undefined || next < 0 ? w.highOffset - Math.max(0, w.lowOffset) : Math.max(0, w.highOffset - next));
    }
    for (const p of this.lagByPartition.keys()) if (!this.assignment.includes(p)) this.lagByPartition.delete(p);
  }
}

const EMPTY = Buffer.alloc(0);
