import { z } from 'zod';
import { crmstream } from './proto/gen/crmstream.js';
import { CrmError } from '../engine/errors.js';
import { Topic, type OutboxRecord, type OutboxSink } from '../engine/outbox.js';
import type { KvStore, WriteOp } from '../state/store.js';

/**
 * Trigger delivery to sender groups (docs/API.md `/v1/triggers`): at-least-once, per-group durable
 * cursors, bounded memory, bounded disk.
 *
 * The hub is an outbox sink: committed triggers are appended to a durable log in the engine's store
 * (`r/<seq>`, the outbox sequence) before the outbox moves its own cursor past them, so a trigger the
 * state reflects is never lost. Each sender group has a cursor (`rc/<group>` = the highest seq it
 * acked, cumulatively). A connected group is fed from the log in pages, at most `maxInFlight` unacked
 * frames, and only while its socket takes them (`send` result and buffered amount): a slow or gone
 * sender costs the log's disk, not memory.
 *
 * The log is trimmed below the slowest known group's cursor, and to `retention` TRIGGERS (not outbox
 * sequence numbers, which dead letters, segment and KPI changes share), so an abandoned group cannot
 * hold the disk forever. A retention trim that passes a group's cursor is never silent: the group's
 * cursor moves to the cut together with a gap notice (`rg/<group>`: the skipped range and how many
 * triggers it held) in one write, before the log is deleted; the notice goes to the group as a `gap`
 * frame (at once when connected, else right after its next `subscribed`), and `gaps()` counts it.
 */

const LOG = 'r/';
const LOG_END = 'r0';
const CURSOR = 'rc/';
const CURSOR_END = 'rc0';
const GAP = 'rg/';
const GAP_END = 'rg0';
const CURSOR_FLUSH_MS = 100;
/** Log keys read and deleted per trim step; a larger backlog is trimmed over several steps. */
const TRIM_PAGE = 65_536;
/** Trim steps per `trim()` call (the server calls it every 2 s): bounds one call's work. */
const TRIM_STEPS = 16;
const logKey = (seq: number): string => LOG + seq.toString(16).padStart(16, '0');
const logSeq = (key: string): number => parseInt(key.slice(LOG.length), 16);
const utf8 = new TextEncoder();
const utf8d = new TextDecoder();

/** A stored sequence number: decimal digits, a safe integer; anything else is NaN. */
function parseSeqText(s: string): number {
  return /^\d{1,16}$/.test(s) && Number.isSafeInteger(Number(s)) ? Number(s) : Number.NaN;
}

/**
 * The trigger settings of the `server` section (docs/API.md "Limits"), validated once. Every field
 * has its default here.
 */
export const TriggerHubConfigSchema = z.object({
  /** Triggers kept in the log behind the head for groups that have not acked them. Opening reads the log's keys once (about a second per million). */
  triggerRetention: z.number().int().min(1).default(1_000_000),
  /** Stop feeding a sender socket whose send buffer holds more than this (bytes); resumes on drain. */
  maxBufferedBytes: z.number().int().min(1024).default(1 << 20),
  /** Sender groups the hub knows (each has a durable cursor that pins the log); a new one beyond is refused (`too_many_groups`). */
  maxGroups: z.number().int().min(1).max(100_000).default(64),
  /** Where a group seen for the first time starts: `head` = only triggers decided after it first subscribes; `earliest` = every trigger still in the log. */
  newGroupStart: z.enum(['head', 'earliest']).default('head'),
}).strict();
export type TriggerHubConfig = z.output<typeof TriggerHubConfigSchema>;

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

/** Triggers a group's cursor passed without an ack because the retention trimmed them (inclusive seqs). */
export interface TriggerGap {
  from: number;
  to: number;
  /** Triggers in the range, before the subscription's channel/campaign filters. */
  count: number;
}

export type ConnectResult =
  | { ok: true; from: number; gap: TriggerGap | null }
  | { ok: false; code: 'group_busy' | 'too_many_groups'; message: string };

export type AckResult = { ok: true } | { ok: false; code: 'bad_ack'; message: string };

