/**
 * Kafka scenarios (SPEC §10: "Kafka end to end (protobuf messages, librdkafka mock cluster on the
 * same machine) ≥ 250,000 events/s"), on the benchmark traffic of decode.bench.ts (same generator,
 * seed and 1 M user population), with the engine core scenario's engine (all KPIs, the 6 built-in
 * segments, state in memory, no checkpoint until the end):
 *
 * - `kafka end to end (protobuf, mock cluster)`: a topic on a 3-broker librdkafka mock cluster
 *   (tools/kafka-mock.c, its own process) holds N events as protobuf `crmstream.v1.Event` messages
 *   keyed by user (1 M; --quick: 200 k), in 6 partitions — 24 at the full size, since the mock
 *   keeps at most 5 MiB per partition (setup checks that nothing was dropped). Each run is a fresh
 *   engine and a fresh consumer group reading the topic from the beginning through KafkaSource
 *   (exitAtEnd) and engine.run until every partition is read to its end. Timed: consumer connect,
 *   group join and assignment, fetching, decoding into columns, the engine, and the final
 *   checkpoint at `end` (in memory; the offset commit after it is issued, not awaited). Not timed:
 *   generating, encoding and producing the messages (setup), creating the engine, closing the
 *   consumer (leaving the group).
 * - `kafka end to end + LevelDB (checkpoint 1 s)`: the same with the LevelDB backend and a
 *   checkpoint every second (each one commits its offsets to the group), as engine + LevelDB does.
 * - `kafka lag recovery`: an engine that has read a fresh topic (6 partitions; 9 at the full size,
 *   for the same reason) to its end (P events, untimed) is stopped (its consumer leaves the group),
 *   M events arrive while it is down (P = M = 200 k; --quick: 50 k), then a new consumer starts at
 *   the engine's position (under a new group id: rejoining the group just left waits 44 s in the
 *   mock cluster, see run()). Timed: from that consumer's start until its lag is 0 — every partition handed to the engine up to its end
 *   (exitAtEnd), checked against the partitions' high watermarks — and the engine has processed and
 *   checkpointed it. Items are M, so ops/s is the catch-up rate and `median ms` the recovery time.
 *
 * Every wait is bounded: producing fails when the queue stays full for 60 s, a run fails when no
 * message arrives for 60 s.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import Kafka from 'node-rdkafka';
import { Engine, type SourceItem } from '../engine/engine.js';
import type { ConfigInput } from '../engine/config.js';
import { resolveKafkaConfig } from '../engine/kafka/config.js';
import { MockCluster } from '../engine/kafka/mock-cluster.js';
import { KafkaSource, isKafkaPosition } from '../engine/kafka/source.js';
import { ScaleOutRunner, type ScaleOutStats } from '../engine/kafka/tasks.js';
import { TrafficGenerator, encodeProto } from '../engine/sources/generator.js';
import { benchTraffic } from './decode.bench.js';
import { consume, type Scenario, type TimedItems } from './harness.js';

const BROKERS = 3;
/** Partitions of a topic, unless it would not fit the mock cluster's retention (see {@link partitionsFor}). */
const MIN_PARTITIONS = 6;
/**
 * librdkafka's mock cluster keeps at most 5 MiB of record batches per partition (a constant in
 * rdkafka_mock.c, no setting) and deletes the oldest beyond it; a topic is spread so that every
 * partition stays under this.
 */
const PARTITION_BUDGET = 4 * 1024 * 1024;
/** Stored bytes of a record besides its key and value (record and batch headers), a little over. */
const RECORD_OVERHEAD = 16;
/** A run fails when no message arrives for this long. */
const STALL_MS = 60_000;

/** Messages in the end-to-end topic: 1 M (SPEC §10 sizes), 200 k with --quick. */
export function kafkaItems(quick: boolean): number {
  return quick ? 200_000 : 1_000_000;
}

/** The lag scenario: events read before the stop, and the backlog that arrives while stopped. */
export function lagItems(quick: boolean): { before: number; backlog: number } {
  return quick ? { before: 50_000, backlog: 50_000 } : { before: 200_000, backlog: 200_000 };
}

