import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdirSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { chromium, type Browser, type Page } from 'playwright-core';
import { describe, expect, it } from 'vitest';
import { PROJECT_ROOT, tempDir } from '../helpers.js';

/**
 * The dashboard as a user sees it: the real `crmstream demo` (server, engine and generator in one
 * process), opened in Debian's Chromium through the link the demo prints. Checks that the live
 * tiles move, that the funnel, cohort heat map and chart render, and saves a screenshot.
 *
 * Chromium comes from the distribution (`.ci/run` does `apt-get install -y chromium`), never from
 * `playwright install`: the test fails, not skips, without it, so a missing browser cannot pass
 * silently as green.
 */

const CHROMIUM = '/usr/bin/chromium';
const CLI = path.join(PROJECT_ROOT, 'dist/api/cli.js');
const SCREENSHOT = path.join(PROJECT_ROOT, 'bench/results/dashboard.png');
const DASHBOARD_LINE = /dashboard: (http:\/\/127\.0\.0\.1:\d+\/#key=\S+)/;

const DEMO_START_MS = 30_000;
const TILE_APPEAR_MS = 30_000;
const TILE_CHANGE_MS = 30_000;
/** The funnel refreshes every 5 s and the cohorts every 10 s: a few refreshes of slack. */
const PANELS_MS = 35_000;
const POLL_MS = 250;
/** Keep the tail of the demo's output for failure messages, not all of it (it logs every 2 s). */
const OUTPUT_TAIL = 16_384;

/** A port nobody listens on now: bind port 0 on loopback, read what the kernel gave, release it. */
function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.once('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const addr = srv.address();
      const port = typeof addr === 'object' && addr !== null ? addr.port : 0;
      srv.close((err) => (err ? reject(err) : port > 0 ? resolve(port) : reject(new Error('no port assigned'))));
    });
  });
}

interface Demo {
  child: ChildProcess;
  /** The dashboard link from the demo's stdout. */
  url: Promise<string>;
  /** The last OUTPUT_TAIL characters it printed (stdout and stderr), for failure messages. */
  output: () => string;
}

