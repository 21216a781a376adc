/**
 * An independent SQL recomputation of the KPIs, funnel and cohort matrices of docs/KPIS.md, in
 * DuckDB. It shares nothing with the engine but the output row types: identity stitching, local
 * days, windows, tracks and every KPI are re-derived here in SQL from the accepted events, so a
 * test can compare the engine's exports with these rows field by field (see compare.ts).
 *
 * Shape of the computation (every query):
 *   events        the accepted events as loaded, with their arrival order `seq`
 *   user_events   non-cost events with the canonical user (`uid`) and the user's first-touch
 *                 channel: tz-independent, built once per load()
 *   cost_events   the spend events (no user), built once per load()
 *   tev           "track events": user_events with their local day `day` and window `w`, fanned
 *                 out into the tracks (ch, pf) = ('*','*') | (first-touch channel,'*') | ('*',platform)
 *   user_facts    per (track, user): first activity / first sign_up / first purchase, total
 *                 purchases, revisit d+1..3 — so every KPI counts each (track, user) exactly once
 * and then one aggregate CTE per group of KPIs, left-joined onto the row set ("cells").
 *
 * Readings of the docs chosen here (the docs leave them open; the most literal one is taken):
 *  - `message_*` is a prefix: any type starting with `message_` (custom ones included) is not activity.
 *  - `cost` events never alias (they are not user events, whatever ids they carry).
 *  - "W.last's end + N days" is the instant local day W.last + 1 starts, plus N × 86 400 000 ms
 *    (the same ms arithmetic as first_purchase_conversion), and "after" is strict (>).
 *  - funnel `repeat_purchase` is nested in `revisit` ("of those" = the revisitors), and counts
 *    purchase events of all time in the track (refunds do not undo a purchase).
 *  - funnel `first_purchase` counts a cohort user's purchase at any time, even one before the sign_up.
 *  - cohort rows: ages 0..A where A = age of the watermark's window; a cohort whose window is after
 *    the watermark's window has no rows. Cohort revenue only sums ages ≥ 0.
 *  - dormant_k ignores purchases after e (only purchase days ≤ e are looked at).
 *  - cac is null when first_purchasers = 0 (like every rate), so clv is null then too.
 *  - first-touch ties on time go to the smaller channel by DuckDB's binary (UTF-8 byte) order, which
 *    equals JS string order except between astral characters and U+E000..U+FFFF.
 */
import { DuckDBInstance, type DuckDBAppender, type DuckDBConnection, type DuckDBValue } from '@duckdb/node-api';
import type { CohortRow, FunnelRow, KpiRow } from '../../operators/kpi-rows.js';

export interface OracleEvent {
  event_id: string;
  type: string;
  user_id: string;
  anonymous_id: string;
  /** ms UTC */
  ts: number;
  /** NaN or a number; NaN counts as 0. */
  amount: number;
  channel: string;
  platform: string;
}

/** The accepted events table both oracles load (seq = arrival order). */
export const EVENTS_DDL = `CREATE OR REPLACE TABLE events (
  seq BIGINT, event_id VARCHAR, type VARCHAR, user_id VARCHAR, anonymous_id VARCHAR,
  ts BIGINT, amount DOUBLE, channel VARCHAR, platform VARCHAR)`;

/** One event as a row of `events` (EVENTS_DDL). */
export function appendEvent(appender: DuckDBAppender, e: OracleEvent, seq: number): void {
  if (!Number.isSafeInteger(e.ts)) throw new Error(`oracle: event ${e.event_id} has a non-integer ts ${e.ts}`);
  appender.appendBigInt(BigInt(seq));
  appender.appendVarchar(e.event_id);
  appender.appendVarchar(e.type);
  appender.appendVarchar(e.user_id);
  appender.appendVarchar(e.anonymous_id);
  appender.appendBigInt(BigInt(e.ts));
  appender.appendDouble(e.amount);
  appender.appendVarchar(e.channel);
  appender.appendVarchar(e.platform);
  appender.endRow();
}

