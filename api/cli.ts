#!/usr/bin/env node
import { readFileSync, realpathSync, createWriteStream, type WriteStream } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { performance } from 'node:perf_hooks';
import { Command, InvalidArgumentError, Option } from 'commander';
import cliProgress from 'cli-progress';
import { Engine, mergeKpis, type SourceItem } from '../engine/engine.js';
import { campaignReport } from '../operators/campaign-report.js';
import { CrmError } from '../engine/errors.js';
import { rejectName } from '../engine/event-types.js';
import { resolveConfig, type ConfigInput } from '../engine/config.js';
import { parseTimestamp } from '../engine/codec.js';
import { parseMap } from '../engine/sources/csv.js';
import { SortedInput, type BackfillPosition, type InputFormat } from '../engine/sources/files.js';
import { parse as parseYaml } from 'yaml';
import { EXPORT_FORMATS, assertCheckpoint, writeRows, type ExportFormat } from './export.js';
import { KPI_SCHEMA, exportSource, type ExportWhat } from '../engine/arrow-export.js';
import type { CohortKind, KpiGrain } from '../operators/kpi-rows.js';

/**
 * The `crmstream` command line (SPEC §9). Flags are a contract outside tools script against: add,
 * never rename. Exit codes: 0 done and durable; 1 a runtime failure (its error code is printed);
 * 2 bad usage or configuration.
 */

function readJsonFile(file: string, what: string): unknown {
  try {
    return JSON.parse(readFileSync(file, 'utf8'));
  } catch (err) {
    throw new CrmError('CONFIG_INVALID', `${what} ${file}: ${(err as Error).message}`, { cause: err });
  }
}

function loadConfig(file: string | undefined, dataDir: string | undefined, tz: string | undefined, segments?: string, campaigns?: string): ConfigInput {
  const base = (file === undefined ? {} : readJsonFile(file, 'config file')) as ConfigInput & { time?: Record<string, unknown> };
  const cfg: ConfigInput = { ...base };
  if (dataDir !== undefined) cfg.dataDir = dataDir;
  if (tz !== undefined) cfg.time = { ...(base.time ?? {}), timeZone: tz };
  if (segments !== undefined) cfg.segments = { ...(base.segments ?? {}), definitions: readSegmentFile(segments) };
  if (campaigns !== undefined) cfg.campaigns = { ...(base.campaigns ?? {}), definitions: readDocument(campaigns, 'campaign file') };
  return cfg;
}

/** A JSON document, or YAML for .yaml/.yml. */
function readDocument(file: string, what: string): unknown {
  try {
    const text = readFileSync(file, 'utf8');
    return /\.ya?ml$/i.test(file) ? parseYaml(text) : JSON.parse(text);
  } catch (err) {
    throw new CrmError('CONFIG_INVALID', `${what} ${file}: ${(err as Error).message}`, { cause: err });
  }
}

/** A segment rule file (docs/SEGMENTS.md): JSON, or YAML for .yaml/.yml; `{segments: [...]}` or the bare list. */
function readSegmentFile(file: string): unknown[] {
  const doc = readDocument(file, 'segment file');
  const list = Array.isArray(doc) ? doc : (doc as { segments?: unknown } | null)?.segments;
  if (!Array.isArray(list)) throw new CrmError('CONFIG_INVALID', `segment file ${file}: expected {"segments": [...]} (docs/SEGMENTS.md)`);
  return list;
}

function isoTime(value: string): number {
  const t = parseTimestamp(value, 'UTC');
  if (Number.isNaN(t)) throw new InvalidArgumentError(`not an ISO-8601 time: ${value}`);
  return t;
}

