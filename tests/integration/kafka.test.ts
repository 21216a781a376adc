import { spawn } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import Kafka from 'node-rdkafka';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Engine } from '../../engine/engine.js';
import { MockCluster } from '../../engine/kafka/mock-cluster.js';
import { parseRunConfig } from '../../api/run.js';
import { TrafficGenerator, encodeProto, isBad, type GenEvent } from '../../engine/sources/generator.js';
import { crmstream } from '../../api/proto/gen/crmstream.js';
import { sha256Hex } from '../../api/auth.js';
import { compareRows } from '../oracle/compare.js';
import { KpiOracle, type OracleEvent } from '../oracle/kpi-oracle.js';
import { PROJECT_ROOT, runAndKill, tempDir } from '../helpers.js';
import { produceAll, runCli } from '../kafka-helpers.js';

/**
 * Kafka in and out on librdkafka's mock cluster, which runs in its own process (tools/kafka-mock.c):
 * killing an engine never kills the broker. The engine is the real CLI (`crmstream run`), so
 * these are also tests of the run configuration, the offsets stored with the checkpoint and the
 * commit that follows it.
 *
 * One topic of generated events (6 partitions, keyed by user, with late, duplicate and malformed
 * records) is produced once; each test reads it as a fresh consumer group into a fresh data dir.
 * KPIs and cohorts must equal the DuckDB oracle over the accepted events; outputs go to topics.
 */

const CLI = path.join(PROJECT_ROOT, 'dist/api/cli.js');
const TZ = 'Asia/Seoul';
const N = 24_000;
const KEY = 'kafka-test-key';
const CAMPAIGNS = {
  campaigns: [
    { id: 'welcome', trigger: { event: 'sign_up' }, action: { template: 'welcome', channels: ['push'] } },
    { id: 'winback', trigger: { segment: 'dormant_30', on: 'enter' }, action: { template: 'winback', channels: ['push'] } },
  ],
  consent: { unknown: 'allow' },
};

let mock: MockCluster;
let oracle: KpiOracle;
/** Accepted events in production order (duplicates removed), for the oracle. */
const accepted: OracleEvent[] = [];
const expectedRejects: Record<string, number> = {};
let expectedMaxTs = 0;

/** Reads a topic from the beginning until `want` messages arrived (bounded: 30 s). */
async function readTopic(topic: string, want: number): Promise<Kafka.Message[]> {
  const c = new Kafka.KafkaConsumer({ 'metadata.broker.list': mock.bootstrap, 'group.id': `reader-${topic}-${Date.now()}`, 'enable.auto.commit': false }, { 'auto.offset.reset': 'earliest' });
  await new Promise<void>((resolve, reject) => c.connect({}, (e) => (e ? reject(e) : resolve())));
  c.subscribe([topic]);
  const out: Kafka.Message[] = [];
  const deadline = Date.now() + 30_000;
  while (out.length < want && Date.now() < deadline) {
    const msgs = await new Promise<Kafka.Message[]>((resolve, reject) => c.consume(1000, (e, m) => (e ? reject(e) : resolve(m))));
    out.push(...msgs);
  }
  // A little longer: more than `want` would be a duplicate the assertions must see.
  for (let i = 0; i < 3; i++) out.push(...(await new Promise<Kafka.Message[]>((resolve, reject) => c.consume(1000, (e, m) => (e ? reject(e) : resolve(m))))));
  await new Promise<void>((resolve) => c.disconnect(() => resolve()));
  return out;
}

/** The group's committed offsets on the events topic, per partition. */
async function committedOffsets(group: string): Promise<Record<string, number>> {
  const c = new Kafka.KafkaConsumer({ 'metadata.broker.list': mock.bootstrap, 'group.id': group, 'enable.auto.commit': false }, {});
  await new Promise<void>((resolve, reject) => c.connect({}, (e) => (e ? reject(e) : resolve())));
  const tps = await new Promise<Kafka.TopicPartitionOffset[]>((resolve, reject) => {
    c.committed([0, 1, 2, 3, 4, 5].map((partition) => ({ topic: 'events', partition })), 10_000, (e, r) => (e ? reject(e) : resolve(r)));
  });
  await new Promise<void>((resolve) => c.disconnect(() => resolve()));
  return Object.fromEntries(tps.map((t) => [String(t.partition), t.offset]));
}

