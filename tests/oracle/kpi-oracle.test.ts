import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { CohortRow, FunnelRow, KpiRow } from '../../operators/kpi-rows.js';
import { compareRows } from './compare.js';
import { KpiOracle, type OracleEvent, type OracleOptions } from './kpi-oracle.js';

/**
 * The oracle itself, against small timelines whose every expected value is worked out by hand
 * (docs/KPIS.md). Most timelines use UTC so local days are the ISO dates written in the events;
 * one test pins the Asia/Seoul day boundary (UTC 15:00 = local midnight).
 */

let nextId = 0;
/** One accepted event; `iso` is a UTC instant. */
function ev(type: string, user: string, anon: string, iso: string, extra: Partial<OracleEvent> = {}): OracleEvent {
  const ts = Date.parse(iso);
  if (Number.isNaN(ts)) throw new Error(`bad time ${iso}`);
  return { event_id: `e${++nextId}`, type, user_id: user, anonymous_id: anon, ts, amount: NaN, channel: '', platform: '', ...extra };
}

const UTC = (iso: string): OracleOptions => ({ timeZone: 'UTC', watermark: Date.parse(iso) });

function find<T extends { channel: string; platform: string }>(
  rows: readonly T[], keyField: keyof T, key: string, channel = '*', platform = '*',
): T {
  const row = rows.find((r) => r[keyField] === key && r.channel === channel && r.platform === platform);
  if (row === undefined) throw new Error(`no row ${key} (${channel}, ${platform})`);
  return row;
}
const kpi = (rows: readonly KpiRow[], w: string, c = '*', p = '*'): KpiRow => find(rows, 'window', w, c, p);
/** Row keys as `window channel platform`, in the oracle's order. */
const kpiKeys = (rows: readonly KpiRow[]): string[] => rows.map((r) => `${r.window} ${r.channel} ${r.platform}`);
const funnelKeys = (rows: readonly FunnelRow[]): string[] => rows.map((r) => `${r.cohort} ${r.channel} ${r.platform}`);

let oracle: KpiOracle;
beforeAll(async () => {
  oracle = await KpiOracle.create();
});
afterAll(async () => {
  await oracle.close();
});

