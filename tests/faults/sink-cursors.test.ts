import { existsSync, mkdirSync, readdirSync, readFileSync, statSync, unlinkSync } from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { Engine } from '../../engine/engine.js';
import { Outbox, Topic, type OutboxRecord } from '../../engine/outbox.js';
import { JsonlFileSink } from '../../engine/sinks/jsonl-file.js';
import { readTriggers } from '../../engine/arrow-export.js';
import { LevelStore } from '../../state/level.js';
import { MemoryStore } from '../../state/memory.js';
import type { WriteOp } from '../../state/store.js';
import { tempDir } from '../helpers.js';
import { FaultSink } from './fault-sink.js';
import { fillDisk, mountTmpfs, unmount } from './tmpfs.js';
import { FaultStore } from './fault-store.js';

/**
 * Issue 17 item 3 ("a sink failure skips records for good") and the rotating JSONL sinks of item 8.
 * Outbox records here are dead letters: events without a timestamp are refused and dead-lettered,
 * which needs no campaign or segment set-up.
 */

/** `n` events that are each dead-lettered (no `ts`), ids unique across calls by `tag`. */
function badEvents(tag: string, n: number): unknown[] {
  return Array.from({ length: n }, (_, i) => ({ event_id: `${tag}-${i}`, type: 'visit', anonymous_id: `a-${tag}-${i}`, note: 'x'.repeat(40) }));
}

const range = (from: number, to: number): number[] => Array.from({ length: to - from + 1 }, (_, i) => from + i);

/** No automatic checkpoints: the test decides when records become durable. */
const MANUAL = { checkpoint: { intervalMs: 3_600_000 } };

