import { z } from 'zod';
import { CrmError } from '../engine/errors.js';
import { durationMs, issuePlace } from './segment-rules.js';

/**
 * The campaign language (docs/CAMPAIGNS.md): trigger + audience + action + guardrails + experiment,
 * as a JSON / YAML document validated once (messages name the campaign and the field) or built with
 * the typed `camp` builder.
 */

/** Which users a campaign may reach: a boolean expression over segment membership. */
export type Audience =
  | { segment: string; tier?: string }
  | { all: Audience[] }
  | { any: Audience[] }
  | { not: Audience };

export type CampaignTrigger =
  /** Each accepted event of this type (decided at its event time). */
  | { event: string }
  /** A membership change of a segment: enter (default), exit, or a tier move up / down. */
  | { segment: string; on?: 'enter' | 'exit' | 'tier_up' | 'tier_down'; tier?: string }
  /** Follow-ups after each `after` event, at each delay, unless an `unless` event came in between. */
  | { after: string; delays: string[]; unless?: string }
  /** Every day at this local time (HH:MM), for each user in the audience. */
  | { daily: string };

export interface Variant {
  name: string;
  weight: number;
  /** Overrides of the action for this variant. */
  template?: string;
  params?: Record<string, string>;
}

export interface CampaignDef {
  id: string;
  description?: string;
  trigger: CampaignTrigger;
  audience?: Audience;
  action: { template: string; params?: Record<string, string>; channels: string[] };
  /** Promotional messages need marketing consent and respect quiet hours (default true). */
  promotional?: boolean;
  /** Per user, for this campaign: at most `max` sent within `within`. */
  caps?: { max: number; within: string }[];
  /** Re-entry: 'always' (default), 'once' per user, or not again within a cooldown. */
  reentry?: 'always' | 'once' | { cooldown: string };
  experiment?: { variants?: Variant[]; control?: number };
}

export interface GlobalCap {
  /** user: every campaign's messages to a user; channel: a user's messages on one channel. */
  scope: 'user' | 'channel';
  channel?: string;
  max: number;
  within: string;
}

export interface CampaignFile {
  campaigns: CampaignDef[];
  caps: GlobalCap[];
  /** Promotional messages decided inside [start, end) local time wait until `end`; false: none. */
  quietHours: { start: string; end: string; timeZone: string } | false;
  /** A purchase within this long after the send (control: the would-be send) converts. */
  attribution: string;
  /**
   * Consent props: `marketing` (promotional messages) and `<channelPrefix><channel>`; values true /
   * yes / y / 1 grant. `unknown`: what a user who never sent the prop counts as (default deny;
   * 'allow' for simulating on history that carries no consent data).
   */
  consent: { marketing: string; channelPrefix: string; unknown: 'deny' | 'allow' };
}

const duration = z.string().refine((d) => !Number.isNaN(durationMs(d)), { message: 'a duration such as 30d, 12h, 90m, 1w' });
const clock = z.string().regex(/^([01]\d|2[0-3]):[0-5]\d$/, 'a local time HH:MM (00:00–23:59)');
const ID = /^[a-z][a-z0-9_]{0,63}$/;
const name = z.string().min(1, 'a name');
const params = z.record(z.string(), z.string());

const audience: z.ZodType<Audience> = z.lazy(() =>
  z.union([
    z.strictObject({ segment: z.string().min(1), tier: z.string().optional() }),
    z.strictObject({ all: z.array(audience) }),
    z.strictObject({ any: z.array(audience) }),
    z.strictObject({ not: audience }),
  ], { error: 'not an audience: expected one of segment, all, any, not' }),
);

const trigger = z.union([
  z.strictObject({ event: name }),
  z.strictObject({ segment: z.string().min(1), on: z.enum(['enter', 'exit', 'tier_up', 'tier_down']).optional(), tier: z.string().optional() }),
  z.strictObject({ after: name, delays: z.array(duration).min(1, 'at least one delay'), unless: name.optional() }),
  z.strictObject({ daily: clock }),
], { error: 'not a trigger: expected one of event, segment, after, daily' });

const campaign = z.strictObject({
  id: z.string().regex(ID, 'lower-case letters, digits and _, starting with a letter (≤ 64)'),
  description: z.string().optional(),
  trigger,
  audience: audience.optional(),
  action: z.strictObject({ template: name, params: params.optional(), channels: z.array(name).min(1, 'at least one channel') }),
  promotional: z.boolean().optional(),
  caps: z.array(z.strictObject({ max: z.number().int().min(0), within: duration })).optional(),
  reentry: z.union([z.literal('always'), z.literal('once'), z.strictObject({ cooldown: duration })]).optional(),
  experiment: z.strictObject({
    variants: z.array(z.strictObject({ name: z.string().regex(ID, 'lower-case letters, digits and _'), weight: z.number().positive(), template: name.optional(), params: params.optional() })).min(1).optional(),
    control: z.number().min(0).max(1).optional(),
  }).optional(),
});

