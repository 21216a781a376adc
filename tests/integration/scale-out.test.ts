import { spawn, type ChildProcess } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import path from 'node:path';
import Kafka from 'node-rdkafka';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { crmstream } from '../../api/proto/gen/crmstream.js';
import { EventColumns } from '../../engine/batch.js';
import { appendProtoEvent } from '../../engine/codec.js';
import { Engine, mergeKpis } from '../../engine/engine.js';
import { SharedProducer, openChangelogStore } from '../../engine/kafka/changelog.js';
import { MockCluster } from '../../engine/kafka/mock-cluster.js';
import { Topic } from '../../engine/outbox.js';
import { partitionRouter } from '../../engine/routing.js';
import { TrafficGenerator, encodeProto, isBad, type GenEvent } from '../../engine/sources/generator.js';
import type { KpiRow } from '../../operators/kpi-rows.js';
import { BUILTIN_SEGMENTS } from '../../operators/segment-rules.js';
import { LevelStore } from '../../state/level.js';
import { compareRows } from '../oracle/compare.js';
import { KpiOracle, type OracleEvent } from '../oracle/kpi-oracle.js';
import { engineMembership, membershipDiff, type Membership } from '../oracle/membership.js';
import { SegmentOracle } from '../oracle/segment-oracle.js';
import { DAY, PROJECT_ROOT, tempDir, exited } from '../helpers.js';
import { produceAll, readTopic } from '../kafka-helpers.js';

/**
 * Scale-out through the consumer group (docs/KAFKA.md "Several instances"): `crmstream run`
 * processes with kafka.scaleOut on a 6-partition events topic, the mock cluster in its own process.
 * Two instances start; one is SIGKILLed mid-stream, the rest of the stream arrives, a third joins.
 * Then every task's state is restored from the changelog topic alone (fresh local copies) and
 * merged: KPIs equal the DuckDB oracle, segment memberships equal the segment oracle, and the
 * trigger ids on the triggers topic equal those of one engine over the same events.
 */

const CLI = path.join(PROJECT_ROOT, 'dist/api/cli.js');
const TZ = 'Asia/Seoul';
const N = 12_000;
const P = 6;
const CAMPAIGNS = {
  campaigns: [
    { id: 'welcome', trigger: { event: 'sign_up' }, action: { template: 'welcome', channels: ['push'] } },
    { id: 'winback', trigger: { segment: 'dormant_30', on: 'enter' }, action: { template: 'winback', channels: ['push'] } },
  ],
  consent: { unknown: 'allow' },
};
const ENGINE_CFG = { time: { timeZone: TZ }, campaigns: { definitions: CAMPAIGNS } };

let mock: MockCluster;
let kpiOracle: KpiOracle;
let segOracle: SegmentOracle;
const part1: { key: string; value: Buffer }[] = [];
const part2: { key: string; value: Buffer }[] = [];
const accepted: OracleEvent[] = [];
let maxTs = 0;
/** One engine over every event in production order, advanced as the group will be. */
let referenceTriggers: string[] = [];
let referenceMembers: Membership;
let referenceAccepted = 0;

async function connected<T extends { connect: (o: object, cb: (e: unknown) => void) => unknown }>(c: T): Promise<T> {
  await new Promise<void>((resolve, reject) => c.connect({}, (e) => (e ? reject(e as Error) : resolve())));
  return c;
}

/** Per topic: the group's committed offsets and the high watermarks, partitions 0..P-1. */
async function progress(group: string, topics: readonly string[]): Promise<{ committed: number[]; end: number[] }> {
  const c = await connected(new Kafka.KafkaConsumer({ 'metadata.broker.list': mock.bootstrap, 'group.id': group, 'enable.auto.commit': false }, {}));
  try {
    const tps = topics.flatMap((topic) => Array.from({ length: P }, (_, partition) => ({ topic, partition })));
    const committed = await new Promise<Kafka.TopicPartitionOffset[]>((resolve, reject) => c.committed(tps, 10_000, (e, r) => (e ? reject(e) : resolve(r))));
    const end: number[] = [];
    for (const tp of tps) end.push(await new Promise<number>((resolve, reject) => c.queryWatermarkOffsets(tp.topic, tp.partition, 10_000, (e, w) => (e ? reject(e) : resolve(w.highOffset)))));
    return { committed: committed.map((t) => Math.max(0, t.offset)), end };
  } finally {
    await new Promise<void>((resolve) => c.disconnect(() => resolve()));
  }
}

