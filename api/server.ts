import { existsSync, readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import uWS from '@trufflesuite/uws-js-unofficial';
import { tableToIPC } from 'apache-arrow';
import client from 'prom-client';
import { crmstream } from './proto/gen/crmstream.js';
import type { Engine } from '../engine/engine.js';
import { SEGMENT_SCHEMA, rowsToTable } from '../engine/arrow-export.js';
import { CrmError } from '../engine/errors.js';
import { REJECT_NAMES } from '../engine/event-types.js';
import { campaignReport } from '../operators/campaign-report.js';
import type { KpiGrain } from '../operators/kpi-rows.js';
import { KeyRing, requestKey, type ApiKey, type Scope } from './auth.js';
import type { EngineGate } from './gate.js';
import { KpiHub, toWire, type KpiSocket, type KpiSubscription } from './kpi-hub.js';
import { TriggerHub, type TriggerSocket } from './trigger-hub.js';

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
}

interface SocketData {
  kind: 'triggers' | 'kpis';
  json: boolean;
  closed: boolean;
  group: string | null;
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
  private readonly opts: Required<Omit<ServerOptions, 'host' | 'keys' | 'metrics'>> & { host: string };
  private trimTimer: NodeJS.Timeout | null = null;
  /** Ingest requests waiting for the engine's next turn (coalesce). */
  private waiting: { events: unknown[]; resolve: (r: string[]) => void; reject: (e: unknown) => void }[] = [];
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
    s.trimTimer = setInterval(() => void hub.trim().catch(() => undefined), 2000);
    s.trimTimer.unref();
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
    const stat = (name: string, help: string, key: string): void => {
      new client.Gauge({ name, help, registers: [r], collect() { this.set(gate.engine.stats()[key] ?? 0); } });
    };
    stat('crm_events_accepted_total', 'Events accepted by the engine', 'accepted');
    stat('crm_watermark_ms', 'Event-time watermark (ms since epoch)', 'watermark');
    stat('crm_checkpoint_epoch', 'Checkpoints taken', 'epoch');
    stat('crm_profiles_cached', 'Profiles in the hot cache', 'cachedProfiles');
    stat('crm_timers_fired_total', 'Timers fired', 'timersFired');
    stat('crm_segment_changes_total', 'Segment membership changes', 'segmentChanges');
    stat('crm_triggers_total', 'Campaign triggers decided', 'triggers');
    stat('crm_checkpoint_last_ms', 'Duration of the last checkpoint (ms)', 'checkpointMsLast');
    stat('crm_checkpoint_ms_total', 'Time spent in checkpoints (ms)', 'checkpointMsTotal');
    new client.Gauge({ name: 'crm_triggers_sent_total', help: 'Trigger frames sent to sender groups (re-deliveries included)', registers: [r], collect() { this.set(hub.delivered); } });
    new client.Gauge({
      name: 'crm_watermark_delay_ms', help: 'Wall clock minus the watermark', registers: [r],
      collect() { const w = gate.engine.watermark; this.set(Number.isFinite(w) ? Date.now() - w : 0); },
    });
    new client.Gauge({
      name: 'crm_events_rejected_total', help: 'Events rejected, by reason', labelNames: ['reason'], registers: [r],
      collect() { const c = gate.engine.rejectCounts(); for (const k of REJECT_NAMES) this.set({ reason: k }, c[k]); },
    });
    new client.Gauge({
      name: 'crm_trigger_group_lag', help: 'Triggers in the log after a sender group\'s cursor (sequence distance)', labelNames: ['group'], registers: [r],
      collect() { for (const g of hub.groups()) this.set({ group: g.group }, Math.max(0, hub.headSeq - g.cursor)); },
    });
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
    app.get('/healthz', (res) => {
      const e = this.gate.engine;
      res.writeHeader('content-type', 'application/json').end(JSON.stringify({ ok: true, watermark: Number.isFinite(e.watermark) ? e.watermark : null, accepted: e.acceptedCount }));
    });
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
    this.route('post', '/v1/events', 'ingest', async (q, body) => this.ingest(q.contentType, body!), true);
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
      const key = requestKey(req.getHeader('authorization'), req.getHeader('x-api-key'), query);
      let aborted = false;
      res.onAborted(() => {
        aborted = true;
      });
      const send = (r: Reply): void => {
        if (aborted) return;
        this.m.http.inc({ route: pattern, status: String(r.status ?? 200) });
        res.cork(() => {
          res.writeStatus(STATUS_TEXT[r.status ?? 200] ?? `${r.status}`).writeHeader('content-type', r.type ?? 'application/json').end(r.body);
        });
      };
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

  private async ingest(contentType: string, body: Uint8Array): Promise<Reply> {
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
    this.m.eventsIn.inc(events.length);
    const reasons = await this.coalesce(events);
    let accepted = 0;
    for (const r of reasons) if (r === '') accepted++;
    return json({ accepted, rejected: reasons.length - accepted, results: reasons });
  }

