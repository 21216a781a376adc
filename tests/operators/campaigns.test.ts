import { describe, expect, it } from 'vitest';
import { Engine } from '../../engine/engine.js';
import type { CampaignDef } from '../../operators/campaign-rules.js';
import { parseCampaigns } from '../../operators/campaign-rules.js';
import { triggerId } from '../../operators/campaigns.js';
import { DAY, HOUR, tempDir, type Ev } from '../helpers.js';

/**
 * Campaigns on hand-built timelines (docs/CAMPAIGNS.md), Asia/Seoul: each trigger type with the
 * exact triggers expected, the guardrails (caps, quiet hours, consent, channel fallback), variants
 * with a holdout, attribution, and trigger ids that depend on the input only.
 */

const KST = 9 * HOUR;
/** 2024-01-01 12:00 KST. */
const T0 = Date.UTC(2024, 0, 1, 12) - KST;
const CONSENT = { consent_marketing: 'true', consent_alimtalk: 'true', consent_push: 'true', consent_sms: 'true' };
const ALL = ['alimtalk', 'push', 'sms'];

interface Got {
  id: string;
  campaign: string;
  user: string;
  variant: string;
  control: boolean;
  channels: string[];
  template: string;
  params: Record<string, string>;
  reason: string;
  ts: number;
  sendAfter: number;
}

async function run(campaigns: CampaignDef[], events: Ev[], opts: { advanceTo?: number; caps?: unknown[]; segments?: unknown[]; quietHours?: unknown } = {}): Promise<{ triggers: Got[]; engine: Engine }> {
  const doc: Record<string, unknown> = { campaigns, caps: opts.caps ?? [] };
  if (opts.quietHours !== undefined) doc['quietHours'] = opts.quietHours;
  const engine = await Engine.create({ time: { timeZone: 'Asia/Seoul' }, segments: { definitions: opts.segments ?? [] }, campaigns: { definitions: doc } });
  const triggers: Got[] = [];
  engine.onTrigger((t) => triggers.push({
    id: t.trigger_id, campaign: t.campaign_id, user: t.user_id, variant: t.variant, control: t.control, channels: t.channels,
    template: t.template_id, params: { ...t.params }, reason: t.reason, ts: Number(t.event_ts), sendAfter: Number(t.send_after_ts),
  }));
  await engine.ingest(events);
  if (opts.advanceTo !== undefined) await engine.advanceTo(opts.advanceTo);
  await engine.checkpoint();
  return { triggers, engine };
}

const ev = (id: string, type: string, user: string, ts: number, more: Partial<Ev> = {}): Ev => ({ event_id: id, type, user_id: user, ts, ...more });