async function backfill(opts: {
  dataDir: string; input: string[]; format?: InputFormat | 'arrow'; map?: string; tz?: string; config?: string; asOf?: number; progress: boolean; segments?: string;
  campaigns?: string;
}): Promise<void> {
  const config = loadConfig(opts.config, opts.dataDir, opts.tz, opts.segments, opts.campaigns);
  const started = performance.now();
  const engine = await Engine.create(config);
  const tz = engine.config.time.timeZone;
  const format = opts.format ?? inferFormat(opts.input);
  if (format === 'arrow') {
    await backfillArrow(engine, opts, started);
    return;
  }
  const map = opts.map === undefined ? null : parseMap(readJsonFile(opts.map, 'map file'));
  const showBar = opts.progress && process.stderr.isTTY === true;
  const readBar = showBar ? new cliProgress.SingleBar({ format: 'reading  {value} rows', stream: process.stderr }, cliProgress.Presets.shades_classic) : null;
  readBar?.start(0, 0);
  const input = await SortedInput.load(opts.input, { format, map, tz, onRead: (n) => readBar?.update(n) });
  readBar?.stop();

  const pos = engine.position as BackfillPosition | null;
  if (pos !== null && pos.of !== input.total) {
    await engine.close();
    throw new CrmError('CONFIG_INVALID', `${opts.dataDir} holds a backfill of ${pos.of} rows; these inputs have ${input.total}. Use a new --data-dir.`);
  }
  const startRow = pos?.row ?? 0;
  process.stderr.write(`crmstream: ${input.total} rows read; processing from row ${startRow}\n`);
  const bar = showBar ? new cliProgress.SingleBar({ format: 'events   [{bar}] {percentage}% {value}/{total} {eta_formatted}', stream: process.stderr }, cliProgress.Presets.shades_classic) : null;
  bar?.start(input.total, startRow);
  const batchRows = engine.config.batchRows;
  async function* items(): AsyncGenerator<SourceItem> {
    for (const item of input.batches(startRow, batchRows)) {
      yield item;
      if (item.kind === 'batch') bar?.update((item.position as BackfillPosition).row);
    }
    yield opts.asOf === undefined ? { kind: 'end' } : { kind: 'end', asOf: opts.asOf };
  }
  await engine.run(items());
  bar?.stop();
  await finishBackfill(engine, input.total, startRow, started);
}

const ARROW_EXT = /\.(arrow|arrows|ipc|feather)$/i;

/** csv when every input ends in .csv, arrow for .arrow/.arrows/.ipc/.feather, else jsonl. */
function inferFormat(files: readonly string[]): InputFormat | 'arrow' {
  if (files.every((f) => f.endsWith('.csv'))) return 'csv';
  if (files.every((f) => ARROW_EXT.test(f))) return 'arrow';
  return 'jsonl';
}

/**
 * The Arrow backfill: files in order, one record batch in memory at a time (inputs of any size),
 * resumable by row. Files from `convert` are in event-time order; others are taken as a stream.
 */
async function backfillArrow(engine: Engine, opts: { dataDir: string; input: string[]; asOf?: number; progress: boolean }, started: number): Promise<void> {
  const { arrowSource } = await import('../engine/sources/arrow.js');
  const names = opts.input.map((f) => path.basename(f));
  const pos = engine.position as { arrow?: { row: number; files: string[] } } | null;
  if (pos !== null && (pos.arrow === undefined || JSON.stringify(pos.arrow.files) !== JSON.stringify(names))) {
    await engine.close();
    throw new CrmError('CONFIG_INVALID', `${opts.dataDir} holds a backfill of other inputs; use a new --data-dir.`);
  }
  const startRow = pos?.arrow?.row ?? 0;
  process.stderr.write(`crmstream: Arrow input, processing from row ${startRow}\n`);
  let rows = startRow;
  async function* items(): AsyncGenerator<SourceItem> {
    yield* arrowSource(opts.input, engine.config.batchRows, startRow, (r) => (rows = r));
    yield opts.asOf === undefined ? { kind: 'end' } : { kind: 'end', asOf: opts.asOf };
  }
  await engine.run(items());
  await finishBackfill(engine, rows, startRow, started);
}

/** Closes the engine and prints the backfill report. */
async function finishBackfill(engine: Engine, total: number, startRow: number, started: number): Promise<void> {
  const rejects = engine.rejectCounts();
  const stats = engine.stats();
  await engine.close();
  const secs = (performance.now() - started) / 1000;
  const rejected = Object.values(rejects).reduce((a, b) => a + b, 0);
  const report = {
    rows: total, resumed_from_row: startRow, accepted: stats['accepted'], rejected,
    rejects: Object.fromEntries(Object.entries(rejects).filter(([, n]) => n > 0)),
    watermark: Number.isFinite(stats['watermark']) ? new Date(stats['watermark']!).toISOString() : null,
    aliases_this_run: stats['aliases'], timers_fired_this_run: stats['timersFired'], triggers_this_run: stats['triggers'],
    seconds: Number(secs.toFixed(3)), rows_per_s: Math.round((total - startRow) / secs),
  };
  process.stdout.write(JSON.stringify(report) + '\n');
}

