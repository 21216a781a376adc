import type { KvStore, WriteOp } from '../state/store.js';
import { hashA, hashB } from './hash.js';

/**
 * De-duplication on event_id within a horizon of event time (default 7 days).
 *
 * Remembers a 64-bit fingerprint of each accepted event id (two independent 32-bit FNV-1a variants)
 * with the event-time day it was seen, in an open-addressing table of typed arrays: 12 bytes an id,
 * no object per id, so a week of ids at high rates fits in memory. The price is a false "duplicate"
 * with probability ≈ n²/2⁶⁵ for n remembered ids (≈ 3·10⁻⁶ for 10 million): documented, not hidden.
 *
 * Durability: ids added in an epoch go into the checkpoint as one delta record `d/<epoch>`; when days
 * expire, the table is rebuilt and the next checkpoint replaces every delta with one snapshot. So
 * a restart remembers exactly the ids of the checkpointed state.
 */

const DAY = 86_400_000;
export const DEDUPE_PREFIX = 'd/';

export class DedupeIndex {
  private cap: number;
  /**
   * The table, one entry per 16 bytes: [hi, lo, day + 1 of the first sighting (0 = empty), unused].
   * Interleaved so a probe touches one cache line, not three arrays: at millions of ids every probe
   * is a cache miss, and that latency is the cost of de-duplication.
   */
  private t: Uint32Array;
  private count = 0;
  /** Entries added this epoch, as (hi, lo, day+1) triples. */
  private delta: number[] = [];
  /** Delta records in the store; replaced by one snapshot after a rebuild. */
  private storedKeys: string[] = [];
  private rebuilt = false;
  /** The record the pending checkpoint writes (null: none). */
  private snapshotKey: string | null = null;
  private oldestDay = 0;
  private readonly horizonDays: number;

  constructor(horizonMs: number, initialCapacity = 1 << 16) {
    this.horizonDays = Math.ceil(horizonMs / DAY);
    this.cap = initialCapacity;
    this.t = new Uint32Array(this.cap * 4);
  }

  get size(): number {
    return this.count;
  }

  /**
   * True if `eventId` was seen within the horizon; otherwise remembers it (seen at event time `ts`)
   * and returns false. One probe sequence serves both the lookup and the insert.
   */
  checkAndAdd(eventId: string, ts: number): boolean {
    if ((this.count + 1) * 2 > this.cap) this.resize(this.cap * 2);
    const a = hashA(0, eventId);
    const b = hashB(0, eventId);
    const t = this.t;
    const mask = this.cap - 1;
    let i = (a ^ Math.imul(b, 0x9e3779b1)) & mask;
    for (;;) {
      const p = i << 2;
      if (t[p + 2] === 0) {
        const d = Math.floor(ts / DAY) + 1;
        t[p] = a;
        t[p + 1] = b;
        t[p + 2] = d;
        this.count++;
        this.delta.push(a, b, d);
        return false;
      }
      if (t[p] === a && t[p + 1] === b) return true;
      i = (i + 1) & mask;
    }
  }

  private insert(a: number, b: number, d: number): void {
    if ((this.count + 1) * 2 > this.cap) this.resize(this.cap * 2);
    const t = this.t;
    const mask = this.cap - 1;
    let i = (a ^ Math.imul(b, 0x9e3779b1)) & mask;
    while (t[(i << 2) + 2] !== 0) {
      if (t[i << 2] === a && t[(i << 2) + 1] === b) return;
      i = (i + 1) & mask;
    }
    const p = i << 2;
    t[p] = a;
    t[p + 1] = b;
    t[p + 2] = d;
    this.count++;
  }

  private resize(cap: number, minDay = 0): void {
    const old = this.t;
    this.cap = cap;
    this.t = new Uint32Array(cap * 4);
    this.count = 0;
    for (let p = 0; p < old.length; p += 4) {
      const d = old[p + 2]!;
      if (d !== 0 && d >= minDay) this.insert(old[p]!, old[p + 1]!, d);
    }
  }

  /**
   * Forgets ids first seen before (watermark − horizon). Call when the watermark changes; does work
   * only when the cutoff day moves, i.e. about once per event-time day.
   */
  expire(watermark: number): void {
    const cutoff = Math.floor(watermark / DAY) + 1 - this.horizonDays;
    if (cutoff <= this.oldestDay) return;
    this.oldestDay = cutoff;
    let cap = this.cap;
    this.resize(cap, cutoff);
    while (cap > 1 << 16 && this.count * 8 < cap) cap >>= 1;
    if (cap !== this.cap) this.resize(cap, cutoff);
    this.delta = [];
    this.rebuilt = true;
  }

  /** Adds this epoch's changes to the checkpoint batch. Pure: `committed()` applies the bookkeeping. */
  snapshot(ops: WriteOp[], epoch: number): void {
    const key = DEDUPE_PREFIX + epoch.toString(16).padStart(12, '0');
    this.snapshotKey = null;
    if (this.rebuilt) {
      for (const k of this.storedKeys) ops.push({ type: 'del', key: k });
      const all: number[] = [];
      const t = this.t;
      for (let p = 0; p < t.length; p += 4) if (t[p + 2] !== 0) all.push(t[p]!, t[p + 1]!, t[p + 2]!);
      ops.push({ type: 'put', key, value: new Uint8Array(Uint32Array.from(all).buffer) });
      this.snapshotKey = key;
    } else if (this.delta.length > 0) {
      ops.push({ type: 'put', key, value: new Uint8Array(Uint32Array.from(this.delta).buffer) });
      this.snapshotKey = key;
    }
  }

  /** The checkpoint is durable (if it failed, nothing changed here and the next one retries). */
  committed(): void {
    if (this.rebuilt) this.storedKeys = [];
    if (this.snapshotKey !== null) this.storedKeys.push(this.snapshotKey);
    this.snapshotKey = null;
    this.delta = [];
    this.rebuilt = false;
  }

  async open(store: KvStore, oldestDay: number): Promise<void> {
    this.oldestDay = oldestDay;
    const records: Uint8Array[] = [];
    let entries = 0;
    for await (const batch of store.scan({ gte: DEDUPE_PREFIX, lt: 'd0' }, 64)) {
      for (const e of batch) {
        this.storedKeys.push(e.key);
        records.push(e.value);
        entries += Math.floor(e.value.length / 12);
      }
    }
    // Size the table once for everything stored: growing by doubling from 64 k slots would
    // rehash millions of ids several times on every restart.
    let cap = this.cap;
    while ((this.count + entries) * 2 > cap) cap *= 2;
    if (cap !== this.cap) this.resize(cap);
    for (const value of records) {
      // Copy: a Uint32Array view must be 4-byte aligned, store buffers need not be.
      const words = new Uint32Array(value.slice().buffer);
      for (let i = 0; i + 2 < words.length; i += 3) this.insert(words[i]!, words[i + 1]!, words[i + 2]!);
    }
  }

  get oldest(): number {
    return this.oldestDay;
  }
}
