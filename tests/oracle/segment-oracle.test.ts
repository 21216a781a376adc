import fc from 'fast-check';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { parseSegments, type Condition, type SegmentDef } from '../../operators/segment-rules.js';
import { SegmentOracle, type SegEvent } from './segment-oracle.js';
import { DURATIONS, ruleArb, segmentsArb } from './segment-rule-arb.js';

/**
 * The segment oracle itself, against small timelines whose expected membership is worked out by
 * hand from docs/SEGMENTS.md. Times are written relative to the evaluation instant T (UTC), so
 * every window boundary reads as "T − D" or "T − D + 1".
 */

const H = 3_600_000;
const D = 24 * H;
const T = Date.parse('2024-03-10T00:00:00Z');

let nextId = 0;
function ev(type: string, user: string, anon: string, ts: number, extra: Partial<SegEvent> = {}): SegEvent {
  return { event_id: `e${++nextId}`, type, user_id: user, anonymous_id: anon, ts, amount: NaN, channel: '', platform: '', ...extra };
}
/** A one-rule segment file. */
const one = (rule: Condition, id = 'x'): SegmentDef[] => [{ id, rule }];

let oracle: SegmentOracle;
beforeAll(async () => {
  oracle = await SegmentOracle.create();
});
afterAll(async () => {
  await oracle.close();
});

/** Members of segment `id` at t as a sorted list of users. */
async function membersOf(defs: readonly SegmentDef[], t = T, id = defs[0]!.id, tz = 'UTC'): Promise<string[]> {
  const all = await oracle.members(parseSegments({ segments: defs }), t, tz);
  return [...all.get(id)!.keys()].sort();
}
/** Members of segment `id` at t as { user: tier }. */
async function tiersOf(defs: readonly SegmentDef[], id: string, t = T): Promise<Record<string, string>> {
  const all = await oracle.members(parseSegments({ segments: defs }), t, 'UTC');
  return Object.fromEntries([...all.get(id)!].sort(([a], [b]) => (a < b ? -1 : 1)));
}

describe('event-count conditions at window boundaries (within 1d = (T − 1d, T])', () => {
  // ua's purchase is exactly T − 1d (outside), ub's T − 1d + 1 (inside), uc has two purchases, the
  // second exactly at T (inside: the window is closed at T), ud only visits.
  const events = [
    ev('purchase', 'ua', '', T - D, { amount: 100 }),
    ev('purchase', 'ub', '', T - D + 1, { amount: 50 }),
    ev('purchase', 'uc', '', T - 2 * H, { amount: 30 }),
    ev('purchase', 'uc', '', T, { amount: NaN }), // NaN counts as 0
    ev('visit', 'ud', '', T - 5 * D),
  ];
  beforeAll(async () => {
    await oracle.load(events);
  });

  it('did: count in the window ≥ atLeast (default 1) and ≤ atMost', async () => {
    expect(await membersOf(one({ did: 'purchase', within: '1d' }))).toEqual(['ub', 'uc']);
    // All time: ua's purchase counts too.
    expect(await membersOf(one({ did: 'purchase' }))).toEqual(['ua', 'ub', 'uc']);
    expect(await membersOf(one({ did: 'purchase', within: '1d', atLeast: 2 }))).toEqual(['uc']);
    // atMost alone keeps the default atLeast 1: count ∈ [1, 1].
    expect(await membersOf(one({ did: 'purchase', within: '1d', atMost: 1 }))).toEqual(['ub']);
    // atLeast 0 with atMost 0: count = 0, which includes users without any purchase (ua in the window, ud).
    expect(await membersOf(one({ did: 'purchase', within: '1d', atLeast: 0, atMost: 0 }))).toEqual(['ua', 'ud']);
  });

  it('didNot: no such event in the window (users without any event of the type included)', async () => {
    expect(await membersOf(one({ didNot: 'purchase', within: '1d' }))).toEqual(['ua', 'ud']);
    expect(await membersOf(one({ didNot: 'purchase' }))).toEqual(['ud']);
    // A custom type nobody has: every known user.
    expect(await membersOf(one({ didNot: 'wishlist' }))).toEqual(['ua', 'ub', 'uc', 'ud']);
  });

  it('sum: Σ amount in the window (NaN = 0, no events = 0) is ≥ atLeast and < below', async () => {
    // Window sums: ua 0 (its 100 is at T − 1d), ub 50, uc 30 + 0 = 30, ud 0.
    expect(await membersOf(one({ sum: 'purchase', within: '1d', atLeast: 50 }))).toEqual(['ub']);
    expect(await membersOf(one({ sum: 'purchase', within: '1d', atLeast: 30, below: 50 }))).toEqual(['uc']);
    expect(await membersOf(one({ sum: 'purchase', within: '1d', below: 30 }))).toEqual(['ua', 'ud']);
    // All time: ua 100.
    expect(await membersOf(one({ sum: 'purchase', atLeast: 100 }))).toEqual(['ua']);
    // No bound at all: holds for everyone.
    expect(await membersOf(one({ sum: 'purchase' }))).toEqual(['ua', 'ub', 'uc', 'ud']);
  });

  it('the window slides with t: one ms later ub\'s purchase (T − 1d + 1) is at the boundary and out', async () => {
    expect(await membersOf(one({ did: 'purchase', within: '1d' }), T + 1)).toEqual(['uc']);
  });
});

