/**
 * The client side of the server scenarios (bench/server.bench.ts), run in a worker thread so the
 * server (api/server.ts, in the bench's main thread) keeps its thread to itself: the background
 * load generator, the probe sender and the WebSocket trigger sender that measures the latency.
 * It imports no server code (uWS stays in the main thread).
 *
 * Two modes (`workerData.mode`):
 *
 * - `trigger`: opens the trigger sender (`ws`, sub-protocol json, group `bench`, acks every frame),
 *   subscribes, starts the background load, lets it settle, posts `settled` and waits for the main
 *   thread's `probe`; then one `probe_ping` POST per `probeEveryMs` for a fresh user, `probes` in all.
 *   The background stops with the last probe; it waits (bounded) for the last trigger frames and
 *   posts `done` with the counters and the samples (POST start → trigger frame and POST start →
 *   HTTP answer, ms, both measured on this thread's clock; Float64Arrays, transferred).
 * - `background`: posts `ready`; on `start` starts the background load, on `stop` stops it, waits
 *   for the answers and posts `stopped` with the counters.
 *
 * Either way, it closes everything it opened (timers, agents, sockets) before it posts its last
 * message, and the main thread terminates it.
 *
 * Background load: the generator's mix of users, sessions and types with event time = the wall
 * clock at send time; every 10 ms the events due since the start go out in one JSON POST (~200;
 * more when a timer fired late, at most 2,000), at most 4 requests in flight — when the server
 * cannot keep up the loader falls behind rather than queueing without bound, and the counters give
 * the rate it achieved.
 */
import http from 'node:http';
import { performance } from 'node:perf_hooks';
import { setTimeout as sleep } from 'node:timers/promises';
import { isMainThread, parentPort, workerData } from 'node:worker_threads';
import WebSocket from 'ws';
import { TrafficGenerator, type GenEvent } from '../engine/sources/generator.js';

export const BACKGROUND_TICK_MS = 10;

// ---------------------------------------------------------------------------------------------------
// Messages

export interface TriggerLoadData {
  readonly mode: 'trigger';
  readonly port: number;
  readonly key: string;
  /** Background events/s (0: none). */
  readonly rate: number;
  readonly seed: number;
  readonly probes: number;
  readonly probeEveryMs: number;
  /** Background alone before `settled` (ms). */
  readonly settleMs: number;
  /** Longest wait for the last trigger frames after the last probe (ms). */
  readonly drainMs: number;
  /** Makes the probes' users and event ids unique to this run. */
  readonly tag: string;
}

export interface BackgroundLoadData {
  readonly mode: 'background';
  readonly port: number;
  readonly key: string;
  readonly rate: number;
  readonly seed: number;
}

export type LoadData = TriggerLoadData | BackgroundLoadData;

export interface BackgroundCounters {
  generated: number;
  accepted: number;
  rejected: number;
  failed: number;
  requests: number;
  /** Ticks that found 4 requests still in flight. */
  stalls: number;
  /** Sending time, ms. */
  elapsedMs: number;
  /** (accepted + rejected) / sending time, events/s. */
  achievedRate: number;
}

export interface TriggerResult {
  probes: number;
  received: number;
  /** Probes the engine did not accept (should be 0). */
  probeRejected: number;
  /** POST start → trigger frame, ms, sorted (received probes only). */
  lat: Float64Array;
  /** POST start → HTTP answer, ms, sorted. */
  answer: Float64Array;
  /** The probe window on the shared clock (performance.timeOrigin + now, ms): first probe sent, last trigger frame received. */
  t0Abs: number;
  endAbs: number;
  /** The window on this thread's clock, ms. */
  windowMs: number;
  bg: BackgroundCounters;
}

/** worker → main. */
export type LoadMessage =
  | { type: 'ready' }
  | { type: 'settled' }
  | { type: 'done'; result: TriggerResult }
  | { type: 'stopped'; bg: BackgroundCounters }
  | { type: 'error'; message: string };

