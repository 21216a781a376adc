import { appendFileSync, readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { JsonlFileSink } from '../../engine/sinks/jsonl-file.js';
import type { OutboxRecord } from '../../engine/outbox.js';
import { tempDir } from '../helpers.js';

const rec = (seq: number): OutboxRecord => ({ seq, topic: 1, payload: new TextEncoder().encode(`p${seq}`) });
const fmt = (r: OutboxRecord): Record<string, unknown> => ({ p: new TextDecoder().decode(r.payload) });

describe('JsonlFileSink', () => {
  it('writes each sequence number once across re-delivery, and cuts a torn last line on open', async () => {
    const { dir, cleanup } = tempDir();
    try {
      const file = path.join(dir, 'sub', 'out.jsonl');
      let sink = new JsonlFileSink('t', [1], file, fmt);
      await sink.open();
      await sink.deliver([rec(1), rec(2)]);
      await sink.deliver([rec(2), rec(3)]); // re-delivery after a crash: 2 is skipped
      await sink.close();
      // A crash in the middle of a write leaves half a line.
      appendFileSync(file, '{"seq":4,"p":"p');
      sink = new JsonlFileSink('t', [1], file, fmt);
      await sink.open();
      await sink.deliver([rec(3), rec(4), rec(5)]);
      await sink.close();
      const lines = readFileSync(file, 'utf8').trim().split('\n').map((l) => JSON.parse(l) as { seq: number; p: string });
      expect(lines).toEqual([1, 2, 3, 4, 5].map((s) => ({ seq: s, p: `p${s}` })));
    } finally {
      cleanup();
    }
  });

  it('starts from an empty file', async () => {
    const { dir, cleanup } = tempDir();
    try {
      const file = path.join(dir, 'out.jsonl');
      writeFileSync(file, '');
      const sink = new JsonlFileSink('t', [1], file, fmt);
      await sink.open();
      await sink.deliver([rec(7)]);
      await sink.close();
      expect(readFileSync(file, 'utf8')).toBe('{"seq":7,"p":"p7"}\n');
    } finally {
      cleanup();
    }
  });
});
