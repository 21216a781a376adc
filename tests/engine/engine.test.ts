import { describe, expect, it } from 'vitest';
import { Engine } from '../../engine/engine.js';
import { Topic, type OutboxRecord } from '../../engine/outbox.js';
import { MemoryStore } from '../../state/memory.js';
import { ReminderOperator, REMINDER_TOPIC, CART_DELAY } from '../fixtures/reminder-operator.js';
import { columnsOf, DAY, HOUR, T0, tempDir, type Ev } from '../helpers.js';

const td = new TextDecoder();

async function memEngine(extra: { tickMs?: number } = {}) {
  const reminder = new ReminderOperator();
  const engine = await Engine.create({ checkpoint: { intervalMs: 1_000_000 } }, { store: new MemoryStore(), operators: [reminder], tickMs: extra.tickMs ?? 1 });
  const out: OutboxRecord[] = [];
  engine.onOutput((r) => out.push(r));
  return { engine, reminder, out };
}

describe('identity stitching', () => {
  it('folds anonymous visits before sign-up into the member profile', async () => {
    const { engine } = await memEngine();
    await engine.ingestColumns(columnsOf([
      { event_id: 'e1', type: 'visit', anonymous_id: 'dev1', ts: T0, channel: 'ad', platform: 'web' },
      { event_id: 'e2', type: 'page_view', anonymous_id: 'dev1', ts: T0 + 1000, platform: 'web' },
      { event_id: 'e3', type: 'sign_up', anonymous_id: 'dev1', user_id: 'u1', ts: T0 + 2000, channel: 'organic', platform: 'web' },
      { event_id: 'e4', type: 'purchase', user_id: 'u1', ts: T0 + 3000, amount: 5000, order_id: 'o1', platform: 'app' },
      { event_id: 'e5', type: 'page_view', anonymous_id: 'dev1', ts: T0 + 4000, platform: 'web' },
    ]));
    const p = engine.profile('u1')!;
    expect(p).toMatchObject({ user_id: 'u1', first_ts: T0, first_channel: 'ad', signup_ts: T0 + 2000, purchases: 1, revenue: 5000, events: 5, last_ts: T0 + 4000 });
    // The anonymous id resolves to the member; the anonymous profile is gone.
    expect(engine.profile('dev1')?.user_id).toBe('u1');
    await engine.checkpoint();
    const ids: string[] = [];
    for await (const v of engine.profilesStored()) ids.push(v.user_id);
    expect(ids).toEqual(['u1']);
    await engine.close();
  });

  it('applies an alias seen on a late event: earlier and later anonymous events join the member', async () => {
    const { engine } = await memEngine();
    await engine.ingestColumns(columnsOf([
      { event_id: 'e1', type: 'visit', anonymous_id: 'dev9', ts: T0, channel: 'kakao' },
      { event_id: 'e2', type: 'page_view', anonymous_id: 'dev9', ts: T0 + HOUR },
      { event_id: 'e3', type: 'purchase', user_id: 'u9', ts: T0 + 2 * HOUR, amount: 100, order_id: 'o9' },
    ]));
    expect(engine.profile('u9')!.events).toBe(1);
    // The login that links dev9 to u9 arrives late (30 minutes of event time behind).
    await engine.ingestColumns(columnsOf([{ event_id: 'e4', type: 'login', anonymous_id: 'dev9', user_id: 'u9', ts: T0 + 90 * 60_000 }]));
    await engine.ingestColumns(columnsOf([{ event_id: 'e5', type: 'page_view', anonymous_id: 'dev9', ts: T0 + 3 * HOUR }]));
    expect(engine.profile('u9')).toMatchObject({ events: 5, first_ts: T0, first_channel: 'kakao', purchases: 1 });
    expect(engine.stats().aliases).toBe(1);
    await engine.close();
  });

  it('keeps the first alias when a device is later seen with another member', async () => {
    const { engine } = await memEngine();
    await engine.ingestColumns(columnsOf([
      { event_id: 'e1', type: 'login', anonymous_id: 'shared', user_id: 'a', ts: T0 },
      { event_id: 'e2', type: 'login', anonymous_id: 'shared', user_id: 'b', ts: T0 + 1 },
      { event_id: 'e3', type: 'visit', anonymous_id: 'shared', ts: T0 + 2 },
    ]));
    expect(engine.profile('a')!.events).toBe(2);
    expect(engine.profile('b')!.events).toBe(1);
    expect(engine.stats().identityConflicts).toBe(1);
    await engine.close();
  });
});

