/**
 * Event decoders: protobuf (`crmstream.v1.Event` / `EventBatch`) and JSON, appending rows straight
 * into an {@link EventColumns} batch. Also the timestamp parser shared by JSON and CSV input.
 *
 * Contract of every `append*` function:
 * - it never throws on bad input: a record that cannot be decoded at all becomes one row with
 *   `status = Reject.bad_encoding` (via `batch.pushUndecodable`), a record whose fields have the
 *   wrong type becomes a row with its other fields kept and `bad_field` / `bad_timestamp` /
 *   `bad_amount`; valid rows of the same batch are never affected;
 * - it does throw a `RangeError` when the batch is already full: capacity is the caller's
 *   responsibility (a programming error, not bad input), and silently dropping would lose events;
 * - semantic checks (ids present, time range, sizes, currency) are NOT done here but by
 *   `engine/validate.ts` `validateStatic`, so every source shares one set of rules.
 *
 * Protobuf decoding is protobufjs' generated static code (`api/proto/gen`, `npm run proto`), with
 * two guards around it, both made of protobufjs' own `Reader`, because protobufjs 7 accepts some
 * truncated input with wrong values instead of throwing:
 * - protobufjs' `BufferReader` (native UTF-8 string decoding, the fast one) clamps a string that
 *   runs past the end instead of failing, so a truncated message decodes "successfully" with a
 *   cut-off id (`Event.decode(buf.subarray(0, 5))` gives `event_id: 'abc'`). Events are decoded
 *   with `CheckedBufferReader`, a BufferReader whose `string()` checks the bound first, and
 *   rejects invalid UTF-8 as the proto3 reference parsers do (protobufjs would decode it lossily).
 * - Before `Event.decode`, the fields are walked once with `Reader.uint32()` / `skipType()`, which
 *   check every byte against the end (about 5 % of the decode time). protobufjs 7's int64 read
 *   does not: a varint cut after its 3rd or 4th byte at the end of the message is accepted with a
 *   wrong value even by the plain `Reader` (a truncated `ts` decodes as a plausible small number;
 *   protobuf.js#1834 / #2321, fixed by #2322 after 7.x). The walk also rejects field number 0, which
 *   protobuf forbids and protobufjs skips. Remove it once protobufjs has the fix and the truncation
 *   tests pass without it.
 * The walk follows the wire types as sent, the decoder the types declared, so both guards are
 * needed: a string field sent as a varint passes the walk, and only the view makes the string
 * read that follows fail when its "length" runs past the end. A known field sent with the wrong
 * wire type is otherwise read as its declared type: usually that fails (bad_encoding), sometimes it
 * misreads (a string field sent as varint 0 reads as ''); either way only that event's row is
 * affected.
 *
 * Absent values: JSON/CSV can leave `ts` / `amount` out (NaN; validation rejects a purchase
 * without an amount). Protobuf (proto3) cannot tell an absent scalar from its default, so an Event
 * without `amount` has amount 0 (a zero-value purchase is accepted) and one without `ts` has ts 0
 * (rejected as bad_timestamp). Declaring `optional double amount` in the .proto would let the
 * decoder see the difference.
 *
 * Buffer ownership: protobuf rows keep a reference to the input bytes in `batch.raw` (the whole
 * message for {@link appendProtoEvent}, a `subarray` view for events of an `EventBatch`) so that a
 * rejected row can be dead-lettered as it came. Callers whose buffers are reused after the call
 * returns (uWebSockets.js message buffers) must copy them first.
 *
 * @module
 */
import { Buffer, isUtf8 } from 'node:buffer';
import $protobuf from 'protobufjs/minimal.js';
import type { EventColumns } from './batch.js';
import { CrmError } from './errors.js';
import { Reject } from './event-types.js';
import { crmstream } from '../api/proto/gen/crmstream.js';

/** Default zone for zone-less timestamps (SPEC §3, CLI `--tz`). */
export const DEFAULT_TZ = 'Asia/Seoul';

const EMPTY = new Uint8Array(0);
const EMPTY_BUFFER = Buffer.alloc(0);
const Reader = $protobuf.Reader;
const Event = crmstream.v1.Event;
/** Tag of `EventBatch.events` (field 1, wire type 2). */
const EVENTS_TAG = 0x0a;

function assertRoom(batch: EventColumns): void {
  if (batch.length >= batch.capacity) {
    throw new RangeError(`EventColumns batch is full (${batch.capacity} rows): flush it before appending`);
  }
}

