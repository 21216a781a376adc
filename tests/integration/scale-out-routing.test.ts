import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { crmstream } from '../../api/proto/gen/crmstream.js';
import { EventColumns } from '../../engine/batch.js';
import { Engine, mergeKpis } from '../../engine/engine.js';
import { Topic, type OutboxRecord } from '../../engine/outbox.js';
import { appendRouted, partitionOf, partitionRouter, routeKey } from '../../engine/routing.js';
import type { CohortGrain, CohortKind, KpiGrain } from '../../operators/kpi-rows.js';
import { segmentsArb } from '../oracle/segment-rule-arb.js';
import { streamArb, type StreamEvent } from '../oracle/streams.js';

/**
 * Scale-out semantics without Kafka (engine/routing.ts): N engines, each holding the profiles of
 * one partition, fed as the Kafka tasks feed them — every input event to the partition of its
 * routing key, every forwarded row (and moved anonymous profile) to the partition of its canonical
 * id, and the largest event time seen broadcast to all of them as a watermark — must together be
 * ONE engine that saw the whole stream: merged KPIs, funnels and cohorts, segment memberships,
 * segment change records, triggers (ids and content) and reject counts all equal, on generated
 * streams with stitching, conflicting pairings, late, too-late and duplicate events, random
 * segment rules and campaigns on events and on segment entries (timers).
 *
 * Messages are delivered one input event at a time (each engine checkpoints after each, so its
 * outbox forwards at once): the watermark every engine sees before each event is then the one the
 * single engine had, which makes the comparison exact; the Kafka tests cover real interleavings.
 */

const N = 3;
const TYPES = ['visit', 'page_view', 'sign_up', 'add_to_cart', 'purchase', 'refund', 'review', 'wishlist'];
const GRAINS: readonly KpiGrain[] = ['day', 'week', 'month'];
const COHORTS: readonly [CohortGrain, CohortKind][] = [['week', 'first_activity'], ['month', 'signup']];
const CAMPAIGNS = {
  campaigns: [
    { id: 'welcome', trigger: { event: 'sign_up' }, action: { template: 'welcome', channels: ['push'] } },
    { id: 'cart', trigger: { segment: 'cart_abandoners', on: 'enter' }, action: { template: 'cart', channels: ['push'] } },
    { id: 'winback', trigger: { segment: 'dormant_30', on: 'enter' }, action: { template: 'winback', channels: ['push'] } },
  ],
  consent: { unknown: 'allow' },
};

interface Outputs {
  triggers: string[];
  changes: string[];
}

function collector(engine: Engine, out: Outputs, routed?: OutboxRecord[]): void {
  engine.onOutput((r) => {
    if (r.topic === Topic.trigger) {
      const t = crmstream.v1.Trigger.decode(r.payload);
      out.triggers.push(JSON.stringify([t.trigger_id, t.campaign_id, t.variant, t.user_id, t.channels, t.params, t.reason, Number(t.event_ts), Number(t.send_after_ts)]));
    } else if (r.topic === Topic.segmentChange) {
      const c = crmstream.v1.SegmentChange.decode(r.payload);
      out.changes.push(JSON.stringify([c.user_id, c.segment_id, c.change, c.tier, c.previous_tier, Number(c.event_ts), c.cause]));
    } else if (r.topic === Topic.route) routed?.push(r);
  });
}

async function memberships(engines: readonly Engine[]): Promise<string[]> {
  const out: string[] = [];
  for (const e of engines) for await (const m of e.segmentMemberships()) out.push(`${m.segment}|${m.user_id}|${m.tier}|${m.since}`);
  return out.sort();
}

function sumRejects(engines: readonly Engine[]): Record<string, number> {
  const out: Record<string, number> = {};
  for (const e of engines) for (const [k, v] of Object.entries(e.rejectCounts())) if (v > 0) out[k] = (out[k] ?? 0) + v;
  return out;
}