/** main → worker. */
export type LoadCommand = { type: 'probe' } | { type: 'start' } | { type: 'stop' };

// ---------------------------------------------------------------------------------------------------
// Clients

interface PostResult {
  status: number;
  body: string;
}

/** One POST /v1/events through a keep-alive agent (node:http: the agent can be destroyed at the end). */
export function postEvents(agent: http.Agent, port: number, key: string, body: string): Promise<PostResult> {
  return new Promise((resolve, reject) => {
    const req = http.request({
      host: '127.0.0.1', port, path: '/v1/events', method: 'POST', agent,
      headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) },
    }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body: Buffer.concat(chunks).toString('utf8') }));
      res.on('error', reject);
    });
    // A request the server never answers must not hold a run forever.
    req.setTimeout(30_000, () => req.destroy(new Error('POST /v1/events timed out')));
    req.on('error', reject);
    req.end(body);
  });
}

/** A generated event as a compact JSON object (no empty fields), its time replaced by `ts`. */
export function compact(e: GenEvent, ts: number): Record<string, unknown> {
  const o: Record<string, unknown> = { event_id: e.event_id, type: e.type, ts };
  if (e.user_id !== '') o['user_id'] = e.user_id;
  if (e.anonymous_id !== '') o['anonymous_id'] = e.anonymous_id;
  if (e.amount !== 0) {
    o['amount'] = e.amount;
    o['currency'] = e.currency;
  }
  if (e.order_id !== '') o['order_id'] = e.order_id;
  if (e.channel !== '') o['channel'] = e.channel;
  if (e.platform !== '') o['platform'] = e.platform;
  if (e.campaign_id !== '') o['campaign_id'] = e.campaign_id;
  if (e.variant !== '') o['variant'] = e.variant;
  if (e.trigger_id !== '') o['trigger_id'] = e.trigger_id;
  if (Object.keys(e.props).length > 0) o['props'] = e.props;
  return o;
}

/**
 * Ordinary traffic at `rate` events/s of wall time: every 10 ms, the events due since the start
 * (so a late timer makes the next batch bigger, up to 2,000) in one JSON POST, at most 4 requests
 * in flight (beyond that it falls behind, and the achieved rate says so).
 */
class Background {
  generated = 0;
  accepted = 0;
  rejected = 0;
  failed = 0;
  requests = 0;
  stalls = 0;
  private inFlight = 0;
  private t0 = 0;
  private elapsed = 0;
  private timer: NodeJS.Timeout | null = null;
  private readonly pending = new Set<Promise<void>>();
  private readonly gen: TrafficGenerator;
  private readonly agent = new http.Agent({ keepAlive: true, maxSockets: 4 });

  constructor(private readonly port: number, private readonly key: string, private readonly rate: number, seed: number) {
    this.gen = new TrafficGenerator({ seed, users: 200_000, startTs: Date.now(), eventsPerSecond: Math.max(1, rate), diurnal: false, lateRate: 0 });
  }

  start(): void {
    if (this.timer !== null) return;
    this.t0 = performance.now();
    if (this.rate <= 0) return;
    this.timer = setInterval(() => this.tick(), BACKGROUND_TICK_MS);
  }

  private tick(): void {
    const due = Math.floor(((performance.now() - this.t0) * this.rate) / 1000) - this.generated;
    if (due <= 0) return;
    if (this.inFlight >= 4) {
      this.stalls++;
      return;
    }
    const n = Math.min(due, 2_000);
    const now = Date.now();
    const events = new Array<Record<string, unknown>>(n);
    for (let i = 0; i < n; i++) events[i] = compact(this.gen.nextEvent(), now);
    this.generated += n;
    this.inFlight++;
    this.requests++;
    const p: Promise<void> = postEvents(this.agent, this.port, this.key, JSON.stringify(events)).then((r) => {
      if (r.status !== 200) {
        this.failed += n;
        return;
      }
      const a = JSON.parse(r.body) as { accepted: number; rejected: number };
      this.accepted += a.accepted;
      this.rejected += a.rejected;
    }, () => {
      this.failed += n;
    }).finally(() => {
      this.inFlight--;
      this.pending.delete(p);
    });
    this.pending.add(p);
  }

