import { spawn, spawnSync } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import path from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import WebSocket from 'ws';
import { sha256Hex } from '../../api/auth.js';
import { EngineGate } from '../../api/gate.js';
import { CrmServer } from '../../api/server.js';
import { TriggerHub } from '../../api/trigger-hub.js';
import { Engine } from '../../engine/engine.js';
import { MockCluster } from '../../engine/kafka/mock-cluster.js';
import { TrafficGenerator, encodeProto, isBad } from '../../engine/sources/generator.js';
import { PROJECT_ROOT, tempDir } from '../helpers.js';
import { produceAll } from '../kafka-helpers.js';

/**
 * Issue 17 "Metrics an operator can alert on": `promtool check metrics` (Debian's `prometheus`
 * package; .ci/run installs it) accepts the live /metrics body — counters typed as counters,
 * durations in seconds, no abbreviated units — of the server with traffic, and of `crmstream run`
 * on Kafka (the librdkafka mock cluster) with its crm_kafka_* metrics. Skipped, with a message,
 * where promtool is not installed.
 */

const PROMTOOL = ['/usr/bin/promtool', '/usr/local/bin/promtool'].find((p) => spawnSync(p, ['--version']).status === 0) ?? null;
if (PROMTOOL === null) console.warn('[metrics-promtool.test] promtool is not installed (apt-get install prometheus): skipped');
const CLI = path.join(PROJECT_ROOT, 'dist/api/cli.js');
const KEY = 'k-admin-0123456789';
const T0 = Date.UTC(2024, 0, 1, 3);

/** promtool's verdict on a metrics body: its exit code and what it printed. */
function promtool(body: string): { status: number | null; problems: string } {
  const r = spawnSync(PROMTOOL!, ['check', 'metrics'], { input: body, encoding: 'utf8', timeout: 30_000 });
  return { status: r.status, problems: `${r.stdout}${r.stderr}`.trim() };
}