describe('identity, first touch and tracks', () => {
  // a1 visits anonymously on 03-04 (ad, web), signs up as u1 on 03-06 (organic, app): the alias
  // a1 → u1 is retroactive, so u1 is new on 03-04 and first-touched by `ad`. A later pairing of
  // a1 with u2 is ignored (its event still counts for u2). a2 stays anonymous with an empty first
  // touch, u3 only receives a message (not activity) before a `push` visit, t1 has a tie on time.
  const events = [
    ev('visit', '', 'a1', '2024-03-04T10:00:00Z', { channel: 'ad', platform: 'web' }),
    ev('visit', '', 'a2', '2024-03-04T11:00:00Z'),
    ev('message_opened', 'u3', '', '2024-03-04T12:00:00Z', { channel: 'email', platform: 'app' }),
    ev('sign_up', 'u1', 'a1', '2024-03-06T09:00:00Z', { channel: 'organic', platform: 'app' }),
    ev('page_view', '', 'a1', '2024-03-07T12:00:00Z', { platform: 'web' }), // → u1 (after the stitch)
    ev('login', 'u2', 'a1', '2024-03-07T13:00:00Z', { channel: 'kakao', platform: 'app' }), // conflicting pairing
    ev('visit', '', 'a2', '2024-03-07T14:00:00Z', { channel: 'ad' }), // a2's first touch stays ''
    ev('visit', 'u3', '', '2024-03-08T08:00:00Z', { channel: 'push' }),
    ev('visit', 't1', '', '2024-03-08T09:00:00Z', { channel: 'sms' }),
    ev('visit', 't1', '', '2024-03-08T09:00:00Z', { channel: 'kakao' }), // same ts: 'kakao' < 'sms'
  ];
  const opts = UTC('2024-03-10T00:00:00Z');

  it('stitches retroactively and counts a new user once, on the anonymous visit day', async () => {
    await oracle.load(events);
    const day = await oracle.kpis('day', opts);
    expect(kpiKeys(day)).toEqual([
      // 03-04: u1 (via a1) and anon:a2; u3's message is not activity, so no app row and no email row.
      '2024-03-04 * *', '2024-03-04 * web', '2024-03-04 ad *',
      // 03-06: u1 signs up on app; u1's first touch is ad (not organic).
      '2024-03-06 * *', '2024-03-06 * app', '2024-03-06 ad *',
      // 03-07: u1's page_view (web), u2's login (app, kakao), anon:a2's visit (no platform, first touch '').
      '2024-03-07 * *', '2024-03-07 * app', '2024-03-07 * web', '2024-03-07 ad *', '2024-03-07 kakao *',
      // 03-08: u3 (first touch push), t1 (first touch kakao: tie on ts → smaller channel).
      '2024-03-08 * *', '2024-03-08 kakao *', '2024-03-08 push *',
    ]);
    // 03-04 (*,*): u1 and anon:a2 are active and new; no sign_up yet → conversion 0/2.
    expect(kpi(day, '2024-03-04')).toMatchObject({ active_users: 2, new_users: 2, signups: 0, signup_conversion: 0 });
    expect(kpi(day, '2024-03-04', 'ad')).toMatchObject({ active_users: 1, new_users: 1 });
    expect(kpi(day, '2024-03-04', '*', 'web')).toMatchObject({ active_users: 1, new_users: 1 });
    // 03-06: u1 signs up but is not new (first activity 03-04) → 1 / 0 = null. On the app track it
    // is u1's first app activity: new and signed up there → 1.
    expect(kpi(day, '2024-03-06')).toMatchObject({ active_users: 1, new_users: 0, signups: 1, signup_conversion: null });
    expect(kpi(day, '2024-03-06', 'ad')).toMatchObject({ active_users: 1, new_users: 0, signups: 1 });
    expect(kpi(day, '2024-03-06', '*', 'app')).toMatchObject({ active_users: 1, new_users: 1, signups: 1, signup_conversion: 1 });
    // 03-07: u1, u2, anon:a2 active; only u2 is new. u2 (kakao, app) is its own user.
    expect(kpi(day, '2024-03-07')).toMatchObject({ active_users: 3, new_users: 1 });
    expect(kpi(day, '2024-03-07', 'ad')).toMatchObject({ active_users: 1, new_users: 0 }); // u1 only, not a2
    expect(kpi(day, '2024-03-07', 'kakao')).toMatchObject({ active_users: 1, new_users: 1 });
    expect(kpi(day, '2024-03-07', '*', 'web')).toMatchObject({ active_users: 1, new_users: 0 });
    expect(kpi(day, '2024-03-07', '*', 'app')).toMatchObject({ active_users: 1, new_users: 1 });
    // 03-08: u3 and t1 are new.
    expect(kpi(day, '2024-03-08')).toMatchObject({ active_users: 2, new_users: 2 });
    expect(kpi(day, '2024-03-08', 'push')).toMatchObject({ active_users: 1, new_users: 1 });
    expect(kpi(day, '2024-03-08', 'kakao')).toMatchObject({ active_users: 1, new_users: 1 });

    // Week 2024-W10 (Mon 03-04 .. Sun 03-10): u1, a2, u2, u3, t1 → 5 active, all new, once each.
    const week = await oracle.kpis('week', opts);
    expect(kpi(week, '2024-W10')).toMatchObject({ active_users: 5, new_users: 5, signups: 1, signup_conversion: 0.2 });
    expect(kpi(week, '2024-W10', 'kakao')).toMatchObject({ active_users: 2, new_users: 2 }); // u2, t1
    const newPerDay = day.filter((r) => r.channel === '*' && r.platform === '*').reduce((s, r) => s + r.new_users, 0);
    expect(newPerDay).toBe(5);
  });

  it('computes first purchase per platform track', async () => {
    // pp buys on web (07-01) then on app (07-03): first purchaser on 07-01 overall and on web, but
    // the app track sees only the app purchase, so pp is new and a first purchaser there on 07-03.
    await oracle.load([
      ev('purchase', 'pp', '', '2024-07-01T10:00:00Z', { amount: 10, platform: 'web' }),
      ev('purchase', 'pp', '', '2024-07-03T10:00:00Z', { amount: 20, platform: 'app' }),
    ]);
    const day = await oracle.kpis('day', UTC('2024-07-05T00:00:00Z'));
    expect(kpiKeys(day)).toEqual(['2024-07-01 * *', '2024-07-01 * web', '2024-07-03 * *', '2024-07-03 * app']);
    expect(kpi(day, '2024-07-01')).toMatchObject({ first_purchasers: 1, new_users: 1, revenue: 10 });
    expect(kpi(day, '2024-07-01', '*', 'web')).toMatchObject({ first_purchasers: 1, new_users: 1 });
    expect(kpi(day, '2024-07-03')).toMatchObject({ first_purchasers: 0, new_users: 0, purchasers: 1, revenue: 20 });
    expect(kpi(day, '2024-07-03', '*', 'app')).toMatchObject({ first_purchasers: 1, new_users: 1, purchasers: 1, revenue: 20 });
    // The overall revisit: pp's first purchase day 07-01, activity on 07-03 = fpd+2 → 1/1. On the
    // web track nothing follows → 0/1.
    expect(kpi(day, '2024-07-01').revisit_rate_d1_3).toBe(1);
    expect(kpi(day, '2024-07-01', '*', 'web').revisit_rate_d1_3).toBe(0);
  });
});

