import { afterEach, describe, expect, it } from 'vitest';
import WebSocket from 'ws';
import { crmstream } from '../../api/proto/gen/crmstream.js';
import { KeyRing, sha256Hex } from '../../api/auth.js';
import { EngineGate } from '../../api/gate.js';
import { parseRunConfig } from '../../api/run.js';
import { CrmServer } from '../../api/server.js';
import { TriggerHub } from '../../api/trigger-hub.js';
import { Engine } from '../../engine/engine.js';
import { isCode } from '../../engine/errors.js';
import { LevelStore } from '../../state/level.js';
import { tempDir, until } from '../helpers.js';

/**
 * Issue 17, items 5, 6 and 11 (keys in the URL): one key cannot read, ack or take another sender's
 * group; groups are bounded; frames are validated; a new group starts at the head; a retention trim
 * that passes a group's cursor says so; the run config takes the documented trigger settings; keys
 * ride in the URL only on WebSocket upgrades. Real server and clients on 127.0.0.1; waits are
 * bounded by deadlines, nothing asserts on timing.
 */

const KEY = { admin: 'k-admin-0123456789', ingest: 'k-ingest-0123456789', kakao: 'k-kakao-0123456789', mallory: 'k-mallory-0123456789', any: 'k-any-0123456789', kpis: 'k-kpis-0123456789' };
const KEYS = [
  { name: 'admin', sha256: sha256Hex(KEY.admin), scopes: ['admin' as const] },
  { name: 'ingest', sha256: sha256Hex(KEY.ingest), scopes: ['ingest' as const] },
  { name: 'kpis', sha256: sha256Hex(KEY.kpis), scopes: ['kpis' as const] },
  { name: 'kakao', sha256: sha256Hex(KEY.kakao), scopes: ['triggers' as const], groups: ['kakao-sender'] },
  { name: 'mallory', sha256: sha256Hex(KEY.mallory), scopes: ['triggers' as const], groups: ['mallory'] },
  { name: 'any', sha256: sha256Hex(KEY.any), scopes: ['triggers' as const], groups: ['*'] },
];
const T0 = Date.UTC(2024, 0, 1, 3);

interface Ctx {
  dir: string;
  engine: Engine;
  gate: EngineGate;
  hub: TriggerHub;
  server: CrmServer;
  base: string;
  ws: string;
  stop: () => Promise<void>;
}

const live: Ctx[] = [];
const dirs: { cleanup: () => void }[] = [];
afterEach(async () => {
  for (const c of live.splice(0)) await c.stop();
  for (const d of dirs.splice(0)) d.cleanup();
});

async function start(hubOpts: Record<string, unknown> = {}, dir?: string): Promise<Ctx> {
  if (dir === undefined) {
    const tmp = tempDir('crm-trigger-access-');
    dirs.push(tmp);
    dir = tmp.dir;
  }
  const hub = new TriggerHub(hubOpts);
  const campaigns = { campaigns: [{ id: 'hello', trigger: { event: 'visit' }, promotional: false, action: { template: 't', channels: ['push'], params: {} } }], consent: { unknown: 'allow' } };
  const engine = await Engine.create({ dataDir: dir, time: { timeZone: 'Asia/Seoul' }, checkpoint: { intervalMs: 0 }, campaigns: { definitions: campaigns } }, { sinks: [hub] });
  const gate = new EngineGate(engine);
  const server = await CrmServer.start(gate, hub, { port: 0, keys: KEYS, kpiCoalesceMs: 50 });
  let stopped = false;
  const c: Ctx = {
    dir, engine, gate, hub, server, base: `http://127.0.0.1:${server.port}`, ws: `ws://127.0.0.1:${server.port}`,
    stop: async () => {
      if (stopped) return;
      stopped = true;
      await server.close();
      await gate.run((e) => e.close());
    },
  };
  live.push(c);
  return c;
}

const visits = (n: number, from = 0) => Array.from({ length: n }, (_, k) => ({ event_id: `v${from + k}`, type: 'visit', user_id: `u${from + k}`, ts: T0 + (from + k) * 1000 }));