/** The engine core scenario's configuration (engine.bench.ts): memory state, no checkpoint until the end. */
const CORE_CONFIG: ConfigInput = { checkpoint: { intervalMs: 1e9, idleMs: null, maxDirtyUsers: 10_000_000 } };

/** A pre-encoded message: protobuf value, keyed by user (user_id, else anonymous_id). */
interface Msg {
  readonly key: string;
  readonly value: Buffer;
}

/** The next `n` events of `gen`, encoded. */
function encodeMessages(gen: TrafficGenerator, n: number): { msgs: Msg[]; bytes: number } {
  const msgs = new Array<Msg>(n);
  let bytes = 0;
  for (let i = 0; i < n; i++) {
    const e = gen.nextEvent();
    const u8 = encodeProto(e);
    msgs[i] = { key: e.user_id !== '' ? e.user_id : e.anonymous_id, value: Buffer.from(u8.buffer, u8.byteOffset, u8.byteLength) };
    bytes += u8.byteLength;
  }
  return { msgs, bytes };
}

/**
 * Partitions for a topic that will hold `msgs`: {@link MIN_PARTITIONS}, or more (a multiple of the
 * broker count) when the mock cluster's 5 MiB per partition would otherwise drop the oldest ones —
 * 1 M bench events (~92 B stored each) need 24.
 */
function partitionsFor(msgs: readonly Msg[]): number {
  let stored = 0;
  for (const m of msgs) stored += m.value.length + Buffer.byteLength(m.key) + RECORD_OVERHEAD;
  const needed = Math.ceil(stored / PARTITION_BUDGET);
  return Math.max(MIN_PARTITIONS, Math.ceil(needed / BROKERS) * BROKERS);
}

const ERR_QUEUE_FULL = -184;

/** Produces `msgs` to `topic` and waits until every one is acknowledged; resolves to the wall time (ms). */
async function produceAll(bootstrap: string, topic: string, msgs: readonly Msg[]): Promise<number> {
  const p = new Kafka.Producer({
    'metadata.broker.list': bootstrap,
    'linger.ms': 20,
    'batch.num.messages': 10_000,
    'queue.buffering.max.messages': 500_000,
    'queue.buffering.max.kbytes': 1_048_576,
  });
  await new Promise<void>((resolve, reject) => p.connect({ timeout: 30_000 }, (e) => (e ? reject(e) : resolve())));
  try {
    const t0 = process.hrtime.bigint();
    let stalledSince = 0;
    for (let i = 0; i < msgs.length;) {
      const m = msgs[i]!;
      try {
        p.produce(topic, null, m.value, m.key);
        i++;
        stalledSince = 0;
      } catch (err) {
        if ((err as { code?: number }).code !== ERR_QUEUE_FULL) throw err;
        const now = Date.now();
        if (stalledSince === 0) stalledSince = now;
        else if (now - stalledSince > STALL_MS) throw new Error(`producing to ${topic}: the queue stayed full for ${STALL_MS / 1000} s at message ${i}`);
        p.poll();
        await new Promise((r) => setTimeout(r, 1));
      }
    }
    await new Promise<void>((resolve, reject) => p.flush(STALL_MS, (e) => (e ? reject(e) : resolve())));
    return Number(process.hrtime.bigint() - t0) / 1e6;
  } finally {
    await new Promise<void>((resolve) => p.disconnect(() => resolve()));
  }
}

/** Low and high watermark of every partition of `topic` (a throwaway client). */
async function watermarks(bootstrap: string, topic: string, partitions: number): Promise<{ low: number; high: number }[]> {
  const c = new Kafka.KafkaConsumer({ 'metadata.broker.list': bootstrap, 'group.id': 'bench-watermarks' }, {});
  await new Promise<void>((resolve, reject) => c.connect({ timeout: 30_000 }, (e) => (e ? reject(e) : resolve())));
  try {
    const out: { low: number; high: number }[] = [];
    for (let p = 0; p < partitions; p++) {
      out.push(await new Promise((resolve, reject) => {
        c.queryWatermarkOffsets(topic, p, 10_000, (e, w) => (e ? reject(e) : resolve({ low: w.lowOffset, high: w.highOffset })));
      }));
    }
    return out;
  } finally {
    await new Promise<void>((resolve) => c.disconnect(() => resolve()));
  }
}

