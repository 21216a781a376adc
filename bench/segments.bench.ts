/**
 * Segment scenarios (issue 5), on the benchmark traffic of decode.bench.ts (same generator, seed and
 * 1 M user population):
 *
 * - `engine core + 50 segments`: the engine core scenario (all KPIs on) with the 6 built-in
 *   segments and 44 more generated from templates (counts, sums, absences, sequences, attributes,
 *   all/any/not), state in memory.
 * - `segment timers (60 idle days)`: after the same stream, the watermark is advanced 60 days with
 *   no events: every cart abandonment, dormancy and window exit fires from the durable timer index.
 *   Timed: the advance only; items = timers fired.
 */
import type { EventColumns } from '../engine/batch.js';
import { Engine } from '../engine/engine.js';
import type { SegmentDef } from '../operators/segment-rules.js';
import { seg } from '../operators/segment-rules.js';
import { buildBatches, engineItems, resetStatus } from './engine.bench.js';
import { consume, type Scenario, type TimedItems } from './harness.js';

const DAY = 86_400_000;

/** 44 rules from templates, with windows and thresholds varied so none is a copy of another. */
export function benchSegments(): SegmentDef[] {
  const out: SegmentDef[] = [];
  for (let k = 0; k < 44; k++) {
    const d = `${1 + (k % 11)}d`;
    const rule = [
      seg.did('purchase', { atLeast: 1 + (k % 3), within: `${7 + k}d` }),
      seg.sum('purchase', { within: `${30 + k}d`, atLeast: 50_000 * (1 + (k % 5)) }),
      seg.sequence('add_to_cart', 'purchase', d),
      seg.all(seg.did('visit'), seg.didNot('visit', d)),
      seg.all(seg.attr('platform', [k % 2 ? 'app' : 'web']), seg.did('page_view', { atLeast: 2 + (k % 4), within: d })),
      seg.any(seg.signedUp({ within: d }), seg.not(seg.did('add_to_cart', { within: `${k + 2}d` }))),
      seg.all(seg.did('sign_up'), seg.not(seg.did('purchase')), seg.did('visit', { within: `${k + 1}d` })),
      seg.sequence('purchase', 'review', d),
    ][k % 8]!;
    out.push({ id: `bench_${k}`, rule });
  }
  return out;
}

interface SegState {
  batches: EventColumns[];
  events: number;
  changes: number;
  timers: number;
  evaluations: number;
}

const config = () => ({ checkpoint: { intervalMs: 1e9, idleMs: null, maxDirtyUsers: 10_000_000 }, segments: { definitions: benchSegments() } });

async function setup(quick: boolean): Promise<SegState> {
  const n = engineItems(quick);
  return { batches: buildBatches(n).batches, events: n, changes: 0, timers: 0, evaluations: 0 };
}

export const segmentsCoreScenario: Scenario<SegState> = {
  name: 'engine core + 50 segments',
  setup: (ctx) => setup(ctx.quick),
  async run(s) {
    resetStatus(s.batches);
    const engine = await Engine.create(config());
    for (const b of s.batches) await engine.ingestColumns(b);
    const st = engine.stats();
    s.changes = st['segmentChanges']!;
    s.evaluations = st['segmentEvaluations']!;
    consume(engine.acceptedCount + s.changes);
    return s.events;
  },
  notes: (s) => `${s.events.toLocaleString('en-US')} events; all KPIs + 6 built-in and 44 generated segments; ${s.evaluations.toLocaleString('en-US')} segment evaluations, ${s.changes.toLocaleString('en-US')} membership changes`,
};

export const segmentTimersScenario: Scenario<SegState> = {
  name: 'segment timers (60 idle days)',
  // The --quick stream (300 k events, ~73 k users) in every mode: a 1 M-user advance without
  // checkpoints would measure the heap, not the timers.
  setup: () => setup(true),
  async run(s): Promise<TimedItems> {
    resetStatus(s.batches);
    const engine = await Engine.create(config());
    for (const b of s.batches) await engine.ingestColumns(b);
    const before = engine.stats();
    const t0 = process.hrtime.bigint();
    await engine.advanceTo(engine.watermark + 60 * DAY);
    const ns = process.hrtime.bigint() - t0;
    const after = engine.stats();
    s.timers = after['timersFired']! - before['timersFired']!;
    s.changes = after['segmentChanges']! - before['segmentChanges']!;
    consume(s.timers + s.changes);
    return { items: s.timers, ns };
  },
  notes: (s) => `${s.events.toLocaleString('en-US')} events, then the watermark 60 days on: ${s.timers.toLocaleString('en-US')} timers fired, ${s.changes.toLocaleString('en-US')} membership changes (items/s = timers/s)`,
};
