/**
 * KPI scenarios (issue 4), on the benchmark traffic of decode.bench.ts (same generator and seed):
 *
 * - `engine core, KPIs and segments off`: the engine core scenario with both operators switched
 *   off — what they cost is the difference to `engine core (memory)`.
 * - `late events (KPI corrections)`: the engine is filled with the stream (untimed), then 50 k
 *   events 1 h – 70 h behind the watermark (inside the 3-day lateness) for users of the stream —
 *   every one re-derives the user's contribution and corrects closed windows. Timed: the late part
 *   only; the notes give the on-time cost per event of the same run for comparison.
 * - `KPI table: engine` and `KPI table: DuckDB recompute (peer)`: the same accepted events (1 M;
 *   200 k with --quick) turned into the day/week/month KPI tables — by the engine (ingest, then the
 *   three queries) and by DuckDB (load, then the SQL of tests/oracle/kpi-oracle.ts, which the
 *   oracle tests prove equal to the engine's tables).
 */
import { EventColumns } from '../engine/batch.js';
import { Engine } from '../engine/engine.js';
import { KpiOracle, type OracleEvent } from '../tests/oracle/kpi-oracle.js';
import { buildBatches, engineItems, resetStatus } from './engine.bench.js';
import { consume, type Scenario, type TimedItems } from './harness.js';

const BATCH = 4096;
const HOUR = 3_600_000;

const memoryConfig = { checkpoint: { intervalMs: 1e9, idleMs: null, maxDirtyUsers: 10_000_000 } };

// ---------------------------------------------------------------------------------------------

interface CoreState {
  batches: EventColumns[];
  events: number;
}

export const kpiOffScenario: Scenario<CoreState> = {
  name: 'engine core, KPIs and segments off (reference)',
  async setup(ctx) {
    const n = engineItems(ctx.quick);
    return { batches: buildBatches(n).batches, events: n };
  },
  async run(s) {
    resetStatus(s.batches);
    const engine = await Engine.create({ ...memoryConfig, kpi: { enabled: false }, segments: { enabled: false } });
    for (const b of s.batches) await engine.ingestColumns(b);
    consume(engine.acceptedCount);
    return s.events;
  },
  notes: (s) => `${s.events.toLocaleString('en-US')} events; identity + profile state + validation + dedupe; no KPI or segment operator`,
};

// ---------------------------------------------------------------------------------------------

interface LateState {
  base: EventColumns[];
  late: EventColumns[];
  baseEvents: number;
  lateEvents: number;
  onTimeNsPerEvent: number;
  corrections: number;
}

/** Copies of stream events, re-timed 1–70 h behind the stream's end, with fresh ids. */
function lateBatches(base: readonly EventColumns[], n: number): EventColumns[] {
  let maxTs = 0;
  for (const b of base) for (let i = 0; i < b.length; i++) if (b.ts[i]! > maxTs) maxTs = b.ts[i]!;
  const out: EventColumns[] = [];
  let x = 12345;
  const rnd = () => ((x = (Math.imul(x, 1103515245) + 12345) >>> 0) / 4_294_967_296);
  let cur = new EventColumns(BATCH);
  for (let k = 0; k < n; k++) {
    const b = base[Math.floor(rnd() * base.length)]!;
    const i = Math.floor(rnd() * b.length);
    if (cur.length === BATCH) {
      out.push(cur);
      cur = new EventColumns(BATCH);
    }
    cur.push(`late-${k}`, b.type[i]!, b.userId[i]!, b.anonymousId[i]!, maxTs - HOUR - Math.floor(rnd() * 69 * HOUR), b.amount[i]!, b.currency[i]!,
      b.orderId[i]!, b.channel[i]!, b.platform[i]!, '', '', '', null, 100, null, 'bench');
  }
  out.push(cur);
  return out;
}

