/**
 * A Kafka changelog for one task's state store, Kafka Streams style: when a partition of the
 * events topic (a "task") moves to another instance of the consumer group, its state moves with it
 * through one partition of a changelog topic.
 *
 * The protocol, per `write(ops)` or `clearRange(range)` (a *unit*):
 *
 * 1. every op is produced to the task's changelog partition — key = the store key (UTF-8), value =
 *    the bytes, a `del` is a tombstone (null value), a clearRange is one message with key
 *    `"\u0000clear"` and value JSON `{"gte","lt"}` — each with headers `crmstream-unit: <unitId>`
 *    and `crmstream-seq: <index in the unit>`; a put of an empty value also has the header
 *    `crmstream-empty: 1`, because node-rdkafka produces a zero-length Buffer as a null value,
 *    which would read back as a tombstone (the timers index stores empty values); then we wait
 *    for every delivery report;
 * 2. one marker message, key `"\u0000unit"`, value JSON `{"id": unitId, "count": n}`, same
 *    `crmstream-unit` header; we wait for its delivery report;
 * 3. only then the ops go to the local store, in ONE local write that also puts
 *    `m/changelog-next` = marker offset + 1 (that key is never produced).
 *
 * Why the marker is produced only after the ops are acknowledged: a refused op is produced again,
 * and lands after later ops of its unit. It must still land before the marker, or a restore would
 * see the marker of an incomplete unit. The `crmstream-seq` header puts re-sent ops back in their
 * order and makes a duplicate (an op the broker stored although its report said it failed) count
 * once. The price is one extra acknowledgement round trip per unit; a unit is a checkpoint, not an
 * event.
 *
 * Crash windows (a SIGKILL anywhere):
 * - during step 1 or 2: the changelog holds a fragment without its marker. Restores discard it: a
 *   unit is applied only when its marker arrives with the count of its distinct ops, and the next
 *   unit has another id (`<uuid of this open>:<counter>`), so fragments never mix with it.
 * - between step 2 and 3: the changelog is one unit ahead of the local copy. The next
 *   openChangelogStore reads from the local `m/changelog-next` and catches up. The engine's unit
 *   carries its meta with the source offsets, so state and offsets stay consistent either way.
 * - inside a restore, or between clearRange's two local calls: `m/changelog-next` is behind what
 *   was applied locally. Replaying a suffix of the log over a state that already has part of that
 *   suffix applied yields the same state (each op decides the final value of the keys it touches;
 *   keys no op touches are as they were), so the next open simply replays from there.
 *
 * Requirements on the changelog topic: `cleanup.policy=delete` with `retention.ms=-1` and
 * `retention.bytes=-1`. Unlike Kafka Streams' changelogs it must NOT be compacted: compaction drops
 * superseded ops and all but the last marker, and a unit missing an op cannot be told from a
 * crashed one. A restore therefore reads the whole history for a fresh local copy; a gap in the
 * offsets (compaction) or a deleted start (retention) fails with STATE_CORRUPT rather than
 * restoring a wrong state. One writer per partition: a zombie instance still writing after its
 * task moved is not fenced (Kafka Streams uses transactions for that).
 */
import { randomUUID } from 'node:crypto';
import { performance } from 'node:perf_hooks';
import { setTimeout as sleep } from 'node:timers/promises';
import Kafka from 'node-rdkafka';
import type { DeliveryReport, KafkaConsumer, LibrdKafkaError, Message, MessageHeader, Producer, WatermarkOffsets } from 'node-rdkafka';
import type { KvEntry, KvStore, Range, WriteOp } from '../../state/store.js';
import { CrmError } from '../errors.js';
import { header } from './util.js';

/** The wrapper's own key in the local store: the changelog offset the local copy covers. */
export const CHANGELOG_NEXT_KEY = 'm/changelog-next';
const MARKER_KEY = '\u0000unit';
const CLEAR_KEY = '\u0000clear';
const H_UNIT = 'crmstream-unit';
const H_SEQ = 'crmstream-seq';
/** On a put of an empty value: node-rdkafka sends it as null, so it is told from a tombstone here. */
const H_EMPTY = 'crmstream-empty';
/** Ops per local write while restoring: bounds the memory of one batch, amortises the fsync. */
const RESTORE_BATCH_OPS = 50_000;
/** Messages per consume call while restoring. */
const RESTORE_FETCH = 10_000;
/** How long one consume call waits (ms): the granularity of the restore's idle timeout. */
const RESTORE_POLL_MS = 100;
/** Pause before producing refused messages again (ms). */
const RETRY_PAUSE_MS = 100;
const ERR_QUEUE_FULL = -184;

const utf8 = new TextEncoder();

