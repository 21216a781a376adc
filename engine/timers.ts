import type { TimerApi } from '../operators/operator.js';
import type { KvStore, WriteOp } from '../state/store.js';

/**
 * Durable per-user event-time timers.
 *
 * Every timer is a key in the store, `t/<ts as 13 hex digits>|<kind>|<user>`, so the store's key
 * order is fire order (event time, then kind, then user) and "everything due by W" is one range
 * scan. In memory the service keeps only what can fire soon:
 * - `due`: a heap of timers with ts ≤ `loadedUpTo`, loaded from the store before each batch
 *   (`preload`, an async range scan at the batch boundary) plus new registrations in that range;
 * - `future`: registrations beyond `loadedUpTo` that are not yet durable (dropped after the
 *   checkpoint writes them: the store has them then).
 * `pending` holds this epoch's puts and deletes; they go into the checkpoint batch, so a timer's
 * registration, its firing (delete) and the state change it caused are durable together: after a
 * crash a timer fires again only if the state it changed was also rolled back — exactly once.
 */

const TS_HEX = 13; // 16^13 ms ≈ 142 000 years
export const TIMER_PREFIX = 't/';

export function timerKey(ts: number, kind: string, user: string): string {
  return ts.toString(16).padStart(TS_HEX, '0') + '|' + kind + '|' + user;
}

export interface DueTimer {
  ts: number;
  kind: string;
  user: string;
}

/** Parses a timer key written by timerKey into `out` (reused; no allocation per timer beyond substrings). */
export function parseTimerKey(key: string, out: DueTimer): DueTimer {
  out.ts = parseInt(key.slice(0, TS_HEX), 16);
  const bar = key.indexOf('|', TS_HEX + 1);
  out.kind = key.slice(TS_HEX + 1, bar);
  out.user = key.slice(bar + 1);
  return out;
}

function tsOfKey(key: string): number {
  return parseInt(key.slice(0, TS_HEX), 16);
}

/** A binary min-heap of strings (timer keys sort in fire order). */
class StringHeap {
  private a: string[] = [];
  get size(): number {
    return this.a.length;
  }
  peek(): string | undefined {
    return this.a[0];
  }
  push(k: string): void {
    const a = this.a;
    let i = a.length;
    a.push(k);
    while (i > 0) {
      const p = (i - 1) >> 1;
      if (a[p]! <= k) break;
      a[i] = a[p]!;
      i = p;
    }
    a[i] = k;
  }
  pop(): string | undefined {
    const a = this.a;
    const top = a[0];
    const last = a.pop();
    if (a.length > 0 && last !== undefined) {
      let i = 0;
      const n = a.length;
      for (;;) {
        const l = 2 * i + 1;
        if (l >= n) break;
        const r = l + 1;
        const c = r < n && a[r]! < a[l]! ? r : l;
        if (a[c]! >= last) break;
        a[i] = a[c]!;
        i = c;
      }
      a[i] = last;
    }
    return top;
  }
  clear(): void {
    this.a = [];
  }
}

export class TimerService implements TimerApi {
  private readonly due = new StringHeap();
  private readonly future = new StringHeap();
  /** Keys currently scheduled and present in `due` (a heap entry not in here is stale: skipped). */
  private readonly live = new Set<string>();
  /** This epoch's changes: key → true (put) / false (delete). */
  private readonly pending = new Map<string, boolean>();
  /** Every durable timer with ts ≤ this is in `due` (or was fired / cancelled). */
  private loadedUpTo = -1;
  private store: KvStore | null = null;
  /** Fired since start (metrics). */
  fired = 0;

  async open(store: KvStore, loadedUpTo: number): Promise<void> {
    this.store = store;
    this.loadedUpTo = -1;
    await this.preload(loadedUpTo);
  }

  register(user: string, kind: string, ts: number): void {
    const key = timerKey(ts, kind, user);
    if (this.live.has(key)) return;
    this.pending.set(key, true);
    if (ts <= this.loadedUpTo) {
      this.live.add(key);
      this.due.push(key);
    } else {
      this.future.push(key);
    }
  }

  cancel(user: string, kind: string, ts: number): void {
    const key = timerKey(ts, kind, user);
    this.live.delete(key);
    this.pending.set(key, false);
  }

  /** Event time of the earliest loaded live timer, or +Infinity. */
  nextDue(): number {
    for (;;) {
      const top = this.due.peek();
      if (top === undefined) return Number.POSITIVE_INFINITY;
      if (this.live.has(top)) return tsOfKey(top);
      this.due.pop(); // stale (cancelled or fired)
    }
  }

  /**
   * Removes and returns the next live timer with ts ≤ upTo, or undefined. The caller fires it; its
   * deletion is part of this epoch's checkpoint.
   */
  popDue(upTo: number, out: DueTimer): DueTimer | undefined {
    for (;;) {
      const top = this.due.peek();
      if (top === undefined) return undefined;
      if (!this.live.has(top)) {
        this.due.pop();
        continue;
      }
      if (tsOfKey(top) > upTo) return undefined;
      this.due.pop();
      this.live.delete(top);
      this.pending.set(top, false);
      this.fired++;
      return parseTimerKey(top, out);
    }
  }

  /**
   * Makes sure every timer with ts ≤ upTo is in `due`: scans the store range (loadedUpTo, upTo] and
   * takes this epoch's not-yet-durable registrations from `future`. Called at batch boundaries only.
   */
  async preload(upTo: number): Promise<void> {
    if (upTo <= this.loadedUpTo || this.store === null) return;
    const from = TIMER_PREFIX + timerKey(this.loadedUpTo + 1, '', '');
    const to = TIMER_PREFIX + timerKey(upTo + 1, '', '');
    for await (const entries of this.store.scan({ gte: from, lt: to }, 4096)) {
      for (const e of entries) {
        const key = e.key.slice(TIMER_PREFIX.length);
        if (this.pending.get(key) === false || this.live.has(key)) continue;
        this.live.add(key);
        this.due.push(key);
      }
    }
    for (let top = this.future.peek(); top !== undefined && tsOfKey(top) <= upTo; top = this.future.peek()) {
      this.future.pop();
      if (this.pending.get(top) === true && !this.live.has(top)) {
        this.live.add(top);
        this.due.push(top);
      }
    }
    this.loadedUpTo = upTo;
  }

  /** Adds this epoch's timer changes to the checkpoint batch. */
  snapshot(ops: WriteOp[]): void {
    for (const [key, put] of this.pending) {
      ops.push(put ? { type: 'put', key: TIMER_PREFIX + key, value: EMPTY } : { type: 'del', key: TIMER_PREFIX + key });
    }
  }

  /** The checkpoint is durable: this epoch's changes are in the store now. */
  committed(): void {
    this.pending.clear();
    // Everything in `future` is durable now and will be found by the next preload scan.
    this.future.clear();
  }

  get loadedHorizon(): number {
    return this.loadedUpTo;
  }

  get pendingCount(): number {
    return this.pending.size;
  }
}

const EMPTY = new Uint8Array(0);
