/**
 * Server scenarios (issue 7, SPEC §10), against the real HTTP / WebSocket server (api/server.ts) on
 * 127.0.0.1 with real clients (`node:http`, `ws`). The server runs in the bench's main thread; the
 * background load generator, the probe sender and the trigger sender run in a worker thread
 * (bench/server-load.worker.ts), so the server's event loop carries only the server. The process
 * is still shared (2 cores here: the worker's CPU competes with the server's for the machine, not
 * for its thread), so the figures remain somewhat pessimistic against clients on another machine.
 *
 * Background load (both scenarios, in the worker): the generator's mix of users, sessions and types
 * with event time = the wall clock at send time; every 10 ms the events due since the start go out
 * in one JSON POST (~200; more when a timer fired late, at most 2,000), at most 4 requests in
 * flight — when the server cannot keep up the loader falls behind rather than queueing without
 * bound, and the notes give the rate it achieved.
 *
 * - `http → trigger frame (20k ev/s background)`: one sender (`ws`, sub-protocol json, group
 *   `bench`, acks every frame) on /v1/triggers; 20,000 ordinary events/s POSTed to /v1/events in
 *   JSON batches (~200 every 10 ms, event time = the wall clock); every 5 ms one `probe_ping` event
 *   for a fresh user in its own POST (keep-alive agent without a socket limit, so a probe reaches
 *   the server when it is sent). Latency = start of the probe's POST → the trigger frame for
 *   that user at the sender, both in the worker (one clock). The `probe` campaign triggers on
 *   `probe_ping` only, so the probes' triggers are the only ones. items = probes (ops/s = probes
 *   per second); the percentiles are in the notes. State: LevelDB (fsync per write) in a temp dir;
 *   `checkpoint.triggerLatencyMs: 0` (a batch that decided a trigger is checkpointed at its end — a
 *   trigger is sent only after the checkpoint that makes it durable) and `intervalMs: 1000` for the
 *   other batches. The notes also break the time down on the server side: the engine calls' wait
 *   in the EngineGate and run time (ingest + checkpoint + outbox drain), the gate's busy share, and
 *   the server thread's event-loop delay.
 *   `triggerLatencyScenario({ backend, checkpointMs, rate, probeEveryMs })` makes variants (not
 *   registered) for finding where the time goes.
 * - `KPI fan-out to 1,000 sockets`: 1,000 `ws` clients (json) on /v1/kpis subscribed to the day
 *   grain, 100 of them "slow" (their TCP socket paused after the snapshot: they never read again),
 *   under 20,000 ev/s of ingest (kpiCoalesceMs 250, so the KPIs change every tick). The ingest runs
 *   in the worker; the 1,000 clients stay in the main thread with the server (they only count
 *   ~4 frames/ms in all, and the slow ones pause their own socket). items = delta frames received
 *   by the fast clients; the notes give process memory (sampled every second: after the
 *   subscriptions, max during the run, after a GC at the end), the bytes uWS holds for the sockets
 *   (backpressure) and the frames the server skipped for the slow ones.
 *
 * Every run starts a fresh engine + server (port 0) and a fresh worker, and closes everything it
 * opened (worker, sockets, server, engine, temp dir) before it returns.
 */
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import type net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { monitorEventLoopDelay, performance } from 'node:perf_hooks';
import { setTimeout as sleep } from 'node:timers/promises';
import { Worker } from 'node:worker_threads';
import WebSocket from 'ws';
import { sha256Hex } from '../api/auth.js';
import { EngineGate } from '../api/gate.js';
import { CrmServer } from '../api/server.js';
import { TriggerHub } from '../api/trigger-hub.js';
import { Engine } from '../engine/engine.js';
import { TrafficGenerator } from '../engine/sources/generator.js';
import { collect, consume, type Scenario, type TimedItems } from './harness.js';
import {
  BACKGROUND_TICK_MS, compact, type BackgroundCounters, type LoadCommand, type LoadData, type LoadMessage,
} from './server-load.worker.js';

