import { createWriteStream, type WriteStream } from 'node:fs';
import { once } from 'node:events';
import { Bool, Dictionary, Float64, Int32, Table, Utf8, tableToIPC, vectorFromArray, type Vector } from 'apache-arrow';

/**
 * Row exports in the formats of SPEC §9: jsonl (one object a line), csv (header + rows, RFC 4180
 * quoting, null = empty cell) and Arrow IPC (file format; typed columns: strings dictionary-encoded,
 * numbers float64 with nulls, booleans as Bool). Every row of one export has the same keys.
 */
export type ExportFormat = 'jsonl' | 'csv' | 'arrow';
export const EXPORT_FORMATS: readonly ExportFormat[] = ['jsonl', 'csv', 'arrow'];

/** One CSV cell (RFC 4180 quoting; null and undefined are empty). */
export function csvCell(v: unknown): string {
  if (v === null || v === undefined) return '';
  const s = String(v);
  return /[",\n\r]/.test(s) ? `"${s.replace(/"/g, '""')}"` : s;
}

/** An Arrow table from uniform rows; column types from the values (a column of only nulls is float64). */
export function rowsToArrow(rows: readonly Record<string, unknown>[], columns: readonly string[]): Table {
  const vectors: Record<string, Vector> = {};
  for (const col of columns) {
    const values = rows.map((r) => r[col] ?? null);
    const sample = values.find((v) => v !== null);
    if (typeof sample === 'string') vectors[col] = vectorFromArray(values as (string | null)[], new Dictionary(new Utf8(), new Int32()));
    else if (typeof sample === 'boolean') vectors[col] = vectorFromArray(values as (boolean | null)[], new Bool());
    else vectors[col] = vectorFromArray(values as (number | null)[], new Float64());
  }
  return new Table(vectors);
}

/** Writes rows to `out` (a file path) or stdout, honouring the stream's backpressure. */
export async function writeRows(rows: readonly object[], columns: readonly string[], format: ExportFormat, out: string | undefined): Promise<void> {
  const stream: WriteStream | NodeJS.WriteStream = out === undefined ? process.stdout : createWriteStream(out);
  try {
    if (format === 'arrow') {
      const bytes = tableToIPC(rowsToArrow(rows as Record<string, unknown>[], columns), 'file');
      if (!stream.write(bytes)) await once(stream, 'drain');
      return;
    }
    if (format === 'csv' && !stream.write(columns.join(',') + '\n')) await once(stream, 'drain');
    for (const row of rows as Record<string, unknown>[]) {
      const line = format === 'jsonl' ? JSON.stringify(row) + '\n' : columns.map((c) => csvCell(row[c])).join(',') + '\n';
      if (!stream.write(line)) await once(stream, 'drain');
    }
  } finally {
    if (stream !== process.stdout) await new Promise<void>((resolve, reject) => (stream as WriteStream).end((err?: Error | null) => (err ? reject(err) : resolve())));
  }
}
