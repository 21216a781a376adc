import fc from 'fast-check';

/**
 * Generated event streams for the KPI oracle tests: a small population (so users collide in every
 * window), anonymous → member journeys (some conflicting), every event type the KPIs read, cost
 * events, several channels and platforms — delivered out of order, some later than the allowed
 * lateness (rejected `too_late`), some twice (rejected `duplicate`).
 */

const DAY = 86_400_000;

export interface StreamEvent {
  event_id: string;
  type: string;
  user_id: string;
  anonymous_id: string;
  ts: number;
  amount?: number;
  channel: string;
  platform: string;
  props?: Record<string, string>;
}

const TYPES = ['visit', 'page_view', 'sign_up', 'login', 'add_to_cart', 'purchase', 'refund', 'review', 'message_sent', 'message_opened', 'message_bounced', 'cost', 'wishlist'] as const;

const eventArb = (days: number) => fc.record({
  user: fc.nat(11),
  /** How the event names its user: member id, anonymous id, both (a stitch), or a second device. */
  form: fc.constantFrom('member', 'anon', 'anon', 'both', 'anon2', 'both2', 'conflict'),
  type: fc.constantFrom(...TYPES, 'visit', 'page_view', 'purchase', 'sign_up', 'visit'),
  day: fc.nat(days - 1),
  ms: fc.nat(DAY - 1),
  amount: fc.integer({ min: 1, max: 500 }),
  channel: fc.constantFrom('', 'ad', 'organic', 'kakao'),
  platform: fc.constantFrom('', 'web', 'app'),
  /** Arrival delay: 0 for most, up to 5 days for some (beyond the 3-day lateness: too_late). */
  delay: fc.oneof({ weight: 6, arbitrary: fc.constant(0) }, { weight: 3, arbitrary: fc.nat(2 * DAY) }, { weight: 1, arbitrary: fc.nat(5 * DAY) }),
  dup: fc.oneof({ weight: 12, arbitrary: fc.constant(false) }, { weight: 1, arbitrary: fc.constant(true) }),
  /** Profile attributes some events carry (consent flags, birthdays) for segment rules. */
  props: fc.oneof(
    { weight: 8, arbitrary: fc.constant(null) },
    { weight: 1, arbitrary: fc.constantFrom('true', 'false').map((v) => ({ consent_sms: v })) },
    { weight: 1, arbitrary: fc.constantFrom('02-29', '03-15', '1990-03-01', '04-01', 'bad').map((v) => ({ birthday: v })) },
  ),
});

export interface StreamCase {
  /** In arrival order. */
  events: StreamEvent[];
  timeZone: string;
  /** Sizes of the ingest calls (cycled): batch boundaries must not matter. */
  chunks: number[];
}

export function streamArb(opts: { maxEvents?: number; zones?: readonly string[]; t0?: number; days?: number } = {}): fc.Arbitrary<StreamCase> {
  const t0 = opts.t0 ?? Date.UTC(2024, 1, 20); // spans a month end, an ISO-year-free range
  return fc.record({
    raw: fc.array(eventArb(opts.days ?? 76), { minLength: 20, maxLength: opts.maxEvents ?? 250, size: 'max' }),
    timeZone: fc.constantFrom(...(opts.zones ?? ['Asia/Seoul', 'America/New_York', 'UTC'])),
    chunks: fc.array(fc.integer({ min: 1, max: 64 }), { minLength: 1, maxLength: 5 }),
  }).map(({ raw, timeZone, chunks }) => {
    const list: { e: StreamEvent; arrival: number; n: number }[] = [];
    raw.forEach((r, n) => {
      const ts = t0 + r.day * DAY + r.ms;
      const member = `u${r.user}`;
      const anon = r.form === 'anon2' || r.form === 'both2' ? `d${r.user}b` : `d${r.user}`;
      let user_id = '';
      let anonymous_id = '';
      if (r.form === 'member') user_id = member;
      else if (r.form === 'anon' || r.form === 'anon2') anonymous_id = anon;
      else if (r.form === 'conflict') {
        user_id = `u${(r.user + 1) % 12}`; // an anonymous id already paired elsewhere: first pairing wins
        anonymous_id = anon;
      } else {
        user_id = member;
        anonymous_id = anon;
      }
      const e: StreamEvent = {
        event_id: `e${n}`, type: r.type, user_id: r.type === 'cost' ? '' : user_id, anonymous_id: r.type === 'cost' ? '' : anonymous_id,
        ts, channel: r.channel, platform: r.platform,
      };
      if (r.props !== null && r.type !== 'cost') e.props = r.props;
      if (r.type === 'purchase' || r.type === 'refund' || r.type === 'cost') e.amount = r.type === 'refund' ? Math.ceil(r.amount / 3) : r.amount;
      list.push({ e, arrival: ts + r.delay, n });
      if (r.dup) list.push({ e: { ...e }, arrival: ts + r.delay + 3_600_000, n });
    });
    list.sort((a, b) => a.arrival - b.arrival || a.n - b.n);
    return { events: list.map((x) => x.e), timeZone, chunks };
  });
}
