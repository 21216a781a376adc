/**
 * The state layer's entry point: the `KvStore` contract, its two backends and a factory that picks
 * one from configuration.
 */
import { CrmError } from '../engine/errors.js';
import { LevelStore } from './level.js';
import { MemoryStore } from './memory.js';
import type { KvStore } from './store.js';

export type { KvEntry, KvStore, Range, WriteOp } from './store.js';
export { prefixEnd } from './store.js';
export { MemoryStore } from './memory.js';
export { LevelStore } from './level.js';

/**
 * Builds the configured backend; it is not opened yet — `await store.open()` before use.
 * `location` is the LevelDB directory (required for 'level', ignored for 'memory').
 *
 * @throws CrmError CONFIG_INVALID for an unknown kind or a 'level' store without a location.
 * @example
 * ```ts
 * const store = openStore('level', './data/state');
 * await store.open();
 * ```
 */
export function openStore(kind: 'memory' | 'level', location: string | null): KvStore {
  switch (kind) {
    case 'memory':
      return new MemoryStore();
    case 'level':
      if (location === null || location === '') {
        throw new CrmError('CONFIG_INVALID', "state kind 'level' needs a location: set the state directory (a path LevelDB may create)");
      }
      return new LevelStore(location);
    default:
      // Reachable from untyped callers (a config file read without its schema).
      throw new CrmError('CONFIG_INVALID', `Unknown state kind ${JSON.stringify(kind)}: use 'memory' or 'level'`);
  }
}
