import { existsSync, mkdtempSync, readFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { performance } from 'node:perf_hooks';
import { setTimeout as sleep } from 'node:timers/promises';
import Kafka from 'node-rdkafka';
import type { LibrdKafkaError, Producer } from 'node-rdkafka';
import { parse as parseYaml } from 'yaml';
import WebSocket from 'ws';
import { Engine } from '../engine/engine.js';
import { CrmError } from '../engine/errors.js';
import { resolveKafkaConfig } from '../engine/kafka/config.js';
import { MockCluster } from '../engine/kafka/mock-cluster.js';
import { KafkaSink } from '../engine/kafka/sink.js';
import { KafkaSource } from '../engine/kafka/source.js';
import { TrafficGenerator, encodeProto, isBad } from '../engine/sources/generator.js';
import { newApiKey } from './auth.js';
import { EngineGate } from './gate.js';
import { DEFAULT_MAX_KAFKA_LAG, drive, kafkaMetrics, kafkaReadiness } from './run.js';
import { CrmServer } from './server.js';
import { TriggerHub } from './trigger-hub.js';

/**
 * `crmstream demo` (`npm start`): the whole loop on one machine, no external service —
 *
 *   traffic generator (event time following the wall clock) → Kafka producer → topic `events` on
 *   librdkafka's mock cluster (its own process, engine/kafka/mock-cluster.ts) → KafkaSource →
 *   the engine (KPIs, segments, the example campaigns) → the HTTP / WebSocket server with the
 *   dashboard, and the topic `triggers` (KafkaSink) → a demo sender that takes triggers over
 *   `/v1/triggers`, acks them and reports `message_*` events back over `POST /v1/events`, as a
 *   KakaoTalk or push sender would.
 *
 * Prints the mock cluster's bootstrap servers, the dashboard URL with a fresh API key, and a stats
 * line every two seconds (with the consumer lag). Stops after `--duration` or on SIGINT / SIGTERM:
 * producer flushed, source closed (the drive loop ends with a checkpoint), server and engine
 * closed, mock cluster stopped; every wait is bounded.
 */

export interface DemoOptions {
  port: number;
  dataDir?: string;
  rate: number;
  duration?: number;
  users: number;
}

const TICK_MS = 100;
const EVENTS_TOPIC = 'events';
const TRIGGERS_TOPIC = 'triggers';
const PARTITIONS = 6;
const ERR_QUEUE_FULL = -184;
const HERE = path.dirname(fileURLToPath(import.meta.url));
/** examples/ of the project, from the sources (api/) or from dist/api/. */
const EXAMPLE_CAMPAIGNS = [path.resolve(HERE, '../examples/campaigns.yaml'), path.resolve(HERE, '../../examples/campaigns.yaml')].find((f) => existsSync(f))!;

/** Waits for `p` at most `ms`; false (and a line on stderr) when the time ran out. A rejection is logged, not thrown. */
async function within(what: string, p: Promise<unknown>, ms: number): Promise<boolean> {
  let timer: NodeJS.Timeout | undefined;
  const ok = await Promise.race([
    p.then(() => true, (err: unknown) => {
      process.stderr.write(`crmstream demo: ${what}: ${(err as Error).message ?? String(err)}\n`);
      return true;
    }),
    new Promise<false>((resolve) => {
      timer = setTimeout(() => resolve(false), ms);
    }),
  ]);
  clearTimeout(timer);
  if (!ok) process.stderr.write(`crmstream demo: ${what}: no answer within ${ms} ms, going on\n`);
  return ok;
}

/**
 * Is the mock cluster's process still there? Ctrl-C in a terminal signals the whole foreground
 * process group, so the cluster (a child process) gets the SIGINT too and is gone before the demo
 * stops.
 */
async function mockAlive(mock: MockCluster): Promise<boolean> {
  // A no-op command (broker 1 already has no added latency): answered only by a live cluster.
  const probe = mock.brokerRtt(1, 0).then(() => true, () => false);
  return Promise.race([probe, sleep(1_000).then(() => false)]);
}

export async function runDemo(o: DemoOptions): Promise<void> {
  const dataDir = o.dataDir ?? mkdtempSync(path.join(os.tmpdir(), 'crmstream-demo-'));
  const out = process.stdout;
  let lastErrorLog = 0;
  // librdkafka reports every failed connection attempt while a broker is away: one line per second is enough.
  const onError = (err: unknown): void => {
    const now = performance.now();
    if (now - lastErrorLog < 1_000) return;
    lastErrorLog = now;
    process.stderr.write(`crmstream demo: kafka: ${(err as Error).message ?? String(err)} (retrying)\n`);
  };

  let stopping = false;
  let failure: unknown = null;
  const stop = (): void => {
    stopping = true;
  };
  process.once('SIGINT', stop);
  process.once('SIGTERM', stop);

  let mock: MockCluster | null = null;
  let producer: Producer | null = null;
  let source: KafkaSource | null = null;
  let gate: EngineGate | null = null;
  let server: CrmServer | null = null;
  let sender: DemoSender | null = null;
  let driving: Promise<void> | null = null;
  let timedOut = false;
  let stopWatch = (): void => undefined;
  try {
    mock = await MockCluster.start({ brokers: 3 });
    await mock.createTopic(EVENTS_TOPIC, PARTITIONS);
    await mock.createTopic(TRIGGERS_TOPIC, PARTITIONS);
    const kafka = resolveKafkaConfig({
      brokers: mock.bootstrap, groupId: 'crmstream-demo', clientId: 'crmstream-demo',
      topics: { events: EVENTS_TOPIC, triggers: TRIGGERS_TOPIC },
    });

    // The generated traffic carries no consent props: the demo counts consent as given.
    const campaigns = { ...(parseYaml(readFileSync(EXAMPLE_CAMPAIGNS, 'utf8')) as Record<string, unknown>), consent: { unknown: 'allow' } };
    const hub = new TriggerHub();
    // Triggers go to the topic `triggers` too (closed with the engine).
    const sink = await KafkaSink.connect(kafka, onError);
    let eng: Engine;
    try {
      // The hub first: the demo sender gets a trigger as soon as it is durable, then Kafka acknowledges it.
      eng = await Engine.create({ dataDir, campaigns: { definitions: campaigns }, checkpoint: { triggerLatencyMs: 0 } }, { sinks: [hub, sink] });
    } catch (err) {
      await within('closing the Kafka sink', sink.close(), 12_000);
      throw err;
    }
    gate = new EngineGate(eng);
    // The mock cluster is new in every run and its topic starts at offset 0: the offsets a reused
    // --data-dir holds are those of an earlier cluster, so the source starts from the beginning.
    source = await KafkaSource.connect(kafka, {
      position: null, inputs: eng.inputWatermarks(), batchRows: eng.config.batchRows, timeZone: eng.config.time.timeZone, onError,
    });
    const src = source;
    eng.onCheckpoint((p) => src.commit(p));
    driving = drive(gate, src).catch((err: unknown) => {
      failure = err;
      stopping = true;
    });
    // Fail closed: an engine that failed through any path (an HTTP request's checkpoint, the idle
    // checkpoint) stops the demo, which exits non-zero with the cause.
    void eng.failed.then((err) => {
      failure ??= err;
      stopping = true;
    });

    const { key, entry } = newApiKey('demo', ['admin']);
    // The demo sender gets a key of its own, as a real sender would: its group, and posting its message_* events.
    const senderKey = newApiKey('demo-sender', ['triggers', 'ingest'], [DemoSender.GROUP]);
    server = await CrmServer.start(gate, hub, { port: o.port, keys: [entry, senderKey.entry], metrics: kafkaMetrics(src, sink), readiness: kafkaReadiness(src, DEFAULT_MAX_KAFKA_LAG) });
    const base = `http://127.0.0.1:${server.port}`;

    const prod = new Kafka.Producer({
      'metadata.broker.list': mock.bootstrap, 'client.id': 'crmstream-demo-generator', 'linger.ms': 5,
    });
    producer = prod;
    prod.on('event.error', onError);
    await new Promise<void>((resolve, reject) => {
      prod.connect({ timeout: 30_000 }, (err) => (err ? reject(err) : resolve()));
    });
    prod.setPollInterval(100);

    // A small share of late, duplicate and malformed records, so the dead-letter path shows too.
    const gen = new TrafficGenerator({
      seed: (Date.now() >>> 0) || 1, users: o.users, startTs: Date.now(), eventsPerSecond: Math.max(1, o.rate),
      lateRate: 0.01, duplicateRate: 0.005, badRate: 0.001, maxLateMs: 60 * 60_000,
    });
    out.write(`crmstream demo: state in ${dataDir}\n`);
    out.write(`  kafka: librdkafka mock cluster at ${mock.bootstrap} (generator → topic ${EVENTS_TOPIC} → engine → topic ${TRIGGERS_TOPIC}, ${PARTITIONS} partitions each)\n`);
    out.write(`  dashboard: ${base}/#key=${key}\n`);
    out.write(`  api key (admin): ${key}   e.g. curl -H 'authorization: Bearer ${key}' '${base}/v1/kpis?grain=day'\n`);
    out.write(`  generating ${o.rate} events/s over ${o.users} users; Ctrl-C stops (state is checkpointed)\n`);
    sender = new DemoSender(base, senderKey.key);
    sender.start();
    // Without its cluster the demo cannot go on: stop (with an error) rather than wait for it.
    const cluster = mock;
    const watch = setInterval(() => {
      void mockAlive(cluster).then((alive) => {
        if (alive || stopping) return;
        failure ??= new CrmError('KAFKA_ERROR', `the mock Kafka cluster (process ${cluster.pid}) has exited`);
        stopping = true;
      });
    }, 2_000);
    watch.unref();
    stopWatch = () => clearInterval(watch);

    const perTick = Math.max(1, Math.round((o.rate * TICK_MS) / 1000));
    const started = performance.now();
    let lastReport = started;
    let sinceReport = 0;
    let pending: { value: Buffer; key: string | null } | null = null;
    while (!stopping && (o.duration === undefined || performance.now() - started < o.duration * 1000)) {
      const tickStart = performance.now();
      for (let j = 0; j < perTick && !stopping; j++) {
        // The simulated day has quiet hours, in which its clock runs faster than the wall clock:
        // it waits for the wall clock rather than send events from the future (the engine rejects
        // those as future_timestamp, time.maxFutureMs).
        if (pending === null && gen.now > Date.now()) break;
        if (pending === null) {
          const r = gen.nextRecord();
          if (isBad(r)) {
            // Malformed on purpose (undecodable, missing id, too large …): the dead-letter path.
            pending = { value: Buffer.from(r.proto), key: r.event === null ? null : r.event.user_id || r.event.anonymous_id || null };
          } else {
            pending = { value: Buffer.from(encodeProto(r)), key: r.user_id || r.anonymous_id };
          }
        }
        try {
          prod.produce(EVENTS_TOPIC, null, pending.value, pending.key);
          pending = null;
          sinceReport++;
        } catch (err) {
          if ((err as LibrdKafkaError).code !== ERR_QUEUE_FULL) throw err;
          // The local queue is full (the cluster is slower than the generator): serve it, then retry.
          prod.poll();
          await sleep(5);
          j--;
        }
      }
      const now = performance.now();
      if (now - lastReport >= 2000) {
        const s = eng.stats();
        const ks = src.stats();
        const lag = Object.values(ks.lag).reduce((a, l) => a + Math.max(0, l), 0);
        const rejects = Object.entries(eng.rejectCounts()).filter(([, n]) => n > 0).map(([k, n]) => `${k}=${n}`).join(' ');
        out.write(
          `${new Date().toISOString()}  ${Math.round((sinceReport * 1000) / (now - lastReport))} ev/s produced  consumed=${ks.messages}` +
          `  lag=${lag}  accepted=${s['accepted']}  profiles(cached)=${s['cachedProfiles']}` +
          `  triggers=${s['triggers']} (sent to the demo sender: ${sender.received}, to topic ${TRIGGERS_TOPIC}: ${sink.stats().delivered})` +
          `  timers=${s['timersFired']}  watermark=${new Date(s['watermark']!).toISOString()}  rejected: ${rejects || 'none'}\n`,
        );
        lastReport = now;
        sinceReport = 0;
      }
      const spare = TICK_MS - (performance.now() - tickStart);
      if (spare > 0) await sleep(spare);
    }
  } catch (err) {
    failure ??= err;
  } finally {
    process.off('SIGINT', stop);
    process.off('SIGTERM', stop);
    stopWatch();
    // Without the cluster (Ctrl-C in a terminal stops it too) nothing Kafka waits for will come:
    // the last outputs are not acknowledged, a checkpoint's delivery does not end, the consumer does
    // not leave its group. Then every step gets a few seconds and the process exits afterwards as
    // after a crash: the state resumes from its last checkpoint (written before its outputs are
    // delivered), and undelivered outputs are delivered again at the next start.
    const alive = mock !== null && (await mockAlive(mock));
    if (mock !== null && !alive) {
      process.stderr.write('crmstream demo: the mock Kafka cluster has exited (a Ctrl-C in a terminal stops it too); stopping without it\n');
    }
    const t = (ms: number): number => (alive ? ms : Math.min(ms, 3_000));
    const bound = async (what: string, p: Promise<unknown>, ms: number): Promise<void> => {
      if (!(await within(what, p, ms))) timedOut = true;
    };
    // 1. The generator's producer: what it queued goes to the topic (disconnect() flushes first, for
    //    at most the time given), then it disconnects.
    if (producer !== null) {
      const prod = producer;
      await bound('stopping the producer', new Promise<void>((resolve) => {
        prod.disconnect(alive ? 5_000 : 0, () => resolve());
      }), t(10_000));
    }
    // 2. No more message_* events from the demo sender.
    sender?.stop();
    // 3. The source: it hands out what it holds, then ends; the drive loop ends with a checkpoint.
    if (source !== null) await bound('closing the Kafka source', Promise.all([source.close(), driving]), t(20_000));
    // 4. The server, then the engine: a last checkpoint, its sinks (the Kafka sink flushes), the store.
    if (server !== null) await bound('closing the server', server.close(), 5_000);
    let closed = false;
    if (gate !== null) {
      const g = gate;
      const close = (): Promise<void> => g.run((e) => e.close()).then(() => {
        closed = true;
      });
      await bound('closing the engine', close(), t(30_000));
      // A last checkpoint whose outputs Kafka refused (SINK_IO) is durable but leaves the engine
      // open: closing again checkpoints nothing new and closes the sinks and the store.
      if (!closed && !timedOut && alive) await bound('closing the engine', close(), 30_000);
    }
    // 5. The cluster last: the engine's last outputs needed it.
    if (mock !== null) await bound('stopping the mock Kafka cluster', mock.stop(), 10_000);
    if (gate !== null) {
      out.write(closed
        ? `crmstream demo: stopped; state checkpointed in ${dataDir}\n`
        : `crmstream demo: stopped; state in ${dataDir} as of its last checkpoint\n`);
    }
    if (timedOut || (mock !== null && !alive)) {
      // A Kafka client waiting for its cluster may hold the event loop: do not hang on it.
      setTimeout(() => process.exit(), 2_000).unref();
    }
  }
  if (failure !== null) throw failure;
}

/**
 * A message sender as a real one would be: subscribes as group `demo-sender`, "sends" each trigger
 * (not the holdout's), acks, and reports delivery, opens and clicks back as events.
 */
class DemoSender {
  static readonly GROUP = 'demo-sender';
  received = 0;
  private ws: WebSocket | null = null;
  private stopped = false;
  private pending: Record<string, unknown>[] = [];
  private flushTimer: NodeJS.Timeout | null = null;
  private n = 0;

  constructor(private readonly base: string, private readonly key: string) {}

  start(): void {
    this.connect();
    this.flushTimer = setInterval(() => void this.flush(), 500);
  }

  stop(): void {
    this.stopped = true;
    if (this.flushTimer !== null) clearInterval(this.flushTimer);
    this.ws?.close();
  }

  private connect(): void {
    if (this.stopped) return;
    const ws = new WebSocket(`${this.base.replace('http', 'ws')}/v1/triggers?key=${this.key}`, 'json');
    this.ws = ws;
    ws.on('open', () => ws.send(JSON.stringify({ subscribe_triggers: { group: DemoSender.GROUP, max_in_flight: 500 } })));
    ws.on('message', (data) => {
      const f = JSON.parse(String(data)) as { trigger?: { seq: number; trigger_id: string; campaign_id: string; variant: string; control: boolean; user_id: string; send_after_ts: number } };
      const t = f.trigger;
      if (t === undefined) return;
      this.received++;
      if (!t.control) this.report(t);
      ws.send(JSON.stringify({ ack: { seq: t.seq } }));
    });
    ws.on('close', () => {
      if (!this.stopped) setTimeout(() => this.connect(), 1000);
    });
    ws.on('error', () => undefined); // 'close' follows and reconnects
  }

  /** Delivery always, an open for about a third, a click for a tenth — as message_* events. */
  private report(t: { trigger_id: string; campaign_id: string; variant: string; user_id: string; send_after_ts: number }): void {
    const ts = Math.max(Date.now(), Number(t.send_after_ts));
    const user = t.user_id.startsWith('anon:') ? { anonymous_id: t.user_id.slice(5) } : { user_id: t.user_id };
    const ev = (type: string, dt: number): Record<string, unknown> => ({
      event_id: `${t.trigger_id}-${type}`, type, ...user, ts: ts + dt, campaign_id: t.campaign_id, variant: t.variant, trigger_id: t.trigger_id,
    });
    this.pending.push(ev('message_sent', 0), ev('message_delivered', 200));
    const k = this.n++;
    if (k % 3 === 0) this.pending.push(ev('message_opened', 5_000));
    if (k % 10 === 0) this.pending.push(ev('message_clicked', 8_000));
  }

  private async flush(): Promise<void> {
    if (this.pending.length === 0) return;
    const events = this.pending;
    this.pending = [];
    try {
      await fetch(`${this.base}/v1/events`, { method: 'POST', headers: { authorization: `Bearer ${this.key}`, 'content-type': 'application/json' }, body: JSON.stringify(events) });
    } catch {
      // the demo is stopping
    }
  }
}