export interface ChangelogOptions {
  /** `metadata.broker.list`. */
  readonly brokers: string;
  /** The changelog topic (one partition per task; created by the caller; see the module comment for its config). */
  readonly topic: string;
  /** This task's partition of it. */
  readonly partition: number;
  /** `client.id` of the restore consumer (default `crmstream`). */
  readonly clientId?: string;
  /**
   * How long a unit may take to be acknowledged, refused messages produced again meanwhile
   * (ms, default 30,000); then the write fails with KAFKA_ERROR. Also bounds how long a reopen waits
   * for this partition's messages still in flight in the shared producer.
   */
  readonly deliveryTimeoutMs?: number;
  /**
   * A restore fails with KAFKA_ERROR when no message arrives for this long (ms, default 30,000).
   * An idle bound, not a total one: a long changelog may take longer as long as it makes progress.
   */
  readonly restoreIdleTimeoutMs?: number;
}

interface ResolvedOptions {
  readonly brokers: string;
  readonly topic: string;
  readonly partition: number;
  readonly clientId: string;
  readonly deliveryTimeoutMs: number;
  readonly restoreIdleTimeoutMs: number;
}

export interface RestoreStats {
  /** Changelog offset the restore started at (the local `m/changelog-next`, else the low watermark). */
  readonly fromOffset: number;
  /** The high watermark it read up to; the local `m/changelog-next` afterwards. */
  readonly toOffset: number;
  /** Complete units applied. */
  readonly units: number;
  /** Ops of those units applied (a clearRange counts as one). */
  readonly ops: number;
  /** Messages of units without a matching marker (crashed mid-unit, or duplicates), skipped. */
  readonly discarded: number;
  readonly ms: number;
  /** True when the local copy was already at the high watermark: nothing was read. */
  readonly current: boolean;
}

export interface ChangelogStoreStats {
  readonly units: number;
  readonly messages: number;
  /** Messages produced again after a failed delivery report. */
  readonly retried: number;
}

// ---------------------------------------------------------------------------------------------
// SharedProducer
// ---------------------------------------------------------------------------------------------

/** One message for SharedProducer.produceBatch. */
export interface ChangelogMessage {
  readonly key: string;
  /** null: a tombstone. */
  readonly value: Uint8Array | null;
  readonly headers: MessageHeader[];
}

/** Per message of a batch: its offset, or the error of its delivery (offset -1). */
export interface BatchOutcome {
  readonly offsets: readonly number[];
  readonly errors: readonly (Error | null)[];
  readonly failed: number;
}

export interface SharedProducerStats {
  readonly produced: number;
  readonly delivered: number;
  /** Delivery reports with an error, and messages librdkafka refused to enqueue. */
  readonly failed: number;
  /** Waits for room in librdkafka's local queue (ERR__QUEUE_FULL). */
  readonly queueFull: number;
  /** Client-level errors librdkafka reported (it retries broker trouble itself). */
  readonly errors: number;
  /** Messages waiting for their delivery report. */
  readonly inFlight: number;
}

/** The delivery reports one produceBatch call waits for; settles once, when all have arrived. */
class BatchWait {
  readonly offsets: number[];
  readonly errors: (Error | null)[];
  remaining: number;
  failed: number;
  readonly tp: string;
  private resolve: ((o: BatchOutcome) => void) | null;
  readonly done: Promise<BatchOutcome>;

  constructor(size: number, tp: string) {
    this.offsets = new Array<number>(size).fill(-1);
    this.errors = new Array<Error | null>(size).fill(null);
    this.remaining = size;
    this.failed = 0;
    this.tp = tp;
    this.resolve = null;
    this.done = new Promise<BatchOutcome>((r) => {
      this.resolve = r;
    });
  }

  settle(index: number, offset: number, err: Error | null): void {
    if (err === null) this.offsets[index] = offset;
    else {
      this.errors[index] = err;
      this.failed++;
    }
    if (--this.remaining === 0) this.resolve?.({ offsets: this.offsets, errors: this.errors, failed: this.failed });
  }
}

/** Where a delivery report goes: its batch and its index there. */
class Slot {
  constructor(readonly wait: BatchWait, readonly index: number) {}
}

/**
 * One idempotent node-rdkafka producer shared by the ChangelogStores of one process (one per
 * task): one connection set and one poll timer instead of one per task. Idempotence keeps the order
 * of a partition's messages through librdkafka's own retries, which the unit protocol relies on.
 *
 * @example
 * const producer = await SharedProducer.connect('127.0.0.1:9092', 'crmstream');
 * const { store } = await openChangelogStore(new LevelStore(dir), producer, { brokers, topic: 'state-changelog', partition: 3 });
 * // … close the stores, then:
 * await producer.close();
 */
