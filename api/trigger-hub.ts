import { crmstream } from './proto/gen/crmstream.js';
import { Topic, type OutboxRecord, type OutboxSink } from '../engine/outbox.js';
import type { KvStore } from '../state/store.js';

/**
 * Trigger delivery to sender groups (docs/API.md `/v1/triggers`): at-least-once, per-group durable
 * cursors, bounded memory.
 *
 * The hub is an outbox sink: committed triggers are appended to a durable log in the engine's store
 * (`r/<seq>`, the outbox sequence) before the outbox moves its own cursor past them, so a trigger the
 * state reflects is never lost. Each sender group has a cursor (`rc/<group>` = the highest seq it
 * acked, cumulatively). A connected group is fed from the log in pages, at most `maxInFlight` unacked
 * frames, and only while its socket takes them (`send` result and buffered amount): a slow or gone
 * sender costs the log's disk, not memory. The log is trimmed below the slowest known group's cursor
 * (and to `retentionSeqs` behind the head, so an abandoned group cannot hold it forever).
 */

const LOG = 'r/';
const CURSOR = 'rc/';
const CURSOR_FLUSH_MS = 100;
const logKey = (seq: number): string => LOG + seq.toString(16).padStart(16, '0');
const utf8 = new TextEncoder();
const utf8d = new TextDecoder();

/** What the hub needs from a socket (uWebSockets' WebSocket, wrapped by the server). */
export interface TriggerSocket {
  /** Sends one frame; false when the socket is backpressured (stop until drain) or closed. */
  send(frame: Uint8Array | string): boolean;
  bufferedAmount(): number;
  readonly json: boolean;
  readonly closed: boolean;
}

export interface GroupSubscription {
  group: string;
  channels: readonly string[];
  campaigns: readonly string[];
  resumeFrom: number;
  maxInFlight: number;
}

interface Conn {
  readonly sub: GroupSubscription;
  readonly socket: TriggerSocket;
  readonly channels: ReadonlySet<string> | null;
  readonly campaigns: ReadonlySet<string> | null;
  /** Delivered up to here (acked, or skipped by the filter with nothing in flight). */
  cursor: number;
  /** Read from the log up to here. */
  readTo: number;
  /** Sent, not yet acked (ascending). */
  inFlight: number[];
  pumping: boolean;
  gone: boolean;
}

export interface TriggerHubOptions {
  /** Stop feeding a socket whose send buffer holds more than this (bytes). */
  maxBufferedBytes: number;
  /** Keep at most this many outbox sequence numbers of log behind the head. */
  retentionSeqs: number;
}

export class TriggerHub implements OutboxSink {
  readonly name = 'trigger-hub';
  readonly topics: readonly number[] = [Topic.trigger];
  private store: KvStore | null = null;
  private head = 0;
  private readonly cursors = new Map<string, number>();
  private readonly conns = new Map<string, Conn>();
  private readonly dirtyCursors = new Set<string>();
  private flushTimer: NodeJS.Timeout | null = null;
  private readonly opts: TriggerHubOptions;
  /** Metrics. */
  delivered = 0;
  logged = 0;
  /** The newest trigger's arrival in the hub (hrtime ns) by seq, for the delivery-latency metric; bounded. */
  private readonly arrived = new Map<number, bigint>();
  onDelivered: ((latencyNs: bigint) => void) | null = null;

  constructor(opts: Partial<TriggerHubOptions> = {}) {
    this.opts = { maxBufferedBytes: opts.maxBufferedBytes ?? 1 << 20, retentionSeqs: opts.retentionSeqs ?? 5_000_000 };
  }

  async open(store: KvStore): Promise<void> {
    this.store = store;
    for await (const entries of store.scan({ gte: LOG, lt: 'r0', reverse: true, limit: 1 }, 1)) {
      for (const e of entries) this.head = parseInt(e.key.slice(LOG.length), 16);
    }
    for await (const entries of store.scan({ gte: CURSOR, lt: 'rc0' }, 1024)) {
      for (const e of entries) this.cursors.set(e.key.slice(CURSOR.length), Number(utf8d.decode(e.value)));
    }
  }

  /** Committed triggers: into the log (awaited: the outbox advances its cursor only after), then out to the groups. */
  async deliver(records: readonly OutboxRecord[]): Promise<void> {
    if (records.length === 0) return;
    await this.store!.write(records.map((r) => ({ type: 'put' as const, key: logKey(r.seq), value: r.payload })));
    this.head = records[records.length - 1]!.seq;
    this.logged += records.length;
    const now = process.hrtime.bigint();
    if (this.arrived.size < 100_000) for (const r of records) this.arrived.set(r.seq, now);
    for (const c of this.conns.values()) void this.pump(c);
  }

  async close(): Promise<void> {
    if (this.flushTimer !== null) clearTimeout(this.flushTimer);
    await this.flushCursors();
    for (const c of this.conns.values()) c.gone = true;
    this.conns.clear();
    this.onDelivered = null;
    this.store = null; // the engine closes the store; a closed hub keeps no reference to it
  }