const KEY = 'bench-key-0123456789abcdef';
const MiB = 1024 * 1024;
const BACKGROUND_RATE = 20_000;
/** The compiled worker, next to this file (dist/bench/server-load.worker.js). */
const LOAD_WORKER_URL = new URL('./server-load.worker.js', import.meta.url);

// ---------------------------------------------------------------------------------------------------
// Shared pieces


interface Stack {
  engine: Engine;
  gate: EngineGate;
  server: CrmServer;
  port: number;
  dir: string;
  backend: 'level' | 'memory';
  close(): Promise<void>;
}

async function startStack(o: {
  backend: 'level' | 'memory';
  checkpointMs?: number;
  campaigns?: unknown;
  kpiCoalesceMs?: number;
}): Promise<Stack> {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'crm-bench-server-'));
  const hub = new TriggerHub();
  const engine = await Engine.create({
    ...(o.backend === 'level' ? { dataDir: dir } : { state: { backend: 'memory' } }),
    // Triggers are checkpointed (and so sent) at the end of the batch that decided them; other
    // batches wait for the interval.
    checkpoint: { intervalMs: o.checkpointMs ?? 1000, triggerLatencyMs: 0 },
    ...(o.campaigns === undefined ? {} : { campaigns: { definitions: o.campaigns } }),
  }, { sinks: [hub] });
  const gate = new EngineGate(engine);
  const server = await CrmServer.start(gate, hub, {
    port: 0, keys: [{ name: 'bench', sha256: sha256Hex(KEY), scopes: ['admin'] }],
    ...(o.kpiCoalesceMs === undefined ? {} : { kpiCoalesceMs: o.kpiCoalesceMs }),
  });
  return {
    engine, gate, server, port: server.port, dir, backend: o.backend,
    close: async () => {
      await server.close();
      await gate.run((e) => e.close());
      // CrmServer.close() cannot free its uWS App (uWS.js 20.30 has no app.close()), and the App's
      // route handlers keep the server → gate → engine (and hub → store) reachable for the life of
      // the process: every run would leak a whole engine into the next scenario's measurements.
      // Cut those two references once everything is closed (no client is left to reach a route).
      (gate as unknown as { engine: unknown }).engine = null;
      (hub as unknown as { store: unknown }).store = null;
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

/**
 * The client side of a run in a worker thread (bench/server-load.worker.ts): messages from it are
 * queued and taken by type; an error, an early exit or a timeout rejects the wait. `close()`
 * terminates the thread (always call it: the harness runs scenarios one after another in one process).
 */
class LoadWorker {
  private readonly worker: Worker;
  private readonly inbox: LoadMessage[] = [];
  private wake: (() => void) | null = null;
  private failure: Error | null = null;
  private exited = false;

  constructor(data: LoadData) {
    this.worker = new Worker(LOAD_WORKER_URL, { workerData: data });
    this.worker.on('message', (m: LoadMessage) => {
      if (m.type === 'error') this.failure ??= new Error(`load worker: ${m.message}`);
      else this.inbox.push(m);
      this.wake?.();
    });
    this.worker.on('error', (err) => {
      this.failure ??= err;
      this.wake?.();
    });
    this.worker.on('exit', (code) => {
      this.exited = true;
      this.failure ??= new Error(`load worker exited (code ${code})`);
      this.wake?.();
    });
  }

  send(m: LoadCommand): void {
    this.worker.postMessage(m);
  }

  /** The first message of `type` (queued or to come), within `ms`. */
  async next<T extends LoadMessage['type']>(type: T, ms: number): Promise<Extract<LoadMessage, { type: T }>> {
    const deadline = performance.now() + ms;
    for (;;) {
      const i = this.inbox.findIndex((m) => m.type === type);
      if (i >= 0) return this.inbox.splice(i, 1)[0] as Extract<LoadMessage, { type: T }>;
      if (this.failure !== null) throw this.failure;
      const left = deadline - performance.now();
      if (left <= 0) throw new Error(`load worker: no '${type}' within ${Math.round(ms)} ms`);
      let timer: NodeJS.Timeout | null = null;
      await new Promise<void>((resolve) => {
        this.wake = resolve;
        timer = setTimeout(resolve, left);
      });
      this.wake = null;
      if (timer !== null) clearTimeout(timer);
    }
  }

  async close(): Promise<void> {
    if (!this.exited) await this.worker.terminate();
  }
}

/** Nearest-rank percentile of sorted samples. */
function pct(sorted: Float64Array, q: number): number {
  if (sorted.length === 0) return Number.NaN;
  return sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil(q * sorted.length) - 1))]!;
}

