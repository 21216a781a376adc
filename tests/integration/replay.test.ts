import { writeFileSync } from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { SortedInput } from '../../engine/sources/files.js';
import { Engine, type SourceItem } from '../../engine/engine.js';
import { TrafficGenerator, isBad, toJsonLine } from '../../engine/sources/generator.js';
import { LevelStore } from '../../state/level.js';
import { ReminderOperator } from '../fixtures/reminder-operator.js';
import { tempDir } from '../helpers.js';

/** Replaying the same input from empty state gives byte-identical state (SPEC §3). */

async function backfill(dataDir: string, input: string, batchRows: number, intervalMs: number): Promise<void> {
  const engine = await Engine.create({ dataDir, batchRows, checkpoint: { intervalMs } }, { operators: [new ReminderOperator()] });
  const src = await SortedInput.load([input], { format: 'jsonl', map: null, tz: 'UTC' });
  async function* items(): AsyncGenerator<SourceItem> {
    yield* src.batches(0, batchRows);
    yield { kind: 'end' };
  }
  await engine.run(items());
  await engine.close();
}

async function dump(dataDir: string, prefixes: readonly string[] | null): Promise<string[]> {
  const store = new LevelStore(path.join(dataDir, 'state'));
  await store.open();
  const out: string[] = [];
  try {
    for await (const entries of store.scan({})) {
      for (const e of entries) {
        if (prefixes !== null && !prefixes.some((p) => e.key.startsWith(p))) continue;
        out.push(`${e.key}=${Buffer.from(e.value).toString('hex')}`);
      }
    }
  } finally {
    await store.close();
  }
  return out;
}

describe('deterministic replay', () => {
  it('gives byte-identical state twice from empty, and the same user state however the input is batched and checkpointed', async () => {
    const { dir, cleanup } = tempDir('crm-replay-');
    try {
      const input = path.join(dir, 'events.jsonl');
      const gen = new TrafficGenerator({ seed: 3, users: 5_000, eventsPerSecond: 0.5, lateRate: 0.03, duplicateRate: 0.01, badRate: 0.002 });
      const lines: string[] = [];
      for (let i = 0; i < 60_000; i++) {
        const r = gen.nextRecord();
        lines.push(isBad(r) ? r.json : toJsonLine(r));
      }
      writeFileSync(input, lines.join('\n') + '\n');

      await backfill(path.join(dir, 'a'), input, 4096, 1e9);
      await backfill(path.join(dir, 'b'), input, 4096, 1e9);
      const a = await dump(path.join(dir, 'a'), null);
      expect(a.length).toBeGreaterThan(1000);
      expect(await dump(path.join(dir, 'b'), null)).toEqual(a);

      // Cut differently (small batches, a checkpoint after each): the same profiles, aliases and timers.
      await backfill(path.join(dir, 'c'), input, 97, 0);
      const keep = ['u/', 'a/', 't/'];
      expect(await dump(path.join(dir, 'c'), keep)).toEqual(await dump(path.join(dir, 'a'), keep));
    } finally {
      cleanup();
    }
  }, 180_000);
});
