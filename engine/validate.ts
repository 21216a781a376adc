/**
 * Static validation: the checks that depend on the event alone (and the configuration), not on
 * state — so every source (protobuf, JSON, CSV, Arrow, the library API) shares one set of rules and
 * one set of reason codes. Dynamic checks (`too_late` against the watermark, `duplicate` against
 * the de-duplication horizon) happen later in the pipeline.
 *
 * @module
 */
import type { EventColumns } from './batch.js';
import { ANON_PREFIX } from '../operators/operator.js';
import type { EngineConfig } from './config.js';
import { EventType, type EventTypeName, KNOWN_TYPE_NAMES, Reject, type TypeRegistry } from './event-types.js';

/** Well-known names → codes, looked up without registering anything (a Map: no prototype keys). */
const KNOWN = new Map<string, number>(KNOWN_TYPE_NAMES.map((n) => [n, EventType[n as EventTypeName]]));

/**
 * Validates every row of `batch` whose status is still `ok`, in place. Checks, in this order (the
 * first failing one is the row's reason; `batch.reject` records it with a detail naming the field):
 *
 * 1. `missing_type`: `type` is empty.
 * 2. `missing_id`: `event_id` is empty, or both `user_id` and `anonymous_id` are empty (allowed for
 *    `cost`, which is spend, not a user's event).
 *    Then `bad_field` for a user_id starting with `anon:` (the anonymous-profile prefix), and
 *    `bad_encoding` when an id holds a lone UTF-16 surrogate (not representable in UTF-8 keys).
 * 3. `bad_timestamp`: `ts` is not finite or outside `[cfg.time.minTs, cfg.time.maxTs)`. A fraction
 *    of a millisecond is fine.
 * 4. `too_large`: `size` > `cfg.validation.maxEventBytes`, or more props than `cfg.validation.maxProps`.
 * 5. `bad_amount`: `purchase`, `refund` and `cost` need an amount (NaN = absent); for every type an
 *    amount that is present must be finite and ≥ 0 (a refund is a positive amount that subtracts).
 *    Other types without an amount get 0.
 * 6. `unknown_currency`: a non-empty `currency` other than `cfg.validation.currency` that has no
 *    entry in `cfg.validation.currencyRates`. With an entry, `amount` is converted in place
 *    (amount × rate).
 *
 * Accepted rows leave with `typeCode` set and `currency` = the reporting currency, so no later
 * stage looks at currencies again. Rejected rows keep `typeCode` 0: custom type names are
 * registered only by accepted rows, so a stream of garbage cannot fill the bounded TypeRegistry.
 *
 * Rows already rejected by the decoder (bad_encoding, bad_field, …) are left as they are.
 * Allocates nothing for a valid row (a detail string is built only for a rejected one).
 *
 * @example
 * validateStatic(batch, resolveConfig({}), new TypeRegistry());
 * for (let i = 0; i < batch.length; i++) if (batch.status[i] !== Reject.ok) deadLetter(batch, i);
 */
/** `String.prototype.isWellFormed` (V8 11.1+, Node 20); typed here because lib es2023 lacks it. */
const wellFormed = (s: string): boolean => (s as unknown as { isWellFormed(): boolean }).isWellFormed();

