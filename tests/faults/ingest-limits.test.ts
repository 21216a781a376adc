import { afterEach, describe, expect, it } from 'vitest';
import WebSocket from 'ws';
import { sha256Hex } from '../../api/auth.js';
import { EngineGate } from '../../api/gate.js';
import { CrmServer } from '../../api/server.js';
import { TriggerHub } from '../../api/trigger-hub.js';
import { Engine } from '../../engine/engine.js';
import { MemoryStore } from '../../state/memory.js';
import { tempDir } from '../helpers.js';

/**
 * Finding 7 of issue 17: limits and backpressure where input enters. Every case here passed
 * through unchecked before: events per request, the ingest queue, the size of events that arrive
 * as objects (HTTP, library: recorded with size 0, so validation.maxEventBytes never applied),
 * id and name lengths; and reading a segment's members forced a checkpoint per page.
 */

const KEY = 'k-ingest-0123456789';
const ADMIN = 'k-admin-0123456789';
const now = Date.now();
const visit = (k: number, extra: Record<string, unknown> = {}) => ({ event_id: `v${k}`, type: 'visit', user_id: `u${k}`, ts: now - 60_000 + k, ...extra });

const cleanups: (() => Promise<void> | void)[] = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

async function server(opts: { maxEventsPerRequest?: number; maxQueuedEvents?: number; maxSockets?: number; maxSubscriptionsPerSocket?: number } = {}): Promise<{ base: string; gate: EngineGate; engine: Engine }> {
  const tmp = tempDir('crm-limits-');
  const hub = new TriggerHub();
  const engine = await Engine.create({ dataDir: tmp.dir }, { sinks: [hub] });
  const gate = new EngineGate(engine);
  const keys = [{ name: 'ingest', sha256: sha256Hex(KEY), scopes: ['ingest' as const] }, { name: 'admin', sha256: sha256Hex(ADMIN), scopes: ['admin' as const] }];
  const s = await CrmServer.start(gate, hub, { port: 0, keys, ...opts });
  cleanups.push(tmp.cleanup, () => gate.run((e) => e.close()), () => s.close());
  return { base: `http://127.0.0.1:${s.port}`, gate, engine };
}

const post = (base: string, events: unknown[]) => fetch(`${base}/v1/events`, {
  method: 'POST', headers: { authorization: `Bearer ${KEY}`, 'content-type': 'application/json' }, body: JSON.stringify(events),
});