export class SharedProducer {
  private readonly waiting = new Map<number, Slot>();
  /** Messages awaiting their report, per `topic/partition`. */
  private readonly inFlightByTp = new Map<string, number>();
  private readonly counters = { produced: 0, delivered: 0, failed: 0, queueFull: 0, errors: 0 };
  private nextId = 1;
  private closed = false;

  private constructor(private readonly producer: Producer) {}

  /**
   * Connects (30 s bound). `config` adds librdkafka properties (e.g. `reconnect.backoff.max.ms`);
   * the ones the protocol needs (idempotence, delivery reports) cannot be overridden.
   */
  static async connect(brokers: string, clientId: string, config: Readonly<Record<string, string | number | boolean>> = {}): Promise<SharedProducer> {
    const producer = new Kafka.Producer({
      'linger.ms': 2,
      ...config,
      'metadata.broker.list': brokers,
      'client.id': clientId,
      'enable.idempotence': true,
      dr_cb: true,
    });
    const self = new SharedProducer(producer);
    producer.on('delivery-report', (err, report) => self.delivered(err, report));
    producer.on('event.error', () => {
      self.counters.errors++;
    });
    await new Promise<void>((resolve, reject) => {
      producer.connect({ timeout: 30_000 }, (err) => (err ? reject(new CrmError('KAFKA_ERROR', `cannot connect the changelog producer to ${brokers}`, { cause: err })) : resolve()));
    });
    producer.setPollInterval(5);
    return self;
  }

  stats(): SharedProducerStats {
    let inFlight = 0;
    for (const n of this.inFlightByTp.values()) inFlight += n;
    return { ...this.counters, inFlight };
  }

  /** Messages to `topic/partition` still waiting for their delivery report. */
  inFlight(topic: string, partition: number): number {
    return this.inFlightByTp.get(`${topic}/${partition}`) ?? 0;
  }

  /** One message; resolves with its offset on its delivery report, rejects with KAFKA_ERROR. */
  async produce(topic: string, partition: number, key: string, value: Uint8Array | null, headers: MessageHeader[]): Promise<{ offset: number }> {
    const out = await this.produceBatch(topic, partition, [{ key, value, headers }]);
    const err = out.errors[0];
    if (err !== null && err !== undefined) throw err;
    return { offset: out.offsets[0]! };
  }

  /**
   * Produces the messages in order to one partition and resolves when every delivery report has
   * arrived (one promise per batch, not per message); failures are reported per message, never
   * thrown, so the caller decides what to send again. A full local queue is waited out until
   * `deadline` (a performance.now() time), after which the rest count as failed.
   *
   * Buffer ownership: librdkafka copies key and value when produce() is called (RK_MSG_COPY);
   * the caller may reuse the buffers once this returns a promise... but only for the messages
   * already handed over, so: keep them until the promise settles.
   */
  async produceBatch(topic: string, partition: number, messages: readonly ChangelogMessage[], deadline = Infinity): Promise<BatchOutcome> {
    const tp = `${topic}/${partition}`;
    const wait = new BatchWait(messages.length, tp);
    if (messages.length === 0) return { offsets: [], errors: [], failed: 0 };
    for (let i = 0; i < messages.length; ) {
      const m = messages[i]!;
      if (this.closed) {
        this.counters.failed++;
        wait.settle(i++, -1, new CrmError('KAFKA_ERROR', 'the changelog producer is closed'));
        continue;
      }
      const id = this.nextId++;
      const value = m.value === null ? null : Buffer.from(m.value.buffer, m.value.byteOffset, m.value.byteLength);
      try {
        this.producer.produce(topic, partition, value, Buffer.from(m.key, 'utf8'), Date.now(), id, m.headers);
      } catch (err) {
        // The local queue is full (broker slow or down): wait for delivery reports to free it.
        if ((err as LibrdKafkaError).code === ERR_QUEUE_FULL && performance.now() < deadline) {
          this.counters.queueFull++;
          await sleep(10);
          continue;
        }
        this.counters.failed++;
        wait.settle(i++, -1, new CrmError('KAFKA_ERROR', `cannot produce to ${tp}: ${(err as Error).message}`, { cause: err }));
        continue;
      }
      this.waiting.set(id, new Slot(wait, i));
      this.inFlightByTp.set(tp, (this.inFlightByTp.get(tp) ?? 0) + 1);
      this.counters.produced++;
      i++;
    }
    return wait.done;
  }