describe('purchases, conversion and revisits', () => {
  // p1: signs up 05-01 10:00, buys twice on 05-03 (100 + 50), refunds 30 on 05-04 (fpd+1 activity).
  // p2: signs up 05-01 12:00, first purchase exactly 7 days later (f = s + 7 d: not < s + N) → not
  //     converted; next activity 05-12 = fpd+4 → no revisit.
  // p3: signs up 05-01 13:00, buys 1 ms before s + 7 d → converted; no later activity.
  const events = [
    ev('sign_up', 'p1', '', '2024-05-01T10:00:00Z'),
    ev('sign_up', 'p2', '', '2024-05-01T12:00:00Z'),
    ev('sign_up', 'p3', '', '2024-05-01T13:00:00Z'),
    ev('purchase', 'p1', '', '2024-05-03T10:00:00Z', { amount: 100 }),
    ev('purchase', 'p1', '', '2024-05-03T15:00:00Z', { amount: 50 }),
    ev('refund', 'p1', '', '2024-05-04T09:00:00Z', { amount: 30 }),
    ev('purchase', 'p2', '', '2024-05-08T12:00:00Z', { amount: 80 }),
    ev('purchase', 'p3', '', '2024-05-08T12:59:59.999Z', { amount: 20 }),
    ev('visit', 'p2', '', '2024-05-12T08:00:00Z'),
  ];
  const opts = UTC('2024-05-20T00:00:00Z');

  it('computes day rows', async () => {
    await oracle.load(events);
    const day = await oracle.kpis('day', opts);
    expect(kpiKeys(day)).toEqual(['2024-05-01 * *', '2024-05-03 * *', '2024-05-04 * *', '2024-05-08 * *', '2024-05-12 * *']);
    // 05-01: 3 signups, all new; p1 and p3 buy within 7 days, p2 exactly at 7 days → 2/3.
    expect(kpi(day, '2024-05-01')).toMatchObject({
      active_users: 3, new_users: 3, signups: 3, signup_conversion: 1, purchasers: 0, pcr: 0, arppu: null,
      first_purchasers: 0, revisit_rate_d1_3: null,
    });
    expect(kpi(day, '2024-05-01').first_purchase_conversion).toBeCloseTo(2 / 3, 12);
    // 05-03: p1 buys twice: 1 purchaser, 2 orders, revenue 150, repeat 1/1, first purchaser with
    // activity on 05-04 (the refund) → revisit 1/1.
    expect(kpi(day, '2024-05-03')).toMatchObject({
      active_users: 1, purchasers: 1, orders: 2, revenue: 150, pcr: 1, arppu: 150, arpu: 150,
      repeat_purchase_rate: 1, first_purchasers: 1, revisit_rate_d1_3: 1, signups: 0, first_purchase_conversion: null,
    });
    // 05-04: only the refund: revenue −30 over 1 active user, no purchaser.
    expect(kpi(day, '2024-05-04')).toMatchObject({ active_users: 1, purchasers: 0, orders: 0, revenue: -30, arppu: null, arpu: -30, pcr: 0 });
    // 05-08: p2 and p3 buy once each (80 + 20); neither comes back on 05-09..05-11.
    expect(kpi(day, '2024-05-08')).toMatchObject({
      purchasers: 2, orders: 2, revenue: 100, arppu: 50, repeat_purchase_rate: 0, first_purchasers: 2, revisit_rate_d1_3: 0,
    });
  });

  it('computes the month row and first_purchase_maturing at the watermark boundary', async () => {
    await oracle.load(events);
    const month = await oracle.kpis('month', opts);
    expect(kpiKeys(month)).toEqual(['2024-05 * *']);
    const m = kpi(month, '2024-05');
    // revenue = 100 + 50 + 80 + 20 − 30 = 220 over 3 purchasers / 3 active; 1 of 3 repeats.
    expect(m).toMatchObject({
      active_users: 3, new_users: 3, signups: 3, signup_conversion: 1, purchasers: 3, orders: 4, revenue: 220, pcr: 1,
      first_purchasers: 3, customers_start: 0, crr: null, cohort_retention: null, churn_rate: null, spend: 0, cac: 0,
      clv: null, // churn_rate is null (no customers at 05-01)
      active_users_7d: null, active_users_30d: null, // month row
    });
    expect(m.arppu).toBeCloseTo(220 / 3, 9);
    expect(m.repeat_purchase_rate).toBeCloseTo(1 / 3, 12);
    expect(m.first_purchase_conversion).toBeCloseTo(2 / 3, 12);
    expect(m.revisit_rate_d1_3).toBeCloseTo(1 / 3, 12);
    // C(06-01) = purchases in [03-03, 05-31] → p1, p2, p3.
    expect(m.customers_end).toBe(3);
    // Month end (06-01 00:00) + 7 d = 06-08 is after the watermark 05-20 → maturing.
    expect(m.first_purchase_maturing).toBe(true);

    // Day 05-12 ends at 05-13 00:00; + 7 d = 05-20 00:00, which is not after a watermark of exactly
    // 05-20 00:00 → mature; one ms earlier it is still maturing. 05-01 (→ 05-09) is long mature.
    const day = await oracle.kpis('day', opts);
    expect(kpi(day, '2024-05-12').first_purchase_maturing).toBe(false);
    expect(kpi(day, '2024-05-01').first_purchase_maturing).toBe(false);
    const earlier = await oracle.kpis('day', { ...opts, watermark: opts.watermark - 1 });
    expect(kpi(earlier, '2024-05-12').first_purchase_maturing).toBe(true);
    expect(kpi(earlier, '2024-05-08').first_purchase_maturing).toBe(false);
  });

  it('honours firstPurchaseDays', async () => {
    await oracle.load(events);
    // N = 2: p1's first purchase is 48 h after the sign_up (05-01 10:00 → 05-03 10:00) → not < s + 2 d.
    const day = await oracle.kpis('day', { ...opts, firstPurchaseDays: 2 });
    expect(kpi(day, '2024-05-01').first_purchase_conversion).toBe(0);
    // N = 8: all three.
    const day8 = await oracle.kpis('day', { ...opts, firstPurchaseDays: 8 });
    expect(kpi(day8, '2024-05-01').first_purchase_conversion).toBe(1);
  });

  it('computes the funnel per signup cohort', async () => {
    await oracle.load(events);
    const month = await oracle.funnel('month', opts);
    // visit 3 → sign_up 3 → first purchase 3 → revisit 1 (p1) → repeat 1 (p1 bought twice).
    const expected: FunnelRow[] = [{
      grain: 'month', cohort: '2024-05', channel: '*', platform: '*', visit: 3, sign_up: 3, first_purchase: 3, revisit: 1,
      repeat_purchase: 1, sign_up_rate: 1, first_purchase_rate: 1, revisit_rate: 1 / 3, repeat_purchase_rate: 1,
    }];
    expect(compareRows(month, expected, ['grain', 'cohort', 'channel', 'platform'])).toEqual([]);
    // Day grain: only 05-01 has visits (first activity) or signups.
    const day = await oracle.funnel('day', opts);
    expect(funnelKeys(day)).toEqual(['2024-05-01 * *']);
  });

  it('nests funnel steps and counts purchases before the sign_up', async () => {
    // f1: visit 06-01, purchase 06-02 (before signing up), sign_up 06-03 and visit 06-04 (fpd+1,
    //     fpd+2), purchase 06-10 → first_purchase, revisit, repeat.
    // f2: sign_up 06-03, purchase 06-03 twice, nothing after → first purchase and ≥ 2 purchases but
    //     no revisit, so not in repeat_purchase (nested in revisit).
    // f3: visit 06-05 only.
    await oracle.load([
      ev('visit', 'f1', '', '2024-06-01T10:00:00Z'),
      ev('purchase', 'f1', '', '2024-06-02T10:00:00Z', { amount: 5 }),
      ev('sign_up', 'f1', '', '2024-06-03T10:00:00Z'),
      ev('visit', 'f1', '', '2024-06-04T10:00:00Z'),
      ev('purchase', 'f1', '', '2024-06-10T10:00:00Z', { amount: 5 }),
      ev('sign_up', 'f2', '', '2024-06-03T11:00:00Z'),
      ev('purchase', 'f2', '', '2024-06-03T12:00:00Z', { amount: 5 }),
      ev('purchase', 'f2', '', '2024-06-03T13:00:00Z', { amount: 5 }),
      ev('visit', 'f3', '', '2024-06-05T10:00:00Z'),
    ]);
    const opts6 = UTC('2024-06-30T00:00:00Z');
    const day = await oracle.funnel('day', opts6);
    const row = (k: string): FunnelRow => find(day, 'cohort', k);
    expect(funnelKeys(day)).toEqual(['2024-06-01 * *', '2024-06-03 * *', '2024-06-05 * *']);
    expect(row('2024-06-01')).toMatchObject({ visit: 1, sign_up: 0, first_purchase: 0, sign_up_rate: 0, first_purchase_rate: null });
    expect(row('2024-06-03')).toMatchObject({
      visit: 1, sign_up: 2, first_purchase: 2, revisit: 1, repeat_purchase: 1, // f2 is new here; f1 signed up here
      sign_up_rate: 2, first_purchase_rate: 1, revisit_rate: 0.5, repeat_purchase_rate: 1,
    });
    // first_purchase_conversion differs: f1's first purchase precedes the sign_up (f < s) → 1 of 2.
    const kd = await oracle.kpis('day', opts6);
    expect(kpi(kd, '2024-06-03').first_purchase_conversion).toBe(0.5);
    expect(row('2024-06-05')).toMatchObject({ visit: 1, sign_up: 0 });
  });
});