export const lateEventsScenario: Scenario<LateState> = {
  name: 'late events (KPI corrections)',
  async setup(ctx) {
    const n = ctx.quick ? 300_000 : 2_000_000;
    const base = buildBatches(n).batches;
    const late = lateBatches(base, 50_000);
    return { base, late, baseEvents: n, lateEvents: 50_000, onTimeNsPerEvent: 0, corrections: 0 };
  },
  async run(s): Promise<TimedItems> {
    resetStatus(s.base);
    resetStatus(s.late);
    const engine = await Engine.create(memoryConfig);
    const t0 = process.hrtime.bigint();
    for (const b of s.base) await engine.ingestColumns(b);
    const t1 = process.hrtime.bigint();
    const before = engine.stats()['kpiCorrections']!;
    for (const b of s.late) await engine.ingestColumns(b);
    const t2 = process.hrtime.bigint();
    s.onTimeNsPerEvent = Number(t1 - t0) / s.baseEvents;
    s.corrections = engine.stats()['kpiCorrections']! - before;
    consume(engine.acceptedCount + s.corrections);
    return { items: s.lateEvents, ns: t2 - t1 };
  },
  notes: (s) => `${s.lateEvents.toLocaleString('en-US')} late events 1–70 h behind after ${s.baseEvents.toLocaleString('en-US')} on time; on-time cost in the same run ${(s.onTimeNsPerEvent / 1000).toFixed(2)} µs/event; ${s.corrections.toLocaleString('en-US')} closed-window cell corrections`,
};

// ---------------------------------------------------------------------------------------------

interface TableState {
  batches: EventColumns[];
  accepted: OracleEvent[];
  rows: number;
}

async function tableSetup(quick: boolean): Promise<TableState> {
  const batches = buildBatches(quick ? 200_000 : 1_000_000).batches;
  // The accepted events, as the engine decides (duplicates and too-late ones out), for DuckDB.
  const engine = await Engine.create(memoryConfig);
  const accepted: OracleEvent[] = [];
  for (const b of batches) {
    await engine.ingestColumns(b);
    for (let i = 0; i < b.length; i++) {
      if (b.status[i] !== 0) continue;
      accepted.push({ event_id: b.eventId[i]!, type: b.type[i]!, user_id: b.userId[i]!, anonymous_id: b.anonymousId[i]!, ts: b.ts[i]!, amount: b.amount[i]!, channel: b.channel[i]!, platform: b.platform[i]! });
    }
  }
  return { batches, accepted, rows: 0 };
}

export const kpiTableEngineScenario: Scenario<TableState> = {
  name: 'KPI table: engine (ingest + query)',
  setup: (ctx) => tableSetup(ctx.quick),
  async run(s) {
    resetStatus(s.batches);
    const engine = await Engine.create(memoryConfig);
    for (const b of s.batches) await engine.ingestColumns(b);
    let rows = 0;
    for (const g of ['day', 'week', 'month'] as const) rows += (await engine.kpis(g)).length;
    s.rows = rows;
    consume(rows + engine.acceptedCount);
    return s.accepted.length;
  },
  notes: (s) => `${s.accepted.length.toLocaleString('en-US')} accepted events → ${s.rows} KPI rows (day, week, month × channel/platform marginals), incremental`,
};

export const kpiTableDuckScenario: Scenario<TableState & { oracle: KpiOracle | null }> = {
  name: 'KPI table: DuckDB recompute (peer)',
  async setup(ctx) {
    return { ...(await tableSetup(ctx.quick)), oracle: await KpiOracle.create() };
  },
  async run(s) {
    const oracle = s.oracle!;
    await oracle.load(s.accepted);
    const watermark = s.accepted.reduce((m, e) => Math.max(m, e.ts), 0) - 5000;
    let rows = 0;
    for (const g of ['day', 'week', 'month'] as const) rows += (await oracle.kpis(g, { timeZone: 'Asia/Seoul', watermark })).length;
    s.rows = rows;
    consume(rows);
    return s.accepted.length;
  },
  async teardown(s) {
    await s.oracle?.close();
  },
  notes: (s) => `the same ${s.accepted.length.toLocaleString('en-US')} events → ${s.rows} rows: DuckDB ${'in-memory'} load (appender) + the oracle SQL, recomputed from scratch`,
};
