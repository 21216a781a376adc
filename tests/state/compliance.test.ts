import { mkdtemp, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { CrmError } from '../../engine/errors.js';
import { openStore } from '../../state/index.js';
import { LevelStore } from '../../state/level.js';
import { MemoryStore } from '../../state/memory.js';
import { runStoreCompliance } from './compliance.js';

runStoreCompliance('memory', async () => ({ store: new MemoryStore(), cleanup: async () => {} }));
runStoreCompliance('level', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'crmstream-level-'));
  return { store: new LevelStore(dir), cleanup: () => LevelStore.destroy(dir) };
});

// What the shared contract does not cover: the factory and LevelDB's directory handling.
describe('state backends: factory and LevelDB directory', () => {
  function codeOf(run: () => unknown): string | undefined {
    try {
      run();
    } catch (err) {
      return err instanceof CrmError ? err.code : 'not a CrmError';
    }
    return undefined;
  }

  it('openStore builds the configured backend, unopened', () => {
    expect(openStore('memory', null).kind).toBe('memory');
    expect(openStore('level', join(tmpdir(), 'crmstream-never-opened')).kind).toBe('level');
    expect(codeOf(() => openStore('level', null))).toBe('CONFIG_INVALID');
    expect(codeOf(() => openStore('level', ''))).toBe('CONFIG_INVALID');
    expect(codeOf(() => openStore('rocks' as 'memory', null))).toBe('CONFIG_INVALID');
  });

  it('LevelStore touches nothing before open(), then creates missing parent directories', async () => {
    const root = await mkdtemp(join(tmpdir(), 'crmstream-level-'));
    const location = join(root, 'nested', 'deeper', 'state');
    const store = new LevelStore(location);
    try {
      await new Promise((resolve) => setImmediate(resolve));
      await expect(stat(join(root, 'nested'))).rejects.toThrow();
      await store.open();
      expect((await stat(location)).isDirectory()).toBe(true);
    } finally {
      await store.close();
      await LevelStore.destroy(root);
    }
  });

  it('a second LevelStore on a directory in use fails to open with STATE_LOCKED', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'crmstream-level-'));
    const first = new LevelStore(dir);
    const second = new LevelStore(dir);
    try {
      await first.open();
      let code: string | undefined;
      await second.open().catch((err: unknown) => {
        code = err instanceof CrmError ? err.code : 'not a CrmError';
      });
      expect(code).toBe('STATE_LOCKED');
    } finally {
      await second.close();
      await first.close();
      await LevelStore.destroy(dir);
    }
  });
});
