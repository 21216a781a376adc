import { describe, expect, it } from 'vitest';
import { crmstream } from '../../api/proto/gen/crmstream.js';
import { isCode } from '../../engine/errors.js';
import {
  BadRecord, Rng, TrafficGenerator, encodeProto, isBad, toJsonLine,
  type GenEvent, type GenRecord, type TrafficOptions,
} from '../../engine/sources/generator.js';

const DAY = 86_400_000;
const FIELDS = [
  'event_id', 'type', 'user_id', 'anonymous_id', 'ts', 'amount', 'currency', 'order_id', 'channel',
  'platform', 'campaign_id', 'variant', 'trigger_id', 'props',
];
const GENERATED_TYPES = new Set([
  'visit', 'page_view', 'sign_up', 'login', 'add_to_cart', 'remove_from_cart', 'purchase', 'refund', 'review', 'cost',
]);

function recordLine(r: GenRecord): string {
  return isBad(r) ? `BAD ${r.reason} ${r.json} ${Buffer.from(r.proto).toString('base64')}` : toJsonLine(r);
}

/** Keeps the first occurrence of every event id (drops duplicates). */
function unique(events: readonly GenEvent[]): GenEvent[] {
  const seen = new Set<string>();
  return events.filter((e) => (seen.has(e.event_id) ? false : (seen.add(e.event_id), true)));
}

describe('Rng', () => {
  it('is deterministic and in range', () => {
    const a = new Rng(123);
    const b = new Rng(123);
    const c = new Rng(124);
    let same = 0;
    let differs = 0;
    let outOfRange = 0;
    let sum = 0;
    for (let i = 0; i < 100_000; i++) {
      const x = a.next();
      if (x !== b.next()) differs++;
      if (x === c.next()) same++;
      if (!(x >= 0 && x < 1)) outOfRange++;
      sum += x;
      const n = a.int(7);
      if (n !== b.int(7) || !Number.isInteger(n) || n < 0 || n >= 7) outOfRange++;
    }
    expect(differs).toBe(0);
    expect(outOfRange).toBe(0);
    expect(same).toBeLessThan(5);
    expect(sum / 100_000).toBeGreaterThan(0.49);
    expect(sum / 100_000).toBeLessThan(0.51);
    expect(['x', 'y']).toContain(a.pick(['x', 'y']));
  });
});

describe('TrafficGenerator determinism', () => {
  const opts: TrafficOptions = { seed: 5, users: 20_000, eventsPerSecond: 1, badRate: 0.01, tooLateRate: 0.001 };

  it('produces the same records, byte for byte, for the same options', () => {
    const a = new TrafficGenerator(opts).takeRecords(30_000).map(recordLine).join('\n');
    const b = new TrafficGenerator(opts).takeRecords(30_000).map(recordLine).join('\n');
    expect(a === b).toBe(true);
    const ga = new TrafficGenerator(opts).take(2_000);
    const gb = new TrafficGenerator(opts).take(2_000);
    for (let i = 0; i < ga.length; i++) {
      expect(Buffer.from(encodeProto(ga[i]!)).equals(Buffer.from(encodeProto(gb[i]!)))).toBe(true);
    }
  });

  it('produces a different stream for another seed', () => {
    const a = new TrafficGenerator(opts).take(1_000).map(toJsonLine);
    const b = new TrafficGenerator({ ...opts, seed: 6 }).take(1_000).map(toJsonLine);
    expect(a.join('\n')).not.toBe(b.join('\n'));
  });

  it('keeps the journeys when only the noise changes', () => {
    // Noise comes from its own random stream: the fresh events are the same with or without it.
    const noisy = new TrafficGenerator({ seed: 9, users: 5_000, eventsPerSecond: 0.5, duplicateRate: 0.02, lateRate: 0.05 });
    const got = unique([...noisy.take(20_000), ...noisy.drain()]);
    const fresh = noisy.stats.fresh;
    expect(got.length).toBe(fresh);
    const clean = new TrafficGenerator({ seed: 9, users: 5_000, eventsPerSecond: 0.5, duplicateRate: 0, lateRate: 0 }).take(fresh);
    const byId = new Map(got.map((e) => [e.event_id, toJsonLine(e)]));
    for (const e of clean) expect(byId.get(e.event_id)).toBe(toJsonLine(e));
  });
});