export interface OracleOptions {
  timeZone: string;
  /** ms; its local day is "the watermark's local day". */
  watermark: number;
  /** kpi.firstPurchaseDays, default 7. */
  firstPurchaseDays?: number;
  /** kpi.activeCustomerDays, default 90. */
  activeCustomerDays?: number;
}

/**
 * Calendar helpers, as macros so the queries read like the docs. A window is identified by its
 * first local day (a DATE); `grain` is 'day' | 'week' | 'month'.
 */
const MACROS = `
-- The local calendar day of instant ms in zone tz. epoch_ms(BIGINT) gives a naive TIMESTAMP (exact
-- to the ms); timezone('UTC', ·) makes it an instant (TIMESTAMPTZ) independently of the session's
-- TimeZone setting, and timezone(tz, instant) gives the naive local wall-clock time.
CREATE OR REPLACE MACRO local_day(tz, ms) AS CAST(timezone(tz, timezone('UTC', epoch_ms(ms))) AS DATE);
-- The instant (ms) local day d starts in zone tz: timezone(tz, naive) reads a wall-clock time in tz.
CREATE OR REPLACE MACRO local_day_start_ms(tz, d) AS epoch_ms(timezone(tz, CAST(d AS TIMESTAMP)));
CREATE OR REPLACE MACRO window_first(grain, d) AS CASE grain
  WHEN 'day' THEN d
  WHEN 'week' THEN CAST(date_trunc('week', d) AS DATE)      -- ISO week: Monday first
  ELSE CAST(date_trunc('month', d) AS DATE) END;
CREATE OR REPLACE MACRO window_last(grain, w) AS CASE grain
  WHEN 'day' THEN w
  WHEN 'week' THEN w + 6
  ELSE CAST(w + INTERVAL 1 MONTH AS DATE) - 1 END;
-- %G-W%V: ISO week-year and ISO week number (2020-12-31 → 2020-W53, 2021-01-04 → 2021-W01).
-- (One strftime per grain: DuckDB wants a constant format.)
CREATE OR REPLACE MACRO window_label(grain, w) AS CASE grain
  WHEN 'day' THEN strftime(w, '%Y-%m-%d')
  WHEN 'week' THEN strftime(w, '%G-W%V')
  ELSE strftime(w, '%Y-%m') END;
-- The window n windows after window w, and how many windows window w is after window c.
CREATE OR REPLACE MACRO window_after(grain, w, n) AS CASE grain
  WHEN 'day' THEN w + CAST(n AS INTEGER)
  WHEN 'week' THEN w + 7 * CAST(n AS INTEGER)
  ELSE CAST(w + to_months(CAST(n AS INTEGER)) AS DATE) END;
CREATE OR REPLACE MACRO window_age(grain, c, w) AS CASE grain
  WHEN 'day' THEN w - c
  WHEN 'week' THEN (w - c) // 7
  ELSE datediff('month', c, w) END;
-- A rate: null when the denominator is 0.
CREATE OR REPLACE MACRO ratio(num, den) AS CASE WHEN den = 0 THEN NULL ELSE CAST(num AS DOUBLE) / den END;
-- Net revenue of a set of events: Σ purchase.amount − Σ refund.amount.
CREATE OR REPLACE MACRO net_revenue(type, amount) AS
  coalesce(sum(amount) FILTER (WHERE type = 'purchase'), 0) - coalesce(sum(amount) FILTER (WHERE type = 'refund'), 0);
`;

/**
 * Identity stitching and first touch: `user_events`, every non-cost event with its canonical user
 * `uid` (docs/KPIS.md "Inputs"), net amount, activity flag and first-touch channel. Both oracles
 * build it once per load().
 */