const f2 = (x: number): string => (Number.isFinite(x) ? x.toFixed(2) : '—');
const int = (x: number): string => Math.round(x).toLocaleString('en-US');
const mib = (x: number): string => (x / MiB).toFixed(0);

/** Destroys client sockets (terminate: a paused socket would never finish a close handshake) and waits for their close events. */
async function terminateAll(sockets: readonly WebSocket[], ms = 5_000): Promise<void> {
  const waits = sockets.filter((ws) => ws.readyState !== WebSocket.CLOSED).map((ws) => new Promise<void>((resolve) => {
    ws.once('close', () => resolve());
    ws.terminate();
  }));
  await Promise.race([Promise.all(waits), sleep(ms)]);
}

// ---------------------------------------------------------------------------------------------------
// Scenario 1: event in over HTTP → trigger frame at a WebSocket sender

interface ProbeRun {
  probes: number;
  received: number;
  /** Probes the engine did not accept (should be 0). */
  probeRejected: number;
  /** POST start → trigger frame, ms, sorted (received probes only). */
  lat: Float64Array;
  /** POST start → HTTP answer, ms, sorted. */
  answer: Float64Array;
  bgRate: number;
  bgRejected: number;
  bgRejects: string;
  bgFailed: number;
  bgStalls: number;
  bgRequests: number;
  checkpoints: number;
  /** Engine calls through the gate: waiting for their turn / running, ms, sorted. */
  gateWait: Float64Array;
  gateRun: Float64Array;
  /** Share of the probe window the gate spent running engine calls. */
  gateBusy: number;
  /** The server thread's event-loop delay during the probes, ms. */
  loopP99: number;
  loopMax: number;
}

export interface TriggerOptions {
  /** Engine state: LevelDB in a temp dir (default) or memory. */
  backend?: 'level' | 'memory';
  /** checkpoint.intervalMs (default 1000; triggerLatencyMs is 0: a batch that decided a trigger is checkpointed at once). */
  checkpointMs?: number;
  /** Background events/s (default 20,000). */
  rate?: number;
  /** One probe per this many ms (default 5). */
  probeEveryMs?: number;
}

interface TriggerState extends Required<TriggerOptions> {
  durationMs: number;
  probes: number;
  runs: ProbeRun[];
}

interface GateRecord {
  /** performance.now() of the server thread when the call was queued / started, ms. */
  queued: number[];
  started: number[];
  /** Run time, ms. */
  run: number[];
}

/** Wraps the gate so every engine call's queue time, start and run time are recorded (bench instrumentation, server thread). */
function instrumentGate(gate: EngineGate): GateRecord {
  const rec: GateRecord = { queued: [], started: [], run: [] };
  const orig = gate.run.bind(gate);
  gate.run = <T>(fn: (engine: Engine) => Promise<T> | T): Promise<T> => {
    const queued = performance.now();
    return orig(async (e) => {
      const started = performance.now();
      try {
        return await fn(e);
      } finally {
        rec.queued.push(queued);
        rec.started.push(started);
        rec.run.push(performance.now() - started);
      }
    });
  };
  return rec;
}

/** The engine calls queued within [from, to] (server-thread ms): wait and run times, sorted, and the share of the window spent running calls. */
function gateInWindow(rec: GateRecord, from: number, to: number): { wait: Float64Array; run: Float64Array; busy: number } {
  const wait: number[] = [];
  const run: number[] = [];
  let busyMs = 0;
  for (let i = 0; i < rec.run.length; i++) {
    const q = rec.queued[i]!;
    const st = rec.started[i]!;
    const r = rec.run[i]!;
    if (q >= from && q <= to) {
      wait.push(st - q);
      run.push(r);
    }
    busyMs += Math.max(0, Math.min(to, st + r) - Math.max(from, st));
  }
  return { wait: Float64Array.from(wait).sort(), run: Float64Array.from(run).sort(), busy: to > from ? busyMs / (to - from) : 0 };
}