  /**
   * Flushes (10 s bound) and disconnects. Messages still without a report then fail with
   * KAFKA_ERROR, so no caller waits forever.
   */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    const flushErr = await new Promise<LibrdKafkaError | null>((resolve) => {
      this.producer.flush(10_000, (err) => resolve(err ?? null));
    });
    await new Promise<void>((resolve) => {
      this.producer.disconnect(() => resolve());
    });
    const gone = new CrmError('KAFKA_ERROR', 'the changelog producer was closed before the delivery report arrived');
    for (const [id, slot] of this.waiting) {
      this.waiting.delete(id);
      this.release(slot.wait.tp);
      slot.wait.settle(slot.index, -1, gone);
    }
    if (flushErr !== null) throw new CrmError('KAFKA_ERROR', `flushing the changelog producer failed: ${flushErr.message}`, { cause: flushErr });
  }

  private delivered(err: LibrdKafkaError | null, report: DeliveryReport): void {
    const id: unknown = report.opaque;
    if (typeof id !== 'number') return;
    const slot = this.waiting.get(id);
    if (slot === undefined) return;
    this.waiting.delete(id);
    this.release(slot.wait.tp);
    if (err) {
      this.counters.failed++;
      slot.wait.settle(slot.index, -1, new CrmError('KAFKA_ERROR', `delivery to ${report.topic}/${report.partition} failed: ${err.message}`, { cause: err }));
    } else {
      this.counters.delivered++;
      slot.wait.settle(slot.index, report.offset, null);
    }
  }

  private release(tp: string): void {
    const n = (this.inFlightByTp.get(tp) ?? 1) - 1;
    if (n <= 0) this.inFlightByTp.delete(tp);
    else this.inFlightByTp.set(tp, n);
  }
}

// ---------------------------------------------------------------------------------------------
// ChangelogStore
// ---------------------------------------------------------------------------------------------

/**
 * A `KvStore` whose writes go to a changelog partition before they go to the local store; reads
 * go to the local store. Get one from openChangelogStore, which first brings the local copy up to
 * the changelog's end. Writes and clearRanges run one at a time, in call order.
 *
 * After a failed write or clearRange the store refuses further writes (KAFKA_ERROR): the changelog
 * may hold that unit while the local copy does not, and later units must not be logged on top of a
 * local copy that differs from the log. Close it and openChangelogStore again: the reopen catches up.
 *
 * Keys beginning with U+0000 and the key `m/changelog-next` are reserved (TypeError).
 *
 * Buffer ownership: the values of `write(ops)` are read twice — when produced and, after the
 * acknowledgements, by the local write — so they must not change until the promise settles.
 */
export class ChangelogStore implements KvStore {
  readonly kind: 'memory' | 'level';
  /** A new one per open: unit ids are unique across processes and restarts. */
  private readonly session: string;
  private unitCounter: number;
  /** Settles when the last queued unit has finished. */
  private tail: Promise<void>;
  /** Set by the first failed unit; see the class comment. */
  private broken: CrmError | null;
  private closeRequested: boolean;
  private readonly counters: { units: number; messages: number; retried: number };

  /** Use openChangelogStore. */
  constructor(
    private readonly local: KvStore,
    private readonly producer: SharedProducer,
    private readonly opts: ResolvedOptions,
  ) {
    this.kind = local.kind;
    this.session = randomUUID();
    this.unitCounter = 0;
    this.tail = Promise.resolve();
    this.broken = null;
    this.closeRequested = false;
    this.counters = { units: 0, messages: 0, retried: 0 };
  }

  stats(): ChangelogStoreStats {
    return { ...this.counters };
  }

  /** Opens the local store only; a reopen after close() should go through openChangelogStore to catch up. */
  async open(): Promise<void> {
    await this.local.open();
    this.closeRequested = false;
  }

  getSync(key: string): Uint8Array | undefined {
    return this.local.getSync(key);
  }

  get(key: string): Promise<Uint8Array | undefined> {
    return this.local.get(key);
  }

  scan(range: Range, batchSize?: number): AsyncIterable<readonly KvEntry[]> {
    return this.local.scan(range, batchSize);
  }

  scanKeys(range: Range, batchSize?: number): AsyncIterable<readonly string[]> {
    return this.local.scanKeys(range, batchSize);
  }

  /** One unit: logged, acknowledged, then applied locally in one atomic local write. */
  write(ops: readonly WriteOp[]): Promise<void> {
    // Checked before queueing: a rejected batch has not touched the log, so it does not break the store.
    for (const op of ops) {
      checkKey(op.key);
      if (op.type === 'put' && !(op.value instanceof Uint8Array)) throw new TypeError('WriteOp.value must be a Uint8Array');
    }
    return this.enqueue(async () => {
      if (ops.length === 0) return;
      const unit = this.nextUnitId();
      const messages = ops.map((op, i): ChangelogMessage => {
        const headers: MessageHeader[] = [{ [H_UNIT]: unit }, { [H_SEQ]: String(i) }];
        if (op.type === 'put' && op.value.byteLength === 0) headers.push({ [H_EMPTY]: '1' });
        return { key: op.key, value: op.type === 'put' ? op.value : null, headers };
      });
      const next = await this.logUnit(unit, messages);
      await this.local.write([...ops, nextOp(next)]);
    });
  }

