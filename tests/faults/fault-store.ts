import { CrmError } from '../../engine/errors.js';
import type { KvEntry, KvStore, Range, WriteOp } from '../../state/store.js';

/**
 * A `KvStore` over a real store whose `write()` fails on demand: once, N times, or with a disk-full
 * error. Everything else (reads, scans, clearRange, open, close) goes straight to the inner store,
 * so what a failed write leaves behind is exactly what the real backend would leave: nothing of it
 * (write() is atomic; a failing call is refused before it reaches the inner store).
 *
 * ```ts
 * const store = new FaultStore(new MemoryStore(), { failWrites: 1 });   // the first write throws
 * store.failNext(3);                                                   // arm three more later
 * store.failedWrites;                                                  // how many were refused
 * ```
 *
 * The default error is what LevelStore throws when the disk is full: a retriable CrmError
 * `STATE_IO` whose `cause` is a Node errno error `ENOSPC`.
 */
export interface FaultStoreOptions {
  /** How many of the next write() calls fail (default 0: none until failNext()). */
  readonly failWrites?: number;
  /** Builds the error each failed write throws (default: {@link enospcError}). */
  readonly error?: () => Error;
}

/** A Node-style errno error for a full disk (what fs and LevelDB's env report). */
export function enospc(path = 'LOG'): NodeJS.ErrnoException {
  const err: NodeJS.ErrnoException = new Error(`ENOSPC: no space left on device, write '${path}'`);
  err.code = 'ENOSPC';
  err.errno = -28;
  err.syscall = 'write';
  err.path = path;
  return err;
}

/** What LevelStore.write throws on a full disk: STATE_IO caused by ENOSPC. */
export function enospcError(): Error {
  return new CrmError('STATE_IO', 'LevelDB write failed', { cause: enospc() });
}

export class FaultStore implements KvStore {
  readonly inner: KvStore;
  /** write() calls made (failed ones included). */
  writeCalls = 0;
  /** write() calls that reached the inner store and succeeded. */
  writesOk = 0;
  /** write() calls refused by injection. */
  failedWrites = 0;
  private failuresLeft: number;
  private readonly makeError: () => Error;

  constructor(inner: KvStore, options: FaultStoreOptions = {}) {
    this.inner = inner;
    this.failuresLeft = options.failWrites ?? 0;
    this.makeError = options.error ?? enospcError;
  }

  get kind(): KvStore['kind'] {
    return this.inner.kind;
  }

  /** Makes the next `n` write() calls fail (adds to any failures still armed). */
  failNext(n = 1): void {
    this.failuresLeft += n;
  }

  /** Disarms every pending failure (the disk has space again). */
  heal(): void {
    this.failuresLeft = 0;
  }

  /** Failures still armed. */
  get armed(): number {
    return this.failuresLeft;
  }

  open(): Promise<void> {
    return this.inner.open();
  }

  getSync(key: string): Uint8Array | undefined {
    return this.inner.getSync(key);
  }

  get(key: string): Promise<Uint8Array | undefined> {
    return this.inner.get(key);
  }

  async write(ops: readonly WriteOp[]): Promise<void> {
    this.writeCalls++;
    if (this.failuresLeft > 0) {
      this.failuresLeft--;
      this.failedWrites++;
      throw this.makeError();
    }
    await this.inner.write(ops);
    this.writesOk++;
  }

  scan(range: Range, batchSize?: number): AsyncIterable<readonly KvEntry[]> {
    return this.inner.scan(range, batchSize);
  }

  scanKeys(range: Range, batchSize?: number): AsyncIterable<readonly string[]> {
    return this.inner.scanKeys(range, batchSize);
  }

  clearRange(range: { readonly gte: string; readonly lt: string }): Promise<void> {
    return this.inner.clearRange(range);
  }

  close(): Promise<void> {
    return this.inner.close();
  }
}