  /**
   * POSTs that arrive while the engine is busy wait together and go in as ONE engine call (one
   * validation pass, one checkpoint decision), each getting its own slice of the per-event
   * results: under load the per-request engine overhead is paid once per engine turn, not per
   * request.
   */
  private coalesce(events: unknown[]): Promise<string[]> {
    return new Promise((resolve, reject) => {
      this.waiting.push({ events, resolve, reject });
      if (this.waiting.length > 1) return; // a turn is already queued and will take these too
      void this.gate.run(async (e) => {
        const group = this.waiting;
        this.waiting = [];
        const all = group.length === 1 ? group[0]!.events : group.flatMap((g) => g.events);
        try {
          const r = await e.ingest(all);
          let at = 0;
          for (const g of group) {
            g.resolve(r.reasons.slice(at, at + g.events.length));
            at += g.events.length;
          }
        } catch (err) {
          for (const g of group) g.reject(err);
        }
      });
    });
  }

  private async members(q: RequestInfo): Promise<Reply> {
    const id = q.params[0]!;
    const limit = Math.min(10_000, Math.max(1, Number(q.query.get('limit') ?? 1000) || 1000));
    const after = q.query.get('after') ?? '';
    const arrow = q.accept.includes('application/vnd.apache.arrow.stream');
    const page = await this.gate.run(async (e) => {
      if (!e.segmentIds().includes(id)) return null;
      const out: { user_id: string; tier: string; since: number }[] = [];
      let more = false;
      for await (const m of e.segmentMembers(id)) {
        if (m.user_id <= after) continue;
        if (out.length === limit) {
          more = true;
          break;
        }
        out.push(m);
      }
      return { out, more };
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
        const key = requestKey(req.getHeader('authorization'), req.getHeader('x-api-key'), query);
        const protocols = req.getHeader('sec-websocket-protocol').split(',').map((p) => p.trim()).filter((p) => p !== '');
        const wsKey = req.getHeader('sec-websocket-key');
        const ext = req.getHeader('sec-websocket-extensions');
        const auth = this.keys.check(key, scope);
        if (!auth.ok) {
          res.writeStatus(STATUS_TEXT[auth.status]!).writeHeader('content-type', 'application/json').end(JSON.stringify({ error: auth.code }));
          return;
        }
        const useJson = protocols.includes('json');
        const data = { kind, json: useJson, closed: false, group: null } as unknown as SocketData;
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
      if (!/^[\w.:-]{1,128}$/.test(group)) throw new HttpError(400, 'bad_subscription', 'group: 1–128 letters, digits, _ . : -');
      if (d.group !== null) throw new HttpError(400, 'bad_subscription', 'this socket already has a subscription');
      const from = this.triggers.connect({
        group, channels: (s.channels ?? []).map(String), campaigns: (s.campaigns ?? []).map(String),
        resumeFrom: Number(s.resume_from ?? 0) || 0, maxInFlight: Math.min(100_000, Math.max(1, Number(s.max_in_flight ?? 0) || 1000)),
      }, d.adapter);
      if (from === null) {
        this.closeWith(ws, 'group_busy', `group '${group}' is connected elsewhere`);
        return;
      }
      d.group = group;
      reply({ subscribed: { what: 'triggers', id: group, from_seq: from } });
      return;
    }
    if (kind === 'triggers' && f.ack != null) {
      if (d.group === null) throw new HttpError(400, 'bad_subscription', 'ack before subscribe_triggers');
      this.triggers.ack(d.group, Number(f.ack.seq ?? 0));
      return;
    }
    if (kind === 'kpis' && f.subscribe_kpis != null) {
      const s = f.subscribe_kpis;
      const spec: KpiSubscription = {
        id: String(s.id ?? ''), grain: grainOf(s.grain ?? null, ['day', 'week', 'month']), kpis: (s.kpis ?? []).map(String),
        channel: String(s.channel ?? ''), platform: String(s.platform ?? ''), from: String(s.from ?? ''), to: String(s.to ?? ''),
      };
      reply({ subscribed: { what: 'kpis', id: spec.id } });
      void this.kpis.subscribe(spec, d.adapter).catch(() => undefined);
      return;
    }
    if (kind === 'kpis' && f.unsubscribe != null) {
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

function errorReply(err: unknown): Reply {
  if (err instanceof HttpError) return json({ error: err.code, message: err.message }, err.status);
  if (err instanceof CrmError) {
    const status = err.code === 'KPI_DISABLED' || err.code === 'SEGMENTS_DISABLED' || err.code === 'CAMPAIGNS_DISABLED' || err.code === 'CONFIG_INVALID' ? 400 : 503;
    return json({ error: err.code.toLowerCase(), message: err.message }, status);
  }
  return json({ error: 'internal', message: 'internal error' }, 500); // no details (no secrets) to the client
}