  /**
   * One unit of one message. Locally two calls — clearRange, then the `m/changelog-next` put —
   * because KvStore has no atomic "clear and put"; a crash between them leaves the pointer behind,
   * and the next open replays from it (harmless, see the module comment).
   */
  clearRange(range: { readonly gte: string; readonly lt: string }): Promise<void> {
    return this.enqueue(async () => {
      const unit = this.nextUnitId();
      const message: ChangelogMessage = {
        key: CLEAR_KEY,
        value: utf8.encode(JSON.stringify({ gte: range.gte, lt: range.lt })),
        headers: [{ [H_UNIT]: unit }, { [H_SEQ]: '0' }],
      };
      const next = await this.logUnit(unit, [message]);
      await this.local.clearRange(range);
      await this.local.write([nextOp(next)]);
    });
  }

  /** Waits for queued units, then closes the local store. The shared producer stays open (its owner closes it). */
  async close(): Promise<void> {
    this.closeRequested = true;
    await this.tail;
    await this.local.close();
  }

  private nextUnitId(): string {
    return `${this.session}:${++this.unitCounter}`;
  }

  /** Runs `task` after every earlier unit; a failure breaks the store (class comment) and goes to this caller. */
  private enqueue(task: () => Promise<void>): Promise<void> {
    const run = this.tail.then(async () => {
      if (this.closeRequested) throw new CrmError('STATE_CLOSED', 'the changelog store was closed');
      if (this.broken !== null) {
        throw new CrmError('KAFKA_ERROR', `an earlier unit of ${this.opts.topic}/${this.opts.partition} failed; close this store and openChangelogStore again to catch up`, { cause: this.broken });
      }
      try {
        await task();
      } catch (err) {
        this.broken = err instanceof CrmError ? err : new CrmError('STATE_IO', `changelog unit failed: ${(err as Error).message}`, { cause: err });
        throw err;
      }
    });
    this.tail = run.catch(() => undefined);
    return run;
  }

  /** Steps 1 and 2 of the protocol; returns the offset after the marker. */
  private async logUnit(unit: string, messages: readonly ChangelogMessage[]): Promise<number> {
    const deadline = performance.now() + this.opts.deliveryTimeoutMs;
    await this.deliverAll(messages, deadline);
    const marker: ChangelogMessage = {
      key: MARKER_KEY,
      value: utf8.encode(JSON.stringify({ id: unit, count: messages.length })),
      headers: [{ [H_UNIT]: unit }],
    };
    const [offset] = await this.deliverAll([marker], deadline);
    this.counters.units++;
    return offset! + 1;
  }

  /** Produces until every message is acknowledged or `deadline` passes (KAFKA_ERROR); returns the offsets. */
  private async deliverAll(messages: readonly ChangelogMessage[], deadline: number): Promise<number[]> {
    const { topic, partition, deliveryTimeoutMs } = this.opts;
    const offsets = new Array<number>(messages.length).fill(-1);
    let todo = messages.map((_, i) => i);
    for (;;) {
      this.counters.messages += todo.length;
      const out = await beforeDeadline(this.producer.produceBatch(topic, partition, todo.map((i) => messages[i]!), deadline), deadline);
      if (out === null) {
        throw new CrmError('KAFKA_ERROR', `${topic}/${partition}: a changelog unit was not acknowledged within ${deliveryTimeoutMs} ms`);
      }
      const failed: number[] = [];
      let firstError: Error | null = null;
      for (let j = 0; j < todo.length; j++) {
        const err = out.errors[j]!;
        if (err === null) offsets[todo[j]!] = out.offsets[j]!;
        else {
          failed.push(todo[j]!);
          firstError ??= err;
        }
      }
      if (failed.length === 0) return offsets;
      if (performance.now() + RETRY_PAUSE_MS >= deadline) {
        throw new CrmError('KAFKA_ERROR', `${topic}/${partition}: ${failed.length} changelog messages not acknowledged within ${deliveryTimeoutMs} ms: ${firstError!.message}`, { cause: firstError });
      }
      this.counters.retried += failed.length;
      await sleep(RETRY_PAUSE_MS);
      todo = failed;
    }
  }
}