async function probeRun(s: TriggerState, runNo: number): Promise<{ run: ProbeRun; ns: bigint }> {
  const stack = await startStack({
    backend: s.backend, checkpointMs: s.checkpointMs,
    campaigns: {
      campaigns: [{ id: 'probe', trigger: { event: 'probe_ping' }, promotional: false, action: { template: 't', channels: ['push'] } }],
      consent: { unknown: 'allow' },
    },
  });
  const gateRec = instrumentGate(stack.gate);
  const loop = monitorEventLoopDelay({ resolution: 1 });
  const drainMs = 15_000;
  let load: LoadWorker | null = null;
  try {
    load = new LoadWorker({
      mode: 'trigger', port: stack.port, key: KEY, rate: s.rate, seed: 7 + runNo, probes: s.probes, probeEveryMs: s.probeEveryMs,
      settleMs: 200, drainMs, tag: `r${runNo}-${Date.now().toString(36)}`,
    });
    // The worker connects its sender, starts the background and lets it settle; the server-side
    // instruments start with the probes.
    await load.next('settled', 60_000);
    loop.enable();
    load.send({ type: 'probe' });
    const { result: r } = await load.next('done', 60_000 + s.probes * s.probeEveryMs + drainMs);
    loop.disable();
    // The probe window (first probe sent → last trigger frame) on this thread's clock.
    const from = r.t0Abs - performance.timeOrigin;
    const to = r.endAbs - performance.timeOrigin;
    const g = gateInWindow(gateRec, from, to);
    const st = stack.engine.stats();
    const rejects = Object.entries(stack.engine.rejectCounts()).filter(([, v]) => v > 0).map(([k, v]) => `${k} ${v}`).join(', ');
    consume(r.received);
    return {
      ns: BigInt(Math.round(r.windowMs * 1e6)),
      run: {
        probes: r.probes, received: r.received, probeRejected: r.probeRejected, lat: r.lat, answer: r.answer,
        bgRate: r.bg.achievedRate, bgRejected: r.bg.rejected, bgRejects: rejects || 'none', bgFailed: r.bg.failed, bgStalls: r.bg.stalls, bgRequests: r.bg.requests,
        checkpoints: st['epoch'] ?? 0, gateWait: g.wait, gateRun: g.run, gateBusy: g.busy,
        loopP99: loop.percentile(99) / 1e6, loopMax: loop.max / 1e6,
      },
    };
  } finally {
    loop.disable();
    await load?.close();
    await stack.close();
  }
}

function pooled(runs: readonly ProbeRun[], pick: (r: ProbeRun) => Float64Array): Float64Array {
  const out = new Float64Array(runs.reduce((a, r) => a + pick(r).length, 0));
  let k = 0;
  for (const r of runs) {
    out.set(pick(r), k);
    k += pick(r).length;
  }
  return out.sort();
}

const dist = (xs: Float64Array): string => `p50 ${f2(pct(xs, 0.5))}, p99 ${f2(pct(xs, 0.99))}, max ${f2(xs[xs.length - 1] ?? Number.NaN)} ms`;