/**
 * `convert`: csv / jsonl event files to one Arrow IPC file (or stream), in event-time order, the
 * column mapping applied; rows that do not decode are reported and written to `<out>.rejects.jsonl`
 * with their reason, not dropped silently.
 */
async function convert(opts: { input: string[]; format?: InputFormat; map?: string; tz?: string; out: string; stream?: boolean }): Promise<void> {
  const { writeArrowEvents } = await import('../engine/sources/arrow.js');
  const started = performance.now();
  const format: InputFormat = opts.format ?? (opts.input.every((f) => f.endsWith('.csv')) ? 'csv' : 'jsonl');
  const map = opts.map === undefined ? null : parseMap(readJsonFile(opts.map, 'map file'));
  const input = await SortedInput.load(opts.input, { format, map, tz: opts.tz ?? 'Asia/Seoul' });
  const rejectsFile = `${opts.out}.rejects.jsonl`;
  let rejectStream: WriteStream | null = null;
  const rejects: Record<string, number> = {};
  const written = await writeArrowEvents(createWriteStream(opts.out), opts.stream === true ? 'stream' : 'file', (emit) => input.forEachRow(emit));
  input.forEachRow((b, i) => {
    if (b.status[i] === 0) return;
    const reason = rejectName(b.status[i]!);
    rejects[reason] = (rejects[reason] ?? 0) + 1;
    rejectStream ??= createWriteStream(rejectsFile);
    const raw = b.raw[i];
    rejectStream.write(JSON.stringify({ reason, detail: b.detail[i], source: b.originOf(i), payload: typeof raw === 'string' ? raw : raw == null ? null : Buffer.from(raw).toString('base64') }) + '\n');
  });
  if (rejectStream !== null) await new Promise<void>((resolve) => (rejectStream as WriteStream).end(() => resolve()));
  const secs = (performance.now() - started) / 1000;
  process.stdout.write(JSON.stringify({
    rows: input.total, written, rejected: input.total - written, rejects, rejects_file: input.total > written ? rejectsFile : null,
    out: opts.out, format: opts.stream === true ? 'arrow-stream' : 'arrow', seconds: Number(secs.toFixed(3)),
  }) + '\n');
}

/**
 * `simulate`: the campaigns over the inputs in an in-memory engine (nothing sent, nothing kept),
 * then the campaign report as JSON: per campaign, arms with totals and statistics, and per day
 * the triggers, suppressions and deferrals.
 */
async function simulate(opts: { campaigns: string; input: string[]; format?: InputFormat; map?: string; tz?: string; config?: string; segments?: string; asOf?: number }): Promise<void> {
  const config = loadConfig(opts.config, undefined, opts.tz, opts.segments, opts.campaigns);
  const engine = await Engine.create({ ...config, dataDir: null, state: { ...(config.state ?? {}), backend: 'memory' }, deadLetter: { ...(config.deadLetter ?? {}), path: null } });
  try {
    const tz = engine.config.time.timeZone;
    const format: InputFormat = opts.format ?? (opts.input.every((f) => f.endsWith('.csv')) ? 'csv' : 'jsonl');
    const map = opts.map === undefined ? null : parseMap(readJsonFile(opts.map, 'map file'));
    const input = await SortedInput.load(opts.input, { format, map, tz });
    async function* items(): AsyncGenerator<SourceItem> {
      yield* input.batches(0, engine.config.batchRows);
      yield opts.asOf === undefined ? { kind: 'end' } : { kind: 'end', asOf: opts.asOf };
    }
    await engine.run(items());
    const op = engine.campaignOperator!;
    const stats = engine.stats();
    const report = { events: input.total, accepted: stats['accepted'], triggers: stats['triggers'], campaigns: campaignReport(engine.campaignRows(), op.definitions) };
    process.stdout.write(JSON.stringify(report, null, 2) + '\n');
  } finally {
    await engine.close();
  }
}

/** Opens a data dir for reading: its own time zone, no new events; closed after `fn`. */
async function withStoredEngine<T>(opts: { dataDir: string; config?: string }, fn: (e: Engine) => Promise<T>): Promise<T> {
  const engine = await Engine.create(loadConfig(opts.config, opts.dataDir, undefined), { adoptStoredTimeZone: true });
  try {
    return await fn(engine);
  } finally {
    await engine.close();
  }
}