export const USER_EVENTS_SQL = `
CREATE OR REPLACE TABLE user_events AS
WITH
  -- An alias is made by the first accepted event in arrival order carrying both ids; later,
  -- conflicting pairings are ignored. Cost events are not user events and never alias.
  aliases AS (
    SELECT anonymous_id, arg_min(user_id, seq) AS member
    FROM events
    WHERE type <> 'cost' AND user_id <> '' AND anonymous_id <> ''
    GROUP BY anonymous_id),
  -- Canonical user: the user_id, else the member the anonymous id is aliased to (retroactively,
  -- events before the stitch included), else the anonymous profile.
  resolved AS (
    SELECT e.seq, e.type, e.ts, e.channel, e.platform,
           CASE WHEN isnan(e.amount) THEN 0 ELSE e.amount END AS amount,
           CASE WHEN e.user_id <> '' THEN e.user_id
                WHEN a.member IS NOT NULL THEN a.member
                ELSE 'anon:' || e.anonymous_id END AS uid,
           NOT starts_with(e.type, 'message_') AS is_activity
    FROM events e LEFT JOIN aliases a ON a.anonymous_id = e.anonymous_id
    WHERE e.type <> 'cost'),
  -- First touch over ALL the user's activity (every platform): min (ts, channel).
  first_touch AS (
    SELECT uid, first(channel ORDER BY ts, channel) AS first_touch_channel
    FROM resolved WHERE is_activity GROUP BY uid)
SELECT r.*, f.first_touch_channel
FROM resolved r LEFT JOIN first_touch f USING (uid);
`;

const RESOLVE = `${USER_EVENTS_SQL}

CREATE OR REPLACE TABLE cost_events AS
SELECT seq, ts, channel, platform, CASE WHEN isnan(amount) THEN 0 ELSE amount END AS amount
FROM events WHERE type = 'cost';
`;

/**
 * CTEs shared by every query: the options, the track events and the per-(track, user) facts.
 * Parameters: $tz, $grain, $kind, $watermark, $fp_days, $customer_days (all always bound).
 */
const PRELUDE = `
params AS (
  SELECT $tz::VARCHAR AS tz, $grain::VARCHAR AS grain, $kind::VARCHAR AS kind,
         $watermark::BIGINT AS wm_ms, local_day($tz::VARCHAR, $watermark::BIGINT) AS wm_day,
         $fp_days::INTEGER AS n_days, $customer_days::INTEGER AS r_days),
dated AS (
  SELECT u.*, local_day(p.tz, u.ts) AS day, window_first(p.grain, local_day(p.tz, u.ts)) AS w
  FROM user_events u, params p),
-- The tracks: (*,*) = all user events; (c,*) = all events of the users whose first touch is c ≠ '';
-- (*,p) = only the platform-p events (so "first X" inside it means first X on platform p).
tev AS MATERIALIZED (
  SELECT '*' AS ch, '*' AS pf, uid, type, ts, amount, is_activity, day, w FROM dated
  UNION ALL
  SELECT first_touch_channel, '*', uid, type, ts, amount, is_activity, day, w FROM dated
  WHERE first_touch_channel <> ''
  UNION ALL
  SELECT '*', platform, uid, type, ts, amount, is_activity, day, w FROM dated
  WHERE platform <> ''),
user_firsts AS (
  SELECT ch, pf, uid,
         min(ts) FILTER (WHERE is_activity) AS first_activity_ts,
         min(ts) FILTER (WHERE type = 'sign_up') AS first_signup_ts,
         min(ts) FILTER (WHERE type = 'purchase') AS first_purchase_ts,
         count(*) FILTER (WHERE type = 'purchase') AS total_purchases
  FROM tev GROUP BY ch, pf, uid),
user_first_days AS (
  SELECT f.*,
         local_day(p.tz, f.first_activity_ts) AS first_activity_day,
         local_day(p.tz, f.first_signup_ts) AS first_signup_day,
         local_day(p.tz, f.first_purchase_ts) AS first_purchase_day
  FROM user_firsts f, params p),
-- First purchasers with activity on local day fpd+1, fpd+2 or fpd+3 (fpd = first purchase day).
revisitors AS (
  SELECT DISTINCT f.ch, f.pf, f.uid
  FROM user_first_days f JOIN tev e USING (ch, pf, uid)
  WHERE e.is_activity AND e.day BETWEEN f.first_purchase_day + 1 AND f.first_purchase_day + 3),
user_facts AS MATERIALIZED (
  SELECT f.*,
         window_first(p.grain, f.first_activity_day) AS first_activity_w,
         window_first(p.grain, f.first_signup_day) AS first_signup_w,
         window_first(p.grain, f.first_purchase_day) AS first_purchase_w,
         r.uid IS NOT NULL AS revisited
  FROM user_first_days f CROSS JOIN params p LEFT JOIN revisitors r USING (ch, pf, uid))`;

