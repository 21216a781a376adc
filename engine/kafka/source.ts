import Kafka from 'node-rdkafka';
import type { Assignment, KafkaConsumer, LibrdKafkaError, Message } from 'node-rdkafka';
import { EventColumns } from '../batch.js';
import { appendJsonEvent, appendProtoEvent } from '../codec.js';
import type { SourceItem } from '../engine.js';
import { CrmError } from '../errors.js';
import type { KafkaConfig } from './config.js';

/** librdkafka's logical offsets for `assign`. */
const OFFSET_BEGINNING = -2;
const OFFSET_END = -1;
const ERR_ASSIGN = -175;
const ERR_REVOKE = -174;

/**
 * The source position stored with each checkpoint: the next offset to read per partition of the
 * events topic. It is what the state covers, so it, not the group's committed offsets, decides where
 * a restart continues (the commit to Kafka happens after the checkpoint and may lag behind it).
 */
export interface KafkaPosition {
  readonly kafka: { readonly topic: string; readonly offsets: Readonly<Record<string, number>> };
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
  readonly pauses: number;
  readonly buffered: number;
  readonly assigned: readonly number[];
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
   * End when every assigned partition has been read to its end (backfill from Kafka, tests):
   * the source yields `end` then. Default false: run until close().
   */
  readonly exitAtEnd?: boolean;
  /** Called with each librdkafka error event (logging). */
  readonly onError?: (err: unknown) => void;
}

/**
 * The events topic as an engine source: consumer-group member, auto-commit off, batches of decoded
 * columns tagged with their offsets.
 *
 * - A fetch loop pulls messages from librdkafka (its consume call runs off the JS thread) into a
 *   bounded buffer while the engine works on the previous batch; when `maxBuffered` messages wait,
 *   the assigned partitions are paused, and resumed once half of that is processed.
 * - On assignment every partition starts at the offset the state covers: the last one processed in
 *   this process, else the checkpointed one, else `startFrom`. On revocation buffered messages of
 *   the revoked partitions are dropped (their next owner reads them from its own offset).
 * - `commit(position)` (wired to engine.onCheckpoint) commits the checkpointed offsets to Kafka, so
 *   the group's lag as other tools see it follows the durable state.
 *
 * @example
 * const source = await KafkaSource.connect(kafkaConfig, { position: engine.position, batchRows: 4096, timeZone: 'Asia/Seoul' });
 * engine.onCheckpoint((p) => source.commit(p));
 * await engine.run(source);
 */
export class KafkaSource implements AsyncIterable<SourceItem> {
  private readonly topic: string;
  /** Next offset to process per partition (what the engine has been handed). */
  private readonly offsets = new Map<number, number>();
  private assignment: number[] = [];
  /** Per partition: the end offset librdkafka reported reaching (partition.eof). */
  private readonly eofAt = new Map<number, number>();
  private buffer: Message[] = [];
  private head = 0;
  private paused = false;
  private closing = false;
  private fetching: Promise<void> | null = null;
  private wake: (() => void) | null = null;
  private lagTimer: NodeJS.Timeout | null = null;
  private fetchError: Error | null = null;
  private readonly lagByPartition = new Map<number, number>();
  /** Partitions of the topic held by other group members (after the last assignment). */
  private unowned = 0;
  private readonly counters = { messages: 0, batches: 0, commits: 0, commitErrors: 0, errors: 0, rebalances: 0, pauses: 0 };

