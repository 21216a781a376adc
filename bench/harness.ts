/**
 * Benchmark infrastructure (STYLE practice 12): scenarios live one a file in bench/, use the
 * fixed-seed generator for their data, return how many items they processed and feed a checksum of
 * their results to {@link consume} (so the work cannot be optimised away), and are run by
 * bench/run.ts against a baseline measured in the same run.
 *
 * Adding a scenario:
 * ```ts
 * // bench/my-thing.bench.ts
 * import { consume, type Scenario } from './harness.js';
 * export const myThing: Scenario<{ input: Uint8Array[] }> = {
 *   name: 'my thing',
 *   async setup(ctx) { return { input: makeInput(ctx.quick ? 100_000 : 1_000_000) }; },
 *   async run(state) {
 *     let sum = 0;
 *     for (const x of state.input) sum += work(x);
 *     consume(sum);
 *     return state.input.length;
 *   },
 * };
 * ```
 * then add `myThing` to the SCENARIOS array at the top of bench/run.ts.
 *
 * Numbers are throughput (items/s) of the median of `repeats` timed runs after `warmup` untimed
 * ones, timed with process.hrtime.bigint(); the heap is collected before each timed run when
 * possible, so one run's garbage is not billed to the next.
 */
import { mkdirSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import v8 from 'node:v8';
import vm from 'node:vm';
import { add, complete, configure, cycle, save, suite } from 'benny';

/** What every scenario gets from the runner. */
export interface BenchContext {
  /** `--quick`: small inputs (CI smoke runs, ~seconds); otherwise the sizes of SPEC §10. */
  readonly quick: boolean;
}

/**
 * One benchmark scenario. `setup` builds the input (untimed) — take sizes from `ctx.quick`;
 * `run` processes all of it once and returns how many items it processed; every run must compute a
 * result from every item and pass a checksum of it to {@link consume}.
 */
export interface Scenario<State = unknown> {
  readonly name: string;
  /** The reference the other scenarios are divided by (one per run; the first one marked wins). */
  readonly baseline?: boolean;
  setup(ctx: BenchContext): Promise<State>;
  /**
   * Processes the input once; returns the items processed, or `{ items, ns }` when only part of
   * the run is the thing measured (e.g. late events after an untimed fill): `ns` is then the
   * scenario's own hrtime measurement of that part.
   */
  run(state: State): Promise<number | TimedItems>;
  /** Releases what setup acquired (files, databases). Optional. */
  teardown?(state: State): Promise<void>;
  /** Free text for the report: input shape, setup figures, what is and is not included. */
  notes?(state: State): string;
}

export interface TimedItems {
  readonly items: number;
  readonly ns: bigint;
}

/** One row of the report. */
export interface BenchResult {
  name: string;
  /** Items per second of the median run. */
  ops_per_s: number;
  /** Items processed per run. */
  items: number;
  /** Wall time of the median run, ms. */
  ms: number;
  /** Resident set size / V8 heap used after the timed runs, MiB. */
  rss_mb: number;
  heap_mb: number;
  notes: string;
  baseline: boolean;
  /** ops_per_s / the baseline's ops_per_s (null when there is no baseline in the run). */
  ratio_to_baseline: number | null;
  /** Every timed run, ms (the median is `ms`). */
  samples_ms: number[];
  /** The checksum the runs fed to consume(): equal in every run, or the scenario is not deterministic. */
  checksum: number;
}

export interface RunOptions {
  /** Untimed runs first (default 1): JIT warm-up, caches filled. */
  warmup?: number;
  /** Timed runs; the median is reported (default 5). */
  repeats?: number;
}

// ---------------------------------------------------------------------------------------------------
// Dead-code-elimination guard

let sink = 0;

/**
 * Feeds a result into a module-level sink that is reported with the results: a value that leaves
 * the benchmark cannot be optimised away, and a checksum that changes between runs of the same
 * input shows a nondeterministic scenario.
 */
export function consume(checksum: number): void {
  // Keep it a finite number whatever comes in (NaN would poison every later checksum).
  sink = (sink + (Number.isFinite(checksum) ? checksum % 1_000_000_007 : 1)) % 1_000_000_007;
}

function takeSink(): number {
  const s = sink;
  sink = 0;
  return s;
}

// ---------------------------------------------------------------------------------------------------
// Scenario runner

/**
 * A full GC between timed runs, when it can be had: `--expose-gc`, else switched on at run time
 * (V8 accepts the flag late; the `gc` function then exists in new contexts).
 */
export const collect: (() => void) | null = (() => {
  const g = (globalThis as { gc?: () => void }).gc;
  if (typeof g === 'function') return g;
  try {
    v8.setFlagsFromString('--expose-gc');
    const fn: unknown = vm.runInNewContext('gc');
    return typeof fn === 'function' ? (fn as () => void) : null;
  } catch {
    return null;
  }
})();

function median(xs: readonly number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 === 1 ? (s[m] as number) : ((s[m - 1] as number) + (s[m] as number)) / 2;
}

const MiB = 1024 * 1024;

/** Runs one scenario: setup, warm-up, `repeats` timed runs, teardown; reports the median run. */
export async function runScenario<S>(sc: Scenario<S>, ctx: BenchContext, opts: RunOptions = {}): Promise<BenchResult> {
  const warmup = opts.warmup ?? 1;
  const repeats = Math.max(1, opts.repeats ?? 5);
  const state = await sc.setup(ctx);
  try {
    for (let i = 0; i < warmup; i++) await sc.run(state);
    takeSink();
    const samples: number[] = [];
    const itemsPerRun: number[] = [];
    const checksums: number[] = [];
    for (let i = 0; i < repeats; i++) {
      collect?.();
      const t0 = process.hrtime.bigint();
      const r = await sc.run(state);
      const ns = typeof r === 'number' ? process.hrtime.bigint() - t0 : r.ns;
      samples.push(Number(ns) / 1e6);
      itemsPerRun.push(typeof r === 'number' ? r : r.items);
      checksums.push(takeSink());
    }
    const mem = process.memoryUsage();
    const ms = median(samples);
    const items = itemsPerRun[samples.indexOf(ms)] ?? itemsPerRun[0] ?? 0;
    const notes: string[] = [];
    const n = sc.notes?.(state);
    if (n) notes.push(n);
    if (new Set(checksums).size > 1) notes.push(`WARNING: checksum differs between runs (${checksums.join(', ')})`);
    if (new Set(itemsPerRun).size > 1) notes.push(`WARNING: items differ between runs (${itemsPerRun.join(', ')})`);
    return {
      name: sc.name,
      ops_per_s: ms > 0 ? items / (ms / 1000) : 0,
      items,
      ms,
      rss_mb: mem.rss / MiB,
      heap_mb: mem.heapUsed / MiB,
      notes: notes.join('; '),
      baseline: sc.baseline === true,
      ratio_to_baseline: null,
      samples_ms: samples,
      checksum: checksums[0] ?? 0,
    };
  } finally {
    await sc.teardown?.(state);
  }
}

/**
 * Runs scenarios in order (one failing scenario is reported and does not stop the others) and fills
 * `ratio_to_baseline` from the first baseline scenario.
 */
export async function runScenarios(
  scenarios: readonly Scenario[],
  ctx: BenchContext,
  opts: RunOptions & { log?: (line: string) => void } = {},
): Promise<BenchResult[]> {
  const log = opts.log ?? ((line: string) => process.stderr.write(`${line}\n`));
  const results: BenchResult[] = [];
  for (const sc of scenarios) {
    log(`# ${sc.name}${sc.baseline ? ' (baseline)' : ''} …`);
    try {
      const r = await runScenario(sc, ctx, opts);
      log(`#   ${fmtInt(r.ops_per_s)} items/s (median of ${r.samples_ms.length}: ${r.samples_ms.map((x) => x.toFixed(0)).join(', ')} ms)`);
      results.push(r);
    } catch (err) {
      log(`#   FAILED: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}`);
      results.push({
        name: sc.name, ops_per_s: 0, items: 0, ms: 0, rss_mb: process.memoryUsage().rss / MiB,
        heap_mb: process.memoryUsage().heapUsed / MiB, notes: `FAILED: ${err instanceof Error ? err.message : String(err)}`,
        baseline: sc.baseline === true, ratio_to_baseline: null, samples_ms: [], checksum: 0,
      });
    }
  }
  return withRatios(results);
}

/** Fills ratio_to_baseline from the first successful baseline row. */
export function withRatios(results: BenchResult[]): BenchResult[] {
  const base = results.find((r) => r.baseline && r.ops_per_s > 0);
  for (const r of results) r.ratio_to_baseline = base ? r.ops_per_s / base.ops_per_s : null;
  return results;
}

// ---------------------------------------------------------------------------------------------------
// Result sinks

export interface ResultFile {
  date: string;
  quick: boolean;
  env: { node: string; v8: string; platform: string; arch: string; cpu: string; cpus: number; total_mem_mb: number };
  results: BenchResult[];
}

function fmtInt(x: number): string {
  return Math.round(x).toLocaleString('en-US');
}

/** The report as a markdown table (ratio column relative to the baseline row). */
export function markdownTable(results: readonly BenchResult[]): string {
  const rows = [
    '| scenario | ops/s | items | median ms | RSS MB | heap MB | ratio to baseline | notes |',
    '|---|---:|---:|---:|---:|---:|---:|---|',
  ];
  for (const r of results) {
    const ratio = r.baseline ? '1.00 (baseline)' : r.ratio_to_baseline === null ? '—' : r.ratio_to_baseline.toFixed(2);
    rows.push(`| ${r.name} | ${fmtInt(r.ops_per_s)} | ${fmtInt(r.items)} | ${r.ms.toFixed(1)} | ${r.rss_mb.toFixed(0)} | ${r.heap_mb.toFixed(0)} | ${ratio} | ${r.notes.replace(/\|/g, '\\|')} |`);
  }
  return rows.join('\n');
}

/**
 * Writes `<dir>/<timestamp>.json` and `<dir>/latest.json` (dir default bench/results, relative to
 * the working directory: run from the project root); returns the timestamped path.
 */
export function writeResults(results: BenchResult[], opts: { quick: boolean; dir?: string }): string {
  const dir = opts.dir ?? path.join('bench', 'results');
  mkdirSync(dir, { recursive: true });
  const now = new Date();
  const cpus = os.cpus();
  const file: ResultFile = {
    date: now.toISOString(),
    quick: opts.quick,
    env: {
      node: process.version,
      v8: process.versions.v8,
      platform: process.platform,
      arch: process.arch,
      cpu: cpus[0]?.model ?? 'unknown',
      cpus: cpus.length,
      total_mem_mb: Math.round(os.totalmem() / MiB),
    },
    results,
  };
  const text = `${JSON.stringify(file, null, 2)}\n`;
  const stamped = path.join(dir, `${now.toISOString().replace(/[:.]/g, '-')}.json`);
  writeFileSync(stamped, text);
  writeFileSync(path.join(dir, 'latest.json'), text);
  return stamped;
}

// ---------------------------------------------------------------------------------------------------
// Micro-suites (benny)

/** One case of a micro-suite: a function doing one small unit of work and returning a value. */
export interface MicroCase {
  readonly name: string;
  /** Must not return a function (benny would take it for a setup/run pair). Feed results to consume(). */
  readonly fn: () => number | void;
}

export type MicroSummary = Awaited<ReturnType<typeof suite>>;

/**
 * Runs a benny micro-suite and saves it as `<folder>/<file>.json` (folder default bench/results,
 * file default the suite name made file-safe). Quick mode shortens every case to ~0.5 s.
 */
export async function runMicroSuite(
  name: string,
  cases: readonly MicroCase[],
  opts: { quick?: boolean; folder?: string; file?: string } = {},
): Promise<MicroSummary> {
  const file = opts.file ?? `micro-${name.replace(/[^A-Za-z0-9_-]+/g, '-')}`;
  return suite(
    name,
    configure({ cases: opts.quick ? { minSamples: 5, maxTime: 0.5 } : { minSamples: 10, maxTime: 3 } }),
    ...cases.map((c) => add(c.name, () => {
      consume(c.fn() ?? 0);
    })),
    cycle(),
    complete(),
    save({ file, folder: opts.folder ?? path.join('bench', 'results'), format: 'json' }),
  );
}