/** Fails unless `topic` still holds every message from offset 0 (the mock's retention dropped none). */
async function checkRetained(bootstrap: string, topic: string, partitions: number, count: number): Promise<void> {
  const w = await watermarks(bootstrap, topic, partitions);
  const held = w.reduce((sum, x) => sum + x.high - x.low, 0);
  if (w.some((x) => x.low !== 0) || held !== count) {
    throw new Error(`${topic} holds ${held} of the ${count} messages produced (low watermarks ${w.map((x) => x.low).join(',')}): the mock cluster's 5 MiB per partition is exceeded`);
  }
}

interface ReadResult {
  /** Messages the source handed to the engine. */
  readonly messages: number;
  /** Connect + join + run until the end, ns. */
  readonly ns: bigint;
  /** From the start to the first message handed over (connect, group join, first fetch), ms. */
  readonly firstMs: number;
}

/**
 * Reads `topic` as consumer group `groupId` into `engine` from the engine's position until every
 * partition is read to its end (engine.run with an exitAtEnd source); the consumer is closed after
 * the clock stops. Fails when no message arrives for {@link STALL_MS}.
 */
async function readToEnd(engine: Engine, bootstrap: string, topic: string, groupId: string): Promise<ReadResult> {
  const cfg = resolveKafkaConfig({ brokers: bootstrap, groupId, clientId: 'crmstream-bench', topics: { events: topic } });
  const t0 = process.hrtime.bigint();
  const source = await KafkaSource.connect(cfg, {
    position: engine.position, inputs: engine.inputWatermarks(), batchRows: engine.config.batchRows, timeZone: engine.config.time.timeZone, exitAtEnd: true,
  });
  let firstAt = 0n;
  let stalled = false;
  let last = 0;
  let lastAt = Date.now();
  const watchdog = setInterval(() => {
    const m = source.stats().messages;
    if (m !== last) {
      last = m;
      lastAt = Date.now();
    } else if (Date.now() - lastAt > STALL_MS && !stalled) {
      stalled = true;
      void source.close(); // ends the source's iterator, so engine.run returns
    }
  }, 1_000);
  // Notes the time the first batch is handed over (one generator step per batch of 4096).
  async function* stamped(): AsyncGenerator<SourceItem> {
    for await (const item of source) {
      if (firstAt === 0n && item.kind === 'batch') firstAt = process.hrtime.bigint();
      yield item;
    }
  }
  try {
    engine.onCheckpoint((p) => source.commit(p));
    await engine.run(stamped());
    const ns = process.hrtime.bigint() - t0;
    if (stalled) {
      const st = source.stats();
      const behind = Object.entries(st.lag).filter(([, l]) => l !== 0);
      throw new Error(`kafka ${topic}: no message for ${STALL_MS / 1000} s after ${st.messages.toLocaleString('en-US')} messages; `
        + `${st.assigned.length} partitions assigned, last lag query: ${behind.length === 0 ? 'none behind' : behind.map(([p, l]) => `${p}:${l}`).join(' ')}`);
    }
    const messages = source.stats().messages;
    return { messages, ns, firstMs: firstAt === 0n ? 0 : Number(firstAt - t0) / 1e6 };
  } finally {
    clearInterval(watchdog);
    await source.close();
  }
}

const fmt = (x: number): string => Math.round(x).toLocaleString('en-US');

// ---------------------------------------------------------------------------------------------------
// End to end

interface E2EState {
  readonly mock: MockCluster;
  readonly topic: string;
  readonly partitions: number;
  readonly events: number;
  readonly bytes: number;
  readonly produceMs: number;
  /** LevelDB scenario: the parent of each run's data dir. */
  readonly dir: string | null;
  runs: number;
  consumed: number;
  firstMs: number;
  checkpointMs: number;
  checkpoints: number;
  profiles: number;
}

