/**
 * CSV (and whitespace-separated) event files with a column mapping (CLI `backfill --format csv
 * --map FILE`, SPEC §9).
 *
 * A map says where each event field (§1) comes from:
 *
 * ```json
 * {
 *   "$comment": "anything: ignored",
 *   "event_id": {"generate": "line"},
 *   "ts": "InvoiceDate",
 *   "type": {"const": "purchase"},
 *   "user_id": "CustomerID",
 *   "amount": {"column": "Price"},
 *   "props": {"sku": "StockCode", "country": {"column": "Country", "values": {"EIRE": "Ireland"}}},
 *   "_csv": {"delimiter": ",", "header": true}
 * }
 * ```
 *
 * - `"column name"` — the cell of that column, as is;
 * - `{"const": "value"}` — the same value on every row;
 * - `{"column": "name", "values": {"from": "to", …}}` — the cell, translated through `values`
 *   (cells not listed pass through unchanged), e.g. REES46's `view` → `page_view`;
 * - `{"generate": "line"}` — `event_id` only: `<file base name>:<line number>`. Deterministic, so
 *   re-running a backfill of the same file de-duplicates instead of double counting; two inputs
 *   with the same base name would collide, so give event files distinct names.
 *
 * `event_id`, `type` and `ts` are required (every row would be rejected without them). `props`
 * maps prop names to the same kinds of source. Empty cells are "absent": '' for strings, NaN for
 * `ts`/`amount` (validation decides whether that is allowed), and no entry for a prop.
 *
 * `_csv` (all optional): `delimiter` `","` (default), `";"`, `"\t"`, `"|"` or `"whitespace"` (runs of
 * spaces/tabs, leading and trailing ones ignored, no quoting: CDNOW's fixed-width text);
 * `header` (default true) — whether the first line names the columns; `columns` — the column names
 * when `header` is false (required then, refused otherwise).
 *
 * Without a map, columns are named as the §1 fields; other columns become props of the same name.
 *
 * Cells are text: `ts` goes through {@link parseTimestamp} (ms, ISO-8601, `yyyymmdd`; zone-less
 * values in `--tz`), `amount` must be a plain decimal (`12.5`, not `1,234` or `0x10`).
 *
 * @module
 */
import { Buffer } from 'node:buffer';
import { createReadStream } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { type InfoRecord, type Options as CsvParseOptions, parse as csvParse } from 'csv-parse';
import { z } from 'zod';
import type { EventColumns } from '../batch.js';
import { CrmError } from '../errors.js';
import { Reject } from '../event-types.js';
import { assertTimeZone, parseDecimal, parseTimestamp } from '../codec.js';

/** The §1 fields a CSV column can feed, in `EventColumns.push` order (props aside). */
export const EVENT_FIELDS = [
  'event_id', 'type', 'user_id', 'anonymous_id', 'ts', 'amount', 'currency', 'order_id', 'channel',
  'platform', 'campaign_id', 'variant', 'trigger_id',
] as const;
export type EventField = (typeof EVENT_FIELDS)[number];

const REQUIRED: readonly EventField[] = ['event_id', 'type', 'ts'];

/** Where one value comes from. `column`/`values` are set for kind `column`, `value` for `const`. */
export interface FieldSource {
  readonly kind: 'column' | 'const' | 'generate';
  readonly column: string;
  readonly value: string;
  readonly values: ReadonlyMap<string, string> | null;
}

export type CsvDelimiter = ',' | ';' | '\t' | '|' | 'whitespace';

export interface CsvFormat {
  readonly delimiter: CsvDelimiter;
  readonly header: boolean;
  /** Column names when there is no header row; null with a header. */
  readonly columns: readonly string[] | null;
}

/** A validated column map (see the module comment). */
export interface ColumnMap {
  readonly fields: Readonly<Partial<Record<EventField, FieldSource>>>;
  readonly props: Readonly<Record<string, FieldSource>>;
  readonly csv: CsvFormat;
}

export const DEFAULT_CSV_FORMAT: CsvFormat = Object.freeze({ delimiter: ',', header: true, columns: null });

// ---------------------------------------------------------------------------------------------
// Map validation
// ---------------------------------------------------------------------------------------------