describe('customers, retention, dormancy, spend and clv', () => {
  // c1 buys 01-15 (100) and 04-10 (50); c2 02-20 (200); c3 03-05 (10); c4 04-20 (40, first touch
  // 'ad') and visits 04-21. Spend in April: 90 on 'ad' and 30 on 'web'. 2024 is a leap year.
  const events = [
    ev('purchase', 'c1', '', '2024-01-15T10:00:00Z', { amount: 100 }),
    ev('purchase', 'c2', '', '2024-02-20T10:00:00Z', { amount: 200 }),
    ev('purchase', 'c3', '', '2024-03-05T10:00:00Z', { amount: 10 }),
    ev('cost', '', '', '2024-04-02T10:00:00Z', { amount: 90, channel: 'ad' }),
    ev('cost', '', '', '2024-04-03T10:00:00Z', { amount: 30, platform: 'web' }),
    ev('purchase', 'c1', '', '2024-04-10T10:00:00Z', { amount: 50 }),
    ev('purchase', 'c4', '', '2024-04-20T10:00:00Z', { amount: 40, channel: 'ad' }),
    ev('visit', 'c4', '', '2024-04-21T10:00:00Z'),
  ];
  const opts = UTC('2024-04-25T12:00:00Z'); // watermark day 04-25

  it('computes the month rows', async () => {
    await oracle.load(events);
    const month = await oracle.kpis('month', opts);
    expect(kpiKeys(month)).toEqual([
      '2024-01 * *', '2024-02 * *', '2024-03 * *',
      '2024-04 * *', '2024-04 * web', '2024-04 ad *', // web: spend only (no user event is on web)
    ]);
    const apr = kpi(month, '2024-04');
    // C(04-01) = purchases on [01-02, 03-31] (04-01 − 90 d = 01-02) → c1, c2, c3.
    // C(05-01) = purchases on [02-01, 04-30] → c1 (04-10), c2, c3, c4.
    // first purchasers in April: c4. crr = (4 − 1) / 3 = 1.
    // retained: of {c1, c2, c3}, c1 buys in April → 1/3, churn 2/3.
    expect(apr).toMatchObject({
      active_users: 2, purchasers: 2, orders: 2, revenue: 90, arppu: 45, first_purchasers: 1,
      customers_start: 3, customers_end: 4, crr: 1, spend: 120, cac: 120, revisit_rate_d1_3: 1,
    });
    expect(apr.cohort_retention).toBeCloseTo(1 / 3, 12);
    expect(apr.churn_rate).toBeCloseTo(2 / 3, 12);
    // clv = arppu × 1 / churn − cac = 45 × 1.5 − 120 = −52.5
    expect(apr.clv).toBeCloseTo(-52.5, 9);
    // dormant at e = min(04-30, 04-25) = 04-25: dormant_30 needs the last purchase ≤ 03-26 → c2, c3
    // (c1's last is 04-10, c4's 04-20); dormant_60 needs ≤ 02-25 → c2 only.
    expect(apr).toMatchObject({ dormant_30: 2, dormant_60: 1 });

    // March: C(03-01) = [2023-12-02, 02-29] → c1, c2; nobody of them buys in March → retention 0,
    // churn 1. first purchaser c3; C(04-01) = 3 → crr = (3 − 1) / 2 = 1.
    // clv = arppu 10 × 1 / 1 − cac (0 spend / 1) = 10. dormant at e = 03-31: ≤ 03-01 → c1, c2; ≤ 01-31 → c1.
    expect(kpi(month, '2024-03')).toMatchObject({
      customers_start: 2, customers_end: 3, first_purchasers: 1, crr: 1, cohort_retention: 0, churn_rate: 1,
      arppu: 10, cac: 0, clv: 10, dormant_30: 2, dormant_60: 1,
    });
    // January: no customers before → retention null → clv null, even though cac = 0.
    expect(kpi(month, '2024-01')).toMatchObject({ customers_start: 0, customers_end: 1, crr: null, clv: null, cac: 0 });

    // The ad channel: c4 only. Spend 90 → cac 90; no customers at 04-01 → clv null.
    expect(kpi(month, '2024-04', 'ad')).toMatchObject({
      active_users: 1, first_purchasers: 1, spend: 90, cac: 90, customers_start: 0, customers_end: 1, crr: null, clv: null,
      dormant_30: 0,
    });
    // The web platform row exists for the cost alone.
    expect(kpi(month, '2024-04', '*', 'web')).toMatchObject({
      active_users: 0, new_users: 0, purchasers: 0, revenue: 0, spend: 30, cac: null, pcr: null, arpu: null,
      customers_start: 0, customers_end: 0, dormant_30: 0, clv: null,
    });
  });

  it('puts spend on its own day and keeps clv off day and week rows', async () => {
    await oracle.load(events);
    const day = await oracle.kpis('day', opts);
    // The 04-02 cost makes (*,*) and (ad,*) rows with no active user; it does not make a web row.
    expect(kpiKeys(day).filter((k) => k.startsWith('2024-04-02'))).toEqual(['2024-04-02 * *', '2024-04-02 ad *']);
    expect(kpi(day, '2024-04-02')).toMatchObject({ active_users: 0, spend: 90, cac: null, clv: null });
    // A day row: C(04-20) = [01-21, 04-19] → c1 (04-10), c2, c3; c1 does not buy on 04-20 → churn 1.
    expect(kpi(day, '2024-04-20')).toMatchObject({ customers_start: 3, cohort_retention: 0, churn_rate: 1, clv: null });
    const week = await oracle.kpis('week', opts);
    for (const r of week) {
      expect(r.clv).toBeNull();
      expect(r.active_users_7d).toBeNull();
    }
  });

  it('honours activeCustomerDays', async () => {
    await oracle.load(events);
    // R = 30: C(04-01) = [03-02, 03-31] → c3 only; c3 does not buy in April → retention 0.
    const month = await oracle.kpis('month', { ...opts, activeCustomerDays: 30 });
    expect(kpi(month, '2024-04')).toMatchObject({ customers_start: 1, cohort_retention: 0, churn_rate: 1 });
  });

  it('bounds C(d) by [d − R, d − 1]', async () => {
    // R = 30. b2 buys 03-01 (= 04-01 − 31), b1 03-02 (= 04-01 − 30), b4 04-01, b3 04-30.
    await oracle.load([
      ev('purchase', 'b2', '', '2024-03-01T10:00:00Z', { amount: 1 }),
      ev('purchase', 'b1', '', '2024-03-02T10:00:00Z', { amount: 1 }),
      ev('purchase', 'b4', '', '2024-04-01T10:00:00Z', { amount: 1 }),
      ev('purchase', 'b3', '', '2024-04-30T10:00:00Z', { amount: 1 }),
    ]);
    const o30 = { ...UTC('2024-05-01T00:00:00Z'), activeCustomerDays: 30 };
    // April: C(04-01) = [03-02, 03-31] → b1; C(05-01) = [04-01, 04-30] → b4, b3 (not b1).
    // first purchasers b4, b3 → crr = (2 − 2) / 1 = 0.
    const month = await oracle.kpis('month', o30);
    expect(kpi(month, '2024-04')).toMatchObject({ customers_start: 1, customers_end: 2, first_purchasers: 2, crr: 0, cohort_retention: 0 });
    // Day 04-01: C(04-01) → b1 (b4's purchase that day is not before it); C(04-02) = [03-03, 04-01] → b4.
    const day = await oracle.kpis('day', o30);
    expect(kpi(day, '2024-04-01')).toMatchObject({ customers_start: 1, customers_end: 1, crr: 0 });
  });
});