export function triggerLatencyScenario(o: TriggerOptions = {}): Scenario<TriggerState> {
  const opts: Required<TriggerOptions> = { backend: o.backend ?? 'level', checkpointMs: o.checkpointMs ?? 1000, rate: o.rate ?? BACKGROUND_RATE, probeEveryMs: o.probeEveryMs ?? 5 };
  const variant = [
    opts.backend === 'memory' ? 'memory state' : '',
    opts.checkpointMs !== 1000 ? `checkpoint ${opts.checkpointMs} ms` : '',
    opts.probeEveryMs !== 5 ? `probe every ${opts.probeEveryMs} ms` : '',
  ].filter((x) => x !== '').join(', ');
  return {
    name: `http → trigger frame (${opts.rate === BACKGROUND_RATE ? '20k' : int(opts.rate)} ev/s background)${variant === '' ? '' : ` [${variant}]`}`,
    async setup(ctx) {
      const durationMs = ctx.quick ? 3_000 : 10_000;
      return { ...opts, durationMs, probes: Math.floor(durationMs / opts.probeEveryMs), runs: [] };
    },
    async run(s): Promise<TimedItems> {
      const { run, ns } = await probeRun(s, s.runs.length);
      s.runs.push(run);
      return { items: run.probes, ns };
    },
    notes(s) {
      const timed = s.runs.length > 1 ? s.runs.slice(1) : s.runs;
      const last = timed[timed.length - 1];
      if (last === undefined) return '';
      const all = pooled(timed, (r) => r.lat);
      const p99 = pct(all, 0.99);
      const lost = timed.reduce((a, r) => a + (r.probes - r.received), 0);
      const rejected = timed.reduce((a, r) => a + r.probeRejected, 0);
      return [
        `${s.backend === 'level' ? 'LevelDB state (sync writes) in a temp dir' : 'memory state'}, checkpoint.intervalMs ${s.checkpointMs}, triggerLatencyMs 0 (a trigger goes out only after the checkpoint that makes it durable)`,
        `${int(s.probes)} probes/run, one probe_ping POST per ${s.probeEveryMs} ms for a fresh user; sender: ws json, group bench, acks every frame`,
        `background (worker thread): target ${int(s.rate)} ev/s as JSON POSTs every ${BACKGROUND_TICK_MS} ms (≤ 4 in flight), achieved ${timed.map((r) => int(r.bgRate)).join(' / ')} ev/s (per timed run; last run: ${int(last.bgRequests)} requests, ${int(last.bgStalls)} ticks skipped with 4 in flight, rejects: ${last.bgRejects}, ${int(last.bgFailed)} failed)`,
        `LATENCY POST start → trigger frame, ${timed.length} timed run(s), ${int(all.length)} samples: p50 ${f2(pct(all, 0.5))} ms, p99 ${f2(p99)} ms, p999 ${f2(pct(all, 0.999))} ms, max ${f2(all[all.length - 1] ?? Number.NaN)} ms`,
        `p99 per run: ${s.runs.map((r, i) => `${f2(pct(r.lat, 0.99))}${i === 0 && s.runs.length > 1 ? ' (warm-up)' : ''}`).join(', ')} ms`,
        `POST answered: ${dist(pooled(timed, (r) => r.answer))}`,
        `server side, engine calls queued in the probe window (last run, ${int(last.gateRun.length)}): wait in the gate ${dist(last.gateWait)}; run (ingest + checkpoint) ${dist(last.gateRun)}, busy ${(100 * last.gateBusy).toFixed(0)}% of the window`,
        `server-thread event-loop delay p99 ${f2(last.loopP99)} ms, max ${f2(last.loopMax)} ms; ${int(last.checkpoints)} checkpoints in the last run`,
        `probes lost ${lost}, rejected ${rejected}`,
        `SPEC §10 target p99 ≤ 5 ms: ${p99 <= 5 ? 'MET' : 'MISSED'}`,
        'clients (background loader, probe sender, trigger sender) run in a worker thread; the server alone on the main thread (same process, 2 cores shared)',
      ].join('; ');
    },
  };
}

export const serverTriggerScenario = triggerLatencyScenario();

// ---------------------------------------------------------------------------------------------------
// Scenario 2: live KPI fan-out to 1,000 dashboard sockets, some of them slow

interface MemSample {
  rss: number;
  heap: number;
  external: number;
  /** Bytes uWS holds for all sockets (backpressure), -1 when not observable. */
  buffered: number;
  /** The most any one socket holds. */
  maxBuffered: number;
}

interface FanRun {
  fastFrames: number;
  fastBytes: number;
  /** Snapshots re-sent to fast clients (they looked backpressured to the server). */
  fastResnapshots: number;
  minPerFast: number;
  maxPerFast: number;
  framesSentByServer: number;
  snapshotRows: number;
  subscribeMs: number;
  windowMs: number;
  bgRate: number;
  bg: BackgroundCounters;
  start: MemSample;
  afterSubs: MemSample;
  afterSubsGc: number;
  peak: MemSample;
  end: MemSample;
  endGc: number;
  series: MemSample[];
}