describe('lateness, duplicates and watermarks', () => {
  it('rejects events later than the allowed lateness and duplicates within the horizon', async () => {
    const { engine } = await memEngine();
    const r = await engine.ingestColumns(columnsOf([
      { event_id: 'e1', type: 'visit', anonymous_id: 'x', ts: T0 + 10 * DAY },
      { event_id: 'e2', type: 'visit', anonymous_id: 'x', ts: T0 + 10 * DAY - 2 * DAY }, // late, inside 3 days
      { event_id: 'e3', type: 'visit', anonymous_id: 'x', ts: T0 + 10 * DAY - 4 * DAY }, // too late
      { event_id: 'e1', type: 'visit', anonymous_id: 'x', ts: T0 + 10 * DAY }, // duplicate
    ]));
    expect(r).toEqual({ accepted: 2, rejected: 2 });
    expect(engine.rejectCounts()).toMatchObject({ too_late: 1, duplicate: 1 });
    expect(engine.profile('x')!.events).toBe(2);
    await engine.close();
  });
});

describe('timers', () => {
  it('fire in event-time order as the watermark passes them, and purchases cancel the reminder', async () => {
    const { engine, reminder, out } = await memEngine();
    await engine.ingestColumns(columnsOf([
      { event_id: 'c1', type: 'add_to_cart', user_id: 'u2', ts: T0 + 2 * HOUR },
      { event_id: 'c2', type: 'add_to_cart', user_id: 'u1', ts: T0 + 1 * HOUR },
      { event_id: 'c3', type: 'add_to_cart', user_id: 'u3', ts: T0 + 3 * HOUR },
      { event_id: 'p3', type: 'purchase', user_id: 'u3', ts: T0 + 4 * HOUR, amount: 1, order_id: 'o' },
    ]));
    expect(reminder.firedLog).toEqual([]);
    // Moving event time past all three deadlines (+ out-of-orderness) fires them in ts order.
    await engine.ingestColumns(columnsOf([{ event_id: 'v', type: 'visit', user_id: 'u9', ts: T0 + CART_DELAY + 5 * HOUR }]));
    expect(reminder.firedLog.map((l) => l.split('|')[0])).toEqual(['u1', 'u2', 'u3']);
    await engine.checkpoint();
    expect(out.filter((r) => r.topic === REMINDER_TOPIC).map((r) => td.decode(r.payload))).toEqual([`u1|${T0 + HOUR}`, `u2|${T0 + 2 * HOUR}`]);
    await engine.close();
  });

  it('a timer for an anonymous profile fires on the member it was merged into', async () => {
    const { engine, out } = await memEngine();
    await engine.ingestColumns(columnsOf([
      { event_id: 'c1', type: 'add_to_cart', anonymous_id: 'd1', ts: T0 },
      { event_id: 's1', type: 'sign_up', anonymous_id: 'd1', user_id: 'm1', ts: T0 + HOUR },
    ]));
    await engine.advanceTo(T0 + 2 * DAY);
    await engine.checkpoint();
    expect(out.filter((r) => r.topic === REMINDER_TOPIC).map((r) => td.decode(r.payload))).toEqual([`m1|${T0}`]);
    await engine.close();
  });

  it('results do not depend on how the input is cut into batches', async () => {
    const events: Ev[] = [];
    for (let i = 0; i < 400; i++) {
      const u = `u${i % 17}`;
      const ts = T0 + i * 20 * 60_000 - (i % 5 === 0 ? 90 * 60_000 : 0); // some out of order
      const type = i % 3 === 0 ? 'add_to_cart' : i % 7 === 0 ? 'purchase' : 'visit';
      events.push({ event_id: `e${i}`, type, user_id: u, ts, amount: type === 'purchase' ? 10 : undefined, order_id: type === 'purchase' ? `o${i}` : undefined });
    }
    const results: string[] = [];
    for (const size of [400, 1, 7, 64]) {
      const { engine, reminder, out } = await memEngine();
      for (let s = 0; s < events.length; s += size) await engine.ingestColumns(columnsOf(events.slice(s, s + size)));
      await engine.advanceTo(T0 + 30 * DAY);
      await engine.checkpoint();
      const profiles: unknown[] = [];
      for await (const p of engine.profilesStored()) profiles.push(p);
      results.push(JSON.stringify({ profiles, fired: reminder.firedLog, out: out.filter((r) => r.topic !== Topic.deadLetter).map((r) => td.decode(r.payload)) }));
      await engine.close();
    }
    expect(new Set(results).size).toBe(1);
  });
});