  /** Stops sending and waits (bounded by the POST timeout) for the answers. */
  async stop(): Promise<void> {
    if (this.timer !== null) {
      clearInterval(this.timer);
      this.timer = null;
      this.elapsed = performance.now() - this.t0;
    }
    await Promise.all([...this.pending]);
  }

  close(): void {
    this.agent.destroy();
  }

  counters(): BackgroundCounters {
    return {
      generated: this.generated, accepted: this.accepted, rejected: this.rejected, failed: this.failed,
      requests: this.requests, stalls: this.stalls, elapsedMs: this.elapsed,
      achievedRate: this.elapsed > 0 ? (this.accepted + this.rejected) / (this.elapsed / 1000) : 0,
    };
  }
}

// ---------------------------------------------------------------------------------------------------
// The worker

/** Resolves on the first command of `type` from the main thread. */
function command(type: LoadCommand['type']): Promise<void> {
  return new Promise((resolve) => {
    const on = (m: LoadCommand): void => {
      if (m.type !== type) return;
      parentPort?.off('message', on);
      resolve();
    };
    parentPort?.on('message', on);
  });
}

function post(m: LoadMessage, transfer: ArrayBuffer[] = []): void {
  parentPort?.postMessage(m, transfer);
}

/** `p`, or a rejection after `ms` (the timer is cleared either way). */
async function within<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | null = null;
  try {
    return await Promise.race([p, new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new Error(`${what} within ${ms} ms`)), ms);
    })]);
  } finally {
    if (timer !== null) clearTimeout(timer);
  }
}

function waitOpen(ws: WebSocket): Promise<void> {
  return new Promise((resolve, reject) => {
    ws.once('open', () => resolve());
    ws.once('error', reject);
  });
}

/** Destroys the socket (no close handshake) and waits, bounded, for its close event. */
async function terminate(ws: WebSocket): Promise<void> {
  if (ws.readyState === WebSocket.CLOSED) return;
  const closed = new Promise<void>((resolve) => ws.once('close', () => resolve()));
  ws.terminate();
  await within(closed, 5_000, 'close').catch(() => undefined);
}