describe('sinks with their own cursors', () => {
  it('a sink that fails 3 times then recovers gets every record once, in order, and never blocks the other sink', async () => {
    const flaky = new FaultSink('flaky', [Topic.deadLetter], { failDeliveries: 3 });
    const steady = new FaultSink('steady', [Topic.deadLetter]);
    // flaky first: on the old drain its throw also kept `steady` from its records.
    const engine = await Engine.create(MANUAL, { store: new MemoryStore(), sinks: [flaky, steady] });
    const checkpointErrors: unknown[] = [];
    let total = 0;
    for (let batch = 0; batch < 5; batch++) {
      await engine.ingest(badEvents(`b${batch}`, 3));
      try {
        await engine.checkpoint();
      } catch (err) {
        checkpointErrors.push(err);
      }
      total += 3;
      // The healthy sink has every committed record as soon as the checkpoint returns.
      expect(steady.seqs).toEqual(range(1, total));
    }
    await engine.close(); // gives the failing sink time to catch up (flush), else SINK_STALLED
    expect(checkpointErrors).toEqual([]);
    expect(flaky.failedDeliveries).toBe(3);
    expect(flaky.seqs).toEqual(range(1, total)); // no gap, no duplicate, in order
    expect(flaky.records.every((r) => r.topic === Topic.deadLetter)).toBe(true);
    const status = engine.health().sinks.find((s) => s.name === 'flaky')!;
    expect(status).toMatchObject({ cursor: total, head: total, failing: false, consecutiveFailures: 0, failuresTotal: 3, deliveredTotal: total, lastErrorCode: 'SINK_IO' });
    expect(status.lastError).toContain('ENOSPC');
  });

  it('a sink failing across a crash resumes from its own cursor; the records stay stored until every sink has them', async () => {
    const { dir, cleanup } = tempDir();
    try {
      const stateDir = path.join(dir, 'state');
      const flaky = new FaultSink('flaky', [Topic.deadLetter]);
      const steady = new FaultSink('steady', [Topic.deadLetter]);
      const store = new LevelStore(stateDir);
      const engine = await Engine.create(MANUAL, { store, sinks: [flaky, steady] });
      await engine.ingest(badEvents('first', 4));
      await engine.checkpoint(); // 1..4 to both
      flaky.failAlways(); // down from here on
      await engine.ingest(badEvents('second', 4));
      await engine.checkpoint().catch(() => undefined); // 5..8: `steady` only
      expect(flaky.seqs).toEqual(range(1, 4));
      expect(steady.seqs).toEqual(range(1, 8));
      // Crash: the process goes away without closing the engine (only the LevelDB lock is released).
      await store.close();

      const peek = new LevelStore(stateDir);
      await peek.open();
      const kept: string[] = [];
      for await (const keys of peek.scanKeys({ gte: 'o/', lt: 'o0' })) kept.push(...keys);
      await peek.close();
      expect(kept.map((k) => parseInt(k.slice(2), 16))).toEqual(range(5, 8)); // trimmed to the slowest cursor

      const flaky2 = new FaultSink('flaky', [Topic.deadLetter]);
      const steady2 = new FaultSink('steady', [Topic.deadLetter]);
      const engine2 = await Engine.create(MANUAL, { store: new LevelStore(stateDir), sinks: [flaky2, steady2] });
      expect(flaky2.seqs).toEqual(range(5, 8)); // from its own cursor: nothing before, no gap
      expect(steady2.seqs).toEqual([]); // its cursor had moved: nothing again
      await engine2.close();
    } finally {
      cleanup();
    }
  });

  it('a sink down for long is fed from the store in pages, memory bounded, and then gets everything', async () => {
    const store = new MemoryStore();
    await store.open();
    const outbox = new Outbox({ maxBufferedRecords: 10, pageRecords: 4, retryBaseMs: 1, retryMaxMs: 5, closeFlushMs: 30_000 });
    const down = new FaultSink('down', [Topic.deadLetter]);
    const other = new FaultSink('other', [Topic.trigger]);
    down.failAlways();
    outbox.addSink(down);
    outbox.addSink(other);
    await outbox.open(store, 1);
    const enc = new TextEncoder();
    for (let epoch = 0; epoch < 20; epoch++) {
      for (let i = 0; i < 5; i++) outbox.append(i === 0 ? Topic.trigger : Topic.deadLetter, enc.encode(`r${epoch}.${i}`));
      const ops: WriteOp[] = [];
      outbox.snapshot(ops);
      await store.write(ops);
      outbox.committed();
      await outbox.drain(); // never throws for a failing sink
      expect(outbox.buffered.records).toBeLessThanOrEqual(10);
    }
    const st = outbox.sinkStatus().find((s) => s.name === 'down')!;
    expect(st).toMatchObject({ cursor: 0, head: 100, failing: true });
    expect(st.consecutiveFailures).toBeGreaterThan(0);
    expect(other.seqs).toEqual(range(1, 100).filter((s) => (s - 1) % 5 === 0));
    down.heal();
    await outbox.flush(30_000);
    const want = range(1, 100).filter((s) => (s - 1) % 5 !== 0);
    expect(down.seqs).toEqual(want);
    expect(down.records.map((r) => new TextDecoder().decode(r.payload))).toEqual(want.map((s) => `r${Math.floor((s - 1) / 5)}.${(s - 1) % 5}`));
    // Every sink has everything: the store keeps no outbox record.
    const left: string[] = [];
    for await (const keys of store.scanKeys({ gte: 'o/', lt: 'o0' })) left.push(...keys);
    expect(left).toEqual([]);
    await outbox.close();
  });

  it('a failed cursor write (store ENOSPC) re-delivers after a crash, never skips', async () => {
    const inner = new MemoryStore();
    const store = new FaultStore(inner);
    await store.open();
    const enc = new TextEncoder();
    const commit = async (outbox: Outbox, n: number): Promise<void> => {
      for (let i = 0; i < n; i++) outbox.append(Topic.deadLetter, enc.encode('x'));
      const ops: WriteOp[] = [];
      outbox.snapshot(ops);
      await inner.write(ops); // the checkpoint itself succeeds
      outbox.committed();
    };
    const first = new FaultSink('s', [Topic.deadLetter]);
    // The crashed process's own retry of the cursor write never comes (60 s away).
    const a = new Outbox({ retryBaseMs: 60_000 });
    a.addSink(first);
    await a.open(store, 1);
    await commit(a, 3);
    await a.drain();
    expect(await inner.get('c/s')).toBeDefined(); // cursor 3 written
    await commit(a, 3);
    store.failNext(1); // the cursor/trim write after delivering 4..6 fails
    await a.drain(); // does not throw
    expect(first.seqs).toEqual(range(1, 6));
    expect(a.cursorWriteFailures).toBe(1);
    expect(store.failedWrites).toBe(1);
    // Crash before the retry: a new outbox on the same store re-feeds from the durable cursor (3).
    const second = new FaultSink('s', [Topic.deadLetter]);
    const b = new Outbox({ retryBaseMs: 1, closeFlushMs: 5_000 });
    b.addSink(second);
    await b.open(store, 7);
    await b.drain();
    expect(second.seqs).toEqual(range(4, 6));
    await b.close();
  });

  it('flush rejects with SINK_STALLED while a sink stays down; close still closes every sink and combines errors', async () => {
    const store = new MemoryStore();
    await store.open();
    const outbox = new Outbox({ retryBaseMs: 1, retryMaxMs: 5, closeFlushMs: 50 });
    const down = new FaultSink('down', [Topic.deadLetter]);
    const badClose = new FaultSink('bad-close', [Topic.deadLetter]);
    const fine = new FaultSink('fine', [Topic.deadLetter]);
    down.failAlways();
    badClose.closeError = new Error('close failed');
    for (const s of [down, badClose, fine]) outbox.addSink(s);
    await outbox.open(store, 1);
    outbox.append(Topic.deadLetter, new Uint8Array([1]));
    const ops: WriteOp[] = [];
    outbox.snapshot(ops);
    await store.write(ops);
    outbox.committed();
    await outbox.drain();
    await expect(outbox.flush(50)).rejects.toMatchObject({ code: 'SINK_STALLED' });
    const err = await outbox.close().then(() => null, (e: unknown) => e);
    expect(err).toMatchObject({ code: 'CLEANUP_FAILED' });
    expect((err as { errors: { code?: string; message: string }[] }).errors.map((e) => e.code ?? e.message).sort()).toEqual(['SINK_STALLED', 'close failed']);
    expect([down.closed, badClose.closed, fine.closed]).toEqual([1, 1, 1]);
    // The record is still stored for `down`.
    expect(await store.get('o/0000000000000001')).toBeDefined();
  });
});