const KPI_SQL = `
WITH ${PRELUDE},
-- Spend goes to (*,*), to its own channel's row and to its own platform's row.
cost_tracks AS (
  SELECT '*' AS ch, '*' AS pf, ts, amount FROM cost_events
  UNION ALL SELECT channel, '*', ts, amount FROM cost_events WHERE channel <> ''
  UNION ALL SELECT '*', platform, ts, amount FROM cost_events WHERE platform <> ''),
spend_cells AS (
  SELECT c.ch, c.pf, window_first(p.grain, local_day(p.tz, c.ts)) AS w, sum(c.amount) AS spend
  FROM cost_tracks c, params p GROUP BY ALL),
-- A row exists when active_users > 0 or a cost event falls in the cell.
cells AS MATERIALIZED (
  SELECT k.ch, k.pf, k.w, window_last(p.grain, k.w) AS w_last,
         least(window_last(p.grain, k.w), p.wm_day) AS dormancy_day
  FROM (SELECT ch, pf, w FROM tev WHERE is_activity
        UNION SELECT ch, pf, w FROM spend_cells) k, params p),
window_counts AS (
  SELECT ch, pf, w,
         count(DISTINCT uid) FILTER (WHERE is_activity) AS active_users,
         count(DISTINCT uid) FILTER (WHERE type = 'purchase') AS purchasers,
         count(*) FILTER (WHERE type = 'purchase') AS orders,
         net_revenue(type, amount) AS revenue
  FROM tev GROUP BY ch, pf, w),
window_buyers AS (
  SELECT ch, pf, w, uid, count(*) AS purchases FROM tev WHERE type = 'purchase' GROUP BY ALL),
repeat_counts AS (
  SELECT ch, pf, w, count(*) AS repeat_buyers FROM window_buyers WHERE purchases >= 2 GROUP BY ALL),
new_user_counts AS (
  SELECT ch, pf, first_activity_w AS w, count(*) AS new_users
  FROM user_facts WHERE first_activity_w IS NOT NULL GROUP BY ALL),
-- first_purchase_conversion numerator: first purchase f with s ≤ f < s + N days (in ms).
signup_counts AS (
  SELECT f.ch, f.pf, f.first_signup_w AS w, count(*) AS signups,
         count(*) FILTER (WHERE f.first_purchase_ts >= f.first_signup_ts
                            AND f.first_purchase_ts < f.first_signup_ts + p.n_days::BIGINT * 86400000) AS converted
  FROM user_facts f, params p WHERE f.first_signup_w IS NOT NULL GROUP BY ALL),
first_purchase_counts AS (
  SELECT ch, pf, first_purchase_w AS w, count(*) AS first_purchasers,
         count(*) FILTER (WHERE revisited) AS revisitors
  FROM user_facts WHERE first_purchase_w IS NOT NULL GROUP BY ALL),
purchase_days AS (SELECT DISTINCT ch, pf, uid, day FROM tev WHERE type = 'purchase'),
-- C(W.first): users with a purchase on a local day in [W.first − R, W.first − 1]; of them, the
-- retained ones also purchase in W.
start_customers AS (
  SELECT DISTINCT c.ch, c.pf, c.w, d.uid
  FROM cells c JOIN purchase_days d ON d.ch = c.ch AND d.pf = c.pf, params p
  WHERE d.day BETWEEN c.w - p.r_days AND c.w - 1),
start_counts AS (
  SELECT s.ch, s.pf, s.w, count(*) AS customers_start, count(b.uid) AS retained
  FROM start_customers s LEFT JOIN window_buyers b USING (ch, pf, w, uid) GROUP BY ALL),
-- C(W.last + 1): a purchase in [W.last + 1 − R, W.last].
end_counts AS (
  SELECT c.ch, c.pf, c.w, count(DISTINCT d.uid) AS customers_end
  FROM cells c JOIN purchase_days d ON d.ch = c.ch AND d.pf = c.pf, params p
  WHERE d.day BETWEEN c.w_last + 1 - p.r_days AND c.w_last GROUP BY ALL),
-- dormant_k at e = min(W.last, watermark day): some purchase ≤ e − k and none in [e − k + 1, e],
-- i.e. the last purchase day up to e is ≤ e − k.
last_purchase_by_cell AS (
  SELECT c.ch, c.pf, c.w, c.dormancy_day, d.uid, max(d.day) AS last_purchase_day
  FROM cells c JOIN purchase_days d ON d.ch = c.ch AND d.pf = c.pf
  WHERE d.day <= c.dormancy_day GROUP BY ALL),
dormant_counts AS (
  SELECT ch, pf, w,
         count(*) FILTER (WHERE last_purchase_day <= dormancy_day - 30) AS dormant_30,
         count(*) FILTER (WHERE last_purchase_day <= dormancy_day - 60) AS dormant_60
  FROM last_purchase_by_cell GROUP BY ALL),
-- Day rows only: distinct users with activity in [d − 6, d] and [d − 29, d].
activity_days AS (SELECT DISTINCT ch, pf, uid, day FROM tev WHERE is_activity),
rolling_counts AS (
  SELECT c.ch, c.pf, c.w,
         count(DISTINCT a.uid) FILTER (WHERE a.day >= c.w - 6) AS active_7d,
         count(DISTINCT a.uid) AS active_30d
  FROM cells c JOIN activity_days a ON a.ch = c.ch AND a.pf = c.pf, params p
  WHERE p.grain = 'day' AND a.day BETWEEN c.w - 29 AND c.w GROUP BY ALL),
counts AS (
  SELECT c.ch, c.pf, c.w, c.w_last,
         coalesce(wc.active_users, 0) AS active_users,
         coalesce(nu.new_users, 0) AS new_users,
         coalesce(su.signups, 0) AS signups,
         coalesce(su.converted, 0) AS converted,
         coalesce(wc.purchasers, 0) AS purchasers,
         coalesce(wc.orders, 0) AS orders,
         coalesce(wc.revenue, 0) AS revenue,
         coalesce(rp.repeat_buyers, 0) AS repeat_buyers,
         coalesce(fp.first_purchasers, 0) AS first_purchasers,
         coalesce(fp.revisitors, 0) AS revisitors,
         coalesce(sc.customers_start, 0) AS customers_start,
         coalesce(sc.retained, 0) AS retained,
         coalesce(ec.customers_end, 0) AS customers_end,
         coalesce(dc.dormant_30, 0) AS dormant_30,
         coalesce(dc.dormant_60, 0) AS dormant_60,
         coalesce(sp.spend, 0) AS spend,
         coalesce(rc.active_7d, 0) AS active_7d,
         coalesce(rc.active_30d, 0) AS active_30d
  FROM cells c
  LEFT JOIN window_counts wc USING (ch, pf, w)
  LEFT JOIN new_user_counts nu USING (ch, pf, w)
  LEFT JOIN signup_counts su USING (ch, pf, w)
  LEFT JOIN repeat_counts rp USING (ch, pf, w)
  LEFT JOIN first_purchase_counts fp USING (ch, pf, w)
  LEFT JOIN start_counts sc USING (ch, pf, w)
  LEFT JOIN end_counts ec USING (ch, pf, w)
  LEFT JOIN dormant_counts dc USING (ch, pf, w)
  LEFT JOIN spend_cells sp USING (ch, pf, w)
  LEFT JOIN rolling_counts rc USING (ch, pf, w)),
rates AS (
  SELECT k.*,
         ratio(k.revenue, k.purchasers) AS arppu,
         1 - ratio(k.retained, k.customers_start) AS churn_rate,
         ratio(k.spend, k.first_purchasers) AS cac
  FROM counts k)
SELECT p.grain,
       window_label(p.grain, r.w) AS "window",
       r.ch AS channel,
       r.pf AS platform,
       r.active_users,
       r.new_users,
       r.signups,
       ratio(r.signups, r.new_users) AS signup_conversion,
       r.purchasers,
       r.orders,
       r.revenue,
       ratio(r.purchasers, r.active_users) AS pcr,
       r.arppu,
       ratio(r.revenue, r.active_users) AS arpu,
       ratio(r.repeat_buyers, r.purchasers) AS repeat_purchase_rate,
       r.first_purchasers,
       ratio(r.converted, r.signups) AS first_purchase_conversion,
       local_day_start_ms(p.tz, r.w_last + 1) + p.n_days::BIGINT * 86400000 > p.wm_ms AS first_purchase_maturing,
       ratio(r.revisitors, r.first_purchasers) AS revisit_rate_d1_3,
       r.customers_start,
       r.customers_end,
       ratio(r.customers_end - r.first_purchasers, r.customers_start) AS crr,
       ratio(r.retained, r.customers_start) AS cohort_retention,
       r.churn_rate,
       r.dormant_30,
       r.dormant_60,
       r.spend,
       r.cac,
       CASE WHEN p.grain = 'month' AND r.churn_rate <> 0
            THEN r.arppu * (1 / r.churn_rate) - r.cac END AS clv,   -- null when any part is null
       CASE WHEN p.grain = 'day' THEN r.active_7d END AS active_users_7d,
       CASE WHEN p.grain = 'day' THEN r.active_30d END AS active_users_30d
FROM rates r, params p
ORDER BY r.w, r.ch, r.pf`;

