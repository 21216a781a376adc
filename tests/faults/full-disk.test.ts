import { mkdirSync, unlinkSync } from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { Engine } from '../../engine/engine.js';
import { tempDir } from '../helpers.js';
import { config, snapshotOf, stream } from './state-snapshot.js';
import { fillDisk, mountTmpfs, unmount } from './tmpfs.js';

/**
 * Finding 2 of issue 17 on a real full disk: the engine's data dir on a small tmpfs, filled up
 * half-way through a stream with KPIs, segments and campaigns. LevelDB's write fails (ENOSPC) —
 * and stays failed in that process, LevelDB's background error is sticky — so every retry fails
 * and the engine fails closed; close still releases the store. With space back, a restart
 * resumes from the last durable checkpoint, and the rest of the stream gives a state equal to an
 * uninterrupted run's, field by field.
 */
describe('checkpoints on a real full disk (a 16 MiB tmpfs)', () => {
  it('fails closed when the disk fills; after space returns a restart equals an uninterrupted run', async (ctx) => {
    const events = stream(4_000);
    const asOf = Math.max(...events.map((e) => (e as { ts: number }).ts)) + 40 * 86_400_000;
    const tmp = tempDir('crm-fulldisk-');
    const mnt = path.join(tmp.dir, 'mnt');
    mkdirSync(mnt);
    if (!mountTmpfs(mnt, '16m')) {
      tmp.cleanup();
      ctx.skip('cannot mount a tmpfs here (needs root): the full-disk test is skipped');
      return;
    }
    try {
      const refDir = path.join(tmp.dir, 'ref');
      const ref = await Engine.create(config(refDir));
      for (let i = 0; i < events.length; i += 250) await ref.ingest(events.slice(i, i + 250), i + 250);
      await ref.advanceTo(asOf);
      await ref.checkpoint();
      const want = await snapshotOf(ref);
      await ref.close();

      const dataDir = path.join(mnt, 'state-dir');
      const half = 2_000;
      // A sink whose file is on the full disk cannot catch up: close gives it half a second.
      const e = await Engine.create({ ...config(dataDir), outbox: { closeFlushMs: 500 } });
      for (let i = 0; i < half; i += 250) await e.ingest(events.slice(i, i + 250), i + 250);
      const filler = path.join(mnt, 'filler');
      fillDisk(filler, 0);
      let failed: unknown = null;
      for (let i = half; i < events.length && failed === null; i += 250) {
        try {
          await e.ingest(events.slice(i, i + 250), i + 250);
          await e.checkpoint();
        } catch (err) {
          failed = err;
        }
      }
      expect((failed as { code?: string } | null)?.code).toBe('CHECKPOINT_FAILED');
      await e.close().catch(() => undefined); // reports the failed checkpoint; the lock is released
      unlinkSync(filler);

      const again = await Engine.create(config(dataDir));
      const from = again.position as number;
      expect(from).toBeGreaterThanOrEqual(half);
      expect(from).toBeLessThan(events.length);
      for (let i = from; i < events.length; i += 250) await again.ingest(events.slice(i, i + 250), i + 250);
      await again.advanceTo(asOf);
      await again.checkpoint();
      expect(await snapshotOf(again)).toEqual(want);
      await again.close();
      expect(e.health().failed?.code).toBe('CHECKPOINT_FAILED'); // it failed closed, not "carried on"
    } finally {
      unmount(mnt);
      tmp.cleanup();
    }
  }, 120_000);
});
