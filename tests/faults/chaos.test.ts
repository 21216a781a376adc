import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import WebSocket from 'ws';
import { Engine } from '../../engine/engine.js';
import { Rng, TrafficGenerator } from '../../engine/sources/generator.js';
import { jsonlFiles, readJsonl } from '../../engine/sinks/jsonl-file.js';
import { compareRows } from '../oracle/compare.js';
import { KpiOracle, type OracleEvent } from '../oracle/kpi-oracle.js';
import { PROJECT_ROOT, tempDir } from '../helpers.js';

/**
 * The chaos soak of issue 17, bounded in time (about a minute of load): a real server process
 * (tests/fixtures/chaos-worker.ts: engine with a campaign, LevelDB under bursts of injected write
 * failures, an extra trigger sink that fails one delivery in five) takes HTTP ingest from a client
 * that resends every request until it is answered (as a correct client does), next to hostile
 * producers (far-future timestamps, huge events, malformed bodies, oversized batches, a flood of
 * concurrent requests past the queue bound), and two sender groups (one slow, one that drops its
 * socket at random). The server is SIGKILLed at random and started again; when a failure burst
 * outlasts the checkpoint retries it fails closed (exit 3) and is started again too.
 *
 * At the end: every acknowledged event is in the state (sent again, each is a `duplicate`), the
 * KPIs equal the DuckDB oracle over exactly the acknowledged events, and every trigger the engine
 * decided reached both sender groups and the flaky sink.
 */

const WORKER = path.join(PROJECT_ROOT, 'dist/tests/fixtures/chaos-worker.js');
const LOAD_MS = process.env['CRM_CHAOS_MS'] === undefined ? 45_000 : Number(process.env['CRM_CHAOS_MS']);
const KEYS = [
  { name: 'ingest', key: 'chaos-ingest-0123456789', scopes: ['ingest'] },
  { name: 'senders', key: 'chaos-sender-0123456789', scopes: ['triggers'], groups: ['slow', 'flaky'] },
];
const INGEST = KEYS[0]!.key;
const SENDER = KEYS[1]!.key;

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const p = (s.address() as net.AddressInfo).port;
      s.close(() => resolve(p));
    });
  });
}

/** The server process, restarted by the test (a supervisor's job). */
class Supervised {
  child: ChildProcess | null = null;
  starts = 0;
  kills = 0;
  failClosedExits = 0;
  constructor(private readonly dataDir: string, private readonly port: number) {}

  async start(): Promise<void> {
    const child = spawn(process.execPath, [WORKER, this.dataDir, String(this.port), String(1000 + this.starts), JSON.stringify(KEYS)], { stdio: ['ignore', 'pipe', 'pipe'] });
    this.child = child;
    this.starts++;
    let out = '';
    let err = '';
    child.stderr!.on('data', (d: Buffer) => (err += String(d)));
    child.once('exit', (code) => {
      if (code === 3) this.failClosedExits++;
      if (this.child === child) this.child = null;
    });
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`the chaos worker did not start in 60 s: ${out} ${err}`)), 60_000);
      child.stdout!.on('data', (d: Buffer) => {
        out += String(d);
        if (out.includes('ready')) {
          clearTimeout(timer);
          resolve();
        }
      });
      child.once('exit', (code) => {
        clearTimeout(timer);
        // Failed closed right at start (a failure burst during restore): the caller starts it again.
        if (!out.includes('ready')) reject(new Error(`the chaos worker exited ${code} before it was ready: ${err}`));
      });
    });
  }

  async kill(): Promise<void> {
    const c = this.child;
    if (c === null) return;
    const gone = new Promise((r) => c.once('exit', r));
    c.kill('SIGKILL');
    await gone;
    this.kills++;
  }

  /** Starts it whenever it is down (killed or failed closed), until stopped. */
  async keepUp(until: () => boolean): Promise<void> {
    while (!until()) {
      if (this.child === null) {
        try {
          await this.start();
        } catch {
          await sleep(100); // failed closed during start-up: again
        }
      }
      await sleep(50);
    }
  }
}