const SOURCE_FORMS = '"<column name>", {"const": "<value>"} or {"column": "<name>", "values": {"<from>": "<to>"}}';

const ConstSpec = z.strictObject({ const: z.string({ error: 'must be a string' }) });
const ColumnSpec = z.strictObject({
  column: z.string({ error: 'must be a column name' }).min(1, 'must be a non-empty column name'),
  values: z.record(z.string(), z.string({ error: 'translated values must be strings' })).optional(),
});
const GenerateSpec = z.strictObject({
  generate: z.literal('line', { error: 'the only generator is "line" (<file name>:<line number>)' }),
});

/** Optional sources are wrapped in `.optional()` by the caller (zod then skips absent keys). */
function sourceSchema(what: string, allowGenerate: boolean) {
  const forms = allowGenerate ? `${SOURCE_FORMS} or {"generate": "line"}` : SOURCE_FORMS;
  return z.unknown().transform((v, ctx): FieldSource => {
    if (v === undefined) {
      ctx.addIssue({ code: 'custom', message: `required: say where ${what} comes from, as ${forms}` });
      return z.NEVER;
    }
    if (typeof v === 'string') {
      if (v !== '') return Object.freeze({ kind: 'column', column: v, value: '', values: null });
      ctx.addIssue({ code: 'custom', message: 'must be a non-empty column name' });
      return z.NEVER;
    }
    if (v !== null && typeof v === 'object' && !Array.isArray(v)) {
      const sub = 'const' in v ? ConstSpec : 'column' in v ? ColumnSpec : 'generate' in v ? GenerateSpec : null;
      if (sub === GenerateSpec && !allowGenerate) {
        ctx.addIssue({ code: 'custom', message: `only event_id can be generated; use ${forms}` });
        return z.NEVER;
      }
      if (sub !== null) {
        const r = sub.safeParse(v);
        if (!r.success) {
          for (const issue of r.error.issues) ctx.addIssue({ code: 'custom', message: issue.message, path: issue.path });
          return z.NEVER;
        }
        const d = r.data as { const?: string; column?: string; values?: Record<string, string>; generate?: string };
        if (d.generate !== undefined) return Object.freeze({ kind: 'generate', column: '', value: '', values: null });
        if (d.const !== undefined) return Object.freeze({ kind: 'const', column: '', value: d.const, values: null });
        return Object.freeze({
          kind: 'column', column: d.column as string, value: '',
          values: d.values === undefined ? null : new Map(Object.entries(d.values)),
        });
      }
    }
    ctx.addIssue({ code: 'custom', message: `must be ${forms}` });
    return z.NEVER;
  });
}

const CsvOptionsSchema = z.strictObject({
  delimiter: z.enum([',', ';', '\t', '|', 'whitespace'], { error: 'must be ",", ";", "\\t", "|" or "whitespace"' }).default(','),
  header: z.boolean({ error: 'must be true (the first line names the columns) or false' }).default(true),
  columns: z.array(z.string().min(1, 'column names must be non-empty'), { error: 'must be an array of column names' }).min(1).optional(),
}, { error: (iss) => (iss.code === 'unrecognized_keys' ? 'unknown option: _csv takes delimiter, header, columns' : undefined) })
  .superRefine((c, ctx) => {
    if (!c.header && c.columns === undefined) ctx.addIssue({ code: 'custom', path: ['columns'], message: 'required when header is false: the names of the columns, in file order' });
    if (c.header && c.columns !== undefined) ctx.addIssue({ code: 'custom', path: ['columns'], message: 'only allowed with "header": false (the header row names the columns)' });
  });

const fieldShape: Record<string, z.ZodType> = {};
for (const f of EVENT_FIELDS) {
  const src = sourceSchema(f, f === 'event_id');
  fieldShape[f] = REQUIRED.includes(f) ? src : src.optional();
}

const MapSchema = z.strictObject({
  ...fieldShape,
  props: z.record(z.string().min(1, 'prop names must be non-empty'), sourceSchema('the prop', false), { error: 'must be an object: {"<prop name>": <source>}' }).optional(),
  _csv: CsvOptionsSchema.optional(),
  $comment: z.union([z.string(), z.array(z.string())]).optional(),
}, {
  error: (iss) => {
    if (iss.code === 'unrecognized_keys') return `unknown key: keys are event fields (${EVENT_FIELDS.join(', ')}), "props", "_csv" or "$comment"`;
    if (iss.code === 'invalid_type') return 'a column map must be a JSON object';
    return undefined;
  },
});

