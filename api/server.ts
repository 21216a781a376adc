import { existsSync, readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import uWS from '@trufflesuite/uws-js-unofficial';
import { tableToIPC } from 'apache-arrow';
import client from 'prom-client';
import { crmstream } from './proto/gen/crmstream.js';
import type { Engine, EngineHealth } from '../engine/engine.js';
import { SEGMENT_SCHEMA, rowsToTable } from '../engine/arrow-export.js';
import { CrmError } from '../engine/errors.js';
import { REJECT_NAMES } from '../engine/event-types.js';
import { campaignReport } from '../operators/campaign-report.js';
import type { KpiGrain } from '../operators/kpi-rows.js';
import { GROUP_NAME, KEY_IN_QUERY_MESSAGE, KeyRing, mayUseGroup, requestKey, upgradeKey, type ApiKey, type Scope } from './auth.js';
import type { EngineGate } from './gate.js';
import { KpiHub, toWire, type KpiSocket, type KpiSubscription } from './kpi-hub.js';
import { gapFrame, TriggerHub, type TriggerSocket } from './trigger-hub.js';

/**
 * The HTTP + WebSocket server (docs/API.md) on uWebSockets.js, one port: ingest, queries, trigger
 * delivery to senders, live KPIs, metrics and the dashboard. This module and its hubs are the only
 * place that touches uWebSockets.
 *
 * Every engine call goes through the EngineGate (the engine is single-writer). Request handlers
 * read everything they need from the request synchronously (uWS frees it when the handler
 * returns), check the key and scope, then answer asynchronously through `res.cork`, unless the
 * client went away (`onAborted`).
 */

export interface ServerOptions {
  port: number;
  host?: string;
  keys: readonly ApiKey[];
  /** Largest POST body (bytes); 413 above. */
  maxBodyBytes?: number;
  /** Largest WebSocket frame (bytes); the socket is closed above. */
  maxFrameBytes?: number;
  /** KPI update coalescing (ms). */
  kpiCoalesceMs?: number;
  /** Stop feeding a socket whose buffered amount passes this (bytes). */
  maxBufferedBytes?: number;
  /** Registers more metrics on the server's registry (e.g. the Kafka source's lag and errors). */
  metrics?: (registry: client.Registry) => void;
  /**
   * More readiness checks for /readyz (e.g. `crmstream run`'s Kafka lag bound): called on each
   * probe, returns the checks that fail now (none: ready as far as it knows).
   */
  readiness?: () => readonly ReadinessFailure[];
  /** /readyz: an outbox sink failing for longer than this (ms, default 60,000) makes the server unready. */
  maxSinkFailingMs?: number;
  /** /readyz: unready for this long (ms, default 300,000) after a retention trim skipped triggers a sender group had not acked. */
  triggerGapHoldMs?: number;
  /** Events in one POST /v1/events (default 10,000); 413 above. */
  maxEventsPerRequest?: number;
  /** Events received and not yet answered, over all requests (default 100,000); 503 + Retry-After above. */
  maxQueuedEvents?: number;
  /** Open WebSockets (triggers + kpis, default 10,000); an upgrade beyond is answered 503 + Retry-After. */
  maxSockets?: number;
  /** KPI subscriptions (distinct ids) per socket (default 32); one more is refused with `too_many_subscriptions`. */
  maxSubscriptionsPerSocket?: number;
}

/** One failing readiness check: a stable name (`engine_failed`, `checkpoint`, `sink:<name>`, `kafka_lag`, `trigger_gap`) and what is wrong. */
export interface ReadinessFailure {
  readonly check: string;
  readonly message: string;
}

interface SocketData {
  kind: 'triggers' | 'kpis';
  json: boolean;
  closed: boolean;
  group: string | null;
  /** The sender groups the socket's key may subscribe as (null = any): checked at subscribe_triggers. */
  groups: readonly string[] | null;
  /** The KPI subscription ids of the socket (bounded by maxSubscriptionsPerSocket). */
  subs: Set<string>;
  adapter: TriggerSocket & KpiSocket;
}

/** api/dashboard beside this file (sources), or in the project when running from dist/api. */
const HERE = path.dirname(fileURLToPath(import.meta.url));
const DASHBOARD_DIR = [path.join(HERE, 'dashboard'), path.resolve(HERE, '../../api/dashboard')].find((d) => existsSync(d)) ?? path.join(HERE, 'dashboard');
const require = createRequire(import.meta.url);

/** Static files of the dashboard: path → [content type, file]. */
function staticFiles(): Map<string, [string, string]> {
  const uplot = path.dirname(require.resolve('uplot/package.json'));
  return new Map([
    ['/', ['text/html; charset=utf-8', path.join(DASHBOARD_DIR, 'index.html')]],
    ['/dashboard/app.js', ['text/javascript; charset=utf-8', path.join(DASHBOARD_DIR, 'app.js')]],
    ['/dashboard/app.css', ['text/css; charset=utf-8', path.join(DASHBOARD_DIR, 'app.css')]],
    ['/dashboard/uplot.iife.min.js', ['text/javascript; charset=utf-8', path.join(uplot, 'dist/uPlot.iife.min.js')]],
    ['/dashboard/uplot.min.css', ['text/css; charset=utf-8', path.join(uplot, 'dist/uPlot.min.css')]],
  ]);
}

/** What a closed server's leftover handlers see: every engine call fails (503). */
const CLOSED_GATE = {
  engine: null,
  depth: 0,
  run: () => Promise.reject(new CrmError('ENGINE_CLOSED', 'the server is closed')),
} as unknown as EngineGate;

class HttpError extends Error {
  constructor(readonly status: number, readonly code: string, message: string) {
    super(message);
  }
}

interface Reply {
  status?: number;
  type?: string;
  body: string | Uint8Array;
  /** Seconds, for 429 / 503: when the client should try again. */
  retryAfter?: number;
}

const json = (body: unknown, status = 200): Reply => ({ status, type: 'application/json', body: JSON.stringify(body) });
const STATUS_TEXT: Record<number, string> = { 200: '200 OK', 400: '400 Bad Request', 401: '401 Unauthorized', 403: '403 Forbidden', 404: '404 Not Found', 413: '413 Payload Too Large', 500: '500 Internal Server Error', 503: '503 Service Unavailable' };

export class CrmServer {
  readonly triggers: TriggerHub;
  readonly kpis: KpiHub;
  readonly registry = new client.Registry();
  private readonly app: uWS.TemplatedApp;
  private listen: uWS.us_listen_socket | null = null;
  private readonly sockets = new Set<uWS.WebSocket<SocketData>>();
  private readonly keys: KeyRing;
  private readonly opts: Required<Omit<ServerOptions, 'host' | 'keys' | 'metrics' | 'readiness' | 'maxSinkFailingMs' | 'triggerGapHoldMs'>> & { host: string };
  private trimTimer: NodeJS.Timeout | null = null;
  /** Trigger-log trims that failed (metrics: crm_trigger_trim_failures_total). */
  private trimFailures = 0;
  /** Readiness (/readyz): the extra checks, bounds, and what the 1 s health sampler has seen. */
  private readonly ready: {
    extra: (() => readonly ReadinessFailure[]) | null;
    maxSinkFailingMs: number;
    gapHoldMs: number;
    /** Sink name → Date.now() when it was first seen failing (cleared when it delivers again). */
    sinkFailingSince: Map<string, number>;
    timer: NodeJS.Timeout | null;
  };
  /** Ingest requests waiting for the engine's next turn (coalesce). */
  private waiting: { events: unknown[]; durable: boolean; resolve: (r: string[]) => void; reject: (e: unknown) => void }[] = [];
  /** Events received and not yet answered (bounded by maxQueuedEvents). */
  private queuedEvents = 0;
  private readonly files = staticFiles();
  private readonly m: {
    http: client.Counter<'route' | 'status'>;
    eventsIn: client.Counter;
    frames: client.Counter<'kind'>;
    badFrames: client.Counter;
    delivery: client.Histogram;
  };

  /**
   * The hub must be an outbox sink of the engine (`Engine.create(cfg, { sinks: [hub] })`) so
   * triggers reach it durably; `createTriggerHub` makes one.
   */
  private constructor(private gate: EngineGate, hub: TriggerHub, opts: ServerOptions) {
    this.opts = {
      port: opts.port, host: opts.host ?? '127.0.0.1', maxBodyBytes: opts.maxBodyBytes ?? 8 << 20, maxFrameBytes: opts.maxFrameBytes ?? 64 << 10,
      kpiCoalesceMs: opts.kpiCoalesceMs ?? 500, maxBufferedBytes: opts.maxBufferedBytes ?? 1 << 20,
      maxEventsPerRequest: opts.maxEventsPerRequest ?? 10_000, maxQueuedEvents: opts.maxQueuedEvents ?? 100_000,
      maxSockets: opts.maxSockets ?? 10_000, maxSubscriptionsPerSocket: opts.maxSubscriptionsPerSocket ?? 32,
    };
    this.ready = {
      extra: opts.readiness ?? null, maxSinkFailingMs: opts.maxSinkFailingMs ?? 60_000, gapHoldMs: opts.triggerGapHoldMs ?? 300_000,
      sinkFailingSince: new Map(), timer: null,
    };
    this.keys = new KeyRing(opts.keys);
    this.triggers = hub;
    this.kpis = new KpiHub(gate, this.opts.kpiCoalesceMs, this.opts.maxBufferedBytes);
    this.m = this.metrics();
    opts.metrics?.(this.registry);
    this.app = uWS.App();
    this.routes();
  }

  static async start(gate: EngineGate, hub: TriggerHub, opts: ServerOptions): Promise<CrmServer> {
    const s = new CrmServer(gate, hub, opts);
    await new Promise<void>((resolve, reject) => {
      s.app.listen(s.opts.host, s.opts.port, (token) => {
        if (token === false) reject(new CrmError('CONFIG_INVALID', `cannot listen on ${s.opts.host}:${s.opts.port}`));
        else {
          s.listen = token;
          resolve();
        }
      });
    });
    s.kpis.start();
    // A failed trim (store write) changes nothing and is tried again at the next tick; counted.
    s.trimTimer = setInterval(() => void hub.trim().catch(() => {
      s.trimFailures++;
    }), 2000);
    s.trimTimer.unref();
    // How long a sink has been failing is measured by sampling (probes come every few seconds at
    // best): to the second, which is what the bound is for.
    s.ready.timer = setInterval(() => s.sampleHealth(), 1000);
    s.ready.timer.unref();
    return s;
  }

  get port(): number {
    return this.listen === null ? 0 : uWS.us_socket_local_port(this.listen as unknown as uWS.us_socket);
  }

  get engine(): Engine {
    return this.gate.engine;
  }

  async close(): Promise<void> {
    if (this.trimTimer !== null) clearInterval(this.trimTimer);
    if (this.ready.timer !== null) clearInterval(this.ready.timer);
    this.ready.timer = null;
    this.kpis.stop(CLOSED_GATE);
    for (const ws of this.sockets) ws.end(1001, 'server closing');
    this.sockets.clear();
    if (this.listen !== null) uWS.us_listen_socket_close(this.listen);
    this.listen = null;
    // uWS.js 20.30 has no app.close(): the App and its handlers (which reach this object) live on.
    // Cut what they reach — the engine, the metrics closures — so a closed server holds no state.
    this.gate = CLOSED_GATE;
    this.registry.clear();
  }

  // -------------------------------------------------------------------------------------------

  private metrics(): CrmServer['m'] {
    const r = this.registry;
    // Closures read the server's current gate (a closed server's is CLOSED_GATE; the registry is cleared then).
    const self = this as unknown as { gate: EngineGate };
    const gate = { get engine() { return self.gate.engine; }, get depth() { return self.gate.depth; } };
    const hub = this.triggers;
    // Figures the engine keeps (engine.stats()) are exported as they are at each scrape: counters
    // (monotonic within a process; `rate()` handles the reset of a restart) through counterOf,
    // levels as gauges. Units are Prometheus base units: seconds, bytes.
    const stat = (kind: 'counter' | 'gauge', name: string, help: string, key: string, scale = 1): void => {
      const read = (): number => {
        const v = gate.engine.stats()[key] ?? 0;
        return Number.isFinite(v) ? v * scale : 0;
      };
      if (kind === 'counter') counterOf(r, name, help, read);
      else new client.Gauge({ name, help, registers: [r], collect() { this.set(read()); } });
    };
    stat('counter', 'crm_events_accepted_total', 'Events accepted by the engine (restored from the checkpoint at start)', 'accepted');
    stat('gauge', 'crm_watermark_timestamp_seconds', 'Event-time watermark (Unix time, seconds; 0 before the first event)', 'watermark', 1 / 1000);
    stat('gauge', 'crm_checkpoint_epoch', 'Epoch of the last durable checkpoint', 'epoch');
    stat('gauge', 'crm_profiles_cached', 'Profiles in the hot cache', 'cachedProfiles');
    stat('counter', 'crm_timers_fired_total', 'Timers fired', 'timersFired');
    stat('counter', 'crm_segment_changes_total', 'Segment membership changes', 'segmentChanges');
    stat('counter', 'crm_triggers_total', 'Campaign triggers decided', 'triggers');
    stat('gauge', 'crm_checkpoint_last_seconds', 'Duration of the last checkpoint (seconds)', 'checkpointMsLast', 1 / 1000);
    stat('counter', 'crm_checkpoint_seconds_total', 'Time spent in checkpoints (seconds)', 'checkpointMsTotal', 1 / 1000);
    counterOf(r, 'crm_triggers_sent_total', 'Trigger frames sent to sender groups (re-deliveries included)', () => hub.delivered);
    new client.Gauge({
      name: 'crm_watermark_delay_seconds', help: 'Wall clock minus the event-time watermark (seconds; 0 before the first event)', registers: [r],
      collect() { const w = gate.engine.watermark; this.set(Number.isFinite(w) ? (Date.now() - w) / 1000 : 0); },
    });
    new client.Counter({
      name: 'crm_events_rejected_total', help: 'Events rejected, by reason code', labelNames: ['reason'], registers: [r],
      collect() {
        const c = gate.engine.rejectCounts();
        this.reset();
        for (const k of REJECT_NAMES) this.inc({ reason: k }, c[k]);
      },
    });
    // Health (the figures /readyz judges), for alerts.
    const health = (): EngineHealth => gate.engine.health();
    counterOf(r, 'crm_checkpoint_failures_total', 'Checkpoint attempts that failed (each retry counts)', () => health().checkpointFailuresTotal);
    new client.Gauge({ name: 'crm_checkpoint_failures_consecutive', help: 'Checkpoint attempts failed since the last one that succeeded', registers: [r], collect() { this.set(health().consecutiveCheckpointFailures); } });
    new client.Gauge({
      name: 'crm_checkpoint_last_success_timestamp_seconds', help: 'Unix time of the last durable checkpoint in this process (0: none yet)', registers: [r],
      collect() { this.set(health().lastCheckpointAt / 1000); },
    });
    new client.Gauge({ name: 'crm_engine_failed', help: '1 once the engine has failed closed (restart it), else 0', registers: [r], collect() { this.set(health().failed === null ? 0 : 1); } });
    new client.Gauge({
      name: 'crm_sink_failing', help: '1 while an outbox sink is failing (its records wait and are retried), by sink', labelNames: ['sink'], registers: [r],
      collect() {
        this.reset();
        for (const s of health().sinks) this.set({ sink: s.name }, s.failing ? 1 : 0);
      },
    });
    new client.Gauge({
      name: 'crm_sink_lag', help: 'Outbox records after a sink\'s cursor (sequence distance), by sink', labelNames: ['sink'], registers: [r],
      collect() {
        this.reset();
        for (const s of health().sinks) this.set({ sink: s.name }, Math.max(0, s.head - s.cursor));
      },
    });
    for (const [name, help, field] of [
      ['crm_sink_failures_total', 'Failed deliveries to an outbox sink (each retry counts), by sink', 'failuresTotal'],
      ['crm_sink_delivered_total', 'Outbox records delivered to a sink, by sink', 'deliveredTotal'],
    ] as const) {
      new client.Counter({
        name, help, labelNames: ['sink'], registers: [r],
        collect() {
          this.reset();
          for (const s of health().sinks) this.inc({ sink: s.name }, Math.max(0, s[field]));
        },
      });
    }
    new client.Gauge({
      name: 'crm_trigger_group_lag', help: 'Triggers in the log after a sender group\'s cursor (sequence distance)', labelNames: ['group'], registers: [r],
      collect() { for (const g of hub.groups()) this.set({ group: g.group }, Math.max(0, hub.headSeq - g.cursor)); },
    });
    // Labelled counters read from the hub: set to their absolute value at each scrape.
    new client.Counter({
      name: 'crm_trigger_gaps_total', help: 'Times the trigger-log retention passed a sender group\'s cursor (a gap frame told the group)', labelNames: ['group'], registers: [r],
      collect() { this.reset(); for (const g of hub.gaps()) this.inc({ group: g.group }, g.gaps); },
    });
    new client.Counter({
      name: 'crm_trigger_skipped_total', help: 'Triggers a sender group never got because the retention trimmed them', labelNames: ['group'], registers: [r],
      collect() { this.reset(); for (const g of hub.gaps()) this.inc({ group: g.group }, g.skipped); },
    });
    new client.Counter({
      name: 'crm_ws_trigger_rejects_total', help: 'Sender subscriptions and acks refused, by error code', labelNames: ['code'], registers: [r],
      collect() { this.reset(); for (const [code, n] of Object.entries(hub.rejected)) this.inc({ code }, n); },
    });
    const self2 = this as unknown as { trimFailures: number };
    counterOf(r, 'crm_trigger_trim_failures_total', 'Trigger-log trims that failed (retried at the next tick)', () => self2.trimFailures);
    new client.Gauge({ name: 'crm_engine_queue', help: 'Engine calls waiting in the gate', registers: [r], collect() { this.set(gate.depth); } });
    const sockets = this.sockets;
    new client.Gauge({
      name: 'crm_websockets', help: 'Open WebSockets, by endpoint', labelNames: ['endpoint'], registers: [r],
      collect() {
        let t = 0;
        let k = 0;
        for (const ws of sockets) if (ws.getUserData().kind === 'triggers') t++; else k++;
        this.set({ endpoint: 'triggers' }, t);
        this.set({ endpoint: 'kpis' }, k);
      },
    });
    const delivery = new client.Histogram({
      name: 'crm_trigger_delivery_seconds', help: 'Trigger committed → frame sent to a sender', registers: [r],
      buckets: [0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1],
    });
    hub.onDelivered = (ns) => delivery.observe(Number(ns) / 1e9);
    return {
      http: new client.Counter({ name: 'crm_http_requests_total', help: 'HTTP requests', labelNames: ['route', 'status'], registers: [r] }),
      eventsIn: new client.Counter({ name: 'crm_http_events_in_total', help: 'Events received over HTTP', registers: [r] }),
      frames: new client.Counter({ name: 'crm_ws_frames_out_total', help: 'WebSocket frames sent', labelNames: ['kind'], registers: [r] }),
      badFrames: new client.Counter({ name: 'crm_ws_bad_frames_total', help: 'Client frames that did not parse (socket closed)', registers: [r] }),
      delivery,
    };
  }

  private routes(): void {
    const app = this.app;
    // Probes (Kubernetes conventions), no key: /livez = the process is up and its event loop
    // answers (a blocked loop fails the probe by its timeout); /readyz = the engine can take events
    // and durably acknowledge them, else 503 naming each failing check; /healthz = /readyz (older name).
    app.get('/livez', (res) => {
      res.writeHeader('content-type', 'application/json').end(JSON.stringify({ ok: true }));
    });
    const ready = (res: uWS.HttpResponse): void => {
      const failing = this.readiness();
      const e = this.gate.engine as Engine | null;
      const body = JSON.stringify({
        ok: failing.length === 0, failing,
        watermark: e === null || !Number.isFinite(e.watermark) ? null : e.watermark, accepted: e === null ? null : e.acceptedCount,
      });
      res.writeStatus(STATUS_TEXT[failing.length === 0 ? 200 : 503]!).writeHeader('content-type', 'application/json').writeHeader('cache-control', 'no-store').end(body);
    };
    app.get('/readyz', ready);
    app.get('/healthz', ready);
    for (const [p, [type, file]] of this.files) {
      app.get(p, (res) => {
        if (!existsSync(file)) {
          res.writeStatus(STATUS_TEXT[404]!).end('not found');
          return;
        }
        res.writeHeader('content-type', type).writeHeader('cache-control', 'no-cache').end(readFileSync(file));
      });
    }
    this.route('get', '/metrics', 'admin', async () => ({ type: this.registry.contentType, body: await this.registry.metrics() }));
    this.route('post', '/v1/events', 'ingest', async (q, body) => this.ingest(q.contentType, body!, q.query.get('ack') !== 'processed'), true);
    this.route('get', '/v1/kpis', 'kpis', async (q) => {
      const grain = grainOf(q.query.get('grain'), ['day', 'week', 'month']);
      const spec: KpiSubscription = {
        id: '', grain, kpis: [], channel: q.query.get('channel') ?? '', platform: q.query.get('platform') ?? '',
        from: q.query.get('from') ?? '', to: q.query.get('to') ?? '',
      };
      const rows = await this.gate.run((e) => e.kpis(grain));
      return json({ rows: rows.map(toWire).filter((r) => matches(spec, r)), watermark: this.watermark() });
    });
    this.route('get', '/v1/cohorts', 'kpis', async (q) => {
      const grain = grainOf(q.query.get('grain'), ['week', 'month']) as 'week' | 'month';
      const kind = q.query.get('kind') === 'signup' ? 'signup' : 'first_activity';
      return json({ rows: await this.gate.run((e) => e.cohorts(grain, kind)) });
    });
    this.route('get', '/v1/funnel', 'kpis', async (q) => json({ rows: await this.gate.run((e) => e.funnel(grainOf(q.query.get('grain'), ['day', 'week', 'month']))) }));
    this.route('get', '/v1/users/:id', 'kpis', async (q) => {
      const id = q.params[0]!;
      const out = await this.gate.run((e) => {
        const profile = e.profile(id);
        if (profile === null) return null;
        return { profile, segments: e.segmentsOf(id) ?? [], triggers: e.recentTriggers(id) ?? [] };
      });
      if (out === null) throw new HttpError(404, 'not_found', `no profile '${id}'`);
      return json(out);
    });
    this.route('get', '/v1/segments', 'kpis', async () => json({
      segments: await this.gate.run(async (e) => {
        const sizes = await e.segmentSizes('day');
        const last = new Map<string, number>();
        for (const r of sizes) if (r.tier === '*') last.set(r.segment, r.size);
        return e.segmentStatus().map((s) => ({ ...s, size: last.get(s.id) ?? 0 }));
      }),
    }));
    // Segment rules reloaded in the running engine (docs/SEGMENTS.md "Changing the rules").
    this.route('post', '/v1/segments/rules', 'admin', async (_q, body) => {
      let doc: unknown;
      try {
        doc = JSON.parse(Buffer.from(body!).toString('utf8'));
      } catch (err) {
        throw new HttpError(400, 'bad_request', `not JSON: ${(err as Error).message}`);
      }
      const list = Array.isArray(doc) ? doc : (doc as { segments?: unknown } | null)?.segments;
      return json(await this.gate.run((e) => e.reloadSegments(list, 'POST /v1/segments/rules')));
    }, true);
    this.route('get', '/v1/segments/:id/sizes', 'kpis', async (q) => {
      const id = q.params[0]!;
      const grain = grainOf(q.query.get('grain') ?? 'day', ['day', 'week', 'month']);
      return json({ rows: (await this.gate.run((e) => e.segmentSizes(grain))).filter((r) => r.segment === id) });
    });
    this.route('get', '/v1/segments/:id/members', 'kpis', async (q) => this.members(q));
    this.route('get', '/v1/campaigns', 'kpis', async () => json({ campaigns: await this.gate.run((e) => this.reports(e)) }));
    this.route('get', '/v1/campaigns/:id/results', 'kpis', async (q) => {
      const r = (await this.gate.run((e) => this.reports(e))).find((x) => x.campaign === q.params[0]);
      if (r === undefined) throw new HttpError(404, 'not_found', `no campaign '${q.params[0]}'`);
      return json(r);
    });
    this.websockets();
    app.any('/*', (res, req) => {
      const url = req.getUrl();
      this.m.http.inc({ route: 'unknown', status: '404' });
      res.writeStatus(STATUS_TEXT[404]!).writeHeader('content-type', 'application/json').end(JSON.stringify({ error: 'not_found', message: `no route ${url}` }));
    });
  }

  /**
   * Notes what health figures need a history: since when each sink has been failing. Runs every
   * second and on each probe; null once closed.
   */
  private sampleHealth(): EngineHealth | null {
    const e = this.gate.engine as Engine | null;
    if (e === null) return null;
    const h = e.health();
    const now = Date.now();
    const since = this.ready.sinkFailingSince;
    for (const s of h.sinks) {
      if (!s.failing) since.delete(s.name);
      else if (!since.has(s.name)) since.set(s.name, now);
    }
    return h;
  }

  /** The /readyz checks that fail now (empty: ready). */
  private readiness(): ReadinessFailure[] {
    const h = this.sampleHealth();
    if (h === null) return [{ check: 'engine_failed', message: 'the server is closed' }];
    const out: ReadinessFailure[] = [];
    if (h.failed !== null) {
      out.push({ check: 'engine_failed', message: `${h.failed.code}: ${h.failed.message} (failed closed: restart to resume from the last checkpoint)` });
    }
    if (h.consecutiveCheckpointFailures > 0) {
      out.push({ check: 'checkpoint', message: `${h.consecutiveCheckpointFailures} checkpoint attempt(s) failed in a row${h.lastCheckpointError === null ? '' : ` (last: ${h.lastCheckpointError})`}; nothing new is acknowledged until one succeeds` });
    }
    const now = Date.now();
    for (const s of h.sinks) {
      const since = this.ready.sinkFailingSince.get(s.name);
      if (!s.failing || since === undefined || now - since < this.ready.maxSinkFailingMs) continue;
      out.push({
        check: `sink:${s.name}`,
        message: `failing for ${Math.round((now - since) / 1000)} s (> ${this.ready.maxSinkFailingMs} ms), ${s.consecutiveFailures} attempts, ${Math.max(0, s.head - s.cursor)} records waiting${s.lastError === null ? '' : `; last error ${s.lastErrorCode ?? ''} ${s.lastError}`}`,
      });
    }
    const gapped = this.triggers.gaps().filter((g) => g.lastAt > 0 && now - g.lastAt < this.ready.gapHoldMs);
    if (gapped.length > 0) {
      out.push({
        check: 'trigger_gap',
        message: `the trigger-log retention trim skipped triggers sender group(s) had not acked within the last ${this.ready.gapHoldMs} ms: ${gapped.map((g) => `${g.group} (${g.skipped} skipped)`).join(', ')}`,
      });
    }
    if (this.ready.extra !== null) {
      try {
        out.push(...this.ready.extra());
      } catch (err) {
        // A check that cannot tell is a failing check, never a silent pass.
        out.push({ check: 'readiness_hook', message: `a readiness check threw: ${(err as Error).message ?? String(err)}` });
      }
    }
    return out;
  }

  private reports(e: Engine): ReturnType<typeof campaignReport> {
    const op = e.campaignOperator;
    return op === null ? [] : campaignReport(e.campaignRows(), op.definitions);
  }

  private watermark(): number | null {
    const w = this.gate.engine.watermark;
    return Number.isFinite(w) ? w : null;
  }

  /** One authenticated route; `fn` answers (or throws HttpError / CrmError). */
  private route(method: 'get' | 'post', pattern: string, scope: Scope, fn: (q: RequestInfo, body?: Uint8Array) => Promise<Reply>, withBody = false): void {
    const params = (pattern.match(/:\w+/g) ?? []).length;
    this.app[method](pattern, (res, req) => {
      const query = new URLSearchParams(req.getQuery() ?? '');
      const info: RequestInfo = {
        query, contentType: req.getHeader('content-type'), accept: req.getHeader('accept'),
        params: Array.from({ length: params }, (_, i) => safeDecode(req.getParameter(i) ?? '')),
      };
      const key = requestKey(req.getHeader('authorization'), req.getHeader('x-api-key'));
      let aborted = false;
      res.onAborted(() => {
        aborted = true;
      });
      const send = (r: Reply): void => {
        if (aborted) return;
        this.m.http.inc({ route: pattern, status: String(r.status ?? 200) });
        res.cork(() => {
          res.writeStatus(STATUS_TEXT[r.status ?? 200] ?? `${r.status}`).writeHeader('content-type', r.type ?? 'application/json');
          if (r.retryAfter !== undefined) res.writeHeader('retry-after', String(r.retryAfter));
          res.end(r.body);
        });
      };
      // `?key=` only on WebSocket upgrades: on HTTP the URL, key included, lands in access logs,
      // proxies and Referer headers. Refused even next to a valid header, so the habit cannot stick.
      if (query.has('key')) {
        if (withBody) res.onData(() => undefined);
        send(json({ error: 'unauthorized', message: KEY_IN_QUERY_MESSAGE }, 401));
        return;
      }
      const auth = this.keys.check(key, scope);
      if (!auth.ok) {
        if (withBody) res.onData(() => undefined); // drain, never buffer an unauthorised body
        send(json({ error: auth.code, message: auth.code === 'unauthorized' ? 'a valid API key is required' : `this key lacks the '${scope}' scope` }, auth.status));
        return;
      }
      const answer = (body?: Uint8Array): void => {
        fn(info, body).then(send, (err: unknown) => send(errorReply(err)));
      };
      if (!withBody) {
        answer();
        return;
      }
      // The body arrives in chunks that are only valid inside the callback: copy, and stop at the limit.
      const chunks: Uint8Array[] = [];
      let size = 0;
      let tooBig = false;
      res.onData((chunk, isLast) => {
        if (tooBig) return;
        size += chunk.byteLength;
        if (size > this.opts.maxBodyBytes) {
          tooBig = true;
          send(json({ error: 'payload_too_large', message: `the body is larger than ${this.opts.maxBodyBytes} bytes` }, 413));
          return;
        }
        chunks.push(new Uint8Array(chunk.slice(0)));
        if (isLast) answer(Buffer.concat(chunks));
      });
    });
  }

  private async ingest(contentType: string, body: Uint8Array, durable: boolean): Promise<Reply> {
    let events: unknown[];
    if (contentType.startsWith('application/x-protobuf') || contentType.startsWith('application/protobuf')) {
      try {
        events = crmstream.v1.EventBatch.decode(body).events;
      } catch (err) {
        throw new HttpError(400, 'bad_request', `not a protobuf EventBatch: ${(err as Error).message}`);
      }
    } else {
      let doc: unknown;
      try {
        doc = JSON.parse(Buffer.from(body).toString('utf8'));
      } catch (err) {
        throw new HttpError(400, 'bad_request', `not JSON: ${(err as Error).message}`);
      }
      const list = Array.isArray(doc) ? doc : (doc as { events?: unknown } | null)?.events;
      if (!Array.isArray(list)) throw new HttpError(400, 'bad_request', 'expected a JSON array of events or {"events": [...]}');
      events = list;
    }
    const limit = this.opts.maxEventsPerRequest;
    if (events.length > limit) throw new HttpError(413, 'too_many_events', `${events.length} events in one request; the limit is ${limit} (server.maxEventsPerRequest): split the batch`);
    if (this.queuedEvents + events.length > this.opts.maxQueuedEvents) {
      // Overload: refuse before taking anything, so a retry is never a duplicate.
      return { ...json({ error: 'overloaded', message: `${this.queuedEvents} events are waiting for the engine (server.maxQueuedEvents ${this.opts.maxQueuedEvents}); retry later` }, 503), retryAfter: 1 };
    }
    this.m.eventsIn.inc(events.length);
    this.queuedEvents += events.length;
    let reasons: string[];
    try {
      reasons = await this.coalesce(events, durable);
    } finally {
      this.queuedEvents -= events.length;
    }
    let accepted = 0;
    for (const r of reasons) if (r === '') accepted++;
    return json({ accepted, rejected: reasons.length - accepted, results: reasons, durable });
  }

  /**
   * POSTs that arrive while the engine is busy wait together and go in as ONE engine call (one
   * validation pass) and ONE checkpoint (group commit): each request is answered with its own
   * slice of the per-event results only once the checkpoint holding its events is durable, so an
   * answer survives a SIGKILL right after it (docs/GUARANTEES.md). Under load the per-request
   * costs — engine call and fsync — are paid once per engine turn, not per request.
   * `ack=processed` requests (fire-and-forget) are answered before the checkpoint.
   */
  private coalesce(events: unknown[], durable: boolean): Promise<string[]> {
    return new Promise((resolve, reject) => {
      this.waiting.push({ events, durable, resolve, reject });
      if (this.waiting.length > 1) return; // a turn is already queued and will take these too
      void this.gate.run(async (e) => {
        const group = this.waiting;
        this.waiting = [];
        const all = group.length === 1 ? group[0]!.events : group.flatMap((g) => g.events);
        let r: Awaited<ReturnType<Engine['ingest']>>;
        try {
          r = await e.ingest(all);
        } catch (err) {
          for (const g of group) g.reject(err);
          return;
        }
        const slices: string[][] = [];
        let at = 0;
        let wantDurable = false;
        for (const g of group) {
          slices.push(r.reasons.slice(at, at + g.events.length));
          at += g.events.length;
          if (g.durable) wantDurable = true;
          else g.resolve(slices[slices.length - 1]!);
        }
        if (!wantDurable) return;
        try {
          await e.sync();
        } catch (err) {
          for (const g of group) if (g.durable) g.reject(err);
          return;
        }
        group.forEach((g, k) => {
          if (g.durable) g.resolve(slices[k]!);
        });
      });
    });
  }

  private async members(q: RequestInfo): Promise<Reply> {
    const id = q.params[0]!;
    const limit = Math.min(10_000, Math.max(1, Number(q.query.get('limit') ?? 1000) || 1000));
    const after = q.query.get('after') ?? '';
    const arrow = q.accept.includes('application/vnd.apache.arrow.stream');
    // Read-only: no checkpoint, and only the profiles from the cursor on (Engine.segmentMembersPage).
    const page = await this.gate.run(async (e) => {
      if (!e.segmentIds().includes(id)) return null;
      const p = await e.segmentMembersPage(id, after, limit);
      return { out: p.members, more: p.next !== null };
    });
    if (page === null) throw new HttpError(404, 'not_found', `no segment '${id}'`);
    if (arrow) {
      // `since` (epoch ms) becomes an Arrow timestamp: the typed columns of `export segment`.
      return { type: 'application/vnd.apache.arrow.stream', body: tableToIPC(rowsToTable(page.out, SEGMENT_SCHEMA), 'stream') };
    }
    return json({ members: page.out, next: page.more ? page.out[page.out.length - 1]!.user_id : null });
  }

  // -------------------------------------------------------------------------------------------
  // WebSockets

  private websockets(): void {
    const behavior = (kind: SocketData['kind'], scope: Scope): uWS.WebSocketBehavior<SocketData> => ({
      maxPayloadLength: this.opts.maxFrameBytes,
      maxBackpressure: 16 << 20,
      idleTimeout: 120,
      sendPingsAutomatically: true,
      upgrade: (res, req, context) => {
        const query = new URLSearchParams(req.getQuery() ?? '');
        const key = upgradeKey(req.getHeader('authorization'), req.getHeader('x-api-key'), query);
        const protocols = req.getHeader('sec-websocket-protocol').split(',').map((p) => p.trim()).filter((p) => p !== '');
        const wsKey = req.getHeader('sec-websocket-key');
        const ext = req.getHeader('sec-websocket-extensions');
        const auth = this.keys.check(key, scope);
        if (!auth.ok) {
          res.writeStatus(STATUS_TEXT[auth.status]!).writeHeader('content-type', 'application/json').end(JSON.stringify({ error: auth.code }));
          return;
        }
        if (this.sockets.size >= this.opts.maxSockets) {
          // Every socket costs memory and a share of each KPI fan-out: the count is bounded.
          res.writeStatus(STATUS_TEXT[503]!).writeHeader('content-type', 'application/json').writeHeader('retry-after', '5')
            .end(JSON.stringify({ error: 'too_many_sockets', message: `${this.sockets.size} WebSockets are open (server.maxSockets ${this.opts.maxSockets})` }));
          return;
        }
        const useJson = protocols.includes('json');
        const data = { kind, json: useJson, closed: false, group: null, groups: auth.groups, subs: new Set<string>() } as unknown as SocketData;
        res.upgrade(data, wsKey, useJson ? 'json' : (protocols[0] ?? ''), ext, context);
      },
      open: (ws) => {
        const d = ws.getUserData();
        this.sockets.add(ws);
        d.adapter = {
          json: d.json,
          get closed() { return d.closed; },
          bufferedAmount: () => (d.closed ? 0 : ws.getBufferedAmount()),
          send: (frame) => {
            if (d.closed) return false;
            this.m.frames.inc({ kind });
            return ws.send(frame, typeof frame !== 'string') === 1;
          },
        };
      },
      message: (ws, message, isBinary) => {
        const d = ws.getUserData();
        let frame: crmstream.v1.IClientFrame;
        try {
          frame = d.json || !isBinary ? (JSON.parse(Buffer.from(message).toString('utf8')) as crmstream.v1.IClientFrame) : crmstream.v1.ClientFrame.decode(new Uint8Array(message));
          if (frame === null || typeof frame !== 'object') throw new Error('not an object');
        } catch (err) {
          this.m.badFrames.inc();
          this.closeWith(ws, 'bad_frame', `the frame does not parse: ${(err as Error).message}`);
          return;
        }
        try {
          this.onFrame(ws, kind, frame);
        } catch (err) {
          this.m.badFrames.inc();
          this.closeWith(ws, err instanceof HttpError ? err.code : 'bad_frame', (err as Error).message);
        }
      },
      drain: (ws) => {
        const d = ws.getUserData();
        if (d.group !== null) this.triggers.drained(d.group);
      },
      close: (ws) => {
        const d = ws.getUserData();
        d.closed = true;
        this.sockets.delete(ws);
        if (d.group !== null) this.triggers.disconnect(d.group, d.adapter);
        this.kpis.unsubscribe(d.adapter, null);
      },
    });
    this.app.ws('/v1/triggers', behavior('triggers', 'triggers'));
    this.app.ws('/v1/kpis', behavior('kpis', 'kpis'));
  }

  private onFrame(ws: uWS.WebSocket<SocketData>, kind: SocketData['kind'], f: crmstream.v1.IClientFrame): void {
    const d = ws.getUserData();
    const reply = (msg: crmstream.v1.IServerFrame): void => {
      d.adapter.send(d.json ? JSON.stringify(msg) : crmstream.v1.ServerFrame.encode(msg).finish());
    };
    if (kind === 'triggers' && f.subscribe_triggers != null) {
      const s = f.subscribe_triggers;
      const group = String(s.group ?? '');
      if (!GROUP_NAME.test(group)) throw new HttpError(400, 'bad_subscription', 'group: 1–128 letters, digits, _ . : -');
      if (d.group !== null) throw new HttpError(400, 'bad_subscription', 'this socket already has a subscription');
      // A key reads and acks only its own groups' triggers (and cannot take another sender's name first).
      if (!mayUseGroup(d.groups, group)) {
        this.triggers.rejected.forbidden++;
        this.closeWith(ws, 'forbidden', `this key may not use sender group '${group}' (its groups: ${d.groups!.join(', ')})`);
        return;
      }
      const resumeFrom = parseSeq(s.resume_from ?? 0);
      if (Number.isNaN(resumeFrom)) throw new HttpError(400, 'bad_subscription', 'resume_from: a non-negative integer seq');
      const r = this.triggers.connect({
        group, channels: (s.channels ?? []).map(String), campaigns: (s.campaigns ?? []).map(String),
        resumeFrom, maxInFlight: Math.min(100_000, Math.max(1, Number(s.max_in_flight ?? 0) || 1000)),
      }, d.adapter);
      if (!r.ok) {
        this.closeWith(ws, r.code, r.message);
        return;
      }
      d.group = group;
      reply({ subscribed: { what: 'triggers', id: group, from_seq: r.from } });
      if (r.gap !== null) d.adapter.send(gapFrame(d.json, r.gap));
      return;
    }
    if (kind === 'triggers' && f.ack != null) {
      if (d.group === null) throw new HttpError(400, 'bad_subscription', 'ack before subscribe_triggers');
      // A bad ack changes nothing and is answered; the socket stays (its window is still valid).
      const r = this.triggers.ack(d.group, parseSeq(f.ack.seq));
      if (!r.ok) reply({ error: { code: r.code, message: r.message } });
      return;
    }
    if (kind === 'kpis' && f.subscribe_kpis != null) {
      const s = f.subscribe_kpis;
      const spec: KpiSubscription = {
        id: String(s.id ?? ''), grain: grainOf(s.grain ?? null, ['day', 'week', 'month']), kpis: (s.kpis ?? []).map(String),
        channel: String(s.channel ?? ''), platform: String(s.platform ?? ''), from: String(s.from ?? ''), to: String(s.to ?? ''),
      };
      if (!d.subs.has(spec.id) && d.subs.size >= this.opts.maxSubscriptionsPerSocket) {
        reply({ error: { code: 'too_many_subscriptions', message: `this socket has ${d.subs.size} KPI subscriptions (server.maxSubscriptionsPerSocket ${this.opts.maxSubscriptionsPerSocket}); unsubscribe one first` } });
        return;
      }
      d.subs.add(spec.id);
      reply({ subscribed: { what: 'kpis', id: spec.id } });
      void this.kpis.subscribe(spec, d.adapter).catch(() => undefined);
      return;
    }
    if (kind === 'kpis' && f.unsubscribe != null) {
      d.subs.delete(String(f.unsubscribe.id ?? ''));
      this.kpis.unsubscribe(d.adapter, String(f.unsubscribe.id ?? ''));
      return;
    }
    throw new HttpError(400, 'bad_frame', `no ${kind} frame recognised (keys: ${Object.keys(f).join(', ') || 'none'})`);
  }

  /** Closes one socket with a reason code (1008 policy violation); others are unaffected. */
  private closeWith(ws: uWS.WebSocket<SocketData>, code: string, message: string): void {
    const d = ws.getUserData();
    if (d.closed) return;
    try {
      const f = { error: { code, message } };
      ws.send(d.json ? JSON.stringify(f) : crmstream.v1.ServerFrame.encode(f).finish(), !d.json);
    } catch {
      // already closing
    }
    ws.end(1008, code);
  }
}

interface RequestInfo {
  query: URLSearchParams;
  contentType: string;
  accept: string;
  params: string[];
}

/**
 * A sequence number from a client frame: a non-negative safe integer, as a number or (protobuf's
 * JSON form of 64-bit integers) a string of digits; anything else is NaN, which callers refuse.
 */
function parseSeq(v: unknown): number {
  if (typeof v === 'number') return Number.isSafeInteger(v) && v >= 0 ? v : Number.NaN;
  if (typeof v === 'string' && /^\d{1,16}$/.test(v)) return Number.isSafeInteger(Number(v)) ? Number(v) : Number.NaN;
  return Number.NaN;
}

/** A percent-decoded path parameter; a malformed escape stays as it came (it then matches nothing). */
function safeDecode(s: string): string {
  try {
    return decodeURIComponent(s);
  } catch {
    return s;
  }
}

function grainOf(v: string | null, allowed: readonly KpiGrain[]): KpiGrain {
  if (v !== null && (allowed as readonly string[]).includes(v)) return v as KpiGrain;
  throw new HttpError(400, 'bad_request', `grain must be one of ${allowed.join(', ')}`);
}

function matches(spec: KpiSubscription, r: { window: string; channel: string; platform: string }): boolean {
  if (spec.channel !== '' && r.channel !== spec.channel) return false;
  if (spec.platform !== '' && r.platform !== spec.platform) return false;
  if (spec.from !== '' && r.window < spec.from) return false;
  return !(spec.to !== '' && r.window > spec.to);
}

/**
 * A counter whose value is kept elsewhere (engine.stats(), a hub, a Kafka client) and read at
 * each scrape: prom-client's way for that is `collect()` setting the absolute value with
 * `reset()` + `inc(v)`. Typed `counter`, so `rate()` and `increase()` work and a restart reads as
 * a counter reset.
 *
 * @example
 * counterOf(registry, 'crm_kafka_messages_total', 'Messages consumed', () => source.stats().messages);
 */
export function counterOf(r: client.Registry, name: string, help: string, read: () => number): client.Counter {
  return new client.Counter({
    name, help, registers: [r],
    collect() {
      const v = read();
      this.reset();
      this.inc(Number.isFinite(v) && v > 0 ? v : 0);
    },
  });
}

function errorReply(err: unknown): Reply {
  if (err instanceof HttpError) return json({ error: err.code, message: err.message }, err.status);
  if (err instanceof CrmError) {
    const status = err.code === 'KPI_DISABLED' || err.code === 'SEGMENTS_DISABLED' || err.code === 'CAMPAIGNS_DISABLED' || err.code === 'CONFIG_INVALID' ? 400 : 503;
    // 503: nothing of the request is durable (a failed checkpoint changed nothing; a failed-closed
    // engine restarts from its last checkpoint), so the same request may be sent again.
    return { ...json({ error: err.code.toLowerCase(), message: err.message }, status), ...(status === 503 ? { retryAfter: err.retriable ? 1 : 5 } : {}) };
  }
  return json({ error: 'internal', message: 'internal error' }, 500); // no details (no secrets) to the client
}