/** Ingests and checkpoints (the outbox hands committed triggers to the hub). */
async function post(c: Ctx, events: unknown[]): Promise<void> {
  const r = await fetch(`${c.base}/v1/events`, { method: 'POST', headers: { authorization: `Bearer ${KEY.ingest}`, 'content-type': 'application/json' }, body: JSON.stringify(events) });
  expect(r.status).toBe(200);
  await r.json();
  await c.gate.run((e) => e.checkpoint());
}

interface Sender {
  ws: WebSocket;
  /** Every frame in arrival order: 'subscribed', 'trigger', 'gap', 'error:<code>'. */
  kinds: string[];
  seqs: number[];
  errors: string[];
  gaps: { from: number; to: number; count: number }[];
  subscribed: number | null;
  closed: { code: number; reason: string } | null;
}

async function sender(c: Ctx, key: string, group: string, o: { maxInFlight?: number; json?: boolean } = {}): Promise<Sender> {
  const json = o.json ?? true;
  const ws = new WebSocket(`${c.ws}/v1/triggers?key=${key}`, json ? 'json' : undefined);
  const s: Sender = { ws, kinds: [], seqs: [], errors: [], gaps: [], subscribed: null, closed: null };
  ws.on('message', (data, isBinary) => {
    const f = (isBinary ? crmstream.v1.ServerFrame.decode(new Uint8Array(data as Buffer)) : JSON.parse(String(data))) as Record<string, Record<string, unknown> | null | undefined>;
    if (f['trigger'] != null) {
      s.kinds.push('trigger');
      s.seqs.push(Number(f['trigger']['seq']));
    }
    if (f['subscribed'] != null) {
      s.kinds.push('subscribed');
      s.subscribed = Number(f['subscribed']['from_seq'] ?? 0);
    }
    if (f['gap'] != null) {
      s.kinds.push('gap');
      s.gaps.push({ from: Number(f['gap']['from']), to: Number(f['gap']['to']), count: Number(f['gap']['count']) });
    }
    if (f['error'] != null) {
      s.kinds.push(`error:${String(f['error']['code'])}`);
      s.errors.push(String(f['error']['code']));
    }
  });
  ws.on('close', (code, reason) => {
    s.closed = { code, reason: String(reason) };
  });
  await new Promise<void>((resolve, reject) => {
    ws.once('open', () => resolve());
    ws.once('error', reject);
  });
  const sub = { subscribe_triggers: { group, max_in_flight: o.maxInFlight ?? 1000 } };
  ws.send(json ? JSON.stringify(sub) : crmstream.v1.ClientFrame.encode(sub).finish());
  return s;
}

const settled = (s: Sender): Promise<boolean> => until(() => s.subscribed !== null || s.closed !== null);

async function closeWs(ws: WebSocket): Promise<void> {
  if (ws.readyState === WebSocket.CLOSED) return;
  await new Promise<void>((resolve) => {
    ws.once('close', () => resolve());
    ws.close();
  });
}