/** High watermarks of the events topic. */
async function endOffsets(): Promise<Record<string, number>> {
  const c = new Kafka.KafkaConsumer({ 'metadata.broker.list': mock.bootstrap, 'group.id': 'watermarks' }, {});
  await new Promise<void>((resolve, reject) => c.connect({}, (e) => (e ? reject(e) : resolve())));
  const out: Record<string, number> = {};
  for (let p = 0; p < 6; p++) {
    out[String(p)] = await new Promise<number>((resolve, reject) => c.queryWatermarkOffsets('events', p, 10_000, (e, w) => (e ? reject(e) : resolve(w.highOffset))));
  }
  await new Promise<void>((resolve) => c.disconnect(() => resolve()));
  return out;
}

function writeRunConfig(dir: string, group: string, o: { kafka?: Record<string, unknown>; top?: Record<string, unknown> } = {}): string {
  const file = path.join(dir, 'run.json');
  writeFileSync(file, JSON.stringify({
    dataDir: path.join(dir, 'state'),
    time: { timeZone: TZ },
    campaigns: { definitions: CAMPAIGNS },
    kafka: {
      brokers: mock.bootstrap, groupId: group, topics: { events: 'events', triggers: `triggers-${group}`, deadLetters: `dead-${group}` },
      // A SIGKILLed member holds its partitions until the coordinator's session timeout (45 s by
      // default): the restarted process waits that long to be assigned. Short here, for test time.
      consumer: { 'session.timeout.ms': 6_000, 'heartbeat.interval.ms': 500 },
      ...o.kafka,
    },
    ...o.top,
  }));
  return file;
}

/** Every difference between the state in `dataDir` and the oracle. */
async function differences(dataDir: string): Promise<string[]> {
  const engine = await Engine.create({ dataDir, time: { timeZone: TZ }, campaigns: { definitions: CAMPAIGNS } });
  try {
    const opts = { timeZone: TZ, watermark: engine.watermark };
    const diffs: string[] = [];
    for (const g of ['day', 'week', 'month'] as const) {
      diffs.push(...compareRows(await engine.kpis(g), await oracle.kpis(g, opts), ['window', 'channel', 'platform']).map((d) => `kpis/${g}: ${d}`));
    }
    diffs.push(...compareRows(await engine.cohorts('week', 'first_activity'), await oracle.cohorts('week', 'first_activity', opts), ['cohort', 'channel', 'platform', 'age']).map((d) => `cohorts: ${d}`));
    const rejects = sortKeys(Object.fromEntries(Object.entries(engine.rejectCounts()).filter(([, n]) => n > 0)));
    if (JSON.stringify(rejects) !== JSON.stringify(sortKeys(expectedRejects))) diffs.push(`rejects ${JSON.stringify(rejects)} != ${JSON.stringify(sortKeys(expectedRejects))}`);
    if (engine.watermark !== expectedMaxTs) diffs.push(`watermark ${engine.watermark} != max event time ${expectedMaxTs}`);
    return diffs;
  } finally {
    await engine.close();
  }
}

function sortKeys(o: Record<string, number>): Record<string, number> {
  return Object.fromEntries(Object.keys(o).sort().map((k) => [k, o[k]!]));
}

function triggerIds(file: string): string[] {
  return readFileSync(file, 'utf8').split('\n').filter((l) => l !== '').map((l) => (JSON.parse(l) as { trigger_id: string }).trigger_id).sort();
}

beforeAll(async () => {
  mock = await MockCluster.start({ brokers: 3 });
  await mock.createTopic('events', 6);
  oracle = await KpiOracle.create();
  // ~2 events per hour per … spread over days, so day/week windows, retention and dormancy all move.
  const gen = new TrafficGenerator({ seed: 11, users: 4_000, eventsPerSecond: 0.15, badRate: 0.004, duplicateRate: 0.01, lateRate: 0.02, maxLateMs: 86_400_000 });
  const records: { key: string; value: Buffer }[] = [];
  const seen = new Set<string>();
  for (let i = 0; i < N; i++) {
    const r = gen.nextRecord();
    if (isBad(r)) {
      expectedRejects[r.reason] = (expectedRejects[r.reason] ?? 0) + 1;
      records.push({ key: `bad-${i}`, value: Buffer.from(r.proto) });
      continue;
    }
    const e: GenEvent = r;
    records.push({ key: e.user_id || e.anonymous_id, value: Buffer.from(encodeProto(e)) });
    if (seen.has(e.event_id)) {
      expectedRejects['duplicate'] = (expectedRejects['duplicate'] ?? 0) + 1;
      continue;
    }
    seen.add(e.event_id);
    expectedMaxTs = Math.max(expectedMaxTs, e.ts);
    accepted.push({ event_id: e.event_id, type: e.type, user_id: e.user_id, anonymous_id: e.anonymous_id, ts: e.ts, amount: e.amount === 0 ? Number.NaN : e.amount, channel: e.channel, platform: e.platform });
  }
  await produceAll(mock.bootstrap, 'events', records);
  await oracle.load(accepted);
}, 120_000);

