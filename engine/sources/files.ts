import { createReadStream } from 'node:fs';
import path from 'node:path';
import { createInterface } from 'node:readline';
import { EventColumns } from '../batch.js';
import type { SourceItem } from '../engine.js';
import { CrmError } from '../errors.js';
import { appendJsonEvent } from '../codec.js';
import { createCsvAppender, readCsvFile, type ColumnMap, type CsvAppender } from './csv.js';

/**
 * Backfill input: event files read, then handed to the engine in event-time order (SPEC §9:
 * "processes the files in event-time order"), so history replays without `too_late` rejects.
 *
 * The rows of all files are decoded once into column chunks; a stable sort by event time (ties:
 * file order, then line order; undecodable rows first) gives the processing order. The position
 * stored with each checkpoint is the number of rows of that order already processed: on restart
 * the same files give the same order, and processing resumes right after the checkpoint.
 *
 * Memory: the decoded rows are held while the backfill runs (a few hundred bytes each). Inputs
 * larger than memory go through the Arrow path (bounded batches), or pre-sorted chunks.
 */

const CHUNK = 1 << 16;

export type InputFormat = 'jsonl' | 'csv';

export interface InputOptions {
  readonly format: InputFormat;
  /** Column mapping for CSV (`--map`); null = columns named as the event fields. */
  readonly map: ColumnMap | null;
  /** Zone for timestamps without an offset (`--tz`). */
  readonly tz: string;
  /** Called with the number of rows read so far (progress bars). */
  readonly onRead?: (rows: number) => void;
}

export interface BackfillPosition {
  /** Rows of the sorted input already processed. */
  readonly row: number;
  /** Total rows: a restart with different files is detected, not silently mis-resumed. */
  readonly of: number;
}

export class SortedInput {
  private constructor(
    private readonly chunks: EventColumns[],
    /** Global row index (chunk * CHUNK + row) in processing order. */
    private readonly order: Uint32Array,
  ) {}

  get total(): number {
    return this.order.length;
  }

  static async load(files: readonly string[], opts: InputOptions): Promise<SortedInput> {
    const chunks: EventColumns[] = [new EventColumns(CHUNK)];
    let rows = 0;
    const room = (): EventColumns => {
      let c = chunks[chunks.length - 1]!;
      if (c.full) {
        c = new EventColumns(CHUNK);
        chunks.push(c);
      }
      rows++;
      if (opts.onRead !== undefined && (rows & 0xffff) === 0) opts.onRead(rows);
      return c;
    };
    for (const file of files) {
      const name = path.basename(file);
      try {
        if (opts.format === 'jsonl') {
          const lines = createInterface({ input: createReadStream(file, { encoding: 'utf8' }), crlfDelay: Infinity });
          let lineNo = 0;
          for await (const line of lines) {
            lineNo++;
            if (line.trim().length === 0) continue; // blank lines are not events
            appendJsonEvent(room(), line, `${name}:${lineNo}`, opts.tz);
          }
        } else {
          let append: CsvAppender | null = null;
          await readCsvFile(file, opts.map, (record, lineNo, header, raw, error) => {
            append ??= createCsvAppender(opts.map, header, opts.tz, name);
            append(room(), record, lineNo, raw, error);
          });
        }
      } catch (err) {
        if (err instanceof CrmError) throw err;
        throw new CrmError('SOURCE_IO', `cannot read ${file}`, { cause: err });
      }
    }
    opts.onRead?.(rows);
    // Every chunk but the last is full, so row k of the input is global index k (chunk k / CHUNK).
    const keys = new Float64Array(rows);
    let k = 0;
    for (const chunk of chunks) {
      for (let i = 0; i < chunk.length; i++) {
        const t = chunk.ts[i]!;
        keys[k++] = Number.isNaN(t) ? Number.NEGATIVE_INFINITY : t;
      }
    }
    // Sort by (ts, input order): the index tie-break makes it stable by construction.
    const idx = Array.from({ length: rows }, (_, j) => j);
    idx.sort((a, b) => keys[a]! - keys[b]! || a - b);
    return new SortedInput(chunks, Uint32Array.from(idx));
  }

  /** Calls `fn(chunk, row)` for every row in processing order (convert writes them out). */
  forEachRow(fn: (chunk: EventColumns, row: number) => void): void {
    for (const g of this.order) fn(this.chunks[Math.floor(g / CHUNK)]!, g % CHUNK);
  }

  /**
   * The batches from `startRow` on, each with the position just after it. One batch object is
   * reused: the consumer must be done with a batch before it pulls the next (Engine.run is).
   */
  *batches(startRow: number, batchRows: number): Generator<SourceItem> {
    const total = this.order.length;
    const b = new EventColumns(Math.max(1, Math.min(batchRows, total)));
    for (let start = startRow; start < total; start += batchRows) {
      const end = Math.min(total, start + batchRows);
      b.reset();
      for (let j = start; j < end; j++) {
        const g = this.order[j]!;
        b.pushFrom(this.chunks[Math.floor(g / CHUNK)]!, g % CHUNK);
      }
      const position: BackfillPosition = { row: end, of: total };
      yield { kind: 'batch', batch: b, position };
    }
  }
}
