import { readFileSync } from 'node:fs';
import { performance } from 'node:perf_hooks';
import client from 'prom-client';
import { parse as parseYaml } from 'yaml';
import { z } from 'zod';
import { resolveConfig, type ConfigInput } from '../engine/config.js';
import { Engine, type SourceItem } from '../engine/engine.js';
import { CrmError, cleanupAll } from '../engine/errors.js';
import type { ScaleOutRunner as Runner } from '../engine/kafka/tasks.js';
import { resolveKafkaConfig, type KafkaConfig } from '../engine/kafka/config.js';
import { KafkaSink } from '../engine/kafka/sink.js';
import { KafkaSource } from '../engine/kafka/source.js';
import type { OutboxSink } from '../engine/outbox.js';
import { ApiKeySchema } from './auth.js';
import { EngineGate } from './gate.js';
import { CrmServer, counterOf, type ReadinessFailure } from './server.js';
import { TriggerHub, TriggerHubConfigSchema } from './trigger-hub.js';

/**
 * `crmstream run --config FILE`: the engine on a Kafka events topic, with output topics and (when
 * the file has a `server` section) the HTTP / WebSocket server and dashboard on the same engine.
 *
 * The file (JSON, or YAML for .yaml/.yml) is the engine configuration (engine/config.ts) plus two
 * sections: `kafka` (engine/kafka/config.ts, required) and `server` (optional). Every section is
 * validated before anything starts; CONFIG_INVALID lists each offending field with its path.
 */

/** Default of `server.maxKafkaLag`: about a few seconds of a busy topic; a backlog being caught up is "not ready" until it is read. */
export const DEFAULT_MAX_KAFKA_LAG = 100_000;

const ServerSectionSchema = z.object({
  port: z.number().int().min(0).max(65_535).default(8080),
  host: z.string().min(1).default('127.0.0.1'),
  /** API keys as SHA-256 digests with scopes (docs/API.md). */
  keys: z.array(ApiKeySchema).min(1, 'configure at least one API key'),
  kpiCoalesceMs: z.number().int().min(10).optional(),
  maxBodyBytes: z.number().int().min(1024).optional(),
  // Ingest and socket limits (docs/GUARANTEES.md "Limits on ingest"); defaults in api/server.ts.
  maxEventsPerRequest: z.number().int().min(1).optional(),
  maxQueuedEvents: z.number().int().min(1).optional(),
  maxSockets: z.number().int().min(1).optional(),
  maxSubscriptionsPerSocket: z.number().int().min(1).optional(),
  maxFrameBytes: z.number().int().min(1024).optional(),
  // Readiness bounds (/readyz, docs/API.md "Health"); defaults in api/server.ts and below.
  /** A sink failing longer than this (ms, default 60,000) makes /readyz 503. */
  maxSinkFailingMs: z.number().int().min(0).optional(),
  /** /readyz stays 503 this long (ms, default 300,000) after a trigger-log gap. */
  triggerGapHoldMs: z.number().int().min(0).optional(),
  /** Consumer lag (messages, summed over the assigned partitions) above which /readyz is 503; default 100,000; null = no bound. */
  maxKafkaLag: z.number().int().min(0).nullable().default(DEFAULT_MAX_KAFKA_LAG),
  // Trigger delivery: triggerRetention, maxBufferedBytes, maxGroups, newGroupStart (api/trigger-hub.ts, docs/API.md).
  ...TriggerHubConfigSchema.shape,
}).strict();

export interface RunFile {
  readonly engine: ConfigInput;
  readonly kafka: KafkaConfig;
  readonly server: z.output<typeof ServerSectionSchema> | null;
}

/** Top-level keys the engine configuration knows (engine/config.ts). A typo is an error, not a silent default. */
const ENGINE_KEYS = new Set(['dataDir', 'state', 'time', 'dedupe', 'validation', 'checkpoint', 'outbox', 'jsonl', 'deadLetter', 'kpi', 'segments', 'campaigns', 'batchRows']);