  /** A group connects. Returns the seq delivery starts after, or null if the group is already connected. */
  connect(sub: GroupSubscription, socket: TriggerSocket): number | null {
    if (this.conns.has(sub.group)) return null;
    const stored = this.cursors.get(sub.group) ?? 0;
    const from = Math.max(stored, sub.resumeFrom);
    const c: Conn = {
      sub, socket, cursor: from, readTo: from, inFlight: [], pumping: false, gone: false,
      channels: sub.channels.length > 0 ? new Set(sub.channels) : null,
      campaigns: sub.campaigns.length > 0 ? new Set(sub.campaigns) : null,
    };
    this.conns.set(sub.group, c);
    if (!this.cursors.has(sub.group)) this.saveCursor(sub.group, from);
    void this.pump(c);
    return from;
  }

  disconnect(group: string, socket: TriggerSocket): void {
    const c = this.conns.get(group);
    if (c === undefined || c.socket !== socket) return;
    c.gone = true;
    this.conns.delete(group);
  }

  /** Cumulative ack from a group's connection. */
  ack(group: string, seq: number): void {
    const c = this.conns.get(group);
    if (c === undefined || seq <= c.cursor) return;
    // Never past what was sent: an ack for the future would skip triggers the sender never saw.
    const upTo = Math.min(seq, c.readTo);
    c.cursor = upTo;
    let k = 0;
    while (k < c.inFlight.length && c.inFlight[k]! <= upTo) k++;
    if (k > 0) c.inFlight.splice(0, k);
    this.saveCursor(group, upTo);
    void this.pump(c);
  }

  /** The socket drained: feed it again. */
  drained(group: string): void {
    const c = this.conns.get(group);
    if (c !== undefined) void this.pump(c);
  }

  /**
   * Cursors are saved at most every CURSOR_FLUSH_MS, all dirty ones in one write: an ack per frame
   * would otherwise cost a synced write each. A crash loses at most that much ack progress, which
   * at-least-once delivery tolerates (those triggers are sent again, same ids).
   */
  private saveCursor(group: string, seq: number): void {
    this.cursors.set(group, seq);
    this.dirtyCursors.add(group);
    if (this.flushTimer === null) {
      this.flushTimer = setTimeout(() => void this.flushCursors(), CURSOR_FLUSH_MS);
      this.flushTimer.unref();
    }
  }

  private async flushCursors(): Promise<void> {
    this.flushTimer = null;
    if (this.dirtyCursors.size === 0 || this.store === null) return;
    const ops = [...this.dirtyCursors].map((g) => ({ type: 'put' as const, key: CURSOR + g, value: utf8.encode(String(this.cursors.get(g))) }));
    this.dirtyCursors.clear();
    await this.store.write(ops).catch(() => undefined);
  }

  private async pump(c: Conn): Promise<void> {
    if (c.pumping || c.gone || this.store === null) return;
    c.pumping = true;
    try {
      for (;;) {
        const room = c.sub.maxInFlight - c.inFlight.length;
        if (c.gone || room <= 0 || c.readTo >= this.head || c.socket.closed) break;
        if (c.socket.bufferedAmount() > this.opts.maxBufferedBytes) break; // drain() resumes
        let blocked = false;
        let read = 0;
        for await (const entries of this.store!.scan({ gte: logKey(c.readTo + 1), lt: 'r0', limit: Math.min(256, room) }, 256)) {
          for (const e of entries) {
            if (c.gone || blocked) break;
            read++;
            const seq = parseInt(e.key.slice(LOG.length), 16);
            const t = crmstream.v1.Trigger.decode(e.value);
            c.readTo = seq;
            if (!this.wanted(c, t)) continue;
            t.seq = seq;
            c.inFlight.push(seq);
            const frame = c.socket.json ? JSON.stringify({ trigger: t }) : crmstream.v1.ServerFrame.encode({ trigger: t }).finish();
            if (!c.socket.send(frame)) blocked = true;
            this.delivered++;
            const at = this.arrived.get(seq);
            if (at !== undefined) {
              this.arrived.delete(seq);
              this.onDelivered?.(process.hrtime.bigint() - at);
            }
          }
        }
        // Everything read was filtered out and nothing is in flight: the group is done up to here.
        if (c.inFlight.length === 0 && c.readTo > c.cursor) {
          c.cursor = c.readTo;
          this.saveCursor(c.sub.group, c.cursor);
        }
        if (blocked || read === 0) break;
      }
    } finally {
      c.pumping = false;
    }
  }

  private wanted(c: Conn, t: crmstream.v1.Trigger): boolean {
    if (c.campaigns !== null && !c.campaigns.has(t.campaign_id)) return false;
    if (c.channels !== null && !t.channels.some((ch) => c.channels!.has(ch))) return false;
    return true;
  }

  /** Deletes the log below every known group's cursor (and beyond the retention). */
  async trim(): Promise<void> {
    if (this.store === null) return;
    let low = this.head;
    for (const v of this.cursors.values()) low = Math.min(low, v);
    low = Math.max(low, this.head - this.opts.retentionSeqs);
    if (this.cursors.size === 0) low = this.head - this.opts.retentionSeqs;
    if (low <= 0) return;
    await this.store.clearRange({ gte: LOG, lt: logKey(low + 1) });
    for (const seq of this.arrived.keys()) if (seq <= low) this.arrived.delete(seq);
  }

  /** Metrics: connected groups and their lag (head − cursor). */
  groups(): { group: string; cursor: number; inFlight: number; connected: boolean }[] {
    return [...this.cursors].map(([group, cursor]) => {
      const c = this.conns.get(group);
      return { group, cursor: c?.cursor ?? cursor, inFlight: c?.inFlight.length ?? 0, connected: c !== undefined };
    });
  }

  get headSeq(): number {
    return this.head;
  }
}
