import { spawnSync } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { DuckDBInstance, type DuckDBConnection } from '@duckdb/node-api';
import { Type, tableFromIPC, type Table } from 'apache-arrow';
import { parse } from 'csv-parse/sync';
import fc from 'fast-check';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Engine } from '../../engine/engine.js';
import {
  COHORT_SCHEMA, FUNNEL_SCHEMA, KPI_SCHEMA, PROFILE_SCHEMA, SEGMENT_SCHEMA, TRIGGER_SCHEMA, rowsToTable,
  type ColumnKind, type ExportOptions, type ExportSchema, type ExportWhat,
} from '../../engine/arrow-export.js';
import { writeRows } from '../../api/export.js';
import { streamArb } from '../oracle/streams.js';
import { DAY, PROJECT_ROOT, tempDir } from '../helpers.js';

/**
 * Exports as Arrow IPC (file and stream) and Parquet (SPEC §7/§9): for every export — KPI table,
 * cohort matrix, funnel, segment members, profiles, triggers — the CLI's Arrow files read back
 * with apache-arrow and its Parquet file read by DuckDB (`read_parquet`, the warehouse hand-off)
 * hold the jsonl export's values, value for value (nulls as nulls, times as the same instant), in
 * the declared column types; `engine.exportArrow` gives the same table. The state is built through
 * the library API from a generated stream with campaigns on.
 */

const CLI = path.join(PROJECT_ROOT, 'dist/api/cli.js');
const CAMPAIGNS = {
  campaigns: [
    { id: 'welcome', trigger: { event: 'sign_up' }, action: { template: 'welcome', channels: ['alimtalk', 'push'] }, reentry: 'once' },
    {
      id: 'cart', trigger: { after: 'add_to_cart', delays: ['1h', '1d'], unless: 'purchase' },
      action: { template: 'cart', channels: ['alimtalk', 'push', 'sms'], params: { step: '{{step}}' } },
      experiment: { control: 0.2, variants: [{ name: 'a', weight: 1 }, { name: 'b', weight: 1 }] },
    },
  ],
  consent: { unknown: 'allow' },
};

let tmp: { dir: string; cleanup: () => void };
let dataDir: string;
let segment: string;
let duck: DuckDBInstance;
let db: DuckDBConnection;

