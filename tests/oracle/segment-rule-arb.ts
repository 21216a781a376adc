import fc from 'fast-check';
import type { Condition, SegmentDef } from '../../operators/segment-rules.js';

/**
 * Random segment rules (docs/SEGMENTS.md) for oracle and engine tests: every condition kind, small
 * counts and amounts so that random event sets land on both sides of each bound, durations from
 * an hour to a month, and all / any / not nested up to depth 3. Every generated document passes
 * `parseSegments` (optional fields are omitted, never `undefined`; atMost ≥ atLeast; below > atLeast).
 */

export const DURATIONS = ['1h', '12h', '1d', '2d', '3d', '7d', '30d'] as const;
/** Amount bounds for `sum` (events in the streams carry small integer amounts). */
const AMOUNTS = [0, 1, 100, 250, 500, 1000] as const;
/** Maximum nesting of all / any / not. */
const MAX_DEPTH = 3;

/** A segment defined earlier in the file that rules may reference with `inSegment`. */
export interface EarlierSegment {
  id: string;
  /** Tier names, empty for an untiered segment. */
  tiers: readonly string[];
}

/** Drops the keys whose value is undefined (the rule documents are JSON: absent, not undefined). */
function defined<T extends object>(o: T): T {
  return Object.fromEntries(Object.entries(o).filter(([, v]) => v !== undefined)) as T;
}

const maybe = <T>(arb: fc.Arbitrary<T>): fc.Arbitrary<T | undefined> => fc.option(arb, { nil: undefined });
const duration = fc.constantFrom(...DURATIONS);

/** An `inSegment` on one of the earlier segments, with one of its tiers or none. */
function inSegmentArb(earlier: readonly EarlierSegment[]): fc.Arbitrary<Condition> {
  return fc.constantFrom(...earlier).chain((s) =>
    fc.constantFrom(undefined, ...s.tiers)
      .map((tier): Condition => (tier === undefined ? { inSegment: s.id } : { inSegment: s.id, tier })));
}

function leafArb(types: readonly string[], earlier: readonly EarlierSegment[]): fc.Arbitrary<Condition> {
  const type = fc.constantFrom(...types);
  const leaves: fc.Arbitrary<Condition>[] = [
    // did: atLeast 0..3 (0 makes it vacuous), atMost = atLeast + 0..2 (or alone, 0..2).
    fc.record({ type, within: maybe(duration), atLeast: maybe(fc.nat(3)), extra: maybe(fc.nat(2)) })
      .map(({ type, within, atLeast, extra }): Condition =>
        defined({ did: type, within, atLeast, atMost: extra === undefined ? undefined : (atLeast ?? 0) + extra })),
    fc.record({ type, within: maybe(duration) }).map(({ type, within }): Condition => defined({ didNot: type, within })),
    // sum: below is strictly above atLeast.
    fc.record({ type, within: maybe(duration), atLeast: maybe(fc.constantFrom(...AMOUNTS)), above: maybe(fc.constantFrom(...AMOUNTS.slice(1))) })
      .map(({ type, within, atLeast, above }): Condition =>
        defined({ sum: type, within, atLeast, below: above === undefined ? undefined : (atLeast ?? 0) + above })),
    fc.record({ did: type, thenNot: type, for: duration }).map((s): Condition => ({ sequence: s })),
    fc.record({ within: maybe(duration), atLeastAgo: maybe(duration) }).map((s): Condition => ({ signedUp: defined(s) })),
    fc.subarray(['web', 'app', ''], { minLength: 1 }).map((values): Condition => ({ attr: 'platform', in: values })),
    fc.constant<Condition>({ attr: 'prop:consent_sms', in: ['true'] }),
    fc.constant<Condition>({ birthdayMonth: true }),
  ];
  if (earlier.length > 0) leaves.push(inSegmentArb(earlier));
  return fc.oneof(...leaves);
}

/**
 * A random rule over the event types `types` (and, when given, `inSegment` references to the
 * earlier segments). Depth-limited recursion: a node at depth MAX_DEPTH is a leaf.
 */
export function ruleArb(types: readonly string[], earlier: readonly EarlierSegment[] = []): fc.Arbitrary<Condition> {
  if (types.length === 0) throw new Error('ruleArb: needs at least one event type');
  const leaf = leafArb(types, earlier);
  const node = (depth: number): fc.Arbitrary<Condition> => {
    if (depth >= MAX_DEPTH) return leaf;
    const child = node(depth + 1);
    return fc.oneof(
      { weight: 3, arbitrary: leaf },
      // Empty lists included: all: [] holds, any: [] does not.
      { weight: 1, arbitrary: fc.array(child, { maxLength: 3 }).map((c): Condition => ({ all: c })) },
      { weight: 1, arbitrary: fc.array(child, { maxLength: 3 }).map((c): Condition => ({ any: c })) },
      { weight: 1, arbitrary: child.map((c): Condition => ({ not: c })) },
    );
  };
  return node(0);
}

const TIER_NAMES = ['gold', 'silver', 'bronze'] as const;

/**
 * n segment definitions s0..s{n−1} (n ≥ 10 for good coverage) in file order. About a third are
 * tiered (2–3 tiers; s1 always is), rules may reference earlier segments anywhere, and every third
 * segment from s2 on is combined with an explicit `inSegment` on an earlier one.
 */
export function segmentsArb(types: readonly string[], n = 12): fc.Arbitrary<SegmentDef[]> {
  // The shape first (which segments are tiered and with how many tiers) so that each rule knows
  // the ids and tier names it may reference; then the rules, segment by segment.
  const tierCount = fc.oneof({ weight: 2, arbitrary: fc.constant(0) }, { weight: 1, arbitrary: fc.integer({ min: 2, max: 3 }) });
  return fc.array(tierCount, { minLength: n, maxLength: n }).chain((counts) => {
    const shapes: EarlierSegment[] = counts.map((c, i) => ({
      id: `s${i}`,
      tiers: TIER_NAMES.slice(0, i === 1 ? Math.max(c, 2) : c),
    }));
    const defs = shapes.map((shape, i) => {
      const earlier = shapes.slice(0, i);
      let rule = ruleArb(types, earlier);
      if (i >= 2 && i % 3 === 2) {
        const ref = inSegmentArb(earlier);
        rule = fc.tuple(ref, rule, fc.constantFrom('all', 'any', 'not')).map(([r, c, how]): Condition =>
          how === 'all' ? { all: [r, c] } : how === 'any' ? { any: [r, c] } : { all: [{ not: r }, c] });
      }
      if (shape.tiers.length === 0) return rule.map((r): SegmentDef => ({ id: shape.id, rule: r }));
      return fc.tuple(...shape.tiers.map(() => rule))
        .map((rules): SegmentDef => ({ id: shape.id, tiers: shape.tiers.map((name, k) => ({ name, rule: rules[k]! })) }));
    });
    return fc.tuple(...defs);
  });
}

