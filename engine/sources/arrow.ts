/**
 * Arrow IPC in (SPEC §1, §9): record batches with the event columns of SPEC §1 go into engine
 * batches column by column — no object per event. Strings may be plain or dictionary-encoded (a
 * dictionary is decoded once per batch, each row is then an index lookup); `ts` may be an Arrow
 * timestamp of any unit, an int64/int32 of ms, a float64 of ms, or Date64; `amount` any int or
 * float; `props` a map<string,string> or a JSON object string. Nulls read as absent ('' / NaN).
 *
 * The same reader serves `backfill --format arrow` (files and streams of any size: one record
 * batch at a time, so memory stays bounded), `engine.ingestArrow(recordBatch)` for pipelines, and
 * `convert` round trips.
 */
import { createReadStream } from 'node:fs';
import path from 'node:path';
import {
  Dictionary, Int32, RecordBatchFileWriter, RecordBatchReader, RecordBatchStreamWriter, Table, TimestampMillisecond, Type, Utf8, Float64,
  makeData, makeVector, vectorFromArray, type DataType, type RecordBatch, type Vector, type Data,
} from 'apache-arrow';
import { EventColumns } from '../batch.js';
import type { SourceItem } from '../engine.js';
import { CrmError } from '../errors.js';
import { Reject } from '../event-types.js';

/** The SPEC §1 columns, in order. `event_id`, `type` and `ts` are required; the others may be absent. */
export const ARROW_EVENT_COLUMNS = [
  'event_id', 'type', 'user_id', 'anonymous_id', 'ts', 'amount', 'currency', 'order_id', 'channel', 'platform',
  'campaign_id', 'variant', 'trigger_id', 'props',
] as const;

const STRING_COLUMNS = ['event_id', 'type', 'user_id', 'anonymous_id', 'currency', 'order_id', 'channel', 'platform', 'campaign_id', 'variant', 'trigger_id'] as const;
type StringColumn = (typeof STRING_COLUMNS)[number];
/** Low-cardinality columns `convert` writes dictionary-encoded. */
const DICTIONARY_COLUMNS: ReadonlySet<string> = new Set(['type', 'currency', 'channel', 'platform', 'campaign_id', 'variant']);

/** Reads row i of a string column as a JS string ('' for null or absent). */
type StringReader = (i: number) => string;
type NumberReader = (i: number) => number;

const EMPTY_STRING: StringReader = () => '';
const NAN: NumberReader = () => Number.NaN;

/** Per dictionary Data: its strings, decoded once (a dictionary is shared by every batch that uses it). */
const decodedDictionaries = new WeakMap<object, string[]>();

function isValid(d: Data, i: number): boolean {
  if (d.nullCount === 0 || d.nullBitmap === undefined || d.nullBitmap.length === 0) return true;
  const j = d.offset + i;
  return (d.nullBitmap[j >> 3]! & (1 << (j & 7))) !== 0;
}

function utf8Reader(d: Data): StringReader {
  const offsets = d.valueOffsets as Int32Array;
  const bytes = d.values as Uint8Array;
  const buf = Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const base = d.offset;
  if (d.nullCount === 0) return (i) => buf.toString('utf8', offsets[base + i]!, offsets[base + i + 1]!);
  return (i) => (isValid(d, i) ? buf.toString('utf8', offsets[base + i]!, offsets[base + i + 1]!) : '');
}

function stringReader(v: Vector | null, column: string): StringReader {
  if (v === null) return EMPTY_STRING;
  const d = v.data[0]!;
  switch (v.type.typeId) {
    case Type.Utf8:
      return utf8Reader(d);
    case Type.Dictionary: {
      const dict = d.dictionary;
      if (dict === undefined || dict.type.typeId !== Type.Utf8) break;
      let strings = decodedDictionaries.get(dict);
      if (strings === undefined) {
        strings = (dict.toArray() as (string | null)[]).map((s) => s ?? '');
        decodedDictionaries.set(dict, strings);
      }
      const idx = d.values as Int32Array | Int16Array | Int8Array | Uint32Array | Uint16Array | Uint8Array;
      const base = d.offset;
      const s = strings;
      if (d.nullCount === 0) return (i) => s[idx[base + i]!]!;
      return (i) => (isValid(d, i) ? s[idx[base + i]!]! : '');
    }
    default:
  }
  throw new CrmError('CONFIG_INVALID', `Arrow column ${column}: ${String(v.type)} is not a string column (utf8, or a dictionary of utf8)`);
}

/** ms per unit of an Arrow timestamp (SECOND, MILLISECOND, MICROSECOND, NANOSECOND). */
const UNIT_MS = [1000, 1, 1e-3, 1e-6];