const FUNNEL_SQL = `
WITH ${PRELUDE},
visits AS (
  SELECT ch, pf, first_activity_w AS w, count(*) AS visit
  FROM user_facts WHERE first_activity_w IS NOT NULL GROUP BY ALL),
-- The signup cohort of W and its nested steps (each step a subset of the previous one).
signup_cohort AS (
  SELECT ch, pf, first_signup_w AS w,
         count(*) AS sign_up,
         count(*) FILTER (WHERE first_purchase_ts IS NOT NULL) AS first_purchase,
         count(*) FILTER (WHERE first_purchase_ts IS NOT NULL AND revisited) AS revisit,
         count(*) FILTER (WHERE first_purchase_ts IS NOT NULL AND revisited AND total_purchases >= 2) AS repeat_purchase
  FROM user_facts WHERE first_signup_w IS NOT NULL GROUP BY ALL),
steps AS (
  SELECT ch, pf, w,
         coalesce(v.visit, 0) AS visit, coalesce(s.sign_up, 0) AS sign_up,
         coalesce(s.first_purchase, 0) AS first_purchase, coalesce(s.revisit, 0) AS revisit,
         coalesce(s.repeat_purchase, 0) AS repeat_purchase
  FROM visits v FULL JOIN signup_cohort s USING (ch, pf, w))
SELECT p.grain, window_label(p.grain, s.w) AS cohort, s.ch AS channel, s.pf AS platform,
       s.visit, s.sign_up, s.first_purchase, s.revisit, s.repeat_purchase,
       ratio(s.sign_up, s.visit) AS sign_up_rate,
       ratio(s.first_purchase, s.sign_up) AS first_purchase_rate,
       ratio(s.revisit, s.first_purchase) AS revisit_rate,
       ratio(s.repeat_purchase, s.revisit) AS repeat_purchase_rate
FROM steps s, params p
WHERE s.visit > 0 OR s.sign_up > 0
ORDER BY s.w, s.ch, s.pf`;