async function e2eSetup(quick: boolean, level: boolean): Promise<E2EState> {
  const mock = await MockCluster.start({ brokers: BROKERS });
  try {
    const topic = 'events';
    const n = kafkaItems(quick);
    const { msgs, bytes } = encodeMessages(new TrafficGenerator(benchTraffic()), n);
    const partitions = partitionsFor(msgs);
    await mock.createTopic(topic, partitions);
    const produceMs = await produceAll(mock.bootstrap, topic, msgs);
    await checkRetained(mock.bootstrap, topic, partitions, n);
    return {
      mock, topic, partitions, events: n, bytes, produceMs, dir: level ? mkdtempSync(path.join(os.tmpdir(), 'crm-kafka-bench-')) : null,
      runs: 0, consumed: 0, firstMs: 0, checkpointMs: 0, checkpoints: 0, profiles: 0,
    };
  } catch (err) {
    await mock.stop();
    throw err;
  }
}

async function e2eRun(s: E2EState): Promise<TimedItems> {
  const run = ++s.runs;
  let dataDir: string | null = null;
  if (s.dir !== null) {
    dataDir = path.join(s.dir, 'run');
    rmSync(dataDir, { recursive: true, force: true });
  }
  const engine = await Engine.create(dataDir === null ? CORE_CONFIG : { dataDir, checkpoint: { intervalMs: 1000 } });
  try {
    const r = await readToEnd(engine, s.mock.bootstrap, s.topic, `bench-e2e-${run}`);
    if (r.messages !== s.events) throw new Error(`read ${r.messages} of the ${s.events} messages`);
    const st = engine.stats();
    s.consumed = r.messages;
    s.firstMs = r.firstMs;
    s.checkpointMs = st['checkpointMsLast']!;
    s.checkpoints = st['epoch']!;
    s.profiles = st['profilesCreated']!;
    consume(engine.acceptedCount + s.profiles);
    return { items: r.messages, ns: r.ns };
  } finally {
    // Memory: the state is dropped (as in engine core); LevelDB: closed (nothing left to checkpoint).
    if (dataDir !== null) await engine.close();
  }
}

async function e2eTeardown(s: E2EState): Promise<void> {
  await s.mock.stop();
  if (s.dir !== null) rmSync(s.dir, { recursive: true, force: true });
}

function e2eNotes(s: E2EState): string {
  return `${fmt(s.consumed)} of ${fmt(s.events)} messages consumed; topic ${s.partitions} partitions on ${BROKERS} mock brokers, `
    + `avg ${(s.bytes / s.events).toFixed(1)} B/message, keyed by user; setup: produced at ${fmt(s.events / (s.produceMs / 1000))} msg/s; `
    + `first message after ${s.firstMs.toFixed(0)} ms (connect + group join); ${s.profiles.toLocaleString('en-US')} profiles; `
    + (s.dir === null
      ? `final checkpoint (memory) ${s.checkpointMs.toFixed(0)} ms; engine as engine core (all KPIs + 6 built-in segments)`
      : `${s.checkpoints} checkpoints (1 s, offsets committed after each), last ${s.checkpointMs.toFixed(0)} ms`);
}

export const kafkaE2EScenario: Scenario<E2EState> = {
  name: 'kafka end to end (protobuf, mock cluster)',
  setup: (ctx) => e2eSetup(ctx.quick, false),
  run: e2eRun,
  teardown: e2eTeardown,
  notes: e2eNotes,
};

export const kafkaE2ELevelScenario: Scenario<E2EState> = {
  name: 'kafka end to end + LevelDB (checkpoint 1 s)',
  setup: (ctx) => e2eSetup(ctx.quick, true),
  run: e2eRun,
  teardown: e2eTeardown,
  notes: e2eNotes,
};

// ---------------------------------------------------------------------------------------------------
// Lag recovery

interface LagState {
  readonly mock: MockCluster;
  readonly partitions: number;
  readonly before: readonly Msg[];
  readonly backlog: readonly Msg[];
  readonly bytes: number;
  runs: number;
  produceMs: number;
  lagBefore: number;
  recoveredMs: number;
  firstMs: number;
  checkpointMs: number;
}