describe('sequence {did: add_to_cart, thenNot: purchase, for: 1d}', () => {
  const rule = one({ sequence: { did: 'add_to_cart', thenNot: 'purchase', for: '1d' } });

  it('holds when the latest cart is ≥ 1d old and no purchase has ts ≥ it', async () => {
    await oracle.load([
      ev('add_to_cart', 'u1', '', T - D), // t − a = 1d = D → member
      ev('add_to_cart', 'u2', '', T - D + 1), // t − a = D − 1 → not yet
      ev('add_to_cart', 'u3', '', T - 2 * D),
      ev('purchase', 'u3', '', T - 2 * D), // B at the same ts as A counts as "since" → not a member
      ev('purchase', 'u4', '', T - 3 * D - 1),
      ev('add_to_cart', 'u4', '', T - 3 * D), // the purchase is before the cart → member
      ev('add_to_cart', 'u5', '', T - 3 * D),
      ev('add_to_cart', 'u5', '', T - H), // the LATEST cart decides: t − a = 1h → not
      ev('add_to_cart', 'u6', '', T - 3 * D),
      ev('purchase', 'u6', '', T), // a purchase at t itself (≤ t) → not
      ev('add_to_cart', 'u7', '', T - 3 * D),
      ev('purchase', 'u7', '', T + 1), // after t: ignored → member
      ev('purchase', 'u8', '', T - D), // never carted → not
    ]);
    expect(await membersOf(rule)).toEqual(['u1', 'u4', 'u7']);
    // At T + 1, u2 reaches t − a = D and u7's purchase is ≤ t.
    expect(await membersOf(rule, T + 1)).toEqual(['u1', 'u2', 'u4']);
  });

  it('A = B never holds (the A event is itself a B with a ≤ ts ≤ t)', async () => {
    await oracle.load([ev('visit', 'u1', '', T - 5 * D)]);
    expect(await membersOf(one({ sequence: { did: 'visit', thenNot: 'visit', for: '1h' } }))).toEqual([]);
  });
});

describe('signedUp', () => {
  beforeAll(async () => {
    await oracle.load([
      ev('sign_up', 'w3', '', T - 3 * D), // t − s = 3d
      ev('sign_up', 'w3m', '', T - 3 * D + 1), // 3d − 1 ms
      ev('sign_up', 'a1', '', T - D), // 1d
      ev('sign_up', 'a1m', '', T - D + 1), // 1d − 1 ms
      ev('sign_up', 'twice', '', T - 5 * D), // the FIRST sign_up decides (5d), not the later one
      ev('sign_up', 'twice', '', T - H),
      ev('visit', 'none', '', T - H), // never signed up
      ev('sign_up', 'later', '', T + 1), // after t
      ev('visit', 'later', '', T - H),
    ]);
  });

  it('within D: t − s < D (s = t − D excluded, t − D + 1 included)', async () => {
    expect(await membersOf(one({ signedUp: { within: '3d' } }))).toEqual(['a1', 'a1m', 'w3m']);
  });

  it('atLeastAgo D: t − s ≥ D (s = t − D included, t − D + 1 excluded)', async () => {
    expect(await membersOf(one({ signedUp: { atLeastAgo: '1d' } }))).toEqual(['a1', 'twice', 'w3', 'w3m']);
  });

  it('both bounds, and no bound (= has signed up by t)', async () => {
    expect(await membersOf(one({ signedUp: { within: '3d', atLeastAgo: '1d' } }))).toEqual(['a1', 'w3m']);
    expect(await membersOf(one({ signedUp: {} }))).toEqual(['a1', 'a1m', 'twice', 'w3', 'w3m']);
  });
});