interface Conn {
  readonly sub: GroupSubscription;
  readonly socket: TriggerSocket;
  readonly channels: ReadonlySet<string> | null;
  readonly campaigns: ReadonlySet<string> | null;
  /** Delivered up to here (acked, or skipped by the filter with nothing in flight). */
  cursor: number;
  /** Read from the log up to here: every seq in (cursor, readTo] was sent or filtered out. */
  readTo: number;
  /** Sent, not yet acked (ascending). */
  inFlight: number[];
  pumping: boolean;
  gone: boolean;
}

/** Per-group gap figures for metrics and health (since the process started). */
interface GapTotal {
  gaps: number;
  skipped: number;
  lastAt: number;
}

export class TriggerHub implements OutboxSink {
  readonly name = 'trigger-hub';
  readonly topics: readonly number[] = [Topic.trigger];
  private store: KvStore | null = null;
  /** Highest seq in the log. */
  private head = 0;
  /** Every seq up to here has been removed from the log (trimmed, or never there). */
  private floor = 0;
  /** Triggers in the log (what the retention counts). */
  private count = 0;
  private readonly cursors = new Map<string, number>();
  private readonly conns = new Map<string, Conn>();
  private readonly dirtyCursors = new Set<string>();
  /** Gap notices not yet given to their (disconnected) group; durable under `rg/`. */
  private readonly pendingGaps = new Map<string, TriggerGap>();
  /** Groups whose notice changed (written or deleted at the next flush). */
  private readonly dirtyGaps = new Set<string>();
  private readonly gapTotals = new Map<string, GapTotal>();
  private flushTimer: NodeJS.Timeout | null = null;
  /** The last trim run (one runs at a time) and whether a run is queued behind it. */
  private trimTail: Promise<void> = Promise.resolve();
  private trimQueued = false;
  private readonly opts: TriggerHubConfig;
  /** Metrics. */
  delivered = 0;
  logged = 0;
  /** Refused subscriptions and acks by error code (the server counts `forbidden`, a key check it makes). */
  readonly rejected = { forbidden: 0, group_busy: 0, too_many_groups: 0, bad_ack: 0 };
  /** Stored cursors that did not parse (an older version stored NaN) and were reset to the log's start. */
  repairedCursors = 0;
  /** The newest trigger's arrival in the hub (hrtime ns) by seq, for the delivery-latency metric; bounded. */
  private readonly arrived = new Map<number, bigint>();
  onDelivered: ((latencyNs: bigint) => void) | null = null;

  /** Throws CONFIG_INVALID naming each bad option; `crmstream run` validates the same schema with its config file. */
  constructor(opts: Partial<TriggerHubConfig> = {}) {
    const parsed = TriggerHubConfigSchema.safeParse(opts);
    if (!parsed.success) {
      throw new CrmError('CONFIG_INVALID', `invalid trigger hub options:\n${parsed.error.issues.map((i) => `  ${i.path.join('.') || '(options)'}: ${i.message}`).join('\n')}`);
    }
    this.opts = Object.freeze(parsed.data);
  }

  get config(): Readonly<TriggerHubConfig> {
    return this.opts;
  }

  async open(store: KvStore): Promise<void> {
    this.store = store;
    // One pass over the log's keys: its bounds and the number of triggers the retention counts.
    let first = -1;
    let n = 0;
    for await (const keys of store.scanKeys({ gte: LOG, lt: LOG_END }, 4096)) {
      if (first < 0 && keys.length > 0) first = logSeq(keys[0]!);
      n += keys.length;
      if (keys.length > 0) this.head = logSeq(keys[keys.length - 1]!);
    }
    this.count = n;
    this.floor = first < 0 ? this.head : first - 1;
    for await (const entries of store.scan({ gte: CURSOR, lt: CURSOR_END }, 1024)) {
      for (const e of entries) {
        const group = e.key.slice(CURSOR.length);
        const seq = parseSeqText(utf8d.decode(e.value));
        if (Number.isNaN(seq)) {
          // Not a sequence number (an older version stored NaN from a malformed ack). Where the group
          // was is unknown: give it everything still in the log (at-least-once; senders de-duplicate
          // on trigger_id) rather than skip anything, and store a valid cursor.
          this.repairedCursors++;
          this.saveCursor(group, this.floor);
        } else this.cursors.set(group, seq);
      }
    }
    for await (const entries of store.scan({ gte: GAP, lt: GAP_END }, 1024)) {
      for (const e of entries) {
        const group = e.key.slice(GAP.length);
        const g = parseGap(utf8d.decode(e.value));
        if (g !== null) this.pendingGaps.set(group, g);
        else this.markGap(group); // unreadable: deleted at the next flush
      }
    }
  }

