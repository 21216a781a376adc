import { spawnSync } from 'node:child_process';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import fc from 'fast-check';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Engine } from '../../engine/engine.js';
import type { EventColumns } from '../../engine/batch.js';
import { parseMap } from '../../engine/sources/csv.js';
import { SortedInput } from '../../engine/sources/files.js';
import type { CohortGrain, CohortKind, KpiGrain } from '../../operators/kpi-rows.js';
import { compareRows } from '../oracle/compare.js';
import { KpiOracle, type OracleEvent, type OracleOptions } from '../oracle/kpi-oracle.js';
import { streamArb, type StreamCase, type StreamEvent } from '../oracle/streams.js';
import { PROJECT_ROOT, SHARED_DATA, runAndKill, tempDir } from '../helpers.js';

/**
 * The engine's KPIs, cohort matrices and funnels against an independent DuckDB recomputation from
 * the accepted events (tests/oracle/kpi-oracle.ts): every window, every dimension value, every
 * field, to 1e-9 relative. On generated streams (fast-check: out of order, late, duplicate, refund,
 * cost, stitched and conflicting identities, three time zones), on the real data sets, and after
 * SIGKILLs in the middle of the input.
 */

const GRAINS: readonly KpiGrain[] = ['day', 'week', 'month'];
const COHORTS: readonly [CohortGrain, CohortKind][] = [['week', 'first_activity'], ['month', 'first_activity'], ['week', 'signup'], ['month', 'signup']];
/** Short horizons so that a 76-day stream exercises every KPI (defaults: 7 and 90 days). */
const KPI_CFG = { firstPurchaseDays: 3, activeCustomerDays: 20 };

let oracle: KpiOracle;
beforeAll(async () => {
  oracle = await KpiOracle.create();
});
afterAll(async () => oracle?.close());

function toOracle(e: StreamEvent): OracleEvent {
  return { event_id: e.event_id, type: e.type, user_id: e.user_id, anonymous_id: e.anonymous_id, ts: e.ts, amount: e.amount ?? Number.NaN, channel: e.channel, platform: e.platform };
}

/** Every difference between the engine's rows and the oracle's, over every grain and matrix. */
async function differences(engine: Engine, opts: OracleOptions): Promise<string[]> {
  const diffs: string[] = [];
  for (const g of GRAINS) {
    diffs.push(...compareRows(await engine.kpis(g), await oracle.kpis(g, opts), ['window', 'channel', 'platform']).map((d) => `kpis/${g}: ${d}`));
    diffs.push(...compareRows(await engine.funnel(g), await oracle.funnel(g, opts), ['cohort', 'channel', 'platform']).map((d) => `funnel/${g}: ${d}`));
  }
  for (const [g, kind] of COHORTS) {
    diffs.push(...compareRows(await engine.cohorts(g, kind), await oracle.cohorts(g, kind, opts), ['cohort', 'channel', 'platform', 'age']).map((d) => `cohorts/${g}/${kind}: ${d}`));
  }
  return diffs;
}

/** Ingests a case in arrival order in the case's chunk sizes; returns the accepted events. */
async function ingestCase(engine: Engine, c: StreamCase): Promise<OracleEvent[]> {
  const accepted: OracleEvent[] = [];
  let at = 0;
  for (let k = 0; at < c.events.length; k++) {
    const slice = c.events.slice(at, at + c.chunks[k % c.chunks.length]!);
    const r = await engine.ingest(slice);
    slice.forEach((e, j) => {
      if (r.reasons[j] === '') accepted.push(toOracle(e));
    });
    at += slice.length;
  }
  return accepted;
}