function numberReader(v: Vector | null, column: string, kind: 'ts' | 'amount'): NumberReader {
  if (v === null) return NAN;
  const d = v.data[0]!;
  const t = v.type.typeId;
  let scale = 1;
  if (t === Type.Timestamp && kind === 'ts') scale = UNIT_MS[(v.type as unknown as { unit: number }).unit]!;
  else if (t === Type.Date && kind === 'ts') scale = 1; // Date64 is ms; Date32 (days) is rejected below
  else if (t !== Type.Int && t !== Type.Float) {
    throw new CrmError('CONFIG_INVALID', `Arrow column ${column}: ${String(v.type)} is not ${kind === 'ts' ? 'a timestamp, an int64 of ms or a float64 of ms' : 'a number'}`);
  }
  if (t === Type.Date && (v.type as unknown as { unit: number }).unit === 0) throw new CrmError('CONFIG_INVALID', `Arrow column ${column}: date32 has no time of day; use a timestamp`);
  if (t === Type.Float && (v.type as unknown as { precision: number }).precision === 0) {
    return (i) => (isValid(d, i) ? Number(v.get(i)) * scale : Number.NaN); // float16: rare, through the vector
  }
  const vals = d.values as ArrayLike<number | bigint>;
  const base = d.offset;
  const big = vals instanceof BigInt64Array || vals instanceof BigUint64Array;
  const stride = t === Type.Int && !big && (v.type as unknown as { bitWidth: number }).bitWidth === 64 ? 2 : 1; // int64 as int32 pairs (old builds)
  if (stride === 2) {
    return (i) => (isValid(d, i) ? (Number((vals as Int32Array)[2 * (base + i)]! >>> 0) + (vals as Int32Array)[2 * (base + i) + 1]! * 4294967296) * scale : Number.NaN);
  }
  if (big) return (i) => (isValid(d, i) ? Number((vals as BigInt64Array)[base + i]!) * scale : Number.NaN);
  if (scale === 1) return (i) => (isValid(d, i) ? (vals as Float64Array)[base + i]! : Number.NaN);
  return (i) => (isValid(d, i) ? (vals as Float64Array)[base + i]! * scale : Number.NaN);
}

type PropsReader = (i: number) => Record<string, string> | null | undefined;

/** The text size of the last props read (for `too_large`): set by every PropsReader call. */
const propsSize = { bytes: 0 };

/** props: map<utf8, utf8>, or a utf8 JSON object. undefined = unreadable (the row is rejected). */
function propsReader(v: Vector | null, column: string): PropsReader {
  if (v === null) {
    return () => {
      propsSize.bytes = 0;
      return null;
    };
  }
  if (v.type.typeId === Type.Map) {
    return (i) => {
      propsSize.bytes = 0;
      const m = v.get(i) as Iterable<[unknown, unknown]> | null;
      if (m === null) return null;
      const out: Record<string, string> = {};
      for (const [k, val] of m) {
        if (val === null || val === undefined) continue;
        const key = String(k);
        const value = String(val);
        out[key] = value;
        propsSize.bytes += key.length + value.length + 6;
      }
      return out;
    };
  }
  if (v.type.typeId === Type.Utf8 || v.type.typeId === Type.Dictionary) {
    const s = stringReader(v, column);
    return (i) => {
      const text = s(i);
      propsSize.bytes = text.length;
      if (text === '') return null;
      try {
        const o = JSON.parse(text) as unknown;
        if (o === null || typeof o !== 'object' || Array.isArray(o)) return undefined;
        const out: Record<string, string> = {};
        for (const [k, val] of Object.entries(o)) if (val !== null && val !== undefined) out[k] = typeof val === 'string' ? val : JSON.stringify(val);
        return out;
      } catch {
        return undefined;
      }
    };
  }
  throw new CrmError('CONFIG_INVALID', `Arrow column ${column}: ${String(v.type)} is not a map<string,string> or a JSON string`);
}

/** The column readers of one record batch (schemas may differ between files). */
class BatchReaders {
  readonly str: Record<StringColumn, StringReader>;
  readonly ts: NumberReader;
  readonly amount: NumberReader;
  readonly props: PropsReader;

  constructor(rb: RecordBatch, where: string) {
    for (const required of ['event_id', 'type', 'ts']) {
      if (rb.schema.fields.every((f) => f.name !== required)) {
        throw new CrmError('CONFIG_INVALID', `${where}: Arrow input has no ${required} column (columns: ${rb.schema.fields.map((f) => f.name).join(', ')}; expected those of SPEC §1)`);
      }
    }
    const str = {} as Record<StringColumn, StringReader>;
    for (const c of STRING_COLUMNS) str[c] = stringReader(rb.getChild(c), c);
    this.str = str;
    this.ts = numberReader(rb.getChild('ts'), 'ts', 'ts');
    this.amount = numberReader(rb.getChild('amount'), 'amount', 'amount');
    this.props = propsReader(rb.getChild('props') ?? rb.getChild('properties'), 'props');
  }
}

