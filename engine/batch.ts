import { Reject } from './event-types.js';

/**
 * A batch of events in columns (struct of arrays): the unit of work of the whole pipeline.
 * Sources fill it (from protobuf, JSON, CSV or Arrow) without building one object per event that
 * outlives the batch; validation writes `status`, identity writes `canon`, operators read columns
 * by row index. Batches are reused: `reset()` keeps the arrays and their capacity.
 *
 * String columns hold '' for "absent", numeric columns NaN for "absent" (ts, amount).
 */
export class EventColumns {
  length = 0;
  readonly capacity: number;
  readonly eventId: string[];
  readonly type: string[];
  readonly typeCode: Uint16Array;
  readonly userId: string[];
  readonly anonymousId: string[];
  readonly ts: Float64Array;
  readonly amount: Float64Array;
  readonly currency: string[];
  readonly orderId: string[];
  readonly channel: string[];
  readonly platform: string[];
  readonly campaignId: string[];
  readonly variant: string[];
  readonly triggerId: string[];
  readonly props: (Record<string, string> | null)[];
  /** Encoded size of the input record in bytes (for `too_large`). */
  readonly size: Uint32Array;
  /** Reject code per row (event-types.ts `Reject`); 0 = accepted. */
  readonly status: Uint8Array;
  /** Human detail for a rejected row (e.g. the JSON parse error); '' otherwise. */
  readonly detail: string[];
  /** The raw input of a row, kept so a rejected row can be dead-lettered as it came. */
  readonly raw: (Uint8Array | string | null)[];
  /**
   * Where each row came from, for dead letters (`file:line`, `topic/partition@offset`, `http`):
   * `origin[i]`, or — when `originRow[i] >= 0` — that prefix followed by the row number (columnar
   * sources: no string per row). Read it with originOf.
   */
  readonly origin: string[];
  readonly originRow: Int32Array;
  /** Canonical profile id, written by the identity operator for accepted rows. */
  readonly canon: string[];
  /**
   * Scale-out (engine/kafka/tasks.ts): the canonical id another partition already resolved for this
   * row ('' = resolve here). Such a row skips identity: its alias decision was made where the
   * anonymous id lives.
   */
  readonly given: string[];
  /**
   * Scale-out: the encoded anonymous profile (`anon:<anonymousId>`) that moves into `given` with
   * this row — the identity merge the row caused at the anonymous id's partition (null: none).
   */
  readonly moved: (Uint8Array | null)[];

  constructor(capacity: number) {
    this.capacity = capacity;
    this.eventId = new Array<string>(capacity).fill('');
    this.type = new Array<string>(capacity).fill('');
    this.typeCode = new Uint16Array(capacity);
    this.userId = new Array<string>(capacity).fill('');
    this.anonymousId = new Array<string>(capacity).fill('');
    this.ts = new Float64Array(capacity);
    this.amount = new Float64Array(capacity);
    this.currency = new Array<string>(capacity).fill('');
    this.orderId = new Array<string>(capacity).fill('');
    this.channel = new Array<string>(capacity).fill('');
    this.platform = new Array<string>(capacity).fill('');
    this.campaignId = new Array<string>(capacity).fill('');
    this.variant = new Array<string>(capacity).fill('');
    this.triggerId = new Array<string>(capacity).fill('');
    this.props = new Array<Record<string, string> | null>(capacity).fill(null);
    this.size = new Uint32Array(capacity);
    this.status = new Uint8Array(capacity);
    this.detail = new Array<string>(capacity).fill('');
    this.raw = new Array<Uint8Array | string | null>(capacity).fill(null);
    this.origin = new Array<string>(capacity).fill('');
    this.originRow = new Int32Array(capacity).fill(-1);
    this.canon = new Array<string>(capacity).fill('');
    this.given = new Array<string>(capacity).fill('');
    this.moved = new Array<Uint8Array | null>(capacity).fill(null);
  }

