import { describe, expect, it } from 'vitest';
import { Engine } from '../../engine/engine.js';
import { MemoryStore } from '../../state/memory.js';

/**
 * Finding 4 of issue 17: one event dated in the far future used to stop the engine — it moved the
 * watermark there, every later real event was `too_late`, and every timer fired at once. Now a
 * timestamp more than time.maxFutureMs after the processing clock is rejected `future_timestamp`
 * (dead-lettered, counted) and the watermark stays where the real events put it.
 */
describe('event time is protected from far-future timestamps', () => {
  it('a visit dated 2099 is rejected future_timestamp; the next real visit is accepted', async () => {
    const e = await Engine.create({}, { store: new MemoryStore() });
    const now = Date.now();
    const a = await e.ingest([{ event_id: 'f1', type: 'visit', user_id: 'mallory', ts: Date.UTC(2099, 0, 1) }]);
    const b = await e.ingest([{ event_id: 'r1', type: 'visit', user_id: 'alice', ts: now }]);
    expect(a.reasons).toEqual(['future_timestamp']);
    expect(b.reasons).toEqual(['']);
    expect(e.watermark).toBeLessThanOrEqual(now);
    expect(e.rejectCounts().future_timestamp).toBe(1);
    await e.close();
  });

  it('the bound is time.maxFutureMs of the processing clock; null switches it off', async () => {
    const now = Date.now();
    const e = await Engine.create({ time: { maxFutureMs: 3_600_000 } }, { store: new MemoryStore() });
    const r = await e.ingest([
      { event_id: 'a', type: 'visit', user_id: 'u', ts: now + 1_800_000 }, // 30 min ahead: a skewed device clock
      { event_id: 'b', type: 'visit', user_id: 'u', ts: now + 7_200_000 }, // 2 h ahead
    ]);
    expect(r.reasons).toEqual(['', 'future_timestamp']);
    await e.close();
    const off = await Engine.create({ time: { maxFutureMs: null } }, { store: new MemoryStore() });
    expect((await off.ingest([{ event_id: 'c', type: 'visit', user_id: 'u', ts: Date.UTC(2090, 0, 1) }])).reasons).toEqual(['']);
    await off.close();
  });
});