export const kafkaLagScenario: Scenario<LagState> = {
  name: 'kafka lag recovery',

  async setup(ctx) {
    // One stream, cut in two: the backlog continues the events the engine has seen.
    const { before: nb, backlog: nl } = lagItems(ctx.quick);
    const gen = new TrafficGenerator(benchTraffic());
    const before = encodeMessages(gen, nb).msgs;
    const backlog = encodeMessages(gen, nl);
    const partitions = partitionsFor([...before, ...backlog.msgs]);
    const mock = await MockCluster.start({ brokers: BROKERS });
    return {
      mock, partitions, before, backlog: backlog.msgs, bytes: backlog.bytes,
      runs: 0, produceMs: 0, lagBefore: 0, recoveredMs: 0, firstMs: 0, checkpointMs: 0,
    };
  },

  async run(s) {
    // A fresh topic each run: every run does the same work.
    const run = ++s.runs;
    const topic = `lag-${run}`;
    const group = `bench-lag-${run}`;
    await s.mock.createTopic(topic, s.partitions);
    await produceAll(s.mock.bootstrap, topic, s.before);
    const engine = await Engine.create(CORE_CONFIG);
    // Untimed: the engine reads the topic to its end, then its consumer stops (leaves the group).
    const first = await readToEnd(engine, s.mock.bootstrap, topic, group);
    if (first.messages !== s.before.length) throw new Error(`read ${first.messages} of the ${s.before.length} messages before the stop`);
    // The backlog arrives while no consumer runs.
    s.produceMs = await produceAll(s.mock.bootstrap, topic, s.backlog);
    await checkRetained(s.mock.bootstrap, topic, s.partitions, s.before.length + s.backlog.length);
    const ends = (await watermarks(s.mock.bootstrap, topic, s.partitions)).map((w) => w.high);
    const pos = engine.position;
    if (!isKafkaPosition(pos, topic)) throw new Error('the engine holds no Kafka position after the first read');
    const lagOf = (offsets: Readonly<Record<string, number>>): number => ends.reduce((sum, end, p) => sum + Math.max(0, end - (offsets[String(p)] ?? 0)), 0);
    s.lagBefore = lagOf(pos.kafka.offsets);
    if (s.lagBefore !== s.backlog.length) throw new Error(`lag before the restart is ${s.lagBefore}, expected ${s.backlog.length}`);
    // Timed: a consumer starts at the engine's position and runs until lag 0. It joins as a new
    // group: the position comes from the engine's checkpoint, not from the group's offsets, and the
    // mock coordinator keeps a group its last member left in JOINING for session.timeout.ms − 1 s
    // (44 s) before it is empty again — a real broker empties it at once.
    const r = await readToEnd(engine, s.mock.bootstrap, topic, `${group}-restart`);
    const after = engine.position;
    const lagAfter = isKafkaPosition(after, topic) ? lagOf(after.kafka.offsets) : -1;
    if (lagAfter !== 0) throw new Error(`lag after recovery is ${lagAfter}, not 0`);
    if (r.messages !== s.backlog.length) throw new Error(`recovered ${r.messages} of the ${s.backlog.length} backlog messages`);
    s.recoveredMs = Number(r.ns) / 1e6;
    s.firstMs = r.firstMs;
    s.checkpointMs = engine.stats()['checkpointMsLast']!;
    consume(engine.acceptedCount + engine.stats()['profilesCreated']!);
    return { items: r.messages, ns: r.ns };
  },

  async teardown(s) {
    await s.mock.stop();
  },

  notes: (s) => `backlog ${fmt(s.backlog.length)} messages (avg ${(s.bytes / s.backlog.length).toFixed(1)} B; produced at ${fmt(s.backlog.length / (s.produceMs / 1000))} msg/s while the consumer was stopped) `
    + `after ${fmt(s.before.length)} read before the stop; lag ${fmt(s.lagBefore)} → 0 in ${s.recoveredMs.toFixed(0)} ms `
    + `(${fmt(s.lagBefore / (s.recoveredMs / 1000))} ev/s; first message after ${s.firstMs.toFixed(0)} ms = connect + join; final checkpoint ${s.checkpointMs.toFixed(0)} ms); `
    + `${s.partitions} partitions, ${BROKERS} mock brokers; engine core config, memory state`,
};

