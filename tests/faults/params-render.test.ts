import { describe, expect, it } from 'vitest';
import { Engine } from '../../engine/engine.js';
import type { CampaignDef } from '../../operators/campaign-rules.js';
import { DAY, HOUR, type Ev } from '../helpers.js';

/**
 * Issue 17 item 11: campaign params are substituted once. An event prop is customer-controlled
 * text; when its value holds a placeholder (`{{user_id}}`, `{{step}}`), it must reach the trigger
 * as that literal text, never be expanded into another value — for a direct event trigger and for
 * the follow-up steps rendered from an anchor event.
 */

const T0 = Date.UTC(2024, 0, 1, 3);
const CONSENT = { consent_marketing: 'true', consent_alimtalk: 'true', consent_push: 'true', consent_sms: 'true' };

async function paramsOf(def: CampaignDef, events: Ev[], advanceTo: number): Promise<{ reason: string; params: Record<string, string> }[]> {
  const engine = await Engine.create({ time: { timeZone: 'Asia/Seoul' }, segments: { definitions: [] }, campaigns: { definitions: { campaigns: [def], consent: { unknown: 'allow' } } } });
  const out: { reason: string; params: Record<string, string> }[] = [];
  try {
    engine.onTrigger((t) => out.push({ reason: t.reason, params: { ...t.params } }));
    await engine.ingest(events);
    await engine.advanceTo(advanceTo);
    await engine.checkpoint();
  } finally {
    await engine.close();
  }
  return out;
}

const HOSTILE = 'Hi {{user_id}}, step {{step}} {{ event.type }}';

describe('campaign params are rendered once', () => {
  it('a follow-up step keeps an anchor prop holding {{user_id}} literally, and still fills {{step}} from the template', async () => {
    const def: CampaignDef = {
      id: 'cart', trigger: { after: 'add_to_cart', delays: ['1d', '2d'] },
      action: { template: 'cart', channels: ['push'], params: { note: '{{event.props.note}}', step: '{{step}}', who: '{{user_id}}', item: '{{event.props.product_id}}' } },
    };
    const got = await paramsOf(def, [
      { event_id: 'c1', type: 'add_to_cart', user_id: 'u1', ts: T0, props: { ...CONSENT, note: HOSTILE, product_id: 'p1' } },
      { event_id: 'x', type: 'visit', user_id: 'u2', ts: T0 + 5 * DAY },
    ], T0 + 5 * DAY);
    expect(got).toEqual([
      { reason: 'followup:c1:1', params: { note: HOSTILE, step: '1', who: 'u1', item: 'p1' } },
      { reason: 'followup:c1:2', params: { note: HOSTILE, step: '2', who: 'u1', item: 'p1' } },
    ]);
  });

  it('a direct event trigger keeps a prop holding {{user_id}} literally', async () => {
    const def: CampaignDef = { id: 'hello', trigger: { event: 'visit' }, promotional: false, action: { template: 't', channels: ['push'], params: { note: '{{event.props.note}}' } } };
    const got = await paramsOf(def, [{ event_id: 'v1', type: 'visit', user_id: 'u1', ts: T0, props: { note: HOSTILE } }], T0 + HOUR);
    expect(got).toEqual([{ reason: 'event:v1', params: { note: HOSTILE } }]);
  });
});