  /** Row i's origin (see origin / originRow). */
  originOf(i: number): string {
    const r = this.originRow[i]!;
    return r < 0 ? this.origin[i]! : this.origin[i]! + r;
  }

  get full(): boolean {
    return this.length >= this.capacity;
  }

  reset(): void {
    // Drop references so a reused batch does not pin the previous batch's strings and buffers.
    for (let i = 0; i < this.length; i++) {
      this.props[i] = null;
      this.raw[i] = null;
      this.moved[i] = null;
    }
    this.length = 0;
  }

  /**
   * Columnar sources (Arrow): appends `n` rows whose event fields the caller then fills column by
   * column; the bookkeeping columns are reset here. Returns the index of the first row.
   */
  reserve(n: number): number {
    const start = this.length;
    const end = start + n;
    if (end > this.capacity) throw new RangeError(`reserve(${n}): ${this.length} of ${this.capacity} rows used`);
    this.typeCode.fill(0, start, end);
    this.status.fill(Reject.ok, start, end);
    this.size.fill(0, start, end);
    this.originRow.fill(-1, start, end);
    for (let i = start; i < end; i++) {
      this.detail[i] = '';
      this.raw[i] = null;
      this.props[i] = null;
      this.canon[i] = '';
      this.given[i] = '';
      this.moved[i] = null;
    }
    this.length = end;
    return start;
  }

  /**
   * Appends one row with every field given; returns its index. The hot-path sources call this
   * with values taken straight from the decoded record.
   */
  push(
    eventId: string, type: string, userId: string, anonymousId: string, ts: number, amount: number,
    currency: string, orderId: string, channel: string, platform: string, campaignId: string,
    variant: string, triggerId: string, props: Record<string, string> | null, size: number,
    raw: Uint8Array | string | null, origin: string,
  ): number {
    const i = this.length++;
    this.eventId[i] = eventId;
    this.type[i] = type;
    this.typeCode[i] = 0;
    this.userId[i] = userId;
    this.anonymousId[i] = anonymousId;
    this.ts[i] = ts;
    this.amount[i] = amount;
    this.currency[i] = currency;
    this.orderId[i] = orderId;
    this.channel[i] = channel;
    this.platform[i] = platform;
    this.campaignId[i] = campaignId;
    this.variant[i] = variant;
    this.triggerId[i] = triggerId;
    this.props[i] = props;
    this.size[i] = size;
    this.status[i] = Reject.ok;
    this.detail[i] = '';
    this.raw[i] = raw;
    this.origin[i] = origin;
    this.originRow[i] = -1;
    this.canon[i] = '';
    this.given[i] = '';
    this.moved[i] = null;
    return i;
  }

  /** Appends a row that failed to decode at all: it only carries its raw bytes and the reason. */
  pushUndecodable(raw: Uint8Array | string, size: number, origin: string, reason: number, detail: string): number {
    const i = this.push('', '', '', '', Number.NaN, Number.NaN, '', '', '', '', '', '', '', null, size, raw, origin);
    this.status[i] = reason;
    this.detail[i] = detail;
    return i;
  }

  /** Appends a copy of row `i` of `src` (every column, including status and detail). */
  pushFrom(src: EventColumns, i: number): number {
    const j = this.push(
      src.eventId[i]!, src.type[i]!, src.userId[i]!, src.anonymousId[i]!, src.ts[i]!, src.amount[i]!, src.currency[i]!,
      src.orderId[i]!, src.channel[i]!, src.platform[i]!, src.campaignId[i]!, src.variant[i]!, src.triggerId[i]!,
      src.props[i]!, src.size[i]!, src.raw[i]!, src.originOf(i),
    );
    this.status[j] = src.status[i]!;
    this.detail[j] = src.detail[i]!;
    this.given[j] = src.given[i]!;
    this.moved[j] = src.moved[i]!;
    return j;
  }

  reject(i: number, reason: number, detail: string): void {
    this.status[i] = reason;
    this.detail[i] = detail;
  }
}
