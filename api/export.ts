import { createWriteStream, existsSync, type WriteStream } from 'node:fs';
import { rm } from 'node:fs/promises';
import { once } from 'node:events';
import path from 'node:path';
import { AsyncByteQueue, RecordBatchFileWriter, RecordBatchStreamWriter, Table, tableToIPC, type RecordBatch } from 'apache-arrow';
import { ArrowRowBuilder, type ExportSchema } from '../engine/arrow-export.js';
import { META_KEY } from '../engine/engine.js';
import { CrmError, cleanupAll } from '../engine/errors.js';
import { LevelStore } from '../state/level.js';

/**
 * Row exports in the formats of SPEC §9:
 * - `jsonl`: one object a line, the rows as they are;
 * - `csv`: header + rows, RFC 4180 quoting, null = empty cell, lists and maps as JSON text;
 * - `arrow`: Arrow IPC file format, `arrow-stream`: Arrow IPC stream format;
 * - `parquet`: Parquet (ZSTD-compressed), written by parquet-wasm from the same Arrow batches.
 * The Arrow and Parquet columns have the export's declared types (engine/arrow-export.ts), not
 * types guessed from the values. Rows are streamed: Arrow and Parquet output is built
 * {@link EXPORT_BATCH_ROWS} rows at a time, so an export of millions of profiles never holds them all.
 */
export type ExportFormat = 'jsonl' | 'csv' | 'arrow' | 'arrow-stream' | 'parquet';
export const EXPORT_FORMATS: readonly ExportFormat[] = ['jsonl', 'csv', 'arrow', 'arrow-stream', 'parquet'];

/**
 * Rows per Arrow record batch (and so per write) in Arrow / Parquet output: large enough that the
 * per-batch overhead (message headers, a wasm hand-over for Parquet) is noise, small enough that a
 * batch of the widest export (KPI rows, ~30 columns) stays a few MB.
 */
export const EXPORT_BATCH_ROWS = 65_536;

