import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, readdirSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { LevelStore } from '../../state/level.js';
import { PROJECT_ROOT, T0, tempDir } from '../helpers.js';

/**
 * Issue 17 item 11: `crmstream export … --data-dir` on a directory with no checkpoint (a typo, an
 * empty directory, a bare store) fails with STATE_NOT_FOUND and a non-zero exit, and creates
 * nothing there; a real data dir still exports. The CLI as a user runs it (dist/, `npm run build`).
 */

const CLI = path.join(PROJECT_ROOT, 'dist/api/cli.js');
const tmp = tempDir('crm-export-missing-');
afterAll(() => tmp.cleanup());

function cli(args: string[]): { status: number | null; stdout: string; stderr: string } {
  const r = spawnSync(process.execPath, [CLI, ...args], { encoding: 'utf8', timeout: 60_000 });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

describe('export from a data dir without a checkpoint', () => {
  it('a mistyped --data-dir: STATE_NOT_FOUND, exit 1, and no directory is created', () => {
    const typo = path.join(tmp.dir, 'no-such-dir');
    const r = cli(['export', 'profiles', '--data-dir', typo]);
    expect(r.stderr).toContain('STATE_NOT_FOUND');
    expect(r.stderr).toContain(typo); // the path that was tried
    expect(r.status).toBe(1);
    expect(r.stdout).toBe('');
    expect(existsSync(typo)).toBe(false);
  });

  it('an existing directory with no state/: STATE_NOT_FOUND for every export kind, nothing written into it', () => {
    const empty = path.join(tmp.dir, 'empty');
    mkdirSync(empty);
    for (const args of [['profiles'], ['kpis', '--grain', 'day'], ['segment', '--id', 'vip'], ['triggers']]) {
      const r = cli(['export', ...args, '--data-dir', empty]);
      expect(r.stderr, args[0]).toContain('STATE_NOT_FOUND');
      expect(r.status, args[0]).toBe(1);
    }
    expect(readdirSync(empty)).toEqual([]);
  });

  it('a bare store with no checkpoint record (what an earlier export left): STATE_NOT_FOUND', async () => {
    const bare = path.join(tmp.dir, 'bare');
    const store = new LevelStore(path.join(bare, 'state'));
    await store.open();
    await store.close();
    const r = cli(['export', 'profiles', '--data-dir', bare]);
    expect(r.stderr).toContain('STATE_NOT_FOUND');
    expect(r.status).toBe(1);
  });

  it('a data dir a backfill wrote still exports its rows', () => {
    const dir = path.join(tmp.dir, 'real');
    const input = path.join(tmp.dir, 'events.jsonl');
    writeFileSync(input, [
      { event_id: 'e1', type: 'visit', user_id: 'u1', ts: T0 },
      { event_id: 'e2', type: 'visit', user_id: 'u2', ts: T0 + 1000 },
    ].map((e) => JSON.stringify(e)).join('\n') + '\n');
    const b = cli(['backfill', '--data-dir', dir, '--input', input]);
    expect(b.status, b.stderr).toBe(0);
    const r = cli(['export', 'profiles', '--data-dir', dir]);
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout.trim().split('\n').map((l) => (JSON.parse(l) as { user_id: string }).user_id).sort()).toEqual(['u1', 'u2']);
  });
});
