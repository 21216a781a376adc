import { Engine } from '../../engine/engine.js';
import { TrafficGenerator, toJsonLine } from '../../engine/sources/generator.js';

/**
 * What the store-fault tests compare: a generated stream with KPIs, segments and campaigns on, and
 * the whole observable state of an engine (KPIs, cohorts, campaign cells, segment sizes, every
 * stored profile, counters, watermark) — an interrupted run must equal an uninterrupted one in all of it.
 */

export const CAMPAIGNS = {
  campaigns: [
    { id: 'welcome', trigger: { event: 'sign_up' }, action: { template: 'welcome', channels: ['alimtalk', 'push'] }, reentry: 'once' },
    {
      id: 'cart', trigger: { after: 'add_to_cart', delays: ['1h', '1d'], unless: 'purchase' },
      action: { template: 'cart', channels: ['alimtalk', 'push', 'sms'] },
      experiment: { control: 0.2, variants: [{ name: 'a', weight: 1 }, { name: 'b', weight: 1 }] },
    },
    { id: 'winback', trigger: { segment: 'dormant_30' }, action: { template: 'winback', channels: ['sms'] } },
  ],
  consent: { unknown: 'allow' },
};

export function stream(n: number): unknown[] {
  const gen = new TrafficGenerator({ seed: 17, users: 800, eventsPerSecond: 0.05, lateRate: 0.02, duplicateRate: 0.01 });
  const out: unknown[] = [];
  while (out.length < n) {
    const r = gen.nextRecord();
    if ('kind' in r) continue; // malformed records are another test's business
    out.push(JSON.parse(toJsonLine(r)));
  }
  return out;
}

export const config = (dataDir: string) => ({
  dataDir, time: { maxFutureMs: null }, campaigns: { definitions: CAMPAIGNS },
  checkpoint: { intervalMs: 0, retries: 3, retryBackoffMs: 1 },
});

export async function snapshotOf(e: Engine): Promise<unknown> {
  const profiles: unknown[] = [];
  for await (const p of e.profilesStored()) profiles.push(p);
  return {
    kpis: await e.kpis('day'), months: await e.kpis('month'), cohorts: await e.cohorts('month'),
    campaigns: e.campaignRows(), sizes: await e.segmentSizes('day'), profiles,
    accepted: e.acceptedCount, rejects: e.rejectCounts(), watermark: e.watermark,
  };
}