interface FanState {
  /** Linux TCP buffer sizes (min default max) for the notes: what a paused loopback socket can absorb outside the process. */
  tcpMem: string;
  clients: number;
  slow: number;
  durationMs: number;
  fdLimit: number | null;
  reduced: boolean;
  runs: FanRun[];
}

interface FanClient {
  ws: WebSocket;
  slow: boolean;
  frames: number;
  bytes: number;
  resnapshots: number;
  counting: boolean;
}

/** The soft open-files limit of this process (Linux /proc), or null. */
function openFilesLimit(): number | null {
  try {
    const m = /^Max open files\s+(\d+|unlimited)/m.exec(readFileSync('/proc/self/limits', 'utf8'));
    if (m === null) return null;
    return m[1] === 'unlimited' ? Number.POSITIVE_INFINITY : Number(m[1]);
  } catch {
    return null;
  }
}

/** uWS's buffered bytes over the server's open sockets (a private field of CrmServer: best effort). */
function serverBuffered(server: CrmServer): { total: number; max: number } {
  const sockets = (server as unknown as { sockets?: Set<{ getBufferedAmount(): number }> }).sockets;
  if (sockets === undefined) return { total: -1, max: -1 };
  let total = 0;
  let max = 0;
  for (const ws of sockets) {
    try {
      const b = ws.getBufferedAmount();
      total += b;
      if (b > max) max = b;
    } catch {
      // closed meanwhile
    }
  }
  return { total, max };
}

function memSample(server: CrmServer): MemSample {
  const m = process.memoryUsage();
  const b = serverBuffered(server);
  return { rss: m.rss, heap: m.heapUsed, external: m.external, buffered: b.total, maxBuffered: b.max };
}

