import { spawn, type ChildProcess } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import path from 'node:path';
import Kafka from 'node-rdkafka';
import { crmstream } from '../../api/proto/gen/crmstream.js';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Engine } from '../../engine/engine.js';
import { MockCluster } from '../../engine/kafka/mock-cluster.js';
import { TrafficGenerator, encodeProto, isBad } from '../../engine/sources/generator.js';
import type { KpiRow } from '../../operators/kpi-rows.js';
import { compareRows } from '../oracle/compare.js';
import { KpiOracle, type OracleEvent } from '../oracle/kpi-oracle.js';
import { PROJECT_ROOT, runAndKill, tempDir, exited } from '../helpers.js';
import { produceAll, readTopic, runCli } from '../kafka-helpers.js';

/**
 * Issue 17 item 0: a Kafka backlog is accepted in full. A year of generated purchase / visit
 * history (fixed seed, 3,000 users), in event-time order, keyed by user onto 6 partitions and
 * produced with heavy skew (partition 0 entirely first, the others in chunks of 1 to 2,000
 * records), is consumed from the beginning. With the watermark as the maximum over the partitions
 * (the base), a partition read behind the others has its events rejected `too_late`; with a
 * watermark per partition and the minimum as the engine's (idle partitions excepted, partitions
 * running ahead paused), every event is accepted and the KPIs equal the DuckDB oracle:
 *
 * - one `crmstream run --exit-at-end`;
 * - the same, SIGKILLed several times mid-backlog and run again (the stream times come back from
 *   the checkpoint: nothing lost, nothing twice, still no `too_late`);
 * - `kafka.scaleOut` with two instances: each task takes the minimum over the events partitions'
 *   hints and the other tasks' announcements (rows forwarded between tasks are late otherwise);
 *   no dead letter at all, and the global KPIs (the tasks' published partials) equal the oracle.
 */

const CLI = path.join(PROJECT_ROOT, 'dist/api/cli.js');
const TZ = 'Asia/Seoul';
const N = 18_000;
const P = 6;
const YEAR_MS = 365 * 86_400_000;

let mock: MockCluster;
let oracle: KpiOracle;
const events: OracleEvent[] = [];
let maxTs = 0;

/** Stable partition of a key (FNV-1a), so the skew below is by design, not by librdkafka's partitioner. */
function partitionOf(key: string): number {
  let h = 0x811c9dc5;
  for (let i = 0; i < key.length; i++) h = Math.imul(h ^ key.charCodeAt(i), 0x01000193);
  return (h >>> 0) % P;
}

function writeConfig(dir: string, kafka: Record<string, unknown>, top: Record<string, unknown> = {}): string {
  const file = path.join(dir, 'run.json');
  writeFileSync(file, JSON.stringify({
    time: { timeZone: TZ },
    ...top,
    kafka: {
      brokers: mock.bootstrap, topics: { events: 'events' },
      consumer: { 'session.timeout.ms': 6_000, 'heartbeat.interval.ms': 500 },
      ...kafka,
    },
  }));
  return file;
}

/** KPI and cohort rows of `q` against the oracle at `watermark`. */
async function kpiDiffs(q: Engine, watermark: number): Promise<string[]> {
  const opts = { timeZone: TZ, watermark };
  const diffs: string[] = [];
  for (const g of ['day', 'week', 'month'] as const) {
    diffs.push(...compareRows(await q.kpis(g), await oracle.kpis(g, opts), ['window', 'channel', 'platform']).map((d) => `kpis/${g}: ${d}`));
  }
  diffs.push(...compareRows(await q.cohorts('week', 'first_activity'), await oracle.cohorts('week', 'first_activity', opts), ['cohort', 'channel', 'platform', 'age']).map((d) => `cohorts: ${d}`));
  return diffs.slice(0, 20);
}

/** Everything that differs between the state in `dataDir` and a full, exact read of the backlog. */
async function stateDiffs(dataDir: string): Promise<string[]> {
  const engine = await Engine.create({ dataDir, time: { timeZone: TZ } });
  try {
    const diffs = await kpiDiffs(engine, engine.watermark);
    const rejects = Object.fromEntries(Object.entries(engine.rejectCounts()).filter(([, n]) => n > 0));
    if (Object.keys(rejects).length > 0) diffs.push(`rejects ${JSON.stringify(rejects)}, want none`);
    if (engine.acceptedCount !== N) diffs.push(`accepted ${engine.acceptedCount}, produced ${N}`);
    if (engine.watermark !== maxTs) diffs.push(`watermark ${engine.watermark} != max event time ${maxTs}`);
    return diffs;
  } finally {
    await engine.close();
  }
}

