import { describe, expect, it } from 'vitest';
import { Engine } from '../../engine/engine.js';
import { TrafficGenerator, isBad } from '../../engine/sources/generator.js';
import { EventColumns } from '../../engine/batch.js';
import { appendJsonEvent, appendObjectEvent } from '../../engine/codec.js';
import { ReminderOperator } from '../fixtures/reminder-operator.js';
import { columnsOf, DAY, T0, tempDir } from '../helpers.js';

/**
 * The bounded caches are invisible in results: a tiny profile/alias cache (constant eviction, every
 * miss read back from LevelDB) and frequent checkpoints give exactly the state of a run that keeps
 * everything in memory.
 */

async function runAll(cfg: Parameters<typeof Engine.create>[0], records: ReturnType<TrafficGenerator['takeRecords']>) {
  const engine = await Engine.create(cfg, { operators: [new ReminderOperator()], tickMs: 1 });
  const b = new EventColumns(500);
  for (let s = 0; s < records.length; s += 500) {
    b.reset();
    for (const r of records.slice(s, s + 500)) {
      if (isBad(r)) appendJsonEvent(b, r.json, 'gen', 'UTC');
      else appendObjectEvent(b, r, 0, null, 'gen', 'UTC');
    }
    await engine.ingestColumns(b);
  }
  await engine.advanceTo(T0 + 400 * DAY);
  await engine.checkpoint();
  const profiles: unknown[] = [];
  for await (const p of engine.profilesStored()) profiles.push(p);
  const stats = engine.stats();
  const rejects = engine.rejectCounts();
  await engine.close();
  return { profiles, stats, rejects };
}

describe('bounded memory', () => {
  it('a 16-profile cache with LevelDB gives the same state as an unbounded in-memory run', async () => {
    const gen = new TrafficGenerator({ seed: 9, users: 3_000, eventsPerSecond: 0.05, lateRate: 0.03, duplicateRate: 0.01, badRate: 0.005, startTs: T0 });
    const records = gen.takeRecords(40_000);
    const { dir, cleanup } = tempDir();
    try {
      const big = await runAll({ checkpoint: { intervalMs: 1e9, maxDirtyUsers: 1e9 } }, records);
      const small = await runAll({ dataDir: dir, state: { cacheUsers: 16 }, checkpoint: { intervalMs: 0, maxDirtyUsers: 64 } }, records);
      // Most profiles were evicted and read back from LevelDB more than once.
      expect(small.stats['profileMisses']).toBeGreaterThan(2 * small.profiles.length);
      expect(small.stats['cachedProfiles']).toBeLessThanOrEqual(16 + 500); // the bound plus one batch of dirty profiles
      expect(small.rejects).toEqual(big.rejects);
      expect(small.stats['timersFired']).toBe(big.stats['timersFired']);
      expect(small.profiles).toEqual(big.profiles);
    } finally {
      cleanup();
    }
  }, 120_000);

  it('forgets event ids past the de-duplication horizon, and remembers them inside it across a restart', async () => {
    const { dir, cleanup } = tempDir();
    try {
      const cfg = { dataDir: dir, dedupe: { horizonMs: 4 * DAY } };
      let engine = await Engine.create(cfg, { tickMs: 1 });
      await engine.ingestColumns(columnsOf([{ event_id: 'x', type: 'visit', user_id: 'u', ts: T0 }]));
      await engine.ingestColumns(columnsOf([{ event_id: 'y', type: 'visit', user_id: 'u', ts: T0 + 2 * DAY }]));
      await engine.close();
      engine = await Engine.create(cfg, { tickMs: 1 });
      // Inside the horizon: 'x' is a duplicate even after the restart.
      expect((await engine.ingestColumns(columnsOf([{ event_id: 'x', type: 'visit', user_id: 'u', ts: T0 + 2 * DAY }]))).rejected).toBe(1);
      // Time moves 6 days on: 'x' (first seen at T0) is past the 4-day horizon and forgotten, 'y' is not.
      await engine.ingestColumns(columnsOf([{ event_id: 'z', type: 'visit', user_id: 'u', ts: T0 + 6 * DAY + 1000 }]));
      const r = await engine.ingestColumns(columnsOf([
        { event_id: 'x', type: 'visit', user_id: 'u', ts: T0 + 6 * DAY },
        { event_id: 'y', type: 'visit', user_id: 'u', ts: T0 + 6 * DAY },
      ]));
      expect(r).toEqual({ accepted: 1, rejected: 1 });
      expect(engine.stats()['dedupeIds']).toBe(3);
      await engine.close();
    } finally {
      cleanup();
    }
  });
});