// ---------------------------------------------------------------------------------------------
// Protobuf (protobufjs static code)
// ---------------------------------------------------------------------------------------------

/**
 * protobufjs' `BufferReader` (native UTF-8 decoding of strings straight from the Buffer, the fast
 * path) with the one method it gets wrong fixed: its `string()` clamps a length that runs past the
 * end instead of failing (module comment). This `string()` checks the bound first and throws
 * "index out of range" like the plain `Reader`. protobufjs' plain `Reader` is bounds-checked but
 * decodes UTF-8 in JavaScript, allocating per string: measured here ~235 k events/s against
 * ~430 k/s for Buffer decoding.
 *
 * One instance is reused for every message (`reset`), so decoding allocates no reader.
 */
class CheckedBufferReader extends $protobuf.BufferReader {
  constructor() {
    super(Buffer.alloc(0));
  }

  reset(buf: Buffer): this {
    this.buf = buf;
    this.pos = 0;
    this.len = buf.length;
    return this;
  }

  override string(): string {
    const len = this.uint32();
    const start = this.pos;
    const end = start + len;
    if (end > this.len) throw new RangeError(`index out of range: ${start} + ${len} > ${this.len}`);
    this.pos = end;
    if (len === 0) return '';
    const str = (this.buf as Buffer).toString('utf8', start, end);
    // proto3 strings must be valid UTF-8 (the reference parsers reject it): an invalid sequence
    // decodes to U+FFFD, so only a string containing one needs the exact check.
    if (str.indexOf('\uFFFD') !== -1 && !isUtf8(this.buf.subarray(start, end))) {
      throw new RangeError(`invalid UTF-8 in a string field at offset ${start}`);
    }
    return str;
  }
}

const reader = new CheckedBufferReader();

/** `bytes` as a plain Uint8Array (a Buffer's view of the same memory): for framing with the plain `Reader`. */
function plainView(bytes: Uint8Array): Uint8Array {
  return Buffer.isBuffer(bytes) ? new Uint8Array(bytes.buffer, bytes.byteOffset, bytes.byteLength) : bytes;
}

/** `bytes` as a Buffer over the same memory (no copy) for the checked BufferReader. */
function asBuffer(bytes: Uint8Array): Buffer {
  return Buffer.isBuffer(bytes) ? bytes : Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
}

/**
 * Walks every field of the message in `r.buf[r.pos, r.len)` without decoding it, so that a
 * message protobufjs' int64 read would accept although truncated (module comment) throws here.
 * Leaves `r.pos` at `r.len`.
 */
function checkFields(r: $protobuf.Reader): void {
  while (r.pos < r.len) {
    const tag = r.uint32();
    if (tag >>> 3 === 0) throw new RangeError(`field number 0 at offset ${r.pos}`);
    r.skipType(tag & 7);
  }
}

/**
 * Decodes the Event in `bytes` with protobufjs' static code. Throws on malformed input; the caller
 * turns that into a bad_encoding row. One reader serves the check and the decode.
 */
function decodeEvent(bytes: Uint8Array): crmstream.v1.Event {
  const r = reader.reset(asBuffer(bytes));
  checkFields(r);
  r.pos = 0;
  try {
    return Event.decode(r);
  } finally {
    reader.reset(EMPTY_BUFFER); // do not pin the caller's buffer
  }
}

/** `props` of a decoded Event (always an own object) as the column stores it: null when empty. */
function propsOrNull(props: Record<string, string>): Record<string, string> | null {
  for (const _ in props) return props;
  return null;
}

/**
 * Appends a decoded Event. Absent proto3 fields are protobufjs' prototype defaults: '' for
 * strings, `ts` 0 (then rejected as bad_timestamp by validation) and `amount` 0 — protobuf cannot
 * tell "no amount" from 0, so a purchase without an amount is a zero-value purchase here, whereas
 * JSON/CSV can say "absent" (NaN). `ts` is a plain number because scripts/gen-proto.mjs unsets
 * `util.Long` (exact below 2^53; ms timestamps always are).
 */
function pushEvent(batch: EventColumns, e: crmstream.v1.Event, size: number, raw: Uint8Array, origin: string): number {
  return batch.push(e.event_id, e.type, e.user_id, e.anonymous_id, e.ts as number, e.amount, e.currency, e.order_id,
    e.channel, e.platform, e.campaign_id, e.variant, e.trigger_id, propsOrNull(e.props), size, raw, origin);
}

