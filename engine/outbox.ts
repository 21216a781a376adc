import { performance } from 'node:perf_hooks';
import { CrmError, cleanupAll, errorText } from './errors.js';
import type { KvStore, WriteOp } from '../state/store.js';

/**
 * The durable outbox: every output record (dead letters, triggers, segment changes, KPI updates,
 * scale-out routes) is appended here during processing and written in the SAME atomic checkpoint
 * batch as the state that produced it. Only after that batch is durable are records handed to
 * sinks, so nothing leaves that the state does not reflect, and nothing the state reflects is lost.
 *
 * Each sink has its own durable cursor (`c/<sink name>`: the highest seq it has taken). A cursor
 * moves only after that sink's `deliver()` resolved for every record up to it; a record stays in the
 * store until every sink's cursor has passed it (trim = the smallest cursor). A sink that throws is
 * retried from its cursor, in the background, with exponential backoff (`retryBaseMs` doubling up
 * to `retryMaxMs`, jittered), for as long as it keeps failing: it is reported (`sinkStatus()`,
 * `onSinkFailure`), never skipped, and it blocks neither the other sinks nor checkpoints. After a
 * crash every sink is re-fed from its own cursor: delivery is at-least-once, and sinks de-duplicate
 * on the sequence number.
 *
 * Memory: committed records stay in one in-memory window shared by the sinks while some sink still
 * needs them, up to `maxBufferedRecords` / `maxBufferedBytes`; a sink further behind (down for a
 * while) reads its backlog back from the store in pages of `pageRecords`, from its cursor.
 *
 * Layout: `o/<seq as 16 hex digits>` → [topic byte][payload]; `c/<sink name>` → last delivered seq.
 */

export const OUTBOX_PREFIX = 'o/';
export const CURSOR_PREFIX = 'c/';

/** Output topics. Stable numbers (stored): append only. */
export const Topic = {
  deadLetter: 1,
  trigger: 2,
  segmentChange: 3,
  kpiUpdate: 4,
  /** Scale-out: a row (and a moved profile) forwarded to the partition that owns its profile (a `Routed`). */
  route: 5,
  /** Operators outside the core (tests, extensions) use codes from here up. */
  custom: 100,
} as const;

export interface OutboxRecord {
  readonly seq: number;
  readonly topic: number;
  readonly payload: Uint8Array;
}

/**
 * A consumer of committed outbox records. Must tolerate re-delivery of records it has seen (same
 * seq): after a failed `deliver` the outbox calls it again from the sink's cursor, and after a crash
 * from the sink's durable cursor. `deliver` is never called concurrently for one sink; calls get
 * records in ascending seq order.
 */
export interface OutboxSink {
  readonly name: string;
  /** Topics this sink wants; others are skipped (but still advance its cursor). */
  readonly topics: readonly number[];
  /** `store`: the engine's state store (a sink that keeps its own durable log writes there). */
  open(store: KvStore): Promise<void>;
  /** Resolves only when the records are safe in the sink; a throw leaves the cursor where it was. */
  deliver(records: readonly OutboxRecord[]): Promise<void>;
  close(): Promise<void>;
}

/** One sink's delivery state (engine.health(), /readyz, /metrics). */
export interface SinkStatus {
  name: string;
  /** Highest seq this sink has taken (durable or about to be written). */
  cursor: number;
  /** Highest committed seq. `head - cursor` is the sink's lag in records. */
  head: number;
  /** The last delivery attempt threw (cleared by the next success). */
  failing: boolean;
  consecutiveFailures: number;
  failuresTotal: number;
  /** Records this sink has taken (only its topics), since the process started. */
  deliveredTotal: number;
  /** The last error's message (kept after recovery, for diagnosis). */
  lastError: string | null;
  /** Its stable code (a CrmError code, or an errno code such as ENOSPC), when it has one. */
  lastErrorCode: string | null;
}

/** Delivery limits. Every field has a default (OUTBOX_DEFAULTS). */
export interface OutboxOptions {
  /** First retry of a failed sink after about this long (ms, default 100), doubling each failure. */
  readonly retryBaseMs: number;
  /** Retries never wait longer than this (ms, default 30 000). Delays are jittered to 50–100 %. */
  readonly retryMaxMs: number;
  /** Committed records kept in memory for sinks that are behind (default 65 536)… */
  readonly maxBufferedRecords: number;
  /** …and at most this many payload bytes (default 64 MiB); older ones are re-read from the store. */
  readonly maxBufferedBytes: number;
  /** Records per deliver() call and per store read (default 4096). */
  readonly pageRecords: number;
  /**
   * drain() waits for the sinks that are not failing at most this long (ms, default 10 000), then
   * leaves delivery to the background: a sink that just broke holds a checkpoint up this long once.
   */
  readonly drainWaitMs: number;
  /** close() gives sinks this long (ms, default 10 000) to catch up before SINK_STALLED. */
  readonly closeFlushMs: number;
}