/**
 * Validates a column map (parsed JSON) into a {@link ColumnMap}.
 * @throws CrmError SOURCE_MAP_INVALID listing every problem with its path and how to fix it.
 * @example parseMap({ event_id: { generate: 'line' }, ts: 'InvoiceDate', type: { const: 'purchase' }, user_id: 'CustomerID' })
 */
export function parseMap(json: unknown): ColumnMap {
  const r = MapSchema.safeParse(json);
  if (!r.success) {
    const at = (path: readonly PropertyKey[]) => (path.length > 0 ? path.map(String).join('.') : '(map)');
    // One line per unknown key, at the key's own path (zod reports them together at the parent).
    const lines = r.error.issues.flatMap((i) => (i.code === 'unrecognized_keys'
      ? i.keys.map((k) => `  ${at([...i.path, k])}: ${i.message}`)
      : [`  ${at(i.path)}: ${i.message}`]));
    throw new CrmError('SOURCE_MAP_INVALID', `invalid column map:\n${lines.join('\n')}`);
  }
  const d = r.data as Record<string, unknown>;
  const fields: Partial<Record<EventField, FieldSource>> = {};
  for (const f of EVENT_FIELDS) {
    const src = d[f] as FieldSource | undefined;
    if (src !== undefined) fields[f] = src;
  }
  const csv = d['_csv'] as { delimiter: CsvDelimiter; header: boolean; columns?: string[] } | undefined;
  return Object.freeze({
    fields: Object.freeze(fields),
    props: Object.freeze({ ...((d['props'] as Record<string, FieldSource> | undefined) ?? {}) }),
    csv: csv === undefined ? DEFAULT_CSV_FORMAT : Object.freeze({
      delimiter: csv.delimiter, header: csv.header, columns: csv.columns === undefined ? null : Object.freeze([...csv.columns]),
    }),
  });
}

/**
 * Reads and validates a map file (`--map FILE`).
 * @throws CrmError SOURCE_IO when unreadable, SOURCE_MAP_INVALID when not JSON or not a valid map.
 * @example const map = await readMapFile('examples/maps/rees46.json');
 */
