import { afterEach, describe, expect, it } from 'vitest';
import WebSocket from 'ws';
import { sha256Hex } from '../../api/auth.js';
import { parseRunConfig } from '../../api/run.js';
import { EngineGate } from '../../api/gate.js';
import { CrmServer, type ServerOptions } from '../../api/server.js';
import { TriggerHub } from '../../api/trigger-hub.js';
import { Engine } from '../../engine/engine.js';
import { Topic, type OutboxRecord, type OutboxSink } from '../../engine/outbox.js';
import { MemoryStore } from '../../state/memory.js';
import { FaultStore } from './fault-store.js';

/**
 * Issue 17 item 9: health tells. `/livez` answers while the process runs; `/readyz` (and its
 * older name `/healthz`) is 503 with a JSON body naming each failing check when the engine cannot
 * take and durably acknowledge events: failed closed, checkpoints failing, a sink stuck, or a
 * check a host adds (Kafka lag in `crmstream run`) — and 200 again once a transient failure is
 * over. Store failures come from the fault-injecting store, sink failures from a sink that refuses
 * while told to. Real server, real HTTP on 127.0.0.1; waits are bounded polls, never timings.
 */

const KEY = 'k-admin-0123456789';
const T0 = Date.UTC(2024, 0, 1, 3);
const CAMPAIGNS = { campaigns: [{ id: 'hello', trigger: { event: 'visit' }, promotional: false, action: { template: 't', channels: ['push'] } }], consent: { unknown: 'allow' } };

interface Probe {
  status: number;
  body: { ok: boolean; failing: { check: string; message: string }[] };
}

/** An outbox sink for the trigger topic that throws while `broken` (a sender system that is down). */
class FaultySink implements OutboxSink {
  readonly name = 'faulty';
  readonly topics = [Topic.trigger];
  broken = false;
  delivered = 0;
  async open(): Promise<void> {}
  async deliver(records: readonly OutboxRecord[]): Promise<void> {
    if (this.broken) throw new Error('the sender system is down');
    this.delivered += records.length;
  }
  async close(): Promise<void> {}
}

interface Ctx {
  hub: TriggerHub;
  port: number;
  engine: Engine;
  gate: EngineGate;
  store: FaultStore;
  sink: FaultySink;
  base: string;
}

let cleanup: (() => Promise<void>) | null = null;
afterEach(async () => {
  await cleanup?.();
  cleanup = null;
});

async function start(checkpoint: Record<string, number>, server: Partial<ServerOptions> = {}, triggerRetention?: number): Promise<Ctx> {
  const store = new FaultStore(new MemoryStore());
  const sink = new FaultySink();
  const hub = triggerRetention === undefined ? new TriggerHub() : new TriggerHub({ triggerRetention });
  const engine = await Engine.create({ time: { timeZone: 'Asia/Seoul' }, checkpoint, campaigns: { definitions: CAMPAIGNS } }, { store, sinks: [hub, sink] });
  const gate = new EngineGate(engine);
  const s = await CrmServer.start(gate, hub, { port: 0, keys: [{ name: 'admin', sha256: sha256Hex(KEY), scopes: ['admin'] }], ...server });
  cleanup = async () => {
    store.heal();
    sink.broken = false;
    await s.close();
    await gate.run((e) => e.close()).catch(() => undefined); // a failed-closed engine's close reports the failure
  };
  return { hub, port: s.port, engine, gate, store, sink, base: `http://127.0.0.1:${s.port}` };
}

async function probe(c: Ctx, path: string): Promise<Probe> {
  const r = await fetch(`${c.base}${path}`);
  return { status: r.status, body: (await r.json()) as Probe['body'] };
}

const checks = (p: Probe): string[] => (p.body.failing ?? []).map((f) => f.check);

/** Polls /readyz until `cond` holds (bounded: 15 s); returns the last answer for the assertions. */
async function readyzUntil(c: Ctx, cond: (p: Probe) => boolean): Promise<Probe> {
  let p = await probe(c, '/readyz');
  for (let i = 0; i < 300 && !cond(p); i++) {
    await new Promise((r) => setTimeout(r, 50));
    p = await probe(c, '/readyz');
  }
  return p;
}

async function metric(c: Ctx, line: string): Promise<boolean> {
  const text = await (await fetch(`${c.base}/metrics`, { headers: { authorization: `Bearer ${KEY}` } })).text();
  return text.split('\n').includes(line);
}

const visits = (n: number, from = 0) => Array.from({ length: n }, (_, k) => ({ event_id: `v${from + k}`, type: 'visit', user_id: `u${(from + k) % 5}`, ts: T0 + (from + k) * 1000 }));

