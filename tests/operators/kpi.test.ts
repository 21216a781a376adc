import { describe, expect, it } from 'vitest';
import { crmstream } from '../../api/proto/gen/crmstream.js';
import { Engine } from '../../engine/engine.js';
import { CrmError } from '../../engine/errors.js';
import { Topic, type OutboxRecord } from '../../engine/outbox.js';
import { KpiTrack, KpiUser, kpiSlot } from '../../operators/kpi.js';
import { BinReader, BinWriter } from '../../state/codec.js';
import { MemoryStore } from '../../state/memory.js';
import { DAY, HOUR, tempDir } from '../helpers.js';

/**
 * Unit behaviour of the KPI operator that the oracle suite does not reach: the correction records
 * of late data, the per-user state encoding, bounded dimensions, the time zone a store is bound
 * to, and the off switch. The values themselves are proven against DuckDB in
 * tests/integration/kpi-exact.test.ts.
 */

// 2024-03-04 00:00 in Asia/Seoul (UTC+9), a Monday.
const MON = Date.UTC(2024, 2, 4) - 9 * HOUR;

describe('KPI operator', () => {
  it('a late event that changes a closed window is recorded as KpiUpdate corrections of that row', async () => {
    const engine = await Engine.create({});
    const updates: crmstream.v1.KpiUpdate[] = [];
    engine.onOutput((r: OutboxRecord) => {
      if (r.topic === Topic.kpiUpdate) updates.push(crmstream.v1.KpiUpdate.decode(r.payload));
    });
    await engine.ingest([
      { event_id: 'a', type: 'visit', user_id: 'u1', ts: MON + HOUR },
      { event_id: 't', type: 'visit', user_id: 'u3', ts: MON + DAY },
      { event_id: 'b', type: 'visit', user_id: 'u2', ts: MON + 2 * DAY + 12 * HOUR },
    ]);
    await engine.checkpoint();
    expect(updates).toEqual([]); // on-time events: no correction
    // Monday is closed (the watermark is on Wednesday); a purchase of u2 on Monday arrives late.
    await engine.ingest([{ event_id: 'c', type: 'purchase', user_id: 'u2', ts: MON + 3 * HOUR, amount: 5000 }]);
    await engine.checkpoint();
    const monday = updates.filter((u) => u.grain === 'day' && u.window === '2024-03-04' && u.channel === '*' && u.platform === '*');
    expect(monday.every((u) => u.correction)).toBe(true);
    const byKpi = Object.fromEntries(monday.map((u) => [u.kpi, u.is_null ? null : u.value]));
    expect(byKpi).toMatchObject({ active_users: 2, purchasers: 1, revenue: 5000, pcr: 0.5, new_users: 2 });
    // Tuesday's own cells did not change, but its customers_start did (u2 bought on Monday).
    const tuesday = updates.filter((u) => u.grain === 'day' && u.window === '2024-03-05' && u.channel === '*' && u.platform === '*');
    expect(Object.fromEntries(tuesday.map((u) => [u.kpi, u.value]))).toMatchObject({ active_users: 1, customers_start: 1, customers_end: 1 });
    // The week and month are still open: their change is not a correction.
    expect(updates.some((u) => u.grain === 'week')).toBe(false);
    expect(engine.stats()['kpiCorrections']).toBeGreaterThan(0);
    await engine.close();
  });

  it('an identity stitch moves the anonymous past to the member: counted once, first touch from the anonymous visit', async () => {
    const engine = await Engine.create({});
    await engine.ingest([
      { event_id: '1', type: 'visit', anonymous_id: 'dev1', ts: MON + HOUR, channel: 'kakao' },
      { event_id: '2', type: 'visit', user_id: 'm1', ts: MON + DAY, channel: 'organic' },
      { event_id: '3', type: 'sign_up', user_id: 'm1', anonymous_id: 'dev1', ts: MON + DAY + HOUR, channel: 'organic' },
    ]);
    const week = (await engine.kpis('week')).filter((r) => r.platform === '*');
    expect(week.map((r) => [r.channel, r.active_users, r.new_users, r.signups])).toEqual([['*', 1, 1, 1], ['kakao', 1, 1, 1]]);
    const days = (await engine.kpis('day')).filter((r) => r.channel === '*');
    expect(days.map((r) => [r.window, r.active_users, r.new_users])).toEqual([['2024-03-04', 1, 1], ['2024-03-05', 1, 0]]);
    await engine.close();
  });

  it('per-user facts survive encode/decode exactly (revenue doubles, day deltas, platform tracks)', () => {
    const u = new KpiUser();
    const t0 = u.tracks[0]!;
    t0.firstTs = MON;
    t0.firstChannel = 'ad';
    t0.signupTs = MON + 5;
    t0.firstPurchaseTs = MON + 7;
    t0.purchases = 3;
    t0.days = [19_786, 0, 0, 19_790, 2, 0.1 + 0.2, 19_900, 1, -12.5];
    const app = new KpiTrack('app');
    app.firstTs = MON + 1;
    app.days = [19_790, 0, 0];
    u.tracks.push(app);
    const w = new BinWriter();
    kpiSlot.encode(u, w);
    const back = kpiSlot.decode(new BinReader(w.take()));
    expect(back).toEqual(u);
  });

  it('dimension values are bounded: a stream with thousands of channels shares one overflow dimension', async () => {
    const engine = await Engine.create({});
    const events = Array.from({ length: 5000 }, (_, i) => ({ event_id: `e${i}`, type: 'visit', user_id: `u${i}`, ts: MON + i, channel: `ch${i}` }));
    await engine.ingest(events);
    const rows = await engine.kpis('month');
    const channels = new Set(rows.map((r) => r.channel));
    expect(channels.size).toBeLessThan(4100);
    expect(channels.has('(other)')).toBe(true);
    // Every user still counts once in the all-channels row and once in some channel row.
    expect(rows.find((r) => r.channel === '*' && r.platform === '*')!.active_users).toBe(5000);
    expect(rows.filter((r) => r.channel !== '*').reduce((s, r) => s + r.active_users, 0)).toBe(5000);
    await engine.close();
  });

  it('a store remembers its time zone: reopening it with another is CONFIG_INVALID, adopting it works', async () => {
    const tmp = tempDir();
    try {
      const e1 = await Engine.create({ dataDir: tmp.dir, time: { timeZone: 'America/New_York' } });
      await e1.ingest([{ event_id: 'x', type: 'visit', user_id: 'u', ts: MON }]);
      await e1.close();
      const err = await Engine.create({ dataDir: tmp.dir }).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(CrmError);
      expect((err as CrmError).code).toBe('CONFIG_INVALID');
      const e2 = await Engine.create({ dataDir: tmp.dir }, { adoptStoredTimeZone: true });
      expect(e2.config.time.timeZone).toBe('America/New_York');
      // MON is 2024-03-04 00:00 in Seoul = 2024-03-03 10:00 in New York.
      expect((await e2.kpis('day'))[0]!.window).toBe('2024-03-03');
      await e2.close();
    } finally {
      tmp.cleanup();
    }
  });

  it('kpi.enabled = false: no KPI state, queries fail with KPI_DISABLED', async () => {
    const engine = await Engine.create({ kpi: { enabled: false } }, { store: new MemoryStore() });
    await engine.ingest([{ event_id: 'x', type: 'visit', user_id: 'u', ts: MON }]);
    await expect(engine.kpis('day')).rejects.toMatchObject({ code: 'KPI_DISABLED' });
    expect(engine.stats()['kpiUpdates']).toBe(0);
    await engine.close();
  });
});