const COHORT_SQL = `
WITH ${PRELUDE},
members AS (
  SELECT ch, pf, uid, cohort FROM (
    SELECT f.ch, f.pf, f.uid,
           CASE p.kind WHEN 'first_activity' THEN f.first_activity_w ELSE f.first_signup_w END AS cohort
    FROM user_facts f, params p)
  WHERE cohort IS NOT NULL),
sizes AS (SELECT ch, pf, cohort, count(*) AS size FROM members GROUP BY ALL),
-- Every age from 0 to the watermark's window (none when the cohort is after it).
grid AS (
  SELECT s.ch, s.pf, s.cohort, s.size,
         unnest(range(0, window_age(p.grain, s.cohort, window_first(p.grain, p.wm_day)) + 1)) AS age
  FROM sizes s, params p),
-- What the cohort's users did in each window (tev.w is the window of the requested grain).
member_windows AS (
  SELECT m.ch, m.pf, m.cohort, e.w,
         count(DISTINCT m.uid) FILTER (WHERE e.is_activity) AS active,
         count(DISTINCT m.uid) FILTER (WHERE e.type = 'purchase') AS purchasers,
         net_revenue(e.type, e.amount) AS revenue
  FROM members m JOIN tev e USING (ch, pf, uid) GROUP BY ALL),
cells AS (
  SELECT g.ch, g.pf, g.cohort, g.size, g.age,
         coalesce(mw.active, 0) AS active,
         coalesce(mw.purchasers, 0) AS purchasers,
         coalesce(mw.revenue, 0) AS revenue
  FROM grid g CROSS JOIN params p
  LEFT JOIN member_windows mw
    ON mw.ch = g.ch AND mw.pf = g.pf AND mw.cohort = g.cohort AND mw.w = window_after(p.grain, g.cohort, g.age))
SELECT p.grain, p.kind, window_label(p.grain, c.cohort) AS cohort, c.ch AS channel, c.pf AS platform,
       c.size, c.age, c.active, c.purchasers, c.revenue,
       sum(c.revenue) OVER (PARTITION BY c.ch, c.pf, c.cohort ORDER BY c.age ROWS UNBOUNDED PRECEDING) / c.size
         AS cum_revenue_per_user
FROM cells c, params p
ORDER BY c.cohort, c.ch, c.pf, c.age`;