afterAll(async () => {
  await oracle?.close();
  await mock?.stop();
});

describe('crmstream run on Kafka (mock cluster in its own process)', () => {
  let uninterruptedTriggers: string[] = [];

  it('consumes a 6-partition topic: KPIs equal the oracle, outputs reach their topics, offsets are committed', async () => {
    const t = tempDir('crm-kafka-');
    try {
      const config = writeRunConfig(t.dir, 'g1');
      const r = await runCli(['run', '--config', config, '--exit-at-end']);
      expect(r.code, r.out).toBe(0);
      const report = JSON.parse(r.out.split('\n').find((l) => l.startsWith('{'))!) as { consumed: number; position: { kafka: { offsets: Record<string, number> } } };
      expect(report.consumed).toBe(N);
      expect(await differences(path.join(t.dir, 'state'))).toEqual([]);
      // Offsets: the checkpoint covers the whole topic and the group's commit follows it.
      const ends = await endOffsets();
      expect(report.position.kafka.offsets).toEqual(ends);
      expect(await committedOffsets('g1')).toEqual(ends);
      // Outputs: every dead letter and every trigger, keyed, once (no crash here: no re-delivery).
      const badCount = Object.entries(expectedRejects).filter(([k]) => k !== 'duplicate').reduce((a, [, n]) => a + n, 0);
      const dead = await readTopic('dead-g1', badCount + expectedRejects['duplicate']!);
      expect(dead.length).toBe(badCount + expectedRejects['duplicate']!);
      uninterruptedTriggers = triggerIds(path.join(t.dir, 'state', 'triggers.jsonl'));
      expect(uninterruptedTriggers.length).toBeGreaterThan(100);
      const trig = await readTopic('triggers-g1', uninterruptedTriggers.length);
      const fromTopic = trig.map((m) => crmstream.v1.Trigger.decode(m.value!)).map((x) => x.trigger_id).sort();
      expect(fromTopic).toEqual(uninterruptedTriggers);
      for (const m of trig) expect(m.key?.toString()).toBe(crmstream.v1.Trigger.decode(m.value!).user_id);
    } finally {
      t.cleanup();
    }
  }, 180_000);

  it('SIGKILLed mid-stream and restarted: no event lost or counted twice, the same triggers', async () => {
    const t = tempDir('crm-kafka-kill-');
    try {
      // Small batches and a checkpoint per batch, so kills land between and inside many checkpoints.
      const config = writeRunConfig(t.dir, 'g2', { kafka: { maxBatch: 300 }, top: { checkpoint: { intervalMs: 0 } } });
      let kills = 0;
      for (let i = 0; i < 6; i++) {
        const killed = await runAndKill([CLI, 'run', '--config', config, '--exit-at-end'], /consuming events/, 150 + 250 * i);
        if (!killed) break;
        kills++;
      }
      expect(kills).toBeGreaterThan(0);
      const r = await runCli(['run', '--config', config, '--exit-at-end']);
      expect(r.code, r.out).toBe(0);
      expect(await differences(path.join(t.dir, 'state'))).toEqual([]);
      expect(await committedOffsets('g2')).toEqual(await endOffsets());
      // The decisions are the same set as the uninterrupted run's; the Kafka topic may hold some
      // twice (at-least-once after a kill) but no other id.
      const ids = triggerIds(path.join(t.dir, 'state', 'triggers.jsonl'));
      expect(ids).toEqual(uninterruptedTriggers);
      const topic = await readTopic('triggers-g2', ids.length);
      expect([...new Set(topic.map((m) => crmstream.v1.Trigger.decode(m.value!).trigger_id))].sort()).toEqual(uninterruptedTriggers);
    } finally {
      t.cleanup();
    }
  }, 300_000);

  it('broker trouble (a broker down, failed fetches, produces and commits): retried, nothing lost or doubled, errors on /metrics', async () => {
    const t = tempDir('crm-kafka-faults-');
    try {
      const config = writeRunConfig(t.dir, 'g3', { kafka: { maxBatch: 500 }, top: { server: { port: 0, keys: [{ name: 't', sha256: sha256Hex(KEY), scopes: ['admin'] }] } } });
      const child = spawn(process.execPath, [CLI, 'run', '--config', config], { stdio: ['ignore', 'pipe', 'pipe'] });
      let out = '';
      child.stdout.on('data', (d: Buffer) => (out += d.toString()));
      child.stderr.on('data', (d: Buffer) => (out += d.toString()));
      const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
      try {
        const port = await waitFor(() => /serving on http:\/\/127\.0\.0\.1:(\d+)/.exec(out)?.[1], 30_000, 'the server to start');
        const metric = async (name: string): Promise<number> => {
          const text = await (await fetch(`http://127.0.0.1:${port}/metrics`, { headers: { authorization: `Bearer ${KEY}` } })).text();
          let sum = 0;
          for (const line of text.split('\n')) if (line.startsWith(name + ' ') || line.startsWith(name + '{')) sum += Number(line.slice(line.lastIndexOf(' ') + 1));
          return sum;
        };
        await mock.pushRequestErrors(1, 30, 6); // Fetch: NOT_LEADER_OR_FOLLOWER
        await mock.pushRequestErrors(0, 10, 7); // Produce: REQUEST_TIMED_OUT
        await mock.pushRequestErrors(8, 5, 15); // OffsetCommit: COORDINATOR_NOT_AVAILABLE
        await mock.brokerDown(2);
        await waitFor(async () => ((await metric('crm_kafka_errors_total')) > 0 ? true : undefined), 30_000, 'kafka errors on /metrics');
        await new Promise((r) => setTimeout(r, 1_500));
        await mock.brokerUp(2);
        await waitFor(async () => ((await metric('crm_kafka_messages_total')) >= N ? true : undefined), 90_000, 'every message consumed');
        await waitFor(async () => ((await metric('crm_kafka_consumer_lag')) === 0 ? true : undefined), 30_000, 'lag 0 on /metrics');
      } finally {
        child.kill('SIGTERM');
      }
      expect(await exited, out).toBe(0);
      // Without --exit-at-end the watermark stays where the stream left it (max event time − 5 s);
      // the oracle comparison needs it at the end, as the other runs leave it: one catch-up run does that.
      const r = await runCli(['run', '--config', config, '--exit-at-end']);
      expect(r.code, r.out).toBe(0);
      expect(await differences(path.join(t.dir, 'state'))).toEqual([]);
      expect(triggerIds(path.join(t.dir, 'state', 'triggers.jsonl'))).toEqual(uninterruptedTriggers);
    } finally {
      await mock.brokerUp(2).catch(() => undefined);
      t.cleanup();
    }
  }, 300_000);
});

