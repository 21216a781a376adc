import { crmstream } from './proto/gen/crmstream.js';
import type { KpiGrain, KpiRow } from '../operators/kpi-rows.js';
import type { EngineGate } from './gate.js';

/**
 * Live KPI subscriptions (docs/API.md `/v1/kpis`). Every subscription of one grain shares one
 * computation: each tick (`coalesceMs`) the grains someone watches are recomputed if the engine's
 * KPI state moved, diffed row by row against the previous tick, and each subscriber gets the
 * changed rows in its view — late-data corrections of closed windows included. A slow socket is
 * skipped while it is backpressured and gets a fresh snapshot when it catches up, so nothing
 * queues up per subscriber.
 */

export interface KpiSubscription {
  id: string;
  grain: KpiGrain;
  kpis: readonly string[];
  /** '' = any, '*' = the total row, else that value. */
  channel: string;
  platform: string;
  from: string;
  to: string;
}

export interface KpiSocket {
  send(frame: Uint8Array | string): boolean;
  bufferedAmount(): number;
  readonly json: boolean;
  readonly closed: boolean;
}

/** A KpiRow on the wire: numbers in `values`, nulls listed. */
export interface WireRow {
  grain: string;
  window: string;
  channel: string;
  platform: string;
  values: Record<string, number>;
  nulls: string[];
}

const KEY_FIELDS = new Set(['grain', 'window', 'channel', 'platform']);

export function toWire(r: KpiRow): WireRow {
  const values: Record<string, number> = {};
  const nulls: string[] = [];
  for (const [k, v] of Object.entries(r)) {
    if (KEY_FIELDS.has(k)) continue;
    if (v === null) nulls.push(k);
    else if (typeof v === 'number') values[k] = v;
    else if (typeof v === 'boolean') values[k] = v ? 1 : 0;
  }
  return { grain: r.grain, window: r.window, channel: r.channel, platform: r.platform, values, nulls };
}

interface GrainView {
  /** window|channel|platform → the row and its text (for the diff). */
  rows: Map<string, { row: WireRow; text: string }>;
  /** The engine state the view was computed at. */
  version: string;
  /** Windows in order: the last one is the watermark's (open); earlier ones are closed. */
  lastWindow: string;
}

interface Sub {
  spec: KpiSubscription;
  socket: KpiSocket;
  /** Missed an update while backpressured: gets a snapshot next time. */
  stale: boolean;
}

export class KpiHub {
  private readonly subs = new Set<Sub>();
  private readonly views = new Map<KpiGrain, GrainView>();
  private timer: NodeJS.Timeout | null = null;
  private ticking = false;
  /** Frames sent (metrics). */
  framesSent = 0;

  constructor(private gate: EngineGate, private readonly coalesceMs: number, private readonly maxBufferedBytes = 1 << 20) {}

  start(): void {
    this.timer = setInterval(() => void this.tick(), this.coalesceMs);
    this.timer.unref();
  }

  /** Stops ticking; `release` is what the hub keeps instead of the engine's gate afterwards. */
  stop(release?: EngineGate): void {
    if (this.timer !== null) clearInterval(this.timer);
    this.timer = null;
    this.subs.clear();
    this.views.clear();
    if (release !== undefined) this.gate = release;
  }

  get subscriberCount(): number {
    return this.subs.size;
  }

  async subscribe(spec: KpiSubscription, socket: KpiSocket): Promise<void> {
    // Replaces a subscription of the same id on this socket.
    for (const s of this.subs) if (s.socket === socket && s.spec.id === spec.id) this.subs.delete(s);
    const sub: Sub = { spec, socket, stale: false };
    this.subs.add(sub);
    const view = this.views.get(spec.grain) ?? (await this.compute(spec.grain));
    if (!this.subs.has(sub)) return; // unsubscribed meanwhile
    this.send(sub, [...view.rows.values()].map((x) => x.row), true, false, view);
  }

  unsubscribe(socket: KpiSocket, id: string | null): void {
    for (const s of this.subs) if (s.socket === socket && (id === null || s.spec.id === id)) this.subs.delete(s);
  }