describe('sender groups are tied to keys', () => {
  it('a key cannot read another sender group\'s triggers (forbidden, socket closed, nothing sent)', async () => {
    const c = await start({ newGroupStart: 'earliest' });
    await post(c, visits(10));
    const m = await sender(c, KEY.mallory, 'kakao-sender');
    expect(await settled(m)).toBe(true);
    expect(m.kinds).toEqual(['error:forbidden']);
    expect(await until(() => m.closed !== null)).toBe(true);
    expect(m.closed!.code).toBe(1008);
    // The group's own key reads it.
    const k = await sender(c, KEY.kakao, 'kakao-sender');
    expect(await until(() => k.seqs.length === 10)).toBe(true);
    await closeWs(k.ws);
    // A sender key must say which groups it may use: no silent "any group".
    let err: unknown = null;
    try {
      new KeyRing([{ name: 'loose', sha256: sha256Hex('x'), scopes: ['triggers'] }]);
    } catch (e) {
      err = e;
    }
    expect(isCode(err, 'CONFIG_INVALID')).toBe(true);
  });

  it('a key cannot ack another group\'s triggers: the real sender still gets every one', async () => {
    const c = await start({ newGroupStart: 'earliest' });
    await post(c, visits(12));
    const m = await sender(c, KEY.mallory, 'kakao-sender');
    expect(await settled(m)).toBe(true);
    // Whatever it got, it acks as far as it can.
    m.ws.send(JSON.stringify({ ack: { seq: m.seqs.length > 0 ? m.seqs[m.seqs.length - 1] : 1_000_000 } }));
    await closeWs(m.ws);
    const k = await sender(c, KEY.kakao, 'kakao-sender');
    expect(await until(() => k.seqs.length === 12)).toBe(true);
    await closeWs(k.ws);
  });

  it('a key cannot squat another sender\'s group name (group_busy for the real sender)', async () => {
    const c = await start();
    const m = await sender(c, KEY.mallory, 'kakao-sender');
    expect(await settled(m)).toBe(true);
    const k = await sender(c, KEY.kakao, 'kakao-sender');
    expect(await settled(k)).toBe(true);
    expect(k.errors).toEqual([]);
    expect(k.subscribed).not.toBeNull();
    await closeWs(k.ws);
    await closeWs(m.ws);
  });

  it('the number of sender groups is bounded (default 64): the next new group gets too_many_groups', async () => {
    const c = await start();
    for (let g = 0; g < 64; g++) {
      const s = await sender(c, KEY.admin, `g${g}`);
      expect(await settled(s)).toBe(true);
      expect(s.errors, `group g${g}`).toEqual([]);
      await closeWs(s.ws);
    }
    const extra = await sender(c, KEY.admin, 'g64');
    expect(await settled(extra)).toBe(true);
    expect(extra.errors).toEqual(['too_many_groups']);
    // A known group still connects.
    const again = await sender(c, KEY.admin, 'g3');
    expect(await settled(again)).toBe(true);
    expect(again.errors).toEqual([]);
    await closeWs(again.ws);
  });
});

describe('frames are validated', () => {
  it('a malformed or out-of-range ack is answered with bad_ack and never moves (or NaNs) the cursor, before or after a restart', async () => {
    const c = await start({ newGroupStart: 'earliest' });
    // A group that never acks holds the log, so the acks below trim nothing.
    const pin = await sender(c, KEY.admin, 'pin', { maxInFlight: 1 });
    expect(await settled(pin)).toBe(true);
    await closeWs(pin.ws);
    await post(c, visits(8));
    const s = await sender(c, KEY.admin, 'acker', { maxInFlight: 4 });
    expect(await until(() => s.seqs.length === 4)).toBe(true);
    const cursor = (): number => c.hub.groups().find((g) => g.group === 'acker')!.cursor;
    const before = cursor();
    for (const bad of ['"x"', 'null', '-1', '1.5', String(s.seqs[3]! + 1), '1e300']) s.ws.send(`{"ack":{"seq":${bad}}}`);
    expect(await until(() => s.errors.length === 6)).toBe(true);
    expect(s.errors).toEqual(Array(6).fill('bad_ack'));
    expect(cursor()).toBe(before);
    expect(s.closed).toBeNull();
    // A good ack still works on the same socket.
    s.ws.send(JSON.stringify({ ack: { seq: s.seqs[1] } }));
    expect(await until(() => cursor() === s.seqs[1])).toBe(true);
    await closeWs(s.ws);
    await c.stop();
    // A NaN stored by an older version is not loaded as NaN: the group gets what the log still holds.
    const store = new LevelStore(`${c.dir}/state`);
    await store.open();
    await store.write([{ type: 'put', key: 'rc/acker', value: new TextEncoder().encode('NaN') }]);
    await store.close();
    const c2 = await start({}, c.dir);
    expect(Number.isSafeInteger(c2.hub.groups().find((g) => g.group === 'acker')!.cursor)).toBe(true);
    const s2 = await sender(c2, KEY.admin, 'acker');
    expect(await until(() => s2.seqs.length === 8)).toBe(true);
    await closeWs(s2.ws);
  });

  it('a new group starts at the head by default: no stale history, only triggers after it subscribed', async () => {
    const c = await start();
    await post(c, visits(10));
    const s = await sender(c, KEY.admin, 'fresh');
    expect(await settled(s)).toBe(true);
    await post(c, visits(5, 100));
    expect(await until(() => s.seqs.length >= 5)).toBe(true);
    expect(s.seqs.length).toBe(5);
    expect(Math.min(...s.seqs)).toBeGreaterThan(s.subscribed!);
    await closeWs(s.ws);
  });
});

