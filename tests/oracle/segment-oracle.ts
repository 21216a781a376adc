/**
 * An independent SQL recomputation of segment membership (docs/SEGMENTS.md) in DuckDB. It shares
 * nothing with the engine but the rule types: identity stitching, the state of a user at an
 * instant t and every condition are re-derived in SQL from the accepted events, so a test can
 * compare the engine's membership (or the replay of its SegmentChange records) with this one.
 *
 * Shape of the computation:
 *   events, event_props   the accepted events as loaded (arrival order `seq`) and their props
 *   user_events           non-cost events with the canonical user `uid` (docs/KPIS.md "Inputs"),
 *   user_props            and their props as (uid, ts, key, value); both built once per load()
 * and per members(defs, t, tz) call:
 *   ev, evp               the user events / props with ts ≤ t — the whole state a rule sees at t
 *   users                 one row per user known at t, carrying t and t's local month
 *   membership            (segment, uid, tier), filled one segment at a time in file order, so an
 *                         `inSegment` reads only the rows of segments evaluated before it
 * Each segment is one INSERT … SELECT over `users` whose condition is the rule compiled to a SQL
 * boolean: every leaf is a scalar (correlated) subquery over the user's rows of `ev` / `evp`, and
 * all / any / not are AND / OR / NOT. Leaves are wrapped in coalesce(…, false) so that a missing
 * value (no activity, no such prop) is a plain false and `not` of it holds (SQL's NULL would
 * otherwise make NOT NULL → NULL → "not a member").
 *
 * Readings of the docs chosen here:
 *  - Users evaluated at t: every canonical user with at least one accepted user event with ts ≤ t.
 *    The engine only knows a user once it has seen one of their events, and membership at t is over
 *    the events ≤ t, so a user whose events are all after t has no state at t and is not listed
 *    (even for rules like `didNot` or `not(…)` that would hold on an empty history). Cost events
 *    have no user and create none.
 *  - Aliases are decided by ALL loaded events in arrival order — also pairings carried by events
 *    with ts > t: aliasing is retroactive and the engine applies every stitch it has seen.
 *  - did / didNot / sum / sequence / signedUp and `prop:` look at every user event, message_*
 *    included; only `attr: platform` is restricted to activity (not cost, not message_*).
 *  - `attr` with no value at t (no activity yet; no event carrying the key) does not hold, for any
 *    list of values; an empty platform or prop value '' is a value like any other.
 *  - birthdayMonth reads the latest `prop:birthday` (ties: larger value) and only that one: a
 *    malformed latest value never matches, even if an earlier value was well-formed. The formats
 *    are checked as patterns (`\d{4}-\d{2}-\d{2}` or `\d{2}-\d{2}`), not as calendar dates; a month
 *    outside 01..12 simply never equals a local month.
 *  - sequence with A = B never holds (the A event itself is a B event with a ≤ ts ≤ t).
 *  - Ties on time pick the larger string by DuckDB's byte (UTF-8) order, which equals JavaScript's
 *    UTF-16 order except between characters above U+FFFF and those in U+E000–U+FFFF.
 *  - Sums are IEEE doubles summed in an unspecified order: exact for integer amounts, but a sum of
 *    fractional amounts landing exactly on a bound may differ from the engine by rounding.
 */
import { DuckDBInstance, type DuckDBConnection } from '@duckdb/node-api';
import { durationMs, type Condition, type SegmentDef } from '../../operators/segment-rules.js';
import { EVENTS_DDL, USER_EVENTS_SQL, appendEvent, type OracleEvent } from './kpi-oracle.js';

/** An accepted event as the KPI oracle takes it, plus its props. */
export interface SegEvent extends OracleEvent {
  props?: Record<string, string>;
}

/** Identity stitching (the KPI oracle's user_events), then the props of user events. */
const RESOLVE = `${USER_EVENTS_SQL}

-- Props of user events, with their event's user and time (cost events' props belong to nobody).
CREATE OR REPLACE TABLE user_props AS
SELECT u.uid, u.ts, p.key, p.value
FROM event_props p JOIN user_events u USING (seq);
`;

