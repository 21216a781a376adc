/**
 * Crash atomicity of LevelStore's write path: a child process commits batches the way LevelStore
 * does (one `db.batch` with `sync: true`), each putting k/<round>/<i>/a and k/<round>/<i>/b with the
 * same value, and is SIGKILLed mid-stream. After reopening, every batch must be wholly present or
 * wholly absent, the present ones must be a prefix (no gaps), and every batch the child saw commit
 * must be there. Several rounds kill the same directory repeatedly, so recovery of an
 * already-recovered log is covered too.
 *
 * Nothing here asserts a duration; the timeouts only bound a hung child.
 */
import { spawn } from 'node:child_process';
import { mkdtemp } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { LevelStore } from '../../state/level.js';
import { prefixEnd } from '../../state/store.js';

const PROJECT_ROOT = fileURLToPath(new URL('../../', import.meta.url));
const ROUNDS = 3;
/** Hard cap on batches per child, so a child that is never killed still ends (and bounds disk use). */
const MAX_BATCHES = 400;
/** Values large enough that one batch spans several 32 KiB LevelDB log blocks (a tearable record). */
const VALUE_BYTES = 48 * 1024;
/** Bound on waiting for the child; a hung child fails the test instead of hanging it. */
const CHILD_DEADLINE_MS = 5_000;

// Runs as an ES module from the project root, so 'classic-level' resolves from node_modules.
// argv: [node, dir, round, maxBatches, valueBytes]. Prints "ready" after the first committed batch,
// then the number of each committed batch.
const CHILD = `
import { ClassicLevel } from 'classic-level';
const [dir, round, max, size] = process.argv.slice(1);
const db = new ClassicLevel(dir, { keyEncoding: 'utf8', valueEncoding: 'view' });
await db.open();
for (let i = 0; i < Number(max); i++) {
  const value = new Uint8Array(Number(size)).fill(i & 0xff);
  value[0] = i & 0xff; value[1] = (i >> 8) & 0xff;
  const k = 'k/' + round + '/' + String(i).padStart(6, '0');
  await db.batch([{ type: 'put', key: k + '/a', value }, { type: 'put', key: k + '/b', value }], { sync: true });
  process.stdout.write((i === 0 ? 'ready\\n' : '') + i + '\\n');
}
await db.close();
process.stdout.write('done\\n');
`;

interface ChildResult {
  /** Highest batch number the child reported as committed (-1 if none). */
  readonly lastCommitted: number;
  readonly signal: NodeJS.Signals | null;
  readonly stderr: string;
}

/** Runs one writer child and SIGKILLs it once it has reported `killAfter` batches. */
function runAndKill(dir: string, round: number, killAfter: number): Promise<ChildResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(
      process.execPath,
      ['--input-type=module', '-e', CHILD, dir, String(round), String(MAX_BATCHES), String(VALUE_BYTES)],
      { cwd: PROJECT_ROOT, stdio: ['ignore', 'pipe', 'pipe'] },
    );
    let lastCommitted = -1;
    let ready = false;
    let pending = '';
    let stderr = '';
    const deadline = setTimeout(() => child.kill('SIGKILL'), CHILD_DEADLINE_MS);
    child.stdout.setEncoding('utf8');
    child.stderr.setEncoding('utf8');
    child.stderr.on('data', (chunk: string) => {
      stderr += chunk;
    });
    child.stdout.on('data', (chunk: string) => {
      pending += chunk;
      const lines = pending.split('\n');
      pending = lines.pop() ?? '';
      for (const line of lines) {
        if (line === 'ready') ready = true;
        else if (/^\d+$/.test(line)) lastCommitted = Number(line);
      }
      if (ready && lastCommitted >= killAfter && child.exitCode === null) child.kill('SIGKILL');
    });
    child.on('error', (err) => {
      clearTimeout(deadline);
      reject(err);
    });
    child.on('close', (_code, signal) => {
      clearTimeout(deadline);
      resolve({ lastCommitted, signal, stderr });
    });
  });
}

describe('LevelStore durability across SIGKILL', () => {
  let dir: string;

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'crmstream-durability-'));
  });

  afterAll(async () => {
    await LevelStore.destroy(dir);
  });

  it('keeps every batch all-or-nothing and the committed batches gap-free', { timeout: 60_000 }, async () => {
    for (let round = 0; round < ROUNDS; round++) {
      // Vary the kill point between rounds (deterministically: no flaky seeds).
      const result = await runAndKill(dir, round, 3 + round * 7);
      expect(result.stderr).toBe('');
      expect(result.lastCommitted, 'the child committed batches before the kill').toBeGreaterThanOrEqual(3);
      expect(result.signal, 'the child was killed, not finished or timed out').toBe('SIGKILL');

      const store = new LevelStore(dir);
      await store.open();
      try {
        for (let r = 0; r <= round; r++) {
          const prefix = `k/${r}/`;
          const byBatch = new Map<number, { a: Uint8Array | null; b: Uint8Array | null }>();
          for await (const batch of store.scan({ gte: prefix, lt: prefixEnd(prefix) }, 64)) {
            for (const { key, value } of batch) {
              const match = /^k\/\d+\/(\d{6})\/([ab])$/.exec(key);
              expect(match, `unexpected key ${key}`).not.toBeNull();
              const i = Number(match![1]);
              const slot = byBatch.get(i) ?? { a: null, b: null };
              if (match![2] === 'a') slot.a = value;
              else slot.b = value;
              byBatch.set(i, slot);
            }
          }
          const count = byBatch.size;
          // A prefix: batches 0..count-1, no gaps.
          expect([...byBatch.keys()].sort((x, y) => x - y)).toEqual(Array.from({ length: count }, (_, i) => i));
          for (const [i, { a, b }] of byBatch) {
            // All or nothing: both halves, each whole and with this batch's bytes.
            expect(a, `batch ${i} of round ${r} lost a`).not.toBeNull();
            expect(b, `batch ${i} of round ${r} lost b`).not.toBeNull();
            expect(a!.length).toBe(VALUE_BYTES);
            expect(Buffer.compare(a!, b!)).toBe(0);
            expect([a![0], a![1], a![VALUE_BYTES - 1]]).toEqual([i & 0xff, (i >> 8) & 0xff, i & 0xff]);
          }
          if (r === round) {
            // Every batch the child saw resolve is durable; at most the in-flight ones are not.
            expect(count).toBeGreaterThanOrEqual(result.lastCommitted + 1);
          }
        }
      } finally {
        await store.close();
      }
    }
  });
});
