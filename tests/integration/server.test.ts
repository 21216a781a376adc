import { afterEach, describe, expect, it } from 'vitest';
import WebSocket from 'ws';
import { crmstream } from '../../api/proto/gen/crmstream.js';
import { sha256Hex } from '../../api/auth.js';
import { EngineGate } from '../../api/gate.js';
import { toWire } from '../../api/kpi-hub.js';
import { CrmServer } from '../../api/server.js';
import { TriggerHub } from '../../api/trigger-hub.js';
import { Engine } from '../../engine/engine.js';
import { Rng } from '../../engine/sources/generator.js';
import { DAY, HOUR, tempDir, until } from '../helpers.js';

/**
 * The HTTP + WebSocket server with real clients (`ws`, `fetch`) on 127.0.0.1: trigger delivery
 * (acks, resume, groups, in-flight window, a slow sender), live KPIs against the HTTP and engine
 * answers (late-data corrections included), and the security surface (keys × scopes, sizes,
 * garbage frames and requests). Waits are bounded by deadlines; nothing asserts on timing.
 */

const KEYS = {
  admin: 'k-admin-0123456789', ingest: 'k-ingest-0123456789', triggers: 'k-trig-0123456789', kpis: 'k-kpis-0123456789',
};
const T0 = Date.UTC(2024, 0, 1, 3); // 12:00 KST

interface Ctx {
  engine: Engine;
  server: CrmServer;
  base: string;
  ws: string;
  cleanup: () => Promise<void>;
}

let ctx: Ctx | null = null;
afterEach(async () => {
  await ctx?.cleanup();
  ctx = null;
});

async function start(opts: { maxBufferedBytes?: number; kpiCoalesceMs?: number; campaigns?: boolean; pad?: number; newGroupStart?: 'head' | 'earliest' } = {}): Promise<Ctx> {
  const tmp = tempDir('crm-server-');
  const hub = new TriggerHub({ maxBufferedBytes: opts.maxBufferedBytes ?? 1 << 20, newGroupStart: opts.newGroupStart ?? 'head' });
  const campaigns = opts.campaigns === false ? null : {
    campaigns: [{ id: 'hello', trigger: { event: 'visit' }, promotional: false, action: { template: 't', channels: ['push', 'sms'], params: { pad: 'x'.repeat(opts.pad ?? 200) } } }],
    consent: { unknown: 'allow' },
  };
  const engine = await Engine.create({ dataDir: tmp.dir, time: { timeZone: 'Asia/Seoul' }, checkpoint: { intervalMs: 0 }, campaigns: { definitions: campaigns } }, { sinks: [hub] });
  const gate = new EngineGate(engine);
  // The sender key may use any group here (tests/faults/trigger-access.test.ts checks keys tied to groups).
  const keys = Object.entries(KEYS).map(([scope, key]) => ({ name: scope, sha256: sha256Hex(key), scopes: [scope as 'admin'], ...(scope === 'triggers' ? { groups: ['*'] } : {}) }));
  const server = await CrmServer.start(gate, hub, { port: 0, keys, kpiCoalesceMs: opts.kpiCoalesceMs ?? 50, maxBufferedBytes: opts.maxBufferedBytes, maxBodyBytes: 1 << 20 });
  const c: Ctx = {
    engine, server, base: `http://127.0.0.1:${server.port}`, ws: `ws://127.0.0.1:${server.port}`,
    cleanup: async () => {
      await server.close();
      await gate.run((e) => e.close());
      tmp.cleanup();
    },
  };
  ctx = c;
  return c;
}

const visits = (n: number, from = 0, user = (i: number) => `u${i % 50}`) =>
  Array.from({ length: n }, (_, k) => ({ event_id: `v${from + k}`, type: 'visit', user_id: user(from + k), ts: T0 + (from + k) * 1000 }));