/** A SQL string literal. */
function sqlString(s: string): string {
  return `'${s.replaceAll("'", "''")}'`;
}

/** A SQL BIGINT literal for an integer number of ms. */
function sqlMs(ms: number, what: string): string {
  if (!Number.isSafeInteger(ms)) throw new Error(`segment oracle: ${what} is not an integer number of ms: ${ms}`);
  return `CAST(${ms} AS BIGINT)`;
}

/** A SQL DOUBLE literal (String(x) round-trips a double, e.g. 1e+21, -0.5). */
function sqlDouble(x: number): string {
  return `CAST(${sqlString(String(x))} AS DOUBLE)`;
}

function sqlDuration(d: string): string {
  return sqlMs(durationMs(d), `duration '${d}'`);
}

/** A non-null SQL boolean: a leaf whose subquery yields NULL (no value at t) does not hold. */
function leaf(sql: string): string {
  return `coalesce(${sql}, false)`;
}

/**
 * Compiles a condition to a SQL boolean over the current `users` row `u` (columns uid, t,
 * local_month) and the tables ev (user events ≤ t), evp (props ≤ t) and membership (segments
 * evaluated so far). `evaluated` maps the ids of earlier segments to their tier names.
 */
function compile(c: Condition, evaluated: ReadonlyMap<string, readonly string[]>): string {
  // The user's events of one type, within the window (t − D, t] if one is given.
  const ofType = (type: string, within: string | undefined): string =>
    `e.uid = u.uid AND e.type = ${sqlString(type)}` + (within === undefined ? '' : ` AND e.ts > u.t - ${sqlDuration(within)}`);

  if ('did' in c) {
    // count ≥ atLeast (default 1) and ≤ atMost (if given); an aggregate without GROUP BY always
    // yields one row, so the count of no events is 0.
    const bounds = [`count(*) >= ${c.atLeast ?? 1}`];
    if (c.atMost !== undefined) bounds.push(`count(*) <= ${c.atMost}`);
    return leaf(`(SELECT ${bounds.join(' AND ')} FROM ev e WHERE ${ofType(c.did, c.within)})`);
  }
  if ('didNot' in c) {
    return leaf(`(NOT EXISTS (SELECT 1 FROM ev e WHERE ${ofType(c.didNot, c.within)}))`);
  }
  if ('sum' in c) {
    // Σ amount (NaN already 0) of the window; the sum of no events is 0. Without any bound the
    // condition holds for everyone (and a select list with no aggregate would return a row per event).
    const total = 'coalesce(sum(e.amount), 0)';
    const bounds: string[] = [];
    if (c.atLeast !== undefined) bounds.push(`${total} >= ${sqlDouble(c.atLeast)}`);
    if (c.below !== undefined) bounds.push(`${total} < ${sqlDouble(c.below)}`);
    if (bounds.length === 0) return 'true';
    return leaf(`(SELECT ${bounds.join(' AND ')} FROM ev e WHERE ${ofType(c.sum, c.within)})`);
  }
  if ('sequence' in c) {
    // a = the latest A ≤ t must exist; "no B with a ≤ ts ≤ t" is, as every row of ev is ≤ t, "the
    // latest B (if any) is before a" — a B at the same ts as a counts as "since"; and t − a ≥ D.
    const { did: a, thenNot: b, for: d } = c.sequence;
    return leaf(`(SELECT last_a IS NOT NULL AND (last_b IS NULL OR last_b < last_a) AND u.t - last_a >= ${sqlDuration(d)}
      FROM (SELECT max(e.ts) FILTER (WHERE e.type = ${sqlString(a)}) AS last_a,
                   max(e.ts) FILTER (WHERE e.type = ${sqlString(b)}) AS last_b
            FROM ev e WHERE e.uid = u.uid))`);
  }
  if ('signedUp' in c) {
    // s = the first sign_up ≤ t must exist; t − s < within, t − s ≥ atLeastAgo (each if given).
    const parts = ['s IS NOT NULL'];
    if (c.signedUp.within !== undefined) parts.push(`u.t - s < ${sqlDuration(c.signedUp.within)}`);
    if (c.signedUp.atLeastAgo !== undefined) parts.push(`u.t - s >= ${sqlDuration(c.signedUp.atLeastAgo)}`);
    return leaf(`(SELECT ${parts.join(' AND ')}
      FROM (SELECT min(e.ts) AS s FROM ev e WHERE e.uid = u.uid AND e.type = 'sign_up'))`);
  }
  if ('attr' in c) {
    const values = `(${c.in.map(sqlString).join(', ')})`;
    if (c.attr === 'platform') {
      // The platform of the latest activity ≤ t; ties on ts → the larger platform string.
      return leaf(`((SELECT first(e.platform ORDER BY e.ts DESC, e.platform DESC)
        FROM ev e WHERE e.uid = u.uid AND e.is_activity) IN ${values})`);
    }
    if (c.attr.startsWith('prop:')) {
      return leaf(`(${latestProp(c.attr.slice('prop:'.length))} IN ${values})`);
    }
    throw new Error(`segment oracle: unknown attr '${c.attr}'`);
  }
  if ('birthdayMonth' in c) {
    // The month field of the latest birthday (YYYY-MM-DD or MM-DD; anything else → NULL → false)
    // against the two-digit month of t's local date (u.local_month).
    return leaf(`(SELECT CASE WHEN regexp_full_match(b, '[0-9]{4}-[0-9]{2}-[0-9]{2}') THEN substr(b, 6, 2)
                             WHEN regexp_full_match(b, '[0-9]{2}-[0-9]{2}') THEN substr(b, 1, 2) END = u.local_month
      FROM (SELECT ${latestProp('birthday')} AS b))`);
  }
  if ('inSegment' in c) {
    const tiers = evaluated.get(c.inSegment);
    if (tiers === undefined) throw new Error(`segment oracle: inSegment '${c.inSegment}' is not a segment defined earlier`);
    if (c.tier !== undefined && !tiers.includes(c.tier)) throw new Error(`segment oracle: segment '${c.inSegment}' has no tier '${c.tier}'`);
    const tier = c.tier === undefined ? '' : ` AND m.tier = ${sqlString(c.tier)}`;
    return `(EXISTS (SELECT 1 FROM membership m WHERE m.seg = ${sqlString(c.inSegment)} AND m.uid = u.uid${tier}))`;
  }
  if ('all' in c) return c.all.length === 0 ? 'true' : `(${c.all.map((x) => compile(x, evaluated)).join('\n  AND ')})`;
  if ('any' in c) return c.any.length === 0 ? 'false' : `(${c.any.map((x) => compile(x, evaluated)).join('\n  OR ')})`;
  if ('not' in c) return `(NOT ${compile(c.not, evaluated)})`;
  throw new Error(`segment oracle: not a condition: ${JSON.stringify(c)}`);
}