describe('trigger types', () => {
  it('event: sign_up → welcome coupon, with params from the event', async () => {
    const welcome: CampaignDef = { id: 'welcome', trigger: { event: 'sign_up' }, action: { template: 'welcome_coupon', channels: ALL, params: { coupon: 'WELCOME10', via: '{{event.channel}}' } } };
    const { triggers, engine } = await run([welcome], [
      ev('s1', 'sign_up', 'u1', T0, { channel: 'ad', props: CONSENT }),
      ev('v1', 'visit', 'u1', T0 + HOUR),
    ]);
    expect(triggers).toEqual([{
      id: triggerId('welcome', 'u1', 'e:s1'), campaign: 'welcome', user: 'u1', variant: 'a', control: false, channels: ALL,
      template: 'welcome_coupon', params: { coupon: 'WELCOME10', via: 'ad' }, reason: 'event:s1', ts: T0, sendAfter: T0,
    }]);
    await engine.close();
  });

  it('follow-ups: add_to_cart then 1d, 3d, 7d unless purchase — a purchase after the 1d reminder cancels the rest; a second cart gets its own', async () => {
    const reminder: CampaignDef = {
      id: 'cart_reminder', trigger: { after: 'add_to_cart', delays: ['1d', '3d', '7d'], unless: 'purchase' },
      action: { template: 'cart', channels: ALL, params: { item: '{{event.props.product_id}}', step: '{{step}}' } },
    };
    const { triggers, engine } = await run([reminder], [
      ev('c1', 'add_to_cart', 'u1', T0, { props: { ...CONSENT, product_id: 'p1' } }),
      ev('p', 'purchase', 'u1', T0 + 2 * DAY, { amount: 10 }),
      ev('c2', 'add_to_cart', 'u1', T0 + 5 * DAY, { props: { product_id: 'p2' } }),
      ev('x', 'visit', 'u2', T0 + 30 * DAY),
    ]);
    expect(triggers.map((t) => [t.reason, t.ts - T0, t.params['item'], t.params['step']])).toEqual([
      ['followup:c1:1', 1 * DAY, 'p1', '1'],
      ['followup:c2:1', 6 * DAY, 'p2', '1'],
      ['followup:c2:2', 8 * DAY, 'p2', '2'],
      ['followup:c2:3', 12 * DAY, 'p2', '3'],
    ]);
    const cancelled = engine.campaignRows().filter((r) => r.values.followups_cancelled > 0);
    expect(cancelled.map((r) => r.values.followups_cancelled)).toEqual([2]);
    await engine.close();
  });

  it('segment enter: dormant_30 → win-back at the instant the user went dormant; tier up', async () => {
    const winback: CampaignDef = { id: 'winback', trigger: { segment: 'dormant_30' }, action: { template: 'miss_you', channels: ['push'] } };
    const vipUp: CampaignDef = { id: 'vip_up', trigger: { segment: 'vip', on: 'tier_up' }, action: { template: 'congrats', channels: ['push'], params: { tier: '{{tier}}' } }, promotional: false };
    const { triggers, engine } = await run([winback, vipUp], [
      ev('p1', 'purchase', 'u1', T0, { amount: 500_000, props: CONSENT }),
      ev('p2', 'purchase', 'u1', T0 + DAY, { amount: 600_000 }),
      ev('x', 'visit', 'u2', T0 + 40 * DAY),
    ]);
    expect(triggers.map((t) => [t.campaign, t.reason, t.ts - T0, t.params['tier'] ?? ''])).toEqual([
      // silver at the first purchase (enter, not a tier move), gold at the second
      ['vip_up', 'segment:vip:tier_change:gold', DAY, 'gold'],
      ['winback', 'segment:dormant_30:enter', 31 * DAY, ''],
    ]);
    await engine.close();
  });

  it('daily schedule: birthday coupon at 10:00 Asia/Seoul for users in a birthday-month segment, once a year', async () => {
    const birthday: CampaignDef = {
      id: 'birthday', trigger: { daily: '10:00' }, audience: { segment: 'birthday_month' }, reentry: { cooldown: '300d' },
      action: { template: 'bday', channels: ['alimtalk'] },
    };
    const { triggers, engine } = await run([birthday], [
      ev('a', 'visit', 'u1', T0, { props: { ...CONSENT, birthday: '1990-01-20' } }), // January: in the segment now
      ev('b', 'visit', 'u2', T0, { props: { ...CONSENT, birthday: '02-03' } }),
      ev('x', 'visit', 'u3', T0 + 40 * DAY),
    ], { segments: [{ id: 'birthday_month', rule: { birthdayMonth: true } }] });
    const at10 = (y: number, m: number, d: number) => Date.UTC(y, m, d, 10) - KST;
    expect(triggers.map((t) => [t.user, t.ts])).toEqual([
      ['u1', at10(2024, 0, 2)], // the first 10:00 after entering
      ['u2', at10(2024, 1, 1)], // February 1st, the first slot in the birthday month
    ]);
    await engine.close();
  });
});

