import { spawnSync } from 'node:child_process';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { META_KEY } from '../../engine/engine.js';
import { Rng, TrafficGenerator, toJsonLine } from '../../engine/sources/generator.js';
import { LevelStore } from '../../state/level.js';
import { PROJECT_ROOT, runAndKill, tempDir } from '../helpers.js';

/**
 * Crash safety by killing processes: the real CLI (`dist/`, built by `npm test`) is SIGKILLed at
 * random points during a backfill and restarted each time; the end state must equal an
 * uninterrupted run's, field by field for every user. No timing is asserted — only outcomes.
 */

const CLI = path.join(PROJECT_ROOT, 'dist/api/cli.js');
const TIMER_WORKER = path.join(PROJECT_ROOT, 'dist/tests/fixtures/timer-worker.js');
const EVENTS = 200_000;
const KILLS = 20;

let tmp: { dir: string; cleanup: () => void };
let input: string;

beforeAll(() => {
  if (!existsSync(CLI)) throw new Error(`${CLI} is missing: run \`npm run build\` first (npm test does)`);
  tmp = tempDir('crm-crash-');
  input = path.join(tmp.dir, 'events.jsonl');
  // Two and a bit days of event time, 20k users, with late, duplicate and malformed records.
  const gen = new TrafficGenerator({ seed: 42, users: 20_000, eventsPerSecond: 1, lateRate: 0.02, duplicateRate: 0.01, badRate: 0.002 });
  const lines: string[] = [];
  for (let i = 0; i < EVENTS; i++) {
    const r = gen.nextRecord();
    lines.push('kind' in r ? r.json : toJsonLine(r));
  }
  writeFileSync(input, lines.join('\n') + '\n');
});

afterAll(() => tmp?.cleanup());

function runToEnd(args: string[]): string {
  const r = spawnSync(process.execPath, args, { encoding: 'utf8', timeout: 120_000 });
  if (r.status !== 0) throw new Error(`exit ${r.status} ${r.signal ?? ''}: ${r.stderr}`);
  return r.stdout;
}

async function storedPosition(dataDir: string): Promise<number> {
  const loc = path.join(dataDir, 'state');
  if (!existsSync(loc)) return 0;
  const store = new LevelStore(loc);
  await store.open();
  try {
    const raw = await store.get(META_KEY);
    return raw === undefined ? 0 : (JSON.parse(new TextDecoder().decode(raw)) as { position: { row: number } | null }).position?.row ?? 0;
  } finally {
    await store.close();
  }
}

function profilesOf(dataDir: string): Record<string, unknown>[] {
  const file = path.join(dataDir, 'profiles.jsonl');
  runToEnd([CLI, 'export', 'profiles', '--data-dir', dataDir, '--out', file]);
  return readFileSync(file, 'utf8').trim().split('\n').map((l) => JSON.parse(l) as Record<string, unknown>);
}

function deadLetters(dataDir: string): string[] {
  return readFileSync(path.join(dataDir, 'deadletter.jsonl'), 'utf8').trim().split('\n')
    .map((l) => JSON.parse(l) as { reason: string; source: string; seq: number })
    .map((d) => `${d.reason} ${d.source}`).sort();
}

describe('SIGKILL during backfill', () => {
  it(`${KILLS}+ kills at random points end in the same per-user state as an uninterrupted run`, async () => {
    const config = path.join(tmp.dir, 'fast-checkpoints.json');
    writeFileSync(config, JSON.stringify({ checkpoint: { intervalMs: 25 }, batchRows: 1024 }));
    const ref = path.join(tmp.dir, 'ref');
    const report = JSON.parse(runToEnd([CLI, 'backfill', '--data-dir', ref, '--input', input, '--no-progress'])) as { rows: number; rejected: number };
    expect(report.rows).toBe(EVENTS);

    const crash = path.join(tmp.dir, 'crash');
    const args = [CLI, 'backfill', '--data-dir', crash, '--input', input, '--config', config, '--no-progress'];
    const rng = new Rng(7);
    const positions = new Set<number>();
    let kills = 0;
    // Bounded: at most 60 attempts; each kill lands 0–600 ms into processing (a batch and its checkpoint take 50–200 ms), so 20 of them fit in one backfill.
    for (let attempt = 0; attempt < 60 && kills < KILLS; attempt++) {
      const killed = await runAndKill(args, /processing from row/, rng.int(600));
      if (!killed) break;
      kills++;
      positions.add(await storedPosition(crash));
    }
    expect(kills).toBeGreaterThanOrEqual(KILLS);
    // The kills landed at many different points of the input, not all before the first checkpoint.
    expect(positions.size).toBeGreaterThanOrEqual(5);
    runToEnd(args);

    const expected = profilesOf(ref);
    const actual = profilesOf(crash);
    expect(actual.length).toBe(expected.length);
    expect(expected.length).toBeGreaterThan(1000);
    for (let i = 0; i < expected.length; i++) expect(actual[i]).toEqual(expected[i]);
    // Every rejected record is dead-lettered exactly once despite the kills.
    expect(deadLetters(crash)).toEqual(deadLetters(ref));
    expect(deadLetters(ref).length).toBe(report.rejected);
  }, 600_000);
});

describe('timers across SIGKILL', () => {
  it('fire in event-time order, exactly once across kills and restarts', async () => {
    const small = input;
    const ref = path.join(tmp.dir, 'timer-ref');
    runToEnd([TIMER_WORKER, ref, small, '1000000']);
    const crash = path.join(tmp.dir, 'timer-crash');
    const rng = new Rng(11);
    let kills = 0;
    for (let attempt = 0; attempt < 40 && kills < 10; attempt++) {
      if (!(await runAndKill([TIMER_WORKER, crash, small, '20'], /^start/m, rng.int(200)))) break;
      kills++;
    }
    expect(kills).toBeGreaterThanOrEqual(10);
    runToEnd([TIMER_WORKER, crash, small, '20']);
    const read = (d: string): string[] => readFileSync(path.join(d, 'reminders.jsonl'), 'utf8').trim().split('\n').map((l) => (JSON.parse(l) as { reminder: string }).reminder);
    const expected = read(ref);
    expect(expected.length).toBeGreaterThan(100);
    // Event-time order: by fire time (cart time + 1 day), then user id.
    const key = (r: string): [number, string] => [Number(r.split('|')[1]), r.split('|')[0]!];
    const sorted = [...expected].sort((a, b) => key(a)[0] - key(b)[0] || (key(a)[1] < key(b)[1] ? -1 : key(a)[1] > key(b)[1] ? 1 : 0));
    expect(expected).toEqual(sorted);
    expect(read(crash)).toEqual(expected);
  }, 600_000);
});