/** The value of props[key] on the user's latest event ≤ t carrying the key (ties: larger value); NULL if none. */
function latestProp(key: string): string {
  return `(SELECT first(p.value ORDER BY p.ts DESC, p.value DESC) FROM evp p WHERE p.uid = u.uid AND p.key = ${sqlString(key)})`;
}

/**
 * The tier of a user in a segment: the first tier (file order) whose rule holds, '' for an
 * untiered segment whose rule holds, NULL for a non-member.
 */
function tierExpr(def: SegmentDef, evaluated: ReadonlyMap<string, readonly string[]>): string {
  if ((def.rule === undefined) === (def.tiers === undefined)) throw new Error(`segment oracle: segment '${def.id}' needs exactly one of rule / tiers`);
  const arms = def.tiers === undefined
    ? [`WHEN ${compile(def.rule!, evaluated)} THEN ''`]
    : def.tiers.map((t) => `WHEN ${compile(t.rule, evaluated)} THEN ${sqlString(t.name)}`);
  return `CASE\n${arms.join('\n')}\nEND`;
}

export class SegmentOracle {
  private constructor(
    private readonly instance: DuckDBInstance,
    private readonly conn: DuckDBConnection,
  ) {}

  static async create(): Promise<SegmentOracle> {
    const instance = await DuckDBInstance.create(':memory:');
    const conn = await instance.connect();
    return new SegmentOracle(instance, conn);
  }