describe('guardrails', () => {
  it('a cap of 1 per day per user across two campaigns', async () => {
    const a: CampaignDef = { id: 'a', trigger: { event: 'sign_up' }, action: { template: 'x', channels: ['push'] } };
    const b: CampaignDef = { id: 'b', trigger: { event: 'visit' }, action: { template: 'y', channels: ['push'] } };
    const { triggers, engine } = await run([a, b], [
      ev('s', 'sign_up', 'u1', T0, { props: CONSENT }),
      ev('v1', 'visit', 'u1', T0 + HOUR),
      ev('v2', 'visit', 'u1', T0 + 23 * HOUR),
      ev('v3', 'visit', 'u1', T0 + 25 * HOUR),
    ], { caps: [{ scope: 'user', max: 1, within: '1d' }] });
    expect(triggers.map((t) => t.reason)).toEqual(['event:s', 'event:v3']);
    const capped = engine.campaignRows().reduce((s, r) => s + r.values.suppressed_cap, 0);
    expect(capped).toBe(2);
    await engine.close();
  });

  it('a per-channel cap (sms once a week) and a per-campaign cap (2 a day) each hold on their own', async () => {
    const sms: CampaignDef = { id: 'sms', trigger: { event: 'visit' }, action: { template: 'x', channels: ['sms'] } };
    const push: CampaignDef = { id: 'push', trigger: { event: 'visit' }, action: { template: 'y', channels: ['push'] }, caps: [{ max: 2, within: '1d' }] };
    const visits = [0, 1, 2, 3, 30].map((h) => ev(`v${h}`, 'visit', 'u1', T0 + h * HOUR, h === 0 ? { props: CONSENT } : {}));
    const { triggers, engine } = await run([sms, push], visits, { caps: [{ scope: 'channel', channel: 'sms', max: 1, within: '7d' }] });
    expect(triggers.map((t) => `${t.campaign}:${t.reason}`)).toEqual(['sms:event:v0', 'push:event:v0', 'push:event:v1', 'push:event:v30']);
    await engine.close();
  });

  it('quiet hours 21:00–08:00 Asia/Seoul: deferred to 08:00, across midnight; transactional ones are not', async () => {
    const promo: CampaignDef = { id: 'promo', trigger: { event: 'visit' }, action: { template: 'x', channels: ['push'] } };
    const order: CampaignDef = { id: 'order', trigger: { event: 'purchase' }, action: { template: 'receipt', channels: ['push'] }, promotional: false };
    const kst = (d: number, h: number, m = 0) => Date.UTC(2024, 0, d, h, m) - KST;
    const { triggers, engine } = await run([promo, order], [
      ev('v1', 'visit', 'u1', kst(1, 12), { props: CONSENT }),
      ev('v2', 'visit', 'u1', kst(1, 23, 30)),
      ev('v3', 'visit', 'u1', kst(2, 2)),
      ev('p', 'purchase', 'u1', kst(2, 3), { amount: 1 }),
      ev('v4', 'visit', 'u1', kst(2, 8)),
    ]);
    expect(triggers.map((t) => [t.reason, t.sendAfter])).toEqual([
      ['event:v1', kst(1, 12)],
      ['event:v2', kst(2, 8)],
      ['event:v3', kst(2, 8)],
      ['event:p', kst(2, 3)],
      ['event:v4', kst(2, 8)],
    ]);
    expect(engine.campaignRows().reduce((s, r) => s + r.values.deferred_quiet_hours, 0)).toBe(2);
    await engine.close();
  });

  it('channels fall back in order to the consented ones; no marketing consent, no promotional trigger', async () => {
    const promo: CampaignDef = { id: 'promo', trigger: { event: 'visit' }, action: { template: 'x', channels: ALL } };
    const { triggers, engine } = await run([promo], [
      ev('v1', 'visit', 'u1', T0, { props: { consent_marketing: 'yes', consent_push: 'true', consent_sms: '1', consent_alimtalk: 'false' } }),
      ev('v2', 'visit', 'u2', T0, { props: { consent_push: 'true' } }), // no marketing consent
      ev('v3', 'visit', 'u3', T0, { props: { consent_marketing: 'true' } }), // no channel
      ev('v4', 'visit', 'u4', T0, { props: { consent_marketing: 'true', consent_sms: 'true' } }),
      ev('v5', 'visit', 'u4', T0 + DAY, { props: { consent_marketing: 'false' } }), // withdrawn
    ]);
    expect(triggers.map((t) => [t.user, t.channels])).toEqual([['u1', ['push', 'sms']], ['u4', ['sms']]]);
    const total = (f: 'suppressed_consent' | 'suppressed_channel') => engine.campaignRows().reduce((s, r) => s + r.values[f], 0);
    expect(total('suppressed_consent')).toBe(2);
    expect(total('suppressed_channel')).toBe(1);
    await engine.close();
  });

  it('re-entry once: a user gets a campaign one time only', async () => {
    const c: CampaignDef = { id: 'c', trigger: { event: 'visit' }, reentry: 'once', action: { template: 'x', channels: ['push'] } };
    const { triggers, engine } = await run([c], [ev('v1', 'visit', 'u1', T0, { props: CONSENT }), ev('v2', 'visit', 'u1', T0 + 3 * DAY)]);
    expect(triggers.map((t) => t.reason)).toEqual(['event:v1']);
    await engine.close();
  });
});