export const OUTBOX_DEFAULTS: Readonly<OutboxOptions> = Object.freeze({
  retryBaseMs: 100,
  retryMaxMs: 30_000,
  maxBufferedRecords: 65_536,
  maxBufferedBytes: 64 << 20,
  pageRecords: 4096,
  drainWaitMs: 10_000,
  closeFlushMs: 10_000,
});

/** Trim deletes per store write (a long outage leaves a long range to delete). */
const TRIM_CHUNK = 8192;

export function seqKey(seq: number): string {
  return OUTBOX_PREFIX + seq.toString(16).padStart(16, '0');
}

const utf8 = new TextEncoder();
const utf8d = new TextDecoder();

class SinkState {
  cursor = 0;
  /** The cursor as last written to the store. */
  durable = 0;
  running: Promise<void> | null = null;
  retryTimer: NodeJS.Timeout | null = null;
  failing = false;
  consecutiveFailures = 0;
  failuresTotal = 0;
  deliveredTotal = 0;
  lastError: string | null = null;
  lastErrorCode: string | null = null;
  readonly wants: ReadonlySet<number>;

  constructor(readonly sink: OutboxSink) {
    this.wants = new Set(sink.topics);
  }
}

export class Outbox {
  /** Next sequence number to assign. */
  private nextSeq = 1;
  /** Highest committed (durable) seq. */
  private head = 0;
  /** Appended this epoch, not yet durable. */
  private pending: OutboxRecord[] = [];
  /**
   * Committed records some sink may still need, ascending, from `windowStart`. Every committed
   * record with seq > `windowFloor` is in it; older ones are read from the store.
   */
  private window: OutboxRecord[] = [];
  private windowStart = 0;
  private windowFloor = 0;
  private windowBytes = 0;
  private readonly states: SinkState[] = [];
  private readonly listeners: ((r: OutboxRecord) => void)[] = [];
  private readonly failureListeners: ((status: SinkStatus, err: unknown) => void)[] = [];
  /** Woken whenever a cursor moves or a delivery fails (flush). */
  private readonly waiters = new Set<() => void>();
  private store: KvStore | null = null;
  private firstTriggerAt = Number.NaN;
  /** Every record ≤ this is deleted from the store (or being deleted). */
  private trimmedTo = 0;
  private persistWanted = false;
  private persistLoop: Promise<void> | null = null;
  private persistTimer: NodeJS.Timeout | null = null;
  private closing = false;
  private readonly opts: OutboxOptions;
  appended = 0;
  /** Cursor/trim writes that failed (retried; the records stay until one succeeds). */
  cursorWriteFailures = 0;

  constructor(options: Partial<OutboxOptions> = {}) {
    this.opts = { ...OUTBOX_DEFAULTS, ...options };
  }

  addSink(sink: OutboxSink): void {
    this.states.push(new SinkState(sink));
  }

  /** In-process listener for committed records (library API: onTrigger, onDeadLetter …). */
  listen(fn: (r: OutboxRecord) => void): void {
    this.listeners.push(fn);
  }

  /** Called on every failed delivery attempt (to log or alert); the sink is retried regardless. */
  onSinkFailure(fn: (status: SinkStatus, err: unknown) => void): void {
    this.failureListeners.push(fn);
  }

  get next(): number {
    return this.nextSeq;
  }

  get pendingCount(): number {
    return this.pending.length;
  }

  /** When the oldest trigger not yet checkpointed was appended (performance.now(); NaN: none). */
  get oldestPendingTriggerAt(): number {
    return this.firstTriggerAt;
  }