describe('rolling active users', () => {
  it('counts [d − 6, d] and [d − 29, d] on day rows', async () => {
    // Around d = 06-10: r4 on 05-11 (d − 30, out of 30d), r5 on 05-12 (d − 29), r1 on 06-01,
    // r6 on 06-03 (d − 7, out of 7d), r2 on 06-04 (d − 6), r3 on 06-10 (d).
    await oracle.load([
      ev('visit', 'r4', '', '2024-05-11T10:00:00Z'),
      ev('visit', 'r5', '', '2024-05-12T10:00:00Z'),
      ev('visit', 'r1', '', '2024-06-01T10:00:00Z'),
      ev('visit', 'r6', '', '2024-06-03T10:00:00Z'),
      ev('visit', 'r2', '', '2024-06-04T10:00:00Z'),
      ev('visit', 'r3', '', '2024-06-10T10:00:00Z'),
      ev('message_sent', 'r4', '', '2024-06-10T11:00:00Z'), // not activity
    ]);
    const day = await oracle.kpis('day', UTC('2024-06-11T00:00:00Z'));
    expect(kpi(day, '2024-06-10')).toMatchObject({ active_users: 1, active_users_7d: 2, active_users_30d: 5 });
    expect(kpi(day, '2024-06-04')).toMatchObject({ active_users_7d: 3, active_users_30d: 5 }); // r1, r6, r2; + r4, r5
    const month = await oracle.kpis('month', UTC('2024-06-11T00:00:00Z'));
    expect(kpi(month, '2024-06')).toMatchObject({ active_users: 4, active_users_7d: null, active_users_30d: null });
  });
});