describe('KPIs equal the DuckDB oracle', () => {
  it('on generated streams: out of order, late, duplicates, refunds, cost, identity stitching (property)', async () => {
    let rejectedSeen = 0;
    await fc.assert(
      fc.asyncProperty(streamArb(), async (c) => {
        const engine = await Engine.create({ time: { timeZone: c.timeZone }, kpi: KPI_CFG });
        try {
          const accepted = await ingestCase(engine, c);
          rejectedSeen += c.events.length - accepted.length;
          await oracle.load(accepted);
          const diffs = await differences(engine, { timeZone: c.timeZone, watermark: engine.watermark, ...KPI_CFG });
          expect(diffs).toEqual([]);
        } finally {
          await engine.close();
        }
      }),
      { numRuns: 40, seed: 20261124 },
    );
    // The streams really did contain late and duplicate events (else the property says little).
    expect(rejectedSeen).toBeGreaterThan(0);
  });

  it('with windows compacted past a short retention: the same values, bounded live cells', async () => {
    // 15 blocks of 20 days, each a new population, each starting 15 days after the previous one
    // (300 days in all); retention 40 days. Identity journeys stay inside a block, so no stitch
    // reaches a window older than the retention — the one documented way a final window could
    // differ from a recomputation.
    const DAY = 86_400_000;
    const blocks = fc.sample(streamArb({ maxEvents: 150, days: 20, zones: ['Asia/Seoul'] }), { seed: 7, numRuns: 15 });
    const events: StreamEvent[] = [];
    blocks.forEach((b, k) => {
      const rename = (id: string) => (id === '' ? '' : `${id}-b${k}`);
      events.push(...b.events.map((e) => ({ ...e, event_id: `${e.event_id}-b${k}`, user_id: rename(e.user_id), anonymous_id: rename(e.anonymous_id), ts: e.ts + k * 15 * DAY })));
    });
    const engine = await Engine.create({ time: { timeZone: 'Asia/Seoul' }, kpi: { ...KPI_CFG, retentionDays: 40 } });
    const accepted: OracleEvent[] = [];
    let maxLive = 0;
    for (let at = 0; at < events.length; at += 25) {
      const slice = events.slice(at, at + 25);
      const r = await engine.ingest(slice);
      slice.forEach((e, j) => r.reasons[j] === '' && accepted.push(toOracle(e)));
      await engine.checkpoint();
      maxLive = Math.max(maxLive, engine.stats()['kpiLiveCells']!);
    }
    expect(engine.stats()['kpiCellsCompacted']).toBeGreaterThan(0);
    await oracle.load(accepted);
    // Only stitches that reach past the retention could differ; this stream's journeys are short
    // in event time relative to 40 days, so none do.
    expect(await differences(engine, { timeZone: 'Asia/Seoul', watermark: engine.watermark, ...KPI_CFG })).toEqual([]);
    let stored = 0;
    for await (const keys of engine.stateStore.scanKeys({ gte: 'k/', lt: 'k0' })) stored += keys.length;
    // Memory holds the last ~40 days (+ the month around them) of 220: a fraction of every cell.
    expect(maxLive).toBeLessThan(stored / 2);
    await engine.close();
  });
});

// ---------------------------------------------------------------------------------------------

const REES = path.join(SHARED_DATA, 'rees46_oct2019_head/2019-Oct_head.csv');
const CDNOW = path.join(SHARED_DATA, 'cdnow/CDNOW_master.txt');
const haveData = existsSync(REES) && existsSync(CDNOW);
if (!haveData) console.warn(`[kpi-exact.test] ${SHARED_DATA} is absent: the real-data oracle tests are skipped`);

function rowsOf(b: EventColumns, out: OracleEvent[]): void {
  for (let i = 0; i < b.length; i++) {
    if (b.status[i] !== 0) continue;
    out.push({ event_id: b.eventId[i]!, type: b.type[i]!, user_id: b.userId[i]!, anonymous_id: b.anonymousId[i]!, ts: b.ts[i]!, amount: b.amount[i]!, channel: b.channel[i]!, platform: b.platform[i]! });
  }
}

/** Backfills a real data file in-process the way the CLI does; returns the engine and accepted events. */
async function backfillFile(file: string, mapFile: string, tz: string): Promise<{ engine: Engine; accepted: OracleEvent[] }> {
  const map = parseMap(JSON.parse(readFileSync(path.join(PROJECT_ROOT, mapFile), 'utf8')));
  const input = await SortedInput.load([file], { format: 'csv', map, tz });
  const engine = await Engine.create({ time: { timeZone: tz }, validation: { currency: 'USD' } });
  const accepted: OracleEvent[] = [];
  for (const item of input.batches(0, 4096)) {
    if (item.kind !== 'batch') continue;
    await engine.ingestColumns(item.batch, item.position);
    rowsOf(item.batch, accepted);
  }
  return { engine, accepted };
}

