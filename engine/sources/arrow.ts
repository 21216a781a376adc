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
  Dictionary, Field, Int32, Map_, RecordBatchFileWriter, Struct, RecordBatchReader, RecordBatchStreamWriter, Table, TimestampMillisecond, Type, Utf8, Float64,
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

/** Buffer's own UTF-8 slice: what toString('utf8', a, b) calls after its argument checks (2× faster per short string). */
type Sliceable = Buffer & { utf8Slice?(start: number, end: number): string };

function utf8Reader(d: Data): StringReader {
  const offsets = d.valueOffsets as Int32Array;
  const bytes = d.values as Uint8Array;
  const buf = Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength) as Sliceable;
  const base = d.offset;
  const slice = typeof buf.utf8Slice === 'function'
    ? (a: number, b: number): string => buf.utf8Slice!(a, b)
    : (a: number, b: number): string => buf.toString('utf8', a, b);
  if (d.nullCount === 0) return (i) => slice(offsets[base + i]!, offsets[base + i + 1]!);
  return (i) => (isValid(d, i) ? slice(offsets[base + i]!, offsets[base + i + 1]!) : '');
}

/**
 * A utf8 reader for columns of few distinct values that are not dictionary-encoded (map keys): a
 * value is decoded once and found again by comparing its bytes with the earlier ones of the same
 * length and ends — cheaper than decoding, and the rows share one string.
 */
function internedUtf8Reader(d: Data): StringReader {
  const offsets = d.valueOffsets as Int32Array;
  const bytes = d.values as Uint8Array;
  const decode = utf8Reader(d);
  const base = d.offset;
  const seen = new Map<number, { start: number; s: string }[]>();
  return (i) => {
    const start = offsets[base + i]!;
    const end = offsets[base + i + 1]!;
    const len = end - start;
    if (len === 0) return '';
    const h = len * 65_536 + bytes[start]! * 256 + bytes[end - 1]!;
    let list = seen.get(h);
    if (list !== undefined) {
      for (const c of list) {
        let j = 1;
        while (j < len - 1 && bytes[c.start + j] === bytes[start + j]) j++;
        if (j >= len - 1) return c.s;
      }
      if (list.length >= 8) return decode(i); // many distinct values: not worth it
    } else seen.set(h, (list = []));
    const str = decode(i);
    list.push({ start, s: str });
    return str;
  };
}