/**
 * Appends rows [from, to) of `rb` to `b` (which must have room); origins are `<prefix><row>`.
 * Returns the number of rows appended. Row size (for `too_large`) is the sum of its strings'
 * lengths (props as their JSON text) plus 16 bytes of numbers: the event's size without the
 * syntax of a JSON line, not its compressed size on disk.
 */
export function appendArrowRows(b: EventColumns, rb: RecordBatch, from: number, to: number, originPrefix: string, readers = new BatchReaders(rb, originPrefix)): number {
  const s = readers.str;
  const { event_id, type, user_id, anonymous_id, currency, order_id, channel, platform, campaign_id, variant, trigger_id } = s;
  for (let i = from; i < to; i++) {
    const eventId = event_id(i);
    const t = type(i);
    const u = user_id(i);
    const a = anonymous_id(i);
    const cur = currency(i);
    const order = order_id(i);
    const ch = channel(i);
    const pl = platform(i);
    const camp = campaign_id(i);
    const vari = variant(i);
    const trig = trigger_id(i);
    const props = readers.props(i);
    const size = 16 + propsSize.bytes + eventId.length + t.length + u.length + a.length + cur.length + order.length + ch.length + pl.length + camp.length + vari.length + trig.length;
    // A null ts is NaN here: validation rejects it as bad_timestamp, as for every source.
    const k = b.push(eventId, t, u, a, readers.ts(i), readers.amount(i), cur, order, ch, pl, camp, vari, trig, props ?? null, size, null, originPrefix + i);
    if (props === undefined) b.reject(k, Reject.bad_encoding, 'props is not a JSON object');
  }
  return to - from;
}

/** For engine.ingestArrow: the readers of a record batch, checked once. */
export function arrowReaders(rb: RecordBatch, where: string): BatchReaders {
  return new BatchReaders(rb, where);
}

/** Backfill position of an Arrow input: rows of the files (in order) already processed. */
export interface ArrowPosition {
  readonly arrow: { readonly row: number; readonly files: readonly string[] };
}

/**
 * Arrow IPC files or streams (either format, detected) as an engine source, in file order, one
 * record batch in memory at a time. Starts after `startRow` rows (a resumed backfill). Unlike the
 * jsonl / csv backfill, rows are not sorted: `convert` writes files in event-time order, and
 * out-of-order rows within the engine's lateness are handled as on any stream.
 */
export async function* arrowSource(files: readonly string[], batchRows: number, startRow = 0, onRow?: (row: number) => void): AsyncGenerator<SourceItem> {
  const b = new EventColumns(batchRows);
  const names = files.map((f) => path.basename(f));
  let row = 0;
  for (let f = 0; f < files.length; f++) {
    let reader: Awaited<ReturnType<typeof RecordBatchReader.from>>;
    try {
      reader = await RecordBatchReader.from(createReadStream(files[f]!));
    } catch (err) {
      throw new CrmError('SOURCE_IO', `cannot read ${files[f]} as Arrow IPC`, { cause: err });
    }
    let batchNo = 0;
    for await (const rb of reader as AsyncIterable<RecordBatch>) {
      const n = rb.numRows;
      if (row + n <= startRow) {
        row += n;
        batchNo++;
        continue;
      }
      const readers = new BatchReaders(rb, files[f]!);
      const prefix = `${names[f]}#${batchNo}:`;
      for (let i = Math.max(0, startRow - row); i < n; ) {
        const take = Math.min(n - i, b.capacity - b.length);
        appendArrowRows(b, rb, i, i + take, prefix, readers);
        i += take;
        if (b.full) {
          const position: ArrowPosition = { arrow: { row: row + i, files: names } };
          yield { kind: 'batch', batch: b, position };
          onRow?.(row + i);
          b.reset();
        }
      }
      row += n;
      batchNo++;
    }
  }
  if (b.length > 0) {
    yield { kind: 'batch', batch: b, position: { arrow: { row, files: names } } satisfies ArrowPosition };
    onRow?.(row);
  }
}

// ---------------------------------------------------------------------------------------------
// Writing (convert)