async function fanRun(s: FanState, runNo: number): Promise<{ run: FanRun; ns: bigint }> {
  const stack = await startStack({ backend: 'level', kpiCoalesceMs: 250 });
  const clients: FanClient[] = [];
  let load: LoadWorker | null = null;
  let sampler: NodeJS.Timeout | null = null;
  try {
    // The ingest runs in a worker thread; started (and its modules loaded) before anything is measured.
    load = new LoadWorker({ mode: 'background', port: stack.port, key: KEY, rate: BACKGROUND_RATE, seed: 101 + runNo });
    await load.next('ready', 60_000);
    // Some traffic first, so the snapshot has rows.
    const warm = new TrafficGenerator({ seed: 99 + runNo, users: 200_000, startTs: Date.now(), eventsPerSecond: BACKGROUND_RATE, diurnal: false, lateRate: 0 });
    const now = Date.now();
    await stack.gate.run((e) => e.ingest(Array.from({ length: 5_000 }, () => compact(warm.nextEvent(), now))));
    collect?.();
    const start = memSample(stack.server);
    let snapshotRows = 0;
    const t0 = performance.now();
    const slowEvery = s.slow > 0 ? Math.floor(s.clients / s.slow) : Number.POSITIVE_INFINITY;
    let slowCount = 0;
    // Connect in waves of 100 (1,000 simultaneous handshakes are fine for uWS, but the client side gets bursty).
    for (let base = 0; base < s.clients; base += 100) {
      const wave: Promise<void>[] = [];
      for (let i = base; i < Math.min(s.clients, base + 100); i++) {
        const ws = new WebSocket(`ws://127.0.0.1:${stack.port}/v1/kpis?key=${KEY}`, 'json', { perMessageDeflate: false, skipUTF8Validation: true });
        const slow = slowCount < s.slow && i % slowEvery === 0;
        if (slow) slowCount++;
        const c: FanClient = { ws, slow, frames: 0, bytes: 0, resnapshots: 0, counting: false };
        clients.push(c);
        wave.push(new Promise<void>((resolve, reject) => {
          let snap = false;
          ws.on('message', (data) => {
            const b = data as Buffer;
            if (!snap) {
              const f = JSON.parse(b.toString('utf8')) as { kpis?: { snapshot: boolean; rows: unknown[] } };
              if (f.kpis?.snapshot === true) {
                snap = true;
                snapshotRows = f.kpis.rows.length;
                if (c.slow) (ws as unknown as { _socket: net.Socket })._socket.pause();
                resolve();
              }
              return;
            }
            if (!c.counting) return;
            c.frames++;
            c.bytes += b.length;
            if (b.subarray(0, 48).toString('latin1').includes('"snapshot":true')) c.resnapshots++;
          });
          ws.once('open', () => ws.send(JSON.stringify({ subscribe_kpis: { id: 'k', grain: 'day' } })));
          ws.once('error', reject);
          ws.on('error', () => undefined); // after the subscription: shows as missing frames, not a crash
        }));
      }
      await Promise.all(wave);
    }
    const subscribeMs = performance.now() - t0;
    const afterSubs = memSample(stack.server);
    collect?.();
    const afterSubsGc = process.memoryUsage().heapUsed;

    // The measured window: ingest at 20k ev/s, every fast client counting its frames.
    const framesBefore = stack.server.kpis.framesSent;
    for (const c of clients) c.counting = !c.slow;
    const series: MemSample[] = [];
    sampler = setInterval(() => series.push(memSample(stack.server)), 1000);
    const w0 = process.hrtime.bigint();
    const tw = performance.now();
    load.send({ type: 'start' });
    await sleep(s.durationMs);
    load.send({ type: 'stop' });
    const { bg } = await load.next('stopped', 60_000);
    // Two coalescing ticks for the last changes to go out and arrive.
    await sleep(600);
    for (const c of clients) c.counting = false;
    const ns = process.hrtime.bigint() - w0;
    const windowMs = performance.now() - tw;
    clearInterval(sampler);
    sampler = null;
    const end = memSample(stack.server);
    series.push(end);
    collect?.();
    const endGc = process.memoryUsage().heapUsed;
    const framesSentByServer = stack.server.kpis.framesSent - framesBefore;

    const fast = clients.filter((c) => !c.slow);
    const fastFrames = fast.reduce((a, c) => a + c.frames, 0);
    const peak: MemSample = {
      rss: Math.max(...series.map((x) => x.rss)), heap: Math.max(...series.map((x) => x.heap)), external: Math.max(...series.map((x) => x.external)),
      buffered: Math.max(...series.map((x) => x.buffered)), maxBuffered: Math.max(...series.map((x) => x.maxBuffered)),
    };
    consume(fast.filter((c) => c.frames > 0).length); // frame counts vary with timing; every fast client getting some does not
    return {
      ns,
      run: {
        fastFrames, fastBytes: fast.reduce((a, c) => a + c.bytes, 0), fastResnapshots: fast.reduce((a, c) => a + c.resnapshots, 0),
        minPerFast: Math.min(...fast.map((c) => c.frames)), maxPerFast: Math.max(...fast.map((c) => c.frames)),
        framesSentByServer, snapshotRows, subscribeMs, windowMs, bgRate: bg.achievedRate, bg,
        start, afterSubs, afterSubsGc, peak, end, endGc, series,
      },
    };
  } finally {
    if (sampler !== null) clearInterval(sampler);
    await load?.close();
    await terminateAll(clients.map((c) => c.ws));
    await stack.close();
  }
}