/** `# TYPE name kind` lines of a body. */
function types(body: string): Map<string, string> {
  const out = new Map<string, string>();
  for (const m of body.matchAll(/^# TYPE (\S+) (\S+)$/gm)) out.set(m[1]!, m[2]!);
  return out;
}

async function metricsOf(base: string): Promise<string> {
  const r = await fetch(`${base}/metrics`, { headers: { authorization: `Bearer ${KEY}` } });
  expect(r.status).toBe(200);
  return r.text();
}

describe.skipIf(PROMTOOL === null)('promtool check metrics over the live /metrics', () => {
  let cleanup: (() => Promise<void>) | null = null;
  afterEach(async () => {
    await cleanup?.();
    cleanup = null;
  });

  it('the server after ingest, rejects, triggers and a sender: no promtool problems; _total metrics are counters; seconds, not ms', async () => {
    const tmp = tempDir('crm-promtool-');
    const hub = new TriggerHub();
    const campaigns = { campaigns: [{ id: 'hello', trigger: { event: 'visit' }, promotional: false, action: { template: 't', channels: ['push'] } }], consent: { unknown: 'allow' } };
    const engine = await Engine.create({ dataDir: tmp.dir, time: { timeZone: 'Asia/Seoul' }, checkpoint: { intervalMs: 0 }, campaigns: { definitions: campaigns } }, { sinks: [hub] });
    const gate = new EngineGate(engine);
    const server = await CrmServer.start(gate, hub, { port: 0, keys: [{ name: 'admin', sha256: sha256Hex(KEY), scopes: ['admin'] }] });
    cleanup = async () => {
      await server.close();
      await gate.run((e) => e.close());
      tmp.cleanup();
    };
    const base = `http://127.0.0.1:${server.port}`;
    // A sender group (subscribed first: a new group starts at the log's head) receives the
    // triggers, so trigger lag, frames and the delivery histogram have values.
    const ws = new WebSocket(`ws://127.0.0.1:${server.port}/v1/triggers`, 'json', { headers: { authorization: `Bearer ${KEY}` } });
    let got = 0;
    let onTrigger = (): void => undefined;
    await new Promise<void>((resolve, reject) => {
      ws.on('open', () => ws.send(JSON.stringify({ subscribe_triggers: { group: 'g', max_in_flight: 100 } })));
      ws.on('message', (m) => {
        const f = JSON.parse(String(m)) as object;
        if ('subscribed' in f) resolve();
        if ('trigger' in f) {
          got++;
          onTrigger();
        }
      });
      ws.on('error', reject);
    });
    const events = Array.from({ length: 40 }, (_, i) => ({ event_id: `v${i}`, type: 'visit', user_id: `u${i % 7}`, ts: T0 + i * 1000 }));
    events.push({ event_id: '', type: 'visit', user_id: 'u1', ts: T0 }); // missing_id: a reject
    const r = await fetch(`${base}/v1/events`, { method: 'POST', headers: { authorization: `Bearer ${KEY}`, 'content-type': 'application/json' }, body: JSON.stringify(events) });
    expect(r.status).toBe(200);
    await new Promise<void>((resolve) => {
      const deadline = setTimeout(resolve, 20_000); // bounded; the count is asserted below
      onTrigger = () => {
        if (got >= 7) {
          clearTimeout(deadline);
          resolve();
        }
      };
      onTrigger();
    });
    ws.close();
    expect(got).toBeGreaterThanOrEqual(7);
    const body = await metricsOf(base);
    const t = types(body);
    for (const name of ['crm_events_accepted_total', 'crm_events_rejected_total', 'crm_triggers_total', 'crm_triggers_sent_total', 'crm_timers_fired_total', 'crm_checkpoint_seconds_total']) {
      expect(t.get(name), name).toBe('counter');
    }
    for (const name of ['crm_checkpoint_last_seconds', 'crm_watermark_delay_seconds']) expect(t.has(name), name).toBe(true);
    expect([...t.keys()].filter((n) => /_ms(_|$)/.test(n))).toEqual([]);
    const verdict = promtool(body);
    expect(verdict.problems).toBe('');
    expect(verdict.status).toBe(0);
  });

  describe('crmstream run on Kafka (the mock cluster)', () => {
    let mock: MockCluster;
    beforeAll(async () => {
      mock = await MockCluster.start({ brokers: 1 });
      await mock.createTopic('events', 2);
      const gen = new TrafficGenerator({ seed: 5, users: 200, eventsPerSecond: 1, badRate: 0 });
      const records: { key: string; value: Buffer }[] = [];
      for (let i = 0; i < 500; i++) {
        const rec = gen.nextRecord();
        if (isBad(rec)) continue;
        records.push({ key: rec.user_id || rec.anonymous_id, value: Buffer.from(encodeProto(rec)) });
      }
      await produceAll(mock.bootstrap, 'events', records);
    }, 60_000);
    afterAll(async () => {
      await mock?.stop();
    });

    it('every crm_kafka_* metric passes promtool; the counters are counters', async () => {
      const tmp = tempDir('crm-promtool-run-');
      const config = path.join(tmp.dir, 'run.json');
      writeFileSync(config, JSON.stringify({
        dataDir: path.join(tmp.dir, 'state'),
        kafka: { brokers: mock.bootstrap, groupId: 'promtool', topics: { events: 'events', triggers: 'triggers-p', deadLetters: 'dead-p' } },
        server: { port: 0, keys: [{ name: 'admin', sha256: sha256Hex(KEY), scopes: ['admin'] }] },
      }));
      const child = spawn(process.execPath, [CLI, 'run', '--config', config], { stdio: ['ignore', 'pipe', 'pipe'] });
      let out = '';
      child.stdout.on('data', (d: Buffer) => (out += d.toString()));
      child.stderr.on('data', (d: Buffer) => (out += d.toString()));
      const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
      cleanup = async () => {
        if (child.exitCode === null) child.kill('SIGKILL');
        await exited;
        tmp.cleanup();
      };
      let port = '';
      let body = '';
      for (let i = 0; i < 600; i++) { // ≤ 60 s: the server starts, then every message is consumed
        port ||= /serving on http:\/\/127\.0\.0\.1:(\d+)/.exec(out)?.[1] ?? '';
        if (port !== '') {
          body = await metricsOf(`http://127.0.0.1:${port}`);
          if (/^crm_kafka_messages_total 500$/m.test(body)) break;
        }
        await new Promise((r) => setTimeout(r, 100));
      }
      expect(body, out).toMatch(/^crm_kafka_messages_total 500$/m);
      const t = types(body);
      for (const name of ['crm_kafka_messages_total', 'crm_kafka_pauses_total', 'crm_kafka_rebalances_total', 'crm_kafka_commits_total', 'crm_kafka_errors_total', 'crm_kafka_produced_total', 'crm_kafka_delivered_total']) {
        expect(t.get(name), name).toBe('counter');
      }
      const verdict = promtool(body);
      expect(verdict.problems).toBe('');
      expect(verdict.status).toBe(0);
      // Caught up (lag 0 ≤ server.maxKafkaLag, default 100,000): ready.
      const ready = await fetch(`http://127.0.0.1:${port}/readyz`);
      expect(await ready.json()).toMatchObject({ ok: true, failing: [] });
      child.kill('SIGTERM');
      expect(await exited, out).toBe(0);
    }, 120_000);
  });
});
