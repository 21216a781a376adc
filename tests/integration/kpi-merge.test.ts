import fc from 'fast-check';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Engine, mergeKpis } from '../../engine/engine.js';
import type { CohortGrain, CohortKind, KpiGrain } from '../../operators/kpi-rows.js';
import { compareRows } from '../oracle/compare.js';
import { KpiOracle, type OracleEvent } from '../oracle/kpi-oracle.js';
import { streamArb, type StreamEvent } from '../oracle/streams.js';

/**
 * Global KPIs from partitions (SPEC §7 scale-out: "KPI partials per partition are merged exactly"):
 * a generated stream is split by person — every id an event links lands in the partition of its
 * connected component, as re-keying by canonical id does — into three engines; the merge of their
 * partials must equal the DuckDB oracle over every event any partition accepted, for every KPI,
 * funnel and cohort row, dimension and window.
 */

const PARTS = 3;
const GRAINS: readonly KpiGrain[] = ['day', 'week', 'month'];
const COHORTS: readonly [CohortGrain, CohortKind][] = [['week', 'first_activity'], ['month', 'signup']];
const KPI_CFG = { firstPurchaseDays: 3, activeCustomerDays: 20 };

let oracle: KpiOracle;
beforeAll(async () => {
  oracle = await KpiOracle.create();
});
afterAll(async () => oracle?.close());

/** Partition of each event: the components of the "appear in one event" relation over ids, hashed. */
function partitionOf(events: readonly StreamEvent[]): number[] {
  const parent = new Map<string, string>();
  const find = (x: string): string => {
    let r = x;
    while (parent.get(r) !== r) r = parent.get(r)!;
    parent.set(x, r);
    return r;
  };
  const add = (x: string): void => {
    if (!parent.has(x)) parent.set(x, x);
  };
  for (const e of events) {
    const ids = [e.user_id && 'u:' + e.user_id, e.anonymous_id && 'a:' + e.anonymous_id].filter((x) => x !== '');
    ids.forEach(add);
    if (ids.length === 2) {
      const [a, b] = [find(ids[0]!), find(ids[1]!)];
      if (a !== b) parent.set(a < b ? b : a, a < b ? a : b);
    }
  }
  return events.map((e) => {
    const id = e.user_id ? 'u:' + e.user_id : e.anonymous_id ? 'a:' + e.anonymous_id : '';
    if (id === '') return 0;
    let h = 0;
    for (const c of find(id)) h = (h * 31 + c.charCodeAt(0)) >>> 0;
    return h % PARTS;
  });
}

describe('KPI partials of partitions merge exactly', () => {
  it('three engines over disjoint people, merged, equal the oracle over all accepted events (property)', async () => {
    let multiPartitionRuns = 0;
    await fc.assert(
      fc.asyncProperty(streamArb(), async (c) => {
        const cfg = { time: { timeZone: c.timeZone }, kpi: KPI_CFG };
        const part = partitionOf(c.events);
        const engines = await Promise.all(Array.from({ length: PARTS }, () => Engine.create(cfg)));
        try {
          const accepted: OracleEvent[] = [];
          // Arrival order is kept within a partition; partitions interleave in the case's chunk sizes.
          let at = 0;
          for (let k = 0; at < c.events.length; k++) {
            const slice = c.events.slice(at, at + c.chunks[k % c.chunks.length]!);
            for (let p = 0; p < PARTS; p++) {
              const mine = slice.filter((_, j) => part[at + j] === p);
              if (mine.length === 0) continue;
              const r = await engines[p]!.ingest(mine);
              mine.forEach((e, j) => {
                if (r.reasons[j] === '') accepted.push({ event_id: e.event_id, type: e.type, user_id: e.user_id, anonymous_id: e.anonymous_id, ts: e.ts, amount: e.amount ?? Number.NaN, channel: e.channel, platform: e.platform });
              });
            }
            at += slice.length;
          }
          if (new Set(part).size > 1) multiPartitionRuns++;
          const merged = mergeKpis(cfg, await Promise.all(engines.map((e) => e.kpiPartials())));
          const watermark = Math.max(...engines.map((e) => e.watermark));
          await oracle.load(accepted);
          const opts = { timeZone: c.timeZone, watermark, ...KPI_CFG };
          const diffs: string[] = [];
          for (const g of GRAINS) {
            diffs.push(...compareRows(await merged.kpis(g), await oracle.kpis(g, opts), ['window', 'channel', 'platform']).map((d) => `kpis/${g}: ${d}`));
            diffs.push(...compareRows(await merged.funnel(g), await oracle.funnel(g, opts), ['cohort', 'channel', 'platform']).map((d) => `funnel/${g}: ${d}`));
          }
          for (const [g, kind] of COHORTS) {
            diffs.push(...compareRows(await merged.cohorts(g, kind), await oracle.cohorts(g, kind, opts), ['cohort', 'channel', 'platform', 'age']).map((d) => `cohorts/${g}/${kind}: ${d}`));
          }
          expect(diffs).toEqual([]);
        } finally {
          await Promise.all(engines.map((e) => e.close()));
        }
      }),
      { numRuns: 30 },
    );
    expect(multiPartitionRuns).toBeGreaterThan(20); // the split really splits
  }, 240_000);

  it('one partition merged alone equals that engine', async () => {
    const cfg = { time: { timeZone: 'UTC' } };
    const engine = await Engine.create(cfg);
    try {
      const t0 = Date.UTC(2024, 2, 1);
      await engine.ingest([
        { event_id: 'e1', type: 'visit', anonymous_id: 'a1', ts: t0, channel: 'ad', platform: 'web' },
        { event_id: 'e2', type: 'sign_up', anonymous_id: 'a1', user_id: 'u1', ts: t0 + 60_000 },
        { event_id: 'e3', type: 'purchase', user_id: 'u1', ts: t0 + 3_600_000, amount: 5000 },
        { event_id: 'e4', type: 'visit', user_id: 'u2', ts: t0 + 86_400_000, platform: 'app' },
      ]);
      const merged = mergeKpis(cfg, [await engine.kpiPartials()]);
      for (const g of GRAINS) expect(await merged.kpis(g)).toEqual(await engine.kpis(g));
      expect(await merged.cohorts('week', 'first_activity')).toEqual(await engine.cohorts('week', 'first_activity'));
    } finally {
      await engine.close();
    }
  });
});
