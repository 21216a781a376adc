import { describe, expect, it } from 'vitest';
import { TimerService, timerKey, parseTimerKey, TIMER_PREFIX, type DueTimer } from '../../engine/timers.js';
import { MemoryStore } from '../../state/memory.js';
import type { WriteOp } from '../../state/store.js';

async function commit(store: MemoryStore, timers: TimerService): Promise<void> {
  const ops: WriteOp[] = [];
  timers.snapshot(ops);
  await store.write(ops);
  timers.committed();
}

function drain(timers: TimerService, upTo: number): string[] {
  const out: string[] = [];
  const t: DueTimer = { ts: 0, kind: '', user: '' };
  while (timers.popDue(upTo, t) !== undefined) out.push(`${t.ts}|${t.kind}|${t.user}`);
  return out;
}

describe('TimerService', () => {
  it('keys sort in fire order and parse back', () => {
    const keys = [timerKey(20, 'b', 'u1'), timerKey(3, 'z', 'u|x'), timerKey(20, 'a', 'u9'), timerKey(1e12, 'a', '')];
    expect([...keys].sort()).toEqual([keys[1], keys[2], keys[0], keys[3]]);
    expect(parseTimerKey(keys[1]!, { ts: 0, kind: '', user: '' })).toEqual({ ts: 3, kind: 'z', user: 'u|x' });
  });

  it('fires in (time, kind, user) order up to the watermark, once; cancel and re-register work before and after durability', async () => {
    const store = new MemoryStore();
    await store.open();
    const timers = new TimerService();
    await timers.open(store, -1);
    await timers.preload(100);
    timers.register('u2', 'cart', 50);
    timers.register('u1', 'cart', 50);
    timers.register('u1', 'cart', 50); // idempotent
    timers.register('u3', 'aaa', 50);
    timers.register('u4', 'cart', 10);
    timers.register('u5', 'cart', 500); // beyond what is loaded: goes to `future`
    timers.cancel('u2', 'cart', 50);
    expect(timers.nextDue()).toBe(10);
    expect(drain(timers, 49)).toEqual(['10|cart|u4']);
    expect(drain(timers, 100)).toEqual(['50|aaa|u3', '50|cart|u1']);
    await commit(store, timers);
    // Durable now: u5's timer is found by the next preload; fired and cancelled ones are gone.
    const stored = [];
    for await (const entries of store.scan({ gte: TIMER_PREFIX, lt: 't0' })) stored.push(...entries.map((e) => e.key));
    expect(stored).toEqual([TIMER_PREFIX + timerKey(500, 'cart', 'u5')]);
    timers.register('u6', 'cart', 400);
    timers.cancel('u5', 'cart', 500); // cancelling a durable, not yet loaded timer
    await timers.preload(1000);
    expect(drain(timers, 1000)).toEqual(['400|cart|u6']);
  });

  it('after a restart, fires exactly the durable timers not fired before the checkpoint', async () => {
    const store = new MemoryStore();
    await store.open();
    let timers = new TimerService();
    await timers.open(store, -1);
    for (let i = 0; i < 50; i++) timers.register(`u${i}`, 'k', 1000 + i * 10);
    await commit(store, timers);
    await timers.preload(1200);
    expect(drain(timers, 1200).length).toBe(21); // 1000..1200
    await commit(store, timers); // the firings are durable
    expect(drain(timers, 1300).length).toBe(0); // not loaded past 1200 yet: nothing
    // "Crash": a new service over the same store, restored at watermark 1200.
    timers = new TimerService();
    await timers.open(store, 1200);
    await timers.preload(2000);
    const rest = drain(timers, 2000);
    expect(rest.length).toBe(29);
    expect(rest[0]).toBe('1210|k|u21');
  });
});
