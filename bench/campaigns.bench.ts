/**
 * Campaign scenario (issue 6), on the benchmark traffic of decode.bench.ts (same generator, seed and
 * 1 M user population):
 *
 * - `engine core + 5 campaigns`: the SPEC §10 engine-core figure (KPIs, built-in segments, 5
 *   campaigns: the first five below).
 * - `engine core + 20 campaigns`: the engine core scenario (all KPIs, the built-in segments) with
 *   20 campaigns of every trigger kind — sign-up / purchase / visit events, cart follow-ups
 *   (1h, 1d, 3d unless purchase), segment enters (cart_abandoners, dormant_30, new_no_purchase_3d),
 *   VIP tier moves, a daily slot for a segment audience — with caps, quiet hours, re-entry rules
 *   and holdout experiments; the traffic carries no consent props, so consent counts as given
 *   (`consent.unknown: allow`) and every decision runs the whole path. State in memory.
 */
import type { EventColumns } from '../engine/batch.js';
import { Engine } from '../engine/engine.js';
import type { CampaignDef } from '../operators/campaign-rules.js';
import { buildBatches, engineItems, resetStatus } from './engine.bench.js';
import { consume, type Scenario } from './harness.js';

const CH = ['alimtalk', 'push', 'sms'];

/** 20 campaigns from templates, varied so no two are the same. */
export function benchCampaigns(): CampaignDef[] {
  const out: CampaignDef[] = [];
  for (let k = 0; k < 20; k++) {
    const experiment = k % 2 === 0 ? { control: 0.1, variants: [{ name: 'a', weight: 1 }, { name: 'b', weight: 1 }] } : undefined;
    const trigger = [
      { event: 'sign_up' },
      { event: 'purchase' },
      { after: 'add_to_cart', delays: ['1h', '1d', '3d'], unless: 'purchase' },
      { segment: 'cart_abandoners' },
      { segment: 'dormant_30' },
      { segment: 'vip', on: 'tier_up' as const },
      { segment: 'new_no_purchase_3d' },
      { event: 'visit' },
      { daily: `${String(8 + (k % 12)).padStart(2, '0')}:00` },
      { after: 'sign_up', delays: ['2d'], unless: 'purchase' },
    ][k % 10]!;
    const def: CampaignDef = {
      id: `bench_${k}`, trigger, action: { template: `t${k}`, channels: CH.slice(k % 3), params: { coupon: `C${k}`, user: '{{user_id}}' } },
      caps: [{ max: 1 + (k % 3), within: '1d' }], reentry: k % 4 === 0 ? 'always' : { cooldown: `${1 + (k % 5)}d` },
    };
    if ('daily' in trigger) def.audience = { segment: 'cart_abandoners' };
    if (experiment !== undefined) def.experiment = experiment;
    out.push(def);
  }
  return out;
}

interface CampState {
  batches: EventColumns[];
  events: number;
  triggers: number;
  timers: number;
}

/** The engine core scenario with the first `n` bench campaigns (5: the SPEC §10 engine-core figure; 20: issue 6). */
const campaignsScenario = (n: number): Scenario<CampState> => ({
  name: `engine core + ${n} campaigns`,
  async setup(ctx) {
    const n = engineItems(ctx.quick);
    return { batches: buildBatches(n).batches, events: n, triggers: 0, timers: 0 };
  },
  async run(s) {
    resetStatus(s.batches);
    const engine = await Engine.create({
      checkpoint: { intervalMs: 1e9, idleMs: null, maxDirtyUsers: 10_000_000 },
      campaigns: { definitions: { campaigns: benchCampaigns().slice(0, n), caps: [{ scope: 'user', max: 3, within: '1d' }], consent: { unknown: 'allow' } } },
    });
    for (const b of s.batches) await engine.ingestColumns(b);
    const st = engine.stats();
    s.triggers = st['triggers']!;
    s.timers = st['timersFired']!;
    consume(engine.acceptedCount + s.triggers);
    return s.events;
  },
  notes: (s) => `${s.events.toLocaleString('en-US')} events; all KPIs, built-in segments, ${n} campaigns (${n >= 10 ? 'events, follow-ups, segment enters, tier moves, daily' : 'sign-up, purchase, cart follow-ups, cart abandoners, dormant_30'}) with caps, quiet hours and holdouts; ${s.triggers.toLocaleString('en-US')} triggers, ${s.timers.toLocaleString('en-US')} timers fired`,
});

export const campaigns5Scenario = campaignsScenario(5);
export const campaignsCoreScenario = campaignsScenario(20);