  private async compute(grain: KpiGrain): Promise<GrainView> {
    const { rows, version } = await this.gate.run(async (e) => ({ rows: await e.kpis(grain), version: versionOf(e.stats()) }));
    const view: GrainView = { rows: new Map(), version, lastWindow: '' };
    for (const r of rows) {
      const w = toWire(r);
      view.rows.set(`${w.window}|${w.channel}|${w.platform}`, { row: w, text: JSON.stringify(w.values) + w.nulls.join(',') });
      if (w.window > view.lastWindow) view.lastWindow = w.window;
    }
    this.views.set(grain, view);
    return view;
  }

  /** One coalescing tick: recompute the watched grains that moved, send the changed rows. */
  async tick(): Promise<void> {
    if (this.ticking || this.subs.size === 0) return;
    this.ticking = true;
    try {
      const grains = new Set([...this.subs].map((s) => s.spec.grain));
      const version = await this.gate.run((e) => versionOf(e.stats()));
      for (const grain of grains) {
        const before = this.views.get(grain);
        if (before !== undefined && before.version === version && ![...this.subs].some((s) => s.stale && s.spec.grain === grain)) continue;
        const after = await this.compute(grain);
        const changed: WireRow[] = [];
        for (const [key, x] of after.rows) if (before?.rows.get(key)?.text !== x.text) changed.push(x.row);
        // Subscribers with the same view share one encoded frame (dashboards mostly ask the same).
        const frames = new Map<string, Uint8Array | string | null>();
        for (const s of this.subs) {
          if (s.spec.grain !== grain) continue;
          if (s.stale) this.send(s, [...after.rows.values()].map((x) => x.row), true, false, after);
          else if (changed.length > 0) this.send(s, changed, false, changed.some((r) => r.window < after.lastWindow), after, frames);
        }
      }
    } finally {
      this.ticking = false;
    }
  }

  /** `frames` (per tick): encoded frames by view, shared by subscribers with the same spec and id. */
  private send(s: Sub, rows: readonly WireRow[], snapshot: boolean, correction: boolean, view: GrainView, frames?: Map<string, Uint8Array | string | null>): void {
    if (s.socket.closed) {
      this.subs.delete(s);
      return;
    }
    if (s.socket.bufferedAmount() > this.maxBufferedBytes) {
      s.stale = true; // skipped now, a full snapshot when it has caught up
      return;
    }
    const key = frames === undefined ? '' : `${s.socket.json ? 'j' : 'p'}|${JSON.stringify(s.spec)}`;
    let frame = frames?.get(key);
    if (frame === undefined) {
      const mine = rows.filter((r) => inView(s.spec, r)).map((r) => pick(s.spec, r));
      if (!snapshot && mine.length === 0) frame = null;
      else {
        const watermark = Number(view.version.split('|')[0]);
        const msg = { id: s.spec.id, snapshot, rows: mine, watermark: Number.isFinite(watermark) ? watermark : 0, correction: correction && !snapshot };
        frame = s.socket.json ? JSON.stringify({ kpis: msg }) : crmstream.v1.ServerFrame.encode({ kpis: msg }).finish();
      }
      frames?.set(key, frame);
    }
    if (frame === null) return;
    s.stale = false;
    if (!s.socket.send(frame)) s.stale = true;
    this.framesSent++;
  }
}

function versionOf(stats: Record<string, number>): string {
  return `${stats['watermark']}|${stats['kpiUpdates']}|${stats['kpiCorrections']}|${stats['accepted']}`;
}

function inView(spec: KpiSubscription, r: WireRow): boolean {
  if (spec.channel !== '' && r.channel !== spec.channel) return false;
  if (spec.platform !== '' && r.platform !== spec.platform) return false;
  if (spec.from !== '' && r.window < spec.from) return false;
  if (spec.to !== '' && r.window > spec.to) return false;
  return true;
}

function pick(spec: KpiSubscription, r: WireRow): WireRow {
  if (spec.kpis.length === 0) return r;
  const values: Record<string, number> = {};
  for (const k of spec.kpis) if (k in r.values) values[k] = r.values[k]!;
  return { ...r, values, nulls: r.nulls.filter((n) => spec.kpis.includes(n)) };
}