describe('calendar', () => {
  it('labels ISO weeks with the week-year at a year boundary', async () => {
    await oracle.load([
      ev('visit', 'w1', '', '2020-12-31T12:00:00Z'), // Thursday of 2020-W53
      ev('visit', 'w2', '', '2021-01-03T23:59:59.999Z'), // Sunday, still 2020-W53
      ev('visit', 'w3', '', '2021-01-04T00:00:00Z'), // Monday of 2021-W01
    ]);
    const opts = UTC('2021-01-05T00:00:00Z');
    const week = await oracle.kpis('week', opts);
    expect(kpiKeys(week)).toEqual(['2020-W53 * *', '2021-W01 * *']);
    expect(kpi(week, '2020-W53').active_users).toBe(2);
    const month = await oracle.kpis('month', opts);
    expect(kpiKeys(month)).toEqual(['2020-12 * *', '2021-01 * *']);
    expect(kpi(month, '2021-01').active_users).toBe(2);
    const day = await oracle.kpis('day', opts);
    expect(kpiKeys(day)).toEqual(['2020-12-31 * *', '2021-01-03 * *', '2021-01-04 * *']);
  });

  it('cuts days at local midnight in Asia/Seoul (UTC 15:00)', async () => {
    await oracle.load([
      ev('visit', 's1', '', '2024-01-31T14:59:59.999Z'), // 2024-01-31 23:59:59.999 KST
      ev('visit', 's2', '', '2024-01-31T15:00:00.000Z'), // 2024-02-01 00:00 KST
      ev('visit', 's3', '', '2024-01-07T14:59:59.999Z'), // Sunday 01-07 KST → 2024-W01
      ev('visit', 's4', '', '2024-01-07T15:00:00.000Z'), // Monday 01-08 KST → 2024-W02
    ]);
    const opts: OracleOptions = { timeZone: 'Asia/Seoul', watermark: Date.parse('2024-02-01T15:00:00Z') };
    const day = await oracle.kpis('day', opts);
    expect(kpiKeys(day)).toEqual(['2024-01-07 * *', '2024-01-08 * *', '2024-01-31 * *', '2024-02-01 * *']);
    const month = await oracle.kpis('month', opts);
    expect(month.map((r) => [r.window, r.active_users])).toEqual([['2024-01', 3], ['2024-02', 1]]);
    const week = await oracle.kpis('week', opts);
    expect(week.map((r) => [r.window, r.active_users])).toEqual([['2024-W01', 1], ['2024-W02', 1], ['2024-W05', 2]]);
    // Day 02-01 ends at 02-02 00:00 KST (= the watermark instant); + 7 d is after it → maturing.
    expect(kpi(day, '2024-02-01').first_purchase_maturing).toBe(true);
  });

  it('takes the watermark day in the zone for dormancy', async () => {
    // d1 buys on 2024-01-01 KST, d2 on 2023-12-02 KST (both at local midnight). The watermark
    // 2024-01-30T15:00Z is 01-31 00:00 KST, so in the January row e = 01-31: d1's 01-01 ≤ e − 30 and
    // d2's 12-02 ≤ e − 60 → dormant_30 = 2 (d1, d2), dormant_60 = 1 (d2). One ms earlier e = 01-30:
    // e − 30 = 12-31 (d2 only), e − 60 = 12-01 (nobody).
    await oracle.load([
      ev('purchase', 'd2', '', '2023-12-01T15:00:00Z', { amount: 1 }),
      ev('purchase', 'd1', '', '2023-12-31T15:00:00Z', { amount: 1 }),
    ]);
    const wm = Date.parse('2024-01-30T15:00:00Z');
    const at = await oracle.kpis('month', { timeZone: 'Asia/Seoul', watermark: wm });
    expect(kpiKeys(at)).toEqual(['2023-12 * *', '2024-01 * *']);
    expect(kpi(at, '2024-01')).toMatchObject({ dormant_30: 2, dormant_60: 1 });
    const before = await oracle.kpis('month', { timeZone: 'Asia/Seoul', watermark: wm - 1 });
    expect(kpi(before, '2024-01')).toMatchObject({ dormant_30: 1, dormant_60: 0 });
  });
});