  async open(store: KvStore, nextSeq: number): Promise<void> {
    this.store = store;
    this.nextSeq = nextSeq;
    this.head = nextSeq - 1;
    this.windowFloor = this.head; // nothing committed before the restart is in memory: read from the store
    for (const s of this.states) {
      await s.sink.open(store);
      const raw = await store.get(CURSOR_PREFIX + s.sink.name);
      const stored = raw === undefined ? 0 : Number(utf8d.decode(raw));
      // A cursor past the head (or unreadable) would skip records: clamp it.
      s.cursor = s.durable = Number.isSafeInteger(stored) && stored >= 0 ? Math.min(stored, this.head) : 0;
    }
    this.trimmedTo = this.minCursor();
    // A crash between a cursor write and the trim of the range it released leaves records every
    // sink has: delete them now (normally an empty range).
    if (this.trimmedTo > 0) {
      const orphans = { gte: OUTBOX_PREFIX, lt: seqKey(this.trimmedTo + 1) };
      let any = false;
      for await (const keys of store.scanKeys({ ...orphans, limit: 1 }, 1)) any ||= keys.length > 0;
      if (any) await store.clearRange(orphans);
    }
  }

  append(topic: number, payload: Uint8Array): number {
    if (topic === Topic.trigger && Number.isNaN(this.firstTriggerAt)) this.firstTriggerAt = performance.now();
    const seq = this.nextSeq++;
    this.pending.push({ seq, topic, payload });
    this.appended++;
    return seq;
  }

  /** Where the outbox stands, to take back what a failed checkpoint appended (see `rollback`). */
  mark(): number {
    return this.pending.length;
  }

  /**
   * A checkpoint's write failed: the records appended since `mark` (operators' snapshots emit
   * some) are taken back, with their sequence numbers, so the retried checkpoint emits them again
   * exactly once.
   */
  rollback(mark: number): void {
    const n = this.pending.length - mark;
    if (n <= 0) return;
    this.pending.length = mark;
    this.nextSeq -= n;
    this.appended -= n;
  }

  snapshot(ops: WriteOp[]): void {
    for (const r of this.pending) {
      const value = new Uint8Array(r.payload.length + 1);
      value[0] = r.topic;
      value.set(r.payload, 1);
      ops.push({ type: 'put', key: seqKey(r.seq), value });
    }
  }

  /** The checkpoint holding the pending records is durable: they join the delivery window. */
  committed(): void {
    this.firstTriggerAt = Number.NaN;
    for (const r of this.pending) {
      this.window.push(r);
      this.windowBytes += r.payload.length;
      for (const fn of this.listeners) fn(r);
    }
    if (this.pending.length > 0) this.head = this.pending[this.pending.length - 1]!.seq;
    this.pending = [];
    this.trimWindow();
  }

  /**
   * Hands committed records to every sink. Waits (at most `drainWaitMs`) for the sinks that are not
   * failing, so a healthy sink has every committed record when this resolves; a failing sink is
   * retried in the background on its backoff. Never throws because of a sink.
   */
  async drain(): Promise<void> {
    if (this.store === null || this.closing) return;
    const waits: Promise<void>[] = [];
    for (const s of this.states) {
      const failingBefore = s.failing;
      this.kick(s);
      if (!failingBefore && s.running !== null) waits.push(s.running);
    }
    if (waits.length > 0) {
      let timer: NodeJS.Timeout | null = null;
      await Promise.race([
        Promise.all(waits),
        new Promise<void>((resolve) => {
          timer = setTimeout(resolve, this.opts.drainWaitMs);
        }),
      ]);
      if (timer !== null) clearTimeout(timer);
    }
    await this.requestPersist();
  }

  /**
   * Resolves when every sink has taken every record committed before the call (and the cursors are
   * written); rejects with SINK_STALLED after `timeoutMs`. Sinks waiting out a backoff are retried
   * at once.
   */
  async flush(timeoutMs: number): Promise<void> {
    if (this.store === null) return;
    const target = this.head;
    const behind = (): SinkState[] => this.states.filter((s) => s.cursor < target);
    for (const s of behind()) {
      if (s.retryTimer !== null) {
        clearTimeout(s.retryTimer);
        s.retryTimer = null;
      }
      this.kick(s);
    }
    if (behind().length > 0) {
      await new Promise<void>((resolve, reject) => {
        const check = (): void => {
          if (behind().length > 0) return;
          clearTimeout(timer);
          this.waiters.delete(check);
          resolve();
        };
        const timer = setTimeout(() => {
          this.waiters.delete(check);
          const late = behind().map((s) => `${s.sink.name} at ${s.cursor}/${target}${s.lastError === null ? '' : ` (${s.lastError})`}`);
          reject(new CrmError('SINK_STALLED', `sinks did not catch up within ${timeoutMs} ms: ${late.join('; ')}`));
        }, timeoutMs);
        this.waiters.add(check);
        check();
      });
    }
    await this.requestPersist();
  }