/** Splits and validates a run configuration document. */
export function parseRunConfig(doc: unknown, source: string): RunFile {
  if (doc === null || typeof doc !== 'object' || Array.isArray(doc)) throw new CrmError('CONFIG_INVALID', `${source}: expected an object with a kafka section`);
  const { kafka, server, ...engine } = doc as Record<string, unknown>;
  const problems: string[] = [];
  for (const k of Object.keys(engine)) if (!ENGINE_KEYS.has(k)) problems.push(`  ${k}: unknown setting (engine settings: ${[...ENGINE_KEYS].join(', ')}; plus kafka, server)`);
  if (kafka === undefined) problems.push('  kafka: required (at least kafka.brokers)');
  const collect = (fn: () => void): void => {
    try {
      fn();
    } catch (err) {
      if (!(err instanceof CrmError)) throw err;
      problems.push(...err.message.split('\n').slice(1));
    }
  };
  let kafkaCfg: KafkaConfig | null = null;
  if (kafka !== undefined) collect(() => (kafkaCfg = resolveKafkaConfig(kafka)));
  collect(() => resolveConfig(engine as ConfigInput));
  let serverCfg: RunFile['server'] = null;
  if (server !== undefined && server !== null) {
    const parsed = ServerSectionSchema.safeParse(server);
    if (parsed.success) serverCfg = parsed.data;
    else problems.push(...parsed.error.issues.map((i) => `  server${i.path.length ? '.' + i.path.join('.') : ''}: ${i.message}`));
  }
  if (problems.length > 0) throw new CrmError('CONFIG_INVALID', `invalid run configuration ${source}:\n${problems.join('\n')}`);
  return { engine: engine as ConfigInput, kafka: kafkaCfg!, server: serverCfg };
}

export function readRunConfig(file: string): RunFile {
  let doc: unknown;
  try {
    const text = readFileSync(file, 'utf8');
    doc = /\.ya?ml$/i.test(file) ? parseYaml(text) : JSON.parse(text);
  } catch (err) {
    throw new CrmError('CONFIG_INVALID', `config file ${file}: ${(err as Error).message}`, { cause: err });
  }
  return parseRunConfig(doc, file);
}

/**
 * Feeds a source to the engine through the gate (so HTTP queries and ingest interleave with it),
 * with Engine.run's meaning of each item. Returns when the source ends.
 */
export async function drive(gate: EngineGate, source: AsyncIterable<SourceItem>): Promise<void> {
  for await (const item of source) {
    switch (item.kind) {
      case 'batch':
        await gate.run((e) => e.ingestColumns(item.batch, item.position));
        break;
      case 'watermark':
        await gate.run((e) => e.advanceTo(item.ts));
        break;
      case 'barrier':
        await gate.run((e) => e.checkpoint());
        break;
      case 'end':
        await gate.run(async (e) => {
          const to = item.asOf ?? e.maxEventTs;
          if (Number.isFinite(to)) await e.advanceTo(to);
          await e.checkpoint();
        });
        return;
    }
  }
  await gate.run((e) => e.checkpoint());
}

/**
 * Kafka source and sink figures on /metrics: the clients' running totals as counters (read at
 * each scrape, `counterOf`), levels (lag, buffered, unowned partitions) as gauges.
 */
export function kafkaMetrics(source: KafkaSource, sink: KafkaSink | null): (r: client.Registry) => void {
  return (r) => {
    new client.Gauge({
      name: 'crm_kafka_consumer_lag', help: 'Messages in a partition of the events topic after the next offset to process', labelNames: ['partition'], registers: [r],
      collect() {
        this.reset();
        for (const [p, lag] of Object.entries(source.stats().lag)) this.set({ partition: p }, lag);
      },
    });
    const gauge = (name: string, help: string, get: () => number): void => {
      new client.Gauge({ name, help, registers: [r], collect() { this.set(get()); } });
    };
    counterOf(r, 'crm_kafka_messages_total', 'Messages consumed from the events topic', () => source.stats().messages);
    gauge('crm_kafka_buffered', 'Messages fetched and waiting for the engine', () => source.stats().buffered);
    counterOf(r, 'crm_kafka_pauses_total', 'Partition pauses: a partition holding its share of kafka.maxBuffered, or kafka.maxSkewMs ahead of the others', () => source.stats().pauses);
    gauge('crm_kafka_partitions_paused', 'Assigned partitions of the events topic paused now (backpressure or skew)', () => source.stats().paused);
    gauge('crm_kafka_partitions_idle', 'Assigned partitions idle now (read to their end, or silent for kafka.partitionIdleMs): not holding the watermark back', () => source.stats().idle);
    new client.Gauge({
      name: 'crm_kafka_stream_time_seconds', help: 'Largest event time accepted per partition (the watermark is the minimum over the active ones, minus time.outOfOrdernessMs)', labelNames: ['partition'], registers: [r],
      collect() {
        this.reset();
        for (const [p, t] of Object.entries(source.stats().streamTimes)) this.set({ partition: p }, t / 1000);
      },
    });
    counterOf(r, 'crm_kafka_rebalances_total', 'Consumer-group rebalances', () => source.stats().rebalances);
    gauge('crm_kafka_partitions_unowned', 'Partitions of the events topic held by another group member (must be 0: one instance per group)', () => source.stats().unowned);
    counterOf(r, 'crm_kafka_commits_total', 'Offset commits acknowledged by the group coordinator', () => source.stats().commits);
    new client.Counter({
      name: 'crm_kafka_errors_total', help: 'Errors librdkafka reported (it retries them), by client', labelNames: ['client'], registers: [r],
      collect() {
        const st = source.stats();
        this.reset();
        this.inc({ client: 'consumer' }, st.errors + st.commitErrors);
        if (sink !== null) this.inc({ client: 'producer' }, sink.stats().errors + sink.stats().retried);
      },
    });
    if (sink !== null) {
      counterOf(r, 'crm_kafka_produced_total', 'Output records produced to Kafka', () => sink.stats().produced);
      counterOf(r, 'crm_kafka_delivered_total', 'Output records acknowledged by Kafka', () => sink.stats().delivered);
    }
  };
}

