import { z } from 'zod';
import { CrmError } from '../engine/errors.js';

/**
 * The segment rule language (docs/SEGMENTS.md): a JSON (or YAML) document validated once into
 * typed rules, with messages that name the segment and the field at fault, and a typed builder
 * that produces the same rules from TypeScript.
 */

export type Condition =
  | { did: string; within?: string; atLeast?: number; atMost?: number }
  | { didNot: string; within?: string }
  | { sum: string; within?: string; atLeast?: number; below?: number }
  | { sequence: { did: string; thenNot: string; for: string } }
  | { signedUp: { within?: string; atLeastAgo?: string } }
  | { attr: string; in: string[] }
  | { birthdayMonth: true }
  | { inSegment: string; tier?: string }
  | { all: Condition[] }
  | { any: Condition[] }
  | { not: Condition };

export interface Tier {
  name: string;
  rule: Condition;
}

export interface SegmentDef {
  id: string;
  description?: string;
  /** Exactly one of rule / tiers. */
  rule?: Condition;
  tiers?: Tier[];
}

export interface SegmentFile {
  segments: SegmentDef[];
}

const UNIT_MS: Record<string, number> = { ms: 1, s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000, w: 7 * 86_400_000 };

/** Milliseconds of a duration like `30d`, `12h`, `500ms`; NaN if malformed. */
export function durationMs(d: string): number {
  const m = /^(\d+)(ms|s|m|h|d|w)$/.exec(d);
  return m === null ? Number.NaN : Number(m[1]) * UNIT_MS[m[2]!]!;
}

const duration = z.string().refine((d) => !Number.isNaN(durationMs(d)), { message: 'a duration such as 30d, 12h, 90m, 1w' });
const typeName = z.string().min(1, 'an event type name');
const count = z.number().int().min(0);

const condition: z.ZodType<Condition> = z.lazy(() =>
  z.union([
    z.strictObject({ did: typeName, within: duration.optional(), atLeast: count.optional(), atMost: count.optional() }),
    z.strictObject({ didNot: typeName, within: duration.optional() }),
    z.strictObject({ sum: typeName, within: duration.optional(), atLeast: z.number().optional(), below: z.number().optional() }),
    z.strictObject({ sequence: z.strictObject({ did: typeName, thenNot: typeName, for: duration }) }),
    z.strictObject({ signedUp: z.strictObject({ within: duration.optional(), atLeastAgo: duration.optional() }) }),
    z.strictObject({
      attr: z.string().regex(/^(platform|prop:.+)$/, "'platform' or 'prop:<key>'"),
      in: z.array(z.string()).min(1, 'at least one value'),
    }),
    z.strictObject({ birthdayMonth: z.literal(true) }),
    z.strictObject({ inSegment: z.string(), tier: z.string().optional() }),
    z.strictObject({ all: z.array(condition) }),
    z.strictObject({ any: z.array(condition) }),
    z.strictObject({ not: condition }),
  ], { error: 'not a condition: expected one of did, didNot, sum, sequence, signedUp, attr, birthdayMonth, inSegment, all, any, not (docs/SEGMENTS.md)' }),
);

const SEGMENT_ID = /^[a-z][a-z0-9_]{0,63}$/;

const segmentDef = z.strictObject({
  id: z.string().regex(SEGMENT_ID, 'lower-case letters, digits and _, starting with a letter (≤ 64)'),
  description: z.string().optional(),
  rule: condition.optional(),
  tiers: z.array(z.strictObject({ name: z.string().regex(SEGMENT_ID, 'lower-case letters, digits and _'), rule: condition })).min(1).optional(),
});

const segmentFile = z.strictObject({ segments: z.array(segmentDef) });

/** Every reference a rule makes to another segment (for order and cycle checks). */
function references(c: Condition, out: { inSegment: string; tier?: string }[]): void {
  if ('inSegment' in c) out.push(c);
  else if ('all' in c) c.all.forEach((x) => references(x, out));
  else if ('any' in c) c.any.forEach((x) => references(x, out));
  else if ('not' in c) references(c.not, out);
}

/**
 * Names the place of a validation issue in a document `{<list>: [{id, …}, …]}`: for an item of the
 * list, `<noun> '<id>' (#n): <path within it>` (the id as written, so a bad id is named too);
 * elsewhere the path. Shared by the segment and campaign files.
 */
export function issuePlace(input: unknown, list: string, noun: string): (path: readonly PropertyKey[]) => string {
  const raw = (input as Record<string, unknown> | null)?.[list];
  const items = Array.isArray(raw) ? raw : undefined;
  return (path) => {
    if (path[0] === list && typeof path[1] === 'number') {
      const id = (items?.[path[1]] as { id?: unknown } | undefined)?.id;
      const rest = path.slice(2).join('.');
      return `${noun} ${typeof id === 'string' ? `'${id}'` : '(no id)'} (#${path[1] + 1})${rest ? `: ${rest}` : ''}`;
    }
    return path.length ? path.join('.') : '(root)';
  };
}

/**
 * Validates a rule document into segment definitions. Throws CONFIG_INVALID listing every problem
 * as `segment <id> (#n): <path>: <message>`.
 */
