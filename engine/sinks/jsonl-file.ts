import { open, readdir, rename, unlink, type FileHandle } from 'node:fs/promises';
import { mkdirSync } from 'node:fs';
import path from 'node:path';
import { CrmError } from '../errors.js';
import type { OutboxRecord, OutboxSink } from '../outbox.js';

/** Size-based rotation of a JSONL sink's file. */
export interface JsonlRotation {
  /**
   * Start a new file when the current one would grow past this (bytes, default 256 MiB). A file
   * exceeds it only when a single line does.
   */
  readonly maxBytes: number;
  /**
   * Files kept, the current one included (default 8, at least 2): at most about
   * `maxFiles × maxBytes` on disk. The oldest rotated file is deleted when a rotation passes it.
   */
  readonly maxFiles: number;
}

export const JSONL_ROTATION_DEFAULTS: Readonly<JsonlRotation> = Object.freeze({ maxBytes: 256 << 20, maxFiles: 8 });

/**
 * Appends outbox records to a JSON-lines file, exactly once per sequence number: each line carries
 * `seq`; on open the sink reads the last complete line, cuts off a torn last line (a crash in the
 * middle of a write) and from then on skips records it already has. Each write is fsynced before
 * deliver() resolves, so the outbox cursor never moves past a record that is not on disk.
 *
 * A failed write (a full disk: ENOSPC) may leave part of the batch, and half a line, in the file:
 * deliver() throws SINK_IO and the next deliver() (the outbox retries from its cursor) first
 * repairs the file as open does, so the retry appends exactly what is missing: no gap, no line twice,
 * no torn line in the middle.
 *
 * Rotation: when the file would pass `maxBytes`, it is renamed to `<file>.<last seq in it>` and a new
 * `<file>` is started; rotated files beyond `maxFiles - 1` are deleted, oldest (lowest seq) first.
 * Readers take the files in seq order with {@link jsonlFiles} / {@link readJsonl}. The rotated names
 * carry the last seq, so the exactly-once rule survives a crash right after a rotation (an empty
 * current file).
 */
export class JsonlFileSink implements OutboxSink {
  private fh: FileHandle | null = null;
  /** Bytes of complete lines in the current file. */
  private size = 0;
  private lastSeq = 0;
  /** A write failed: repair the file (reopen) before the next one. */
  private broken = false;
  private readonly rotation: JsonlRotation;
  written = 0;
  rotations = 0;

  constructor(
    readonly name: string,
    readonly topics: readonly number[],
    private readonly file: string,
    private readonly format: (r: OutboxRecord) => Record<string, unknown>,
    rotation: Partial<JsonlRotation> = {},
  ) {
    const r = { ...JSONL_ROTATION_DEFAULTS, ...rotation };
    if (!Number.isSafeInteger(r.maxBytes) || r.maxBytes < 1) throw new CrmError('CONFIG_INVALID', `${name}: rotation maxBytes must be a positive integer, got ${r.maxBytes}`);
    // One rotated file at least: its name holds the last seq while the new file is still empty.
    if (!Number.isSafeInteger(r.maxFiles) || r.maxFiles < 2) throw new CrmError('CONFIG_INVALID', `${name}: rotation maxFiles must be an integer ≥ 2, got ${r.maxFiles}`);
    this.rotation = r;
  }

  async open(): Promise<void> {
    mkdirSync(path.dirname(this.file), { recursive: true });
    try {
      await this.openCurrent();
      await this.dropOldFiles();
    } catch (err) {
      throw new CrmError('SINK_IO', `cannot open ${this.file}`, { cause: err });
    }
  }

  async deliver(records: readonly OutboxRecord[]): Promise<void> {
    if (this.fh === null && !this.broken) throw new CrmError('SINK_IO', `${this.name} sink is not open`);
    try {
      if (this.broken) {
        await this.openCurrent();
        this.broken = false;
      }
      let chunk = '';
      let chunkBytes = 0;
      let chunkLast = this.lastSeq;
      let n = 0;
      for (const r of records) {
        if (r.seq <= chunkLast) continue;
        const line = JSON.stringify({ seq: r.seq, ...this.format(r) }) + '\n';
        const bytes = Buffer.byteLength(line);
        if (this.size + chunkBytes + bytes > this.rotation.maxBytes && this.size + chunkBytes > 0) {
          await this.append(chunk, chunkBytes, chunkLast, n);
          chunk = '';
          chunkBytes = 0;
          n = 0;
          await this.rotate();
        }
        chunk += line;
        chunkBytes += bytes;
        chunkLast = r.seq;
        n++;
      }
      if (n > 0) await this.append(chunk, chunkBytes, chunkLast, n);
    } catch (err) {
      // What reached the file is unknown (part of a line, perhaps): repair before the next write.
      this.broken = true;
      const fh = this.fh;
      this.fh = null;
      await fh?.close().catch(() => undefined);
      throw err instanceof CrmError ? err : new CrmError('SINK_IO', `cannot write ${this.file}`, { cause: err });
    }
  }

  async close(): Promise<void> {
    const fh = this.fh;
    this.fh = null;
    this.broken = false;
    await fh?.close();
  }

  private async append(text: string, bytes: number, last: number, n: number): Promise<void> {
    if (bytes === 0) return;
    await this.fh!.appendFile(text);
    await this.fh!.datasync();
    this.size += bytes;
    this.lastSeq = last;
    this.written += n;
  }