describe('KafkaSource', () => {
  it('reads JSON messages (format: json); garbage, empty values and bad events are dead-lettered with their offset', async () => {
    await mock.createTopic('json-events', 2);
    const good = [
      { event_id: 'j1', type: 'visit', anonymous_id: 'a1', ts: '2024-03-01T10:00:00+09:00' },
      { event_id: 'j2', type: 'sign_up', anonymous_id: 'a1', user_id: 'u1', ts: '2024-03-01T10:05:00+09:00' },
      { event_id: 'j3', type: 'purchase', user_id: 'u1', ts: '2024-03-01T11:00:00+09:00', amount: 12000, order_id: 'o1' },
    ];
    await produceAll(mock.bootstrap, 'json-events', [
      ...good.map((e) => ({ key: 'u1', value: Buffer.from(JSON.stringify(e)) })),
      { key: 'x', value: Buffer.from('{not json') },
      { key: 'x', value: Buffer.alloc(0) },
      { key: 'x', value: Buffer.from(JSON.stringify({ event_id: 'j4', type: 'visit', ts: 1 })) },
    ]);
    const { KafkaSource } = await import('../../engine/kafka/source.js');
    const { resolveKafkaConfig } = await import('../../engine/kafka/config.js');
    const engine = await Engine.create({ time: { timeZone: TZ } });
    const source = await KafkaSource.connect(resolveKafkaConfig({ brokers: mock.bootstrap, groupId: 'json', format: 'json', topics: { events: 'json-events' }, consumer: { 'session.timeout.ms': 6_000 } }), {
      position: null, batchRows: 64, timeZone: TZ, exitAtEnd: true,
    });
    const dead: string[] = [];
    engine.onOutput((r) => {
      if (r.topic === 1) {
        const d = crmstream.v1.DeadLetter.decode(r.payload);
        dead.push(`${d.reason} ${d.source.replace(/@\d+$/, '')}`);
      }
    });
    try {
      await engine.run(source);
      expect(engine.acceptedCount).toBe(3);
      expect(dead.map((d) => d.replace(/\/\d$/, '/p')).sort()).toEqual(['bad_encoding json-events/p', 'bad_encoding json-events/p', 'missing_id json-events/p']);
      const total = Object.values(source.position().kafka.offsets).reduce((a, b) => a + b, 0);
      expect(total).toBe(6);
      const day = (await engine.kpis('day')).find((r) => r.window === '2024-03-01' && r.channel === '*' && r.platform === '*');
      expect(day?.revenue).toBe(12000);
      expect(day?.signups).toBe(1);
    } finally {
      await source.close();
      await engine.close();
    }
  }, 60_000);
});