describe('/livez, /readyz, /healthz', () => {
  it('a healthy engine: all 200, no failing check, no key needed', async () => {
    const c = await start({ intervalMs: 0 });
    await c.gate.run((e) => e.ingest(visits(5)));
    expect((await probe(c, '/livez')).status).toBe(200);
    const ready = await probe(c, '/readyz');
    expect(ready).toMatchObject({ status: 200, body: { ok: true, failing: [] } });
    expect((await probe(c, '/healthz')).status).toBe(200);
    expect(await metric(c, 'crm_engine_failed 0')).toBe(true);
  });

  it('after the engine fails closed (its checkpoint write failed past its retries): /readyz and /healthz are 503 naming engine_failed; /livez stays 200', async () => {
    const c = await start({ intervalMs: 0, retries: 0, retryBackoffMs: 0 });
    expect((await probe(c, '/readyz')).status).toBe(200);
    c.store.failNext(1); // the next checkpoint write fails (ENOSPC); with no retries the engine fails closed
    const r = await fetch(`${c.base}/v1/events`, { method: 'POST', headers: { authorization: `Bearer ${KEY}`, 'content-type': 'application/json' }, body: JSON.stringify(visits(3)) });
    expect(r.status).toBe(503);
    c.store.heal(); // the disk has room again: a failed-closed engine stays failed until restarted
    for (const path of ['/readyz', '/healthz']) {
      const p = await probe(c, path);
      expect(p.status, path).toBe(503);
      expect(p.body.ok, path).toBe(false);
      expect(checks(p), path).toContain('engine_failed');
    }
    expect((await probe(c, '/livez')).status).toBe(200);
    expect(await metric(c, 'crm_engine_failed 1')).toBe(true);
    expect(await metric(c, 'crm_checkpoint_failures_total 1')).toBe(true);
  });

  it('while checkpoints fail and are retried: 503 naming checkpoint; ready again once one succeeds', async () => {
    const c = await start({ intervalMs: 3_600_000, retries: 5, retryBackoffMs: 1_000 });
    await c.gate.run((e) => e.ingest(visits(5)));
    c.store.failNext(1);
    const checkpoint = c.gate.run((e) => e.checkpoint());
    const during = await readyzUntil(c, (p) => p.status === 503);
    expect(during.status).toBe(503);
    expect(checks(during)).toContain('checkpoint');
    expect(checks(during)).not.toContain('engine_failed');
    await checkpoint; // the retry after the backoff succeeds
    const after = await probe(c, '/readyz');
    expect(after).toMatchObject({ status: 200, body: { ok: true, failing: [] } });
  });

  it('a sink failing longer than maxSinkFailingMs: 503 naming sink:<name>, with metrics; ready again once it delivers', async () => {
    const c = await start({ intervalMs: 0 }, { maxSinkFailingMs: 0 });
    c.sink.broken = true;
    await c.gate.run((e) => e.ingest(visits(5))); // triggers for the sink, which refuses them
    const stuck = await readyzUntil(c, (p) => checks(p).includes('sink:faulty'));
    expect(stuck.status).toBe(503);
    expect(checks(stuck)).toEqual(['sink:faulty']);
    expect(await metric(c, 'crm_sink_failing{sink="faulty"} 1')).toBe(true);
    c.sink.broken = false; // the outbox retries it on its backoff
    const back = await readyzUntil(c, (p) => p.status === 200);
    expect(back).toMatchObject({ status: 200, body: { ok: true, failing: [] } });
    expect(c.sink.delivered).toBe(5);
    expect(await metric(c, 'crm_sink_failing{sink="faulty"} 0')).toBe(true);
  });

  it('a retention trim that skipped a sender group\'s unacked triggers: 503 naming trigger_gap for triggerGapHoldMs', async () => {
    const c = await start({ intervalMs: 0 }, { triggerGapHoldMs: 3_600_000 }, 5);
    // The group 'away' subscribes (its cursor is now known), then goes away without acking.
    const ws = new WebSocket(`ws://127.0.0.1:${c.port}/v1/triggers`, 'json', { headers: { authorization: `Bearer ${KEY}` } });
    await new Promise<void>((resolve, reject) => {
      ws.on('open', () => ws.send(JSON.stringify({ subscribe_triggers: { group: 'away' } })));
      ws.on('message', (m) => {
        if ('subscribed' in (JSON.parse(String(m)) as object)) resolve();
      });
      ws.on('error', reject);
    });
    await new Promise<void>((resolve) => {
      ws.once('close', () => resolve());
      ws.close();
    });
    await c.gate.run((e) => e.ingest(visits(20)));
    await c.hub.trim(); // keeps 5 of the 20 (the server's own 2 s trim may have done it already): 'away' never got the rest
    const p = await probe(c, '/readyz');
    expect(p.status).toBe(503);
    expect(checks(p)).toEqual(['trigger_gap']);
  });

  it('crmstream run\'s config takes the readiness bounds (server.maxKafkaLag default 100,000; null = no bound)', () => {
    const key = { name: 'admin', sha256: sha256Hex(KEY), scopes: ['admin'] };
    const dflt = parseRunConfig({ kafka: { brokers: '127.0.0.1:9092' }, server: { port: 0, keys: [key] } }, 'test');
    expect(dflt.server).toMatchObject({ maxKafkaLag: 100_000 });
    const set = parseRunConfig({ kafka: { brokers: '127.0.0.1:9092' }, server: { port: 0, keys: [key], maxKafkaLag: null, maxSinkFailingMs: 5_000, triggerGapHoldMs: 0 } }, 'test');
    expect(set.server).toMatchObject({ maxKafkaLag: null, maxSinkFailingMs: 5_000, triggerGapHoldMs: 0 });
  });

  it('checks a host adds (ServerOptions.readiness, as `run` adds Kafka lag) are named; a check that throws counts as failing', async () => {
    let lag = 0;
    const c = await start({ intervalMs: 0 }, {
      readiness: () => {
        if (lag < 0) throw new Error('no figures');
        return lag > 10 ? [{ check: 'kafka_lag', message: `lag ${lag}` }] : [];
      },
    });
    expect((await probe(c, '/readyz')).status).toBe(200);
    lag = 11;
    const behind = await probe(c, '/readyz');
    expect(behind.status).toBe(503);
    expect(behind.body.failing).toEqual([{ check: 'kafka_lag', message: 'lag 11' }]);
    lag = -1;
    expect(checks(await probe(c, '/readyz'))).toEqual(['readiness_hook']);
    lag = 0;
    expect((await probe(c, '/readyz')).status).toBe(200);
  });
});