/**
 * The Kafka source's /readyz check: not ready while the consumer lag, summed over the assigned
 * partitions, is above `maxLag` (null: no bound) — the state is that far behind the topic.
 */
export function kafkaReadiness(source: KafkaSource, maxLag: number | null): () => ReadinessFailure[] {
  return () => {
    if (maxLag === null) return [];
    let lag = 0;
    for (const l of Object.values(source.stats().lag)) lag += l;
    return lag > maxLag ? [{ check: 'kafka_lag', message: `consumer lag ${lag} messages > server.maxKafkaLag ${maxLag}: the state is behind the events topic` }] : [];
  };
}

export interface RunOptions {
  config: string;
  dataDir?: string;
  /** Stop once every assigned partition is read to its end (catch-up / backfill from Kafka). */
  exitAtEnd?: boolean;
  /** Override of the file's segment / campaign definitions (already read). */
  segments?: unknown[];
  campaigns?: unknown;
}

/** The `run` command. Stops on SIGINT / SIGTERM (or at the end with exitAtEnd) after a last checkpoint. */
export async function runKafka(o: RunOptions): Promise<void> {
  const file = readRunConfig(o.config);
  const cfg: ConfigInput = { ...file.engine };
  if (o.dataDir !== undefined) cfg.dataDir = o.dataDir;
  if (o.segments !== undefined) cfg.segments = { ...(cfg.segments ?? {}), definitions: o.segments };
  if (o.campaigns !== undefined) cfg.campaigns = { ...(cfg.campaigns ?? {}), definitions: o.campaigns };
  const log = (msg: string): void => {
    process.stderr.write(`crmstream: ${msg}\n`);
  };
  let lastErrorLog = 0;
  // librdkafka reports every failed connection attempt while a broker is down: one line per second is enough.
  const onError = (err: unknown): void => {
    const now = performance.now();
    if (now - lastErrorLog < 1_000) return;
    lastErrorLog = now;
    log(`kafka: ${(err as Error).message ?? String(err)} (retrying)`);
  };
  if (file.kafka.scaleOut !== null) {
    await runScaleOut(file, cfg, o, log, onError);
    return;
  }
  const started = performance.now();
  const sinks: OutboxSink[] = [];
  const hub = file.server !== null ? new TriggerHub({
    triggerRetention: file.server.triggerRetention, maxBufferedBytes: file.server.maxBufferedBytes,
    maxGroups: file.server.maxGroups, newGroupStart: file.server.newGroupStart,
  }) : null;
  if (hub !== null) sinks.push(hub);
  const sink = KafkaSink.wanted(file.kafka) ? await KafkaSink.connect(file.kafka, onError) : null;
  if (sink !== null) sinks.push(sink);
  const engine = await Engine.create(cfg, { sinks });
  const gate = new EngineGate(engine);
  let source: KafkaSource | null = null;
  let server: CrmServer | null = null;
  const stop = (): void => {
    void source?.close();
  };
  process.once('SIGINT', stop);
  process.once('SIGTERM', stop);
  try {
    // Per-partition watermarks: the engine's watermark is the minimum over the partitions (docs/KAFKA.md
    // "Event time across partitions"), so a partition read behind the others loses nothing.
    source = await KafkaSource.connect(file.kafka, {
      position: engine.position, batchRows: engine.config.batchRows, timeZone: engine.config.time.timeZone,
      inputs: engine.inputWatermarks(), exitAtEnd: o.exitAtEnd === true, onError,
    });
    const src = source;
    engine.onCheckpoint((p) => src.commit(p));
    if (file.server !== null) {
      const { maxKafkaLag, ...serverOpts } = file.server;
      server = await CrmServer.start(gate, hub!, { ...serverOpts, metrics: kafkaMetrics(src, sink), readiness: kafkaReadiness(src, maxKafkaLag) });
      log(`serving on http://${file.server.host}:${server.port}`);
    }
    log(`consuming ${file.kafka.topics.events} from ${file.kafka.brokers} as group ${file.kafka.groupId}`);
    // Fail closed: an engine that failed (through any path — a batch, an HTTP request, the idle
    // checkpoint) stops the source, and the run exits non-zero with the cause.
    void engine.failed.then(() => void src.close());
    await drive(gate, src);
    const failed = engine.health().failed;
    if (failed !== null) throw new CrmError('ENGINE_FAILED', `the engine failed closed (${failed.code}: ${failed.message}); restart to resume from the last checkpoint`);
    const stats = engine.stats();
    const rejects = Object.fromEntries(Object.entries(engine.rejectCounts()).filter(([, n]) => n > 0));
    const secs = (performance.now() - started) / 1000;
    process.stdout.write(JSON.stringify({
      consumed: src.stats().messages, accepted: stats['accepted'], rejects, position: engine.position,
      triggers_this_run: stats['triggers'], seconds: Number(secs.toFixed(3)),
    }) + '\n');
  } finally {
    process.off('SIGINT', stop);
    process.off('SIGTERM', stop);
    // The engine's last checkpoint commits its offsets while the consumer is still in the group.
    // Every step runs even when one fails (issue 17 item 9: a close whose last checkpoint fails must
    // still leave the group and release the LevelDB lock); their errors are combined, none lost.
    await cleanupAll([() => server?.close(), () => engine.close(), () => source?.close()]);
  }
}