interface ExportOpts { dataDir: string; format: ExportFormat; out?: string; config?: string; grain?: KpiGrain; kind?: CohortKind | 'both'; id?: string }

/**
 * `crmstream export <what>`: the rows and schema `engine.exportArrow` builds its table from
 * (engine/arrow-export.ts), written in the chosen format as they are read.
 */
async function exportCmd(what: ExportWhat, o: ExportOpts): Promise<void> {
  // A data dir without a checkpoint is an error (STATE_NOT_FOUND), checked before Engine.create
  // would create a store there; only the LevelDB backend keeps one (state.backend from --config).
  const cfg = resolveConfig(loadConfig(o.config, o.dataDir, undefined));
  if (cfg.state.backend === 'level' && cfg.dataDir !== null) await assertCheckpoint(cfg.dataDir);
  await withStoredEngine(o, async (e) => {
    const { schema, rows } = exportSource(e, what, { grain: o.grain, kind: o.kind, segment: o.id });
    await writeRows(rows, schema, o.format, o.out);
  });
}

function intArg(v: string): number {
  const n = Number(v);
  if (!Number.isInteger(n) || n < 0) throw new InvalidArgumentError(`not a non-negative integer: ${v}`);
  return n;
}

export function buildCli(): Command {
  const program = new Command('crmstream')
    .description('Real-time CRM analytics: identity, exact KPIs, segments and triggers over event streams')
    .showHelpAfterError()
    // Before the subcommands are added, so they inherit it: usage errors become exit code 2 in main().
    .exitOverride();

  program.command('backfill')
    .description('process event files in event-time order (Arrow: in file order, streamed), advance the watermark, checkpoint')
    .requiredOption('--data-dir <dir>', 'state directory (created if missing)')
    .requiredOption('--input <file...>', 'event files')
    .addOption(new Option('--format <format>', 'input format (default: csv for .csv, arrow for .arrow/.arrows/.ipc/.feather, else jsonl)').choices(['jsonl', 'csv', 'arrow']))
    .option('--map <file>', 'CSV column mapping (JSON)')
    .option('--tz <zone>', 'time zone for zone-less timestamps and calendar windows (default Asia/Seoul)')
    .option('--config <file>', 'engine configuration (JSON)')
    .option('--as-of <iso-time>', 'advance the watermark to this time at the end, firing every timer up to it', isoTime)
    .option('--segments <file>', 'segment rules (JSON or YAML, docs/SEGMENTS.md); the built-ins apply without it')
    .option('--campaigns <file>', 'campaigns (JSON or YAML, docs/CAMPAIGNS.md): triggers go to <data-dir>/triggers.jsonl')
    .option('--no-progress', 'no progress bar even on a terminal')
    .action(async (o) => backfill(o));

  program.command('run')
    .description('consume the Kafka events topic continuously: state, outputs to Kafka topics, and the server when configured (docs/KAFKA.md)')
    .requiredOption('--config <file>', 'run configuration (JSON or YAML): engine settings plus kafka and optional server sections')
    .option('--data-dir <dir>', 'state directory (overrides dataDir of the file)')
    .option('--segments <file>', 'segment rules (JSON or YAML, docs/SEGMENTS.md)')
    .option('--campaigns <file>', 'campaigns (JSON or YAML, docs/CAMPAIGNS.md)')
    .option('--exit-at-end', 'stop once every assigned partition is read to its end (catch up, then exit 0)')
    .action(async (o: { config: string; dataDir?: string; segments?: string; campaigns?: string; exitAtEnd?: boolean }) => {
      const { runKafka } = await import('./run.js');
      await runKafka({
        config: o.config, dataDir: o.dataDir, exitAtEnd: o.exitAtEnd === true,
        segments: o.segments === undefined ? undefined : readSegmentFile(o.segments),
        campaigns: o.campaigns === undefined ? undefined : readDocument(o.campaigns, 'campaign file'),
      });
    });

  program.command('advance')
    .description('scale-out: move every task\'s watermark to a time, firing every timer up to it (the end of a stream, or --as-of)')
    .requiredOption('--config <file>', 'the run configuration of the group (kafka.scaleOut set)')
    .requiredOption('--to <iso-time>', 'the new watermark', isoTime)
    .action(async (o: { config: string; to: number }) => {
      const { readRunConfig } = await import('./run.js');
      const { advanceAll } = await import('../engine/kafka/tasks.js');
      const n = await advanceAll(readRunConfig(o.config).kafka, o.to);
      process.stdout.write(`advanced ${n} partitions to ${new Date(o.to).toISOString()}\n`);
    });

  program.command('kpis')
    .description('scale-out: global KPI rows of the group, summed from every task\'s published partials (docs/KAFKA.md)')
    .requiredOption('--config <file>', 'the run configuration of the group (kafka.scaleOut set)')
    .addOption(new Option('--grain <grain>', 'calendar window').choices(['day', 'week', 'month']).makeOptionMandatory())
    .addOption(new Option('--format <format>', 'output format').choices(EXPORT_FORMATS as string[]).default('jsonl'))
    .option('--out <file>', 'output file (default: stdout)')
    .action(async (o: { config: string; grain: 'day' | 'week' | 'month'; format: ExportFormat; out?: string }) => {
      const { readRunConfig } = await import('./run.js');
      const { readPartials } = await import('../engine/kafka/partials.js');
      const file = readRunConfig(o.config);
      const { parts, partitions, published } = await readPartials(file.kafka);
      if (published.length < partitions) {
        process.stderr.write(`crmstream: partials of ${partitions - published.length} of ${partitions} tasks not published yet: the KPIs below lack their users\n`);
      }
      await writeRows(await mergeKpis(file.engine, parts).kpis(o.grain), KPI_SCHEMA, o.format, o.out);
    });

  program.command('convert')
    .description('csv / jsonl event files → one Arrow IPC file in event-time order, for `backfill --format arrow` (docs/ARROW.md)')
    .requiredOption('--input <file...>', 'event files')
    .requiredOption('--out <file>', 'the Arrow file to write')
    .addOption(new Option('--format <format>', 'input format (default: csv for .csv files, else jsonl)').choices(['jsonl', 'csv']))
    .option('--map <file>', 'CSV column mapping (JSON)')
    .option('--tz <zone>', 'time zone for zone-less timestamps (default Asia/Seoul)')
    .option('--stream', 'write the Arrow IPC stream format instead of the file format')
    .action(async (o) => convert(o));

  program.command('simulate')
    .description('run campaigns over history without sending: triggers per day and variant, suppressed by caps / consent / channel, deferred by quiet hours')
    .requiredOption('--campaigns <file>', 'campaigns (JSON or YAML, docs/CAMPAIGNS.md)')
    .requiredOption('--input <file...>', 'event files')
    .addOption(new Option('--format <format>', 'input format (default: csv for .csv files, else jsonl)').choices(['jsonl', 'csv']))
    .option('--map <file>', 'CSV column mapping (JSON)')
    .option('--tz <zone>', 'time zone for zone-less timestamps and calendar windows (default Asia/Seoul)')
    .option('--config <file>', 'engine configuration (JSON)')
    .option('--segments <file>', 'segment rules (JSON or YAML)')
    .option('--as-of <iso-time>', 'advance the watermark to this time at the end (follow-ups and daily slots up to it)', isoTime)
    .action(async (o) => simulate(o));

  const exp = program.command('export').description('export state');
  const formatOpt = () => new Option('--format <format>', 'output format (arrow: IPC file, arrow-stream: IPC stream; docs/EXPORTS.md)')
    .choices(EXPORT_FORMATS as string[]).default('jsonl');
  exp.command('profiles')
    .description('every profile, one per line')
    .requiredOption('--data-dir <dir>', 'state directory')
    .addOption(formatOpt())
    .option('--out <file>', 'output file (default: stdout)')
    .option('--config <file>', 'engine configuration (JSON)')
    .action(async (o) => exportCmd('profiles', o));
  exp.command('kpis')
    .description('KPI rows per (window, channel, platform) — docs/KPIS.md')
    .requiredOption('--data-dir <dir>', 'state directory')
    .addOption(new Option('--grain <grain>', 'calendar window').choices(['day', 'week', 'month']).makeOptionMandatory())
    .addOption(formatOpt())
    .option('--out <file>', 'output file (default: stdout)')
    .option('--config <file>', 'engine configuration (JSON)')
    .action(async (o) => exportCmd('kpis', o));
  exp.command('cohorts')
    .description('cohort matrix rows: cohort × age with size, active, purchasers, revenue')
    .requiredOption('--data-dir <dir>', 'state directory')
    .addOption(new Option('--grain <grain>', 'cohort window').choices(['week', 'month']).makeOptionMandatory())
    .addOption(new Option('--kind <kind>', 'cohort by first activity or by sign-up').choices(['first_activity', 'signup', 'both']).default('first_activity'))
    .addOption(formatOpt())
    .option('--out <file>', 'output file (default: stdout)')
    .option('--config <file>', 'engine configuration (JSON)')
    .action(async (o) => exportCmd('cohorts', o));
  exp.command('segment')
    .description('the members of a segment, one a line: {"user_id", "since", "tier"}')
    .requiredOption('--data-dir <dir>', 'state directory')
    .requiredOption('--id <segment>', 'segment id')
    .addOption(formatOpt())
    .option('--out <file>', 'output file (default: stdout)')
    .option('--config <file>', 'engine configuration (JSON)')
    .action(async (o) => exportCmd('segment', o));
  exp.command('funnel')
    .description('journey funnel per sign-up cohort: visit → sign_up → first purchase → revisit D+1..3 → repeat purchase')
    .requiredOption('--data-dir <dir>', 'state directory')
    .addOption(new Option('--grain <grain>', 'cohort window').choices(['day', 'week', 'month']).makeOptionMandatory())
    .addOption(formatOpt())
    .option('--out <file>', 'output file (default: stdout)')
    .option('--config <file>', 'engine configuration (JSON)')
    .action(async (o) => exportCmd('funnel', o));
  exp.command('triggers')
    .description('every trigger in the triggers file (campaigns.triggersPath, default <data-dir>/triggers.jsonl), one a line — docs/CAMPAIGNS.md')
    .requiredOption('--data-dir <dir>', 'state directory')
    .addOption(formatOpt())
    .option('--out <file>', 'output file (default: stdout)')
    .option('--config <file>', 'engine configuration (JSON)')
    .action(async (o) => exportCmd('triggers', o));

  program.command('demo')
    .description('the whole loop: traffic generator → Kafka (librdkafka mock cluster) → engine → HTTP/WebSocket server and dashboard → a demo sender')
    .option('--port <port>', 'HTTP/WebSocket port (0: any free one)', intArg, 8080)
    .option('--data-dir <dir>', 'state directory (default: a fresh temporary one)')
    .option('--rate <events_per_s>', 'generated events per second', intArg, 20_000)
    .option('--duration <seconds>', 'stop after this many seconds (default: until Ctrl-C)', intArg)
    .option('--users <n>', 'user population of the generator', intArg, 100_000)
    .action(async (o) => (await import('./demo.js')).runDemo(o));

  program.command('bench')
    .description('run the benchmarks, print the table and write JSON to bench/results/')
    .option('--quick', 'smaller inputs')
    .action(async (o: { quick?: boolean }) => {
      const { runBench } = await import('../bench/run.js');
      await runBench({ quick: o.quick === true });
    });
  return program;
}

