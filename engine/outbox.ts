import { performance } from 'node:perf_hooks';
import type { KvStore, WriteOp } from '../state/store.js';

/**
 * The durable outbox: every output record (dead letters now; triggers, segment changes and KPI
 * updates as later operators produce them) is appended here during processing and written in the
 * SAME atomic checkpoint batch as the state that produced it. Only after that batch is durable are
 * records handed to sinks, so nothing leaves that the state does not reflect, and nothing the state
 * reflects is lost: after a crash, sinks are re-fed from their durable cursor (at-least-once
 * delivery; sinks de-duplicate on the sequence number).
 *
 * Layout: `o/<seq as 16 hex digits>` → [topic byte][payload]; `c/<sink name>` → last delivered seq.
 * Entries every sink has delivered are deleted.
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

/** A consumer of committed outbox records. Must tolerate re-delivery of records it has seen (same seq). */
export interface OutboxSink {
  readonly name: string;
  /** Topics this sink wants; others are skipped (but still advance its cursor). */
  readonly topics: readonly number[];
  /** `store`: the engine's state store (a sink that keeps its own durable log writes there). */
  open(store: KvStore): Promise<void>;
  deliver(records: readonly OutboxRecord[]): Promise<void>;
  close(): Promise<void>;
}

export function seqKey(seq: number): string {
  return OUTBOX_PREFIX + seq.toString(16).padStart(16, '0');
}

const utf8 = new TextEncoder();
const utf8d = new TextDecoder();

export class Outbox {
  /** Next sequence number to assign. */
  private nextSeq = 1;
  /** Appended this epoch, not yet durable. */
  private pending: OutboxRecord[] = [];
  /** Durable, waiting for delivery to sinks. */
  private committedQueue: OutboxRecord[] = [];
  private readonly sinks: OutboxSink[] = [];
  private readonly cursors = new Map<string, number>();
  private readonly listeners: ((r: OutboxRecord) => void)[] = [];
  private store: KvStore | null = null;
  private firstTriggerAt = Number.NaN;
  appended = 0;

  addSink(sink: OutboxSink): void {
    this.sinks.push(sink);
  }

  /** In-process listener for committed records (library API: onTrigger, onDeadLetter …). */
  listen(fn: (r: OutboxRecord) => void): void {
    this.listeners.push(fn);
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
    for (const sink of this.sinks) {
      await sink.open(store);
      const raw = await store.get(CURSOR_PREFIX + sink.name);
      this.cursors.set(sink.name, raw === undefined ? 0 : Number(utf8d.decode(raw)));
    }
    // Re-feed every sink from its cursor: records committed before a crash but not yet delivered.
    const from = Math.min(...this.sinks.map((s) => this.cursors.get(s.name) ?? 0), nextSeq - 1);
    for await (const entries of store.scan({ gte: seqKey(from + 1), lt: 'o0' }, 1024)) {
      for (const e of entries) {
        this.committedQueue.push({ seq: parseInt(e.key.slice(OUTBOX_PREFIX.length), 16), topic: e.value[0]!, payload: e.value.subarray(1) });
      }
    }
  }

  append(topic: number, payload: Uint8Array): number {
    if (topic === Topic.trigger && Number.isNaN(this.firstTriggerAt)) this.firstTriggerAt = performance.now();
    const seq = this.nextSeq++;
    this.pending.push({ seq, topic, payload });
    this.appended++;
    return seq;
  }

  snapshot(ops: WriteOp[]): void {
    for (const r of this.pending) {
      const value = new Uint8Array(r.payload.length + 1);
      value[0] = r.topic;
      value.set(r.payload, 1);
      ops.push({ type: 'put', key: seqKey(r.seq), value });
    }
  }

  committed(): void {
    this.firstTriggerAt = Number.NaN;
    for (const r of this.pending) {
      this.committedQueue.push(r);
      for (const fn of this.listeners) fn(r);
    }
    this.pending = [];
  }

  /** Delivers committed records to every sink, advances cursors and trims what all have delivered. */
  async drain(): Promise<void> {
    if (this.committedQueue.length === 0 || this.store === null) return;
    const queue = this.committedQueue;
    this.committedQueue = [];
    const ops: WriteOp[] = [];
    let trimTo = queue[queue.length - 1]!.seq;
    for (const sink of this.sinks) {
      const cursor = this.cursors.get(sink.name) ?? 0;
      const wanted = queue.filter((r) => r.seq > cursor && sink.topics.includes(r.topic));
      if (wanted.length > 0) await sink.deliver(wanted);
      const last = queue[queue.length - 1]!.seq;
      this.cursors.set(sink.name, last);
      ops.push({ type: 'put', key: CURSOR_PREFIX + sink.name, value: utf8.encode(String(last)) });
      trimTo = Math.min(trimTo, last);
    }
    for (const r of queue) if (r.seq <= trimTo) ops.push({ type: 'del', key: seqKey(r.seq) });
    await this.store.write(ops);
  }

  async close(): Promise<void> {
    for (const sink of this.sinks) await sink.close();
  }
}