export function parseSegments(input: unknown, source = 'segments'): SegmentDef[] {
  const parsed = segmentFile.safeParse(input);
  const problems: string[] = [];
  const where = issuePlace(input, 'segments', 'segment');
  if (!parsed.success) {
    for (const i of parsed.error.issues) problems.push(`${where(i.path)}: ${i.message}`);
  } else {
    const seen = new Map<string, SegmentDef>();
    parsed.data.segments.forEach((s, n) => {
      const at = `segment '${s.id}' (#${n + 1})`;
      if ((s.rule === undefined) === (s.tiers === undefined)) problems.push(`${at}: needs exactly one of 'rule' or 'tiers'`);
      if (seen.has(s.id)) problems.push(`${at}: duplicate id`);
      const names = new Set<string>();
      for (const t of s.tiers ?? []) {
        if (names.has(t.name)) problems.push(`${at}: tier '${t.name}' defined twice`);
        names.add(t.name);
      }
      const refs: { inSegment: string; tier?: string }[] = [];
      if (s.rule) references(s.rule, refs);
      for (const t of s.tiers ?? []) references(t.rule, refs);
      for (const r of refs) {
        const target = seen.get(r.inSegment);
        if (target === undefined) problems.push(`${at}: inSegment '${r.inSegment}' must name a segment defined before this one`);
        else if (r.tier !== undefined && !(target.tiers ?? []).some((t) => t.name === r.tier)) {
          problems.push(`${at}: segment '${r.inSegment}' has no tier '${r.tier}'`);
        }
      }
      for (const c of conditionsOf(s)) {
        if ('within' in c || 'atLeast' in c) {
          const x = c as { atLeast?: number; atMost?: number; below?: number };
          if (x.atMost !== undefined && x.atLeast !== undefined && x.atMost < x.atLeast) problems.push(`${at}: atMost < atLeast can never hold`);
          if (x.below !== undefined && x.atLeast !== undefined && x.below <= x.atLeast) problems.push(`${at}: below ≤ atLeast can never hold`);
        }
      }
      seen.set(s.id, s as SegmentDef);
    });
  }
  if (problems.length > 0) {
    throw new CrmError('CONFIG_INVALID', `invalid segment rules in ${source}:\n${problems.map((p) => `  ${p}`).join('\n')}`);
  }
  return parsed.data!.segments as SegmentDef[];
}

function conditionsOf(s: SegmentDef): Condition[] {
  const out: Condition[] = [];
  const walk = (c: Condition): void => {
    out.push(c);
    if ('all' in c) c.all.forEach(walk);
    else if ('any' in c) c.any.forEach(walk);
    else if ('not' in c) walk(c.not);
  };
  if (s.rule) walk(s.rule);
  for (const t of s.tiers ?? []) walk(t.rule);
  return out;
}

/**
 * A typed builder for the same rules.
 *
 * @example
 * const r = seg.all(seg.did('purchase', { atLeast: 3, within: '90d' }), seg.not(seg.did('refund', { within: '30d' })));
 * const defs = parseSegments({ segments: [{ id: 'loyal', rule: r }] });
 */
export const seg = {
  did: (type: string, o: { within?: string; atLeast?: number; atMost?: number } = {}): Condition => ({ did: type, ...o }),
  didNot: (type: string, within?: string): Condition => (within === undefined ? { didNot: type } : { didNot: type, within }),
  sum: (type: string, o: { within?: string; atLeast?: number; below?: number }): Condition => ({ sum: type, ...o }),
  sequence: (did: string, thenNot: string, forDuration: string): Condition => ({ sequence: { did, thenNot, for: forDuration } }),
  signedUp: (o: { within?: string; atLeastAgo?: string }): Condition => ({ signedUp: o }),
  attr: (name: 'platform' | `prop:${string}`, values: string[]): Condition => ({ attr: name, in: values }),
  consent: (channel: string): Condition => ({ attr: `prop:consent_${channel}`, in: ['true', 'yes', 'y', '1'] }),
  birthdayMonth: (): Condition => ({ birthdayMonth: true }),
  inSegment: (id: string, tier?: string): Condition => (tier === undefined ? { inSegment: id } : { inSegment: id, tier }),
  all: (...c: Condition[]): Condition => ({ all: c }),
  any: (...c: Condition[]): Condition => ({ any: c }),
  not: (c: Condition): Condition => ({ not: c }),
};

/**
 * The built-in segments of SPEC §5. Config may override any of them by id (or drop one by giving
 * it `"rule": {"any": []}`).
 */
export const BUILTIN_SEGMENTS: readonly SegmentDef[] = [
  { id: 'cart_abandoners', description: 'added to cart and did not buy since, for at least a day', rule: seg.sequence('add_to_cart', 'purchase', '1d') },
  { id: 'dormant_30', description: 'customers whose last purchase is older than 30 days', rule: seg.all(seg.did('purchase'), seg.didNot('purchase', '30d')) },
  { id: 'dormant_60', description: 'customers whose last purchase is older than 60 days', rule: seg.all(seg.did('purchase'), seg.didNot('purchase', '60d')) },
  {
    id: 'vip', description: 'tiers by rolling 365-day spend (purchases; KRW defaults)',
    tiers: [
      { name: 'platinum', rule: seg.sum('purchase', { within: '365d', atLeast: 3_000_000 }) },
      { name: 'gold', rule: seg.sum('purchase', { within: '365d', atLeast: 1_000_000 }) },
      { name: 'silver', rule: seg.sum('purchase', { within: '365d', atLeast: 300_000 }) },
    ],
  },
  { id: 'new_no_purchase_3d', description: 'signed up within 3 days and never purchased', rule: seg.all(seg.signedUp({ within: '3d' }), seg.didNot('purchase')) },
  { id: 'no_review_2d', description: 'purchased and did not review since, for at least 2 days', rule: seg.sequence('purchase', 'review', '2d') },
];

/** The built-ins with the configured definitions replacing those of the same id, then the others. */
export function withBuiltins(defs: readonly SegmentDef[]): SegmentDef[] {
  const byId = new Map(defs.map((d) => [d.id, d]));
  const out = BUILTIN_SEGMENTS.map((b) => byId.get(b.id) ?? b);
  for (const d of defs) if (!BUILTIN_SEGMENTS.some((b) => b.id === d.id)) out.push(d);
  return out;
}
