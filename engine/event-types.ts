/**
 * Event type codes and reject reason codes: the small integer vocabularies of the hot path.
 * Codes are stable (they are stored in checkpoints): append, never renumber.
 */

/** Well-known event types (SPEC §1). Custom type names get codes from CUSTOM_BASE upward. */
export const EventType = {
  unknown: 0,
  visit: 1,
  page_view: 2,
  sign_up: 3,
  login: 4,
  add_to_cart: 5,
  remove_from_cart: 6,
  purchase: 7,
  refund: 8,
  review: 9,
  message_sent: 10,
  message_delivered: 11,
  message_opened: 12,
  message_clicked: 13,
  cost: 14,
} as const;
export type EventTypeName = keyof typeof EventType;

export const KNOWN_TYPE_NAMES: readonly string[] = Object.keys(EventType);
export const CUSTOM_BASE = 32;
/** Custom type names beyond this many share one code (their name stays in the `type` column). */
export const MAX_CUSTOM_TYPES = 1024;
export const CUSTOM_OVERFLOW = CUSTOM_BASE + MAX_CUSTOM_TYPES;
/**
 * Custom `message_*` names (SPEC §4: not activity, like the built-in message types) get codes
 * from their own range, so "is this activity?" stays a comparison on the code.
 */
export const CUSTOM_MESSAGE_BASE = 2048;
export const CUSTOM_MESSAGE_OVERFLOW = CUSTOM_MESSAGE_BASE + MAX_CUSTOM_TYPES;

/** Activity (SPEC §4) = any user event except `cost` and `message_*`. */
export function isActivity(code: number): boolean {
  return code !== EventType.cost && (code < EventType.message_sent || code > EventType.message_clicked) && code !== EventType.unknown &&
    code < CUSTOM_MESSAGE_BASE;
}

/**
 * Interns event type names into codes. Well-known names have fixed codes; custom names are numbered
 * in first-seen order. Bounded: past MAX_CUSTOM_TYPES custom names, all further ones map to
 * CUSTOM_OVERFLOW so a hostile stream cannot grow the table.
 */
export class TypeRegistry {
  private readonly codes = new Map<string, number>();
  private readonly names: string[] = [];
  private nextCustom = CUSTOM_BASE;
  private nextMessage = CUSTOM_MESSAGE_BASE;

  constructor() {
    for (const name of KNOWN_TYPE_NAMES) {
      const code = EventType[name as EventTypeName];
      this.codes.set(name, code);
      this.names[code] = name;
    }
  }

  code(name: string): number {
    const known = this.codes.get(name);
    if (known !== undefined) return known;
    let code: number;
    if (name.startsWith('message_')) {
      if (this.nextMessage >= CUSTOM_MESSAGE_OVERFLOW) return CUSTOM_MESSAGE_OVERFLOW;
      code = this.nextMessage++;
    } else {
      if (this.nextCustom >= CUSTOM_OVERFLOW) return CUSTOM_OVERFLOW;
      code = this.nextCustom++;
    }
    this.codes.set(name, code);
    this.names[code] = name;
    return code;
  }

  name(code: number): string {
    return this.names[code] ?? 'custom';
  }

  /** Custom names in code order, for checkpoints (codes must survive a restart: each range is re-filled in order). */
  customNames(): string[] {
    return this.names.slice(CUSTOM_BASE).filter((n): n is string => n !== undefined);
  }

  restoreCustom(names: readonly string[]): void {
    for (const n of names) this.code(n);
  }
}

/** Why an event was rejected. 0 means accepted. Names are the stable reason codes of SPEC §1. */
export const Reject = {
  ok: 0,
  bad_encoding: 1,
  missing_id: 2,
  missing_type: 3,
  bad_timestamp: 4,
  too_late: 5,
  unknown_currency: 6,
  too_large: 7,
  bad_amount: 8,
  duplicate: 9,
  bad_field: 10,
  /** Further in the future than time.maxFutureMs of the processing clock (SPEC §8 "Event time is protected"). */
  future_timestamp: 11,
  /** An operator threw on this record before: quarantined instead of crash-looping (docs/GUARANTEES.md). */
  poison: 12,
} as const;
/**
 * Status of a row that is not a reject: its profile lives in another partition (scale-out), so the
 * row was forwarded there instead of processed here. Operators skip it like any non-zero status;
 * it is neither counted as a reject nor dead-lettered.
 */
export const ROUTED = 255;
export type RejectName = Exclude<keyof typeof Reject, 'ok'>;
export const REJECT_NAMES: readonly RejectName[] = (Object.keys(Reject) as (keyof typeof Reject)[]).filter(
  (k): k is RejectName => k !== 'ok',
);
export function rejectName(code: number): RejectName {
  return REJECT_NAMES[code - 1] ?? 'bad_field';
}