describe('TrafficGenerator output', () => {
  it('gives every event the same fixed shape and a faithful protobuf encoding', () => {
    const events = new TrafficGenerator({ seed: 3, users: 10_000, eventsPerSecond: 0.5 }).take(5_000);
    for (const e of events) {
      expect(Object.keys(e)).toEqual(FIELDS);
      expect(GENERATED_TYPES.has(e.type)).toBe(true);
      expect(Number.isSafeInteger(e.ts)).toBe(true);
    }
    for (const e of events.slice(0, 1_000)) {
      const d = crmstream.v1.Event.decode(encodeProto(e));
      expect({
        event_id: d.event_id, type: d.type, user_id: d.user_id, anonymous_id: d.anonymous_id, ts: d.ts,
        amount: d.amount, currency: d.currency, order_id: d.order_id, channel: d.channel, platform: d.platform,
        campaign_id: d.campaign_id, variant: d.variant, trigger_id: d.trigger_id, props: { ...d.props },
      }).toEqual(e);
      expect(JSON.parse(toJsonLine(e))).toEqual(e);
    }
  });

  it('rejects nonsense options with CONFIG_INVALID', () => {
    for (const bad of [{ users: 0 }, { lateRate: 2 }, { eventsPerSecond: -1 }, { currency: 'won' }, { products: 70_000 }]) {
      let err: unknown;
      try {
        new TrafficGenerator(bad);
      } catch (e) {
        err = e;
      }
      expect(isCode(err, 'CONFIG_INVALID')).toBe(true);
    }
  });
});

