import { describe, expect, it } from 'vitest';
import { EventColumns } from '../../engine/batch.js';
import { type ConfigInput, resolveConfig } from '../../engine/config.js';
import { CUSTOM_BASE, EventType, Reject, TypeRegistry, isActivity } from '../../engine/event-types.js';
import { validateStatic } from '../../engine/validate.js';

const T = Date.UTC(2024, 0, 1);

interface Row {
  event_id?: string;
  type?: string;
  user_id?: string;
  anonymous_id?: string;
  ts?: number;
  amount?: number;
  currency?: string;
  props?: Record<string, string> | null;
  size?: number;
}

const GOOD: Required<Omit<Row, 'props'>> & { props: Record<string, string> | null } = {
  event_id: 'e', type: 'purchase', user_id: 'u', anonymous_id: '', ts: T, amount: 1000, currency: '', props: null, size: 100,
};

function batchOf(rows: Row[]): EventColumns {
  const b = new EventColumns(rows.length);
  for (const r0 of rows) {
    const r = { ...GOOD, ...r0 };
    b.push(r.event_id, r.type, r.user_id, r.anonymous_id, r.ts, r.amount, r.currency, '', '', '', '', '', '', r.props,
      r.size, 'raw', 'test');
  }
  return b;
}

function run(rows: Row[], cfg: ConfigInput = {}, types = new TypeRegistry()): EventColumns {
  const b = batchOf(rows);
  validateStatic(b, resolveConfig(cfg), types);
  return b;
}

function statusOf(row: Row, cfg: ConfigInput = {}): number {
  return run([row], cfg).status[0] as number;
}

function props(n: number): Record<string, string> {
  const p: Record<string, string> = {};
  for (let i = 0; i < n; i++) p[`p${i}`] = 'x';
  return p;
}