beforeAll(async () => {
  mock = await MockCluster.start({ brokers: 3 });
  await mock.createTopic('events', P);
  oracle = await KpiOracle.create();
  // N events over a year: weeks between a user's visits, months of purchases and dormancy.
  const gen = new TrafficGenerator({
    seed: 1717, users: 3_000, startTs: Date.UTC(2024, 0, 1), eventsPerSecond: N / (YEAR_MS / 1000),
    lateRate: 0, duplicateRate: 0, badRate: 0,
  });
  const byPartition: { partition: number; key: string; value: Buffer; ts: number }[][] = Array.from({ length: P }, () => []);
  const all: { e: OracleEvent; key: string; value: Buffer }[] = [];
  while (all.length < N) {
    const r = gen.nextRecord();
    if (isBad(r)) continue;
    const key = r.user_id || r.anonymous_id || r.event_id;
    all.push({
      key, value: Buffer.from(encodeProto(r)),
      e: { event_id: r.event_id, type: r.type, user_id: r.user_id, anonymous_id: r.anonymous_id, ts: r.ts, amount: r.amount === 0 ? Number.NaN : r.amount, channel: r.channel, platform: r.platform },
    });
  }
  // In event-time order (stable), as a history export would be.
  all.sort((a, b) => a.e.ts - b.e.ts);
  for (const { e, key, value } of all) {
    events.push(e);
    maxTs = Math.max(maxTs, e.ts);
    const partition = partitionOf(key);
    byPartition[partition]!.push({ partition, key, value, ts: e.ts });
  }
  expect(maxTs - events[0]!.ts).toBeGreaterThan(300 * 86_400_000);
  expect(byPartition.every((l) => l.length > N / (3 * P))).toBe(true);
  // Skewed production: partition 0's whole year first, then the others in very different chunk
  // sizes, so their logs are written at different speeds (and fetched unevenly).
  const order: { partition: number; key: string; value: Buffer }[] = [...byPartition[0]!];
  const chunk = [0, 1, 17, 250, 2_000, 5];
  const heads = byPartition.map(() => 0);
  for (let left = true; left;) {
    left = false;
    for (let p = 1; p < P; p++) {
      const list = byPartition[p]!;
      const end = Math.min(list.length, heads[p]! + chunk[p]!);
      for (; heads[p]! < end; heads[p]!++) order.push(list[heads[p]!]!);
      if (heads[p]! < list.length) left = true;
    }
  }
  expect(order.length).toBe(N);
  await produceAll(mock.bootstrap, 'events', order);
  await oracle.load(events);
}, 120_000);

afterAll(async () => {
  await oracle?.close();
  await mock?.stop();
});