describe('tiers and inSegment', () => {
  const vip: SegmentDef = {
    id: 'vip',
    tiers: [
      { name: 'gold', rule: { sum: 'purchase', atLeast: 1000 } },
      { name: 'silver', rule: { sum: 'purchase', atLeast: 300 } },
    ],
  };
  beforeAll(async () => {
    await oracle.load([
      ev('purchase', 'rich', '', T - D, { amount: 1500 }),
      ev('purchase', 'mid', '', T - D, { amount: 500 }),
      ev('purchase', 'poor', '', T - D, { amount: 100 }),
      ev('visit', 'idle', '', T - D),
    ]);
  });

  it('a member is in the FIRST tier (file order) whose rule holds', async () => {
    // rich satisfies both gold and silver → gold; mid only silver; poor neither → not a member.
    expect(await tiersOf([vip], 'vip')).toEqual({ mid: 'silver', rich: 'gold' });
    // Same rules, silver listed first: rich now lands in silver, the first tier that holds.
    const reversed: SegmentDef = { id: 'vip', tiers: [vip.tiers![1]!, vip.tiers![0]!] };
    expect(await tiersOf([reversed], 'vip')).toEqual({ mid: 'silver', rich: 'silver' });
  });

  it('inSegment, with and without a tier, and its negation; untiered members have tier ""', async () => {
    const defs: SegmentDef[] = [
      vip,
      { id: 'silver_only', rule: { inSegment: 'vip', tier: 'silver' } },
      { id: 'any_vip', rule: { inSegment: 'vip' } },
      { id: 'not_vip', rule: { not: { inSegment: 'vip' } } },
      // A chain: reads a segment that itself reads vip.
      { id: 'not_vip_buyer', rule: { all: [{ inSegment: 'not_vip' }, { did: 'purchase' }] } },
    ];
    expect(await tiersOf(defs, 'silver_only')).toEqual({ mid: '' });
    expect(await tiersOf(defs, 'any_vip')).toEqual({ mid: '', rich: '' });
    expect(await tiersOf(defs, 'not_vip')).toEqual({ idle: '', poor: '' });
    expect(await tiersOf(defs, 'not_vip_buyer')).toEqual({ poor: '' });
  });

  it('all: [] holds, any: [] does not', async () => {
    expect(await membersOf(one({ all: [] }))).toEqual(['idle', 'mid', 'poor', 'rich']);
    expect(await membersOf(one({ any: [] }))).toEqual([]);
    expect(await membersOf(one({ not: { any: [] } }))).toEqual(['idle', 'mid', 'poor', 'rich']);
  });
});

