import { spawnSync } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { tableFromIPC } from 'apache-arrow';
import { parse } from 'csv-parse/sync';
import fc from 'fast-check';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { COHORT_FIELDS, KPI_FIELDS } from '../../operators/kpi-rows.js';
import { streamArb } from '../oracle/streams.js';
import { PROJECT_ROOT, tempDir } from '../helpers.js';

/**
 * `crmstream export kpis|cohorts|funnel` as a user runs it: the three formats carry the same values
 * (jsonl is the reference; csv and Arrow IPC are read back with csv-parse and apache-arrow).
 */

const CLI = path.join(PROJECT_ROOT, 'dist/api/cli.js');
let tmp: { dir: string; cleanup: () => void };
let dataDir: string;

function cli(args: string[]): { status: number | null; stdout: string; stderr: string } {
  const r = spawnSync(process.execPath, [CLI, ...args], { encoding: 'utf8', timeout: 120_000 });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

beforeAll(() => {
  tmp = tempDir('crm-kpi-export-');
  const c = fc.sample(streamArb({ maxEvents: 400 }), { seed: 11, numRuns: 1 })[0]!;
  const input = path.join(tmp.dir, 'events.jsonl');
  writeFileSync(input, c.events.map((e) => JSON.stringify(e)).join('\n') + '\n');
  dataDir = path.join(tmp.dir, 'state');
  const r = cli(['backfill', '--data-dir', dataDir, '--input', input, '--tz', 'Asia/Seoul', '--no-progress']);
  if (r.status !== 0) throw new Error(r.stderr);
});
afterAll(() => tmp?.cleanup());

function exportAll(what: string, extra: string[]): { jsonl: Record<string, unknown>[]; csv: Record<string, string>[]; arrow: Record<string, unknown>[] } {
  const out = (f: string) => path.join(tmp.dir, `${what}.${f}`);
  for (const f of ['jsonl', 'csv', 'arrow']) {
    const r = cli(['export', what, '--data-dir', dataDir, ...extra, '--format', f, '--out', out(f)]);
    expect(r.status, r.stderr).toBe(0);
  }
  const jsonl = readFileSync(out('jsonl'), 'utf8').trim().split('\n').map((l) => JSON.parse(l) as Record<string, unknown>);
  const csv = parse(readFileSync(out('csv')), { columns: true }) as Record<string, string>[];
  const arrow = tableFromIPC(readFileSync(out('arrow'))).toArray().map((r) => r.toJSON() as Record<string, unknown>);
  return { jsonl, csv, arrow };
}

function sameAsJsonl(jsonl: Record<string, unknown>[], csv: Record<string, string>[], arrow: Record<string, unknown>[]): void {
  expect(csv.length).toBe(jsonl.length);
  expect(arrow.length).toBe(jsonl.length);
  jsonl.forEach((row, i) => {
    for (const [k, v] of Object.entries(row)) {
      expect(csv[i]![k], `csv row ${i} ${k}`).toBe(v === null ? '' : String(v));
      expect(arrow[i]![k], `arrow row ${i} ${k}`).toEqual(v);
    }
  });
}

describe('KPI exports', () => {
  it('kpis: the SPEC §9 shape, identical in jsonl, csv and Arrow', () => {
    const { jsonl, csv, arrow } = exportAll('kpis', ['--grain', 'week']);
    expect(jsonl.length).toBeGreaterThan(5);
    expect(Object.keys(jsonl[0]!)).toEqual(['grain', 'window', 'channel', 'platform', ...KPI_FIELDS]);
    expect(jsonl[0]).toMatchObject({ grain: 'week', channel: '*', platform: '*' });
    expect(String(jsonl[0]!['window'])).toMatch(/^\d{4}-W\d{2}$/);
    sameAsJsonl(jsonl, csv, arrow);
  });

  it('cohorts (both kinds) and funnel: identical in the three formats', () => {
    const c = exportAll('cohorts', ['--grain', 'month', '--kind', 'both']);
    expect(new Set(c.jsonl.map((r) => r['kind']))).toEqual(new Set(['first_activity', 'signup']));
    expect(Object.keys(c.jsonl[0]!)).toEqual([...COHORT_FIELDS]); // SPEC §9's fields first
    sameAsJsonl(c.jsonl, c.csv, c.arrow);
    const f = exportAll('funnel', ['--grain', 'month']);
    expect(f.jsonl.length).toBeGreaterThan(0);
    sameAsJsonl(f.jsonl, f.csv, f.arrow);
  });

  it('a missing or wrong --grain is a usage error (exit 2)', () => {
    expect(cli(['export', 'kpis', '--data-dir', dataDir]).status).toBe(2);
    expect(cli(['export', 'cohorts', '--data-dir', dataDir, '--grain', 'day']).status).toBe(2);
  });
});