export async function main(argv: readonly string[]): Promise<number> {
  const program = buildCli();
  // `crmstream export … | head` closes the pipe early: that is the reader's choice, not an error.
  process.stdout.on('error', (err: NodeJS.ErrnoException) => {
    if (err.code === 'EPIPE') process.exit(0);
    throw err;
  });
  try {
    await program.parseAsync(argv as string[]);
    return 0;
  } catch (err) {
    if (err instanceof CrmError) {
      process.stderr.write(`crmstream: ${err.code}: ${err.message}\n`);
      if (err.cause !== undefined) process.stderr.write(`  cause: ${(err.cause as Error).message ?? String(err.cause)}\n`);
      return err.code === 'CONFIG_INVALID' || err.code === 'SOURCE_MAP_INVALID' ? 2 : 1;
    }
    const code = (err as { code?: string }).code;
    if (typeof code === 'string' && code.startsWith('commander.')) {
      return code === 'commander.helpDisplayed' || code === 'commander.version' ? 0 : 2;
    }
    process.stderr.write(`crmstream: ${(err as Error).stack ?? String(err)}\n`);
    return 1;
  }
}

if (process.argv[1] !== undefined && realpathSync(process.argv[1]) === fileURLToPath(import.meta.url)) {
  process.exitCode = await main(process.argv);
}
