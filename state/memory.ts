/**
 * The in-memory `KvStore`: tests, ephemeral runs and benchmarks' baseline. It must behave exactly
 * like the LevelDB backend (tests/state/compliance.ts runs against both), so it orders keys by their
 * UTF-8 bytes, copies value bytes in and out, and takes a snapshot for every scan.
 *
 * Layout: a `Map` for point reads (the hot path is `getSync`, one hash lookup) plus an ordered
 * "list of chunks" — sorted key/value arrays of at most `CHUNK_MAX` entries — for range scans. An
 * insert costs a binary search and a splice inside one small chunk, instead of shifting a single
 * sorted array of 1e5+ keys.
 *
 * Snapshots are copy-on-write: a scan copies only the outer array of chunk references and bumps
 * `gen`; a writer clones a chunk (once) before changing it when the chunk predates the newest
 * snapshot. A scan therefore costs O(chunks in range) up front, not O(entries), and a long scan
 * never blocks or sees writes.
 */
import { CrmError } from '../engine/errors.js';
import { checkBatchSize, copyBytes, emptyScan, normalizeLimit, type KvEntry, type KvStore, type Range, type WriteOp } from './store.js';

/** A chunk is split in two when it grows past this many entries. */
const CHUNK_MAX = 512;
/** A chunk this small is merged into its right neighbour when both fit in one chunk. */
const CHUNK_MIN = 64;
/** Entries per yielded scan batch when the caller gives none (same default as LevelStore). */
const DEFAULT_BATCH_SIZE = 1024;

/**
 * Orders strings as LevelDB orders their UTF-8 encodings (= Unicode code point order). JavaScript's
 * `<` compares UTF-16 code units, which agrees everywhere except that surrogates (D800–DFFF, used by
 * U+10000 and above, e.g. emoji) sort below E000–FFFF, while in UTF-8 they sort above.
 *
 * Keys must be well-formed UTF-16: LevelDB's utf8 encoding turns a lone surrogate into U+FFFD, so two
 * such keys that differ only there are one key on disk but two keys here.
 */
export function compareKeys(a: string, b: string): number {
  if (a === b) return 0;
  const n = a.length < b.length ? a.length : b.length;
  for (let i = 0; i < n; i++) {
    const x = a.charCodeAt(i);
    const y = b.charCodeAt(i);
    if (x !== y) {
      // Only when both units are ≥ D800 can UTF-16 order disagree with code point order; moving
      // surrogates above E000–FFFF fixes it.
      if (x >= 0xd800 && y >= 0xd800) return fixUp(x) - fixUp(y);
      return x - y;
    }
  }
  return a.length - b.length;
}

function fixUp(unit: number): number {
  return unit >= 0xe000 ? unit - 0x800 : unit + 0x2000;
}