describe('retention is counted in triggers and never skips silently', () => {
  it('a trim past a group\'s cursor sends a gap frame (range, count), counts it, and keeps exactly triggerRetention triggers', async () => {
    const c = await start({ triggerRetention: 10 });
    const away = await sender(c, KEY.admin, 'away');
    expect(await settled(away)).toBe(true);
    await closeWs(away.ws);
    const slow = await sender(c, KEY.admin, 'slow', { maxInFlight: 1 }); // connected, never acks
    expect(await settled(slow)).toBe(true);
    // 30 triggers in one engine turn (so the server's periodic trim sees all or none), each next to
    // dead letters that take outbox sequence numbers too.
    await post(c, visits(30).flatMap((v, k) => [v, { event_id: '', type: 'visit', user_id: 'x', ts: T0 }, { event_id: `bad${k}`, type: 'visit', ts: T0 }]));
    expect(await until(() => slow.seqs.length === 1)).toBe(true);
    await c.hub.trim();
    // The connected group is told at once.
    expect(await until(() => slow.gaps.length === 1)).toBe(true);
    expect(slow.gaps[0]!.count).toBe(20);
    // The away group is told when it comes back, before any trigger, and then gets the 10 kept.
    const back = await sender(c, KEY.admin, 'away');
    expect(await until(() => back.seqs.length === 10)).toBe(true);
    expect(back.kinds.slice(0, 2)).toEqual(['subscribed', 'gap']);
    const gap = back.gaps[0]!;
    expect(gap.count).toBe(20);
    expect(gap.from).toBe(away.subscribed! + 1); // from where it had been
    expect(back.subscribed).toBe(gap.to); // its cursor is now the cut
    expect(Math.min(...back.seqs)).toBeGreaterThan(gap.to);
    const g = c.hub.gaps();
    expect(g.find((x) => x.group === 'away')).toMatchObject({ gaps: 1, skipped: 20 });
    expect(g.find((x) => x.group === 'slow')).toMatchObject({ gaps: 1, skipped: 20 });
    expect(c.hub.logSize).toBe(10); // triggers, whatever the dead letters took of the sequence
    await closeWs(back.ws);
    await closeWs(slow.ws);
  });

  it('crmstream run\'s config accepts server.triggerRetention and server.maxBufferedBytes (documented in docs/API.md)', () => {
    const cfg = parseRunConfig({
      kafka: { brokers: '127.0.0.1:9092' },
      server: { port: 0, keys: [KEYS[0]], triggerRetention: 1000, maxBufferedBytes: 1 << 20 },
    }, 'test');
    expect(cfg.server).toMatchObject({ triggerRetention: 1000, maxBufferedBytes: 1 << 20 });
  });
});

describe('keys in the URL', () => {
  it('?key= is refused on HTTP routes (401 naming the header to use) and accepted on a WebSocket upgrade', async () => {
    const c = await start();
    const q = await fetch(`${c.base}/v1/kpis?grain=day&key=${KEY.kpis}`);
    expect(q.status).toBe(401);
    expect(((await q.json()) as { message: string }).message).toMatch(/Authorization: Bearer/);
    const both = await fetch(`${c.base}/v1/kpis?grain=day&key=${KEY.kpis}`, { headers: { authorization: `Bearer ${KEY.kpis}` } });
    expect(both.status).toBe(401);
    expect((await fetch(`${c.base}/v1/kpis?grain=day`, { headers: { authorization: `Bearer ${KEY.kpis}` } })).status).toBe(200);
    const ws = new WebSocket(`${c.ws}/v1/kpis?key=${KEY.kpis}`);
    const status = await new Promise<number>((resolve) => {
      ws.once('unexpected-response', (_req, res) => resolve(res.statusCode ?? 0));
      ws.once('open', () => resolve(101));
      ws.once('error', () => resolve(-1));
    });
    expect(status).toBe(101);
    await closeWs(ws);
  });
});