export async function readMapFile(file: string): Promise<ColumnMap> {
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch (err) {
    throw new CrmError('SOURCE_IO', `cannot read column map ${file}`, { cause: err });
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (err) {
    throw new CrmError('SOURCE_MAP_INVALID', `column map ${file} is not valid JSON: ${(err as Error).message}`, { cause: err });
  }
  try {
    return parseMap(json);
  } catch (err) {
    if (err instanceof CrmError) throw new CrmError('SOURCE_MAP_INVALID', `${file}: ${err.message}`, { cause: err });
    throw err;
  }
}

/**
 * The map used when none is given: header columns named as §1 fields feed those fields, every
 * other column becomes a prop of the same name.
 * @throws CrmError SOURCE_MAP_INVALID when the header lacks event_id, type or ts.
 * @example defaultColumnMap(['event_id', 'type', 'user_id', 'ts', 'coupon']) // props.coupon ← coupon
 */
export function defaultColumnMap(header: readonly string[]): ColumnMap {
  const fields: Partial<Record<EventField, FieldSource>> = {};
  const props: Record<string, FieldSource> = {};
  for (const name of header) {
    if (name === '') continue;
    const src: FieldSource = Object.freeze({ kind: 'column', column: name, value: '', values: null });
    if ((EVENT_FIELDS as readonly string[]).includes(name)) fields[name as EventField] ??= src;
    else if (!Object.hasOwn(props, name)) defineOwn(props, name, src);
  }
  const missing = REQUIRED.filter((f) => fields[f] === undefined);
  if (missing.length > 0) {
    throw new CrmError('SOURCE_MAP_INVALID',
      `the CSV header has no ${missing.join(', ')} column (columns: ${header.join(', ')}); name the columns as the event fields or pass --map (e.g. "event_id": {"generate": "line"})`);
  }
  return Object.freeze({ fields: Object.freeze(fields), props: Object.freeze(props), csv: DEFAULT_CSV_FORMAT });
}

function defineOwn<T>(obj: Record<string, T>, key: string, value: T): void {
  // `__proto__` as a key must be a plain own property, not a prototype swap.
  Object.defineProperty(obj, key, { value, enumerable: true, writable: true, configurable: true });
}

// ---------------------------------------------------------------------------------------------
// Row appender
// ---------------------------------------------------------------------------------------------

/**
 * Appends one CSV record as one row; returns the row index.
 * - `lineNo`: the record's line in the file (origin `<source>:<lineNo>`, and the generated id);
 * - `raw`: the record's text, for dead letters (default: the fields joined by the delimiter);
 * - `error`: non-empty when the CSV parser could not read the record (unbalanced quotes, …): the
 *   row is `bad_encoding` with that detail. {@link readCsvFile} passes all five arguments.
 */
export type CsvAppender = (batch: EventColumns, record: readonly string[], lineNo: number, raw?: string, error?: string) => number;

/** Column index meaning "no column": the slot's value is `constVal` ('' when unmapped). */
const NO_COLUMN = -1;

const F_EVENT_ID = 0;
const F_TYPE = 1;
const F_USER_ID = 2;
const F_ANONYMOUS_ID = 3;
const F_TS = 4;
const F_AMOUNT = 5;
const F_CURRENCY = 6;
const F_ORDER_ID = 7;
const F_CHANNEL = 8;
const F_PLATFORM = 9;
const F_CAMPAIGN_ID = 10;
const F_VARIANT = 11;
const F_TRIGGER_ID = 12;

/**
 * A map resolved against one file's header, decided once per file: per slot a column index (or
 * NO_COLUMN), a constant and an optional translation table. The per-row code only indexes arrays.
 */
class CsvPlan {
  private readonly col: Int32Array;
  private readonly constVal: string[];
  private readonly values: (ReadonlyMap<string, string> | null)[];
  private readonly propNames: string[];
  private readonly propCol: Int32Array;
  private readonly propConst: string[];
  private readonly propValues: (ReadonlyMap<string, string> | null)[];
  private readonly generateId: boolean;
  private readonly width: number;
  private readonly joiner: string;
  private readonly tsColumn: string;
  private readonly amountColumn: string;

  constructor(map: ColumnMap, header: readonly string[], private readonly tz: string, private readonly source: string) {
    const index = new Map<string, number>();
    header.forEach((name, i) => {
      if (!index.has(name)) index.set(name, i);
    });
    const missing: string[] = [];
    const resolve = (src: FieldSource, where: string): number => {
      if (src.kind !== 'column') return NO_COLUMN;
      const i = index.get(src.column);
      if (i === undefined) {
        missing.push(`${where} → "${src.column}"`);
        return NO_COLUMN;
      }
      return i;
    };
    const n = EVENT_FIELDS.length;
    this.col = new Int32Array(n).fill(NO_COLUMN);
    this.constVal = new Array<string>(n).fill('');
    this.values = new Array<ReadonlyMap<string, string> | null>(n).fill(null);
    let generate = false;
    EVENT_FIELDS.forEach((f, slot) => {
      const src = map.fields[f];
      if (src === undefined) return;
      if (src.kind === 'generate') generate = true;
      this.col[slot] = resolve(src, f);
      this.constVal[slot] = src.value;
      this.values[slot] = src.values;
    });
    this.generateId = generate;
    this.propNames = Object.keys(map.props);
    this.propCol = new Int32Array(this.propNames.length);
    this.propConst = [];
    this.propValues = [];
    this.propNames.forEach((name, k) => {
      const src = map.props[name] as FieldSource;
      this.propCol[k] = resolve(src, `props.${name}`);
      this.propConst.push(src.value);
      this.propValues.push(src.values);
    });
    if (missing.length > 0) {
      throw new CrmError('SOURCE_MAP_INVALID',
        `column map names column(s) not in the header: ${missing.join(', ')} (columns: ${header.join(', ')})`);
    }
    this.width = header.length;
    this.joiner = map.csv.delimiter === 'whitespace' ? ' ' : map.csv.delimiter;
    const tsSrc = map.fields.ts;
    const amountSrc = map.fields.amount;
    this.tsColumn = tsSrc?.kind === 'column' ? tsSrc.column : 'ts';
    this.amountColumn = amountSrc?.kind === 'column' ? amountSrc.column : 'amount';
  }

  private cell(record: readonly string[], slot: number): string {
    const c = this.col[slot] as number;
    if (c === NO_COLUMN) return this.constVal[slot] as string;
    const v = record[c] as string;
    const tr = this.values[slot] as ReadonlyMap<string, string> | null;
    return tr === null ? v : (tr.get(v) ?? v);
  }

  append(batch: EventColumns, record: readonly string[], lineNo: number, raw: string | undefined, error: string | undefined): number {
    if (batch.length >= batch.capacity) {
      throw new RangeError(`EventColumns batch is full (${batch.capacity} rows): flush it before appending`);
    }
    const origin = `${this.source}:${lineNo}`;
    const text = raw ?? record.join(this.joiner);
    const size = Buffer.byteLength(text, 'utf8');
    if (error !== undefined && error !== '') {
      return batch.pushUndecodable(text, size, origin, Reject.bad_encoding, error);
    }
    if (record.length !== this.width) {
      return batch.pushUndecodable(text, size, origin, Reject.bad_encoding, `expected ${this.width} fields, got ${record.length}`);
    }
    let code = 0;
    let detail = '';
    const tsText = this.cell(record, F_TS);
    let ts = Number.NaN;
    if (tsText !== '') {
      ts = parseTimestamp(tsText, this.tz);
      if (Number.isNaN(ts)) {
        code = Reject.bad_timestamp;
        detail = `ts (column ${this.tsColumn}): cannot parse ${JSON.stringify(tsText)}`;
      }
    }
    const amountText = this.cell(record, F_AMOUNT);
    let amount = Number.NaN;
    if (amountText.trim() !== '') {
      amount = parseDecimal(amountText);
      if (Number.isNaN(amount) && code === 0) {
        code = Reject.bad_amount;
        detail = `amount (column ${this.amountColumn}): not a number: ${JSON.stringify(amountText)}`;
      }
    }
    let props: Record<string, string> | null = null;
    const names = this.propNames;
    for (let k = 0; k < names.length; k++) {
      const c = this.propCol[k] as number;
      let v = c === NO_COLUMN ? (this.propConst[k] as string) : (record[c] as string);
      const tr = this.propValues[k] as ReadonlyMap<string, string> | null;
      if (tr !== null) v = tr.get(v) ?? v;
      if (v === '') continue;
      props ??= {};
      const name = names[k] as string;
      if (name === '__proto__') defineOwn(props, name, v);
      else props[name] = v;
    }
    const i = batch.push(
      this.generateId ? origin : this.cell(record, F_EVENT_ID),
      this.cell(record, F_TYPE), this.cell(record, F_USER_ID), this.cell(record, F_ANONYMOUS_ID),
      ts, amount, this.cell(record, F_CURRENCY), this.cell(record, F_ORDER_ID), this.cell(record, F_CHANNEL),
      this.cell(record, F_PLATFORM), this.cell(record, F_CAMPAIGN_ID), this.cell(record, F_VARIANT),
      this.cell(record, F_TRIGGER_ID), props, size, text, origin,
    );
    if (code !== 0) batch.reject(i, code, detail);
    return i;
  }
}

/**
 * Compiles `map` (or the default map when null) against a file's header into a row appender.
 * `source` names the file in origins (`<source>:<line>`) and generated ids — pass the base name.
 *
 * @throws CrmError SOURCE_MAP_INVALID when the map names a column the header lacks (or, without a
 * map, the header lacks event_id/type/ts); CONFIG_INVALID for an unknown `tz`.
 * @example
 * const append = createCsvAppender(map, header, 'Asia/Seoul', '2019-Oct.csv');
 * append(batch, ['2019-10-01 00:00:00 UTC', 'view', …], 2);
 */
export function createCsvAppender(map: ColumnMap | null, header: readonly string[], tz: string, source: string): CsvAppender {
  assertTimeZone(tz);
  const plan = new CsvPlan(map ?? defaultColumnMap(header), header, tz, source);
  return (batch, record, lineNo, raw, error) => plan.append(batch, record, lineNo, raw, error);
}

// ---------------------------------------------------------------------------------------------
// Streaming reader
// ---------------------------------------------------------------------------------------------

/**
 * Receives each record. `header` is the column names (from the header row or `_csv.columns`),
 * the same array for every call. `raw` is the record's text; `error` is non-empty for a record the
 * parser could not read (then `record` is empty): hand all five to a {@link CsvAppender} and it
 * becomes a `bad_encoding` row. Return a promise to pause reading until it settles — e.g. when the
 * batch is full and being processed — so memory stays bounded and `await` happens only at batch
 * boundaries.
 */
export type CsvRecordHandler = (
  record: string[], lineNo: number, header: readonly string[], raw: string, error: string,
) => void | Promise<void>;

export interface CsvReadStats {
  /** Lines in the file (including the header and blank lines). */
  lines: number;
  /** Records delivered, the malformed ones included; the header is not a record. */
  records: number;
  /** Records the parser could not read (delivered with `error`). */
  malformed: number;
}

/**
 * Streams a CSV file record by record, with bounded memory (one read chunk of records at a time),
 * honouring the map's `_csv` format (default: comma-separated with a header row). Blank lines are
 * skipped; a UTF-8 BOM is dropped; CRLF and LF both end lines. A record the parser cannot read
 * (unbalanced quote, …) is delivered with `error` set, and reading goes on; a record with the
 * wrong number of fields is delivered as is (the appender rejects it as `bad_encoding`).
 *
 * @throws CrmError SOURCE_IO when the file cannot be read; errors thrown (or rejected) by
 * `onRecord` stop reading and are passed on unchanged.
 * @example
 * let append: CsvAppender | null = null;
 * await readCsvFile(file, map, (record, line, header, raw, error) => {
 *   append ??= createCsvAppender(map, header, tz, path.basename(file));
 *   append(batch, record, line, raw, error);
 *   if (batch.full) return flush(batch); // a Promise: reading waits for it
 * });
 */
export async function readCsvFile(
  file: string, map: ColumnMap | null, onRecord: CsvRecordHandler, options: CsvReadOptions = {},
): Promise<CsvReadStats> {
  const format = map?.csv ?? DEFAULT_CSV_FORMAT;
  const stats: CsvReadStats = { lines: 0, records: 0, malformed: 0 };
  if (format.delimiter === 'whitespace') await readWhitespace(file, format, onRecord, stats);
  else await readDelimited(file, format, onRecord, stats, options.maxRecordChars ?? MAX_RECORD_CHARS);
  return stats;
}

export interface CsvReadOptions {
  /**
   * Longest record, in characters (default 8 Mi). A longer one is almost always an unclosed quote
   * swallowing the rest of the file; the file then fails with SOURCE_DECODE rather than being
   * buffered whole (csv-parse would otherwise drop everything after it without a word).
   */
  readonly maxRecordChars?: number;
}

const MAX_RECORD_CHARS = 8 << 20;

/** Line breaks (CRLF, LF or CR) in `s`, and how many of them are CRLF pairs; scratch results. */
let breaksFound = 0;
let crlfFound = 0;
function countBreaks(s: string): void {
  breaksFound = 0;
  crlfFound = 0;
  if (s.indexOf('\n') === -1 && s.indexOf('\r') === -1) return;
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i);
    if (c === 13) {
      breaksFound++;
      if (s.charCodeAt(i + 1) === 10) {
        crlfFound++;
        i++;
      }
    } else if (c === 10) {
      breaksFound++;
    }
  }
}