/** First index in `keys` whose key is ≥ `key` (keys.length when none). */
function lowerBound(keys: readonly string[], key: string): number {
  let lo = 0;
  let hi = keys.length;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    if (compareKeys(keys[mid]!, key) < 0) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

/** Sorted keys and their values; never empty while it is in `MemoryStore.chunks`. */
class Chunk {
  readonly keys: string[];
  readonly values: Uint8Array[];
  /** The `MemoryStore.gen` this chunk was created in; an older chunk may be shared by a snapshot. */
  readonly gen: number;

  constructor(keys: string[], values: Uint8Array[], gen: number) {
    this.keys = keys;
    this.values = values;
    this.gen = gen;
  }
}

/**
 * In-memory key-value store with LevelDB's ordering and snapshot semantics.
 *
 * Data survives `close()`/`open()` on the same object (it is gone with the object). Values passed to
 * `write` are copied, and every read returns a fresh copy, so neither side can change the other's
 * bytes — as with LevelDB.
 *
 * @example
 * ```ts
 * const store = new MemoryStore();
 * await store.open();
 * await store.write([{ type: 'put', key: 'u/1', value: new Uint8Array([1]) }]);
 * store.getSync('u/1'); // Uint8Array [1]
 * ```
 */
export class MemoryStore implements KvStore {
  readonly kind = 'memory' as const;

  /** Point-read index; holds the same Uint8Array objects as the chunks. */
  private readonly map: Map<string, Uint8Array>;
  /** Ordered chunks, each non-empty, keys ascending across chunks. */
  private chunks: Chunk[];
  /** Bumped by every scan: chunks with an older `gen` may be shared and are cloned before a write. */
  private gen: number;
  private isOpen: boolean;
  /** Bumped by close(), so a scan that outlives its session fails like a LevelDB iterator does. */
  private session: number;

  constructor() {
    this.map = new Map();
    this.chunks = [];
    this.gen = 0;
    this.isOpen = false;
    this.session = 0;
  }

  /** Idempotent; after close() it reopens with the data kept. */
  async open(): Promise<void> {
    this.isOpen = true;
  }

  getSync(key: string): Uint8Array | undefined {
    if (!this.isOpen) throw closedError();
    const value = this.map.get(key);
    // Copy out: stored bytes must not change when the caller mutates what it got.
    return value === undefined ? undefined : value.slice();
  }

  async get(key: string): Promise<Uint8Array | undefined> {
    return this.getSync(key);
  }

  async write(ops: readonly WriteOp[]): Promise<void> {
    if (!this.isOpen) throw closedError();
    // Pass 1 copies every value and is the only step that can throw (a non-Uint8Array value from
    // untyped code); pass 2 cannot fail, which makes the batch all-or-nothing.
    const copies = new Array<Uint8Array | null>(ops.length);
    for (let i = 0; i < ops.length; i++) {
      const op = ops[i]!;
      copies[i] = op.type === 'put' ? copyBytes(op.value) : null;
    }
    for (let i = 0; i < ops.length; i++) {
      const op = ops[i]!;
      const value = copies[i];
      if (value === null || value === undefined) this.remove(op.key);
      else this.insert(op.key, value);
    }
  }

  /**
   * Returns batches of up to `batchSize` entries (every batch full except the last). The snapshot is
   * taken now, at the call; start iterating it soon, since it pins the chunks it shares.
   */
  scan(range: Range, batchSize: number = DEFAULT_BATCH_SIZE): AsyncIterable<readonly KvEntry[]> {
    if (!this.isOpen) throw closedError();
    checkBatchSize(batchSize);
    const limit = normalizeLimit(range.limit);
    const chunks = this.chunks;
    if (limit === 0 || chunks.length === 0) return emptyScan();
    if (range.gte !== undefined && range.lt !== undefined && compareKeys(range.gte, range.lt) >= 0) {
      return emptyScan();
    }

    // [start, end) as (chunk, index) positions; `end` may be one past a chunk's last entry.
    let startChunk = 0;
    let startIndex = 0;
    if (range.gte !== undefined) {
      startChunk = this.findChunk(range.gte);
      startIndex = lowerBound(chunks[startChunk]!.keys, range.gte);
    }
    let endChunk = chunks.length - 1;
    let endIndex = chunks[endChunk]!.keys.length;
    if (range.lt !== undefined) {
      endChunk = this.findChunk(range.lt);
      endIndex = lowerBound(chunks[endChunk]!.keys, range.lt);
    }
    if (endChunk < startChunk || (endChunk === startChunk && endIndex <= startIndex)) return emptyScan();

    // The snapshot: our own copy of the chunk references; the chunks become copy-on-write.
    const snapshot = chunks.slice(startChunk, endChunk + 1);
    this.gen++;
    return this.iterate(snapshot, startIndex, endIndex, range.reverse === true, limit, batchSize, this.session);
  }

  /** scan() without the values (the memory store holds keys and values together anyway). */
  async *scanKeys(range: Range, batchSize: number = DEFAULT_BATCH_SIZE): AsyncGenerator<readonly string[]> {
    for await (const entries of this.scan(range, batchSize)) yield entries.map((e) => e.key);
  }

  async clearRange(range: { readonly gte: string; readonly lt: string }): Promise<void> {
    if (!this.isOpen) throw closedError();
    if (compareKeys(range.gte, range.lt) >= 0) return;
    // Collect first, then delete: removing while walking the chunks would shift the positions.
    const doomed: string[] = [];
    const chunks = this.chunks;
    if (chunks.length === 0) return;
    let ci = this.findChunk(range.gte);
    let i = lowerBound(chunks[ci]!.keys, range.gte);
    for (; ci < chunks.length; ci++, i = 0) {
      const keys = chunks[ci]!.keys;
      for (; i < keys.length; i++) {
        const key = keys[i]!;
        if (compareKeys(key, range.lt) >= 0) {
          ci = chunks.length;
          break;
        }
        doomed.push(key);
      }
    }
    for (const key of doomed) this.remove(key);
  }

  /** Idempotent. Keeps the data; later calls (except open) throw STATE_CLOSED. */
  async close(): Promise<void> {
    if (this.isOpen) this.session++;
    this.isOpen = false;
  }

  private async *iterate(
    snapshot: readonly Chunk[],
    startIndex: number,
    endIndex: number,
    reverse: boolean,
    limit: number,
    batchSize: number,
    session: number,
  ): AsyncGenerator<readonly KvEntry[]> {
    const last = snapshot.length - 1;
    let remaining = limit;
    // Forward walks [start, end); reverse walks from end-1 down to start.
    let ci = reverse ? last : 0;
    let i = reverse ? endIndex - 1 : startIndex;
    for (;;) {
      if (this.session !== session) throw closedError();
      const batch: KvEntry[] = [];
      while (batch.length < batchSize && remaining > 0) {
        if (reverse) {
          if (i < 0) {
            if (ci === 0) break;
            ci--;
            i = snapshot[ci]!.keys.length - 1;
          }
          if (ci === 0 && i < startIndex) break;
        } else {
          if (ci === last && i >= endIndex) break;
          if (i >= snapshot[ci]!.keys.length) {
            ci++;
            i = 0;
            if (ci === last && i >= endIndex) break;
          }
        }
        const chunk = snapshot[ci]!;
        batch.push({ key: chunk.keys[i]!, value: chunk.values[i]!.slice() });
        remaining--;
        i += reverse ? -1 : 1;
      }
      if (batch.length > 0) yield batch;
      if (batch.length < batchSize || remaining === 0) return;
    }
  }

  /** Index of the chunk that holds `key` or would receive it. Requires chunks.length > 0. */
  private findChunk(key: string): number {
    const chunks = this.chunks;
    // Last chunk whose first key is ≤ key; chunk 0 when key sorts before everything.
    let lo = 0;
    let hi = chunks.length - 1;
    while (lo < hi) {
      const mid = (lo + hi + 1) >>> 1;
      if (compareKeys(chunks[mid]!.keys[0]!, key) <= 0) lo = mid;
      else hi = mid - 1;
    }
    return lo;
  }

  /** The chunk at `ci`, cloned first when a snapshot may share it. */
  private writable(ci: number): Chunk {
    const chunk = this.chunks[ci]!;
    if (chunk.gen === this.gen) return chunk;
    const own = new Chunk(chunk.keys.slice(), chunk.values.slice(), this.gen);
    this.chunks[ci] = own;
    return own;
  }

  private insert(key: string, value: Uint8Array): void {
    const existed = this.map.has(key);
    this.map.set(key, value);
    if (this.chunks.length === 0) {
      this.chunks.push(new Chunk([key], [value], this.gen));
      return;
    }
    const ci = this.findChunk(key);
    const chunk = this.writable(ci);
    const i = lowerBound(chunk.keys, key);
    if (existed) {
      chunk.values[i] = value;
      return;
    }
    chunk.keys.splice(i, 0, key);
    chunk.values.splice(i, 0, value);
    if (chunk.keys.length > CHUNK_MAX) {
      const half = chunk.keys.length >>> 1;
      const right = new Chunk(chunk.keys.splice(half), chunk.values.splice(half), this.gen);
      this.chunks.splice(ci + 1, 0, right);
    }
  }

  private remove(key: string): void {
    if (!this.map.delete(key)) return;
    const ci = this.findChunk(key);
    const chunk = this.writable(ci);
    const i = lowerBound(chunk.keys, key);
    chunk.keys.splice(i, 1);
    chunk.values.splice(i, 1);
    if (chunk.keys.length === 0) {
      this.chunks.splice(ci, 1);
      return;
    }
    // Merge small neighbours so that many deletes cannot leave thousands of tiny chunks behind.
    const next = this.chunks[ci + 1];
    if (chunk.keys.length < CHUNK_MIN && next !== undefined && chunk.keys.length + next.keys.length <= CHUNK_MAX) {
      for (let j = 0; j < next.keys.length; j++) {
        chunk.keys.push(next.keys[j]!);
        chunk.values.push(next.values[j]!);
      }
      // `next` is dropped from the list, never mutated, so a snapshot sharing it stays intact.
      this.chunks.splice(ci + 1, 1);
    }
  }
}

function closedError(): CrmError {
  return new CrmError('STATE_CLOSED', 'The memory store is not open (open() it first, or it was closed)');
}
