/**
 * HTTP ingest throughput with durable acknowledgements (issue 17, docs/GUARANTEES.md): how many
 * events/s `POST /v1/events` takes when every answer waits for the checkpoint holding its events
 * (group commit: the requests of one engine turn share one checkpoint), next to the same load
 * answered after processing only (`?ack=processed`, the fire-and-forget opt-out) in the same run.
 *
 * Load: 16 keep-alive HTTP clients in this process, each posting JSON batches of 100 generated
 * events (the generator's mix: sessions, carts, purchases, sign-ups; event time = now − 1 h + a
 * few ms per event, so time.maxFutureMs never applies) back to back; fresh event ids every timed
 * run. State: LevelDB (fsync per write) in a temp dir, default checkpoint settings. items = events
 * acknowledged; the time is the posting only (bodies are built before it); the notes give the
 * per-request latency percentiles and how many checkpoints the run took.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import { sha256Hex } from '../api/auth.js';
import { EngineGate } from '../api/gate.js';
import { CrmServer } from '../api/server.js';
import { TriggerHub } from '../api/trigger-hub.js';
import { Engine } from '../engine/engine.js';
import { TrafficGenerator } from '../engine/sources/generator.js';
import { consume, type Scenario, type TimedItems } from './harness.js';

const KEY = 'bench-ingest-key-0123456789';
const CLIENTS = 16;
const PER_REQUEST = 100;

interface State {
  dir: string;
  engine: Engine;
  gate: EngineGate;
  server: CrmServer;
  agent: http.Agent;
  templates: Record<string, unknown>[];
  run: number;
  latencies: number[];
  epochs: number;
}

function percentile(sorted: readonly number[], q: number): number {
  return sorted.length === 0 ? Number.NaN : sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))]!;
}

function post(s: State, body: string, ack: string): Promise<number> {
  return new Promise((resolve, reject) => {
    const req = http.request({
      host: '127.0.0.1', port: s.server.port, path: `/v1/events${ack}`, method: 'POST', agent: s.agent,
      headers: { authorization: `Bearer ${KEY}`, 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) },
    }, (res) => {
      let text = '';
      res.setEncoding('utf8');
      res.on('data', (d: string) => (text += d));
      res.on('end', () => {
        if (res.statusCode !== 200) reject(new Error(`POST /v1/events answered ${res.statusCode}: ${text}`));
        else resolve((JSON.parse(text) as { accepted: number }).accepted);
      });
    });
    req.on('error', reject);
    req.end(body);
  });
}

function scenario(name: string, ack: string): Scenario<State> {
  return {
    name,
    async setup(ctx) {
      const dir = mkdtempSync(path.join(os.tmpdir(), 'crm-bench-http-'));
      const hub = new TriggerHub();
      const engine = await Engine.create({ dataDir: dir }, { sinks: [hub] });
      const gate = new EngineGate(engine);
      const server = await CrmServer.start(gate, hub, { port: 0, keys: [{ name: 'bench', sha256: sha256Hex(KEY), scopes: ['ingest'] }] });
      const gen = new TrafficGenerator({ seed: 21, users: 20_000 });
      const n = ctx.quick ? 20_000 : 200_000;
      const t0 = Date.now() - 3_600_000;
      const templates: Record<string, unknown>[] = [];
      for (const e of gen.take(n)) templates.push({ ...e, ts: t0 + templates.length * 5 });
      return { dir, engine, gate, server, agent: new http.Agent({ keepAlive: true, maxSockets: CLIENTS }), templates, run: 0, latencies: [], epochs: 0 };
    },
    async run(s): Promise<TimedItems> {
      const run = s.run++;
      const bodies: string[] = [];
      for (let i = 0; i < s.templates.length; i += PER_REQUEST) {
        bodies.push(JSON.stringify(s.templates.slice(i, i + PER_REQUEST).map((e, k) => ({ ...e, event_id: `r${run}-${i + k}` }))));
      }
      const latencies: number[] = [];
      const epoch0 = s.engine.stats()['epoch']!;
      let next = 0;
      let accepted = 0;
      const started = process.hrtime.bigint();
      await Promise.all(Array.from({ length: CLIENTS }, async () => {
        while (next < bodies.length) {
          const body = bodies[next++]!;
          const t = performance.now();
          accepted += await post(s, body, ack);
          latencies.push(performance.now() - t);
        }
      }));
      const ns = process.hrtime.bigint() - started;
      consume(accepted);
      s.latencies = latencies.sort((a, b) => a - b);
      s.epochs = s.engine.stats()['epoch']! - epoch0;
      return { items: s.templates.length, ns };
    },
    async teardown(s) {
      s.agent.destroy();
      await s.server.close();
      await s.gate.run((e) => e.close());
      rmSync(s.dir, { recursive: true, force: true });
    },
    notes(s) {
      const l = s.latencies;
      const f = (v: number): string => `${v.toFixed(1)} ms`;
      return `${CLIENTS} keep-alive clients × JSON batches of ${PER_REQUEST} events, LevelDB (fsync per write); last run: ${l.length} requests, ` +
        `latency p50 ${f(percentile(l, 0.5))} p99 ${f(percentile(l, 0.99))} max ${f(l[l.length - 1] ?? Number.NaN)}; ${s.epochs} checkpoints ` +
        `(${(l.length / Math.max(1, s.epochs)).toFixed(1)} requests per checkpoint)`;
    },
  };
}

/** Every answer after the checkpoint holding its events (the default). */
export const httpIngestDurableScenario = scenario('HTTP ingest, durable acks (group commit)', '');
/** Answered after processing (`?ack=processed`): the same load without waiting for checkpoints. */
export const httpIngestProcessedScenario = scenario('HTTP ingest, ack=processed', '?ack=processed');