describe('KPIs after an idle advance', () => {
  it('a query right after advanceTo reads the windows at the new watermark, as a reopened engine does', async () => {
    const t = tempDir('crm-kpi-adv-');
    try {
      const cfg = { dataDir: t.dir, time: { timeZone: 'UTC' } };
      const T = Date.UTC(2024, 0, 10);
      const live = await Engine.create(cfg);
      await live.ingest([
        { event_id: 'e1', type: 'sign_up', user_id: 'u1', ts: T },
        { event_id: 'e2', type: 'purchase', user_id: 'u1', ts: T + HOUR, amount: 1000, order_id: 'o1' },
        { event_id: 'e3', type: 'visit', user_id: 'u2', ts: T + 2 * HOUR },
      ]);
      // No batch after this: before the fix the KPI windows stayed at the last batch's watermark.
      await live.advanceTo(T + 45 * DAY);
      const liveMonths = await live.kpis('month');
      const livePartials = await live.kpiPartials();
      await live.close();
      const reopened = await Engine.create(cfg);
      try {
        expect(livePartials.watermark).toBe(T + 45 * DAY);
        expect(liveMonths).toEqual(await reopened.kpis('month'));
        // January's first-purchase conversion has matured by mid-February.
        expect(liveMonths.find((r) => r.window === '2024-01' && r.channel === '*' && r.platform === '*')?.first_purchase_maturing).toBe(false);
      } finally {
        await reopened.close();
      }
    } finally {
      t.cleanup();
    }
  });
});
