/**
 * The benchmark runner (`npm run bench`, `crmstream bench`): runs every scenario through the
 * harness, prints a markdown table with each scenario's ratio to the baseline measured in the same
 * run, and writes bench/results/<timestamp>.json and bench/results/latest.json (run it from the
 * project root).
 *
 *   node dist/bench/run.js [--quick] [--only NAME[,NAME…]] [--repeats N] [--micro]
 *
 * --quick     small inputs and 3 timed runs (CI smoke); default: SPEC §10 sizes, 5 timed runs
 * --only      run only the scenarios whose name contains one of NAMEs (the baseline always runs)
 * --repeats   timed runs per scenario (the median is reported)
 * --micro     also run the benny micro-suites (saved as bench/results/micro-*.json)
 */
import { pathToFileURL } from 'node:url';
import { decodeScenario, runDecodeMicroSuite } from './decode.bench.js';
import { engineCoreScenario, engineLevelScenario } from './engine.bench.js';
import { arrowScenarios } from './arrow.bench.js';
import { kafkaE2ELevelScenario, kafkaE2EScenario, kafkaLagScenario, kafkaScaleOutScenario } from './kafka.bench.js';
import { restartScenario } from './restart.bench.js';
import { segmentsCoreScenario, segmentTimersScenario } from './segments.bench.js';
import { campaigns5Scenario, campaignsCoreScenario } from './campaigns.bench.js';
import { kpiFanoutDefaultScenario, serverTriggerScenario } from './server.bench.js';
import { httpIngestDurableScenario, httpIngestProcessedScenario } from './http-ingest.bench.js';
import { kpiOffScenario, kpiTableDuckScenario, kpiTableEngineScenario, lateEventsScenario } from './kpi.bench.js';
import { markdownTable, runScenarios, writeResults, type BenchResult, type Scenario } from './harness.js';

/** Every scenario, in run order: the baseline first. Add yours here (one file per scenario in bench/). */
export const SCENARIOS: readonly Scenario[] = [
  decodeScenario,
  engineCoreScenario as Scenario,
  kpiOffScenario as Scenario,
  engineLevelScenario as Scenario,
  lateEventsScenario as Scenario,
  kpiTableEngineScenario as Scenario,
  kpiTableDuckScenario as Scenario,
  segmentsCoreScenario as Scenario,
  segmentTimersScenario as Scenario,
  campaigns5Scenario as Scenario,
  campaignsCoreScenario as Scenario,
  serverTriggerScenario as Scenario,
  httpIngestProcessedScenario as Scenario,
  httpIngestDurableScenario as Scenario,
  kpiFanoutDefaultScenario as Scenario,
  restartScenario as Scenario,
  kafkaE2EScenario as Scenario,
  kafkaE2ELevelScenario as Scenario,
  kafkaLagScenario as Scenario,
  kafkaScaleOutScenario as Scenario,
  ...(arrowScenarios as readonly Scenario[]),
];

/** The benny micro-suites run with --micro. */
export const MICRO_SUITES: readonly { readonly name: string; run(quick: boolean): Promise<unknown> }[] = [
  { name: 'decode one event', run: runDecodeMicroSuite },
];

export interface BenchArgs {
  quick: boolean;
  micro: boolean;
  only: string[];
  repeats: number | null;
}

export function parseArgs(argv: readonly string[]): BenchArgs {
  const args: BenchArgs = { quick: false, micro: false, only: [], repeats: null };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === '--quick') args.quick = true;
    else if (a === '--micro') args.micro = true;
    else if (a === '--only') args.only.push(...(argv[++i] ?? '').split(',').filter((s) => s !== ''));
    else if (a === '--repeats') {
      const n = Number(argv[++i]);
      if (!Number.isInteger(n) || n < 1) throw new Error(`--repeats needs a whole number ≥ 1, got '${argv[i] ?? ''}'`);
      args.repeats = n;
    } else throw new Error(`unknown option '${a ?? ''}' (known: --quick, --only NAMES, --repeats N, --micro)`);
  }
  return args;
}

export interface RunBenchOptions {
  /** Small inputs and 3 timed runs (default false). */
  quick: boolean;
  /** Also run the benny micro-suites (default false). */
  micro?: boolean;
  /** Only scenarios whose name contains one of these (the baseline always runs; default all). */
  only?: readonly string[];
  /** Timed runs per scenario (default 3 quick, 5 full). */
  repeats?: number;
}

/**
 * Runs the benchmarks, prints the markdown table to stdout and writes the JSON results; resolves to
 * the result rows (a failed scenario is a row whose notes start with FAILED). Used by
 * `crmstream bench` and by this file's command line.
 */
export async function runBench(opts: RunBenchOptions): Promise<BenchResult[]> {
  const only = opts.only ?? [];
  const selected = only.length === 0
    ? SCENARIOS
    : SCENARIOS.filter((s) => s.baseline === true || only.some((o) => s.name.includes(o)));
  const results = await runScenarios(selected, { quick: opts.quick }, {
    warmup: 1,
    repeats: opts.repeats ?? (opts.quick ? 3 : 5),
  });
  process.stdout.write(`${markdownTable(results)}\n`);
  const file = writeResults(results, { quick: opts.quick });
  process.stderr.write(`# wrote ${file} and bench/results/latest.json\n`);
  if (opts.micro === true) {
    for (const m of MICRO_SUITES) await m.run(opts.quick);
  }
  return results;
}

/** The command line; resolves to the process exit code (1 when a scenario failed). */
export async function main(argv: readonly string[]): Promise<number> {
  const args = parseArgs(argv);
  const results = await runBench({
    quick: args.quick, micro: args.micro, only: args.only, ...(args.repeats === null ? {} : { repeats: args.repeats }),
  });
  return results.some((r) => r.notes.startsWith('FAILED')) ? 1 : 0;
}

if (process.argv[1] !== undefined && import.meta.url === pathToFileURL(process.argv[1]).href) {
  try {
    process.exitCode = await main(process.argv.slice(2));
  } catch (err) {
    process.stderr.write(`${err instanceof Error ? err.message : String(err)}\n`);
    process.exitCode = 2;
  }
}