describe('validateStatic reason codes', () => {
  it('accepts a valid event and sets its type code', () => {
    const b = run([{}]);
    expect(b.status[0]).toBe(Reject.ok);
    expect(b.detail[0]).toBe('');
    expect(b.typeCode[0]).toBe(EventType.purchase);
  });

  it('missing_type: empty type', () => {
    expect(statusOf({ type: '' })).toBe(Reject.missing_type);
  });

  it('missing_id: empty event_id, or neither user_id nor anonymous_id (except cost)', () => {
    expect(statusOf({ event_id: '' })).toBe(Reject.missing_id);
    expect(statusOf({ user_id: '', anonymous_id: '' })).toBe(Reject.missing_id);
    expect(statusOf({ user_id: '', anonymous_id: 'a' })).toBe(Reject.ok);
    expect(statusOf({ type: 'cost', user_id: '', anonymous_id: '' })).toBe(Reject.ok);
    expect(statusOf({ type: 'cost', event_id: '', user_id: '' })).toBe(Reject.missing_id);
  });

  it("bad_field: a user_id with the anonymous-profile prefix 'anon:'", () => {
    expect(statusOf({ user_id: 'anon:x' })).toBe(Reject.bad_field);
    expect(statusOf({ user_id: 'xanon:' })).toBe(Reject.ok);
    expect(statusOf({ user_id: '', anonymous_id: 'anon:x' })).toBe(Reject.ok); // an anonymous id may look like anything
  });

  it('bad_timestamp: NaN, ±Infinity, outside [minTs, maxTs); fractional ms are fine', () => {
    const cfg = resolveConfig({});
    expect(statusOf({ ts: Number.NaN })).toBe(Reject.bad_timestamp);
    expect(statusOf({ ts: Number.POSITIVE_INFINITY })).toBe(Reject.bad_timestamp);
    expect(statusOf({ ts: Number.NEGATIVE_INFINITY })).toBe(Reject.bad_timestamp);
    expect(statusOf({ ts: 1_704_067_200 })).toBe(Reject.bad_timestamp); // seconds, not ms
    expect(statusOf({ ts: cfg.time.minTs - 1 })).toBe(Reject.bad_timestamp);
    expect(statusOf({ ts: cfg.time.minTs })).toBe(Reject.ok);
    // Up to maxTs only without the processing-clock bound (time.maxFutureMs: null).
    const noFuture = { time: { maxFutureMs: null } };
    expect(statusOf({ ts: cfg.time.maxTs - 1 }, noFuture)).toBe(Reject.ok);
    expect(statusOf({ ts: cfg.time.maxTs }, noFuture)).toBe(Reject.bad_timestamp);
    expect(statusOf({ ts: cfg.time.maxTs })).toBe(Reject.bad_timestamp);
    expect(statusOf({ ts: T + 0.5 })).toBe(Reject.ok);
    expect(statusOf({ ts: 5 }, { time: { minTs: 0, maxTs: 10 } })).toBe(Reject.ok);
  });

  it('future_timestamp: more than time.maxFutureMs after the processing clock (default 10 minutes)', () => {
    const now = Date.now();
    expect(statusOf({ ts: now + 60_000 })).toBe(Reject.ok);
    expect(statusOf({ ts: now + 3_600_000 })).toBe(Reject.future_timestamp);
    expect(statusOf({ ts: now + 3_600_000 }, { time: { maxFutureMs: 7_200_000 } })).toBe(Reject.ok);
    expect(statusOf({ ts: Date.UTC(2099, 0, 1) })).toBe(Reject.future_timestamp);
  });

  it('too_large: size over maxEventBytes or more props than maxProps', () => {
    expect(statusOf({ size: 64 * 1024 })).toBe(Reject.ok);
    expect(statusOf({ size: 64 * 1024 + 1 })).toBe(Reject.too_large);
    expect(statusOf({ size: 1000 }, { validation: { maxEventBytes: 999 } })).toBe(Reject.too_large);
    expect(statusOf({ props: props(64) })).toBe(Reject.ok);
    expect(statusOf({ props: props(65) })).toBe(Reject.too_large);
    expect(statusOf({ props: props(3) }, { validation: { maxProps: 2 } })).toBe(Reject.too_large);
    expect(statusOf({ props: {} }, { validation: { maxProps: 0 } })).toBe(Reject.ok);
  });

  it('bad_amount: purchase/refund/cost need one; any present amount must be finite and ≥ 0', () => {
    for (const type of ['purchase', 'refund', 'cost']) {
      expect(statusOf({ type, amount: Number.NaN }), type).toBe(Reject.bad_amount);
      expect(statusOf({ type, amount: 0 }), type).toBe(Reject.ok);
    }
    expect(statusOf({ amount: -1 })).toBe(Reject.bad_amount);
    expect(statusOf({ type: 'refund', amount: -1 })).toBe(Reject.bad_amount); // refunds are positive, they subtract
    expect(statusOf({ amount: Number.POSITIVE_INFINITY })).toBe(Reject.bad_amount);
    expect(statusOf({ type: 'page_view', amount: -5 })).toBe(Reject.bad_amount);
    expect(statusOf({ type: 'page_view', amount: Number.NEGATIVE_INFINITY })).toBe(Reject.bad_amount);
  });

  it('other types without an amount get 0', () => {
    const b = run([{ type: 'page_view', amount: Number.NaN }, { type: 'my_custom', amount: Number.NaN }]);
    expect(Array.from(b.status)).toEqual([Reject.ok, Reject.ok]);
    expect(Array.from(b.amount)).toEqual([0, 0]);
  });

  it('unknown_currency: other currencies need a rate; with one the amount is converted', () => {
    expect(statusOf({ currency: 'USD' })).toBe(Reject.unknown_currency);
    expect(statusOf({ currency: 'krw' })).toBe(Reject.unknown_currency);
    expect(statusOf({ currency: 'constructor' })).toBe(Reject.unknown_currency); // not a rate via the prototype
    expect(statusOf({ currency: '__proto__' }, { validation: { currencyRates: { USD: 1300 } } })).toBe(Reject.unknown_currency);
    const b = run([{ currency: 'USD', amount: 12.5 }, { currency: 'KRW', amount: 100 }, { currency: '', amount: 7 }],
      { validation: { currencyRates: { USD: 1300 } } });
    expect(Array.from(b.status)).toEqual([Reject.ok, Reject.ok, Reject.ok]);
    expect(Array.from(b.amount)).toEqual([16_250, 100, 7]);
    expect(b.currency.slice(0, 3)).toEqual(['KRW', 'KRW', 'KRW']); // accepted rows carry the reporting currency
    const usd = run([{ currency: 'USD', amount: 3 }, { currency: 'KRW', amount: 3 }], { validation: { currency: 'USD', currencyRates: {} } });
    expect(Array.from(usd.status)).toEqual([Reject.ok, Reject.unknown_currency]);
  });
});

