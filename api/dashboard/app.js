// crmstream dashboard: plain ES2020 served as is by api/server.ts (no build step, no framework).
// The contract it speaks is docs/API.md; row shapes are operators/kpi-rows.ts and
// operators/campaign-report.ts. Every panel keeps its last good rendering when a refresh fails, and
// the failure is shown in #status until the next success of that source.
'use strict';

(() => {
  // ---------------------------------------------------------------------------------------------
  // Settings

  const FUNNEL_EVERY_MS = 5_000;
  const COHORTS_EVERY_MS = 10_000;
  const SEGMENTS_EVERY_MS = 5_000;
  const CAMPAIGNS_EVERY_MS = 5_000;
  /** A hung request must not stall its panel forever: the poll loop waits for each request. */
  const FETCH_TIMEOUT_MS = 8_000;
  /** Reconnect backoff: 0.5 s doubling to 30 s, so a restarting server is not hammered. */
  const BACKOFF_MIN_MS = 500;
  const BACKOFF_MAX_MS = 30_000;
  /** The heat map shows the most recent cohorts only: older ones would not fit a screen anyway. */
  const MAX_COHORTS = 12;
  const DAY_S = 86_400;
  /** Plot height in CSS pixels: with the legend, the panel stays beside the funnel at 1280×800. */
  const CHART_HEIGHT = 210;
  /** The "all values" marginal (docs/KPIS.md): the dashboard shows totals, not per channel. */
  const ALL = '*';

  const FUNNEL_STEPS = [
    { field: 'visit', label: 'Visit', rate: null },
    { field: 'sign_up', label: 'Sign-up', rate: 'sign_up_rate' },
    { field: 'first_purchase', label: 'First purchase', rate: 'first_purchase_rate' },
    { field: 'revisit', label: 'Revisit (d1–3)', rate: 'revisit_rate' },
    { field: 'repeat_purchase', label: 'Repeat purchase', rate: 'repeat_purchase_rate' },
  ];

  // ---------------------------------------------------------------------------------------------
  // Formatting: one Intl.NumberFormat per style, built once (they are costly to construct).

  const fmtInt = new Intl.NumberFormat(undefined, { maximumFractionDigits: 0 });
  const fmtMoney = new Intl.NumberFormat(undefined, { maximumFractionDigits: 0 });
  const fmtCompact = new Intl.NumberFormat(undefined, { notation: 'compact', maximumFractionDigits: 1 });
  const fmtPct = new Intl.NumberFormat(undefined, { style: 'percent', minimumFractionDigits: 1, maximumFractionDigits: 1 });
  const fmtPctShort = new Intl.NumberFormat(undefined, { style: 'percent', maximumFractionDigits: 0 });
  const fmtPp = new Intl.NumberFormat(undefined, { minimumFractionDigits: 2, maximumFractionDigits: 2, signDisplay: 'exceptZero' });
  const fmtP = new Intl.NumberFormat(undefined, { maximumSignificantDigits: 2 });

  /** Null, undefined and non-finite numbers are "no value" (a rate over 0, a missing field). */
  const has = (x) => typeof x === 'number' && Number.isFinite(x);
  const show = (x, f) => (has(x) ? f.format(x) : '–');

  /** p-values below 0.001 read better as a bound than as 2 significant digits of noise. */
  const showP = (p) => (!has(p) ? '–' : p < 0.001 ? '< 0.001' : fmtP.format(p));

  /** Tile formats by KPI field; everything else is a count. */
  const TILE_FORMAT = { revenue: fmtMoney, arppu: fmtMoney, arpu: fmtMoney, pcr: fmtPct };

  // ---------------------------------------------------------------------------------------------
  // DOM helpers: text goes through textContent, never innerHTML (ids and names come from config).

  const $ = (id) => document.getElementById(id);

  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    if (props) {
      for (const [k, v] of Object.entries(props)) {
        if (k === 'class') node.className = v;
        else if (k === 'style') Object.assign(node.style, v);
        else if (v !== null && v !== undefined) node.setAttribute(k, String(v));
      }
    }
    for (const c of children) node.append(c instanceof Node ? c : String(c));
    return node;
  }

  // ---------------------------------------------------------------------------------------------
  // Status line: one message per failing source, so one recovering source does not hide another.

  const problems = new Map();

  function reportProblem(source, err) {
    const message = err instanceof Error ? err.message : String(err);
    problems.set(source, message);
    // The console keeps the stack; the status line keeps what a reader needs.
    console.error(`[${source}]`, err);
    renderStatus();
  }

  function clearProblem(source) {
    if (problems.delete(source)) renderStatus();
  }

  function renderStatus() {
    const status = $('status');
    const parts = [...problems].map(([source, message]) => `${source}: ${message}`);
    status.textContent = parts.join(' · ');
    status.dataset.state = parts.length > 0 ? 'error' : 'ok';
  }

  function setConnection(state, text) {
    const badge = $('connection');
    badge.dataset.state = state;
    badge.textContent = text;
  }

  // ---------------------------------------------------------------------------------------------
  // The API key: in the fragment, so it never reaches a server log or a Referer header.

  function readKey() {
    const params = new URLSearchParams(location.hash.replace(/^#/, ''));
    return params.get('key') || '';
  }

  const KEY = readKey();

  // ---------------------------------------------------------------------------------------------
  // HTTP

  async function getJson(path) {
    let res;
    try {
      res = await fetch(path, {
        headers: { Authorization: `Bearer ${KEY}`, Accept: 'application/json' },
        signal: AbortSignal.timeout(FETCH_TIMEOUT_MS),
      });
    } catch (err) {
      // The browser's "Failed to fetch" does not say which request: name it.
      throw new Error(`${path}: ${err.message}`, { cause: err });
    }
    if (!res.ok) throw new Error(`${path}: HTTP ${res.status} ${await errorCode(res)}`.trim());
    return res.json();
  }

  /** The API's error body is `{"error": code, "message"}`; a proxy's HTML page is shown by status only. */
  async function errorCode(res) {
    const text = await res.text();
    try {
      const body = JSON.parse(text);
      return [body.error, body.message].filter(Boolean).join(': ');
    } catch {
      return text.slice(0, 120);
    }
  }

  /**
   * Runs `task` now and then `everyMs` after each completion (never two at once, so a slow server
   * gets fewer requests, not a queue of them). Failures go to the status line.
   */
  function poll(source, everyMs, task) {
    const run = async () => {
      try {
        await task();
        clearProblem(source);
      } catch (err) {
        reportProblem(source, err);
      } finally {
        setTimeout(run, everyMs);
      }
    };
    run();
  }

  /** Rows of the all-channels, all-platforms marginal; other rows are per-dimension breakdowns. */
  const totalsOnly = (rows) => (Array.isArray(rows) ? rows : []).filter((r) => r.channel === ALL && r.platform === ALL);

  // ---------------------------------------------------------------------------------------------
  // Live KPIs over the WebSocket

  /**
   * Day rows of the subscription by window label. The snapshot after each (re)connect replaces it
   * and updates only touch windows in view, so it holds at most what the server holds for the view.
   */
  const kpiRows = new Map();
  let renderQueued = false;

  function kpiValue(row, field) {
    if (row.nulls && row.nulls.includes(field)) return null;
    const v = row.values ? row.values[field] : undefined;
    return has(v) ? v : null;
  }

  function connectKpis(attempt) {
    const scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
    const url = `${scheme}//${location.host}/v1/kpis?key=${encodeURIComponent(KEY)}`;
    let ws;
    try {
      ws = new WebSocket(url, 'json');
    } catch (err) {
      reportProblem('kpis', err);
      scheduleReconnect(attempt);
      return;
    }
    setConnection('connecting', attempt === 0 ? 'connecting' : `reconnecting (#${attempt})`);

    ws.onopen = () => {
      // kpis: [] = every KPI; the tiles and the chart read several.
      ws.send(JSON.stringify({
        subscribe_kpis: { id: 'tiles', grain: 'day', kpis: [], channel: ALL, platform: ALL, from: '', to: '' },
      }));
    };

    ws.onmessage = (ev) => {
      let frame;
      try {
        frame = JSON.parse(ev.data);
      } catch (err) {
        reportProblem('kpis', new Error(`unreadable frame: ${err.message}`));
        return;
      }
      if (frame.kpis) {
        // The backoff resets on data, not on open: a server that accepts and then closes at once
        // (bad key, bad frame) must still be retried slowly.
        attempt = 0;
        applyKpiFrame(frame.kpis);
        setConnection('live', 'live');
        clearProblem('kpis');
      } else if (frame.error) {
        reportProblem('kpis', new Error(frame.error.code || JSON.stringify(frame.error)));
      }
    };

    // onerror carries no detail in browsers and is always followed by onclose, which reports.
    ws.onerror = () => {};

    ws.onclose = (ev) => {
      const delay = backoffMs(attempt);
      const why = `${ev.code}${ev.reason ? ` ${ev.reason}` : ''}`;
      reportProblem('kpis', new Error(`socket closed (${why}); retrying in ${(delay / 1000).toFixed(1)} s`));
      setConnection('down', 'disconnected');
      setTimeout(() => connectKpis(attempt + 1), delay);
    };
  }

  function scheduleReconnect(attempt) {
    setTimeout(() => connectKpis(attempt + 1), backoffMs(attempt));
  }

  /** Exponential with ±25 % jitter, so many dashboards do not reconnect in lockstep. */
  function backoffMs(attempt) {
    const base = Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * 2 ** Math.min(attempt, 16));
    return Math.round(base * (0.75 + Math.random() * 0.5));
  }

  function applyKpiFrame(msg) {
    if (msg.snapshot) kpiRows.clear();
    for (const row of totalsOnly(msg.rows)) kpiRows.set(row.window, row);
    // Updates arrive every kpiCoalesceMs at most; one render per animation frame is enough.
    if (!renderQueued) {
      renderQueued = true;
      requestAnimationFrame(() => {
        renderQueued = false;
        // A rendering bug (or uPlot failing to load) must show, not die in the animation frame.
        try {
          renderKpis();
          clearProblem('render');
        } catch (err) {
          reportProblem('render', err);
        }
      });
    }
  }

  /** Day labels are YYYY-MM-DD, so string order is time order. */
  function sortedWindows() {
    return [...kpiRows.keys()].sort();
  }

  function renderKpis() {
    const windows = sortedWindows();
    if (windows.length === 0) return;
    const latest = windows[windows.length - 1];
    $('window-label').textContent = `day ${latest}`;
    renderTiles(kpiRows.get(latest));
    renderSeries(windows);
  }

  function renderTiles(row) {
    for (const tile of document.querySelectorAll('[data-kpi]')) {
      const field = tile.dataset.kpi;
      const f = TILE_FORMAT[field] || fmtInt;
      tile.querySelector('.value').textContent = show(kpiValue(row, field), f);
    }
  }

  // ---------------------------------------------------------------------------------------------
  // Time series (uPlot)

  let chart = null;

  /** Seconds at UTC midnight of a YYYY-MM-DD label; the axis is drawn in UTC so the label's date shows. */
  const dayToSeconds = (label) => Date.parse(`${label}T00:00:00Z`) / 1000;

  function renderSeries(windows) {
    const xs = windows.map(dayToSeconds);
    const dau = windows.map((w) => kpiValue(kpiRows.get(w), 'active_users'));
    const revenue = windows.map((w) => kpiValue(kpiRows.get(w), 'revenue'));
    const data = [xs, dau, revenue];
    if (chart === null) chart = createChart(data);
    else chart.setData(data);
  }

  /**
   * A lone day (a fresh demo) gets a three-day span around it: uPlot's own span for one point on a
   * time scale in seconds is 86400 / 1e-3 s, about 1000 days. Otherwise uPlot's range (zoom works).
   */
  function xRange(u, min, max) {
    const xs = u.data[0];
    return xs.length === 1 ? [xs[0] - DAY_S, xs[0] + DAY_S] : [min, max];
  }

  function createChart(data) {
    const box = $('chart-series');
    const axisValues = (_u, splits) => splits.map((v) => fmtCompact.format(v));
    const opts = {
      width: Math.max(300, box.clientWidth),
      // The plot's height; uPlot's legend goes below it, inside the panel (app.css .chart).
      height: CHART_HEIGHT,
      // Local-day labels are plotted at UTC midnight; formatting in UTC keeps the date unchanged.
      tzDate: (ts) => uPlot.tzDate(new Date(ts * 1000), 'Etc/UTC'),
      scales: { x: { time: true, range: xRange }, users: { auto: true }, money: { auto: true } },
      series: [
        {},
        { label: 'DAU', scale: 'users', stroke: '#2563eb', width: 2, points: { show: true }, value: (_u, v) => show(v, fmtInt) },
        { label: 'Revenue', scale: 'money', stroke: '#16a34a', width: 2, points: { show: true }, value: (_u, v) => show(v, fmtMoney) },
      ],
      axes: [
        {},
        { scale: 'users', values: axisValues, stroke: '#2563eb' },
        { scale: 'money', side: 1, values: axisValues, stroke: '#16a34a', grid: { show: false } },
      ],
    };
    const u = new uPlot(opts, data, box);
    // Follow the panel's width: the grid reflows with the window.
    new ResizeObserver(() => u.setSize({ width: Math.max(300, box.clientWidth), height: CHART_HEIGHT })).observe(box);
    return u;
  }

  // ---------------------------------------------------------------------------------------------
  // Funnel: the latest weekly sign-up cohort, each step as a bar relative to the visits.

  async function refreshFunnel() {
    const body = await getJson('/v1/funnel?grain=week');
    const rows = totalsOnly(body.rows).sort((a, b) => (a.cohort < b.cohort ? -1 : a.cohort > b.cohort ? 1 : 0));
    const box = $('funnel');
    if (rows.length === 0) {
      box.replaceChildren(el('p', { class: 'muted' }, 'no data yet'));
      return;
    }
    const row = rows[rows.length - 1];
    $('funnel-cohort').textContent = `(cohort ${row.cohort})`;
    const top = Math.max(1, row.visit || 0);
    box.replaceChildren(...FUNNEL_STEPS.map((step) => funnelStep(step, row, top)));
  }

  function funnelStep(step, row, top) {
    const n = has(row[step.field]) ? row[step.field] : 0;
    const rate = step.rate === null ? '' : `${show(row[step.rate], fmtPct)} of previous`;
    return el('div', { class: 'funnel-step', 'data-step': step.field },
      el('span', { class: 'step-label' }, step.label),
      el('div', { class: 'bar-track' }, el('div', { class: 'bar', style: { width: `${(100 * n) / top}%` } })),
      el('span', { class: 'step-count' }, fmtInt.format(n)),
      el('span', { class: 'step-rate muted' }, rate));
  }

  // ---------------------------------------------------------------------------------------------
  // Cohort heat map: rows = first-activity week, columns = age in weeks, cell = active / size.

  async function refreshCohorts() {
    const body = await getJson('/v1/cohorts?grain=week');
    // The default kind is first_activity; rows without a kind are taken as that.
    const rows = totalsOnly(body.rows).filter((r) => r.kind === undefined || r.kind === 'first_activity');
    const table = $('cohorts');
    if (rows.length === 0) {
      table.replaceChildren(el('tbody', null, el('tr', null, el('th', { class: 'muted' }, 'no data yet'))));
      return;
    }
    const byCohort = groupCohorts(rows);
    const cohorts = [...byCohort.keys()].sort().slice(-MAX_COHORTS);
    const maxAge = Math.max(...rows.map((r) => r.age));
    const ages = Array.from({ length: maxAge + 1 }, (_, a) => a);
    const head = el('thead', null, el('tr', null, el('th', null, 'cohort'), el('th', { class: 'num' }, 'users'),
      ...ages.map((a) => el('th', { class: 'num' }, `w${a}`))));
    const bodyRows = cohorts.map((c) => cohortRow(c, byCohort.get(c), ages));
    table.replaceChildren(head, el('tbody', null, ...bodyRows));
  }

  function groupCohorts(rows) {
    const byCohort = new Map();
    for (const r of rows) {
      let entry = byCohort.get(r.cohort);
      if (entry === undefined) byCohort.set(r.cohort, (entry = { size: r.size, byAge: new Map() }));
      entry.byAge.set(r.age, r);
    }
    return byCohort;
  }

  function cohortRow(cohort, entry, ages) {
    const cells = ages.map((a) => {
      const r = entry.byAge.get(a);
      if (r === undefined || !(entry.size > 0)) return el('td', { class: 'empty' }, '');
      const share = r.active / entry.size;
      return el('td', {
        class: 'num heat-cell',
        title: `${fmtInt.format(r.active)} of ${fmtInt.format(entry.size)} active in week ${a}`,
        style: heatStyle(share),
      }, fmtPctShort.format(share));
    });
    return el('tr', null, el('th', null, cohort), el('td', { class: 'num' }, fmtInt.format(entry.size)), ...cells);
  }

  /** Blue with the share as opacity; white text once the cell is dark enough to need it. */
  function heatStyle(share) {
    const s = Math.max(0, Math.min(1, share));
    return { backgroundColor: `rgba(37, 99, 235, ${(0.08 + 0.92 * s).toFixed(3)})`, color: s > 0.55 ? '#fff' : '' };
  }

  // ---------------------------------------------------------------------------------------------
  // Segments

  async function refreshSegments() {
    const body = await getJson('/v1/segments');
    const segments = Array.isArray(body.segments) ? body.segments : [];
    const rows = segments.map((s) => el('tr', null,
      el('td', null, s.id),
      el('td', { class: `state state-${s.state}`, title: s.ready_at ? `ready at ${s.ready_at}` : null }, s.state),
      el('td', { class: 'num' }, show(s.size, fmtInt))));
    $('segments').tBodies[0].replaceChildren(...(rows.length > 0 ? rows : [emptyRow(3, 'no segments')]));
  }

  // ---------------------------------------------------------------------------------------------
  // Campaigns: per campaign and arm; the campaign and its SRM check span the arms' rows.

  async function refreshCampaigns() {
    const body = await getJson('/v1/campaigns');
    const reports = Array.isArray(body.campaigns) ? body.campaigns : [];
    const rows = reports.flatMap(campaignRows);
    $('campaigns').tBodies[0].replaceChildren(...(rows.length > 0 ? rows : [emptyRow(9, 'no campaigns configured')]));
  }

  function campaignRows(report) {
    const arms = report.arms || [];
    return arms.map((arm, i) => {
      const t = arm.totals || {};
      const vs = arm.vsControl;
      const cells = [
        el('td', null, arm.variant),
        el('td', { class: 'num' }, show(t.sent, fmtInt)),
        el('td', { class: 'num' }, show(t.control, fmtInt)),
        el('td', { class: 'num' }, show(arm.conversionRate, fmtPct)),
        el('td', { class: 'num' }, vs ? uplift(vs) : '–'),
        el('td', { class: 'num' }, vs ? showP(vs.pValue) : '–'),
        el('td', { class: 'num' }, vs ? showP(vs.alwaysValidP) : '–'),
      ];
      if (i === 0) {
        const span = Math.max(1, arms.length);
        cells.unshift(el('td', { rowspan: span, class: 'campaign-id' }, report.campaign));
        cells.push(srmCell(report.srm, span));
      }
      return el('tr', null, ...cells);
    });
  }

  /** Absolute uplift in percentage points with its 95 % Wald interval. */
  function uplift(vs) {
    if (!has(vs.diff)) return '–';
    const pp = (x) => fmtPp.format(100 * x);
    const ci = has(vs.diffLow) && has(vs.diffHigh) ? ` [${pp(vs.diffLow)}, ${pp(vs.diffHigh)}]` : '';
    return `${pp(vs.diff)} pp${ci}`;
  }

  function srmCell(srm, span) {
    if (!srm) return el('td', { rowspan: span }, '–');
    // No p-value (one arm, no traffic yet) means no test, which is not the same as "ok".
    if (!has(srm.pValue)) return el('td', { rowspan: span, class: 'muted', title: 'no test: fewer than 2 arms or no traffic' }, 'n/a');
    const title = `χ² ${show(srm.chi2, fmtP)}, df ${srm.df}, p ${showP(srm.pValue)}`;
    return el('td', { rowspan: span, class: srm.mismatch ? 'srm-bad' : 'srm-ok', title }, srm.mismatch ? 'mismatch' : 'ok');
  }

  function emptyRow(columns, text) {
    return el('tr', null, el('td', { colspan: columns, class: 'muted' }, text));
  }

  // ---------------------------------------------------------------------------------------------
  // Start

  function start() {
    renderStatus();
    if (KEY === '') {
      // Without a key every call would be a 401: say what to do instead of showing empty panels.
      reportProblem('setup', new Error('no API key: open the link `crmstream demo` prints (…/#key=<key>)'));
      setConnection('down', 'no key');
      return;
    }
    connectKpis(0);
    poll('funnel', FUNNEL_EVERY_MS, refreshFunnel);
    poll('cohorts', COHORTS_EVERY_MS, refreshCohorts);
    poll('segments', SEGMENTS_EVERY_MS, refreshSegments);
    poll('campaigns', CAMPAIGNS_EVERY_MS, refreshCampaigns);
  }

  // A new key pasted into the fragment takes effect on reload; the key is read once.
  window.addEventListener('hashchange', () => location.reload());
  start();
})();