const lines = (file: string): { seq: number }[] => readFileSync(file, 'utf8').split('\n').filter((l) => l !== '').map((l) => JSON.parse(l) as { seq: number });

describe('JSONL sink on a full disk (a real 1 MiB tmpfs)', () => {
  it('a record refused for lack of space is written once space returns; none skipped, no torn line', async (ctx) => {
    const { dir, cleanup } = tempDir();
    const mnt = path.join(dir, 'mnt');
    mkdirSync(mnt);
    if (!mountTmpfs(mnt, '1m')) {
      cleanup();
      ctx.skip('cannot mount a tmpfs here (needs root): the full-disk test is skipped');
      return;
    }
    let engine: Engine | null = null;
    try {
      const file = path.join(mnt, 'deadletter.jsonl');
      const filler = path.join(mnt, 'filler');
      engine = await Engine.create({ ...MANUAL, deadLetter: { path: file } }, { store: new MemoryStore() });
      await engine.ingest(badEvents('before', 5));
      await engine.checkpoint();
      // Leave room for a few lines only: the next write is cut off half-way by ENOSPC.
      fillDisk(filler, 600);
      const errors: unknown[] = [];
      for (let batch = 0; batch < 4; batch++) {
        await engine.ingest(badEvents(`full${batch}`, 10));
        await engine.checkpoint().catch((err: unknown) => errors.push(err));
      }
      expect(errors).toEqual([]); // a sink's trouble is not the checkpoint's
      const st = engine.health().sinks.find((s) => s.name === 'deadletter')!;
      expect(st.failing).toBe(true);
      expect(st.cursor).toBeLessThan(st.head);
      expect(st.lastErrorCode).toBe('SINK_IO');
      expect(st.lastError).toContain('ENOSPC');
      unlinkSync(filler); // space returns
      await engine.ingest(badEvents('after', 5));
      const closing = engine;
      engine = null;
      await closing.close(); // flush: the sink catches up before close returns
      const got = lines(file).map((l) => l.seq);
      expect(got).toEqual(range(1, 50));

      // The same input on a disk that never filled writes the same file, byte for byte.
      const ref = path.join(dir, 'ref.jsonl');
      const e2 = await Engine.create({ ...MANUAL, deadLetter: { path: ref } }, { store: new MemoryStore() });
      await e2.ingest(badEvents('before', 5));
      await e2.checkpoint();
      for (let batch = 0; batch < 4; batch++) {
        await e2.ingest(badEvents(`full${batch}`, 10));
        await e2.checkpoint();
      }
      await e2.ingest(badEvents('after', 5));
      await e2.close();
      // Dead letters carry the time they were refused: compare everything else.
      const strip = (f: string): unknown[] => lines(f).map((l) => ({ ...l, at: undefined, received_at: undefined }));
      expect(strip(file)).toEqual(strip(ref));
    } finally {
      // Never leave the mount behind, whatever failed above (an open file keeps it busy: detach).
      await engine?.close().catch(() => undefined);
      unmount(mnt);
      cleanup();
    }
  });
});