const campaignFile = z.strictObject({
  campaigns: z.array(campaign),
  caps: z.array(z.strictObject({ scope: z.enum(['user', 'channel']), channel: z.string().optional(), max: z.number().int().min(0), within: duration })).default([]),
  quietHours: z.union([z.literal(false), z.strictObject({ start: clock, end: clock, timeZone: z.string().default('Asia/Seoul') })])
    .default({ start: '21:00', end: '08:00', timeZone: 'Asia/Seoul' }),
  attribution: duration.default('3d'),
  consent: z.strictObject({ marketing: z.string().default('consent_marketing'), channelPrefix: z.string().default('consent_'), unknown: z.enum(['deny', 'allow']).default('deny') })
    .default({ marketing: 'consent_marketing', channelPrefix: 'consent_', unknown: 'deny' }),
});

function audienceSegments(a: Audience, out: { segment: string; tier?: string }[]): void {
  if ('segment' in a) out.push(a);
  else if ('all' in a) a.all.forEach((x) => audienceSegments(x, out));
  else if ('any' in a) a.any.forEach((x) => audienceSegments(x, out));
  else audienceSegments(a.not, out);
}

/**
 * Validates a campaign document. `segments` (id → tier names) are the segments in effect: audience
 * and segment triggers must name them. Throws CONFIG_INVALID listing every problem as
 * `campaign '<id>' (#n): <field>: <message>`.
 */
export function parseCampaigns(input: unknown, segments: ReadonlyMap<string, readonly string[]>, source = 'campaigns'): CampaignFile {
  const parsed = campaignFile.safeParse(input);
  const problems: string[] = [];
  const where = issuePlace(input, 'campaigns', 'campaign');
  if (!parsed.success) {
    for (const i of parsed.error.issues) problems.push(`${where(i.path)}: ${i.message}`);
  } else {
    const seen = new Set<string>();
    parsed.data.campaigns.forEach((c, n) => {
      const at = `campaign '${c.id}' (#${n + 1})`;
      if (seen.has(c.id)) problems.push(`${at}: duplicate id`);
      seen.add(c.id);
      const refs: { segment: string; tier?: string }[] = [];
      if (c.audience) audienceSegments(c.audience, refs);
      if ('segment' in c.trigger) refs.push(c.trigger);
      for (const r of refs) {
        const tiers = segments.get(r.segment);
        if (tiers === undefined) problems.push(`${at}: no segment '${r.segment}' (segments: ${[...segments.keys()].join(', ')})`);
        else if (r.tier !== undefined && !tiers.includes(r.tier)) problems.push(`${at}: segment '${r.segment}' has no tier '${r.tier}'`);
      }
      if ('daily' in c.trigger && c.audience === undefined) problems.push(`${at}: a daily trigger needs an audience (it is sent to the users in it)`);
      const names = new Set<string>();
      for (const v of c.experiment?.variants ?? []) {
        if (names.has(v.name)) problems.push(`${at}: variant '${v.name}' defined twice`);
        if (v.name === 'control') problems.push(`${at}: 'control' is the holdout's name; give the variant another`);
        names.add(v.name);
      }
      if ((c.experiment?.control ?? 0) >= 1) problems.push(`${at}: experiment.control must be below 1 (everyone held out sends nothing)`);
    });
    for (const cap of parsed.data.caps) {
      if (cap.scope === 'channel' && cap.channel === undefined) problems.push(`caps: a channel cap needs 'channel'`);
    }
  }
  if (problems.length > 0) {
    throw new CrmError('CONFIG_INVALID', `invalid campaigns in ${source}:\n${problems.map((p) => `  ${p}`).join('\n')}`);
  }
  return parsed.data! as CampaignFile;
}

/**
 * A typed builder for the same campaigns.
 *
 * @example
 * const c = camp.campaign('cart_reminder', camp.after('add_to_cart', ['1d', '3d', '7d'], 'purchase'),
 *   camp.action('cart_reminder', ['alimtalk', 'push', 'sms'], { items: '{{event.props.product_id}}' }));
 */
export const camp = {
  event: (type: string): CampaignTrigger => ({ event: type }),
  segment: (id: string, on: 'enter' | 'exit' | 'tier_up' | 'tier_down' = 'enter', tier?: string): CampaignTrigger =>
    (tier === undefined ? { segment: id, on } : { segment: id, on, tier }),
  after: (type: string, delays: string[], unless?: string): CampaignTrigger => (unless === undefined ? { after: type, delays } : { after: type, delays, unless }),
  daily: (at: string): CampaignTrigger => ({ daily: at }),
  action: (template: string, channels: string[], params?: Record<string, string>): CampaignDef['action'] =>
    (params === undefined ? { template, channels } : { template, channels, params }),
  campaign: (id: string, trigger: CampaignTrigger, action: CampaignDef['action'], more: Partial<Omit<CampaignDef, 'id' | 'trigger' | 'action'>> = {}): CampaignDef =>
    ({ id, trigger, action, ...more }),
};