async function triggerLoad(d: TriggerLoadData): Promise<void> {
  const bg = new Background(d.port, d.key, d.rate, d.seed);
  // No socket limit: a probe must reach the server when it is sent, not queue in the client.
  const probeAgent = new http.Agent({ keepAlive: true });
  const ws = new WebSocket(`ws://127.0.0.1:${d.port}/v1/triggers?key=${d.key}`, 'json', { perMessageDeflate: false });
  let timer: NodeJS.Timeout | null = null;
  const inFlight = new Set<Promise<void>>();
  try {
    const n = d.probes;
    const sentAt = new Float64Array(n).fill(Number.NaN);
    const lat = new Float64Array(n).fill(Number.NaN);
    const answer = new Float64Array(n).fill(Number.NaN);
    const byUser = new Map<string, number>();
    let received = 0;
    let lastReceivedAt = 0;
    let probeRejected = 0;
    let allIn: (() => void) | null = null;
    let subscribed: (() => void) | null = null;
    const subscribedP = new Promise<void>((r) => {
      subscribed = r;
    });
    ws.on('message', (data) => {
      const now = performance.now();
      const f = JSON.parse(String(data)) as { trigger?: { seq: number; user_id: string }; subscribed?: unknown };
      if (f.subscribed !== undefined) subscribed?.();
      const t = f.trigger;
      if (t === undefined) return;
      ws.send(JSON.stringify({ ack: { seq: t.seq } }));
      const i = byUser.get(t.user_id);
      if (i === undefined || !Number.isNaN(lat[i]!)) return;
      lat[i] = now - sentAt[i]!;
      received++;
      lastReceivedAt = now;
      if (received === n) allIn?.();
    });
    await within(waitOpen(ws), 10_000, 'trigger sender: no connection');
    ws.on('error', () => undefined); // a late socket error must not crash the run; a lost sender shows as lost probes
    ws.send(JSON.stringify({ subscribe_triggers: { group: 'bench', max_in_flight: 1000 } }));
    await within(subscribedP, 10_000, 'trigger sender: not subscribed');

    // Background first, a moment to settle, then the probes on a fixed schedule (catching up when a timer is late).
    bg.start();
    await sleep(d.settleMs);
    const go = command('probe');
    post({ type: 'settled' });
    await go;
    let next = 0;
    const t0 = performance.now();
    const fire = (): void => {
      const due = Math.min(n, Math.floor((performance.now() - t0) / d.probeEveryMs) + 1);
      for (; next < due; next++) {
        const i = next;
        const user = `probe-${d.tag}-${i}`;
        byUser.set(user, i);
        const body = JSON.stringify([{ event_id: `p-${d.tag}-${i}`, type: 'probe_ping', user_id: user, ts: Date.now() }]);
        sentAt[i] = performance.now();
        const p: Promise<void> = postEvents(probeAgent, d.port, d.key, body).then((r) => {
          answer[i] = performance.now() - sentAt[i]!;
          if (r.status !== 200 || (JSON.parse(r.body) as { accepted: number }).accepted !== 1) probeRejected++;
        }, () => {
          probeRejected++;
        }).finally(() => inFlight.delete(p));
        inFlight.add(p);
      }
    };
    fire();
    timer = setInterval(fire, d.probeEveryMs);
    // Bounded: the schedule ends at n × probeEveryMs whatever the timers do (plus slack).
    const sendUntil = t0 + n * d.probeEveryMs + 60_000;
    while (next < n && performance.now() < sendUntil) await sleep(20);
    clearInterval(timer);
    timer = null;
    // The background stops with the last probe; the probes still queued keep the wait they had.
    const allInP = new Promise<void>((r) => {
      allIn = r;
      if (received === n) r();
    });
    await bg.stop();
    await within(allInP, d.drainMs, 'last trigger frames').catch(() => undefined); // the lost ones show as lost probes
    const end = received > 0 ? lastReceivedAt : performance.now();
    await Promise.all([...inFlight]);
    const latS = lat.filter((x) => !Number.isNaN(x)).sort();
    const answerS = answer.filter((x) => !Number.isNaN(x)).sort();
    bg.close();
    probeAgent.destroy();
    await terminate(ws);
    post({
      type: 'done',
      result: {
        probes: n, received, probeRejected, lat: latS, answer: answerS,
        t0Abs: performance.timeOrigin + t0, endAbs: performance.timeOrigin + end, windowMs: end - t0,
        bg: bg.counters(),
      },
    }, [latS.buffer as ArrayBuffer, answerS.buffer as ArrayBuffer]);
  } finally {
    if (timer !== null) clearInterval(timer);
    await bg.stop();
    bg.close();
    probeAgent.destroy();
    await terminate(ws);
  }
}

async function backgroundLoad(d: BackgroundLoadData): Promise<void> {
  const bg = new Background(d.port, d.key, d.rate, d.seed);
  try {
    const start = command('start');
    const stop = command('stop');
    post({ type: 'ready' });
    await start;
    bg.start();
    await stop;
    await bg.stop();
    bg.close();
    post({ type: 'stopped', bg: bg.counters() });
  } finally {
    await bg.stop();
    bg.close();
  }
}

const data = workerData as LoadData | null;
if (!isMainThread && parentPort !== null && data !== null && typeof data === 'object' && (data.mode === 'trigger' || data.mode === 'background')) {
  (data.mode === 'trigger' ? triggerLoad(data) : backgroundLoad(data)).catch((err: unknown) => {
    post({ type: 'error', message: err instanceof Error ? (err.stack ?? err.message) : String(err) });
  });
}
