import { open, type FileHandle } from 'node:fs/promises';
import { mkdirSync } from 'node:fs';
import path from 'node:path';
import { CrmError } from '../errors.js';
import type { OutboxRecord, OutboxSink } from '../outbox.js';

/**
 * Appends outbox records to a JSON-lines file, exactly once per sequence number: each line carries
 * `seq`; on open the sink reads the last complete line, cuts off a torn last line (a crash in the
 * middle of a write) and from then on skips records it already has. The file is fsynced before the
 * outbox cursor moves past the records, so a crash never leaves a gap.
 */
export class JsonlFileSink implements OutboxSink {
  private fh: FileHandle | null = null;
  private lastSeq = 0;
  written = 0;

  constructor(
    readonly name: string,
    readonly topics: readonly number[],
    private readonly file: string,
    private readonly format: (r: OutboxRecord) => Record<string, unknown>,
  ) {}

  async open(): Promise<void> {
    mkdirSync(path.dirname(this.file), { recursive: true });
    try {
      this.fh = await open(this.file, 'a+');
      const { size } = await this.fh.stat();
      if (size > 0) {
        // Read the tail: enough for the last line of any record we write.
        const tailLen = Math.min(size, 1 << 20);
        const buf = Buffer.alloc(tailLen);
        await this.fh.read(buf, 0, tailLen, size - tailLen);
        const lastNl = buf.lastIndexOf(0x0a);
        const keep = size - tailLen + lastNl + 1; // bytes up to and including the last newline
        if (keep < size) await this.fh.truncate(keep); // torn write: drop the partial line
        if (lastNl > 0) {
          const prevNl = buf.lastIndexOf(0x0a, lastNl - 1);
          const line = buf.subarray(prevNl + 1, lastNl).toString('utf8');
          this.lastSeq = Number((JSON.parse(line) as { seq: number }).seq) || 0;
        }
      }
    } catch (err) {
      throw new CrmError('SINK_IO', `cannot open ${this.file}`, { cause: err });
    }
  }

  async deliver(records: readonly OutboxRecord[]): Promise<void> {
    if (this.fh === null) throw new CrmError('SINK_IO', `${this.name} sink is not open`);
    let out = '';
    let last = this.lastSeq;
    for (const r of records) {
      if (r.seq <= last) continue;
      out += JSON.stringify({ seq: r.seq, ...this.format(r) }) + '\n';
      last = r.seq;
      this.written++;
    }
    if (out.length === 0) return;
    try {
      await this.fh.appendFile(out);
      await this.fh.datasync();
    } catch (err) {
      throw new CrmError('SINK_IO', `cannot write ${this.file}`, { cause: err });
    }
    this.lastSeq = last;
  }

  async close(): Promise<void> {
    const fh = this.fh;
    this.fh = null;
    await fh?.close();
  }
}
