/**
 * Global KPIs of a scaled-out group (docs/KAFKA.md): each task publishes its KPI partials — the
 * additive cells of its users — to partition p of `kafka.scaleOut.partialsTopic`; any reader takes
 * the latest complete set of every task and sums them (mergeKpis), which equals one engine over all
 * users because tasks hold disjoint users.
 *
 * A set can outgrow a Kafka message (cohort cells grow with history), so it is produced as chunks of
 * at most CHUNK_BYTES with headers `crmstream-partials: <set id>` and `crmstream-chunk: <i>/<n>`.
 * Chunks of a set are produced in order to one partition, so a reader assembles a set from
 * consecutive chunks and keeps the last complete one; a set cut short by a crash is never complete
 * and is ignored. The topic needs one partition per task and a retention that keeps each task's
 * last set (cleanup.policy=delete with hours of retention; with compaction, the per-index chunk
 * keys `<task>/<i>` keep the last set whole as long as its chunk count did not shrink).
 */
import { randomUUID } from 'node:crypto';
import Kafka from 'node-rdkafka';
import type { KafkaConsumer, Message } from 'node-rdkafka';
import { crmstream } from '../../api/proto/gen/crmstream.js';
import type { KpiPartials } from '../../operators/kpi.js';
import { CrmError } from '../errors.js';
import type { ChangelogMessage, SharedProducer } from './changelog.js';
import type { KafkaConfig } from './config.js';
import { header, partitionCount } from './util.js';

/** Below Kafka's default message.max.bytes (1 MB) with room for headers and batching. */
const CHUNK_BYTES = 512 * 1024;
const H_SET = 'crmstream-partials';
const H_CHUNK = 'crmstream-chunk';

export function encodePartials(p: KpiPartials): Uint8Array {
  const keys: number[] = [];
  let fields = 0;
  for (const [k, v] of p.cells) {
    keys.push(k);
    fields = v.length;
  }
  const values = new Array<number>(keys.length * fields);
  let i = 0;
  for (const v of p.cells.values()) for (let f = 0; f < fields; f++) values[i++] = v[f]!;
  return crmstream.v1.KpiPartials.encode({ dims: [...p.dims], watermark: Number.isFinite(p.watermark) ? p.watermark : -Number.MAX_VALUE, keys, fields, values }).finish();
}

export function decodePartials(bytes: Uint8Array): KpiPartials {
  const m = crmstream.v1.KpiPartials.decode(bytes);
  const cells = new Map<number, Float64Array>();
  for (let i = 0; i < m.keys.length; i++) cells.set(m.keys[i]!, Float64Array.from(m.values.slice(i * m.fields, (i + 1) * m.fields)));
  return { dims: m.dims, cells, watermark: m.watermark === -Number.MAX_VALUE ? Number.NEGATIVE_INFINITY : m.watermark };
}

/** Publishes one task's partials (resolves when every chunk is acknowledged). */
export async function publishPartials(producer: SharedProducer, topic: string, task: number, p: KpiPartials): Promise<void> {
  const bytes = encodePartials(p);
  const set = randomUUID();
  const n = Math.max(1, Math.ceil(bytes.byteLength / CHUNK_BYTES));
  const chunks: ChangelogMessage[] = [];
  for (let i = 0; i < n; i++) {
    chunks.push({
      key: `${task}/${i}`,
      value: bytes.subarray(i * CHUNK_BYTES, Math.min(bytes.byteLength, (i + 1) * CHUNK_BYTES)),
      headers: [{ [H_SET]: set }, { [H_CHUNK]: `${i}/${n}` }],
    });
  }
  const out = await producer.produceBatch(topic, task, chunks);
  if (out.failed > 0) throw new CrmError('KAFKA_ERROR', `publishing the KPI partials of task ${task} failed: ${out.errors.find((e) => e !== null)!.message}`);
}

/**
 * Reads the partials topic to its end and returns the latest complete set of every partition that
 * has one, with how many partitions the topic has (a caller can tell whether every task published).
 */
export async function readPartials(kafka: KafkaConfig): Promise<{ parts: KpiPartials[]; partitions: number; published: number[] }> {
  if (kafka.scaleOut === null) throw new CrmError('CONFIG_INVALID', 'kafka.scaleOut is not set');
  const topic = kafka.scaleOut.partialsTopic;
  const consumer: KafkaConsumer = new Kafka.KafkaConsumer({
    ...kafka.consumer,
    'metadata.broker.list': kafka.brokers,
    'group.id': `${kafka.groupId}-partials-reader`,
    'enable.auto.commit': false,
    'enable.partition.eof': true,
  }, { 'auto.offset.reset': 'earliest' });
  await new Promise<void>((resolve, reject) => consumer.connect({ timeout: 30_000 }, (err) => (err ? reject(new CrmError('KAFKA_ERROR', `cannot connect to ${kafka.brokers}`, { cause: err })) : resolve())));
  try {
    const n = await partitionCount(consumer, topic);
    const ends = await Promise.all(Array.from({ length: n }, (_, p) => new Promise<number>((resolve, reject) => {
      consumer.queryWatermarkOffsets(topic, p, 10_000, (err, w) => (err ? reject(new CrmError('KAFKA_ERROR', `watermarks of ${topic}/${p}`, { cause: err })) : resolve(w.highOffset)));
    })));
    const latest = new Map<number, KpiPartials>();
    const open = new Map<number, { set: string; n: number; chunks: Buffer[] }>();
    const done = new Set<number>(ends.map((e, p) => (e === 0 ? p : -1)).filter((p) => p >= 0));
    consumer.assign(ends.map((_, partition) => ({ topic, partition, offset: 0 })).filter((t) => !done.has(t.partition)));
    consumer.setDefaultConsumeTimeout(100);
    const deadline = Date.now() + 60_000;
    while (done.size < n) {
      if (Date.now() > deadline) throw new CrmError('KAFKA_ERROR', `reading ${topic} did not reach its end within 60 s`);
      const msgs = await new Promise<Message[]>((resolve, reject) => consumer.consume(1000, (err, m) => (err ? reject(err) : resolve(m))));
      for (const m of msgs) {
        if (m.offset >= ends[m.partition]!) continue;
        const set = header(m, H_SET);
        const [i, of] = (header(m, H_CHUNK) ?? '').split('/').map(Number);
        if (set !== null && i !== undefined && of !== undefined && m.value) {
          let cur = open.get(m.partition);
          if (i === 0) open.set(m.partition, (cur = { set, n: of, chunks: [] }));
          if (cur !== undefined && cur.set === set && cur.chunks.length === i) {
            cur.chunks.push(m.value);
            if (cur.chunks.length === cur.n) {
              latest.set(m.partition, decodePartials(Buffer.concat(cur.chunks)));
              open.delete(m.partition);
            }
          }
        }
        if (m.offset + 1 >= ends[m.partition]!) done.add(m.partition);
      }
    }
    const published = [...latest.keys()].sort((a, b) => a - b);
    return { parts: published.map((p) => latest.get(p)!), partitions: n, published };
  } finally {
    await new Promise<void>((resolve) => consumer.disconnect(() => resolve()));
  }
}