describe('durable state with the level backend', () => {
  it('restores profiles, aliases, timers and the position after close and reopen', async () => {
    const { dir, cleanup } = tempDir();
    try {
      const reminder = new ReminderOperator();
      let engine = await Engine.create({ dataDir: dir }, { operators: [reminder], tickMs: 1 });
      await engine.ingestColumns(columnsOf([
        { event_id: 'a', type: 'visit', anonymous_id: 'd', ts: T0, channel: 'ad' },
        { event_id: 'b', type: 'sign_up', anonymous_id: 'd', user_id: 'u', ts: T0 + 1 },
        { event_id: 'c', type: 'add_to_cart', user_id: 'u', ts: T0 + 2 },
      ]), { line: 3 });
      await engine.close();
      const reminder2 = new ReminderOperator();
      engine = await Engine.create({ dataDir: dir }, { operators: [reminder2], tickMs: 1 });
      expect(engine.position).toEqual({ line: 3 });
      expect(engine.profile('d')).toMatchObject({ user_id: 'u', first_channel: 'ad', events: 3 });
      // The duplicate is still remembered after the restart.
      const r = await engine.ingestColumns(columnsOf([{ event_id: 'a', type: 'visit', anonymous_id: 'd', ts: T0 }]));
      expect(r.rejected).toBe(1);
      await engine.advanceTo(T0 + 2 * DAY);
      expect(reminder2.firedLog).toEqual([`u|${T0 + 2}|${T0 + 2 * DAY}`]);
      await engine.close();
    } finally {
      cleanup();
    }
  });
});

describe('failure half-way through a batch', () => {
  it('stops the engine without checkpointing the partial batch; a restart resumes from the last checkpoint', async () => {
    const { dir, cleanup } = tempDir();
    try {
      class Exploding extends ReminderOperator {
        override processBatch(...args: Parameters<ReminderOperator['processBatch']>): void {
          const [b, , start, end] = args;
          for (let i = start; i < end; i++) if (b.eventId[i] === 'boom') throw new Error('operator bug');
          super.processBatch(...args);
        }
      }
      let engine = await Engine.create({ dataDir: dir }, { operators: [new Exploding()], tickMs: 1 });
      await engine.ingestColumns(columnsOf([{ event_id: 'a', type: 'visit', user_id: 'u', ts: T0 }]), { row: 1 });
      await engine.checkpoint();
      await expect(engine.ingestColumns(columnsOf([
        { event_id: 'b', type: 'visit', user_id: 'u', ts: T0 + 1 },
        { event_id: 'boom', type: 'visit', user_id: 'u', ts: T0 + 2 },
      ]), { row: 3 })).rejects.toMatchObject({ code: 'OPERATOR_FAILED' });
      await expect(engine.ingestColumns(columnsOf([{ event_id: 'c', type: 'visit', user_id: 'u', ts: T0 + 3 }]))).rejects.toMatchObject({ code: 'ENGINE_FAILED' });
      await engine.close(); // must not persist the half-applied batch
      engine = await Engine.create({ dataDir: dir }, { operators: [new ReminderOperator()], tickMs: 1 });
      expect(engine.position).toEqual({ row: 1 });
      expect(engine.profile('u')!.events).toBe(1);
      await engine.close();
    } finally {
      cleanup();
    }
  });
});