describe('cohort matrices', () => {
  // k1: visit 01-10, sign_up 02-05 (app), buys 02-06 (100) and 03-01 (40).
  // k2: visit 01-20, buys 01-21 (10), refunds 5 on 03-02; never signs up.
  // k3: sign_up 02-10 (app), nothing else. Watermark 2024-03-15 → last age is March / 2024-W11.
  const events = [
    ev('visit', 'k1', '', '2024-01-10T10:00:00Z'),
    ev('visit', 'k2', '', '2024-01-20T10:00:00Z'),
    ev('purchase', 'k2', '', '2024-01-21T10:00:00Z', { amount: 10 }),
    ev('sign_up', 'k1', '', '2024-02-05T10:00:00Z', { platform: 'app' }),
    ev('purchase', 'k1', '', '2024-02-06T10:00:00Z', { amount: 100 }),
    ev('sign_up', 'k3', '', '2024-02-10T10:00:00Z', { platform: 'app' }),
    ev('purchase', 'k1', '', '2024-03-01T10:00:00Z', { amount: 40 }),
    ev('refund', 'k2', '', '2024-03-02T10:00:00Z', { amount: 5 }),
  ];
  const opts = UTC('2024-03-15T00:00:00Z');
  const KEY = ['grain', 'kind', 'cohort', 'channel', 'platform', 'age'] as const;
  const cr = (kind: CohortRow['kind'], cohort: string, platform: string, size: number, age: number,
    active: number, purchasers: number, revenue: number, cum: number): CohortRow =>
    ({ grain: 'month', kind, cohort, channel: '*', platform, size, age, active, purchasers, revenue, cum_revenue_per_user: cum });

  it('builds the first-activity month matrix up to the watermark', async () => {
    await oracle.load(events);
    const rows = await oracle.cohorts('month', 'first_activity', opts);
    const expected: CohortRow[] = [
      // January cohort {k1, k2}: Jan both active, k2 buys 10 → cum 10/2; Feb k1 buys 100 → 110/2;
      // Mar k1 buys 40, k2 refunds 5 → 35, cum 145/2.
      cr('first_activity', '2024-01', '*', 2, 0, 2, 1, 10, 5),
      cr('first_activity', '2024-01', '*', 2, 1, 1, 1, 100, 55),
      cr('first_activity', '2024-01', '*', 2, 2, 2, 1, 35, 72.5),
      // February cohort {k3}: active in Feb only.
      cr('first_activity', '2024-02', '*', 1, 0, 1, 0, 0, 0),
      cr('first_activity', '2024-02', '*', 1, 1, 0, 0, 0, 0),
      // The app track: k1 and k3 first appear on app in February (only their sign_ups are on app).
      cr('first_activity', '2024-02', 'app', 2, 0, 2, 0, 0, 0),
      cr('first_activity', '2024-02', 'app', 2, 1, 0, 0, 0, 0),
    ];
    expect(compareRows(rows, expected, KEY)).toEqual([]);
  });

  it('builds the signup month matrix without negative ages', async () => {
    await oracle.load(events);
    const rows = await oracle.cohorts('month', 'signup', opts);
    const expected: CohortRow[] = [
      // February signups {k1, k3}: Feb both active, k1 buys 100 → 50; Mar k1 buys 40 → 140/2.
      // k1's January visit (age −1) is not shown; k2 never signs up.
      cr('signup', '2024-02', '*', 2, 0, 2, 1, 100, 50),
      cr('signup', '2024-02', '*', 2, 1, 1, 1, 40, 70),
      cr('signup', '2024-02', 'app', 2, 0, 2, 0, 0, 0),
      cr('signup', '2024-02', 'app', 2, 1, 0, 0, 0, 0),
    ];
    expect(compareRows(rows, expected, KEY)).toEqual([]);
  });

  it('builds week matrices with ISO labels', async () => {
    await oracle.load(events);
    const rows = (await oracle.cohorts('week', 'signup', opts)).filter((r) => r.platform === '*');
    // Both sign up in 2024-W06 (Mon 02-05 .. Sun 02-11); the watermark 03-15 is in 2024-W11 → ages 0..5.
    expect(rows.map((r) => `${r.cohort}+${r.age}`)).toEqual([0, 1, 2, 3, 4, 5].map((a) => `2024-W06+${a}`));
    // Age 0: both active, k1 buys 100; age 3 = W09 (02-26 .. 03-03): k1 buys 40 → cum 140/2.
    expect(rows[0]).toMatchObject({ size: 2, active: 2, purchasers: 1, revenue: 100, cum_revenue_per_user: 50 });
    expect(rows[3]).toMatchObject({ active: 1, purchasers: 1, revenue: 40, cum_revenue_per_user: 70 });
    expect(rows[5]).toMatchObject({ active: 0, revenue: 0, cum_revenue_per_user: 70 });
  });
});