  /** Committed records held in memory for sinks that are behind (bounded by maxBufferedRecords / maxBufferedBytes). */
  get buffered(): { records: number; bytes: number } {
    return { records: this.window.length - this.windowStart, bytes: this.windowBytes };
  }

  /** Every sink's cursor, lag and failures. */
  sinkStatus(): SinkStatus[] {
    return this.states.map((s) => this.statusOf(s));
  }

  /**
   * Gives sinks `closeFlushMs` to catch up (SINK_STALLED otherwise: the records stay in the store and
   * go out at the next start), then closes every sink even if one throws; errors are combined.
   */
  async close(): Promise<void> {
    if (this.closing) return;
    let stalled: unknown = null;
    if (this.store !== null && this.states.length > 0) {
      try {
        await this.flush(this.opts.closeFlushMs);
      } catch (err) {
        stalled = err;
      }
    }
    this.closing = true;
    for (const s of this.states) {
      if (s.retryTimer !== null) clearTimeout(s.retryTimer);
      s.retryTimer = null;
    }
    if (this.persistTimer !== null) clearTimeout(this.persistTimer);
    this.persistTimer = null;
    // A delivery still in progress (a sink that hangs) is not waited for past the flush above: its
    // records are in the store and go out again at the next start.
    if (stalled === null) await Promise.all(this.states.map((s) => s.running));
    await this.requestPersist();
    await cleanupAll([
      ...this.states.map((s) => () => s.sink.close()),
      () => {
        if (stalled !== null) throw stalled;
      },
    ]);
    this.store = null;
  }

  private statusOf(s: SinkState): SinkStatus {
    return {
      name: s.sink.name, cursor: s.cursor, head: this.head, failing: s.failing, consecutiveFailures: s.consecutiveFailures,
      failuresTotal: s.failuresTotal, deliveredTotal: s.deliveredTotal, lastError: s.lastError, lastErrorCode: s.lastErrorCode,
    };
  }

  private minCursor(): number {
    let min = this.head;
    for (const s of this.states) if (s.cursor < min) min = s.cursor;
    return min;
  }

  /** Starts a delivery pass unless one runs, the sink waits out a backoff, or it has everything. */
  private kick(s: SinkState): void {
    if (this.closing || this.store === null || s.running !== null || s.retryTimer !== null || s.cursor >= this.head) return;
    s.running = this.run(s);
  }

  private async run(s: SinkState): Promise<void> {
    try {
      await this.pass(s);
    } catch (err) {
      this.failed(s, err);
    } finally {
      s.running = null;
    }
    this.trimWindow();
    this.schedulePersist();
    this.notify();
  }

  /** Delivers pages from the sink's cursor until it reaches the head (which may move meanwhile). */
  private async pass(s: SinkState): Promise<void> {
    while (!this.closing && s.cursor < this.head) {
      const page = await this.page(s.cursor);
      if (page.length === 0) {
        // Nothing stored past the cursor: those records were trimmed before this sink existed.
        s.cursor = this.head;
        break;
      }
      const wanted = page.filter((r) => s.wants.has(r.topic));
      if (wanted.length > 0) await s.sink.deliver(wanted);
      s.cursor = page[page.length - 1]!.seq;
      s.deliveredTotal += wanted.length;
      if (s.failing) {
        s.failing = false;
        s.consecutiveFailures = 0;
      }
      this.notify();
    }
  }

  /** Up to `pageRecords` committed records after `cursor`: from memory when there, else the store. */
  private async page(cursor: number): Promise<OutboxRecord[]> {
    const n = this.opts.pageRecords;
    if (cursor >= this.windowFloor) {
      const w = this.window;
      let lo = this.windowStart;
      let hi = w.length;
      while (lo < hi) {
        const mid = (lo + hi) >>> 1;
        if (w[mid]!.seq <= cursor) lo = mid + 1;
        else hi = mid;
      }
      return w.slice(lo, Math.min(w.length, lo + n));
    }
    const out: OutboxRecord[] = [];
    const store = this.store!;
    for await (const entries of store.scan({ gte: seqKey(cursor + 1), lt: seqKey(this.head + 1), limit: n }, n)) {
      for (const e of entries) out.push({ seq: parseInt(e.key.slice(OUTBOX_PREFIX.length), 16), topic: e.value[0]!, payload: e.value.subarray(1) });
    }
    return out;
  }