describe('TrafficGenerator rates over 100k records', () => {
  // ~11.6 days of event time: most late events (≤ 2 days) are released within the run.
  const opts: TrafficOptions = {
    seed: 7, users: 200_000, eventsPerSecond: 0.1, lateRate: 0.01, duplicateRate: 0.005, tooLateRate: 0.002, badRate: 0.01,
  };
  const gen = new TrafficGenerator(opts);
  const records = gen.takeRecords(100_000);
  const stats = gen.stats;

  it('emits bad records at badRate, each of its declared kind', () => {
    const bad = records.filter(isBad);
    expect(bad.length / records.length).toBeGreaterThan(0.008);
    expect(bad.length / records.length).toBeLessThan(0.012);
    expect(new Set(bad.map((b) => b.reason)).size).toBe(7);
    for (const b of bad) {
      expect(b).toBeInstanceOf(BadRecord);
      if (b.reason === 'bad_encoding') {
        expect(b.event).toBeNull();
        expect(() => JSON.parse(b.json)).toThrow();
        expect(() => crmstream.v1.Event.decode(b.proto)).toThrow();
        continue;
      }
      const e = b.event!;
      expect(JSON.parse(b.json)).toEqual(e);
      if (b.reason === 'missing_id') expect(e.user_id === '' && e.anonymous_id === '').toBe(true);
      if (b.reason === 'missing_type') expect(e.type).toBe('');
      if (b.reason === 'bad_timestamp') expect(e.ts).toBeLessThan(Date.UTC(1990, 0, 1));
      if (b.reason === 'unknown_currency') expect(e.currency).toBe('USD');
      if (b.reason === 'bad_amount') expect(e.amount).toBeLessThan(0);
      if (b.reason === 'too_large') expect(b.proto.length).toBeGreaterThan(64 * 1024);
    }
  });

  it('re-emits duplicates with the same event_id and content', () => {
    const first = new Map<string, string>();
    let dups = 0;
    for (const r of records) {
      if (isBad(r)) continue;
      const line = toJsonLine(r);
      const prev = first.get(r.event_id);
      if (prev === undefined) first.set(r.event_id, line);
      else {
        dups++;
        expect(line).toBe(prev);
      }
    }
    expect(dups).toBe(stats.duplicates);
    expect(dups / records.length).toBeGreaterThan(0.0035);
    expect(dups / records.length).toBeLessThan(0.0065);
  });

  it('holds back late and too-late events at their rates, really out of order', () => {
    expect(stats.late / stats.fresh).toBeGreaterThan(0.008);
    expect(stats.late / stats.fresh).toBeLessThan(0.012);
    expect(stats.tooLate / stats.fresh).toBeGreaterThan(0.0013);
    expect(stats.tooLate / stats.fresh).toBeLessThan(0.0027);
    const seen = new Set<string>();
    let maxTs = -Infinity;
    let late = 0;
    let tooLate = 0;
    for (const r of records) {
      if (isBad(r) || seen.has(r.event_id)) continue; // duplicates are old on purpose
      seen.add(r.event_id);
      const lateness = maxTs - r.ts;
      if (lateness > 0) {
        // Minutes to ~2 days behind, or beyond the 3 days of allowed lateness.
        expect(lateness).toBeGreaterThanOrEqual(59_000);
        if (lateness > 3 * DAY) tooLate++;
        else {
          expect(lateness).toBeLessThanOrEqual(2 * DAY + 3_600_000);
          late++;
        }
      }
      maxTs = Math.max(maxTs, r.ts);
    }
    // Those still held when the run stops are not in the stream yet.
    expect(late / seen.size).toBeGreaterThan(0.006);
    expect(late / seen.size).toBeLessThan(0.012);
    expect(tooLate).toBeGreaterThan(0);
    expect(late + tooLate + stats.pendingLate).toBe(stats.late + stats.tooLate);
  });

  it('never generates message_* events; cost events are per paid channel per day, without ids', () => {
    const events = records.filter((r): r is GenEvent => !isBad(r));
    expect(events.some((e) => e.type.startsWith('message_'))).toBe(false);
    const costs = unique(events.filter((e) => e.type === 'cost'));
    expect(costs.length).toBeGreaterThanOrEqual(4 * 10);
    const perDay = new Set<string>();
    for (const c of costs) {
      expect(c.user_id === '' && c.anonymous_id === '').toBe(true);
      expect(['ad', 'kakao', 'email', 'offline']).toContain(c.channel);
      expect(c.amount).toBeGreaterThan(0);
      expect(c.currency).toBe('KRW');
      const key = `${c.channel}@${c.ts}`;
      expect(perDay.has(key)).toBe(false);
      perDay.add(key);
      expect((c.ts + 1 + 9 * 3_600_000) % DAY).toBe(0); // the last ms of a KST day
    }
  });
});