describe('scale-out routing: N partition engines are one engine', () => {
  it('KPIs, memberships, segment changes, triggers and rejects equal one engine (property)', async () => {
    let forwardedRuns = 0;
    let movedRuns = 0;
    await fc.assert(
      fc.asyncProperty(streamArb({ maxEvents: 160 }), segmentsArb(TYPES, 4), async (c, rules) => {
        const cfg = { state: { backend: 'memory' as const }, time: { timeZone: c.timeZone }, segments: { definitions: rules }, campaigns: { definitions: CAMPAIGNS } };
        const single = await Engine.create(cfg);
        const parts = await Promise.all(Array.from({ length: N }, (_, p) => Engine.create(cfg, { router: partitionRouter(p, N) })));
        const want: Outputs = { triggers: [], changes: [] };
        const got: Outputs = { triggers: [], changes: [] };
        const routed: OutboxRecord[] = [];
        collector(single, want);
        for (const e of parts) collector(e, got, routed);
        const batch = new EventColumns(8);
        try {
          let maxTs = Number.NEGATIVE_INFINITY;
          for (const ev of c.events as StreamEvent[]) {
            await single.ingest([ev]);
            const p = partitionOf(routeKey(ev.user_id, ev.anonymous_id, ev.event_id), N);
            await parts[p]!.ingest([ev]);
            await parts[p]!.checkpoint();
            // Forwarded rows go on to their partition (which never forwards them again).
            while (routed.length > 0) {
              const r = routed.shift()!;
              const q = partitionOf(crmstream.v1.Routed.decode(r.payload).canonical, N);
              expect(q).not.toBe(p);
              batch.reset();
              appendRouted(batch, r.payload, `route/${q}`, c.timeZone);
              const res = await parts[q]!.ingestColumns(batch);
              expect(res.forwarded ?? 0).toBe(0);
              await parts[q]!.checkpoint();
            }
            if (ev.ts > maxTs) maxTs = ev.ts;
            for (const e of parts) await e.observeEventTime(maxTs);
          }
          await single.advanceTo(single.maxEventTs);
          for (const e of parts) {
            await e.advanceTo(single.maxEventTs);
            await e.checkpoint();
          }
          await single.checkpoint();

          const stats = parts.map((e) => e.stats());
          if (stats.some((s) => s.forwarded! > 0)) forwardedRuns++;
          if (stats.some((s) => s.movedOut! > 0)) movedRuns++;
          expect(stats.reduce((n, s) => n + s.movedOut!, 0)).toBe(stats.reduce((n, s) => n + s.movedIn!, 0));
          expect(stats.map((s) => [s.strayTimers, s.adoptConflicts])).toEqual(parts.map(() => [0, 0]));

          const merged = mergeKpis(cfg, await Promise.all(parts.map((e) => e.kpiPartials())));
          for (const g of GRAINS) {
            expect(await merged.kpis(g)).toEqual(await single.kpis(g));
            expect(await merged.funnel(g)).toEqual(await single.funnel(g));
          }
          for (const [g, kind] of COHORTS) expect(await merged.cohorts(g, kind)).toEqual(await single.cohorts(g, kind));
          expect(await memberships(parts)).toEqual(await memberships([single]));
          expect([...got.changes].sort()).toEqual([...want.changes].sort());
          expect([...got.triggers].sort()).toEqual([...want.triggers].sort());
          expect(sumRejects(parts)).toEqual(sumRejects([single]));
          expect(parts.reduce((n, e) => n + e.acceptedCount, 0)).toBe(single.acceptedCount);
        } finally {
          await Promise.all([single, ...parts].map((e) => e.close()));
        }
      }),
      { numRuns: 25 },
    );
    // The property is not vacuous: rows crossed partitions, and anonymous profiles moved.
    expect(forwardedRuns).toBeGreaterThan(15);
    expect(movedRuns).toBeGreaterThan(10);
  }, 300_000);
});