  private failed(s: SinkState, err: unknown): void {
    s.failing = true;
    s.consecutiveFailures++;
    s.failuresTotal++;
    s.lastError = errorText(err);
    s.lastErrorCode = errorCode(err);
    if (!this.closing) {
      const exp = Math.min(this.opts.retryMaxMs, this.opts.retryBaseMs * 2 ** Math.min(s.consecutiveFailures - 1, 30));
      const delay = exp / 2 + Math.random() * (exp / 2);
      s.retryTimer = setTimeout(() => {
        s.retryTimer = null;
        this.kick(s);
      }, delay);
      // A pending retry does not keep a process alive: the records wait in the store.
      s.retryTimer.unref();
    }
    const status = this.statusOf(s);
    for (const fn of this.failureListeners) {
      try {
        fn(status, err);
      } catch {
        // A listener's own failure must not stop delivery or hide the sink's.
      }
    }
  }

  /** Drops from memory what every sink has taken, then the oldest records past the bounds. */
  private trimWindow(): void {
    const min = this.minCursor();
    const w = this.window;
    let i = this.windowStart;
    while (i < w.length && (w[i]!.seq <= min || w.length - i > this.opts.maxBufferedRecords || this.windowBytes > this.opts.maxBufferedBytes)) {
      this.windowBytes -= w[i]!.payload.length;
      this.windowFloor = w[i]!.seq;
      i++;
    }
    if (i === w.length) {
      this.window = [];
      this.windowStart = 0;
      this.windowBytes = 0;
    } else if (i > 1024 && i > (w.length >>> 1)) {
      this.window = w.slice(i);
      this.windowStart = 0;
    } else {
      this.windowStart = i;
    }
  }

  private notify(): void {
    for (const fn of [...this.waiters]) fn();
  }

  /** Background passes write their cursors on the next turn, several sinks' in one write. */
  private schedulePersist(): void {
    if (this.persistTimer !== null || this.closing) return;
    this.persistTimer = setTimeout(() => {
      this.persistTimer = null;
      void this.requestPersist();
    }, 0);
  }

  /** Writes moved cursors and trims what every sink has; resolves when what was asked is written (or failed). */
  private requestPersist(): Promise<void> {
    this.persistWanted = true;
    if (this.persistLoop === null) {
      // The `await` puts the reset after this assignment even when there is nothing to write.
      this.persistLoop = (async () => {
        try {
          await this.runPersist();
        } finally {
          this.persistLoop = null;
        }
      })();
    }
    return this.persistLoop;
  }

  private async runPersist(): Promise<void> {
    while (this.persistWanted && this.store !== null) {
      this.persistWanted = false;
      const ops: WriteOp[] = [];
      const moved: [SinkState, number][] = [];
      for (const s of this.states) {
        if (s.cursor !== s.durable) {
          ops.push({ type: 'put', key: CURSOR_PREFIX + s.sink.name, value: utf8.encode(String(s.cursor)) });
          moved.push([s, s.cursor]);
        }
      }
      // Records at or below every cursor written here (or already durable) go, in chunks.
      const trimTo = Math.min(this.minCursor(), this.trimmedTo + TRIM_CHUNK);
      for (let seq = this.trimmedTo + 1; seq <= trimTo; seq++) ops.push({ type: 'del', key: seqKey(seq) });
      if (ops.length === 0) continue;
      try {
        await this.store.write(ops);
      } catch {
        // The cursors stay where they were on disk (re-delivery after a crash, never a gap) and
        // the records stay stored; try again shortly.
        this.cursorWriteFailures++;
        if (!this.closing && this.persistTimer === null) {
          this.persistTimer = setTimeout(() => {
            this.persistTimer = null;
            void this.requestPersist();
          }, this.opts.retryBaseMs);
          this.persistTimer.unref();
        }
        return;
      }
      for (const [s, c] of moved) s.durable = c;
      this.trimmedTo = trimTo;
      if (this.trimmedTo < this.minCursor()) this.persistWanted = true;
    }
  }
}

function errorCode(err: unknown): string | null {
  if (err instanceof CrmError) return err.code;
  const code = typeof err === 'object' && err !== null ? (err as { code?: unknown }).code : undefined;
  return typeof code === 'string' ? code : null;
}