/** `run` with kafka.scaleOut: this instance's share of the group's partitions (engine/kafka/tasks.ts). */
async function runScaleOut(file: RunFile, cfg: ConfigInput, o: RunOptions, log: (m: string) => void, onError: (e: unknown) => void): Promise<void> {
  const { ScaleOutRunner } = await import('../engine/kafka/tasks.js');
  if (file.server !== null) {
    throw new CrmError('CONFIG_INVALID', `invalid run configuration ${o.config}:\n  server: not available with kafka.scaleOut yet; read the outputs from their topics`);
  }
  const resolved = resolveConfig(cfg);
  if (resolved.dataDir === null) throw new CrmError('CONFIG_INVALID', `invalid run configuration ${o.config}:\n  dataDir: kafka.scaleOut keeps each task's local state copy there`);
  const started = performance.now();
  const sink = KafkaSink.wanted(file.kafka) ? await KafkaSink.connect(file.kafka, onError) : null;
  let runner: Runner | null = null;
  const stop = (): void => runner?.close();
  process.once('SIGINT', stop);
  process.once('SIGTERM', stop);
  try {
    runner = await ScaleOutRunner.connect({ engine: cfg, kafka: file.kafka, dataDir: resolved.dataDir, exitAtEnd: o.exitAtEnd === true, onError, sink });
    log(`scale-out: consuming ${file.kafka.topics.events} via ${file.kafka.scaleOut!.routeTopic} from ${file.kafka.brokers} as a member of group ${file.kafka.groupId}`);
    await runner.run();
    const st = runner.stats();
    process.stdout.write(JSON.stringify({
      routed: st.routed, processed: st.processed, forwarded: st.forwarded, moved_out: st.movedOut, moved_in: st.movedIn, duplicates_skipped: st.duplicatesSkipped, hints: st.hints, rebalances: st.rebalances,
      restores: st.restores, seconds: Number(((performance.now() - started) / 1000).toFixed(3)),
    }) + '\n');
  } finally {
    process.off('SIGINT', stop);
    process.off('SIGTERM', stop);
    await sink?.close();
  }
}