/** One CSV cell (RFC 4180 quoting; null and undefined are empty; arrays and objects as JSON). */
export function csvCell(v: unknown): string {
  if (v === null || v === undefined) return '';
  const s = typeof v === 'object' ? JSON.stringify(v) : String(v);
  return /[",\n\r]/.test(s) ? `"${s.replace(/"/g, '""')}"` : s;
}

/** Rows → batches of at most `batchRows`; at least one batch (empty for no rows), so a writer always has the schema. */
async function* toBatches(rows: AsyncIterable<object> | Iterable<object>, builder: ArrowRowBuilder, batchRows: number): AsyncGenerator<RecordBatch> {
  let any = false;
  for await (const r of rows) {
    builder.append(r as Record<string, unknown>);
    if (builder.length >= batchRows) {
      any = true;
      yield builder.flush();
    }
  }
  if (builder.length > 0 || !any) yield builder.flush();
}

/**
 * The byte sink of an Arrow IPC writer: keeps what the writer emits until it is taken, so the
 * caller can hand each batch's bytes to its output with backpressure (apache-arrow's own queue
 * would buffer the whole export while the output is slow). The chunks reference the batch's
 * buffers: they are written out before the next batch is built.
 */
class ChunkSink extends AsyncByteQueue {
  private chunks: Uint8Array[] = [];

  override write(value: Parameters<AsyncByteQueue['write']>[0]): void {
    if (!ArrayBuffer.isView(value)) throw new TypeError('the Arrow IPC writer emitted a non-binary chunk');
    if (value.byteLength > 0) this.chunks.push(new Uint8Array(value.buffer, value.byteOffset, value.byteLength));
  }

  take(): Uint8Array[] {
    const out = this.chunks;
    this.chunks = [];
    return out;
  }
}

type Put = (chunk: string | Uint8Array) => Promise<void>;

async function writeIpc(batches: AsyncIterable<RecordBatch>, builder: ArrowRowBuilder, kind: 'file' | 'stream', put: Put): Promise<void> {
  const sink = new ChunkSink();
  const writer = kind === 'file' ? new RecordBatchFileWriter() : new RecordBatchStreamWriter();
  writer.reset(sink, builder.schema);
  for await (const batch of batches) {
    if (batch.numRows > 0) writer.write(batch);
    for (const c of sink.take()) await put(c);
  }
  writer.finish();
  for (const c of sink.take()) await put(c);
}

/** parquet-wasm, loaded on first use: the wasm module compiles when it is imported. */
let parquetWasm: Promise<typeof import('parquet-wasm')> | null = null;

async function writeParquet(batches: AsyncIterable<RecordBatch>, put: Put): Promise<void> {
  const pw = await (parquetWasm ??= import('parquet-wasm'));
  const it = batches[Symbol.asyncIterator]();
  // parquet-wasm reports an error of its source as "Dyn casting error": keep ours to rethrow it.
  let sourceError: unknown = null;
  // Pulled by the Parquet writer one batch at a time: each goes to wasm memory as an IPC stream.
  const source = new ReadableStream({
    async pull(controller): Promise<void> {
      try {
        const next = await it.next();
        if (next.done === true) {
          controller.close();
          return;
        }
        const table = pw.Table.fromIPCStream(tableToIPC(new Table([next.value]), 'stream'));
        for (const rb of table.recordBatches()) controller.enqueue(rb);
        table.free();
      } catch (err) {
        sourceError = err;
        controller.error(err);
      }
    },
  }, { highWaterMark: 0 });
  // Row groups of at most 4 batches: the writer holds a row group in wasm memory until it is full
  // (its default, 1M rows, would be ~100 MB of profiles), and 262,144 rows is still a large group for readers.
  const props = new pw.WriterPropertiesBuilder().setCompression(pw.Compression.ZSTD).setMaxRowGroupSize(4 * EXPORT_BATCH_ROWS)
    .setCreatedBy('crmstream').build();
  try {
    const parquet = await pw.transformParquetStream(source, props);
    for await (const chunk of parquet as ReadableStream<Uint8Array>) await put(chunk);
  } catch (err) {
    throw sourceError ?? err;
  }
}

/**
 * Writes an export's rows to `out` (a file path) or stdout in `format`, honouring the output's
 * backpressure. `schema` names the columns in order (csv header) and types them (Arrow, Parquet);
 * `batchRows` (default {@link EXPORT_BATCH_ROWS}) is the rows per Arrow / Parquet record batch.
 *
 * @example
 * await writeRows(await engine.kpis('month'), KPI_SCHEMA, 'parquet', 'kpis.parquet');
 */
export async function writeRows(
  rows: AsyncIterable<object> | Iterable<object>, schema: ExportSchema, format: ExportFormat, out: string | undefined,
  { batchRows = EXPORT_BATCH_ROWS }: { batchRows?: number } = {},
): Promise<void> {
  const stream: WriteStream | NodeJS.WriteStream = out === undefined ? process.stdout : createWriteStream(out);
  const put: Put = async (chunk) => {
    if (!stream.write(chunk)) await once(stream, 'drain');
  };
  try {
    if (format === 'jsonl' || format === 'csv') {
      const columns = Object.keys(schema);
      if (format === 'csv') await put(columns.join(',') + '\n');
      for await (const row of rows as AsyncIterable<Record<string, unknown>>) {
        await put(format === 'jsonl' ? JSON.stringify(row) + '\n' : columns.map((c) => csvCell(row[c])).join(',') + '\n');
      }
    } else {
      const builder = new ArrowRowBuilder(schema);
      const batches = toBatches(rows, builder, batchRows);
      if (format === 'parquet') await writeParquet(batches, put);
      else await writeIpc(batches, builder, format === 'arrow' ? 'file' : 'stream', put);
    }
  } catch (err) {
    if (out === undefined) throw err;
    // No half-written file is left behind to be mistaken for an export (an unknown segment, a failed
    // read). The failure itself goes first: alone if the cleanup works, with its errors if not.
    await cleanupAll([() => Promise.reject(err), () => endStream(stream as WriteStream), () => rm(out, { force: true })]);
    throw err;
  }
  if (out !== undefined) await endStream(stream as WriteStream);
}

function endStream(stream: WriteStream): Promise<void> {
  return new Promise<void>((resolve, reject) => stream.end((err?: Error | null) => (err ? reject(err) : resolve())));
}

/**
 * Refuses a data dir that holds no checkpoint, before anything opens it for the engine: opening a
 * LevelDB directory creates it, so a mistyped `--data-dir` would otherwise leave an empty store
 * behind and export no rows with exit 0. Checks, creating nothing: the directory exists, it has a
 * LevelDB store under `state/` (its CURRENT file), and that store holds the engine's checkpoint
 * record. A store open elsewhere fails here with STATE_LOCKED (state/level.ts).
 *
 * @throws CrmError STATE_NOT_FOUND naming the path tried and how to fix it.
 * @example
 * await assertCheckpoint('./state');   // then Engine.create({ dataDir: './state' }, …)
 */
export async function assertCheckpoint(dataDir: string): Promise<void> {
  const dir = path.resolve(dataDir);
  const stateDir = path.join(dir, 'state');
  const fix = 'pass the --data-dir a backfill or run wrote (the directory that holds state/), or build one first with `crmstream backfill --data-dir DIR --input FILE`';
  if (!existsSync(dir)) throw new CrmError('STATE_NOT_FOUND', `no data dir at ${dir}: ${fix}`);
  if (!existsSync(path.join(stateDir, 'CURRENT'))) throw new CrmError('STATE_NOT_FOUND', `${dir} holds no state store (no ${path.join(stateDir, 'CURRENT')}): ${fix}`);
  const store = new LevelStore(stateDir);
  await store.open();
  let meta: Uint8Array | undefined;
  let failure: unknown = null;
  try {
    meta = await store.get(META_KEY);
  } catch (err) {
    failure = err;
  }
  await cleanupAll([() => { if (failure !== null) throw failure; }, () => store.close()]);
  if (meta === undefined) throw new CrmError('STATE_NOT_FOUND', `the state store ${stateDir} holds no checkpoint (no ${META_KEY} record): ${fix}`);
}