  /** Opens `file` for appending, cuts a torn last line, and finds the last seq written. */
  private async openCurrent(): Promise<void> {
    const fh = await open(this.file, 'a+');
    try {
      const { size } = await fh.stat();
      let keep = 0;
      let last = 0;
      if (size > 0) {
        // Read the tail: enough for the last line of any record we write.
        const tailLen = Math.min(size, 1 << 20);
        const buf = Buffer.alloc(tailLen);
        await fh.read(buf, 0, tailLen, size - tailLen);
        const lastNl = buf.lastIndexOf(0x0a);
        keep = size - tailLen + lastNl + 1; // bytes up to and including the last newline
        if (keep < size) await fh.truncate(keep); // torn write: drop the partial line
        if (lastNl > 0) {
          const prevNl = buf.lastIndexOf(0x0a, lastNl - 1);
          const line = buf.subarray(prevNl + 1, lastNl).toString('utf8');
          last = Number((JSON.parse(line) as { seq: number }).seq) || 0;
        }
      }
      // An empty file right after a rotation: the rotated file's name holds the last seq.
      if (last === 0) last = (await rotatedFiles(this.file)).reduce((m, f) => Math.max(m, f.seq), 0);
      this.fh = fh;
      this.size = keep;
      this.lastSeq = last;
    } catch (err) {
      await fh.close().catch(() => undefined);
      throw err;
    }
  }

  /** The current file (complete, fsynced) becomes `<file>.<lastSeq>`; a new one starts. */
  private async rotate(): Promise<void> {
    const fh = this.fh!;
    this.fh = null;
    await fh.close();
    await rename(this.file, `${this.file}.${this.lastSeq}`);
    await this.openCurrent();
    await syncDir(path.dirname(this.file));
    this.rotations++;
    await this.dropOldFiles();
  }

  private async dropOldFiles(): Promise<void> {
    const rotated = await rotatedFiles(this.file);
    for (let i = 0; i < rotated.length - (this.rotation.maxFiles - 1); i++) await unlink(rotated[i]!.path);
  }
}

/** The rotated files of `file` (`<file>.<seq>`), oldest first. */
async function rotatedFiles(file: string): Promise<{ path: string; seq: number }[]> {
  const dir = path.dirname(file);
  const base = path.basename(file) + '.';
  let names: string[];
  try {
    names = await readdir(dir);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return [];
    throw err;
  }
  const out: { path: string; seq: number }[] = [];
  for (const n of names) {
    if (!n.startsWith(base)) continue;
    const suffix = n.slice(base.length);
    if (/^\d{1,16}$/.test(suffix)) out.push({ path: path.join(dir, n), seq: Number(suffix) });
  }
  return out.sort((a, b) => a.seq - b.seq);
}

/** Makes a rename or a new file in `dir` durable (the file's own fsync does not cover its name). */
async function syncDir(dir: string): Promise<void> {
  const d = await open(dir, 'r');
  try {
    await d.sync();
  } finally {
    await d.close();
  }
}

/**
 * Every file of a (possibly rotated) JSONL sink, in write order: the rotated files oldest first,
 * then the current file (when it exists).
 */
export async function jsonlFiles(file: string): Promise<string[]> {
  return [...(await rotatedFiles(file)).map((f) => f.path), file];
}

/**
 * The lines of a JSONL sink's files in seq order, one object each, read in 64 KiB chunks. A last
 * line without its newline is a write a crash (or a full disk) cut short: skipped (the sink cuts it
 * off when it writes again). A rotation while this reads is noticed (a new rotated file past what
 * was read) and the read goes on from there: each `seq` once, in order. Missing files hold no lines.
 */
export async function* readJsonl(file: string): AsyncGenerator<Record<string, unknown>> {
  const state = { lastSeq: 0 };
  // Bounded: each extra round is a rotation that happened during this read.
  for (let round = 0; round < 16; round++) {
    for (const r of await rotatedFiles(file)) {
      if (r.seq <= state.lastSeq) continue;
      let fh: FileHandle;
      try {
        fh = await open(r.path, 'r');
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code === 'ENOENT') continue; // deleted by retention meanwhile
        throw new CrmError('SOURCE_IO', `cannot read ${r.path}`, { cause: err });
      }
      yield* readLines(fh, r.path, state);
    }
    let fh: FileHandle;
    try {
      fh = await open(file, 'r');
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return;
      throw new CrmError('SOURCE_IO', `cannot read ${file}`, { cause: err });
    }
    // Opened: this handle reads that file to its end even if it is renamed now. Was it renamed
    // before the open (a rotated file newer than what was read)? Then read that one first.
    if ((await rotatedFiles(file)).some((r) => r.seq > state.lastSeq)) {
      await fh.close();
      continue;
    }
    yield* readLines(fh, file, state);
    return;
  }
  throw new CrmError('SOURCE_IO', `${file} kept rotating while it was read`);
}

async function* readLines(fh: FileHandle, name: string, state: { lastSeq: number }): AsyncGenerator<Record<string, unknown>> {
  let rest = '';
  try {
    for await (const chunk of fh.createReadStream({ encoding: 'utf8', highWaterMark: 1 << 16 })) {
      const lines = (rest + (chunk as string)).split('\n');
      rest = lines.pop()!;
      for (const line of lines) {
        if (line === '') continue;
        const row = JSON.parse(line) as Record<string, unknown>;
        const seq = row['seq'];
        if (typeof seq === 'number') {
          if (seq <= state.lastSeq) continue;
          state.lastSeq = seq;
        }
        yield row;
      }
    }
  } catch (err) {
    if (err instanceof SyntaxError) throw new CrmError('SOURCE_DECODE', `${name}: a line is not JSON`, { cause: err });
    throw new CrmError('SOURCE_IO', `cannot read ${name}`, { cause: err });
  } finally {
    await fh.close().catch(() => undefined);
  }
}