  private constructor(
    private readonly consumer: KafkaConsumer,
    private readonly cfg: KafkaConfig,
    private readonly opts: KafkaSourceOptions,
  ) {
    this.topic = cfg.topics.events;
    if (isKafkaPosition(opts.position, this.topic)) {
      for (const [p, o] of Object.entries(opts.position.kafka.offsets)) this.offsets.set(Number(p), o);
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
    return {
      ...this.counters, buffered: this.buffer.length - this.head, assigned: [...this.assignment], unowned: this.unowned,
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
    const json = this.cfg.format === 'json';
    for (;;) {
      if (this.fetchError !== null) throw this.fetchError;
      if (this.head >= this.buffer.length) {
        if (this.closing) return;
        if (this.opts.exitAtEnd === true && this.atEnd()) {
          yield { kind: 'end' };
          return;
        }
        await new Promise<void>((resolve) => {
          this.wake = resolve;
        });
        continue;
      }
      batch.reset();
      const end = Math.min(this.buffer.length, this.head + batch.capacity);
      const owned = new Set(this.assignment);
      for (; this.head < end; this.head++) {
        const m = this.buffer[this.head]!;
        if (!owned.has(m.partition)) continue; // revoked since it was fetched
        const origin = `${m.topic}/${m.partition}@${m.offset}`;
        const value = m.value ?? EMPTY;
        if (json) appendJsonEvent(batch, value.toString('utf8'), origin, this.opts.timeZone);
        else appendProtoEvent(batch, value, origin);
        this.offsets.set(m.partition, m.offset + 1);
      }
      if (this.head === this.buffer.length) {
        this.buffer = [];
        this.head = 0;
      }
      this.counters.messages += batch.length;
      this.counters.batches++;
      this.maybeResume();
      if (batch.length > 0) yield { kind: 'batch', batch, position: this.position() };
    }
  }

  /** The position covering everything handed out so far. */
  position(): KafkaPosition {
    const offsets: Record<string, number> = {};
    for (const [p, o] of [...this.offsets].sort((a, b) => a[0] - b[0])) offsets[String(p)] = o;
    return { kafka: { topic: this.topic, offsets } };
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

  /** Every assigned partition is handed out up to the end offset last reported (call with an empty buffer). */
  private atEnd(): boolean {
    if (this.assignment.length === 0) return false;
    for (const p of this.assignment) {
      const eof = this.eofAt.get(p);
      const next = this.offsets.get(p);
      if (eof === undefined || (next !== undefined && next < eof)) return false;
    }
    return true;
  }

  private async fetchLoop(): Promise<void> {
    while (!this.closing) {
      if (!this.paused && this.buffer.length - this.head >= this.cfg.maxBuffered) this.pause();
      if (this.paused) {
        // Paused partitions return nothing; wait a poll period for the engine to catch up.
        await new Promise((r) => setTimeout(r, this.cfg.pollMs));
        continue;
      }
      let msgs: Message[];
      try {
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
      if (msgs.length > 0) {
        for (const m of msgs) {
          if (m.topic !== this.topic) continue;
          // A message at or past the reported end: the partition grew since, the report is stale.
          if (m.offset >= (this.eofAt.get(m.partition) ?? Infinity)) this.eofAt.delete(m.partition);
          this.buffer.push(m);
        }
      }
      const w = this.wake;
      if (w !== null && (msgs.length > 0 || (this.opts.exitAtEnd === true && this.atEnd()))) {
        this.wake = null;
        w();
      }
    }
  }

  private pause(): void {
    this.paused = true;
    this.counters.pauses++;
    if (this.assignment.length > 0) this.consumer.pause(this.assignment.map((partition) => ({ topic: this.topic, partition })));
  }

  private maybeResume(): void {
    if (!this.paused || this.buffer.length - this.head > this.cfg.maxBuffered / 2) return;
    this.paused = false;
    if (this.assignment.length > 0) this.consumer.resume(this.assignment.map((partition) => ({ topic: this.topic, partition })));
  }

  private rebalance(err: LibrdKafkaError, assignment: Assignment[]): void {
    this.counters.rebalances++;
    try {
      if (err.code === ERR_ASSIGN) {
        const start = this.cfg.startFrom === 'earliest' ? OFFSET_BEGINNING : OFFSET_END;
        const tps = assignment.map((a) => ({ topic: a.topic, partition: a.partition, offset: this.offsets.get(a.partition) ?? start }));
        this.assignment = tps.filter((t) => t.topic === this.topic).map((t) => t.partition).sort((a, b) => a - b);
        for (const p of this.assignment) this.eofAt.delete(p);
        this.consumer.assign(tps);
        if (this.paused) this.consumer.pause(this.assignment.map((partition) => ({ topic: this.topic, partition })));
        this.checkOwnership();
      } else if (err.code === ERR_REVOKE) {
        this.assignment = [];
        this.consumer.unassign();
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