/** A sender group's client: reconnects whenever the socket goes, records every trigger id. */
class Sender {
  readonly ids = new Set<string>();
  gaps = 0;
  reconnects = 0;
  private ws: WebSocket | null = null;
  private stopped = false;
  constructor(private readonly port: number, readonly group: string, private readonly rng: Rng, private readonly mode: 'slow' | 'flaky') {}

  run(): void {
    if (this.stopped) return;
    const ws = new WebSocket(`ws://127.0.0.1:${this.port}/v1/triggers`, 'json', { headers: { authorization: `Bearer ${SENDER}` } });
    this.ws = ws;
    ws.on('open', () => ws.send(JSON.stringify({ subscribe_triggers: { group: this.group, max_in_flight: 200 } })));
    ws.on('message', (data) => {
      const f = JSON.parse(String(data)) as { trigger?: { seq: number | string; trigger_id: string }; gap?: unknown };
      if (f.gap != null) this.gaps++;
      if (f.trigger == null) return;
      this.ids.add(f.trigger.trigger_id);
      const seq = Number(f.trigger.seq);
      if (this.mode === 'flaky' && this.rng.int(60) === 0) {
        ws.terminate(); // gone without acking: the group gets it again
        return;
      }
      const ack = () => {
        if (ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({ ack: { seq } }));
      };
      if (this.mode === 'slow') setTimeout(ack, 5);
      else ack();
    });
    const again = () => {
      if (this.ws !== ws) return;
      this.ws = null;
      this.reconnects++;
      setTimeout(() => this.run(), 100 + this.rng.int(300));
    };
    ws.on('close', again);
    ws.on('error', again);
  }

  stop(): void {
    this.stopped = true;
    this.ws?.terminate();
  }
}

interface Answer {
  status: number;
  body: { results?: string[]; error?: string };
}

async function post(port: number, body: string): Promise<Answer | null> {
  try {
    const r = await fetch(`http://127.0.0.1:${port}/v1/events`, {
      method: 'POST', headers: { authorization: `Bearer ${INGEST}`, 'content-type': 'application/json' }, body, signal: AbortSignal.timeout(20_000),
    });
    return { status: r.status, body: (await r.json().catch(() => ({}))) as Answer['body'] };
  } catch {
    return null; // the server died mid-request: the answer is unknown
  }
}

let oracle: KpiOracle | null = null;
afterAll(async () => oracle?.close());

