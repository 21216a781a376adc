import { describe, expect, it } from 'vitest';
import { Engine } from '../../engine/engine.js';
import { InputWatermarks, type InputTimesHolder } from '../../engine/watermarks.js';
import { HOUR, T0, columnsOf } from '../helpers.js';

/** The per-input watermark tracker (engine/watermarks.ts) and the engine in per-input mode. */

const opts = { outOfOrdernessMs: 5_000, tickMs: 1_000 };

function holder(): InputTimesHolder {
  return { times: null, idle: null };
}

describe('InputWatermarks', () => {
  it('is the minimum over the active inputs, − out-of-orderness, in ticks; −∞ until every input has spoken', () => {
    const w = new InputWatermarks(opts);
    w.assign([0, 1, 2]);
    expect(w.observe(0, T0 + 100 * HOUR)).toBe(Number.NEGATIVE_INFINITY);
    expect(w.observe(1, T0 + 50 * HOUR)).toBe(Number.NEGATIVE_INFINITY);
    expect(w.observe(2, T0 + 70 * HOUR + 1_234)).toBe(T0 + 50 * HOUR - 5_000);
    // The slowest input advances: the watermark with it, up to the next slowest.
    expect(w.observe(1, T0 + 80 * HOUR)).toBe(T0 + 70 * HOUR - 4_000);
    expect(w.eventTime()).toBe(T0 + 70 * HOUR + 1_234);
    // An input ahead moves nothing; an older event moves nothing.
    expect(w.observe(0, T0 + 200 * HOUR)).toBe(T0 + 70 * HOUR - 4_000);
    expect(w.observe(2, T0)).toBe(T0 + 70 * HOUR - 4_000);
    expect(w.othersMin(2)).toBe(T0 + 80 * HOUR);
  });

  it('idle inputs do not hold it back; with every input idle it follows the maximum (rows from no input too)', () => {
    const w = new InputWatermarks(opts);
    w.assign([0, 1]);
    w.observe(0, T0 + 10 * HOUR);
    expect(w.watermark()).toBe(Number.NEGATIVE_INFINITY);
    expect(w.setIdle(1, true)).toBe(true);
    expect(w.watermark()).toBe(T0 + 10 * HOUR - 5_000);
    expect(w.setIdle(1, true)).toBe(false);
    w.setIdle(0, true);
    w.observe(1, T0 + 20 * HOUR);
    expect(w.watermark()).toBe(T0 + 20 * HOUR - 5_000);
    expect(w.observe(-1, T0 + 30 * HOUR)).toBe(T0 + 30 * HOUR - 5_000);
    // Active again: never raises it (the engine's watermark does not go back; the tracker's may).
    w.setIdle(0, false);
    expect(w.watermark()).toBe(T0 + 10 * HOUR - 5_000);
    // No input assigned (a rebalance): it holds.
    w.assign([]);
    expect(w.watermark()).toBe(Number.NEGATIVE_INFINITY);
    expect(w.observe(-1, T0 + 40 * HOUR)).toBe(Number.NEGATIVE_INFINITY);
  });

  it('the bound batch gets the times after it; restore brings them back exactly', () => {
    const w = new InputWatermarks(opts);
    w.assign([0, 3]);
    const key = {};
    const h = holder();
    w.bind(key, 3, h);
    expect(w.begin({})).toBe(-1);
    expect(w.begin(key)).toBe(3);
    w.observe(3, T0 + HOUR);
    w.setIdle(0, true);
    w.end(key);
    expect(h).toEqual({ times: { 3: T0 + HOUR }, idle: [0] });
    expect(w.begin(key)).toBe(-1);
    const back = new InputWatermarks(opts);
    back.restore(h.times, null);
    back.assign([0, 3]);
    expect(back.streamTime(3)).toBe(T0 + HOUR);
    expect(back.isIdle(0)).toBe(false);
    expect(back.watermark()).toBe(Number.NEGATIVE_INFINITY);
    back.restore({ 0: T0 + 2 * HOUR, x: 1, 5: 'no' }, [0, -1, 'y']);
    expect(back.isIdle(0)).toBe(true);
    expect(back.streamTime(0)).toBe(T0 + 2 * HOUR);
    expect(back.watermark()).toBe(T0 + HOUR - 5_000);
    expect(back.eventTimeOf(0, 1)).toBe(T0 + 2 * HOUR);
  });
});

describe('Engine in per-input mode', () => {
  it('an input read behind the others holds the watermark: its events are accepted, not too_late', async () => {
    const engine = await Engine.create({});
    try {
      const inputs = engine.inputWatermarks();
      inputs.assign([0, 1]);
      // Input 0: five days; input 1, read afterwards, starts at the beginning.
      const ahead = columnsOf(Array.from({ length: 5 }, (_, d) => ({ event_id: `a${d}`, type: 'visit', anonymous_id: 'a', ts: T0 + d * 24 * HOUR })));
      const pos0 = { p: 0, ...holder() };
      inputs.bind(ahead, 0, pos0);
      expect((await engine.ingestColumns(ahead, pos0)).accepted).toBe(5);
      expect(pos0.times).toEqual({ 0: T0 + 4 * 24 * HOUR });
      expect(engine.watermark).toBe(Number.NEGATIVE_INFINITY);
      const behind = columnsOf(Array.from({ length: 5 }, (_, d) => ({ event_id: `b${d}`, type: 'visit', anonymous_id: 'b', ts: T0 + d * 24 * HOUR + HOUR })));
      const pos1 = { p: 1, ...holder() };
      inputs.bind(behind, 1, pos1);
      expect((await engine.ingestColumns(behind, pos1)).accepted).toBe(5);
      expect(engine.watermark).toBe(T0 + 4 * 24 * HOUR - 5_000);
      expect(engine.rejectCounts()['too_late'] ?? 0).toBe(0);
      // The position stored with the batch is the one the engine filled.
      expect(engine.position).toBe(pos1);
      expect(pos1.times).toEqual({ 0: T0 + 4 * 24 * HOUR, 1: T0 + 4 * 24 * HOUR + HOUR });
    } finally {
      await engine.close();
    }
  });
});