function isPromise(v: unknown): v is Promise<void> {
  return v !== undefined && v !== null && typeof (v as Promise<void>).then === 'function';
}

/** csv-parse's raw text can carry the previous line's CR or its own line ending; drop those. */
function stripLineEnds(s: string): string {
  let a = 0;
  let b = s.length;
  while (a < b && (s.charCodeAt(a) === 13 || s.charCodeAt(a) === 10)) a++;
  while (b > a && (s.charCodeAt(b - 1) === 13 || s.charCodeAt(b - 1) === 10)) b--;
  return a === 0 && b === s.length ? s : s.slice(a, b);
}

/**
 * `s` without leading CR/LF (left over from the previous record) and without a final LF: the
 * parser has counted every CR and LF of an unreadable record's raw text except a final LF.
 */
function withoutFinalLf(s: string): string {
  let a = 0;
  while (a < s.length && (s.charCodeAt(a) === 13 || s.charCodeAt(a) === 10)) a++;
  let b = s.length;
  if (b > a && s.charCodeAt(b - 1) === 10) b--;
  return a === 0 && b === s.length ? s : s.slice(a, b);
}

/** What the parser hands over per record (built by our `on_record`, in parse order). */
interface ParsedItem {
  record: string[];
  raw: string;
  /** The line where the record starts (1-based). */
  line: number;
}