describe('attributes', () => {
  it('platform: latest ACTIVITY ≤ t, ties on ts → the larger string, "" a value like any other', async () => {
    await oracle.load([
      // tie: app and web at the same ts → web ('web' > 'app'); the later message is not activity.
      ev('visit', 'tie', '', T - 2 * H, { platform: 'app' }),
      ev('visit', 'tie', '', T - 2 * H, { platform: 'web' }),
      ev('message_opened', 'tie', '', T - H, { platform: 'app' }),
      // latest activity has an empty platform → ''.
      ev('visit', 'blank', '', T - 2 * H, { platform: 'web' }),
      ev('page_view', 'blank', '', T - H, { platform: '' }),
      // only messages: no activity, so no platform at all.
      ev('message_sent', 'msg', '', T - H, { platform: 'app' }),
      // the app visit after t is ignored.
      ev('visit', 'late', '', T - H, { platform: 'web' }),
      ev('visit', 'late', '', T + 1, { platform: 'app' }),
      // cost events belong to nobody, whatever ids they carry.
      ev('cost', 'costly', '', T - H, { platform: 'app', amount: 5 }),
    ]);
    expect(await membersOf(one({ attr: 'platform', in: ['web'] }))).toEqual(['late', 'tie']);
    expect(await membersOf(one({ attr: 'platform', in: ['app'] }))).toEqual([]);
    expect(await membersOf(one({ attr: 'platform', in: [''] }))).toEqual(['blank']);
    // msg has no platform: in no list, and so in the negation of every list.
    expect(await membersOf(one({ attr: 'platform', in: ['', 'web', 'app'] }))).toEqual(['blank', 'late', 'tie']);
    expect(await membersOf(one({ not: { attr: 'platform', in: ['', 'web', 'app'] } }))).toEqual(['msg']);
  });

  it('prop:<key>: value on the latest event ≤ t carrying the key (ties → larger value), any event type', async () => {
    await oracle.load([
      // changed its mind: 'true' then 'false' → false.
      ev('visit', 'optout', '', T - 2 * H, { props: { consent_sms: 'true' } }),
      ev('visit', 'optout', '', T - H, { props: { consent_sms: 'false' } }),
      // opted in later, on a message event (props count on every user event); a still later event
      // without the key does not reset it; the 'false' after t is ignored.
      ev('visit', 'optin', '', T - 2 * H, { props: { consent_sms: 'false' } }),
      ev('message_clicked', 'optin', '', T - H, { props: { consent_sms: 'true' } }),
      ev('visit', 'optin', '', T - 1, { props: { other: 'x' } }),
      ev('visit', 'optin', '', T + 1, { props: { consent_sms: 'false' } }),
      // tie on ts: 'true' > 'false'.
      ev('visit', 'tie', '', T - H, { props: { consent_sms: 'false' } }),
      ev('visit', 'tie', '', T - H, { props: { consent_sms: 'true' } }),
      ev('visit', 'never', '', T - H),
    ]);
    const consent = one({ attr: 'prop:consent_sms', in: ['true'] });
    expect(await membersOf(consent)).toEqual(['optin', 'tie']);
    expect(await membersOf(one({ attr: 'prop:consent_sms', in: ['false'] }))).toEqual(['optout']);
    // 'never' carries no value: not in ['true'], so in its negation.
    expect(await membersOf(one({ not: consent[0]!.rule! }))).toEqual(['never', 'optout']);
    // At T − H − 1 only the 2h-old values exist: optout 'true', optin 'false', tie nothing yet.
    expect(await membersOf(consent, T - H - 1)).toEqual(['optout']);
  });

  it('birthdayMonth in Asia/Seoul: UTC 15:00 on the last day of March is local April 1st', async () => {
    const old = T - 30 * D;
    await oracle.load([
      ev('visit', 'april', '', old, { props: { birthday: '1990-04-15' } }),
      ev('visit', 'march', '', old, { props: { birthday: '03-20' } }),
      ev('visit', 'bad', '', old, { props: { birthday: '1990-4-15' } }), // not YYYY-MM-DD → never
      ev('visit', 'word', '', old, { props: { birthday: 'april' } }),
      // A later malformed value replaces the good one: the latest value decides.
      ev('visit', 'broken', '', old, { props: { birthday: '04-01' } }),
      ev('visit', 'broken', '', old + 1, { props: { birthday: '0401' } }),
      ev('visit', 'none', '', old),
    ]);
    const bday = one({ birthdayMonth: true });
    const seoulMidnight = Date.parse('2024-03-31T15:00:00Z'); // 2024-04-01 00:00 KST
    expect(await membersOf(bday, seoulMidnight, 'x', 'Asia/Seoul')).toEqual(['april']);
    // One ms earlier it is still 03-31 23:59:59.999 in Seoul.
    expect(await membersOf(bday, seoulMidnight - 1, 'x', 'Asia/Seoul')).toEqual(['march']);
    // The same instant in UTC is still March.
    expect(await membersOf(bday, seoulMidnight, 'x', 'UTC')).toEqual(['march']);
  });
});

describe('identity and time', () => {
  it('aliasing is retroactive: anonymous events count for the member, also before the stitch', async () => {
    await oracle.load([
      ev('purchase', '', 'a1', T - 3 * H, { amount: 10 }), // anonymous, before the stitch
      ev('login', 'u1', 'a1', T - H), // the alias a1 → u1
      ev('page_view', '', 'a1', T - 30 * 60_000), // after the stitch → u1
      ev('login', 'u2', 'a1', T - 10 * 60_000), // conflicting later pairing: ignored (the event is u2's)
      ev('visit', '', 'a2', T - H), // never stitched: anon:a2
    ]);
    expect(await membersOf(one({ did: 'purchase' }))).toEqual(['u1']);
    expect(await membersOf(one({ did: 'page_view' }))).toEqual(['u1']);
    expect(await membersOf(one({ all: [] }))).toEqual(['anon:a2', 'u1', 'u2']);
    // At T − 2h the stitch event's ts is still in the future, but the alias (decided by arrival
    // order over all accepted events) already makes the purchase u1's: no anon:a1 profile exists.
    expect(await membersOf(one({ did: 'purchase' }), T - 2 * H)).toEqual(['u1']);
    expect(await membersOf(one({ all: [] }), T - 2 * H)).toEqual(['u1']);
  });

  it('events after t are ignored, and users with no event ≤ t are not evaluated at all', async () => {
    await oracle.load([
      ev('visit', 'now', '', T),
      ev('purchase', 'now', '', T + 1),
      ev('visit', 'future', '', T + 1), // no event ≤ T: not a user yet, even for didNot / not(...)
      ev('cost', 'ghost', 'g', T - H, { amount: 3 }), // cost events have no user
    ]);
    expect(await membersOf(one({ did: 'purchase' }))).toEqual([]);
    expect(await membersOf(one({ didNot: 'purchase' }))).toEqual(['now']);
    expect(await membersOf(one({ not: { did: 'visit' } }))).toEqual([]);
    expect(await membersOf(one({ didNot: 'purchase' }), T + 1)).toEqual(['future']);
  });
});