describe('rotating JSONL sinks', () => {
  const enc = new TextEncoder();
  const rec = (seq: number): OutboxRecord => ({ seq, topic: Topic.trigger, payload: enc.encode(`t${seq}`) });
  const fmt = (r: OutboxRecord): Record<string, unknown> => ({ trigger_id: new TextDecoder().decode(r.payload), pad: 'p'.repeat(60) });

  it('rotates at the size bound, keeps at most maxFiles files, and the triggers export reads them all in order', async () => {
    const { dir, cleanup } = tempDir();
    try {
      const file = path.join(dir, 'triggers.jsonl');
      // ~100-byte lines, 1000-byte files: ~10 lines a file; 40 files' worth kept.
      let sink = new JsonlFileSink('triggers', [Topic.trigger], file, fmt, { maxBytes: 1000, maxFiles: 40 });
      await sink.open();
      for (let s = 1; s <= 200; s += 7) await sink.deliver(range(s, Math.min(200, s + 6)).map(rec));
      await sink.close();
      const files = readdirSync(dir);
      expect(files.length).toBeGreaterThan(10);
      expect(files.length).toBeLessThanOrEqual(40);
      for (const f of files) expect(statSync(path.join(dir, f)).size).toBeLessThanOrEqual(1000);
      const all: unknown[] = [];
      for await (const t of readTriggers(file)) all.push(t['seq']);
      expect(all).toEqual(range(1, 200));

      // A crash right after a rotation (the new file still empty) and a re-delivery of what the
      // file already has: nothing written twice.
      sink = new JsonlFileSink('triggers', [Topic.trigger], file, fmt, { maxBytes: 1000, maxFiles: 40 });
      await sink.open();
      await sink.deliver(range(190, 205).map(rec));
      await sink.close();
      const again: unknown[] = [];
      for await (const t of readTriggers(file)) again.push(t['seq']);
      expect(again).toEqual(range(1, 205));
      let lineCount = 0;
      for (const f of readdirSync(dir)) lineCount += lines(path.join(dir, f)).length;
      expect(lineCount).toBe(205);

      // A smaller bound: the oldest files go, the count stays bounded, the rest reads in order.
      sink = new JsonlFileSink('triggers', [Topic.trigger], file, fmt, { maxBytes: 1000, maxFiles: 3 });
      await sink.open();
      for (let s = 206; s <= 400; s += 5) await sink.deliver(range(s, Math.min(400, s + 4)).map(rec));
      await sink.close();
      expect(readdirSync(dir).length).toBeLessThanOrEqual(3);
      const tail: number[] = [];
      for await (const t of readTriggers(file)) tail.push(t['seq'] as number);
      expect(tail.length).toBeGreaterThan(10);
      expect(tail).toEqual(range(tail[0]!, 400));
      expect(existsSync(file)).toBe(true);
    } finally {
      cleanup();
    }
  });

  it('rejects a rotation that could not keep the last seq', () => {
    expect(() => new JsonlFileSink('t', [1], '/tmp/x.jsonl', fmt, { maxFiles: 1 })).toThrow(expect.objectContaining({ code: 'CONFIG_INVALID' }) as Error);
  });
});