interface Malformed {
  raw: string;
  line: number;
  error: string;
}

function readDelimited(
  file: string, format: CsvFormat, onRecord: CsvRecordHandler, stats: CsvReadStats, maxRecordChars: number,
): Promise<void> {
  return new Promise<void>((resolve, reject) => {
    const input = createReadStream(file);
    // csv-parse counts line breaks outside quotes right, but every CR and LF inside a quoted field
    // separately (a CRLF counts twice). `overcount` sums those extra counts so far; a record's
    // start line is its end line minus the breaks inside it. Computed in parse order (on_record
    // and 'skip' run while parsing), so unreadable records are numbered consistently too.
    let overcount = 0;
    const startLine = (endLine: number, fields: readonly string[]): number => {
      let breaks = 0;
      for (let k = 0; k < fields.length; k++) {
        countBreaks(fields[k] as string);
        breaks += breaksFound;
        overcount += crlfFound;
      }
      return endLine - overcount - breaks;
    };
    const parser = csvParse({
      delimiter: format.delimiter,
      bom: true,
      skip_empty_lines: true,
      // Ragged rows reach the appender, which rejects them one by one (bad_encoding) instead of
      // the parser failing the whole file; same for unreadable records (the 'skip' event).
      relax_column_count: true,
      relax_quotes: true,
      skip_records_with_error: true,
      max_record_size: maxRecordChars,
      raw: true,
      // With `raw`, csv-parse hands on_record {record, raw} (its typings only know string[]).
      on_record: ((rec: { record: string[]; raw: string }, ctx: InfoRecord): ParsedItem => ({
        record: rec.record, raw: rec.raw, line: startLine(ctx.lines, rec.record),
      })) as unknown as CsvParseOptions['on_record'],
    });
    let header: readonly string[] | null = format.header ? null : (format.columns as readonly string[]);
    // Unreadable records arrive through 'skip' while the parser runs, possibly while we wait on
    // onRecord: they queue here (at most one input chunk's worth) and are delivered in order.
    const malformed: Malformed[] = [];
    let waiting = false;
    let ended = false;
    let settled = false;

    const fail = (err: unknown): void => {
      if (settled) return;
      settled = true;
      input.destroy();
      parser.destroy();
      reject(err);
    };
    const resume = (): void => {
      waiting = false;
      pump();
    };
    const deliver = (record: string[], line: number, raw: string, error: string): boolean => {
      const r = onRecord(record, line, header as readonly string[], raw, error);
      if (!isPromise(r)) return false;
      waiting = true;
      r.then(resume, fail);
      return true;
    };
    // The next good record, read but not yet delivered: unreadable records with a smaller line
    // number go first, so rows reach the handler in file order.
    let held: ParsedItem | null = null;
    const pump = (): void => {
      if (waiting || settled) return;
      try {
        for (;;) {
          if (held === null) held = parser.read() as ParsedItem | null;
          const bad = malformed[0];
          const badFirst = bad !== undefined && (held === null || bad.line < held.line);
          if (header === null) {
            if (badFirst) throw new CrmError('SOURCE_DECODE', `cannot read the header row of ${file}: ${(bad as Malformed).error}`);
            if (held === null) break;
            header = held.record.map((h) => h.trim());
            held = null;
            continue;
          }
          if (badFirst) {
            malformed.shift();
            stats.records++;
            stats.malformed++;
            if (deliver([], bad.line, bad.raw, bad.error)) return;
            continue;
          }
          if (held === null) break;
          const item: ParsedItem = held;
          held = null;
          stats.records++;
          if (deliver(item.record, item.line, stripLineEnds(item.raw), '')) return;
        }
      } catch (err) {
        fail(err);
        return;
      }
      if (ended && held === null && malformed.length === 0) {
        settled = true;
        stats.lines = parser.info.lines - overcount;
        resolve();
      }
    };

    parser.on('skip', (err: Error & { code?: string; lines?: number }, raw?: string) => {
      if (err.code === 'CSV_MAX_RECORD_SIZE') {
        fail(new CrmError('SOURCE_DECODE',
          `${file}: a record starting before line ${err.lines ?? '?'} exceeds ${maxRecordChars} characters (an unclosed quote?)`, { cause: err }));
        return;
      }
      const text = raw ?? '';
      const line = startLine(err.lines ?? 0, [withoutFinalLf(text)]);
      malformed.push({ raw: stripLineEnds(text), line, error: `CSV: ${err.message}` });
    });
    parser.on('readable', pump);
    parser.on('end', () => {
      ended = true;
      pump();
    });
    parser.on('error', (err) => fail(new CrmError('SOURCE_DECODE', `cannot parse ${file}: ${err.message}`, { cause: err })));
    input.on('error', (err) => fail(new CrmError('SOURCE_IO', `cannot read ${file}: ${err.message}`, { cause: err })));
    input.pipe(parser);
  });
}