/**
 * Writes the rows of `chunks` in `order` (global indexes chunk * chunkSize + row, as SortedInput
 * keeps them) as Arrow IPC, `rowsPerBatch` rows per record batch: ids as utf8, the low-cardinality
 * columns dictionary-encoded with one dictionary for the whole file, `ts` as timestamp(ms, UTC),
 * `amount` float64, `props` a JSON string. Absent values are nulls. Returns the rows written.
 */
export async function writeArrowEvents(
  out: NodeJS.WritableStream, format: 'file' | 'stream', rows: (emit: (b: EventColumns, i: number) => void) => void, rowsPerBatch = 65_536,
): Promise<number> {
  // Pass 1: the dictionaries (distinct values of the low-cardinality columns).
  const dicts = new Map<string, Map<string, number>>();
  for (const c of DICTIONARY_COLUMNS) dicts.set(c, new Map());
  rows((b, i) => {
    for (const c of DICTIONARY_COLUMNS) {
      const v = stringColumn(b, c)[i]!;
      const m = dicts.get(c)!;
      if (v !== '' && !m.has(v)) m.set(v, m.size);
    }
  });
  const dictTypes = new Map<string, { type: Dictionary<Utf8, Int32>; values: Vector<Utf8> }>();
  let id = 0;
  for (const [c, m] of dicts) dictTypes.set(c, { type: new Dictionary(new Utf8(), new Int32(), id++), values: vectorFromArray([...m.keys()], new Utf8()) });

  const writer = format === 'file' ? RecordBatchFileWriter.throughNode() : RecordBatchStreamWriter.throughNode();
  const done = new Promise<void>((resolve, reject) => {
    out.on('error', reject);
    out.on('finish', () => resolve());
    writer.on('error', reject);
  });
  writer.pipe(out);
  let pending: { b: EventColumns; i: number }[] = [];
  let written = 0;
  const flush = (): void => {
    if (pending.length === 0) return;
    writer.write(toRecordBatchTable(pending, dicts, dictTypes).batches[0]!);
    written += pending.length;
    pending = [];
  };
  rows((b, i) => {
    if (b.status[i] !== Reject.ok) return;
    pending.push({ b, i });
    if (pending.length === rowsPerBatch) flush();
  });
  flush();
  writer.end();
  await done;
  return written;
}

function stringColumn(b: EventColumns, c: string): string[] {
  switch (c) {
    case 'event_id': return b.eventId;
    case 'type': return b.type;
    case 'user_id': return b.userId;
    case 'anonymous_id': return b.anonymousId;
    case 'currency': return b.currency;
    case 'order_id': return b.orderId;
    case 'channel': return b.channel;
    case 'platform': return b.platform;
    case 'campaign_id': return b.campaignId;
    case 'variant': return b.variant;
    case 'trigger_id': return b.triggerId;
    default: throw new TypeError(`not a string column: ${c}`);
  }
}

function toRecordBatchTable(
  rows: readonly { b: EventColumns; i: number }[], dicts: Map<string, Map<string, number>>,
  dictTypes: Map<string, { type: Dictionary<Utf8, Int32>; values: Vector<Utf8> }>,
): Table {
  const n = rows.length;
  const cols: Record<string, Vector<DataType>> = {};
  for (const c of STRING_COLUMNS) {
    if (DICTIONARY_COLUMNS.has(c)) {
      const m = dicts.get(c)!;
      const { type, values } = dictTypes.get(c)!;
      const idx = new Int32Array(n);
      const valid = new Uint8Array((n + 7) >> 3);
      let nulls = 0;
      for (let j = 0; j < n; j++) {
        const v = stringColumn(rows[j]!.b, c)[rows[j]!.i]!;
        if (v === '') nulls++;
        else {
          idx[j] = m.get(v)!;
          valid[j >> 3]! |= 1 << (j & 7);
        }
      }
      cols[c] = makeVector(makeData({ type, length: n, nullCount: nulls, nullBitmap: nulls > 0 ? valid : undefined, data: idx, dictionary: values }));
    } else {
      cols[c] = vectorFromArray(rows.map(({ b, i }) => stringColumn(b, c)[i] || null), new Utf8());
    }
  }
  cols['ts'] = vectorFromArray(rows.map(({ b, i }) => b.ts[i]!), new TimestampMillisecond());
  cols['amount'] = vectorFromArray(rows.map(({ b, i }) => (Number.isNaN(b.amount[i]!) ? null : b.amount[i]!)), new Float64());
  cols['props'] = vectorFromArray(rows.map(({ b, i }) => (b.props[i] == null ? null : JSON.stringify(b.props[i]))), new Utf8());
  const ordered: Record<string, Vector<DataType>> = {};
  for (const c of ARROW_EVENT_COLUMNS) ordered[c] = cols[c]!;
  return new Table(ordered);
}