describe('generated rules (segment-rule-arb)', () => {
  const TYPES = ['visit', 'add_to_cart', 'purchase', 'sign_up', 'message_opened'];

  it('segmentsArb produces valid files using every condition kind, tiers and inSegment', () => {
    const kinds = new Set<string>();
    const walk = (c: Condition): void => {
      const k = Object.keys(c).find((x) => !['within', 'atLeast', 'atMost', 'below', 'in', 'tier'].includes(x))!;
      kinds.add(k === 'attr' ? `attr:${(c as { attr: string }).attr}` : k);
      if ('all' in c) c.all.forEach(walk);
      else if ('any' in c) c.any.forEach(walk);
      else if ('not' in c) walk(c.not);
    };
    let tiered = 0;
    for (const defs of fc.sample(segmentsArb(TYPES, 12), { numRuns: 30, seed: 1 })) {
      expect(defs.map((d) => d.id)).toEqual(Array.from({ length: 12 }, (_, i) => `s${i}`));
      expect(() => parseSegments({ segments: defs })).not.toThrow();
      for (const d of defs) {
        if (d.tiers) tiered++;
        if (d.tiers) expect(d.tiers.length).toBeGreaterThanOrEqual(2);
        (d.tiers?.map((t) => t.rule) ?? [d.rule!]).forEach(walk);
      }
    }
    expect(tiered).toBeGreaterThan(30);
    expect([...kinds].sort()).toEqual([
      'all', 'any', 'attr:platform', 'attr:prop:consent_sms', 'birthdayMonth', 'did', 'didNot',
      'inSegment', 'not', 'sequence', 'signedUp', 'sum',
    ]);
    // Durations all come from the fixed list (so windows stay comparable to the event spacing).
    const text = JSON.stringify(fc.sample(ruleArb(TYPES), { numRuns: 50, seed: 2 }));
    for (const m of text.matchAll(/"(?:within|atLeastAgo|for)":"([^"]+)"/g)) expect(DURATIONS).toContain(m[1]);
  });

  it('every generated file evaluates without SQL errors, and not(rule) is the complement (smoke)', async () => {
    const people = ['u1', 'u2', 'u3', 'u4'];
    const props: (Record<string, string> | undefined)[] = [undefined, { consent_sms: 'true' }, { birthday: '03-05' }, { birthday: 'x' }];
    const eventArb = fc.record({
      type: fc.constantFrom(...TYPES, 'cost'),
      who: fc.nat(people.length - 1),
      anon: fc.constantFrom('', 'a1', 'a2'),
      member: fc.boolean(),
      ts: fc.integer({ min: T - 40 * D, max: T + D }),
      amount: fc.constantFrom(NaN, 0, 100, 500),
      platform: fc.constantFrom('', 'web', 'app'),
      props: fc.constantFrom(...props),
    }).map((r) => ev(r.type, r.member || r.anon === '' ? people[r.who]! : '', r.anon, r.ts, {
      amount: r.amount, platform: r.platform, ...(r.props ? { props: r.props } : {}),
    }));
    await fc.assert(
      fc.asyncProperty(segmentsArb(TYPES, 10), fc.array(eventArb, { minLength: 20, maxLength: 60 }), async (defs, events) => {
        await oracle.load(events);
        // Each segment followed by its negation: `not_<id>` holds exactly when no tier rule holds.
        // (A NULL leaking out of a leaf would make both sides false for some user.)
        const withNegations = defs.flatMap((d): SegmentDef[] => [
          d, { id: `not_${d.id}`, rule: { not: { any: d.tiers?.map((t) => t.rule) ?? [d.rule!] } } },
        ]);
        const got = await oracle.members(parseSegments({ segments: [{ id: 'everyone', rule: { all: [] } }, ...withNegations] }), T, 'Asia/Seoul');
        const everyone = [...got.get('everyone')!.keys()].sort();
        for (const d of defs) {
          const names = d.tiers?.map((t) => t.name) ?? [''];
          const members = got.get(d.id)!;
          for (const tier of members.values()) expect(names).toContain(tier);
          expect([...members.keys(), ...got.get(`not_${d.id}`)!.keys()].sort()).toEqual(everyone);
        }
      }),
      { numRuns: 8, seed: 3 },
    );
  });
});