describe('chaos soak: SIGKILLs, failing disk and sink, hostile producers, slow and dropping senders', () => {
  it('every acknowledged event is in the state, KPIs equal the oracle, no group misses a trigger', async () => {
    if (!existsSync(WORKER)) throw new Error(`${WORKER} is missing: run \`npm run build\` first (npm test does)`);
    const tmp = tempDir('crm-chaos-');
    const rng = new Rng(4242);
    const port = await freePort();
    const server = new Supervised(tmp.dir, port);
    const senders = [new Sender(port, 'slow', new Rng(1), 'slow'), new Sender(port, 'flaky', new Rng(2), 'flaky')];
    let stop = false; // no more load and kills
    let done = false; // no more restarts
    const durable = new Map<string, OracleEvent>(); // acknowledged events, in order of acknowledgement
    const hostile = { sent: 0, refusedAsExpected: 0, floodAccepted: 0, floodOverloaded: 0 };
    try {
      await server.start();
      for (const s of senders) s.run();
      const up = server.keepUp(() => done);

      /** Sends until answered (200), as a correct client does; records what the answer made durable. */
      const wire = (e: OracleEvent) => ({ ...e, amount: Number.isNaN(e.amount) ? undefined : e.amount });
      const deliver = async (events: OracleEvent[], giveUpOnOverload: boolean): Promise<'ok' | 'overloaded'> => {
        const body = JSON.stringify(events.map(wire));
        for (let attempt = 0; attempt < 2_000; attempt++) {
          const a = await post(port, body);
          if (a !== null && a.status === 200) {
            a.body.results!.forEach((r, i) => {
              // '' = accepted now; 'duplicate' = it made it into a checkpoint before (an answer lost to a SIGKILL).
              if ((r === '' || r === 'duplicate') && !durable.has(events[i]!.event_id)) durable.set(events[i]!.event_id, events[i]!);
              else if (r !== '' && r !== 'duplicate') throw new Error(`event ${events[i]!.event_id} rejected ${r}`);
            });
            return 'ok';
          }
          if (a !== null && a.status === 503 && a.body.error === 'overloaded' && giveUpOnOverload) return 'overloaded';
          if (a !== null && a.status !== 503) throw new Error(`unexpected answer ${a.status} ${JSON.stringify(a.body)}`);
          await sleep(50); // down, restarting, failed closed, or overloaded: again
        }
        throw new Error('no answer after 2,000 attempts');
      };

      const gen = new TrafficGenerator({ seed: 77, users: 400, lateRate: 0, duplicateRate: 0, badRate: 0 });
      let n = 0;
      const nextEvents = (k: number, prefix = ''): OracleEvent[] => Array.from({ length: k }, () => {
        const e = gen.nextEvent();
        // Event time: the wall clock (minus a little), so nothing is too_late or in the future.
        return {
          event_id: `${prefix}${e.event_id}`, type: e.type, user_id: e.user_id && `${prefix}${e.user_id}`, anonymous_id: e.anonymous_id && `${prefix}${e.anonymous_id}`,
          ts: Date.now() - 2_000 + (n++ % 1000), amount: e.type === 'purchase' || e.type === 'refund' || e.type === 'cost' ? e.amount : Number.NaN,
          channel: e.channel, platform: e.platform,
        };
      });

      const hostileOnce = async (): Promise<void> => {
        hostile.sent++;
        const kind = rng.int(4);
        if (kind === 0) {
          const a = await post(port, JSON.stringify([{ event_id: `f${n++}`, type: 'visit', user_id: 'mallory', ts: Date.UTC(2099, 0, 1) }]));
          if (a?.status === 200 && a.body.results?.[0] === 'future_timestamp') hostile.refusedAsExpected++;
        } else if (kind === 1) {
          const a = await post(port, JSON.stringify([{ event_id: `h${n++}`, type: 'visit', user_id: 'mallory', ts: Date.now(), props: { blob: 'x'.repeat(100_000) } }]));
          if (a?.status === 200 && a.body.results?.[0] === 'too_large') hostile.refusedAsExpected++;
        } else if (kind === 2) {
          const a = await post(port, '{"events": [not json');
          if (a?.status === 400) hostile.refusedAsExpected++;
        } else {
          const a = await post(port, JSON.stringify(Array.from({ length: 10_001 }, (_, k) => ({ event_id: `o${n}-${k}`, type: 'visit', user_id: 'mallory', ts: Date.now() }))));
          if (a?.status === 413) hostile.refusedAsExpected++;
        }
      };

      const flood = async (): Promise<void> => {
        // Concurrent requests past server.maxQueuedEvents (5,000): some are refused, nothing of those is taken.
        const results = await Promise.all(Array.from({ length: 12 }, () => deliver(nextEvents(800, 'flood-'), true)));
        for (const r of results) if (r === 'overloaded') hostile.floodOverloaded++; else hostile.floodAccepted++;
      };

      const killer = (async () => {
        while (!stop) {
          await sleep(2_500 + rng.int(4_000));
          if (!stop) await server.kill();
        }
      })();

      const started = Date.now();
      let requests = 0;
      while (Date.now() - started < LOAD_MS) {
        const events = nextEvents(20 + rng.int(200));
        await deliver(events, false);
        requests++;
        if (requests % 7 === 0) await hostileOnce();
        if (requests % 97 === 0) await flood();
      }
      stop = true;
      await killer;
      // No more kills; the worker still injects disk trouble (and may fail closed: it is started
      // again). Wait until both groups and the flaky sink have every decided trigger.
      const idsIn = async (file: string): Promise<Set<string>> => {
        const ids = new Set<string>();
        if (existsSync(file)) for await (const t of readJsonl(file)) ids.add(String(t['trigger_id']));
        return ids;
      };
      const decided = (): Promise<Set<string>> => idsIn(path.join(tmp.dir, 'triggers.jsonl'));
      const missing = async (): Promise<Record<string, number>> => {
        const all = await decided();
        const audit = await idsIn(path.join(tmp.dir, 'audit.jsonl'));
        return {
          slow: [...all].filter((id) => !senders[0]!.ids.has(id)).length,
          flaky: [...all].filter((id) => !senders[1]!.ids.has(id)).length,
          audit: [...all].filter((id) => !audit.has(id)).length,
        };
      };
      for (let i = 0; i < 600 && Object.values(await missing()).some((v) => v > 0); i++) await sleep(100);

      // Every acknowledged event is in the state: sent again, each one is a duplicate.
      const acked = [...durable.values()];
      for (let i = 0; i < acked.length; i += 5_000) {
        const chunk = acked.slice(i, i + 5_000);
        let a: Answer | null = null;
        for (let attempt = 0; attempt < 200 && (a === null || a.status !== 200); attempt++) {
          a = await post(port, JSON.stringify(chunk.map(wire)));
          if (a === null || a.status !== 200) await sleep(100);
        }
        expect(a?.status).toBe(200);
        expect(a!.body.results!.filter((r) => r !== 'duplicate')).toEqual([]);
      }
      const finalMissing = await missing();
      const decidedCount = (await decided()).size;
      for (const s of senders) s.stop();
      done = true;
      await up;
      await server.kill();

      // KPIs of the state equal the DuckDB oracle over exactly the acknowledged events.
      const engine = await Engine.create({ dataDir: tmp.dir, time: { maxFutureMs: null } });
      try {
        oracle = await KpiOracle.create();
        await oracle.load(acked);
        const opts = { timeZone: engine.config.time.timeZone, watermark: engine.watermark };
        const diffs: string[] = [];
        for (const g of ['day', 'month'] as const) {
          diffs.push(...compareRows(await engine.kpis(g), await oracle.kpis(g, opts), ['window', 'channel', 'platform']).map((d) => `kpis/${g}: ${d}`));
          diffs.push(...compareRows(await engine.funnel(g), await oracle.funnel(g, opts), ['cohort', 'channel', 'platform']).map((d) => `funnel/${g}: ${d}`));
        }
        expect(diffs).toEqual([]);
        expect(engine.acceptedCount).toBe(acked.length);
      } finally {
        await engine.close();
      }
      expect(finalMissing).toEqual({ slow: 0, flaky: 0, audit: 0 });
      // The soak did what it says: kills, restarts, fail-closed exits, hostile input refused, triggers decided.
      expect(server.kills).toBeGreaterThan(3);
      expect(hostile.refusedAsExpected).toBeGreaterThan(0);
      expect(decidedCount).toBeGreaterThan(10);
      expect((await jsonlFiles(path.join(tmp.dir, 'audit.jsonl'))).length).toBeGreaterThan(0);
      console.log(`chaos: ${acked.length} events acknowledged, ${decidedCount} triggers, ${server.starts} starts, ${server.kills} kills, ${server.failClosedExits} fail-closed exits, ` +
        `hostile ${JSON.stringify(hostile)}, sender reconnects ${senders.map((s) => `${s.group}=${s.reconnects}`).join(' ')}`);
    } finally {
      stop = true;
      done = true;
      for (const s of senders) s.stop();
      await server.kill();
      tmp.cleanup();
    }
  }, 240_000);
});