  /** Committed triggers: into the log (awaited: the outbox advances its cursor only after), then out to the groups. */
  async deliver(records: readonly OutboxRecord[]): Promise<void> {
    // A sink may be handed a batch again after a failure or a crash: what is in the log already is not counted twice.
    const fresh = records.length > 0 && records[0]!.seq > this.head ? records : records.filter((r) => r.seq > this.head);
    if (fresh.length === 0) return;
    await this.store!.write(fresh.map((r) => ({ type: 'put' as const, key: logKey(r.seq), value: r.payload })));
    this.head = fresh[fresh.length - 1]!.seq;
    this.count += fresh.length;
    this.logged += fresh.length;
    const now = process.hrtime.bigint();
    if (this.arrived.size < 100_000) for (const r of fresh) this.arrived.set(r.seq, now);
    for (const c of this.conns.values()) void this.pump(c);
  }

  async close(): Promise<void> {
    if (this.flushTimer !== null) clearTimeout(this.flushTimer);
    this.flushTimer = null;
    try {
      await this.flushCursors();
    } finally {
      for (const c of this.conns.values()) c.gone = true;
      this.conns.clear();
      this.onDelivered = null;
      this.store = null; // the engine closes the store; a closed hub keeps no reference to it
    }
  }

  /**
   * A group connects (the caller checked that its key may use the group). Refused when the group
   * is connected elsewhere (`group_busy`) or is new and the hub knows `maxGroups` groups already
   * (`too_many_groups`). `gap`: a notice the group has not been given yet; send it after `subscribed`.
   */
  connect(sub: GroupSubscription, socket: TriggerSocket): ConnectResult {
    if (this.conns.has(sub.group)) {
      this.rejected.group_busy++;
      return { ok: false, code: 'group_busy', message: `group '${sub.group}' is connected elsewhere` };
    }
    let stored = this.cursors.get(sub.group);
    const known = stored !== undefined;
    if (stored === undefined) {
      if (this.cursors.size >= this.opts.maxGroups) {
        this.rejected.too_many_groups++;
        return { ok: false, code: 'too_many_groups', message: `the server knows ${this.cursors.size} sender groups, its limit (server.maxGroups = ${this.opts.maxGroups}); use an existing group` };
      }
      stored = this.opts.newGroupStart === 'head' ? this.head : this.floor;
    }
    // resume_from may skip ahead, never past the head (a cursor in the future would swallow triggers not yet decided).
    const from = Math.max(stored, Math.min(sub.resumeFrom, this.head));
    const c: Conn = {
      sub, socket, cursor: from, readTo: from, inFlight: [], pumping: false, gone: false,
      channels: sub.channels.length > 0 ? new Set(sub.channels) : null,
      campaigns: sub.campaigns.length > 0 ? new Set(sub.campaigns) : null,
    };
    this.conns.set(sub.group, c);
    if (!known) this.saveCursor(sub.group, from);
    const gap = this.pendingGaps.get(sub.group) ?? null;
    if (gap !== null) {
      this.pendingGaps.delete(sub.group);
      this.markGap(sub.group);
    }
    void this.pump(c);
    return { ok: true, from, gap };
  }

  disconnect(group: string, socket: TriggerSocket): void {
    const c = this.conns.get(group);
    if (c === undefined || c.socket !== socket) return;
    c.gone = true;
    this.conns.delete(group);
  }

  /**
   * Cumulative ack from a group's connection: `seq` must be an integer in [cursor, last read] —
   * below the cursor it would move nothing (or, stored, move the cursor back); beyond what was sent
   * it would skip triggers the sender never saw; NaN would stop trimming. Otherwise nothing changes.
   */
  ack(group: string, seq: number): AckResult {
    const c = this.conns.get(group);
    if (c === undefined || !Number.isSafeInteger(seq) || seq < c.cursor || seq > c.readTo) {
      this.rejected.bad_ack++;
      if (c === undefined) return { ok: false, code: 'bad_ack', message: `group '${group}' is not connected here` };
      return { ok: false, code: 'bad_ack', message: `ack seq must be an integer from the group's cursor ${c.cursor} to the last trigger sent ${c.readTo}; got ${String(seq)}` };
    }
    if (seq === c.cursor) return { ok: true };
    c.cursor = seq;
    let k = 0;
    while (k < c.inFlight.length && c.inFlight[k]! <= seq) k++;
    if (k > 0) c.inFlight.splice(0, k);
    this.saveCursor(group, seq);
    void this.pump(c);
    return { ok: true };
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
    this.scheduleFlush();
  }