describe('a Kafka backlog is accepted in full (per-partition watermarks)', () => {
  it('one crmstream run --exit-at-end over a year on 6 skewed partitions: 0 too_late, accepted == produced, KPIs equal the oracle', async () => {
    const t = tempDir('crm-backlog-');
    try {
      const config = writeConfig(t.dir, { groupId: 'backlog-1' }, { dataDir: path.join(t.dir, 'state') });
      const r = await runCli(['run', '--config', config, '--exit-at-end']);
      expect(r.code, r.out).toBe(0);
      const report = JSON.parse(r.out.split('\n').find((l) => l.startsWith('{'))!) as { consumed: number; accepted: number; rejects: Record<string, number> };
      expect({ consumed: report.consumed, accepted: report.accepted, rejects: report.rejects }).toEqual({ consumed: N, accepted: N, rejects: {} });
      expect(await stateDiffs(path.join(t.dir, 'state'))).toEqual([]);
    } finally {
      t.cleanup();
    }
  }, 60_000);

  it('SIGKILLed mid-backlog and run again: the stream times come back with the checkpoint, nothing lost or twice, 0 too_late', async () => {
    const t = tempDir('crm-backlog-kill-');
    try {
      const config = writeConfig(t.dir, { groupId: 'backlog-2' }, { dataDir: path.join(t.dir, 'state'), checkpoint: { intervalMs: 50 } });
      let kills = 0;
      // Each restart waits out the killed member's session (6 s) before it is assigned: two kills.
      for (let i = 0; i < 2; i++) {
        const killed = await runAndKill([CLI, 'run', '--config', config, '--exit-at-end'], /consuming events/, 500 + 700 * i);
        if (!killed) break;
        kills++;
      }
      expect(kills).toBeGreaterThan(0);
      const r = await runCli(['run', '--config', config, '--exit-at-end']);
      expect(r.code, r.out).toBe(0);
      expect(await stateDiffs(path.join(t.dir, 'state'))).toEqual([]);
    } finally {
      t.cleanup();
    }
  }, 60_000);

  it('kafka.scaleOut, two instances: every task takes the minimum over the events partitions; 0 too_late, KPIs equal the oracle', async () => {
    for (const topic of ['route', 'changelog', 'partials', 'dead-scale']) await mock.createTopic(topic, P);
    const t = tempDir('crm-backlog-scale-');
    const log: string[] = [];
    const children: ChildProcess[] = [];
    try {
      const config = writeConfig(t.dir, {
        groupId: 'backlog-scale', maxBatch: 2_000, topics: { events: 'events', deadLetters: 'dead-scale' },
        scaleOut: { routeTopic: 'route', changelogTopic: 'changelog', partialsTopic: 'partials', hintMs: 100, partialsMs: 1_000 },
      }, { checkpoint: { intervalMs: 2_000 } });
      const start = (name: string): ChildProcess => {
        const child = spawn(process.execPath, [CLI, 'run', '--config', config, '--data-dir', path.join(t.dir, name)], { stdio: ['ignore', 'pipe', 'pipe'] });
        child.stdout!.on('data', (d: Buffer) => log.push(d.toString()));
        child.stderr!.on('data', (d: Buffer) => log.push(d.toString()));
        children.push(child);
        return child;
      };
      const a = start('a');
      const b = start('b');
      await quiescent('backlog-scale', ['events', 'route'], 40_000, log);
      const adv = await runCli(['advance', '--config', config, '--to', new Date(maxTs).toISOString()]);
      expect(adv.code, adv.out).toBe(0);
      await quiescent('backlog-scale', ['events', 'route'], 20_000, log);
      a.kill('SIGTERM');
      b.kill('SIGTERM');
      expect(await exited(a, 20_000), log.join('')).toBe(0);
      expect(await exited(b, 20_000), log.join('')).toBe(0);
      const reports = log.join('').split('\n').filter((l) => l.startsWith('{')).map((l) => JSON.parse(l) as { routed: number; forwarded: number });
      expect(reports).toHaveLength(2);
      // The group shared the work, and rows did move between tasks (forwarded: stitched profiles).
      expect(reports.every((r) => r.routed > 0)).toBe(true);
      expect(reports.reduce((n, r) => n + r.forwarded, 0)).toBeGreaterThan(0);

      // Nothing rejected: no dead letter at all (every record is a valid event, each once).
      const dead = await readTopic(mock.bootstrap, 'dead-scale', 2_000, 30_000);
      const reasons: Record<string, number> = {};
      for (const m of dead) {
        const r = crmstream.v1.DeadLetter.decode(m.value!).reason;
        reasons[r] = (reasons[r] ?? 0) + 1;
      }
      expect(reasons).toEqual({});
      // Global KPIs as any instance serves them (every task's published partials, summed).
      const diffs: string[] = [];
      for (const g of ['day', 'week', 'month'] as const) {
        const r = await runCli(['kpis', '--config', config, '--grain', g]);
        expect(r.code, r.out).toBe(0);
        const rows = r.out.split('\n').filter((l) => l.startsWith('{')).map((l) => JSON.parse(l) as KpiRow);
        diffs.push(...compareRows(rows, await oracle.kpis(g, { timeZone: TZ, watermark: maxTs }), ['window', 'channel', 'platform']).map((d) => `kpis/${g}: ${d}`));
      }
      expect(diffs.slice(0, 20)).toEqual([]);
    } finally {
      for (const ch of children) if (ch.exitCode === null && ch.signalCode === null) ch.kill('SIGKILL');
      t.cleanup();
    }
  }, 90_000);
});

/** Until the group has committed every partition of `topics` to its end, twice in a row (bounded). */
async function quiescent(group: string, topics: readonly string[], timeoutMs: number, log: string[]): Promise<void> {
  const c = new Kafka.KafkaConsumer({ 'metadata.broker.list': mock.bootstrap, 'group.id': group, 'enable.auto.commit': false }, {});
  await new Promise<void>((resolve, reject) => c.connect({}, (e) => (e ? reject(e) : resolve())));
  try {
    const deadline = Date.now() + timeoutMs;
    let stable: string | null = null;
    for (;;) {
      const tps = topics.flatMap((topic) => Array.from({ length: P }, (_, partition) => ({ topic, partition })));
      const committed = await new Promise<Kafka.TopicPartitionOffset[]>((resolve, reject) => c.committed(tps, 10_000, (e, r) => (e ? reject(e) : resolve(r))));
      const ends: number[] = [];
      for (const tp of tps) ends.push(await new Promise<number>((resolve, reject) => c.queryWatermarkOffsets(tp.topic, tp.partition, 10_000, (e, w) => (e ? reject(e) : resolve(w.highOffset)))));
      const key = JSON.stringify({ committed: committed.map((x) => Math.max(0, x.offset)), ends });
      if (committed.every((x, i) => Math.max(0, x.offset) === ends[i])) {
        if (stable === key) return;
        stable = key;
      } else stable = null;
      if (Date.now() > deadline) throw new Error(`not quiescent after ${timeoutMs} ms: ${key}\n${log.join('').slice(-3000)}`);
      await new Promise((r) => setTimeout(r, 500));
    }
  } finally {
    await new Promise<void>((resolve) => c.disconnect(() => resolve()));
  }
}