type Raw = Record<string, unknown>;

/** DuckDB BIGINT / HUGEINT arrive as bigint, DOUBLE as number. */
function num(row: Raw, field: string): number {
  const v = row[field];
  if (typeof v === 'number') return v;
  if (typeof v === 'bigint') return Number(v);
  throw new Error(`oracle: field ${field} is not a number: ${String(v)}`);
}
function numOrNull(row: Raw, field: string): number | null {
  return row[field] === null ? null : num(row, field);
}
function str(row: Raw, field: string): string {
  const v = row[field];
  if (typeof v !== 'string') throw new Error(`oracle: field ${field} is not a string: ${String(v)}`);
  return v;
}
function bool(row: Raw, field: string): boolean {
  const v = row[field];
  if (typeof v !== 'boolean') throw new Error(`oracle: field ${field} is not a boolean: ${String(v)}`);
  return v;
}

export class KpiOracle {
  private constructor(
    private readonly instance: DuckDBInstance,
    private readonly conn: DuckDBConnection,
  ) {}

  static async create(): Promise<KpiOracle> {
    const instance = await DuckDBInstance.create(':memory:');
    const conn = await instance.connect();
    await conn.run(MACROS);
    return new KpiOracle(instance, conn);
  }

  /** events = the ACCEPTED events in arrival order. Replaces any previous load. */
  async load(events: readonly OracleEvent[]): Promise<void> {
    await this.conn.run(EVENTS_DDL);
    const appender = await this.conn.createAppender('events');
    try {
      events.forEach((e, seq) => appendEvent(appender, e, seq));
      appender.flushSync();
    } finally {
      appender.closeSync();
    }
    await this.conn.run(RESOLVE);
  }