/** `clients` sockets, `slow` of them never reading. */
export function kpiFanoutScenario(clients = 1_000, slow = 100): Scenario<FanState> {
  return {
    name: `KPI fan-out to ${clients.toLocaleString('en-US')} sockets${slow !== 100 ? ` (${slow} slow)` : ''}`,
    async setup(ctx) {
      // Each socket costs two descriptors here (client and server end in one process), plus engine files.
      const fdLimit = openFilesLimit();
      let n = clients;
      let k = slow;
      if (fdLimit !== null && Number.isFinite(fdLimit) && 2 * n + 256 > fdLimit) {
        n = Math.max(10, Math.floor((fdLimit - 256) / 2));
        k = Math.round((slow * n) / clients);
      }
      const sysctl = (f: string): string => {
        try {
          return readFileSync(`/proc/sys/net/ipv4/${f}`, 'utf8').trim().split(/\s+/).map((x) => `${Math.round(Number(x) / 1024)}K`).join('/');
        } catch {
          return '?';
        }
      };
      return { tcpMem: `tcp_wmem ${sysctl('tcp_wmem')}, tcp_rmem ${sysctl('tcp_rmem')}`, clients: n, slow: k, durationMs: ctx.quick ? 3_000 : 10_000, fdLimit, reduced: n !== clients, runs: [] };
    },
    async run(s): Promise<TimedItems> {
      const { run, ns } = await fanRun(s, s.runs.length);
      s.runs.push(run);
      return { items: run.fastFrames, ns };
    },
    notes(s) {
      const r = s.runs[s.runs.length - 1];
      if (r === undefined) return '';
      const nFast = s.clients - s.slow;
      const perFast = r.fastFrames / Math.max(1, nFast);
      const slowSent = Math.max(0, r.framesSentByServer - r.fastFrames);
      const perSlow = s.slow > 0 ? slowSent / s.slow : 0;
      const growth = (a: number, b: number): string => `${b >= a ? '+' : ''}${mib(b - a)}`;
      return [
        `${int(s.clients)} ws clients (json) on /v1/kpis, day grain, ${int(s.slow)} slow (TCP socket paused after the snapshot); open-files limit ${s.fdLimit === null ? 'unknown' : String(s.fdLimit)}${s.reduced ? ` (REDUCED from 1,000 sockets to fit it)` : ''}`,
        `LevelDB state, kpiCoalesceMs 250, background ${int(r.bgRate)} ev/s (target ${int(BACKGROUND_RATE)}; ${int(r.bg.requests)} POSTs, ${int(r.bg.stalls)} ticks skipped with 4 in flight, ${int(r.bg.failed)} failed) for ${(s.durationMs / 1000).toFixed(0)} s + 0.6 s to settle; last of ${s.runs.length} run(s) (first = warm-up)`,
        `subscribe phase ${int(r.subscribeMs)} ms, snapshot ${r.snapshotRows} rows`,
        `fast clients: ${int(r.fastFrames)} delta frames (${f2(perFast)} each, min ${r.minPerFast}, max ${r.maxPerFast}; ${(r.fastBytes / MiB).toFixed(1)} MiB; ${r.fastResnapshots} re-snapshots)`,
        `one delta per ${int(r.windowMs / Math.max(1, perFast))} ms per client (coalescing 250 ms)`,
        `server sent ${int(r.framesSentByServer)} kpi frames; to slow sockets ≈ ${f2(perSlow)} each (≈ ${int((perSlow * r.fastBytes) / Math.max(1, r.fastFrames) / 1024)} KiB), i.e. ≈ ${f2(Math.max(0, perFast - perSlow))} per slow socket skipped for backpressure`,
        `uWS buffered (all sockets): max ${(r.peak.buffered / MiB).toFixed(1)} MiB, max one socket ${(r.peak.maxBuffered / MiB).toFixed(2)} MiB, at end ${(r.end.buffered / MiB).toFixed(1)} MiB (what the kernel's loopback buffers take — ${s.tcpMem} — never shows here; the server skips a socket above maxBufferedBytes 1 MiB of uWS buffer)`,
        `ingest loader in a worker thread, the ${int(s.clients)} ws clients in the main thread with the server; process memory (rss: whole process incl. the worker; heap/external: the main thread = server + clients), MiB: start rss ${mib(r.start.rss)} heap ${mib(r.start.heap)}; after subscriptions rss ${mib(r.afterSubs.rss)} heap ${mib(r.afterSubs.heap)} (after GC ${mib(r.afterSubsGc)}); during run max rss ${mib(r.peak.rss)} (${growth(r.afterSubs.rss, r.peak.rss)}) max heap ${mib(r.peak.heap)} (${growth(r.afterSubs.heap, r.peak.heap)}) max external ${mib(r.peak.external)}; end rss ${mib(r.end.rss)}, heap after GC ${mib(r.endGc)} (${growth(r.afterSubsGc, r.endGc)} vs after subscriptions)`,
        `rss per second: ${r.series.map((x) => mib(x.rss)).join(' ')}`,
      ].join('; ');
    },
  };
}

export const kpiFanoutDefaultScenario = kpiFanoutScenario(1_000, 100);