describe('TrafficGenerator journeys', () => {
  // A small population over ~3 weeks: new visitors run out, members return, buy again, refund, review.
  const gen = new TrafficGenerator({ seed: 11, users: 3_000, eventsPerSecond: 0.05 });
  const events = unique([...gen.take(100_000), ...gen.drain()]);
  const stats = gen.stats;

  it('uses the whole population and brings members back', () => {
    expect(stats.users).toBe(3_000);
    expect(stats.members).toBeGreaterThan(300);
    const count = (t: string): number => events.filter((e) => e.type === t).length;
    expect(count('login')).toBeGreaterThan(100);
    expect(count('purchase')).toBeGreaterThan(500);
    expect(count('refund')).toBeGreaterThan(5);
    expect(count('review')).toBeGreaterThan(20);
    const buys = new Map<string, number>();
    for (const e of events) if (e.type === 'purchase') buys.set(e.user_id, (buys.get(e.user_id) ?? 0) + 1);
    expect([...buys.values()].filter((n) => n >= 2).length).toBeGreaterThan(50);
  });

  it('identifies every event and stitches each anonymous id to at most one user', () => {
    const stitch = new Map<string, string>();
    const problems: string[] = [];
    for (const e of events) {
      if (e.type === 'cost') {
        if (e.user_id !== '' || e.anonymous_id !== '') problems.push(`cost with ids: ${toJsonLine(e)}`);
        continue;
      }
      if (e.user_id === '' && e.anonymous_id === '') problems.push(`no id: ${toJsonLine(e)}`);
      if ((e.type === 'sign_up' || e.type === 'login') && (e.user_id === '' || e.anonymous_id === '')) {
        problems.push(`${e.type} without both ids: ${toJsonLine(e)}`);
      }
      if (e.user_id !== '' && e.anonymous_id !== '') {
        const prev = stitch.get(e.anonymous_id);
        if (prev === undefined) stitch.set(e.anonymous_id, e.user_id);
        else if (prev !== e.user_id) problems.push(`${e.anonymous_id} stitched to ${prev} and ${e.user_id}`);
      }
    }
    expect(problems.slice(0, 5)).toEqual([]);
    expect(stitch.size).toBeGreaterThan(0);
    // Some members come back on a second device, stitched by their login.
    const perUser = new Map<string, number>();
    for (const u of stitch.values()) perUser.set(u, (perUser.get(u) ?? 0) + 1);
    expect([...perUser.values()].some((n) => n >= 2)).toBe(true);
  });

  it('shows a user id only from its sign_up on, which happens once', () => {
    const signup = new Map<string, number>();
    const problems: string[] = [];
    for (const e of events) {
      if (e.type !== 'sign_up') continue;
      if (signup.has(e.user_id)) problems.push(`second sign_up: ${toJsonLine(e)}`);
      signup.set(e.user_id, e.ts);
    }
    for (const e of events) {
      if (e.user_id === '') continue;
      const at = signup.get(e.user_id);
      if (at === undefined || e.ts < at) problems.push(`before sign_up: ${toJsonLine(e)}`);
    }
    expect(problems.slice(0, 5)).toEqual([]);
  });

  it('refunds and reviews refer to an earlier purchase of the same user; refunds never exceed it', () => {
    const orders = new Map<string, GenEvent>();
    for (const e of events) {
      if (e.type !== 'purchase') continue;
      expect(orders.has(e.order_id)).toBe(false);
      expect(Number.isInteger(e.amount) && e.amount > 0).toBe(true);
      expect(e.currency).toBe('KRW');
      const items = e.props['items']!.split(',');
      expect(items.length).toBe(Number(e.props['item_count']));
      orders.set(e.order_id, e);
    }
    const refunded = new Set<string>();
    for (const e of events) {
      if (e.type !== 'refund' && e.type !== 'review') continue;
      const p = orders.get(e.order_id);
      expect(p).toBeDefined();
      expect(p!.user_id).toBe(e.user_id);
      expect(p!.ts).toBeLessThanOrEqual(e.ts);
      if (e.type === 'refund') {
        expect(refunded.has(e.order_id)).toBe(false);
        refunded.add(e.order_id);
        expect(e.amount).toBeGreaterThan(0);
        expect(e.amount).toBeLessThanOrEqual(p!.amount);
      }
    }
  });

  it('keeps carts coherent: a product removed from a cart was added to it by the same person before', () => {
    // Canonical person = user id, or the user an anonymous id is stitched to (earlier anonymous
    // events count towards the member), or the anonymous id itself.
    const stitch = new Map<string, string>();
    for (const e of events) if (e.user_id !== '' && e.anonymous_id !== '') stitch.set(e.anonymous_id, e.user_id);
    const person = (e: GenEvent): string => e.user_id || stitch.get(e.anonymous_id) || e.anonymous_id;
    const added = new Map<string, Set<string>>();
    let checked = 0;
    for (const e of [...events].sort((a, b) => a.ts - b.ts)) {
      if (e.type === 'add_to_cart') {
        const s = added.get(person(e)) ?? new Set<string>();
        s.add(e.props['product_id']!);
        added.set(person(e), s);
      } else if (e.type === 'remove_from_cart') {
        expect(added.get(person(e))?.has(e.props['product_id']!)).toBe(true);
        checked++;
      }
    }
    expect(checked).toBeGreaterThan(0);
  });
});