/** A utf8 dictionary's strings, decoded once per dictionary (batches share their dictionary). */
function dictionaryStrings(dict: Vector): string[] {
  let strings = decodedDictionaries.get(dict);
  if (strings === undefined) {
    strings = (dict.toArray() as (string | null)[]).map((x) => x ?? '');
    decodedDictionaries.set(dict, strings);
  }
  return strings;
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
      const strings = dictionaryStrings(dict);
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

/** Fills dst[start .. start + n) with rows [from, from + n) of a string column. */
type StringFiller = (dst: string[], start: number, from: number, n: number) => void;

/** The column-at-a-time form of stringReader: one tight loop per column and type. */
function stringFiller(v: Vector | null, column: string): StringFiller {
  if (v === null) {
    return (dst, start, _from, n) => {
      for (let j = 0; j < n; j++) dst[start + j] = '';
    };
  }
  const d = v.data[0]!;
  if (v.type.typeId === Type.Dictionary && d.nullCount === 0 && d.dictionary?.type.typeId === Type.Utf8) {
    const strings = dictionaryStrings(d.dictionary);
    const idx = d.values as Int32Array;
    const base = d.offset;
    return (dst, start, from, n) => {
      for (let j = 0; j < n; j++) dst[start + j] = strings[idx[base + from + j]!]!;
    };
  }
  if (v.type.typeId === Type.Utf8 && d.nullCount === 0) {
    const offsets = d.valueOffsets as Int32Array;
    const bytes = d.values as Uint8Array;
    const buf = Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength) as Sliceable;
    const base = d.offset;
    if (typeof buf.utf8Slice === 'function') {
      return (dst, start, from, n) => {
        for (let j = 0; j < n; j++) dst[start + j] = buf.utf8Slice!(offsets[base + from + j]!, offsets[base + from + j + 1]!);
      };
    }
  }
  const read = stringReader(v, column);
  return (dst, start, from, n) => {
    for (let j = 0; j < n; j++) dst[start + j] = read(from + j);
  };
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
    // Map<utf8, utf8> is List<Struct<key, value>>: entries [offsets[i], offsets[i + 1]) of two
    // string children, read directly (the vector's get() builds a row object per entry).
    const d = v.data[0]!;
    const entries = d.children[0]!;
    const [kd, vd] = entries.children;
    if (kd === undefined || vd === undefined || kd.typeId !== Type.Utf8 || (vd.typeId !== Type.Utf8 && vd.typeId !== Type.Dictionary)) {
      throw new CrmError('CONFIG_INVALID', `Arrow column ${column}: ${String(v.type)} is not a map<string,string>`);
    }
    const key = internedUtf8Reader(kd);
    const val = vd.typeId === Type.Utf8 ? internedUtf8Reader(vd) : stringReader(makeVector(vd), column);
    const offsets = d.valueOffsets as Int32Array;
    const base = d.offset;
    const eBase = entries.offset;
    return (i) => {
      propsSize.bytes = 0;
      if (!isValid(d, i)) return null;
      const from = offsets[base + i]! - eBase;
      const to = offsets[base + i + 1]! - eBase;
      if (from === to) return null;
      const out: Record<string, string> = {};
      for (let j = from; j < to; j++) {
        if (!isValid(vd, j)) continue;
        const k = key(j);
        const x = val(j);
        out[k] = x;
        propsSize.bytes += k.length + x.length + 6;
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
  readonly fill: Record<StringColumn, StringFiller>;
  readonly ts: NumberReader;
  readonly amount: NumberReader;
  readonly props: PropsReader;

  constructor(rb: RecordBatch, where: string) {
    for (const required of ['event_id', 'type', 'ts']) {
      if (rb.schema.fields.every((f) => f.name !== required)) {
        throw new CrmError('CONFIG_INVALID', `${where}: Arrow input has no ${required} column (columns: ${rb.schema.fields.map((f) => f.name).join(', ')}; expected those of SPEC §1)`);
      }
    }
    const fill = {} as Record<StringColumn, StringFiller>;
    for (const c of STRING_COLUMNS) fill[c] = stringFiller(rb.getChild(c), c);
    this.fill = fill;
    this.ts = numberReader(rb.getChild('ts'), 'ts', 'ts');
    this.amount = numberReader(rb.getChild('amount'), 'amount', 'amount');
    this.props = propsReader(rb.getChild('props') ?? rb.getChild('properties'), 'props');
  }
}

/**
 * Appends rows [from, to) of `rb` to `b` (which must have room); origins are `<prefix><row>`
 * (kept as prefix + row number: no string per row unless a dead letter needs it).
 * Returns the number of rows appended. Row size (for `too_large`) is the sum of its strings'
 * lengths (props as their JSON text) plus 16 bytes of numbers: the event's size without the
 * syntax of a JSON line, not its compressed size on disk.
 */
export function appendArrowRows(b: EventColumns, rb: RecordBatch, from: number, to: number, originPrefix: string, readers = new BatchReaders(rb, originPrefix)): number {
  // Column by column: each loop calls one reader, so it stays monomorphic and is inlined.
  const n = to - from;
  const start = b.reserve(n);
  const f = readers.fill;
  f.event_id(b.eventId, start, from, n);
  f.type(b.type, start, from, n);
  f.user_id(b.userId, start, from, n);
  f.anonymous_id(b.anonymousId, start, from, n);
  f.currency(b.currency, start, from, n);
  f.order_id(b.orderId, start, from, n);
  f.channel(b.channel, start, from, n);
  f.platform(b.platform, start, from, n);
  f.campaign_id(b.campaignId, start, from, n);
  f.variant(b.variant, start, from, n);
  f.trigger_id(b.triggerId, start, from, n);
  // A null ts is NaN here: validation rejects it as bad_timestamp, as for every source.
  const { ts, amount } = readers;
  for (let j = 0; j < n; j++) b.ts[start + j] = ts(from + j);
  for (let j = 0; j < n; j++) b.amount[start + j] = amount(from + j);
  const props = readers.props;
  for (let j = 0; j < n; j++) {
    const k = start + j;
    const p = props(from + j);
    b.props[k] = p ?? null;
    b.origin[k] = originPrefix;
    b.originRow[k] = from + j;
    b.size[k] = 16 + propsSize.bytes + b.eventId[k]!.length + b.type[k]!.length + b.userId[k]!.length + b.anonymousId[k]!.length
      + b.currency[k]!.length + b.orderId[k]!.length + b.channel[k]!.length + b.platform[k]!.length + b.campaignId[k]!.length
      + b.variant[k]!.length + b.triggerId[k]!.length;
    if (p === undefined) b.reject(k, Reject.bad_encoding, 'props is not a JSON object');
  }
  return n;
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
 * columns dictionary-encoded with one dictionary for the whole file, `ts` as timestamp(ms),
 * `amount` float64, `props` map<utf8, utf8>. Absent values are nulls. Returns the rows written.
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

/** props as map<utf8, utf8> (keys and values utf8; values nullable), the type convert writes. */
const PROPS_TYPE = new Map_<Utf8, Utf8>(new Field('entries', new Struct<{ key: Utf8; value: Utf8 }>([new Field('key', new Utf8(), false), new Field('value', new Utf8(), true)]), false));

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
  cols['props'] = vectorFromArray(rows.map(({ b, i }) => (b.props[i] == null ? null : new Map(Object.entries(b.props[i]!)))), PROPS_TYPE);
  const ordered: Record<string, Vector<DataType>> = {};
  for (const c of ARROW_EVENT_COLUMNS) ordered[c] = cols[c]!;
  return new Table(ordered);
}