  async kpis(grain: 'day' | 'week' | 'month', opts: OracleOptions): Promise<KpiRow[]> {
    const rows = await this.query(KPI_SQL, grain, '', opts);
    return rows.map((r) => ({
      grain,
      window: str(r, 'window'),
      channel: str(r, 'channel'),
      platform: str(r, 'platform'),
      active_users: num(r, 'active_users'),
      new_users: num(r, 'new_users'),
      signups: num(r, 'signups'),
      signup_conversion: numOrNull(r, 'signup_conversion'),
      purchasers: num(r, 'purchasers'),
      orders: num(r, 'orders'),
      revenue: num(r, 'revenue'),
      pcr: numOrNull(r, 'pcr'),
      arppu: numOrNull(r, 'arppu'),
      arpu: numOrNull(r, 'arpu'),
      repeat_purchase_rate: numOrNull(r, 'repeat_purchase_rate'),
      first_purchasers: num(r, 'first_purchasers'),
      first_purchase_conversion: numOrNull(r, 'first_purchase_conversion'),
      first_purchase_maturing: bool(r, 'first_purchase_maturing'),
      revisit_rate_d1_3: numOrNull(r, 'revisit_rate_d1_3'),
      customers_start: num(r, 'customers_start'),
      customers_end: num(r, 'customers_end'),
      crr: numOrNull(r, 'crr'),
      cohort_retention: numOrNull(r, 'cohort_retention'),
      churn_rate: numOrNull(r, 'churn_rate'),
      dormant_30: num(r, 'dormant_30'),
      dormant_60: num(r, 'dormant_60'),
      spend: num(r, 'spend'),
      cac: numOrNull(r, 'cac'),
      clv: numOrNull(r, 'clv'),
      active_users_7d: numOrNull(r, 'active_users_7d'),
      active_users_30d: numOrNull(r, 'active_users_30d'),
    }));
  }

  async cohorts(grain: 'week' | 'month', kind: 'first_activity' | 'signup', opts: OracleOptions): Promise<CohortRow[]> {
    const rows = await this.query(COHORT_SQL, grain, kind, opts);
    return rows.map((r) => ({
      grain,
      kind,
      cohort: str(r, 'cohort'),
      channel: str(r, 'channel'),
      platform: str(r, 'platform'),
      size: num(r, 'size'),
      age: num(r, 'age'),
      active: num(r, 'active'),
      purchasers: num(r, 'purchasers'),
      revenue: num(r, 'revenue'),
      cum_revenue_per_user: num(r, 'cum_revenue_per_user'),
    }));
  }

  async funnel(grain: 'day' | 'week' | 'month', opts: OracleOptions): Promise<FunnelRow[]> {
    const rows = await this.query(FUNNEL_SQL, grain, '', opts);
    return rows.map((r) => ({
      grain,
      cohort: str(r, 'cohort'),
      channel: str(r, 'channel'),
      platform: str(r, 'platform'),
      visit: num(r, 'visit'),
      sign_up: num(r, 'sign_up'),
      first_purchase: num(r, 'first_purchase'),
      revisit: num(r, 'revisit'),
      repeat_purchase: num(r, 'repeat_purchase'),
      sign_up_rate: numOrNull(r, 'sign_up_rate'),
      first_purchase_rate: numOrNull(r, 'first_purchase_rate'),
      revisit_rate: numOrNull(r, 'revisit_rate'),
      repeat_purchase_rate: numOrNull(r, 'repeat_purchase_rate'),
    }));
  }

  async close(): Promise<void> {
    this.conn.closeSync();
    this.instance.closeSync();
  }

  private async query(sql: string, grain: string, kind: string, opts: OracleOptions): Promise<Raw[]> {
    const values: Record<string, DuckDBValue> = {
      tz: opts.timeZone,
      grain,
      kind,
      watermark: BigInt(Math.floor(opts.watermark)),
      fp_days: opts.firstPurchaseDays ?? 7,
      customer_days: opts.activeCustomerDays ?? 90,
    };
    const reader = await this.conn.runAndReadAll(sql, values);
    return reader.getRowObjectsJS() as Raw[];
  }
}