describe('compareRows', () => {
  type R = { k: string; x: number | null; s: string };
  it('reports missing, extra and different rows with tolerance', () => {
    const expected: R[] = [{ k: 'a', x: 1, s: 'p' }, { k: 'b', x: null, s: 'p' }, { k: 'c', x: 3, s: 'p' }];
    const actual: R[] = [{ k: 'a', x: 1 + 1e-12, s: 'p' }, { k: 'b', x: 0, s: 'q' }, { k: 'd', x: 3, s: 'p' }];
    // Expected rows are walked in order (field mismatches, missing rows), then the extra rows.
    expect(compareRows(actual, expected, ['k'])).toEqual([
      '[k="b"] x: actual 0, expected null',
      '[k="b"] s: actual "q", expected "p"',
      'missing row [k="c"]',
      'extra row [k="d"]',
    ]);
    expect(compareRows([{ k: 'z', x: 1e-12, s: '' }], [{ k: 'z', x: 0, s: '' }], ['k'])).toEqual([]);
    expect(compareRows([{ k: 'z', x: 1.001, s: '' }], [{ k: 'z', x: 1, s: '' }], ['k'], 1e-2)).toEqual([]);
  });

  it('caps the messages', () => {
    const many = Array.from({ length: 80 }, (_, i) => ({ k: String(i), x: i, s: '' }));
    const out = compareRows([], many, ['k']);
    expect(out).toHaveLength(51);
    expect(out[50]).toBe('... and 30 more differences');
  });
});