  /** events = the ACCEPTED events in arrival order (it decides aliases). Replaces any previous load. */
  async load(events: readonly SegEvent[]): Promise<void> {
    await this.conn.run(`${EVENTS_DDL}; CREATE OR REPLACE TABLE event_props (seq BIGINT, key VARCHAR, value VARCHAR);`);
    const ev = await this.conn.createAppender('events');
    const props = await this.conn.createAppender('event_props');
    try {
      events.forEach((e, seq) => {
        appendEvent(ev, e, seq);
        for (const [key, value] of Object.entries(e.props ?? {})) {
          props.appendBigInt(BigInt(seq));
          props.appendVarchar(key);
          props.appendVarchar(value);
          props.endRow();
        }
      });
      ev.flushSync();
      props.flushSync();
    } finally {
      ev.closeSync();
      props.closeSync();
    }
    await this.conn.run(RESOLVE);
  }

  /**
   * Membership of every segment at instant t (ms) in zone timeZone: segment id → (user → tier
   * name, '' for untiered segments). Only members appear; every segment id has an entry.
   */
  async members(defs: readonly SegmentDef[], t: number, timeZone: string): Promise<Map<string, Map<string, string>>> {
    const tMs = sqlMs(t, 't');
    await this.conn.run(`
      -- The state at t: only the events with ts ≤ t.
      CREATE OR REPLACE TEMP TABLE ev AS SELECT * FROM user_events WHERE ts <= ${tMs};
      CREATE OR REPLACE TEMP TABLE evp AS SELECT * FROM user_props WHERE ts <= ${tMs};
      -- The users known at t (at least one event ≤ t), each with t and t's local month ('01'..'12'):
      -- timezone('UTC', naive) makes epoch_ms's naive UTC timestamp an instant, independently of the
      -- session's TimeZone; timezone(tz, instant) gives the wall-clock time in tz.
      CREATE OR REPLACE TEMP TABLE users AS
      SELECT DISTINCT uid, ${tMs} AS t,
             strftime(timezone(${sqlString(timeZone)}, timezone('UTC', epoch_ms(${tMs}))), '%m') AS local_month
      FROM ev;
      CREATE OR REPLACE TEMP TABLE membership (seg VARCHAR, uid VARCHAR, tier VARCHAR);`);
    // File order: each segment sees the memberships of the ones before it (and only those).
    const evaluated = new Map<string, readonly string[]>();
    for (const def of defs) {
      if (evaluated.has(def.id)) throw new Error(`segment oracle: duplicate segment id '${def.id}'`);
      await this.conn.run(`
        INSERT INTO membership
        SELECT ${sqlString(def.id)}, uid, tier
        FROM (SELECT u.uid, ${tierExpr(def, evaluated)} AS tier FROM users u)
        WHERE tier IS NOT NULL`);
      evaluated.set(def.id, (def.tiers ?? []).map((x) => x.name));
    }
    const reader = await this.conn.runAndReadAll('SELECT seg, uid, tier FROM membership ORDER BY seg, uid');
    const out = new Map<string, Map<string, string>>(defs.map((d) => [d.id, new Map()]));
    for (const [seg, uid, tier] of reader.getRows()) out.get(String(seg))!.set(String(uid), String(tier));
    return out;
  }

  async close(): Promise<void> {
    this.conn.closeSync();
    this.instance.closeSync();
  }
}