describe('experiments and measurement', () => {
  it('variants by hash with a holdout: deterministic, near the weights, control marked; conversions within 3 days per arm', async () => {
    const c: CampaignDef = {
      id: 'ab', trigger: { event: 'sign_up' }, action: { template: 'base', channels: ['push'] },
      experiment: { control: 0.2, variants: [{ name: 'a', weight: 1 }, { name: 'b', weight: 3, template: 'bold' }] },
    };
    const events: Ev[] = [];
    for (let u = 0; u < 2000; u++) {
      events.push(ev(`s${u}`, 'sign_up', `u${u}`, T0 + u * 1000, { props: CONSENT }));
      // every third user buys 2 days after the sign-up (inside the window), every fifth 4 days after (outside)
      if (u % 3 === 0) events.push(ev(`p${u}`, 'purchase', `u${u}`, T0 + u * 1000 + 2 * DAY, { amount: 100 }));
      else if (u % 5 === 0) events.push(ev(`q${u}`, 'purchase', `u${u}`, T0 + u * 1000 + 4 * DAY, { amount: 100 }));
    }
    events.sort((x, y) => x.ts - y.ts);
    const { triggers, engine } = await run([c], events);
    const arms = new Map<string, number>();
    for (const t of triggers) arms.set(t.variant, (arms.get(t.variant) ?? 0) + 1);
    expect(triggers.length).toBe(2000);
    expect(Math.abs(arms.get('control')! / 2000 - 0.2)).toBeLessThan(0.03);
    expect(Math.abs(arms.get('a')! / 2000 - 0.2)).toBeLessThan(0.03);
    expect(Math.abs(arms.get('b')! / 2000 - 0.6)).toBeLessThan(0.03);
    for (const t of triggers) {
      expect(t.control).toBe(t.variant === 'control');
      expect(t.template).toBe(t.variant === 'b' ? 'bold' : 'base');
    }
    // Conversions: exactly the users with a purchase inside (send, send + 3d], per arm.
    const rows = engine.campaignRows();
    for (const arm of ['a', 'b', 'control']) {
      const users = triggers.filter((t) => t.variant === arm).map((t) => Number(t.user.slice(1)));
      const got = rows.filter((r) => r.variant === arm).reduce((s, r) => s + r.values.converted, 0);
      const sent = rows.filter((r) => r.variant === arm).reduce((s, r) => s + (arm === 'control' ? r.values.control : r.values.sent), 0);
      expect(got).toBe(users.filter((u) => u % 3 === 0).length);
      expect(sent).toBe(users.length);
    }
    await engine.close();
    // Same input, same decisions and ids.
    const again = await run([c], events);
    expect(again.triggers).toEqual(triggers);
    await again.engine.close();
  });

  it('sender outcomes count once per trigger', async () => {
    const c: CampaignDef = { id: 'c', trigger: { event: 'sign_up' }, action: { template: 'x', channels: ['push'] } };
    const id = triggerId('c', 'u1', 'e:s');
    const { engine } = await run([c], [
      ev('s', 'sign_up', 'u1', T0, { props: CONSENT }),
      { ...ev('d', 'message_delivered', 'u1', T0 + 1000), campaign_id: 'c', trigger_id: id } as Ev,
      { ...ev('o1', 'message_opened', 'u1', T0 + 2000), campaign_id: 'c', trigger_id: id } as Ev,
      { ...ev('o2', 'message_opened', 'u1', T0 + 3000), campaign_id: 'c', trigger_id: id } as Ev,
    ]);
    const r = engine.campaignRows().find((x) => x.variant === 'a')!;
    expect([r.values.sent, r.values.delivered, r.values.opened, r.values.clicked]).toEqual([1, 1, 1, 0]);
    await engine.close();
  });
});

describe('campaign files', () => {
  it('invalid campaigns are rejected naming the campaign and the field', () => {
    const segs = new Map([['vip', ['gold', 'silver']], ['dormant_30', ['']]]);
    expect(() => parseCampaigns({ campaigns: [{ id: 'x', trigger: { segment: 'nope' }, action: { template: 't', channels: ['push'] } }] }, segs))
      .toThrow(/campaign 'x' \(#1\): no segment 'nope'/);
    expect(() => parseCampaigns({ campaigns: [{ id: 'y', trigger: { after: 'add_to_cart', delays: ['1 day'] }, action: { template: 't', channels: [] } }] }, segs))
      .toThrow(/campaign 'y' \(#1\): trigger.*\n.*campaign 'y' \(#1\): action\.channels: at least one channel/s);
    expect(() => parseCampaigns({ campaigns: [{ id: 'z', trigger: { daily: '25:00' }, action: { template: 't', channels: ['push'] } }] }, segs))
      .toThrow(/campaign 'z'/);
  });

  it('campaign rows and per-user campaign state survive a restart of a data dir', async () => {
    const tmp = tempDir('crm-camp-restart-');
    try {
      const c: CampaignDef = { id: 'c', trigger: { event: 'visit' }, reentry: 'once', action: { template: 'x', channels: ['push'] } };
      const cfg = { dataDir: tmp.dir, time: { timeZone: 'Asia/Seoul' }, campaigns: { definitions: { campaigns: [c] } } };
      let engine = await Engine.create(cfg);
      await engine.ingest([ev('v1', 'visit', 'u1', T0, { props: CONSENT })]);
      const rows = engine.campaignRows();
      await engine.close();
      engine = await Engine.create(cfg);
      expect(engine.campaignRows()).toEqual(rows); // the outbox's sink cursors are not campaign rows
      await engine.ingest([ev('v2', 'visit', 'u1', T0 + DAY)]);
      expect(engine.campaignRows().reduce((s, r) => s + r.values.sent, 0)).toBe(1); // 'once' remembered
      await engine.close();
    } finally {
      tmp.cleanup();
    }
  });
});
