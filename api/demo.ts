import { mkdtempSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { setTimeout as sleep } from 'node:timers/promises';
import { EventColumns } from '../engine/batch.js';
import { Engine } from '../engine/engine.js';
import { TrafficGenerator, isBad } from '../engine/sources/generator.js';
import { appendJsonEvent, appendObjectEvent } from '../engine/codec.js';

/**
 * `crmstream demo`: the engine fed live by the traffic generator, event time following the wall
 * clock, with a stats line every two seconds. Later issues add the mock Kafka cluster between
 * generator and engine, and the WebSocket/HTTP server with the dashboard.
 */

export interface DemoOptions {
  port: number;
  dataDir?: string;
  rate: number;
  duration?: number;
  users: number;
}

const TICK_MS = 100;

export async function runDemo(o: DemoOptions): Promise<void> {
  const dataDir = o.dataDir ?? mkdtempSync(path.join(os.tmpdir(), 'crmstream-demo-'));
  const engine = await Engine.create({ dataDir });
  const tz = engine.config.time.timeZone;
  // A small share of late, duplicate and malformed records, so the dead-letter path shows too.
  const gen = new TrafficGenerator({
    seed: (Date.now() >>> 0) || 1, users: o.users, startTs: Date.now(), eventsPerSecond: Math.max(1, o.rate),
    lateRate: 0.01, duplicateRate: 0.005, badRate: 0.001, maxLateMs: 60 * 60_000,
  });
  const out = process.stdout;
  out.write(`crmstream demo: state in ${dataDir}\n`);
  out.write(`  generating ${o.rate} events/s over ${o.users} users; Ctrl-C stops (state is checkpointed)\n`);

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
      await engine.ingestColumns(batch);
      sinceReport += perTick;
      const now = performance.now();
      if (now - lastReport >= 2000) {
        const s = engine.stats();
        const rejects = Object.entries(engine.rejectCounts()).filter(([, n]) => n > 0).map(([k, n]) => `${k}=${n}`).join(' ');
        out.write(
          `${new Date().toISOString()}  ${Math.round((sinceReport * 1000) / (now - lastReport))} ev/s  accepted=${s['accepted']}` +
          `  profiles(cached)=${s['cachedProfiles']}  aliases=${s['aliases']}  timers=${s['timersFired']}` +
          `  watermark=${new Date(s['watermark']!).toISOString()}  rejected: ${rejects || 'none'}\n`,
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
    await engine.close();
    out.write(`crmstream demo: stopped; state checkpointed in ${dataDir}\n`);
  }
}