  private markGap(group: string): void {
    this.dirtyGaps.add(group);
    this.scheduleFlush();
  }

  private scheduleFlush(): void {
    if (this.flushTimer === null && this.store !== null) {
      this.flushTimer = setTimeout(() => {
        this.flushTimer = null;
        // A failed write leaves the groups dirty; the next flush (or trim) retries them.
        this.flushCursors().catch(() => this.scheduleFlush());
      }, CURSOR_FLUSH_MS);
      this.flushTimer.unref();
    }
  }

  /**
   * Writes every dirty cursor and gap notice in one batch. The store applies writes in call order,
   * and the ops are built from the current values when called, so a later flush never loses to an
   * earlier one. On failure the groups stay dirty and the error is thrown.
   */
  private async flushCursors(): Promise<void> {
    if (this.store === null || (this.dirtyCursors.size === 0 && this.dirtyGaps.size === 0)) return;
    const cursors = [...this.dirtyCursors];
    const gaps = [...this.dirtyGaps];
    this.dirtyCursors.clear();
    this.dirtyGaps.clear();
    const ops: WriteOp[] = cursors.map((g) => ({ type: 'put' as const, key: CURSOR + g, value: utf8.encode(String(this.cursors.get(g))) }));
    for (const g of gaps) {
      const n = this.pendingGaps.get(g);
      ops.push(n === undefined ? { type: 'del', key: GAP + g } : { type: 'put', key: GAP + g, value: utf8.encode(JSON.stringify(n)) });
    }
    try {
      await this.store.write(ops);
    } catch (err) {
      for (const g of cursors) this.dirtyCursors.add(g);
      for (const g of gaps) this.dirtyGaps.add(g);
      throw err;
    }
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
        for await (const entries of this.store!.scan({ gte: logKey(c.readTo + 1), lt: LOG_END, limit: Math.min(256, room) }, 256)) {
          for (const e of entries) {
            if (c.gone || blocked) break;
            read++;
            const seq = logSeq(e.key);
            // A retention trim during this scan moved readTo past entries of the scan's snapshot.
            if (seq <= c.readTo) continue;
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

  /**
   * Deletes the log below every known group's cursor, and its oldest triggers beyond the retention
   * (telling each group whose cursor that passes: `gap`). At most TRIM_STEPS × TRIM_PAGE keys a call.
   * Throws when a write fails (nothing of that step is deleted then).
   */
  trim(): Promise<void> {
    // One run at a time; a call while one is queued shares it (it starts later, so it sees this call's state).
    if (this.trimQueued) return this.trimTail;
    this.trimQueued = true;
    const run = this.trimTail.catch(() => undefined).then(async () => {
      this.trimQueued = false;
      for (let step = 0; step < TRIM_STEPS; step++) if (!(await this.trimStep())) break;
    });
    this.trimTail = run;
    return run;
  }

  /** One page of trimming; true when there may be more. */
  private async trimStep(): Promise<boolean> {
    const store = this.store;
    if (store === null) return false;
    // Acked by every known group: nobody needs it. With no group yet, only the retention applies
    // (a group that comes later starts at the head, or at what is left with newGroupStart 'earliest').
    let acked = this.cursors.size === 0 ? this.floor : this.head;
    for (const v of this.cursors.values()) acked = Math.min(acked, v);
    const excess = this.count - this.opts.triggerRetention;
    if (acked <= this.floor && excess <= 0) return false;
    const taken: number[] = [];
    let full = false;
    scan: for await (const keys of store.scanKeys({ gte: logKey(this.floor + 1), lt: LOG_END }, 4096)) {
      for (const k of keys) {
        const seq = logSeq(k);
        if (seq > acked && taken.length >= excess) break scan;
        if (taken.length === TRIM_PAGE) {
          full = true;
          break scan;
        }
        taken.push(seq);
      }
    }
    if (taken.length === 0) {
      // Nothing in the log below `acked`: only the bound moves.
      if (acked > this.floor) this.floor = Math.min(acked, this.head);
      return false;
    }
    const cut = taken[taken.length - 1]!;
    // Groups the cut passes lose the triggers in (cursor, cut]: cursor and notice are stored before the log goes.
    const now = Date.now();
    for (const [group, cursor] of this.cursors) {
      if (cursor >= cut) continue;
      const gap: TriggerGap = { from: cursor + 1, to: cut, count: taken.length - countAtMost(taken, cursor) };
      const t = this.gapTotals.get(group) ?? { gaps: 0, skipped: 0, lastAt: 0 };
      t.gaps++;
      t.skipped += gap.count;
      t.lastAt = now;
      this.gapTotals.set(group, t);
      this.cursors.set(group, cut);
      this.dirtyCursors.add(group);
      const c = this.conns.get(group);
      if (c !== undefined) {
        c.cursor = Math.max(c.cursor, cut);
        c.readTo = Math.max(c.readTo, cut);
        let k = 0;
        while (k < c.inFlight.length && c.inFlight[k]! <= cut) k++;
        if (k > 0) c.inFlight.splice(0, k);
        c.socket.send(gapFrame(c.socket.json, gap));
        void this.pump(c);
      } else {
        const prev = this.pendingGaps.get(group);
        this.pendingGaps.set(group, prev === undefined ? gap : { from: Math.min(prev.from, gap.from), to: cut, count: prev.count + gap.count });
        this.dirtyGaps.add(group);
      }
    }
    await this.flushCursors();
    await store.clearRange({ gte: LOG, lt: logKey(cut + 1) });
    this.count -= taken.length;
    this.floor = cut;
    for (const seq of this.arrived.keys()) if (seq <= cut) this.arrived.delete(seq);
    return full;
  }

  /** Metrics: known groups, their cursors and whether connected. */
  groups(): { group: string; cursor: number; inFlight: number; connected: boolean }[] {
    return [...this.cursors].map(([group, cursor]) => {
      const c = this.conns.get(group);
      return { group, cursor: c?.cursor ?? cursor, inFlight: c?.inFlight.length ?? 0, connected: c !== undefined };
    });
  }

  /**
   * Metrics and health: per group, the retention gaps since this process started — `gaps` (times
   * the trim passed the group's cursor), `skipped` (triggers it will not get), `lastAt` (ms since
   * epoch of the last one) — and `pending` (a notice stored for a disconnected group, not yet sent).
   */
  gaps(): { group: string; gaps: number; skipped: number; lastAt: number; pending: boolean }[] {
    const out: { group: string; gaps: number; skipped: number; lastAt: number; pending: boolean }[] = [];
    for (const [group, t] of this.gapTotals) out.push({ group, gaps: t.gaps, skipped: t.skipped, lastAt: t.lastAt, pending: this.pendingGaps.has(group) });
    for (const group of this.pendingGaps.keys()) if (!this.gapTotals.has(group)) out.push({ group, gaps: 0, skipped: 0, lastAt: 0, pending: true });
    return out;
  }

  get headSeq(): number {
    return this.head;
  }

  /** Triggers in the log now (what `triggerRetention` bounds). */
  get logSize(): number {
    return this.count;
  }
}

/** How many of the ascending `seqs` are <= `x`. */
function countAtMost(seqs: readonly number[], x: number): number {
  let lo = 0;
  let hi = seqs.length;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    if (seqs[mid]! <= x) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

function parseGap(s: string): TriggerGap | null {
  try {
    const g = JSON.parse(s) as Partial<TriggerGap> | null;
    if (g !== null && typeof g === 'object' && Number.isSafeInteger(g.from) && Number.isSafeInteger(g.to) && Number.isSafeInteger(g.count)) {
      return { from: g.from!, to: g.to!, count: g.count! };
    }
  } catch {
    // not JSON: treated as unreadable below
  }
  return null;
}

/** The `gap` server frame, JSON or protobuf as the socket speaks. */
export function gapFrame(json: boolean, gap: TriggerGap): string | Uint8Array {
  const f = { gap: { from: gap.from, to: gap.to, count: gap.count } };
  return json ? JSON.stringify(f) : crmstream.v1.ServerFrame.encode(f).finish();
}