/**
 * Opens `local`, brings it up to the end of the changelog partition and wraps it.
 *
 * The local `m/changelog-next` (L; absent → the low watermark) is compared with the high
 * watermark H: L = H means the local copy is current and nothing is read; L < H reads the
 * partition from L to H (assign, no group, nothing committed) and applies every complete unit in
 * order, batched; L > H (the topic was recreated or truncated) and a start deleted by retention
 * fail with STATE_CORRUPT — the local copy would be silently wrong otherwise, and wiping it could
 * throw away the only copy of the state. On failure the local store is closed again.
 *
 * @example
 * const producer = await SharedProducer.connect(brokers, 'crmstream');
 * const { store, restored } = await openChangelogStore(new LevelStore(`data/task-${p}`), producer, { brokers, topic: 'crm-changelog', partition: p });
 * log.info(restored, 'state restored');
 */
export async function openChangelogStore(local: KvStore, producer: SharedProducer, options: ChangelogOptions): Promise<{ store: ChangelogStore; restored: RestoreStats }> {
  const opts = resolveOptions(options);
  const t0 = performance.now();
  await local.open();
  let restored: RestoreStats;
  try {
    // A unit of an earlier store on this partition (e.g. one that failed at its deadline) may still
    // be on its way; reading the watermark before it lands would skip it.
    const deadline = performance.now() + opts.deliveryTimeoutMs;
    while (producer.inFlight(opts.topic, opts.partition) > 0) {
      if (performance.now() >= deadline) {
        throw new CrmError('KAFKA_ERROR', `${opts.topic}/${opts.partition}: earlier changelog messages still unacknowledged after ${opts.deliveryTimeoutMs} ms`);
      }
      await sleep(10);
    }
    restored = await restore(local, opts, t0);
  } catch (err) {
    try {
      await local.close();
    } catch (closeErr) {
      throw new CrmError('CLEANUP_FAILED', 'restoring from the changelog failed, and closing the local store too', { errors: [err, closeErr] });
    }
    throw err;
  }
  return { store: new ChangelogStore(local, producer, opts), restored };
}

// ---------------------------------------------------------------------------------------------
// Restore
// ---------------------------------------------------------------------------------------------

type RestoreOp = WriteOp | { readonly type: 'clear'; readonly gte: string; readonly lt: string };

/** The messages of one unit seen so far, by their index in the unit. */
class Fragment {
  readonly ops = new Map<number, RestoreOp>();
  received = 0;
}

async function restore(local: KvStore, opts: ResolvedOptions, t0: number): Promise<RestoreStats> {
  const { topic, partition } = opts;
  const consumer = await connectConsumer(opts);
  let stats: RestoreStats | null = null;
  let failure: unknown = null;
  try {
    const { lowOffset: low, highOffset: high } = await watermarks(consumer, opts);
    const stored = await readNext(local);
    const from = stored ?? low;
    if (from > high) {
      throw new CrmError('STATE_CORRUPT', `the local copy covers ${topic}/${partition} up to offset ${from}, but the changelog ends at ${high}: the topic was recreated or truncated. The local copy may be the only one left: back it up, then delete its m/changelog-next (or the store) to accept the changelog as it is`);
    }
    if (from < low || (stored === null && low > 0)) {
      throw new CrmError('STATE_CORRUPT', `${topic}/${partition} starts at offset ${low}, but the state needs it from ${stored ?? 0}: its start was deleted (retention or deleteRecords). Changelog topics need retention.ms=-1, retention.bytes=-1, cleanup.policy=delete`);
    }
    if (from === high) {
      stats = { fromOffset: from, toOffset: high, units: 0, ops: 0, discarded: 0, ms: performance.now() - t0, current: true };
    } else {
      const applied = await replay(consumer, local, opts, from, high);
      stats = { fromOffset: from, toOffset: high, ...applied, ms: performance.now() - t0, current: false };
    }
  } catch (err) {
    failure = err;
  }
  try {
    await new Promise<void>((resolve, reject) => {
      consumer.disconnect((err) => (err ? reject(new CrmError('KAFKA_ERROR', 'disconnecting the restore consumer failed', { cause: err })) : resolve()));
    });
  } catch (err) {
    failure = failure === null ? err : new CrmError('CLEANUP_FAILED', 'restore failed, and disconnecting its consumer too', { errors: [failure, err] });
  }
  if (failure !== null) throw failure;
  return stats!;
}