describe.skipIf(!haveData)('KPIs equal the DuckDB oracle on the real data sets', () => {
  it('REES46 (October 2019 e-commerce events, UTC)', async () => {
    const { engine, accepted } = await backfillFile(REES, 'examples/maps/rees46.json', 'UTC');
    expect(accepted.length).toBe(17_434);
    await oracle.load(accepted);
    expect(await differences(engine, { timeZone: 'UTC', watermark: engine.watermark })).toEqual([]);
    await engine.close();
  });

  it('CDNOW (1997–1998 purchases, America/New_York; windows past the 400-day retention are compacted)', async () => {
    const { engine, accepted } = await backfillFile(CDNOW, 'examples/maps/cdnow.json', 'America/New_York');
    expect(accepted.length).toBe(69_659);
    await engine.checkpoint(); // compacts the windows older than the retention into the store
    await oracle.load(accepted);
    expect(await differences(engine, { timeZone: 'America/New_York', watermark: engine.watermark })).toEqual([]);
    await engine.close();
  });

  it('`crmstream export cohorts --grain month` on CDNOW equals the DuckDB monthly cohort matrix', async () => {
    const tmp = tempDir('crm-kpi-cli-');
    try {
      const cfg = path.join(tmp.dir, 'usd.json');
      writeFileSync(cfg, JSON.stringify({ validation: { currency: 'USD' } }));
      const cli = (args: string[]) => spawnSync(process.execPath, [path.join(PROJECT_ROOT, 'dist/api/cli.js'), ...args], { encoding: 'utf8', timeout: 120_000 });
      const dir = path.join(tmp.dir, 'cdnow');
      const b = cli(['backfill', '--data-dir', dir, '--input', CDNOW, '--format', 'csv', '--map', 'examples/maps/cdnow.json', '--tz', 'America/New_York', '--config', cfg, '--no-progress']);
      expect(b.status, b.stderr).toBe(0);
      const out = path.join(tmp.dir, 'cohorts.jsonl');
      const x = cli(['export', 'cohorts', '--data-dir', dir, '--grain', 'month', '--out', out]);
      expect(x.status, x.stderr).toBe(0);
      const rows = readFileSync(out, 'utf8').trim().split('\n').map((l) => JSON.parse(l));
      const totals = rows.filter((r) => r.channel === '*' && r.platform === '*');
      expect(totals[0]).toMatchObject({ grain: 'month', cohort: '1997-01', age: 0 });

      const { engine, accepted } = await backfillFile(CDNOW, 'examples/maps/cdnow.json', 'America/New_York');
      await oracle.load(accepted);
      const expected = await oracle.cohorts('month', 'first_activity', { timeZone: 'America/New_York', watermark: engine.watermark });
      await engine.close();
      expect(compareRows(rows, expected, ['cohort', 'channel', 'platform', 'age'])).toEqual([]);
      // CDNOW's customers all made their first purchase in 1997-01 … 1997-03: three cohorts, each
      // with every age up to 1998-06 (18 + 17 + 16 cells).
      expect(totals.length).toBe(51);
    } finally {
      tmp.cleanup();
    }
  });
});

// ---------------------------------------------------------------------------------------------

const WORKER = path.join(PROJECT_ROOT, 'dist/tests/fixtures/kpi-worker.js');

describe('KPIs after SIGKILL and restart in the middle of the input', () => {
  it('equal the oracle and the uninterrupted run, row for row', async () => {
    if (!existsSync(WORKER)) throw new Error(`${WORKER} is missing: run \`npm run build\` first (npm test does)`);
    const tmp = tempDir('crm-kpi-kill-');
    try {
      // One long generated stream (arrival order kept in the file).
      const parts = fc.sample(streamArb({ maxEvents: 400 }), { seed: 99, numRuns: 25 });
      const events: StreamEvent[] = [];
      parts.forEach((p, k) => events.push(...p.events.map((e) => ({ ...e, event_id: `${k}-${e.event_id}`, ts: e.ts + k * 3 * 86_400_000 }))));
      const input = path.join(tmp.dir, 'events.jsonl');
      writeFileSync(input, events.map((e) => JSON.stringify(e)).join('\n') + '\n');
      const config = { time: { timeZone: 'Asia/Seoul' }, kpi: KPI_CFG };
      const cfgFile = path.join(tmp.dir, 'config.json');
      writeFileSync(cfgFile, JSON.stringify(config));
      const dir = path.join(tmp.dir, 'state');

      let kills = 0;
      for (let attempt = 0; attempt < 40 && kills < 6; attempt++) {
        if (!(await runAndKill([WORKER, dir, input, cfgFile], /start \d+/, 20 + ((attempt * 37) % 150)))) break;
        kills++;
      }
      const last = spawnSync(process.execPath, [WORKER, dir, input, cfgFile], { encoding: 'utf8', timeout: 120_000 });
      expect(last.status, last.stderr).toBe(0);
      expect(kills).toBeGreaterThan(0);
      const crashed = JSON.parse(readFileSync(path.join(dir, 'result.json'), 'utf8'));

      // The uninterrupted run, in memory, gives the accepted events for the oracle.
      const engine = await Engine.create(config);
      const accepted = await ingestCase(engine, { events, timeZone: 'Asia/Seoul', chunks: [37] });
      await oracle.load(accepted);
      const opts = { timeZone: 'Asia/Seoul', watermark: engine.watermark, ...KPI_CFG };
      expect(crashed.watermark).toBe(engine.watermark);
      for (const g of GRAINS) {
        expect(compareRows(crashed.kpis[g], await oracle.kpis(g, opts), ['window', 'channel', 'platform'])).toEqual([]);
        expect(crashed.kpis[g]).toEqual(await engine.kpis(g));
      }
      expect(compareRows(crashed.cohorts.week, await oracle.cohorts('week', 'first_activity', opts), ['cohort', 'channel', 'platform', 'age'])).toEqual([]);
      expect(compareRows(crashed.cohorts.month, await oracle.cohorts('month', 'signup', opts), ['cohort', 'channel', 'platform', 'age'])).toEqual([]);
      expect(compareRows(crashed.funnel, await oracle.funnel('week', opts), ['cohort', 'channel', 'platform'])).toEqual([]);
      await engine.close();
    } finally {
      tmp.cleanup();
    }
  }, 300_000);
});