function startDemo(port: number, dataDir: string): Demo {
  const child = spawn(process.execPath, [CLI, 'demo', '--port', String(port), '--duration', '120', '--rate', '2000', '--users', '5000', '--data-dir', dataDir], {
    cwd: PROJECT_ROOT,
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let output = '';
  const append = (d: Buffer): void => {
    output = (output + d.toString()).slice(-OUTPUT_TAIL);
  };
  child.stderr!.on('data', append);
  const url = new Promise<string>((resolve, reject) => {
    let stdout = '';
    const timer = setTimeout(() => reject(new Error(`no "dashboard: <url>" line within ${DEMO_START_MS} ms; output:\n${output}`)), DEMO_START_MS);
    child.stdout!.on('data', (d: Buffer) => {
      append(d);
      // Only the start of stdout can hold the line; stop accumulating once it is found.
      if (stdout.length < OUTPUT_TAIL) stdout += d.toString();
      const m = DASHBOARD_LINE.exec(stdout);
      if (m !== null) {
        clearTimeout(timer);
        resolve(m[1]!);
      }
    });
    child.once('exit', (code, signal) => {
      clearTimeout(timer);
      reject(new Error(`demo exited (code ${code}, signal ${signal}) before printing the dashboard link; output:\n${output}`));
    });
    child.once('error', (err) => {
      clearTimeout(timer);
      reject(err);
    });
  });
  // The url promise may be rejected by a late exit after it resolved; that is not an error here.
  url.catch(() => {});
  return { child, url, output: () => output };
}

/** SIGTERM (the demo checkpoints and exits), then SIGKILL if it has not exited within 15 s. */
async function stopDemo(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  child.kill('SIGTERM');
  const graceful = await Promise.race([exited.then(() => true), sleep(15_000).then(() => false)]);
  if (!graceful) {
    child.kill('SIGKILL');
    await Promise.race([exited, sleep(5_000)]);
  }
}

/**
 * Polls `probe` every POLL_MS until it returns a value other than undefined, for at most `ms`
 * (and so a bounded number of times); throws naming `what` and the last thing seen.
 */
async function waitFor<T>(what: string, ms: number, probe: () => Promise<T | undefined>, seen: () => string = () => ''): Promise<T> {
  const deadline = Date.now() + ms;
  for (let i = 0; i < Math.ceil(ms / POLL_MS) + 1; i++) {
    const v = await probe();
    if (v !== undefined) return v;
    if (Date.now() >= deadline) break;
    await sleep(POLL_MS);
  }
  throw new Error(`timed out after ${ms} ms waiting for ${what}${seen() ? `; ${seen()}` : ''}`);
}

/** The text of a KPI tile's number ("–" until the first rows arrive). */
async function tileText(page: Page, field: string): Promise<string> {
  return ((await page.locator(`[data-kpi="${field}"] .value`).textContent()) ?? '').trim();
}

describe('dashboard in Chromium against the live demo', () => {
  it('shows live tiles that move, the funnel, the cohort heat map and the chart', async () => {
    expect(existsSync(CHROMIUM), `${CHROMIUM} is missing: .ci/run installs it (apt-get install -y chromium); do not use "npx playwright install"`).toBe(true);
    expect(existsSync(CLI), `${CLI} is missing: run "npm run build" first`).toBe(true);

    const tmp = tempDir('crm-dashboard-');
    const demo = startDemo(await freePort(), tmp.dir);
    let browser: Browser | undefined;
    const pageErrors: string[] = [];
    let passed = false;
    try {
      const url = await demo.url;

      browser = await chromium.launch({
        executablePath: CHROMIUM,
        args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking'],
      });
      const page = await browser.newPage({ viewport: { width: 1280, height: 800 } });
      page.on('pageerror', (err) => pageErrors.push(err.message));
      await page.goto(url, { waitUntil: 'load', timeout: 30_000 });
      // What the page itself reports (socket closes, HTTP errors) makes failures explain themselves.
      const status = async (): Promise<string> => `#status: "${((await page.locator('#status').textContent()) ?? '').trim()}"`;
      let statusSeen = '';
      const seen = (): string => `${statusSeen}; page errors: ${JSON.stringify(pageErrors)}; demo output tail:\n${demo.output().slice(-2000)}`;

      // 1. The tiles fill from the WebSocket snapshot.
      const first = await waitFor('a number in the DAU tile', TILE_APPEAR_MS, async () => {
        statusSeen = await status();
        const dau = await tileText(page, 'active_users');
        return /\d/.test(dau) ? { dau, newUsers: await tileText(page, 'new_users') } : undefined;
      }, seen);

      // 2. …and move with the live updates (DAU or new users; both grow while visitors arrive).
      const changed = await waitFor(`the DAU or new-users tile to change from ${JSON.stringify(first)}`, TILE_CHANGE_MS, async () => {
        statusSeen = await status();
        const now = { dau: await tileText(page, 'active_users'), newUsers: await tileText(page, 'new_users') };
        return now.dau !== first.dau || now.newUsers !== first.newUsers ? now : undefined;
      }, seen);
      expect(changed).not.toEqual(first);

      // 3. Funnel steps, cohort cells and the uPlot canvas (the HTTP panels refresh on timers).
      const steps = await waitFor('at least 3 funnel steps', PANELS_MS, async () => {
        statusSeen = await status();
        const n = await page.locator('#funnel .funnel-step').count();
        return n >= 3 ? n : undefined;
      }, seen);
      expect(steps).toBeGreaterThanOrEqual(3);
      const cells = await waitFor('a cohort heat-map cell', PANELS_MS, async () => {
        statusSeen = await status();
        const n = await page.locator('#cohorts td').count();
        return n >= 1 ? n : undefined;
      }, seen);
      expect(cells).toBeGreaterThanOrEqual(1);
      expect(await page.locator('#chart-series canvas').count(), seen()).toBeGreaterThanOrEqual(1);

      mkdirSync(path.dirname(SCREENSHOT), { recursive: true });
      await page.screenshot({ path: SCREENSHOT });

      // An uncaught exception in the page is a bug even when every panel happened to render.
      expect(pageErrors).toEqual([]);
      passed = true;
    } finally {
      // Cleanup errors are combined, never swallowed; after a failed check they are logged, so the
      // check's failure stays the one reported.
      const errors: unknown[] = [];
      if (browser !== undefined) await browser.close().catch((e: unknown) => errors.push(e));
      await stopDemo(demo.child).catch((e: unknown) => errors.push(e));
      try {
        tmp.cleanup();
      } catch (e) {
        errors.push(e);
      }
      if (errors.length > 0) {
        const cleanup = new AggregateError(errors, 'dashboard test cleanup failed');
        if (passed) throw cleanup;
        console.error(cleanup);
      }
    }
  }, 240_000);
});