export function validateStatic(batch: EventColumns, cfg: EngineConfig, types: TypeRegistry): void {
  const { minTs, maxTs: maxTsAbs, maxFutureMs } = cfg.time;
  // The processing clock, read once per batch: bounds how far ahead of it an event may be dated.
  const futureFrom = maxFutureMs === null ? Number.POSITIVE_INFINITY : Date.now() + maxFutureMs;
  const maxTs = Math.min(maxTsAbs, Math.max(futureFrom, minTs));
  const { maxEventBytes, maxProps, maxIdLength, maxNameLength, currency: reporting, currencyRates } = cfg.validation;
  const { status, type, eventId, userId, anonymousId, ts, size, props, amount, currency, typeCode } = batch;
  const { orderId, triggerId, channel, platform, campaignId, variant } = batch;
  const n = batch.length;
  for (let i = 0; i < n; i++) {
    if (status[i] !== Reject.ok) continue;
    const name = type[i] as string;
    if (name === '') {
      batch.reject(i, Reject.missing_type, 'type is empty');
      continue;
    }
    const known = KNOWN.get(name) ?? -1;
    if (eventId[i] === '') {
      batch.reject(i, Reject.missing_id, 'event_id is empty');
      continue;
    }
    if (known !== EventType.cost && userId[i] === '' && anonymousId[i] === '') {
      batch.reject(i, Reject.missing_id, 'user_id and anonymous_id are both empty (one is required)');
      continue;
    }
    if (userId[i]!.startsWith(ANON_PREFIX)) {
      // The prefix marks anonymous profiles: a member id with it would share their keys.
      batch.reject(i, Reject.bad_field, `user_id must not start with '${ANON_PREFIX}' (reserved for anonymous profiles)`);
      continue;
    }
    if (!wellFormed(eventId[i]!) || !wellFormed(userId[i]!) || !wellFormed(anonymousId[i]!)) {
      // A lone UTF-16 surrogate cannot be stored as UTF-8: LevelDB would turn it into U+FFFD and
      // two different ids into one profile.
      batch.reject(i, Reject.bad_encoding, 'an id contains a lone UTF-16 surrogate');
      continue;
    }
    if (eventId[i]!.length > maxIdLength || userId[i]!.length > maxIdLength || anonymousId[i]!.length > maxIdLength ||
      orderId[i]!.length > maxIdLength || triggerId[i]!.length > maxIdLength) {
      batch.reject(i, Reject.bad_field, `an id is longer than ${maxIdLength} characters (validation.maxIdLength)`);
      continue;
    }
    if (name.length > maxNameLength || channel[i]!.length > maxNameLength || platform[i]!.length > maxNameLength ||
      campaignId[i]!.length > maxNameLength || variant[i]!.length > maxNameLength) {
      batch.reject(i, Reject.bad_field, `type, channel, platform, campaign_id or variant is longer than ${maxNameLength} characters (validation.maxNameLength)`);
      continue;
    }
    const t = ts[i] as number;
    if (!(t >= minTs && t < maxTs)) { // also catches NaN and ±Infinity
      if (t >= minTs && t < maxTsAbs) {
        batch.reject(i, Reject.future_timestamp, `ts ${t} is more than ${maxFutureMs} ms after the processing clock (time.maxFutureMs)`);
      } else {
        batch.reject(i, Reject.bad_timestamp, Number.isNaN(t)
          ? 'ts is missing'
          : `ts ${t} is outside [${minTs}, ${maxTsAbs}) ms since epoch (seconds instead of ms?)`);
      }
      continue;
    }
    if ((size[i] as number) > maxEventBytes) {
      batch.reject(i, Reject.too_large, `event is ${size[i]} bytes, the limit is ${maxEventBytes}`);
      continue;
    }
    const p = props[i];
    if (p != null && countPropsOver(p, maxProps)) {
      batch.reject(i, Reject.too_large, `more than ${maxProps} props`);
      continue;
    }
    let a = amount[i] as number;
    if (Number.isNaN(a)) {
      if (known === EventType.purchase || known === EventType.refund || known === EventType.cost) {
        batch.reject(i, Reject.bad_amount, `amount is missing (required for ${name})`);
        continue;
      }
      a = 0;
      amount[i] = 0;
    } else if (!(a >= 0 && a < Number.POSITIVE_INFINITY)) {
      batch.reject(i, Reject.bad_amount, `amount ${a} must be a finite number ≥ 0`);
      continue;
    }
    const cur = currency[i] as string;
    if (cur !== '' && cur !== reporting) {
      // Own properties only: 'constructor' or '__proto__' must not read as a rate.
      if (!Object.hasOwn(currencyRates, cur)) {
        batch.reject(i, Reject.unknown_currency, `currency ${JSON.stringify(cur)} is not ${reporting} and has no configured rate`);
        continue;
      }
      amount[i] = a * (currencyRates[cur] as number);
    }
    currency[i] = reporting;
    typeCode[i] = known >= 0 ? known : types.code(name);
  }
}

/** True when `p` has more than `max` own enumerable keys; stops counting at max + 1, allocates nothing. */
function countPropsOver(p: Record<string, string>, max: number): boolean {
  let n = 0;
  for (const k in p) {
    if (!Object.hasOwn(p, k)) continue;
    if (++n > max) return true;
  }
  return false;
}