/** Reads [from, high) and applies the complete units; the last local write sets m/changelog-next = high. */
async function replay(consumer: KafkaConsumer, local: KvStore, opts: ResolvedOptions, from: number, high: number): Promise<{ units: number; ops: number; discarded: number }> {
  const { topic, partition } = opts;
  const fragments = new Map<string, Fragment>();
  let pending: WriteOp[] = [];
  /** Offset after the last applied marker: what the local copy covers once `pending` is written. */
  let covered = from;
  let units = 0;
  let ops = 0;
  let discarded = 0;
  let eof = -1;

  const flush = async (next: number): Promise<void> => {
    const batch = pending;
    pending = [];
    batch.push(nextOp(next));
    await local.write(batch);
  };
  const apply = async (frag: Fragment, count: number): Promise<void> => {
    for (let i = 0; i < count; i++) {
      const op = frag.ops.get(i)!;
      if (op.type === 'clear') {
        // Everything before it must be in the store first; the pointer stays at the previous unit.
        if (pending.length > 0) await flush(covered);
        await local.clearRange({ gte: op.gte, lt: op.lt });
      } else {
        pending.push(op);
      }
    }
    ops += count;
  };

  consumer.on('partition.eof', (e) => {
    if (e.topic === topic && e.partition === partition) eof = e.offset;
  });
  consumer.assign([{ topic, partition, offset: from }]);
  let next = from;
  let lastProgress = performance.now();
  while (next < high && eof < high) {
    const msgs = await new Promise<Message[]>((resolve, reject) => {
      consumer.consume(RESTORE_FETCH, (err, m) => (err ? reject(new CrmError('KAFKA_ERROR', `reading ${topic}/${partition} failed`, { cause: err })) : resolve(m)));
    });
    if (msgs.length === 0) {
      if (performance.now() - lastProgress > opts.restoreIdleTimeoutMs) {
        throw new CrmError('KAFKA_ERROR', `restoring ${topic}/${partition}: no message for ${opts.restoreIdleTimeoutMs} ms at offset ${next} of ${high}`);
      }
      continue;
    }
    lastProgress = performance.now();
    for (const m of msgs) {
      if (m.topic !== topic || m.partition !== partition || m.offset < next) continue;
      if (m.offset >= high) break;
      if (m.offset !== next) {
        throw new CrmError('STATE_CORRUPT', `${topic}/${partition} has no offset ${next} (next is ${m.offset}): the topic is compacted or was truncated; changelog topics need cleanup.policy=delete`);
      }
      next = m.offset + 1;
      const unit = header(m, H_UNIT);
      if (unit === null) throw corrupt(m, `no ${H_UNIT} header: not a crmstream changelog`);
      const key = m.key === null || m.key === undefined ? '' : typeof m.key === 'string' ? m.key : m.key.toString('utf8');
      if (key === MARKER_KEY) {
        const count = markerCount(m, unit);
        const frag = fragments.get(unit);
        fragments.delete(unit);
        if (frag !== undefined && frag.ops.size === count && complete(frag, count)) {
          await apply(frag, count);
          units++;
          covered = m.offset + 1;
          // Duplicates of acknowledged-then-retried messages were counted once by their index.
          discarded += frag.received - count;
          if (pending.length >= RESTORE_BATCH_OPS) await flush(covered);
        } else {
          discarded += (frag?.received ?? 0) + 1;
        }
        continue;
      }
      const seqText = header(m, H_SEQ);
      const seq = seqText === null ? NaN : Number(seqText);
      if (!Number.isInteger(seq) || seq < 0) throw corrupt(m, `missing or bad ${H_SEQ} header`);
      let frag = fragments.get(unit);
      if (frag === undefined) {
        frag = new Fragment();
        fragments.set(unit, frag);
      }
      frag.received++;
      frag.ops.set(seq, toOp(m, key));
    }
  }
  // Fragments left over belong to units that crashed before their marker: they never complete
  // (a later unit has another id), so the local copy covers everything up to `high`.
  for (const f of fragments.values()) discarded += f.received;
  await flush(high);
  return { units, ops, discarded };
}

/** Every index 0..count-1 present (a seq at or past the count is a foreign or corrupt unit: discarded). */
function complete(frag: Fragment, count: number): boolean {
  for (const i of frag.ops.keys()) if (i >= count) return false;
  return true;
}

function toOp(m: Message, key: string): RestoreOp {
  if (key === CLEAR_KEY) {
    const r = parseJson(m) as { gte?: unknown; lt?: unknown } | null;
    if (r === null || typeof r.gte !== 'string' || typeof r.lt !== 'string') throw corrupt(m, 'bad clearRange message');
    return { type: 'clear', gte: r.gte, lt: r.lt };
  }
  // node-rdkafka hands over a fresh Buffer per message (Nan::Encode copies): it is ours to keep.
  if (m.value !== null && m.value !== undefined) return { type: 'put', key, value: m.value };
  return header(m, H_EMPTY) === null ? { type: 'del', key } : { type: 'put', key, value: new Uint8Array(0) };
}

function markerCount(m: Message, unit: string): number {
  const v = parseJson(m) as { id?: unknown; count?: unknown } | null;
  if (v === null || v.id !== unit || typeof v.count !== 'number' || !Number.isInteger(v.count) || v.count < 1) {
    throw corrupt(m, 'bad unit marker');
  }
  return v.count;
}

