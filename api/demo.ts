import { existsSync, mkdtempSync, readFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { performance } from 'node:perf_hooks';
import { setTimeout as sleep } from 'node:timers/promises';
import { parse as parseYaml } from 'yaml';
import WebSocket from 'ws';
import { EventColumns } from '../engine/batch.js';
import { Engine } from '../engine/engine.js';
import { TrafficGenerator, isBad } from '../engine/sources/generator.js';
import { appendJsonEvent, appendObjectEvent } from '../engine/codec.js';
import { newApiKey } from './auth.js';
import { EngineGate } from './gate.js';
import { CrmServer } from './server.js';
import { TriggerHub } from './trigger-hub.js';

/**
 * `crmstream demo` (`npm start`): the whole loop in one process — the traffic generator (event time
 * following the wall clock) → the engine (KPIs, segments, the example campaigns) → the HTTP /
 * WebSocket server with the dashboard → a demo sender that takes triggers over `/v1/triggers`,
 * acks them and reports `message_*` events back over `POST /v1/events`, as a KakaoTalk or push
 * sender would. Prints the dashboard URL with a fresh API key, and a stats line every two seconds.
 */

export interface DemoOptions {
  port: number;
  dataDir?: string;
  rate: number;
  duration?: number;
  users: number;
}

const TICK_MS = 100;
const HERE = path.dirname(fileURLToPath(import.meta.url));
/** examples/ of the project, from the sources (api/) or from dist/api/. */
const EXAMPLE_CAMPAIGNS = [path.resolve(HERE, '../examples/campaigns.yaml'), path.resolve(HERE, '../../examples/campaigns.yaml')].find((f) => existsSync(f))!;

export async function runDemo(o: DemoOptions): Promise<void> {
  const dataDir = o.dataDir ?? mkdtempSync(path.join(os.tmpdir(), 'crmstream-demo-'));
  // The generated traffic carries no consent props: the demo counts consent as given.
  const campaigns = { ...(parseYaml(readFileSync(EXAMPLE_CAMPAIGNS, 'utf8')) as Record<string, unknown>), consent: { unknown: 'allow' } };
  const hub = new TriggerHub();
  const engine = await Engine.create({ dataDir, campaigns: { definitions: campaigns }, checkpoint: { triggerLatencyMs: 0 } }, { sinks: [hub] });
  const gate = new EngineGate(engine);
  const { key, entry } = newApiKey('demo', ['admin']);
  const server = await CrmServer.start(gate, hub, { port: o.port, keys: [entry] });
  const base = `http://127.0.0.1:${server.port}`;
  const tz = engine.config.time.timeZone;
  // A small share of late, duplicate and malformed records, so the dead-letter path shows too.
  const gen = new TrafficGenerator({
    seed: (Date.now() >>> 0) || 1, users: o.users, startTs: Date.now(), eventsPerSecond: Math.max(1, o.rate),
    lateRate: 0.01, duplicateRate: 0.005, badRate: 0.001, maxLateMs: 60 * 60_000,
  });
  const out = process.stdout;
  out.write(`crmstream demo: state in ${dataDir}\n`);
  out.write(`  dashboard: ${base}/#key=${key}\n`);
  out.write(`  api key (admin): ${key}   e.g. curl -H 'authorization: Bearer ${key}' '${base}/v1/kpis?grain=day'\n`);
  out.write(`  generating ${o.rate} events/s over ${o.users} users; Ctrl-C stops (state is checkpointed)\n`);
  const sender = new DemoSender(base, key);
  sender.start();

  let stopping = false;
  const stop = (): void => {
    stopping = true;
  };
  process.once('SIGINT', stop);
  process.once('SIGTERM', stop);

  const perTick = Math.max(1, Math.round((o.rate * TICK_MS) / 1000));
  const batch = new EventColumns(perTick);
  const started = performance.now();
  let lastReport = started;
  let sinceReport = 0;
  try {
    while (!stopping && (o.duration === undefined || performance.now() - started < o.duration * 1000)) {
      const tickStart = performance.now();
      batch.reset();
      for (let j = 0; j < perTick; j++) {
        const r = gen.nextRecord();
        if (isBad(r)) appendJsonEvent(batch, r.json, 'demo', tz);
        else appendObjectEvent(batch, r, 0, null, 'demo', tz);
      }
      await gate.run((e) => e.ingestColumns(batch));
      sinceReport += perTick;
      const now = performance.now();
      if (now - lastReport >= 2000) {
        const s = engine.stats();
        const rejects = Object.entries(engine.rejectCounts()).filter(([, n]) => n > 0).map(([k, n]) => `${k}=${n}`).join(' ');
        out.write(
          `${new Date().toISOString()}  ${Math.round((sinceReport * 1000) / (now - lastReport))} ev/s  accepted=${s['accepted']}` +
          `  profiles(cached)=${s['cachedProfiles']}  triggers=${s['triggers']} (sent to the demo sender: ${sender.received})` +
          `  timers=${s['timersFired']}  watermark=${new Date(s['watermark']!).toISOString()}  rejected: ${rejects || 'none'}\n`,
        );
        lastReport = now;
        sinceReport = 0;
      }
      const spare = TICK_MS - (performance.now() - tickStart);
      if (spare > 0) await sleep(spare);
    }
  } finally {
    process.off('SIGINT', stop);
    process.off('SIGTERM', stop);
    sender.stop();
    await server.close();
    await gate.run((e) => e.close());
    out.write(`crmstream demo: stopped; state checkpointed in ${dataDir}\n`);
  }
}

/**
 * A message sender as a real one would be: subscribes as group `demo-sender`, "sends" each trigger
 * (not the holdout's), acks, and reports delivery, opens and clicks back as events.
 */
class DemoSender {
  received = 0;
  private ws: WebSocket | null = null;
  private stopped = false;
  private pending: Record<string, unknown>[] = [];
  private flushTimer: NodeJS.Timeout | null = null;
  private n = 0;

  constructor(private readonly base: string, private readonly key: string) {}

  start(): void {
    this.connect();
    this.flushTimer = setInterval(() => void this.flush(), 500);
  }

  stop(): void {
    this.stopped = true;
    if (this.flushTimer !== null) clearInterval(this.flushTimer);
    this.ws?.close();
  }

  private connect(): void {
    if (this.stopped) return;
    const ws = new WebSocket(`${this.base.replace('http', 'ws')}/v1/triggers?key=${this.key}`, 'json');
    this.ws = ws;
    ws.on('open', () => ws.send(JSON.stringify({ subscribe_triggers: { group: 'demo-sender', max_in_flight: 500 } })));
    ws.on('message', (data) => {
      const f = JSON.parse(String(data)) as { trigger?: { seq: number; trigger_id: string; campaign_id: string; variant: string; control: boolean; user_id: string; send_after_ts: number } };
      const t = f.trigger;
      if (t === undefined) return;
      this.received++;
      if (!t.control) this.report(t);
      ws.send(JSON.stringify({ ack: { seq: t.seq } }));
    });
    ws.on('close', () => {
      if (!this.stopped) setTimeout(() => this.connect(), 1000);
    });
    ws.on('error', () => undefined); // 'close' follows and reconnects
  }

  /** Delivery always, an open for about a third, a click for a tenth — as message_* events. */
  private report(t: { trigger_id: string; campaign_id: string; variant: string; user_id: string; send_after_ts: number }): void {
    const ts = Math.max(Date.now(), Number(t.send_after_ts));
    const user = t.user_id.startsWith('anon:') ? { anonymous_id: t.user_id.slice(5) } : { user_id: t.user_id };
    const ev = (type: string, dt: number): Record<string, unknown> => ({
      event_id: `${t.trigger_id}-${type}`, type, ...user, ts: ts + dt, campaign_id: t.campaign_id, variant: t.variant, trigger_id: t.trigger_id,
    });
    this.pending.push(ev('message_sent', 0), ev('message_delivered', 200));
    const k = this.n++;
    if (k % 3 === 0) this.pending.push(ev('message_opened', 5_000));
    if (k % 10 === 0) this.pending.push(ev('message_clicked', 8_000));
  }

  private async flush(): Promise<void> {
    if (this.pending.length === 0) return;
    const events = this.pending;
    this.pending = [];
    try {
      await fetch(`${this.base}/v1/events`, { method: 'POST', headers: { authorization: `Bearer ${this.key}`, 'content-type': 'application/json' }, body: JSON.stringify(events) });
    } catch {
      // the demo is stopping
    }
  }
}