function errorText(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

/**
 * Decodes one protobuf `crmstream.v1.Event` (e.g. one Kafka message) and appends it as one row.
 * Malformed bytes (truncated, bad varint, bad wire type, field number 0) give one `bad_encoding`
 * row carrying `bytes`. A Buffer is read through a plain Uint8Array view of it (module comment).
 *
 * @returns the row index.
 * @example
 * const i = appendProtoEvent(batch, message.value, `events/${partition}@${offset}`);
 */
export function appendProtoEvent(batch: EventColumns, bytes: Uint8Array, origin: string): number {
  assertRoom(batch);
  let e: crmstream.v1.Event;
  try {
    e = decodeEvent(bytes);
  } catch (err) {
    return batch.pushUndecodable(bytes, bytes.byteLength, origin, Reject.bad_encoding, `protobuf Event: ${errorText(err)}`);
  }
  return pushEvent(batch, e, bytes.byteLength, bytes, origin);
}

/**
 * Reads a protobuf `crmstream.v1.EventBatch` into one or more column batches, so a request larger
 * than the remaining capacity can be split at batch boundaries. Reusable: call {@link reset} per
 * message; it keeps its offset arrays.
 *
 * Framing is checked first, for the whole message: if the outer message is malformed (truncated,
 * an event length past the end) nothing in it can be trusted and it becomes ONE `bad_encoding`
 * row carrying all the bytes. If the framing is sound, each event is decoded on its own (protobufjs
 * `Event.decode` over a `subarray` view of its bytes): a malformed event becomes a `bad_encoding`
 * row with its own bytes, and its neighbours are kept. An empty message is a valid batch of zero
 * events. Other fields of `EventBatch` (and field 1 with a wire type other than 2) are skipped as
 * unknown.
 *
 * @example
 * const reader = new ProtoBatchReader();
 * reader.reset(body, 'http');
 * while (!reader.done) {
 *   reader.appendTo(batch);
 *   if (batch.full) { await pipeline.process(batch); batch.reset(); }
 * }
 */
export class ProtoBatchReader {
  /** The message as a plain Uint8Array view (never a Buffer: see the module comment). */
  private bytes: Uint8Array = EMPTY;
  private origin = '';
  private starts = new Uint32Array(64);
  private ends = new Uint32Array(64);
  /** Events framed in the current message (0 when the framing is broken). */
  count = 0;
  /** Index of the next event to append. */
  next = 0;
  /** Why the framing is broken; '' when it is sound. */
  error = '';
  private pendingError = false;

  /** Frames `bytes`; returns false when the framing is broken (appendTo then emits one bad_encoding row). */
  reset(bytes: Uint8Array, origin: string): boolean {
    const view = plainView(bytes);
    this.bytes = view;
    this.origin = origin;
    this.count = 0;
    this.next = 0;
    this.error = '';
    this.pendingError = false;
    const r = Reader.create(view);
    try {
      while (r.pos < r.len) {
        const tag = r.uint32();
        if (tag === EVENTS_TAG) {
          const len = r.uint32();
          const start = r.pos;
          r.skip(len); // throws when the event runs past the end of the batch
          this.frame(start, r.pos);
        } else {
          if (tag >>> 3 === 0) throw new RangeError(`field number 0 at offset ${r.pos}`);
          r.skipType(tag & 7);
        }
      }
    } catch (err) {
      this.error = `protobuf EventBatch (after ${this.count} events): ${errorText(err)}`;
      this.count = 0;
      this.pendingError = true;
    }
    return !this.pendingError;
  }

  private frame(start: number, end: number): void {
    if (this.count === this.starts.length) {
      const starts = new Uint32Array(this.count * 2);
      const ends = new Uint32Array(this.count * 2);
      starts.set(this.starts);
      ends.set(this.ends);
      this.starts = starts;
      this.ends = ends;
    }
    this.starts[this.count] = start;
    this.ends[this.count] = end;
    this.count++;
  }

  /** True when every event (or the one bad_encoding row of a broken batch) has been appended. */
  get done(): boolean {
    return !this.pendingError && this.next >= this.count;
  }

  /** Events not appended yet (1 for a broken batch not yet reported). */
  get remaining(): number {
    return this.pendingError ? 1 : this.count - this.next;
  }

  /** Appends events until the batch is full or the message is exhausted; returns rows appended. */
  appendTo(batch: EventColumns): number {
    const before = batch.length;
    if (this.pendingError) {
      if (batch.full) return 0;
      batch.pushUndecodable(this.bytes, this.bytes.length, this.origin, Reject.bad_encoding, this.error);
      this.pendingError = false;
    }
    const view = this.bytes;
    while (this.next < this.count && !batch.full) {
      const k = this.next++;
      const start = this.starts[k] as number;
      const end = this.ends[k] as number;
      const eventView = view.subarray(start, end); // the event's decode input and its raw bytes
      let e: crmstream.v1.Event;
      try {
        e = decodeEvent(eventView);
      } catch (err) {
        batch.pushUndecodable(eventView, end - start, this.origin, Reject.bad_encoding, `protobuf Event #${k} of batch: ${errorText(err)}`);
        continue;
      }
      pushEvent(batch, e, end - start, eventView, this.origin);
    }
    if (this.done) this.bytes = EMPTY; // do not pin the caller's buffer past its last row
    return batch.length - before;
  }
}

const sharedBatchReader = new ProtoBatchReader();

/**
 * Decodes a protobuf `crmstream.v1.EventBatch` (an HTTP/WS request) and appends all of it.
 * The batch must have room for every event: size the column batch to the largest request you
 * accept. When it does not, nothing is appended and `CrmError('INPUT_TOO_LARGE')` is thrown (answer
 * 413); callers that would rather split a large request use {@link ProtoBatchReader}.
 *
 * @returns the number of rows appended (events, or 1 for a malformed batch).
 * @example
 * const n = appendProtoBatch(batch, body, 'http');
 */
export function appendProtoBatch(batch: EventColumns, bytes: Uint8Array, origin: string): number {
  const r = sharedBatchReader;
  r.reset(bytes, origin);
  const room = batch.capacity - batch.length;
  if (r.remaining > room) {
    const n = r.remaining;
    r.reset(EMPTY, '');
    if (room === 0) assertRoom(batch);
    throw new CrmError('INPUT_TOO_LARGE', `EventBatch holds ${n} events, the batch has room for ${room}`);
  }
  return r.appendTo(batch);
}

// ---------------------------------------------------------------------------------------------
// Timestamps
// ---------------------------------------------------------------------------------------------

const MINUTE = 60_000;
const DAY = 86_400_000;
/** 400 Gregorian years, in ms: Date.UTC maps years 0–99 to 1900–1999, so those are shifted by it. */
const GREGORIAN_CYCLE_MS = 146_097 * DAY;
/** Wall-minute → offset entries kept per zone before the cache is cleared (bounded memory). */
const ZONE_CACHE_MAX = 100_000;

const NUMERIC_RE = /^[+-]?(?:\d+\.?\d*|\.\d+)(?:e[+-]?\d+)?$/i;
const COMPACT_DATE_RE = /^(\d{4})(\d{2})(\d{2})$/;
const ISO_RE = /^(\d{4})-(\d{2})-(\d{2})(?:[t ](\d{2}):(\d{2})(?::(\d{2})(?:[.,](\d+))?)?)?\s*(?:(z|utc|gmt)|([+-])(\d{2})(?::?(\d{2}))?)?$/i;

/**
 * ms since epoch of a proleptic Gregorian date-time read as UTC (all years, not just ≥ 100;
 * `Date.UTC` maps 0–99 to 1900–1999). Month is 1-based.
 * @example utcFields(2019, 10, 1, 9, 0, 0, 0) // Date.UTC(2019, 9, 1, 9)
 */
export function utcFields(y: number, mo: number, d: number, h: number, mi: number, s: number, ms: number): number {
  if (y >= 100) return Date.UTC(y, mo - 1, d, h, mi, s, ms);
  return Date.UTC(y + 400, mo - 1, d, h, mi, s, ms) - GREGORIAN_CYCLE_MS;
}

function daysInMonth(y: number, mo: number): number {
  if (mo === 2) return (y % 4 === 0 && y % 100 !== 0) || y % 400 === 0 ? 29 : 28;
  return mo === 4 || mo === 6 || mo === 9 || mo === 11 ? 30 : 31;
}

/** Per-zone state: the formatter (costly to build) and a bounded cache of resolved offsets. */
class ZoneInfo {
  readonly fmt: Intl.DateTimeFormat;
  /** Fixed UTC: no lookups at all. */
  readonly utc: boolean;
  /** Wall-clock minute index → offset (ms) chosen for it. */
  readonly cache = new Map<number, number>();

  constructor(tz: string) {
    try {
      this.fmt = new Intl.DateTimeFormat('en-US', {
        timeZone: tz, hourCycle: 'h23', era: 'short',
        year: 'numeric', month: 'numeric', day: 'numeric', hour: 'numeric', minute: 'numeric', second: 'numeric',
      });
    } catch (err) {
      throw new CrmError('CONFIG_INVALID', `unknown IANA time zone '${tz}' (e.g. Asia/Seoul, America/New_York, UTC)`, { cause: err });
    }
    const resolved = this.fmt.resolvedOptions().timeZone;
    this.utc = resolved === 'UTC' || resolved === 'Etc/UTC' || resolved === 'Etc/GMT' || resolved === 'GMT';
  }
}

const zones = new Map<string, ZoneInfo>();

function zoneInfo(tz: string): ZoneInfo {
  let z = zones.get(tz);
  if (z === undefined) {
    z = new ZoneInfo(tz);
    zones.set(tz, z);
  }
  return z;
}

/**
 * Throws `CrmError('CONFIG_INVALID')` unless `tz` is an IANA zone this runtime knows. Call it once
 * where the zone is configured, so decoding never meets a bad zone.
 * @example assertTimeZone(options.tz ?? DEFAULT_TZ);
 */
export function assertTimeZone(tz: string): void {
  zoneInfo(tz);
}

function offsetAt(z: ZoneInfo, utcMs: number): number {
  let y = 0;
  let mo = 0;
  let d = 0;
  let h = 0;
  let mi = 0;
  let s = 0;
  let bc = false;
  for (const p of z.fmt.formatToParts(utcMs)) {
    switch (p.type) {
      case 'year': y = Number(p.value); break;
      case 'month': mo = Number(p.value); break;
      case 'day': d = Number(p.value); break;
      case 'hour': h = Number(p.value) % 24; break;
      case 'minute': mi = Number(p.value); break;
      case 'second': s = Number(p.value); break;
      case 'era': bc = p.value === 'BC' || p.value === 'B'; break;
      default: break;
    }
  }
  if (bc) y = 1 - y;
  const floorSecond = utcMs - (((utcMs % 1000) + 1000) % 1000);
  return utcFields(y, mo, d, h, mi, s, 0) - floorSecond;
}

/**
 * The UTC offset (ms, local = UTC + offset) of IANA zone `tz` at instant `utcMs`.
 * @example zoneOffsetMs('Asia/Seoul', Date.UTC(2019, 9, 1)) // 32_400_000
 */
export function zoneOffsetMs(tz: string, utcMs: number): number {
  const z = zoneInfo(tz);
  return z.utc ? 0 : offsetAt(z, utcMs);
}

function resolveOffset(z: ZoneInfo, wallMs: number): number {
  // The offsets in force a day before and a day after bracket any transition near this wall time
  // (zones never change offset twice within two days). Each candidate offset is valid if the
  // instant it gives really has that offset.
  const before = offsetAt(z, wallMs - DAY);
  const after = offsetAt(z, wallMs + DAY);
  const beforeOk = offsetAt(z, wallMs - before) === before;
  if (before === after) {
    if (beforeOk) return before;
    // Not reached with real tzdata; settle on a fixed point rather than guess.
    const o = offsetAt(z, wallMs - offsetAt(z, wallMs - before));
    return offsetAt(z, wallMs - o) === o ? o : before;
  }
  const afterOk = offsetAt(z, wallMs - after) === after;
  if (beforeOk && afterOk) return before > after ? before : after; // overlap: the earlier instant
  if (beforeOk) return before;
  if (afterOk) return after;
  return before; // gap: read with the offset before the jump, i.e. moved forward by the gap
}

/**
 * Converts a wall-clock time in zone `tz` to UTC ms. `wallMs` is the wall-clock time written as
 * if it were UTC (`utcFields(y, mo, d, h, mi, s, ms)`).
 *
 * Ambiguous and non-existent wall times follow the "compatible" rule of Temporal and java.time:
 * - in an overlap (clocks fall back, the time happens twice) the EARLIER instant is chosen:
 *   2019-11-03 01:30 America/New_York → 05:30Z (EDT), not 06:30Z (EST);
 * - in a gap (clocks spring forward, the time never happens) the time is read with the offset in
 *   force before the jump, i.e. moved forward by the gap: 2019-03-10 02:30 America/New_York →
 *   07:30Z, which is 03:30 EDT.
 *
 * Offsets come from `Intl.DateTimeFormat` (the runtime's tzdata); formatters are built once per
 * zone and the offset chosen for each wall-clock minute is cached (bounded; cleared when it reaches
 * 100,000 minutes). Minute granularity is exact because since 1972 every zone's offsets and
 * transitions fall on whole minutes; an offset that is not a whole minute (pre-1972 local mean
 * time) is computed every time, never cached.
 *
 * @example wallClockToUtc('America/New_York', utcFields(2019, 7, 1, 0, 0, 0, 0)) // Date.UTC(2019, 6, 1, 4)
 */
export function wallClockToUtc(tz: string, wallMs: number): number {
  const z = zoneInfo(tz);
  if (z.utc) return wallMs;
  const key = Math.floor(wallMs / MINUTE);
  const cached = z.cache.get(key);
  if (cached !== undefined) return wallMs - cached;
  const offset = resolveOffset(z, wallMs);
  if (offset % MINUTE === 0) {
    if (z.cache.size >= ZONE_CACHE_MAX) z.cache.clear();
    z.cache.set(key, offset);
  }
  return wallMs - offset;
}

/** Up to three fraction digits as whole ms: sub-millisecond digits are truncated (ts is int64 ms). */
function fractionMs(frac: string | undefined): number {
  if (frac === undefined) return 0;
  let ms = 0;
  for (let i = 0; i < 3; i++) {
    ms = ms * 10 + (i < frac.length ? frac.charCodeAt(i) - 48 : 0);
  }
  return ms;
}

/**
 * Parses an event time into ms since the epoch (UTC); NaN when it cannot be read. Accepts:
 * - a finite number: ms since the epoch, as is (a fraction is kept). Seconds are NOT guessed:
 *   1569888000 is January 1970 and validation rejects it as out of range;
 * - a numeric string (`"1569888000000"`), the same — except exactly 8 digits, below;
 * - `yyyymmdd` (8 digits, e.g. CDNOW's `19970101`): that date at 00:00 in `tz`. An 8-digit ms value
 *   would be a time in 1970-01-01/02, never a real event;
 * - ISO-8601 / SQL-like: `2019-10-01T00:00:00Z`, `2019-10-01T09:00:00+09:00` (also `+0900`, `+09`),
 *   `2019-10-01 00:00:00`, `2019-10-01 00:00:00 UTC` (REES46), `2019-10-01T00:00`, fractions
 *   `.123456` (truncated to ms), and date-only `2019-10-01` (00:00 in `tz`).
 * Values without an offset are wall-clock times in `tz` ({@link wallClockToUtc} for DST rules).
 * Out-of-range fields (month 13, Feb 30, hour 24, second 60) give NaN.
 *
 * @throws CrmError CONFIG_INVALID only when `tz` is not an IANA zone (and only if it is needed).
 * @example parseTimestamp('2019-10-01 09:00:00', 'Asia/Seoul') // Date.UTC(2019, 9, 1)
 */
export function parseTimestamp(value: unknown, tz: string): number {
  if (typeof value === 'number') return Number.isFinite(value) ? value : Number.NaN;
  if (typeof value !== 'string') return Number.NaN;
  const s = value.trim();
  if (s.length === 8) {
    const c = COMPACT_DATE_RE.exec(s);
    if (c !== null) return dateTime(tz, 0, +(c[1] as string), +(c[2] as string), +(c[3] as string), 0, 0, 0, 0);
  }
  if (NUMERIC_RE.test(s)) {
    const n = Number(s);
    return Number.isFinite(n) ? n : Number.NaN;
  }
  const m = ISO_RE.exec(s);
  if (m === null) return Number.NaN;
  // Group 8 is Z/UTC/GMT, 9–11 a numeric offset; with neither the value is wall-clock time in tz.
  let zone: string | null = tz;
  let offset = 0;
  if (m[8] !== undefined) {
    zone = null;
  } else if (m[9] !== undefined) {
    const oh = +(m[10] as string);
    const om = m[11] === undefined ? 0 : +m[11];
    if (oh > 23 || om > 59) return Number.NaN;
    offset = (m[9] === '-' ? -1 : 1) * (oh * 60 + om) * MINUTE;
    zone = null;
  }
  return dateTime(
    zone, offset, +(m[1] as string), +(m[2] as string), +(m[3] as string),
    m[4] === undefined ? 0 : +m[4], m[5] === undefined ? 0 : +m[5], m[6] === undefined ? 0 : +m[6],
    fractionMs(m[7]),
  );
}

/** `zone` null: the text carried its own UTC `offset`; otherwise it is wall-clock time in `zone`. */
function dateTime(
  zone: string | null, offset: number, y: number, mo: number, d: number, h: number, mi: number, s: number, ms: number,
): number {
  if (mo < 1 || mo > 12 || d < 1 || d > daysInMonth(y, mo) || h > 23 || mi > 59 || s > 59) return Number.NaN;
  const wall = utcFields(y, mo, d, h, mi, s, ms);
  return zone === null ? wall - offset : wallClockToUtc(zone, wall);
}

// ---------------------------------------------------------------------------------------------
// JSON / plain objects
// ---------------------------------------------------------------------------------------------

/** First field error of the row being decoded; module-level so decoding a row allocates nothing for it. */
class FieldError {
  code = 0;
  detail = '';

  clear(): void {
    this.code = 0;
    this.detail = '';
  }

  set(code: number, detail: string): void {
    if (this.code === 0) {
      this.code = code;
      this.detail = detail;
    }
  }
}

const fieldError = new FieldError();

function jsonType(v: unknown): string {
  if (v === null) return 'null';
  if (Array.isArray(v)) return 'an array';
  return typeof v === 'object' ? 'an object' : `${typeof v} ${clip(String(v))}`;
}

function clip(s: string): string {
  return JSON.stringify(s.length > 40 ? `${s.slice(0, 40)}…` : s);
}

/**
 * A string field. Absent/null is ''. A JSON number that is a safe integer is accepted as its
 * decimal text (numeric user ids are common); other numbers are refused because ids beyond 2^53
 * have already lost digits in JSON.parse and would silently merge distinct users.
 */
function stringField(v: unknown, name: string): string {
  if (typeof v === 'string') return v;
  if (v === undefined || v === null) return '';
  if (typeof v === 'number' && Number.isSafeInteger(v)) return String(v);
  fieldError.set(Reject.bad_field, `${name}: expected a string, got ${jsonType(v)}${typeof v === 'number' ? ' (send ids beyond 2^53 as strings)' : ''}`);
  return '';
}

function tsField(v: unknown, tz: string): number {
  if (v === undefined || v === null) return Number.NaN; // validation reports it as missing
  if (typeof v === 'number' || typeof v === 'string') {
    const t = parseTimestamp(v, tz);
    if (Number.isNaN(t)) fieldError.set(Reject.bad_timestamp, `ts: cannot read ${jsonType(v)} as ms since epoch or ISO-8601`);
    return t;
  }
  fieldError.set(Reject.bad_timestamp, `ts: expected a number (ms) or an ISO-8601 string, got ${jsonType(v)}`);
  return Number.NaN;
}

const DECIMAL_RE = /^[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?$/;

/**
 * A plain decimal number, surrounding blanks allowed; NaN for '' (absent) and for anything else
 * (hex, '1,234', 'abc', 'Infinity').
 * @example parseDecimal(' 12.50 ') // 12.5
 */
export function parseDecimal(s: string): number {
  const t = s.trim();
  return t !== '' && DECIMAL_RE.test(t) ? Number(t) : Number.NaN;
}

function amountField(v: unknown): number {
  if (typeof v === 'number') return v; // non-finite values are judged by validation (bad_amount)
  if (v === undefined || v === null) return Number.NaN;
  if (typeof v === 'string') {
    if (v.trim() === '') return Number.NaN;
    const n = parseDecimal(v);
    if (Number.isNaN(n)) fieldError.set(Reject.bad_amount, `amount: not a number: ${clip(v)}`);
    return n;
  }
  fieldError.set(Reject.bad_amount, `amount: expected a number, got ${jsonType(v)}`);
  return Number.NaN;
}

/** Assigns a prop; `__proto__` becomes an own property instead of replacing the prototype. */
function setProp(obj: Record<string, string>, key: string, value: string): void {
  if (key === '__proto__') {
    Object.defineProperty(obj, key, { value, enumerable: true, writable: true, configurable: true });
  } else {
    obj[key] = value;
  }
}

function propOk(v: unknown): boolean {
  return typeof v === 'string' || typeof v === 'boolean' || (typeof v === 'number' && Number.isFinite(v));
}

/**
 * `props`: an object whose values are strings. Numbers and booleans are accepted as their text
 * (`{"qty": 2}` → "2"); null values mean "absent" and are dropped; objects/arrays are a bad_field
 * (the rest of the props are kept). When every value is already a string the given object is
 * stored as is (no copy — the caller hands it over); otherwise a cleaned copy is stored. An empty
 * object is stored as null.
 */
function propsField(v: unknown): Record<string, string> | null {
  if (v === undefined || v === null) return null;
  if (typeof v !== 'object' || Array.isArray(v)) {
    fieldError.set(Reject.bad_field, `props: expected an object of strings, got ${jsonType(v)}`);
    return null;
  }
  const p = v as Record<string, unknown>;
  let n = 0;
  let clean = true;
  for (const k in p) {
    n++;
    if (typeof p[k] !== 'string') {
      clean = false;
      break;
    }
  }
  if (clean) return n === 0 ? null : (p as Record<string, string>);
  let out: Record<string, string> | null = null;
  for (const k in p) {
    const x = p[k];
    if (x === null || x === undefined) continue;
    if (propOk(x)) {
      setProp(out ??= {}, k, typeof x === 'string' ? x : String(x));
    } else {
      fieldError.set(Reject.bad_field, `props.${k}: expected a string, got ${jsonType(x)}`);
    }
  }
  return out;
}

/**
 * Appends one event given as a plain object with the §1 field names (a parsed JSON line, or an
 * object handed to the library API). Unknown keys are ignored, as protobuf ignores unknown
 * fields. A non-object is `bad_encoding`; a field of the wrong type rejects the row with
 * `bad_field` / `bad_timestamp` / `bad_amount` (first error wins, detail names the field) while
 * its other fields are kept for the dead letter. Absent `ts` / `amount` are NaN (validation decides).
 *
 * @param size encoded size in bytes (for too_large).
 * @param raw what to dead-letter for this row (null: the dead-letter sink serialises the columns).
 * @returns the row index.
 * @example appendObjectEvent(batch, { event_id: 'e1', type: 'login', user_id: 'u1', ts: Date.now() }, 80, null, 'api', 'Asia/Seoul')
 */
export function appendObjectEvent(
  batch: EventColumns, obj: unknown, size: number, raw: Uint8Array | string | null, origin: string, tz: string,
): number {
  assertRoom(batch);
  if (obj === null || typeof obj !== 'object' || Array.isArray(obj)) {
    return batch.pushUndecodable(raw ?? '', size, origin, Reject.bad_encoding, `expected a JSON object, got ${jsonType(obj)}`);
  }
  const o = obj as Record<string, unknown>;
  fieldError.clear();
  const eventId = stringField(o['event_id'], 'event_id');
  const type = stringField(o['type'], 'type');
  const userId = stringField(o['user_id'], 'user_id');
  const anonymousId = stringField(o['anonymous_id'], 'anonymous_id');
  const ts = tsField(o['ts'], tz);
  const amount = amountField(o['amount']);
  const currency = stringField(o['currency'], 'currency');
  const orderId = stringField(o['order_id'], 'order_id');
  const channel = stringField(o['channel'], 'channel');
  const platform = stringField(o['platform'], 'platform');
  const campaignId = stringField(o['campaign_id'], 'campaign_id');
  const variant = stringField(o['variant'], 'variant');
  const triggerId = stringField(o['trigger_id'], 'trigger_id');
  const props = propsField(o['props']);
  // Objects (HTTP JSON/protobuf batches, the library) come without an encoded size: the fields'
  // lengths stand in for it, so validation.maxEventBytes applies on every path.
  if (size === 0) {
    size = 64 + eventId.length + type.length + userId.length + anonymousId.length + currency.length + orderId.length +
      channel.length + platform.length + campaignId.length + variant.length + triggerId.length;
    if (props !== null) for (const k in props) size += k.length + props[k]!.length + 4;
  }
  const i = batch.push(eventId, type, userId, anonymousId, ts, amount, currency, orderId, channel, platform,
    campaignId, variant, triggerId, props, size, raw, origin);
  if (fieldError.code !== 0) batch.reject(i, fieldError.code, fieldError.detail);
  return i;
}

/**
 * Parses one JSON line (one `Event` object, §1 field names; `ts` may be ms or an ISO-8601 string,
 * zone-less ones read in `tz`) and appends it. A syntax error or a non-object is `bad_encoding`.
 * `size` is the line's UTF-8 byte length; `raw` is the line.
 *
 * @returns the row index.
 * @example appendJsonEvent(batch, '{"event_id":"e1","type":"visit","anonymous_id":"a1","ts":"2019-10-01T09:00:00+09:00"}', 'in.jsonl:1', 'Asia/Seoul')
 */
export function appendJsonEvent(batch: EventColumns, line: string, origin: string, tz: string): number {
  assertRoom(batch);
  const size = Buffer.byteLength(line, 'utf8');
  let obj: unknown;
  try {
    obj = JSON.parse(line);
  } catch (err) {
    return batch.pushUndecodable(line, size, origin, Reject.bad_encoding, `invalid JSON: ${errorText(err)}`);
  }
  return appendObjectEvent(batch, obj, size, line, origin, tz);
}