function parseJson(m: Message): unknown {
  try {
    return JSON.parse(m.value === null ? '' : m.value.toString('utf8')) as unknown;
  } catch (err) {
    throw corrupt(m, 'value is not JSON', err);
  }
}

function corrupt(m: Message, what: string, cause?: unknown): CrmError {
  return new CrmError('STATE_CORRUPT', `changelog ${m.topic}/${m.partition}@${m.offset}: ${what}`, cause === undefined ? undefined : { cause });
}

async function readNext(local: KvStore): Promise<number | null> {
  const raw = await local.get(CHANGELOG_NEXT_KEY);
  if (raw === undefined) return null;
  const text = Buffer.from(raw.buffer, raw.byteOffset, raw.byteLength).toString('utf8');
  const n = Number(text);
  if (!/^\d+$/.test(text) || !Number.isSafeInteger(n)) throw new CrmError('STATE_CORRUPT', `local ${CHANGELOG_NEXT_KEY} is not an offset: ${JSON.stringify(text)}`);
  return n;
}

async function connectConsumer(opts: ResolvedOptions): Promise<KafkaConsumer> {
  const consumer = new Kafka.KafkaConsumer({
    'metadata.broker.list': opts.brokers,
    'client.id': opts.clientId,
    // Required by librdkafka, never joined: the partition is assigned, nothing is committed.
    'group.id': `crmstream-changelog-restore-${randomUUID()}`,
    'enable.auto.commit': false,
    'enable.auto.offset.store': false,
    'enable.partition.eof': true,
  }, {
    // An offset that vanished between the watermark query and the fetch is an error, not a jump.
    'auto.offset.reset': 'error',
  });
  await new Promise<void>((resolve, reject) => {
    consumer.connect({ timeout: 30_000 }, (err) => (err ? reject(new CrmError('KAFKA_ERROR', `cannot connect the restore consumer to ${opts.brokers}`, { cause: err })) : resolve()));
  });
  consumer.setDefaultConsumeTimeout(RESTORE_POLL_MS);
  return consumer;
}

function watermarks(consumer: KafkaConsumer, opts: ResolvedOptions): Promise<WatermarkOffsets> {
  return new Promise<WatermarkOffsets>((resolve, reject) => {
    consumer.queryWatermarkOffsets(opts.topic, opts.partition, 10_000, (err, w) => {
      if (err) reject(new CrmError('KAFKA_ERROR', `cannot read the watermarks of ${opts.topic}/${opts.partition}`, { cause: err }));
      else resolve(w);
    });
  });
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

function resolveOptions(o: ChangelogOptions): ResolvedOptions {
  const problems: string[] = [];
  if (typeof o.brokers !== 'string' || o.brokers === '') problems.push('brokers: give at least one host:port');
  if (typeof o.topic !== 'string' || o.topic === '') problems.push('topic: give the changelog topic');
  if (!Number.isInteger(o.partition) || o.partition < 0) problems.push('partition: a non-negative integer');
  for (const k of ['deliveryTimeoutMs', 'restoreIdleTimeoutMs'] as const) {
    const v = o[k];
    if (v !== undefined && (!Number.isInteger(v) || v < 1)) problems.push(`${k}: a positive integer (ms)`);
  }
  if (problems.length > 0) throw new CrmError('CONFIG_INVALID', `invalid changelog options:\n  ${problems.join('\n  ')}`);
  return Object.freeze({
    brokers: o.brokers,
    topic: o.topic,
    partition: o.partition,
    clientId: o.clientId ?? 'crmstream',
    deliveryTimeoutMs: o.deliveryTimeoutMs ?? 30_000,
    restoreIdleTimeoutMs: o.restoreIdleTimeoutMs ?? 30_000,
  });
}

function checkKey(key: string): void {
  if (key === CHANGELOG_NEXT_KEY || key.charCodeAt(0) === 0) {
    throw new TypeError(`key ${JSON.stringify(key)} is reserved by the changelog (U+0000 prefix, ${CHANGELOG_NEXT_KEY})`);
  }
}

function nextOp(offset: number): WriteOp {
  return { type: 'put', key: CHANGELOG_NEXT_KEY, value: utf8.encode(String(offset)) };
}


/** `p`'s value, or null once `deadline` (performance.now() time) has passed first. */
async function beforeDeadline<T>(p: Promise<T>, deadline: number): Promise<T | null> {
  let timer: NodeJS.Timeout | undefined;
  const expired = new Promise<null>((r) => {
    timer = setTimeout(() => r(null), Math.max(0, deadline - performance.now()));
  });
  try {
    return await Promise.race([p, expired]);
  } finally {
    clearTimeout(timer);
  }
}