describe('one instance per group', () => {
  it('a second member of the group is reported on both sides (partitions unowned), not silently split', async () => {
    await mock.createTopic('shared', 4);
    const { KafkaSource } = await import('../../engine/kafka/source.js');
    const { resolveKafkaConfig } = await import('../../engine/kafka/config.js');
    const cfg = resolveKafkaConfig({ brokers: mock.bootstrap, groupId: 'pair', topics: { events: 'shared' }, consumer: { 'session.timeout.ms': 6_000, 'heartbeat.interval.ms': 500 } });
    const errors: string[] = [];
    const opts = { position: null, batchRows: 64, timeZone: TZ, onError: (e: unknown) => errors.push((e as Error).message) };
    const a = await KafkaSource.connect(cfg, opts);
    try {
      await waitFor(() => (a.stats().assigned.length === 4 ? true : undefined), 30_000, 'the first member to own every partition');
      await waitFor(() => (a.stats().unowned === 0 && errors.length === 0 ? true : undefined), 10_000, 'ownership checked');
      const b = await KafkaSource.connect(cfg, opts);
      try {
        await waitFor(() => (a.stats().assigned.length + b.stats().assigned.length === 4 && b.stats().assigned.length > 0 ? true : undefined), 30_000, 'the partitions to be split');
        await waitFor(() => (a.stats().unowned > 0 && b.stats().unowned > 0 ? true : undefined), 10_000, 'both members to see unowned partitions');
        expect(errors.some((m) => /assigned to another member of group pair/.test(m))).toBe(true);
      } finally {
        await b.close();
      }
    } finally {
      await a.close();
    }
  }, 90_000);
});

describe('run configuration', () => {
  it('names every offending field and refuses unknown settings', () => {
    let message = '';
    try {
      parseRunConfig({ dataDir: '/tmp/x', kafka: { brokers: '', topics: { event: 'x' }, format: 'xml' }, tiem: {}, server: { keys: [] } }, 'f.json');
    } catch (err) {
      message = (err as Error).message;
    }
    for (const want of ['kafka.brokers: give at least one host:port', 'kafka.topics: Unrecognized key: "event"', 'kafka.format: Invalid option', 'tiem: unknown setting', 'server.keys: configure at least one API key']) {
      expect(message).toContain(want);
    }
    expect(() => parseRunConfig({ dataDir: '/tmp/x' }, 'f.json')).toThrow(/kafka: required/);
    const ok = parseRunConfig({ dataDir: '/tmp/x', kafka: { brokers: '127.0.0.1:9092' } }, 'f.json');
    expect(ok.kafka.topics.events).toBe('events');
    expect(ok.kafka.groupId).toBe('crmstream');
    expect(ok.server).toBeNull();
  });
});

async function waitFor<T>(fn: () => T | undefined | Promise<T | undefined>, ms: number, what: string): Promise<T> {
  const deadline = Date.now() + ms;
  for (;;) {
    const v = await fn();
    if (v !== undefined) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 200));
  }
}
