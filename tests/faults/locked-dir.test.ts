import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { Engine } from '../../engine/engine.js';
import { CrmError } from '../../engine/errors.js';
import { PROJECT_ROOT, T0, tempDir } from '../helpers.js';

/**
 * Issue 17 item 11: a data dir whose LevelDB store another process holds open fails with
 * STATE_LOCKED (not a bare "Database failed to open"), and the CLI says which process has it.
 * The other process is a real one: a child node holding the store open until its stdin closes.
 */

const CLI = path.join(PROJECT_ROOT, 'dist/api/cli.js');
const HOLD = `
import { ClassicLevel } from 'classic-level';
const db = new ClassicLevel(process.argv[1]);
await db.open();
process.stdout.write('holding\\n');
process.stdin.on('end', () => db.close().then(() => process.exit(0)));
process.stdin.resume();
`;

let holder: ChildProcess | null = null;
let tmp: { dir: string; cleanup: () => void } | null = null;
afterEach(async () => {
  if (holder !== null && holder.exitCode === null) {
    const h = holder;
    const gone = new Promise((resolve) => h.once('exit', resolve));
    h.stdin?.end();
    await gone;
  }
  holder = null;
  tmp?.cleanup();
  tmp = null;
});

/** A data dir with a checkpoint, then a second process holding its store open. */
async function lockedDataDir(): Promise<{ dir: string; pid: number }> {
  tmp = tempDir('crm-locked-');
  const dir = tmp.dir;
  const e = await Engine.create({ dataDir: dir });
  await e.ingest([{ event_id: 'e1', type: 'visit', user_id: 'u1', ts: T0 }]);
  await e.close();
  const h = spawn(process.execPath, ['--input-type=module', '-e', HOLD, path.join(dir, 'state')], { cwd: PROJECT_ROOT, stdio: ['pipe', 'pipe', 'inherit'] });
  holder = h;
  await new Promise<void>((resolve, reject) => {
    h.stdout!.once('data', () => resolve());
    h.once('exit', (code) => reject(new Error(`the holder exited (${code}) before opening the store`)));
  });
  return { dir, pid: h.pid! };
}

describe('a data dir in use by another process', () => {
  it('Engine.create fails with STATE_LOCKED', async () => {
    const { dir } = await lockedDataDir();
    const err = await Engine.create({ dataDir: dir }).then(() => null, (e: unknown) => e);
    expect(err).toBeInstanceOf(CrmError);
    expect((err as CrmError).code).toBe('STATE_LOCKED');
  });

  it('the CLI exits 1 with STATE_LOCKED and the pid of the process holding it', async () => {
    const { dir, pid } = await lockedDataDir();
    const r = spawnSync(process.execPath, [CLI, 'export', 'profiles', '--data-dir', dir], { encoding: 'utf8', timeout: 60_000 });
    expect(r.stderr).toContain('STATE_LOCKED');
    // /proc/locks names the holder on Linux; elsewhere the message has no pid.
    if (process.platform === 'linux') expect(r.stderr).toContain(`pid ${pid}`);
    expect(r.status).toBe(1);
  });
});