const WHITESPACE_RE = /\s+/;

/**
 * Whitespace-separated text (CDNOW): fields are runs of non-blank characters, no quoting. Not
 * csv-parse: its delimiters are fixed strings, and runs of spaces would yield empty fields.
 */
function readWhitespace(file: string, format: CsvFormat, onRecord: CsvRecordHandler, stats: CsvReadStats): Promise<void> {
  return new Promise<void>((resolve, reject) => {
    const input = createReadStream(file, { encoding: 'utf8' });
    let header: readonly string[] | null = format.header ? null : (format.columns as readonly string[]);
    let queue: string[] = [];
    let next = 0;
    let carry = '';
    let lineNo = 0;
    let first = true;
    let waiting = false;
    let ended = false;
    let settled = false;

    const fail = (err: unknown): void => {
      if (settled) return;
      settled = true;
      input.destroy();
      reject(err);
    };
    const finishOrResume = (): void => {
      if (waiting || settled) return;
      if (ended) {
        settled = true;
        stats.lines = lineNo;
        resolve();
      } else {
        input.resume();
      }
    };
    const drain = (): void => {
      try {
        while (next < queue.length) {
          const line = (queue[next++] as string).trim(); // also drops the CR of CRLF
          lineNo++;
          if (line === '') continue;
          const fields = line.split(WHITESPACE_RE);
          if (header === null) {
            header = fields;
            continue;
          }
          stats.records++;
          const r = onRecord(fields, lineNo, header, line, '');
          if (isPromise(r)) {
            waiting = true;
            input.pause();
            r.then(() => {
              waiting = false;
              drain();
              finishOrResume();
            }, fail);
            return;
          }
        }
      } catch (err) {
        fail(err);
      }
    };

    input.on('data', (chunk: string | Buffer) => {
      let text = carry + (typeof chunk === 'string' ? chunk : chunk.toString('utf8'));
      if (first) {
        first = false;
        if (text.charCodeAt(0) === 0xfeff) text = text.slice(1);
      }
      const lines = text.split('\n');
      carry = lines.pop() as string;
      if (next >= queue.length) {
        queue = lines;
        next = 0;
      } else {
        for (const l of lines) queue.push(l);
      }
      if (!waiting) drain();
    });
    input.on('end', () => {
      ended = true;
      if (carry !== '') {
        queue.push(carry);
        carry = '';
      }
      if (!waiting) drain();
      finishOrResume();
    });
    input.on('error', (err) => fail(new CrmError('SOURCE_IO', `cannot read ${file}: ${err.message}`, { cause: err })));
  });
}