async function post(c: Ctx, events: unknown, key = KEYS.ingest): Promise<{ accepted: number; rejected: number; results: string[] }> {
  const r = await fetch(`${c.base}/v1/events`, { method: 'POST', headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json' }, body: JSON.stringify(events) });
  expect(r.status).toBe(200);
  return (await r.json()) as { accepted: number; rejected: number; results: string[] };
}

interface Sender {
  ws: WebSocket;
  seqs: number[];
  ids: string[];
  errors: string[];
  closed: { code: number; reason: string } | null;
}

async function sender(c: Ctx, group: string, o: { maxInFlight?: number; resumeFrom?: number; json?: boolean } = {}): Promise<Sender> {
  const json = o.json ?? true;
  const ws = new WebSocket(`${c.ws}/v1/triggers?key=${KEYS.triggers}`, json ? 'json' : undefined);
  const s: Sender = { ws, seqs: [], ids: [], errors: [], closed: null };
  ws.on('message', (data, isBinary) => {
    const f = (isBinary ? crmstream.v1.ServerFrame.decode(new Uint8Array(data as Buffer)) : JSON.parse(String(data))) as crmstream.v1.IServerFrame;
    if (f.trigger != null) {
      s.seqs.push(Number(f.trigger.seq));
      s.ids.push(String(f.trigger.trigger_id));
    }
    if (f.error != null) s.errors.push(String(f.error.code));
  });
  ws.on('close', (code, reason) => {
    s.closed = { code, reason: String(reason) };
  });
  await new Promise<void>((resolve, reject) => {
    ws.once('open', () => resolve());
    ws.once('error', reject);
  });
  const sub = { subscribe_triggers: { group, max_in_flight: o.maxInFlight ?? 1000, resume_from: o.resumeFrom ?? 0 } };
  ws.send(json ? JSON.stringify(sub) : crmstream.v1.ClientFrame.encode(sub).finish());
  return s;
}

const ack = (s: Sender, seq: number): void => s.ws.send(JSON.stringify({ ack: { seq } }));

async function closeWs(ws: WebSocket): Promise<void> {
  if (ws.readyState === WebSocket.CLOSED) return;
  await new Promise<void>((resolve) => {
    ws.once('close', () => resolve());
    ws.close();
  });
}

describe('/v1/triggers', () => {
  it('a sender that disconnects gets, after reconnecting, exactly the triggers it had not acked; the window is respected', async () => {
    const c = await start({ newGroupStart: 'earliest' }); // g1 is new and must get the 40 decided before it subscribed
    await post(c, visits(40));
    await c.engine.checkpoint();
    const a = await sender(c, 'g1', { maxInFlight: 5 });
    expect(await until(() => a.seqs.length === 5)).toBe(true);
    await new Promise((r) => setTimeout(r, 200));
    expect(a.seqs.length).toBe(5); // nothing beyond the window without acks
    ack(a, a.seqs[2]!);
    expect(await until(() => a.seqs.length === 8)).toBe(true);
    const acked = a.seqs.slice(0, 3);
    const unacked = a.seqs.slice(3);
    await closeWs(a.ws);
    const b = await sender(c, 'g1', { maxInFlight: 1000 });
    expect(await until(() => b.seqs.length === 37)).toBe(true);
    expect(b.seqs.slice(0, unacked.length)).toEqual(unacked); // re-delivered: the unacked ones, in order
    expect(b.seqs.filter((s) => acked.includes(s))).toEqual([]); // never the acked ones
    expect(new Set([...acked, ...b.seqs]).size).toBe(40);
    await closeWs(b.ws);
  });

  it('two groups each get every trigger; a second connection of a connected group is refused', async () => {
    const c = await start();
    const a = await sender(c, 'kakao');
    const b = await sender(c, 'push', { json: false }); // protobuf frames
    await post(c, visits(30));
    await c.engine.checkpoint();
    expect(await until(() => a.seqs.length === 30 && b.seqs.length === 30)).toBe(true);
    expect(a.ids).toEqual(b.ids);
    const dup = await sender(c, 'kakao');
    expect(await until(() => dup.closed !== null)).toBe(true);
    expect(dup.errors).toEqual(['group_busy']);
    expect(a.closed).toBeNull();
    await closeWs(a.ws);
    await closeWs(b.ws);
  });

  it('a sender that stops reading does not grow the server: sending stops at the buffer bound and resumes', async () => {
    // 8 KB frames: 6000 of them (48 MB) are far more than the loopback's kernel buffers take.
    const c = await start({ maxBufferedBytes: 64 << 10, pad: 8000 });
    const s = await sender(c, 'slow', { maxInFlight: 100_000 });
    await until(() => true, 50);
    // The client stops reading from its TCP socket: the server's send buffer fills.
    (s.ws as unknown as { _socket: { pause(): void; resume(): void } })._socket.pause();
    const total = 6000;
    for (let k = 0; k < total; k += 1000) await post(c, visits(1000, k, (i) => `u${i}`));
    await c.engine.checkpoint();
    await new Promise((r) => setTimeout(r, 500));
    const sentWhilePaused = c.server.triggers.delivered;
    // The kernel buffers and the 64 KiB bound hold a few hundred frames, not 6000.
    expect(sentWhilePaused).toBeLessThan(total / 2);
    (s.ws as unknown as { _socket: { resume(): void } })._socket.resume();
    expect(await until(() => s.seqs.length === total, 20_000)).toBe(true);
    await closeWs(s.ws);
  });
});

describe('/v1/kpis', () => {
  it('a subscriber\'s view equals GET /v1/kpis and the engine, including a late-event correction', async () => {
    const c = await start({ campaigns: false });
    const ws = new WebSocket(`${c.ws}/v1/kpis?key=${KEYS.kpis}`, 'json');
    const view = new Map<string, unknown>();
    let corrections = 0;
    let frames = 0;
    ws.on('message', (data) => {
      const f = JSON.parse(String(data)) as { kpis?: { snapshot: boolean; correction: boolean; rows: { window: string; channel: string; platform: string }[] } };
      if (f.kpis === undefined) return;
      frames++;
      if (f.kpis.snapshot) view.clear();
      if (f.kpis.correction) corrections++;
      for (const r of f.kpis.rows) view.set(`${r.window}|${r.channel}|${r.platform}`, r);
    });
    await new Promise<void>((resolve) => ws.once('open', () => resolve()));
    ws.send(JSON.stringify({ subscribe_kpis: { id: 'all', grain: 'day' } }));
    expect(await until(() => frames >= 1)).toBe(true);
    const rng = new Rng(3);
    const events = [];
    for (let k = 0; k < 300; k++) {
      events.push({ event_id: `e${k}`, type: rng.int(4) === 0 ? 'purchase' : 'visit', user_id: `u${rng.int(40)}`, ts: T0 + k * 10 * 60_000, amount: 100, channel: ['ad', 'kakao'][rng.int(2)], platform: ['web', 'app'][rng.int(2)] });
    }
    events.forEach((e) => e.type !== 'purchase' && delete (e as { amount?: number }).amount);
    await post(c, events);
    // A late purchase on the first day, after the watermark has moved past it (within lateness).
    await post(c, [{ event_id: 'late', type: 'purchase', user_id: 'u999', ts: T0 + HOUR, amount: 5000 }]);
    const http = async (): Promise<Map<string, unknown>> => {
      const r = await fetch(`${c.base}/v1/kpis?grain=day`, { headers: { 'x-api-key': KEYS.kpis } });
      const body = (await r.json()) as { rows: { window: string; channel: string; platform: string }[] };
      return new Map(body.rows.map((x) => [`${x.window}|${x.channel}|${x.platform}`, x]));
    };
    const expected = await http();
    expect(expected.size).toBeGreaterThan(3);
    expect(await until(() => JSON.stringify([...view].sort()) === JSON.stringify([...expected].sort()))).toBe(true);
    expect(corrections).toBeGreaterThan(0);
    // The HTTP answer is the engine's, row for row.
    const direct = new Map((await c.engine.kpis('day')).map(toWire).map((x) => [`${x.window}|${x.channel}|${x.platform}`, x]));
    expect(JSON.stringify([...direct].sort())).toBe(JSON.stringify([...expected].sort()));
    const day1 = [...view.values()].find((r) => (r as { window: string; channel: string; platform: string }).window === '2024-01-01' && (r as { channel: string }).channel === '*' && (r as { platform: string }).platform === '*') as { values: Record<string, number> };
    expect(day1.values['revenue']).toBe(events.filter((e) => e.type === 'purchase' && e.ts < Date.UTC(2023, 11, 31, 15) + DAY).length * 100 + 5000);
    await closeWs(ws);
  });
});

describe('queries', () => {
  it('segment members page by id, also as an Arrow IPC stream; users show segments and recent triggers', async () => {
    const c = await start();
    const t = T0;
    const buys = Array.from({ length: 25 }, (_, i) => ({ event_id: `p${i}`, type: 'purchase', user_id: `b${String(i).padStart(2, '0')}`, ts: t + i * 1000, amount: 500_000 }));
    await post(c, [...buys, ...visits(1, 100)]);
    await c.engine.advanceTo(t + DAY);
    const get = async (path: string, accept = 'application/json') => fetch(`${c.base}${path}`, { headers: { authorization: `Bearer ${KEYS.kpis}`, accept } });
    const seen: string[] = [];
    let after = '';
    for (let page = 0; page < 10; page++) {
      const body = (await (await get(`/v1/segments/vip/members?limit=10&after=${after}`)).json()) as { members: { user_id: string; tier: string }[]; next: string | null };
      seen.push(...body.members.map((m) => m.user_id));
      if (body.next === null) break;
      after = body.next;
    }
    expect(seen).toEqual(buys.map((b) => b.user_id));
    const arrow = await get('/v1/segments/vip/members?limit=100', 'application/vnd.apache.arrow.stream');
    expect(arrow.headers.get('content-type')).toBe('application/vnd.apache.arrow.stream');
    const { tableFromIPC } = await import('apache-arrow');
    const table = tableFromIPC(new Uint8Array(await arrow.arrayBuffer()));
    expect(table.numRows).toBe(25);
    expect(table.getChild('tier')!.get(0)).toBe('silver');
    const user = (await (await get('/v1/users/u0')).json()) as { profile: { events: number }; segments: unknown[]; triggers: { campaign: string }[] };
    expect(user.profile.events).toBe(1);
    expect(user.triggers.map((x) => x.campaign)).toEqual(['hello']);
    expect((await get('/v1/users/nobody')).status).toBe(404);
    expect((await get('/v1/segments/nope/members')).status).toBe(404);
  });
});

describe('segment rules over HTTP', () => {
  it('POST /v1/segments/rules reloads the rules; an invalid document is 400 naming the rule and changes nothing', async () => {
    const c = await start();
    const postRules = (body: unknown, key = KEYS.admin) => fetch(`${c.base}/v1/segments/rules`, { method: 'POST', headers: { authorization: `Bearer ${key}` }, body: JSON.stringify(body) });
    expect((await postRules([], KEYS.kpis)).status).toBe(403);
    const bad = await postRules({ segments: [{ id: 'x', rule: { did: 'visit', within: 'soon' } }] });
    expect(bad.status).toBe(400);
    expect(((await bad.json()) as { message: string }).message).toMatch(/segment 'x' \(#1\): rule\.within/);
    const ok = await postRules({ segments: [{ id: 'visitors', rule: { did: 'visit', within: '7d' } }] });
    expect(ok.status).toBe(200);
    expect(((await ok.json()) as { added: string[] }).added).toEqual(['visitors']);
    const segs = (await (await fetch(`${c.base}/v1/segments`, { headers: { authorization: `Bearer ${KEYS.kpis}` } })).json()) as { segments: { id: string }[] };
    expect(segs.segments.map((x) => x.id)).toContain('visitors');
  });
});

describe('security', () => {
  const ROUTES: [string, string, string][] = [
    ['GET', '/metrics', 'admin'], ['POST', '/v1/events', 'ingest'], ['GET', '/v1/kpis?grain=day', 'kpis'], ['GET', '/v1/cohorts?grain=week', 'kpis'],
    ['GET', '/v1/funnel?grain=week', 'kpis'], ['GET', '/v1/users/u1', 'kpis'], ['GET', '/v1/segments', 'kpis'], ['GET', '/v1/segments/vip/sizes', 'kpis'],
    ['GET', '/v1/segments/vip/members', 'kpis'], ['GET', '/v1/campaigns', 'kpis'], ['GET', '/v1/campaigns/hello/results', 'kpis'],
    ['POST', '/v1/segments/rules', 'admin'],
  ];

  it('every endpoint refuses no key, a wrong key (401) and a key without its scope (403); /healthz is open', async () => {
    const c = await start();
    await post(c, visits(3));
    for (const [method, route, scope] of ROUTES) {
      const call = (headers: Record<string, string>) => fetch(`${c.base}${route}`, { method, headers, body: method === 'POST' ? '[]' : undefined });
      expect((await call({})).status, `${route} no key`).toBe(401);
      expect((await call({ authorization: 'Bearer nope' })).status, `${route} wrong key`).toBe(401);
      const other = scope === 'kpis' ? KEYS.ingest : KEYS.kpis;
      expect((await call({ authorization: `Bearer ${other}` })).status, `${route} wrong scope`).toBe(403);
      const right = (KEYS as Record<string, string>)[scope]!;
      expect((await call({ authorization: `Bearer ${right}` })).status, `${route} right key`).toBe(200);
      expect((await call({ authorization: `Bearer ${KEYS.admin}` })).status, `${route} admin`).toBe(200);
    }
    for (const [path, scope] of [['/v1/triggers', 'triggers'], ['/v1/kpis', 'kpis']] as const) {
      for (const key of ['', 'nope', scope === 'kpis' ? KEYS.triggers : KEYS.kpis]) {
        const ws = new WebSocket(`${c.ws}${path}${key === '' ? '' : `?key=${key}`}`);
        const status = await new Promise<number>((resolve) => {
          ws.once('unexpected-response', (_req, res) => resolve(res.statusCode ?? 0));
          ws.once('open', () => resolve(101));
          ws.once('error', () => resolve(-1));
        });
        expect(status, `${path} key '${key}'`).toBe(key === '' || key === 'nope' ? 401 : 403);
      }
    }
    expect((await fetch(`${c.base}/healthz`)).status).toBe(200);
    const metrics = await (await fetch(`${c.base}/metrics`, { headers: { authorization: `Bearer ${KEYS.admin}` } })).text();
    expect(metrics).toContain('crm_events_rejected_total');
    expect(metrics).not.toContain(KEYS.admin);
  });

  it('an oversized body is 413; bad JSON and bad protobuf are 400; a protobuf EventBatch is ingested', async () => {
    const c = await start();
    const big = '[' + Array.from({ length: 6000 }, (_, i) => JSON.stringify({ event_id: `x${i}`, type: 'visit', user_id: 'u', ts: T0, props: { p: 'y'.repeat(200) } })).join(',') + ']';
    const r = await fetch(`${c.base}/v1/events`, { method: 'POST', headers: { authorization: `Bearer ${KEYS.ingest}` }, body: big });
    expect(r.status).toBe(413);
    expect((await fetch(`${c.base}/v1/events`, { method: 'POST', headers: { authorization: `Bearer ${KEYS.ingest}` }, body: '{nope' })).status).toBe(400);
    expect((await fetch(`${c.base}/v1/events`, { method: 'POST', headers: { authorization: `Bearer ${KEYS.ingest}`, 'content-type': 'application/x-protobuf' }, body: new Uint8Array([0xff, 0xff, 0xff]) })).status).toBe(400);
    const batch = crmstream.v1.EventBatch.encode({ events: [{ event_id: 'p1', type: 'visit', user_id: 'u1', ts: T0 }, { event_id: '', type: 'visit', user_id: 'u1', ts: T0 }] }).finish();
    const ok = await fetch(`${c.base}/v1/events`, { method: 'POST', headers: { authorization: `Bearer ${KEYS.ingest}`, 'content-type': 'application/x-protobuf' }, body: batch });
    expect(await ok.json()).toEqual({ accepted: 1, rejected: 1, results: ['', 'missing_id'], durable: true });
  });

  it('garbage frames close only their socket (1008 bad_frame); 1,000 random malformed requests do not crash the server', async () => {
    const c = await start();
    const good = await sender(c, 'steady');
    const bad = new WebSocket(`${c.ws}/v1/triggers?key=${KEYS.triggers}`);
    const closed = new Promise<{ code: number; reason: string }>((resolve) => bad.once('close', (code, reason) => resolve({ code, reason: String(reason) })));
    await new Promise<void>((resolve) => bad.once('open', () => resolve()));
    bad.send(Buffer.from([0x0a, 0xff, 0xff, 0xff, 0x01]));
    expect(await closed).toEqual({ code: 1008, reason: 'bad_frame' });
    const rng = new Rng(77);
    const junk = (n: number): string => Array.from({ length: n }, () => String.fromCharCode(rng.int(0x2fff))).join('');
    const paths = ['/v1/events', '/v1/kpis', '/v1/users/%ff%fe', '/v1/segments/../x', '/metrics', '/v1/campaigns/x/results', `/${junk(5)}`, '/v1/kpis?grain=' + junk(3)];
    for (let k = 0; k < 1000; k++) {
      const method = ['GET', 'POST', 'PUT', 'DELETE'][rng.int(4)]!;
      const key = [KEYS.admin, KEYS.ingest, '', junk(8)][rng.int(4)]!;
      const headers: Record<string, string> = { 'content-type': ['application/json', 'application/x-protobuf', 'text/plain'][rng.int(3)]! };
      if (key !== '') headers['authorization'] = `Bearer ${encodeURIComponent(key)}`;
      const body = method === 'GET' ? undefined : rng.int(2) === 0 ? junk(rng.int(300)) : Buffer.from(Array.from({ length: rng.int(300) }, () => rng.int(256)));
      const r = await fetch(`${c.base}${paths[rng.int(paths.length)]}`, { method, headers, body });
      expect(r.status).toBeLessThan(500);
      await r.arrayBuffer();
    }
    expect((await fetch(`${c.base}/healthz`)).status).toBe(200);
    expect(good.closed).toBeNull();
    await closeWs(good.ws);
  }, 60_000);
});