// ---------------------------------------------------------------------------------------------------
// Scale-out (one instance running every task: the cost of re-keying, forwarding and the changelog)

/** Events in the scale-out topic: smaller than end to end, because the route and changelog topics hold them again. */
export function scaleOutItems(quick: boolean): number {
  return quick ? 50_000 : 200_000;
}

interface ScaleOutState {
  readonly mock: MockCluster;
  readonly partitions: number;
  readonly events: number;
  readonly dir: string;
  runs: number;
  stats: ScaleOutStats | null;
}

async function scaleOutSetup(quick: boolean): Promise<ScaleOutState> {
  const mock = await MockCluster.start({ brokers: BROKERS });
  try {
    const n = scaleOutItems(quick);
    const { msgs } = encodeMessages(new TrafficGenerator(benchTraffic()), n);
    // The route topic holds each event again, wrapped (≈ +60 B with its headers): size for that.
    const partitions = partitionsFor(msgs.map((m) => ({ key: m.key, value: Buffer.alloc(m.value.length + 60) })));
    await mock.createTopic('events', partitions);
    await produceAll(mock.bootstrap, 'events', msgs);
    await checkRetained(mock.bootstrap, 'events', partitions, n);
    return { mock, partitions, events: n, dir: mkdtempSync(path.join(os.tmpdir(), 'crm-scale-bench-')), runs: 0, stats: null };
  } catch (err) {
    await mock.stop();
    throw err;
  }
}

async function scaleOutRun(s: ScaleOutState): Promise<TimedItems> {
  const run = ++s.runs;
  // Fresh route / changelog / partials topics per run: a task's state starts empty.
  const topics = { routeTopic: `route-${run}`, changelogTopic: `changelog-${run}`, partialsTopic: `partials-${run}` };
  for (const t of Object.values(topics)) await s.mock.createTopic(t, s.partitions);
  const dataDir = path.join(s.dir, `run-${run}`);
  const kafka = resolveKafkaConfig({ brokers: s.mock.bootstrap, groupId: `bench-scale-${run}`, clientId: 'crmstream-bench', topics: { events: 'events' }, scaleOut: topics });
  const t0 = process.hrtime.bigint();
  const runner = await ScaleOutRunner.connect({ engine: { dataDir, checkpoint: { intervalMs: 1000 } }, kafka, dataDir, exitAtEnd: true });
  const watchdog = setTimeout(() => runner.close(), 10 * STALL_MS);
  try {
    await runner.run();
  } finally {
    clearTimeout(watchdog);
  }
  const ns = process.hrtime.bigint() - t0;
  const st = runner.stats();
  if (st.routed !== s.events) throw new Error(`scale-out routed ${st.routed} of the ${s.events} events`);
  s.stats = st;
  rmSync(dataDir, { recursive: true, force: true });
  return { items: st.routed, ns };
}

export const kafkaScaleOutScenario: Scenario<ScaleOutState> = {
  name: 'kafka scale-out, one instance (route + tasks + changelog)',
  setup: (ctx) => scaleOutSetup(ctx.quick),
  run: scaleOutRun,
  teardown: async (s) => {
    await s.mock.stop();
    rmSync(s.dir, { recursive: true, force: true });
  },
  notes: (s) => {
    const st = s.stats;
    return `${fmt(s.events)} events, ${s.partitions} partitions (events, route, changelog, partials topics) on ${BROKERS} mock brokers, LevelDB per task, checkpoint 1 s`
      + (st === null ? '' : `; route records processed ${fmt(st.processed)} (forwarded ${fmt(st.forwarded)}, anonymous profiles moved ${fmt(st.movedIn)}), partials sets published ${st.partialsPublished}; compare with kafka end to end + LevelDB (one engine, no route hop, no changelog)`);
  },
};
