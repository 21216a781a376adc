import Kafka from 'node-rdkafka';
import type { DeliveryReport, LibrdKafkaError, Producer } from 'node-rdkafka';
import { crmstream } from '../../api/proto/gen/crmstream.js';
import { CrmError } from '../errors.js';
import { Topic, type OutboxRecord, type OutboxSink } from '../outbox.js';
import type { KafkaConfig } from './config.js';

/** Outbox topic → (Kafka topic, message key). Keys keep one user's records in one partition, in order. */
interface Route {
  readonly topic: string;
  readonly key: (payload: Uint8Array) => string;
}

export interface KafkaSinkStats {
  readonly produced: number;
  readonly delivered: number;
  /** Messages the broker refused or timed out on, and that were produced again. */
  readonly retried: number;
  /** Client-level errors librdkafka reported. */
  readonly errors: number;
}

/**
 * Outbox records to Kafka topics: triggers, segment changes, KPI changes and dead letters as
 * protobuf messages, keyed, with header `crmstream-seq` (the outbox sequence: consumers drop a
 * re-delivered record by it). deliver() resolves only when the broker has acknowledged every
 * message (delivery reports), so the outbox cursor, and with it the trim of the outbox, never moves
 * past a record Kafka does not have. The producer is idempotent: librdkafka's own retries do not
 * duplicate; after a crash the records since the cursor are produced again (at-least-once).
 *
 * @example
 * engineOptions.sinks = [await KafkaSink.connect(kafkaConfig)];
 */
export class KafkaSink implements OutboxSink {
  readonly name = 'kafka';
  readonly topics: readonly number[];
  private readonly routes = new Map<number, Route>();
  private readonly waiting = new Map<number, { resolve: () => void; reject: (e: Error) => void }>();
  private readonly counters = { produced: 0, delivered: 0, retried: 0, errors: 0 };
  private nextId = 1;

  private constructor(
    private readonly producer: Producer,
    private readonly cfg: KafkaConfig,
    private readonly onError?: (err: unknown) => void,
  ) {
    const t = cfg.topics;
    if (t.triggers !== null) this.routes.set(Topic.trigger, { topic: t.triggers, key: (p) => crmstream.v1.Trigger.decode(p).user_id });
    if (t.segmentChanges !== null) this.routes.set(Topic.segmentChange, { topic: t.segmentChanges, key: (p) => crmstream.v1.SegmentChange.decode(p).user_id });
    if (t.kpiUpdates !== null) {
      this.routes.set(Topic.kpiUpdate, {
        topic: t.kpiUpdates,
        key: (p) => {
          const k = crmstream.v1.KpiUpdate.decode(p);
          return `${k.kpi}|${k.grain}|${k.window}`;
        },
      });
    }
    if (t.deadLetters !== null) this.routes.set(Topic.deadLetter, { topic: t.deadLetters, key: (p) => crmstream.v1.DeadLetter.decode(p).reason });
    this.topics = [...this.routes.keys()];
  }

  /** True when the config names at least one output topic. */
  static wanted(cfg: KafkaConfig): boolean {
    const t = cfg.topics;
    return t.triggers !== null || t.segmentChanges !== null || t.kpiUpdates !== null || t.deadLetters !== null;
  }

  static async connect(cfg: KafkaConfig, onError?: (err: unknown) => void): Promise<KafkaSink> {
    const producer = new Kafka.Producer({
      ...cfg.producer,
      'metadata.broker.list': cfg.brokers,
      'client.id': cfg.clientId,
      'enable.idempotence': true,
      dr_cb: true,
      'linger.ms': cfg.producer['linger.ms'] ?? 2,
    });
    const sink = new KafkaSink(producer, cfg, onError);
    producer.on('delivery-report', (err, report) => sink.delivered(err, report));
    producer.on('event.error', (err) => {
      sink.counters.errors++;
      onError?.(err);
    });
    await new Promise<void>((resolve, reject) => {
      producer.connect({ timeout: 30_000 }, (err) => (err ? reject(new CrmError('KAFKA_ERROR', `cannot connect the producer to ${cfg.brokers}`, { cause: err })) : resolve()));
    });
    producer.setPollInterval(5);
    return sink;
  }

  stats(): KafkaSinkStats {
    return { ...this.counters };
  }

  async open(): Promise<void> {
    // Connected in connect(): nothing is stored in the engine's state.
  }

  /**
   * Produces every record and waits for all acknowledgements; a refused message is produced
   * again until `deliveryTimeoutMs` has passed since this call, then SINK_IO. The outbox then keeps
   * the records, leaves this sink's cursor where it was and calls deliver() again from it with
   * backoff (engine/outbox.ts), without holding up checkpoints or the other sinks; consumers drop
   * what is produced twice by the `crmstream-seq` header.
   */
  async deliver(records: readonly OutboxRecord[]): Promise<void> {
    const deadline = performance.now() + this.cfg.deliveryTimeoutMs;
    let todo = records.filter((r) => this.routes.has(r.topic));
    while (todo.length > 0) {
      const results = await Promise.allSettled(todo.map((r) => this.produce(r)));
      const failed = todo.filter((_, i) => results[i]!.status === 'rejected');
      if (failed.length === 0) return;
      const reason = (results.find((r) => r.status === 'rejected') as PromiseRejectedResult).reason as Error;
      if (performance.now() >= deadline) {
        throw new CrmError('SINK_IO', `Kafka did not acknowledge ${failed.length} output records within ${this.cfg.deliveryTimeoutMs} ms: ${reason.message}`, { cause: reason });
      }
      this.counters.retried += failed.length;
      this.onError?.(reason);
      await new Promise((r) => setTimeout(r, 100));
      todo = failed;
    }
  }

  async close(): Promise<void> {
    await new Promise<void>((resolve) => {
      this.producer.flush(10_000, () => this.producer.disconnect(() => resolve()));
    });
  }

  private produce(r: OutboxRecord): Promise<void> {
    const route = this.routes.get(r.topic)!;
    const id = this.nextId++;
    return new Promise<void>((resolve, reject) => {
      this.waiting.set(id, { resolve, reject });
      const payload = Buffer.from(r.payload.buffer, r.payload.byteOffset, r.payload.byteLength);
      const send = (): void => {
        try {
          this.producer.produce(route.topic, null, payload, route.key(r.payload), Date.now(), id, [{ 'crmstream-seq': String(r.seq) }]);
          this.counters.produced++;
        } catch (err) {
          // The local queue is full (broker slow or down): wait for delivery reports to free it.
          if ((err as LibrdKafkaError).code === -184 /* ERR__QUEUE_FULL */) {
            setTimeout(send, 10);
            return;
          }
          this.waiting.delete(id);
          reject(err as Error);
        }
      };
      send();
    });
  }

  private delivered(err: LibrdKafkaError | null, report: DeliveryReport): void {
    const w = this.waiting.get(report.opaque as number);
    if (w === undefined) return;
    this.waiting.delete(report.opaque as number);
    if (err) {
      w.reject(new CrmError('KAFKA_ERROR', `delivery to ${report.topic} failed: ${err.message}`, { cause: err }));
    } else {
      this.counters.delivered++;
      w.resolve();
    }
  }
}
