import { CrmError } from '../engine/errors.js';

/**
 * The state-store contract. Two backends implement it — `MemoryStore` (tests, ephemeral runs) and
 * `LevelStore` (classic-level / LevelDB, durable) — and one compliance suite
 * (tests/state/compliance.test.ts) runs against both. Nothing here knows what a KPI, a user or a
 * timer is: keys are strings ordered as LevelDB orders their UTF-8 bytes (for ASCII prefixes and the
 * separators used here this equals JavaScript string order), values are bytes.
 */

export type WriteOp =
  | { readonly type: 'put'; readonly key: string; readonly value: Uint8Array }
  | { readonly type: 'del'; readonly key: string };

export interface Range {
  /** Inclusive lower bound. */
  readonly gte?: string;
  /** Exclusive upper bound. */
  readonly lt?: string;
  /** At most this many entries (default: all). */
  readonly limit?: number;
  readonly reverse?: boolean;
}

export interface KvEntry {
  readonly key: string;
  readonly value: Uint8Array;
}

export interface KvStore {
  readonly kind: 'memory' | 'level';
  /** Opens (creating if needed). Idempotent. */
  open(): Promise<void>;
  /**
   * Synchronous point read for the hot path's cache-miss case (LevelDB's getSync: ~280k/s,
   * against ~15k/s for an awaited get). Returns undefined when absent.
   */
  getSync(key: string): Uint8Array | undefined;
  get(key: string): Promise<Uint8Array | undefined>;
  /**
   * Applies every op as ONE atomic, durable batch: after a crash either all of it is visible or
   * none of it. Ops apply in order (a later op on the same key wins).
   */
  write(ops: readonly WriteOp[]): Promise<void>;
  /**
   * Iterates a key range in batches (`nextv`-style): each yielded array holds up to `batchSize`
   * entries, so callers await once per batch, not once per entry. Sees a snapshot taken at the call.
   */
  scan(range: Range, batchSize?: number): AsyncIterable<readonly KvEntry[]>;
  /** Like scan(), keys only: nothing of the values is read or copied (e.g. to index what exists). */
  scanKeys(range: Range, batchSize?: number): AsyncIterable<readonly string[]>;
  /** Deletes every key in [gte, lt) atomically. */
  clearRange(range: { readonly gte: string; readonly lt: string }): Promise<void>;
  close(): Promise<void>;
}

/**
 * The smallest key greater than every key that starts with `prefix` (for `lt` bounds): the prefix
 * with its last code unit incremented, which is right for any key content, unlike appending U+FFFF
 * (UTF-8 orders 4-byte characters above it).
 */
export function prefixEnd(prefix: string): string {
  const last = prefix.charCodeAt(prefix.length - 1);
  return prefix.slice(0, -1) + String.fromCharCode(last + 1);
}

/** A plain Uint8Array copy (a Buffer's own `slice` would share memory). Both backends copy values on write. */
export function copyBytes(value: Uint8Array): Uint8Array {
  if (!(value instanceof Uint8Array)) {
    throw new TypeError('WriteOp.value must be a Uint8Array');
  }
  return new Uint8Array(value);
}

/** abstract-level's rule, so both backends agree: a non-negative integer limits, anything else means all. */
export function normalizeLimit(limit: number | undefined): number {
  return limit !== undefined && Number.isInteger(limit) && limit >= 0 ? limit : Infinity;
}

export function checkBatchSize(batchSize: number): void {
  if (!Number.isInteger(batchSize) || batchSize < 1) {
    throw new CrmError('CONFIG_INVALID', `scan batchSize must be a positive integer, got ${String(batchSize)}`);
  }
}

/** The scan of an empty range or a zero limit: not an error, just nothing. */
export async function* emptyScan<T = KvEntry>(): AsyncGenerator<readonly T[]> {
  // Nothing to yield.
}