/** Until the group has committed everything on both topics, twice in a row (bounded). */
async function quiescent(group: string, route: string, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  let stableSince: string | null = null;
  for (;;) {
    const p = await progress(group, ['events', route]);
    const key = JSON.stringify(p);
    if (p.committed.every((c, i) => c === p.end[i])) {
      if (stableSince === key) return;
      stableSince = key;
    } else stableSince = null;
    if (Date.now() > deadline) throw new Error(`not quiescent after ${timeoutMs} ms: ${key}`);
    await new Promise((r) => setTimeout(r, 1_000));
  }
}

function start(config: string, dataDir: string, log: string[]): ChildProcess {
  const child = spawn(process.execPath, [CLI, 'run', '--config', config, '--data-dir', dataDir], { stdio: ['ignore', 'pipe', 'pipe'] });
  child.stdout!.on('data', (d: Buffer) => log.push(d.toString()));
  child.stderr!.on('data', (d: Buffer) => log.push(d.toString()));
  return child;
}

function runCli(args: string[]): Promise<{ code: number | null; out: string }> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [CLI, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    child.stdout.on('data', (d: Buffer) => (out += d.toString()));
    child.stderr.on('data', (d: Buffer) => (out += d.toString()));
    void exited(child, 60_000).then((code) => resolve({ code, out }));
  });
}

beforeAll(async () => {
  mock = await MockCluster.start({ brokers: 3 });
  for (const t of ['events', 'route', 'changelog', 'partials']) await mock.createTopic(t, P);
  await mock.createTopic('triggers', 3);
  kpiOracle = await KpiOracle.create();
  segOracle = await SegmentOracle.create();
  // Many anonymous visitors who sign up later: stitches across partitions, so profiles move.
  const gen = new TrafficGenerator({ seed: 23, users: 2_500, eventsPerSecond: 0.15, badRate: 0.004, duplicateRate: 0.01, lateRate: 0.02, maxLateMs: 86_400_000 });
  const seen = new Set<string>();
  const reference = await Engine.create(ENGINE_CFG);
  reference.onOutput((r) => {
    if (r.topic === Topic.trigger) referenceTriggers.push(crmstream.v1.Trigger.decode(r.payload).trigger_id);
  });
  for (let i = 0; i < N; i++) {
    const r = gen.nextRecord();
    const target = i < N / 2 ? part1 : part2;
    if (isBad(r)) {
      target.push({ key: `bad-${i}`, value: Buffer.from(r.proto) });
      continue;
    }
    const e: GenEvent = r;
    const value = Buffer.from(encodeProto(e));
    target.push({ key: e.user_id || e.anonymous_id, value });
    if (seen.has(e.event_id)) continue;
    seen.add(e.event_id);
    maxTs = Math.max(maxTs, e.ts);
    accepted.push({ event_id: e.event_id, type: e.type, user_id: e.user_id, anonymous_id: e.anonymous_id, ts: e.ts, amount: e.amount === 0 ? Number.NaN : e.amount, channel: e.channel, platform: e.platform });
  }
  // The same bytes through the same decoder, in production order.
  const all = [...part1, ...part2];
  for (let i = 0; i < all.length; i += 1000) {
    const batch = new EventColumns(1000);
    all.slice(i, i + 1000).forEach((r, j) => appendProtoEvent(batch, r.value, `ref@${i + j}`));
    await reference.ingestColumns(batch);
  }
  // Past the stream by 31 days: every dormant_30 entry (and its winback trigger) fires.
  await reference.advanceTo(maxTs + 31 * DAY);
  await reference.checkpoint();
  referenceTriggers = [...new Set(referenceTriggers)].sort();
  referenceMembers = await engineMembership(reference);
  referenceAccepted = Number(reference.stats()['accepted']);
  await reference.close();
  await kpiOracle.load(accepted);
  await segOracle.load(accepted);
}, 180_000);