describe('limits and backpressure on ingest', () => {
  it('more events in one request than server.maxEventsPerRequest: 413, nothing taken', async () => {
    const s = await server({ maxEventsPerRequest: 100 });
    const r = await post(s.base, Array.from({ length: 101 }, (_, k) => visit(k)));
    expect(r.status).toBe(413);
    expect(((await r.json()) as { error: string }).error).toBe('too_many_events');
    expect(s.engine.acceptedCount).toBe(0);
    expect((await post(s.base, Array.from({ length: 100 }, (_, k) => visit(k)))).status).toBe(200);
  });

  it('an ingest queue past server.maxQueuedEvents: 503 with Retry-After, and the refused events are not taken', async () => {
    const s = await server({ maxQueuedEvents: 10 });
    // The engine is busy (a long call holds the gate): requests queue up behind it.
    let release!: () => void;
    const held = s.gate.run(() => new Promise<void>((resolve) => (release = resolve)));
    const first = post(s.base, Array.from({ length: 8 }, (_, k) => visit(k)));
    // Bounded wait until the first request is queued behind the held call (the gate's depth shows it).
    for (let i = 0; i < 500 && s.gate.depth < 2; i++) await new Promise((r) => setTimeout(r, 10));
    expect(s.gate.depth).toBe(2);
    const second = await post(s.base, Array.from({ length: 8 }, (_, k) => visit(100 + k)));
    expect(second.status).toBe(503);
    expect(second.headers.get('retry-after')).toBe('1');
    release();
    await held;
    expect((await first).status).toBe(200);
    expect(s.engine.acceptedCount).toBe(8);
    // The same request sent again is accepted, not a duplicate: nothing of it was taken.
    const again = (await (await post(s.base, Array.from({ length: 8 }, (_, k) => visit(100 + k)))).json()) as { accepted: number };
    expect(again.accepted).toBe(8);
  });

  it('objects have a size: an event over validation.maxEventBytes is too_large on the library and HTTP paths', async () => {
    const e = await Engine.create({ validation: { maxEventBytes: 1024 } }, { store: new MemoryStore() });
    const r = await e.ingest([visit(1, { props: { blob: 'x'.repeat(4000) } }), visit(2)]);
    expect(r.reasons).toEqual(['too_large', '']);
    await e.close();
  });

  it('ids and names have a length bound (validation.maxIdLength, maxNameLength): bad_field', async () => {
    const e = await Engine.create({}, { store: new MemoryStore() });
    const r = await e.ingest([
      visit(1, { user_id: 'u'.repeat(300) }), visit(2, { type: 't'.repeat(100) }), visit(3, { channel: 'c'.repeat(100) }), visit(4),
    ]);
    expect(r.reasons).toEqual(['bad_field', 'bad_field', 'bad_field', '']);
    await e.close();
  });

  it('paging through a segment\'s members takes no checkpoint and sees every member', async () => {
    const s = await server();
    // 30 users with a cart and no purchase: cart_abandoners after a day of event time.
    const carts = Array.from({ length: 30 }, (_, k) => ({ event_id: `c${k}`, type: 'add_to_cart', user_id: `m${String(k).padStart(2, '0')}`, ts: now - 3 * 86_400_000 + k }));
    expect((await post(s.base, carts)).status).toBe(200);
    expect((await post(s.base, [visit(999)])).status).toBe(200); // moves the watermark: the abandonment timers fire
    const epoch = () => s.engine.stats()['epoch'];
    const before = epoch();
    const seen: string[] = [];
    let after = '';
    for (let page = 0; page < 20; page++) {
      const r = await fetch(`${s.base}/v1/segments/cart_abandoners/members?limit=7&after=${encodeURIComponent(after)}`, { headers: { authorization: `Bearer ${ADMIN}` } });
      expect(r.status).toBe(200);
      const body = (await r.json()) as { members: { user_id: string }[]; next: string | null };
      seen.push(...body.members.map((m) => m.user_id));
      if (body.next === null) break;
      after = body.next;
    }
    expect(seen).toEqual(carts.map((c) => c.user_id));
    expect(epoch()).toBe(before);
  });

  it('WebSockets are bounded: server.maxSockets (503 on upgrade), server.maxSubscriptionsPerSocket (error frame)', async () => {
    const s = await server({ maxSockets: 2, maxSubscriptionsPerSocket: 3 });
    const open = (): Promise<{ ws: WebSocket | null; status: number }> => new Promise((resolve) => {
      const ws = new WebSocket(`${s.base.replace('http', 'ws')}/v1/kpis`, 'json', { headers: { authorization: `Bearer ${ADMIN}` } });
      ws.once('open', () => resolve({ ws, status: 101 }));
      ws.once('unexpected-response', (_req, res) => resolve({ ws: null, status: res.statusCode ?? 0 }));
      ws.once('error', () => resolve({ ws: null, status: 0 }));
    });
    const a = await open();
    const b = await open();
    const c = await open();
    expect([a.status, b.status, c.status]).toEqual([101, 101, 503]);
    const frames: { subscribed?: unknown; error?: { code: string } }[] = [];
    a.ws!.on('message', (d) => frames.push(JSON.parse(String(d)) as (typeof frames)[number]));
    for (const id of ['k1', 'k2', 'k3', 'k1', 'k4']) a.ws!.send(JSON.stringify({ subscribe_kpis: { id, grain: 'day' } }));
    for (let i = 0; i < 500 && !frames.some((f) => f.error !== undefined); i++) await new Promise((r) => setTimeout(r, 10));
    // k1 again replaces k1 (not a new one); k4 is the fourth distinct id.
    expect(frames.filter((f) => f.subscribed !== undefined).length).toBe(4);
    expect(frames.filter((f) => f.error !== undefined).map((f) => f.error!.code)).toEqual(['too_many_subscriptions']);
    a.ws!.close();
    b.ws!.close();
  });
});