describe('validateStatic ordering and isolation', () => {
  it('checks in order: missing_type, missing_id, bad_timestamp, too_large, bad_amount, unknown_currency', () => {
    const everythingWrong: Row = {
      type: '', event_id: '', user_id: '', anonymous_id: '', ts: Number.NaN, size: 1 << 20, amount: -1, currency: 'XXX',
    };
    const steps: [Row, number][] = [
      [{}, Reject.missing_type],
      [{ type: 'purchase' }, Reject.missing_id],
      [{ type: 'purchase', event_id: 'e', user_id: 'u' }, Reject.bad_timestamp],
      [{ type: 'purchase', event_id: 'e', user_id: 'u', ts: T }, Reject.too_large],
      [{ type: 'purchase', event_id: 'e', user_id: 'u', ts: T, size: 10 }, Reject.bad_amount],
      [{ type: 'purchase', event_id: 'e', user_id: 'u', ts: T, size: 10, amount: 1 }, Reject.unknown_currency],
      [{ type: 'purchase', event_id: 'e', user_id: 'u', ts: T, size: 10, amount: 1, currency: '' }, Reject.ok],
    ];
    for (const [fix, want] of steps) expect(statusOf({ ...everythingWrong, ...fix }), JSON.stringify(fix)).toBe(want);
  });

  it('rejections carry a detail; valid rows in the same batch are untouched', () => {
    const b = run([
      { event_id: 'ok1' }, { type: '' }, { event_id: 'ok2', type: 'visit', amount: Number.NaN }, { ts: Number.NaN },
      { currency: 'JPY' }, { event_id: 'ok3', type: 'refund', amount: 5 },
    ]);
    expect(Array.from(b.status)).toEqual([Reject.ok, Reject.missing_type, Reject.ok, Reject.bad_timestamp, Reject.unknown_currency, Reject.ok]);
    for (const i of [1, 3, 4]) expect(b.detail[i]).not.toBe('');
    for (const i of [0, 2, 5]) expect(b.detail[i]).toBe('');
    expect([b.eventId[0], b.eventId[2], b.eventId[5]]).toEqual(['ok1', 'ok2', 'ok3']);
    expect(Array.from(b.typeCode)).toEqual([EventType.purchase, 0, EventType.visit, 0, 0, EventType.refund]);
  });

  it('leaves rows already rejected by the decoder as they are', () => {
    const b = batchOf([{}, {}]);
    b.reject(0, Reject.bad_field, 'props: expected an object');
    validateStatic(b, resolveConfig({}), new TypeRegistry());
    expect(b.status[0]).toBe(Reject.bad_field);
    expect(b.detail[0]).toBe('props: expected an object');
    expect(b.typeCode[0]).toBe(0);
    expect(b.status[1]).toBe(Reject.ok);
  });

  it('registers custom type names only for accepted rows', () => {
    const types = new TypeRegistry();
    const b = run([{ type: 'garbage', event_id: '' }, { type: 'wishlist_add' }, { type: 'wishlist_add' }], {}, types);
    expect(Array.from(b.status)).toEqual([Reject.missing_id, Reject.ok, Reject.ok]);
    expect(b.typeCode[1]).toBe(CUSTOM_BASE);
    expect(b.typeCode[2]).toBe(CUSTOM_BASE);
    expect(types.customNames()).toEqual(['wishlist_add']);
  });

  it('does not replace props objects or touch other columns of valid rows', () => {
    const p = { a: 'b' };
    const b = run([{ props: p, type: 'page_view' }]);
    expect(b.props[0]).toBe(p);
    expect(b.raw[0]).toBe('raw');
    expect(b.origin[0]).toBe('test');
  });

  it('is idempotent: validating a batch twice changes nothing (no double currency conversion)', () => {
    const cfg = resolveConfig({ validation: { currencyRates: { USD: 1300 } } });
    const types = new TypeRegistry();
    const b = batchOf([{ currency: 'USD', amount: 2 }, { type: 'visit', amount: Number.NaN }, { ts: Number.NaN }]);
    validateStatic(b, cfg, types);
    const snapshot = [Array.from(b.status), Array.from(b.amount), b.currency.slice(0, 3), b.detail.slice(0, 3), Array.from(b.typeCode)];
    validateStatic(b, cfg, types);
    expect([Array.from(b.status), Array.from(b.amount), b.currency.slice(0, 3), b.detail.slice(0, 3), Array.from(b.typeCode)]).toEqual(snapshot);
    expect(b.amount[0]).toBe(2600);
  });

  it('validates an empty batch and only the first `length` rows', () => {
    const b = new EventColumns(4);
    validateStatic(b, resolveConfig({}), new TypeRegistry());
    expect(b.length).toBe(0);
    expect(Array.from(b.status)).toEqual([0, 0, 0, 0]);
  });
});

describe('custom message types', () => {
  it('a custom message_* type is not activity; other custom types are; codes survive a restore', () => {
    const reg = new TypeRegistry();
    const wish = reg.code('wishlist');
    const msg = reg.code('message_bounced');
    expect(isActivity(wish)).toBe(true);
    expect(isActivity(msg)).toBe(false);
    const again = new TypeRegistry();
    again.restoreCustom(reg.customNames());
    expect([again.code('wishlist'), again.code('message_bounced')]).toEqual([wish, msg]);
  });
});