afterAll(async () => {
  await kpiOracle?.close();
  await segOracle?.close();
  await mock?.stop();
});

describe('scale-out across instances of one consumer group', () => {
  it('two instances, one SIGKILLed mid-stream, a third joins: KPIs, memberships and triggers equal one engine and the oracles', async () => {
    const t = tempDir('crm-scale-');
    const log: string[] = [];
    const children: ChildProcess[] = [];
    try {
      const config = path.join(t.dir, 'run.json');
      writeFileSync(config, JSON.stringify({
        ...ENGINE_CFG,
        checkpoint: { intervalMs: 200 },
        kafka: {
          brokers: mock.bootstrap, groupId: 'scale', topics: { events: 'events', triggers: 'triggers' }, maxBatch: 500,
          scaleOut: { routeTopic: 'route', changelogTopic: 'changelog', partialsTopic: 'partials', hintMs: 200, partialsMs: 500 },
          consumer: { 'session.timeout.ms': 6_000, 'heartbeat.interval.ms': 500 },
        },
      }));
      await produceAll(mock.bootstrap, 'events', part1);
      const a = start(config, path.join(t.dir, 'a'), log);
      const b = start(config, path.join(t.dir, 'b'), log);
      children.push(a, b);
      // Mid-stream: both have committed some of the route topic (their tasks run), not all of it.
      const deadline = Date.now() + 90_000;
      for (;;) {
        const p = await progress('scale', ['route']);
        if (p.committed.filter((c) => c > 0).length >= 4) break;
        if (Date.now() > deadline) throw new Error(`no progress: ${log.join('')}`);
        await new Promise((r) => setTimeout(r, 200));
      }
      a.kill('SIGKILL');
      await exited(a, 10_000);
      await produceAll(mock.bootstrap, 'events', part2);
      const c = start(config, path.join(t.dir, 'c'), log);
      children.push(c);
      await quiescent('scale', 'route', 150_000);
      // Every record of the route topic once more, headers and all: what a stage-0 restart or a
      // task's outbox re-fed after a restore sends. Each must be recognised and skipped.
      const copies = (await readTopic(mock.bootstrap, 'route', 2_000)).filter((m) => m.headers?.some((h) => h['crmstream-src'] !== undefined));
      expect(copies.length).toBeGreaterThan(N);
      const again = await connected(new Kafka.Producer({ 'metadata.broker.list': mock.bootstrap, 'linger.ms': 5, 'enable.idempotence': true }));
      again.setPollInterval(10);
      for (const m of copies) again.produce('route', m.partition, m.value, m.key, Date.now(), undefined, m.headers);
      await new Promise<void>((resolve, reject) => again.flush(30_000, (e) => (e ? reject(e) : resolve())));
      await new Promise<void>((resolve) => again.disconnect(() => resolve()));
      await quiescent('scale', 'route', 60_000);
      const adv = await runCli(['advance', '--config', config, '--to', new Date(maxTs + 31 * DAY).toISOString()]);
      expect(adv.code, adv.out).toBe(0);
      await quiescent('scale', 'route', 60_000);
      b.kill('SIGTERM');
      c.kill('SIGTERM');
      expect(await exited(b, 60_000), log.join('')).toBe(0);
      expect(await exited(c, 60_000), log.join('')).toBe(0);

      // The run really was spread out and disturbed: A's tasks were restored elsewhere from the
      // changelog, and records re-sent after the kill were recognised and skipped.
      type Report = { processed: number; forwarded: number; moved_in: number; duplicates_skipped: number; restores: { units: number; current: boolean }[] };
      const reports = log.join('').split('\n').filter((l) => l.startsWith('{')).map((l) => JSON.parse(l) as Report);
      const sum = (k: 'processed' | 'forwarded' | 'moved_in' | 'duplicates_skipped'): number => reports.reduce((s, r) => s + r[k], 0);
      const seen = JSON.stringify(reports.map((r) => ({ ...r, restores: r.restores.filter((x) => !x.current).length })));
      expect(reports, seen).toHaveLength(2);
      expect(reports.every((r) => r.processed > 0), seen).toBe(true);
      expect(reports.flatMap((r) => r.restores).filter((x) => !x.current && x.units > 0).length, seen).toBeGreaterThan(0);
      expect(sum('forwarded'), seen).toBeGreaterThan(0);
      expect(sum('moved_in'), seen).toBeGreaterThan(0);
      expect(sum('duplicates_skipped'), seen).toBeGreaterThanOrEqual(copies.length);

      // Triggers: the same decisions as one engine (the topic may hold some twice: at-least-once).
      const triggers = await readTopic(mock.bootstrap, 'triggers', 3_000);
      expect([...new Set(triggers.map((m) => crmstream.v1.Trigger.decode(m.value!).trigger_id))].sort()).toEqual(referenceTriggers);

      // State: every task restored from the changelog alone, into fresh local copies.
      const producer = await SharedProducer.connect(mock.bootstrap, 'verify');
      const engines: Engine[] = [];
      try {
        for (let p = 0; p < P; p++) {
          const dir = path.join(t.dir, 'verify', String(p));
          const { store, restored } = await openChangelogStore(new LevelStore(path.join(dir, 'state')), producer, { brokers: mock.bootstrap, topic: 'changelog', partition: p });
          expect(restored.current).toBe(false);
          engines.push(await Engine.create({ ...ENGINE_CFG, dataDir: dir }, { store, router: partitionRouter(p, P), sinks: [] }));
        }
        const wm = maxTs + 31 * DAY;
        for (const e of engines) expect(e.watermark).toBe(wm);
        expect(engines.reduce((s, e) => s + Number(e.stats()['accepted']), 0)).toBe(referenceAccepted);
        const global = mergeKpis(ENGINE_CFG, await Promise.all(engines.map((e) => e.kpiPartials())));
        const opts = { timeZone: TZ, watermark: wm };
        const diffs: string[] = [];
        for (const g of ['day', 'week', 'month'] as const) {
          diffs.push(...compareRows(await global.kpis(g), await kpiOracle.kpis(g, opts), ['window', 'channel', 'platform']).map((d) => `kpis/${g}: ${d}`));
        }
        diffs.push(...compareRows(await global.cohorts('week', 'first_activity'), await kpiOracle.cohorts('week', 'first_activity', opts), ['cohort', 'channel', 'platform', 'age']).map((d) => `cohorts: ${d}`));
        // What any instance (or any machine with the config) serves: the tasks' published partials, summed.
        for (const g of ['day', 'month'] as const) {
          const r = await runCli(['kpis', '--config', config, '--grain', g]);
          expect(r.code, r.out).toBe(0);
          const rows = r.out.split('\n').filter((l) => l.startsWith('{')).map((l) => JSON.parse(l) as KpiRow);
          diffs.push(...compareRows(rows, await kpiOracle.kpis(g, opts), ['window', 'channel', 'platform']).map((d) => `crmstream kpis/${g}: ${d}`));
        }
        expect(diffs).toEqual([]);
        const members: Membership = new Map();
        for (const e of engines) {
          for (const [id, m] of await engineMembership(e)) {
            const into = members.get(id) ?? new Map<string, string>();
            for (const [u, tier] of m) {
              expect(into.has(u), `${u} in ${id} of two partitions`).toBe(false);
              into.set(u, tier);
            }
            members.set(id, into);
          }
        }
        expect(membershipDiff(members, await segOracle.members(BUILTIN_SEGMENTS, wm, TZ), 'scale-out vs oracle')).toEqual([]);
        expect(membershipDiff(members, referenceMembers, 'scale-out vs one engine')).toEqual([]);
      } finally {
        for (const e of engines) await e.close();
        await producer.close();
      }
    } finally {
      for (const ch of children) if (ch.exitCode === null && ch.signalCode === null) ch.kill('SIGKILL');
      t.cleanup();
    }
  }, 480_000);
});