function cli(args: string[]): { status: number | null; stdout: string; stderr: string } {
  const r = spawnSync(process.execPath, [CLI, ...args], { encoding: 'utf8', timeout: 120_000 });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

beforeAll(async () => {
  tmp = tempDir('crm-arrow-export-');
  dataDir = path.join(tmp.dir, 'state');
  const c = fc.sample(streamArb({ maxEvents: 400 }), { seed: 11, numRuns: 1 })[0]!;
  const engine = await Engine.create({ dataDir, time: { timeZone: c.timeZone }, campaigns: { definitions: CAMPAIGNS } });
  try {
    await engine.ingest(c.events);
    await engine.advanceTo(Math.max(...c.events.map((e) => e.ts)) + 2 * DAY);
    // The segment with the most members (tiers included when it has them).
    const sizes = new Map<string, number>();
    for await (const m of engine.segmentMemberships()) sizes.set(m.segment, (sizes.get(m.segment) ?? 0) + 1);
    segment = [...sizes.entries()].sort((a, b) => b[1] - a[1])[0]![0];
  } finally {
    await engine.close();
  }
  duck = await DuckDBInstance.create(':memory:');
  db = await duck.connect();
}, 60_000);

afterAll(() => {
  db?.closeSync();
  duck?.closeSync();
  tmp?.cleanup();
});

const ARROW_TYPE: Record<ColumnKind, string> = {
  string: 'Dictionary<Int32, Utf8>', text: 'Utf8', timestamp: 'Timestamp<MILLISECOND, UTC>', float64: 'Float64', int: 'Int32',
  int64: 'Int64', bool: 'Bool', strings: 'List<Utf8>', string_map: 'Map<{key:Utf8, value:Utf8}>',
};
const DUCK_TYPE: Record<ColumnKind, string> = {
  string: 'VARCHAR', text: 'VARCHAR', timestamp: 'TIMESTAMP WITH TIME ZONE', float64: 'DOUBLE', int: 'INTEGER', int64: 'BIGINT',
  bool: 'BOOLEAN', strings: 'VARCHAR[]', string_map: 'MAP(VARCHAR, VARCHAR)',
};

/** A jsonl value in the form the typed readers give back: times as epoch ms (jsonl may have ISO-8601). */
function fromJsonl(kind: ColumnKind, v: unknown): unknown {
  if (v === null || v === undefined) return null;
  return kind === 'timestamp' && typeof v === 'string' ? Date.parse(v) : v;
}

/** An apache-arrow value as plain JS: Int64 BigInt → number, List → array, Map → object (timestamps already ms). */
function fromArrow(kind: ColumnKind, v: unknown): unknown {
  if (v === null || v === undefined) return null;
  if (kind === 'int64') return Number(v as bigint);
  if (kind === 'strings') return [...(v as Iterable<string>)];
  if (kind === 'string_map') return Object.fromEntries(v as Iterable<[string, string]>);
  return v;
}

/** A DuckDB value as plain JS: TIMESTAMPTZ Date → ms, BIGINT → number, MAP [{key, value}] → object. */
function fromDuck(kind: ColumnKind, v: unknown): unknown {
  if (v === null || v === undefined) return null;
  if (kind === 'timestamp') return (v as Date).getTime();
  if (kind === 'int64' || kind === 'int') return Number(v as bigint | number);
  if (kind === 'string_map') return Object.fromEntries((v as { key: string; value: string }[]).map((e) => [e.key, e.value]));
  return v;
}

function arrowRows(table: Table, schema: ExportSchema): Record<string, unknown>[] {
  const out: Record<string, unknown>[] = [];
  for (let i = 0; i < table.numRows; i++) {
    const row: Record<string, unknown> = {};
    for (const [name, kind] of Object.entries(schema)) row[name] = fromArrow(kind, table.getChild(name)!.get(i));
    out.push(row);
  }
  return out;
}

async function parquetRows(file: string, schema: ExportSchema): Promise<{ rows: Record<string, unknown>[]; types: Record<string, string> }> {
  const described = (await db.runAndReadAll(`DESCRIBE SELECT * FROM read_parquet('${file}')`)).getRowObjectsJS() as { column_name: string; column_type: string }[];
  const types = Object.fromEntries(described.map((d) => [d.column_name, d.column_type]));
  const raw = (await db.runAndReadAll(`SELECT * FROM read_parquet('${file}')`)).getRowObjectsJS() as Record<string, unknown>[];
  const rows = raw.map((r) => Object.fromEntries(Object.entries(schema).map(([name, kind]) => [name, fromDuck(kind, r[name])])));
  return { rows, types };
}

function expectSameRows(label: string, got: Record<string, unknown>[], jsonl: Record<string, unknown>[], schema: ExportSchema): void {
  expect(got.length, `${label}: rows`).toBe(jsonl.length);
  jsonl.forEach((row, i) => {
    // Every jsonl key is a schema column, and the reverse.
    expect(Object.keys(row), `${label}: jsonl keys`).toEqual(Object.keys(schema));
    for (const [name, kind] of Object.entries(schema)) {
      expect(got[i]![name], `${label} row ${i} ${name}`).toEqual(fromJsonl(kind, row[name]));
    }
  });
}

function expectArrowTypes(label: string, table: Table, schema: ExportSchema): void {
  expect(table.schema.fields.map((f) => f.name), label).toEqual(Object.keys(schema));
  for (const [name, kind] of Object.entries(schema)) expect(String(table.schema.fields.find((f) => f.name === name)!.type), `${label} ${name}`).toBe(ARROW_TYPE[kind]);
}

interface Case { what: ExportWhat; args: string[]; opts: ExportOptions; schema: ExportSchema }
const CASES = (): Case[] => [
  { what: 'kpis', args: ['--grain', 'week'], opts: { grain: 'week' }, schema: KPI_SCHEMA },
  { what: 'cohorts', args: ['--grain', 'month', '--kind', 'both'], opts: { grain: 'month', kind: 'both' }, schema: COHORT_SCHEMA },
  { what: 'funnel', args: ['--grain', 'month'], opts: { grain: 'month' }, schema: FUNNEL_SCHEMA },
  { what: 'segment', args: ['--id', segment], opts: { segment }, schema: SEGMENT_SCHEMA },
  { what: 'profiles', args: [], opts: {}, schema: PROFILE_SCHEMA },
  { what: 'triggers', args: [], opts: {}, schema: TRIGGER_SCHEMA },
];

/** Exports one kind in jsonl, arrow, arrow-stream and parquet; every typed copy must equal the jsonl. */
async function checkExport({ what, args, opts, schema }: Case): Promise<Record<string, unknown>[]> {
  const out = (f: string) => path.join(tmp.dir, `${what}.${f}`);
  for (const f of ['jsonl', 'csv', 'arrow', 'arrow-stream', 'parquet']) {
    const r = cli(['export', what, '--data-dir', dataDir, ...args, '--format', f, '--out', out(f)]);
    expect(r.status, `${what} ${f}: ${r.stderr}`).toBe(0);
  }
  const jsonl = readFileSync(out('jsonl'), 'utf8').split('\n').filter((l) => l !== '').map((l) => JSON.parse(l) as Record<string, unknown>);
  expect(jsonl.length, `${what}: an export with rows`).toBeGreaterThan(0);

  const csv = parse(readFileSync(out('csv')), { columns: true }) as Record<string, string>[];
  expect(csv.length).toBe(jsonl.length);
  for (const [name, kind] of Object.entries(schema)) {
    const cell = (v: unknown) => (v === null ? '' : kind === 'strings' || kind === 'string_map' ? JSON.stringify(v) : String(v));
    jsonl.forEach((row, i) => expect(csv[i]![name], `${what} csv row ${i} ${name}`).toBe(cell(row[name])));
  }

  for (const f of ['arrow', 'arrow-stream']) {
    const table = tableFromIPC(readFileSync(out(f)));
    expectArrowTypes(`${what} ${f}`, table, schema);
    expectSameRows(`${what} ${f}`, arrowRows(table, schema), jsonl, schema);
  }
  // The file format ends with its footer magic, the stream format with the end-of-stream marker.
  expect(readFileSync(out('arrow')).subarray(-6).toString('latin1')).toBe('ARROW1');
  expect([...readFileSync(out('arrow-stream')).subarray(-8)]).toEqual([0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0]);

  const pq = await parquetRows(out('parquet'), schema);
  expect(pq.types, `${what} parquet types`).toEqual(Object.fromEntries(Object.entries(schema).map(([n, k]) => [n, DUCK_TYPE[k]])));
  expectSameRows(`${what} parquet`, pq.rows, jsonl, schema);
  const codecs = (await db.runAndReadAll(`SELECT DISTINCT compression FROM parquet_metadata('${out('parquet')}')`)).getRowObjectsJS();
  expect(codecs).toEqual([{ compression: 'ZSTD' }]);

  // The library API builds the same table from the same rows.
  const engine = await Engine.create({ dataDir }, { adoptStoredTimeZone: true });
  try {
    const table = await engine.exportArrow(what, opts);
    expectArrowTypes(`${what} exportArrow`, table, schema);
    expectSameRows(`${what} exportArrow`, arrowRows(table, schema), jsonl, schema);
  } finally {
    await engine.close();
  }
  return jsonl;
}

describe('exports as Arrow IPC and Parquet', () => {
  it('kpis: dictionary strings, Int32 counts, Float64 rates with nulls, Bool — equal to jsonl in every format', async () => {
    const rows = await checkExport(CASES()[0]!);
    expect(rows.some((r) => r['arppu'] === null), 'some null rates').toBe(true);
    expect(rows.some((r) => typeof r['arppu'] === 'number'), 'some rates').toBe(true);
    expect(rows.some((r) => r['first_purchase_maturing'] === true)).toBe(true);
  }, 60_000);

  it('cohorts (both kinds) and funnel', async () => {
    await checkExport(CASES()[1]!);
    const funnel = await checkExport(CASES()[2]!);
    expect(funnel.some((r) => r['repeat_purchase_rate'] === null)).toBe(true);
  }, 60_000);

  it('segment members: since (ISO-8601 in jsonl) as a UTC millisecond timestamp', async () => {
    const rows = await checkExport(CASES()[3]!);
    expect(typeof rows[0]!['since']).toBe('string');
  }, 60_000);

  it('profiles: epoch-ms times as timestamps, null where a profile never bought', async () => {
    const rows = await checkExport(CASES()[4]!);
    expect(rows.some((r) => r['first_purchase_ts'] === null) && rows.some((r) => typeof r['first_purchase_ts'] === 'number')).toBe(true);
  }, 60_000);

  it('triggers: the triggers file with Int64 seq, List<Utf8> channels, Map<Utf8, Utf8> params', async () => {
    const rows = await checkExport(CASES()[5]!);
    expect(new Set(rows.map((r) => r['campaign_id']))).toEqual(new Set(['welcome', 'cart']));
    expect(rows.some((r) => Object.keys(r['params'] as object).length > 0)).toBe(true);
  }, 60_000);
});

describe('declared column types', () => {
  it('a column of only nulls keeps its declared type (Arrow and Parquet); no rows keep the schema', async () => {
    const row = (i: number) => ({
      grain: 'week', window: `2024-W0${i}`, channel: '*', platform: '*',
      ...Object.fromEntries(Object.keys(KPI_SCHEMA).slice(4).map((k) => [k, null])),
    });
    const rows = [row(1), row(2)];
    const table = rowsToTable(rows, KPI_SCHEMA);
    expectArrowTypes('all-null kpis', table, KPI_SCHEMA);
    expect(table.getChild('arppu')!.nullCount).toBe(2);
    expect(table.getChild('arppu')!.type.typeId).toBe(Type.Float);

    const expectedDuck = Object.fromEntries(Object.entries(KPI_SCHEMA).map(([n, k]) => [n, DUCK_TYPE[k]]));
    for (const f of ['arrow', 'arrow-stream', 'parquet'] as const) {
      const file = path.join(tmp.dir, `nulls.${f}`);
      await writeRows(rows, KPI_SCHEMA, f, file);
      if (f === 'parquet') {
        const pq = await parquetRows(file, KPI_SCHEMA);
        expect(pq.types).toEqual(expectedDuck);
        expect(pq.rows.map((r) => r['arppu'])).toEqual([null, null]);
      } else {
        const t = tableFromIPC(readFileSync(file));
        expectArrowTypes(`all-null ${f}`, t, KPI_SCHEMA);
        expect(arrowRows(t, KPI_SCHEMA)).toEqual(rows);
      }
    }
    // No rows at all: the schema is still there.
    const empty = path.join(tmp.dir, 'empty.parquet');
    await writeRows([], TRIGGER_SCHEMA, 'parquet', empty);
    const pq = await parquetRows(empty, TRIGGER_SCHEMA);
    expect(pq.rows).toEqual([]);
    expect(pq.types).toEqual(Object.fromEntries(Object.entries(TRIGGER_SCHEMA).map(([n, k]) => [n, DUCK_TYPE[k]])));
    const emptyArrow = path.join(tmp.dir, 'empty.arrow');
    await writeRows([], TRIGGER_SCHEMA, 'arrow', emptyArrow);
    expectArrowTypes('empty arrow', tableFromIPC(readFileSync(emptyArrow)), TRIGGER_SCHEMA);
  });

  it('many record batches (dictionaries growing by deltas) read back whole, in Arrow and Parquet', async () => {
    const rows = Array.from({ length: 50 }, (_, i) => ({
      user_id: `u${i}`, first_ts: i % 3 === 0 ? null : Date.UTC(2024, 0, 1) + i * 1000, first_channel: `ch${i % 9}`, last_ts: null,
      last_platform: i % 4 === 0 ? null : ['web', 'app', `p${i}`][i % 3], signup_ts: null, first_purchase_ts: null, last_purchase_ts: null,
      purchases: i, refunds: 0, revenue: i / 3, events: i * 2,
    }));
    for (const f of ['arrow', 'arrow-stream', 'parquet'] as const) {
      const file = path.join(tmp.dir, `batches.${f}`);
      await writeRows(rows, PROFILE_SCHEMA, f, file, { batchRows: 7 });
      if (f === 'parquet') {
        expect((await parquetRows(file, PROFILE_SCHEMA)).rows).toEqual(rows);
      } else {
        const t = tableFromIPC(readFileSync(file));
        expect(t.batches.length).toBe(8);
        expect(arrowRows(t, PROFILE_SCHEMA)).toEqual(rows);
      }
    }
  });

  it('bad arguments are errors with codes, not empty exports', async () => {
    const engine = await Engine.create({ dataDir }, { adoptStoredTimeZone: true });
    try {
      await expect(engine.exportArrow('kpis')).rejects.toMatchObject({ code: 'CONFIG_INVALID' });
      await expect(engine.exportArrow('cohorts', { grain: 'day' })).rejects.toMatchObject({ code: 'CONFIG_INVALID' });
      await expect(engine.exportArrow('segment', { segment: 'no_such_segment' })).rejects.toMatchObject({ code: 'CONFIG_INVALID' });
    } finally {
      await engine.close();
    }
    expect(cli(['export', 'kpis', '--data-dir', dataDir, '--grain', 'week', '--format', 'feather']).status).toBe(2);
    // An export that fails leaves no file behind to be taken for a (short) export.
    const out = path.join(tmp.dir, 'nope.parquet');
    const r = cli(['export', 'segment', '--data-dir', dataDir, '--id', 'no_such_segment', '--format', 'parquet', '--out', out]);
    expect(r.status).toBe(2);
    expect(r.stderr).toContain('CONFIG_INVALID');
    expect(existsSync(out)).toBe(false);
  });
});
