import { spawnSync } from 'node:child_process';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { PROJECT_ROOT, SHARED_DATA, tempDir } from '../helpers.js';

/**
 * The CLI as a user runs it, on the real data sets: every check is against a figure computed
 * here straight from the source file, independently of the engine.
 */

const CLI = path.join(PROJECT_ROOT, 'dist/api/cli.js');
const REES = path.join(SHARED_DATA, 'rees46_oct2019_head/2019-Oct_head.csv');
const CDNOW = path.join(SHARED_DATA, 'cdnow/CDNOW_master.txt');
const haveData = existsSync(REES) && existsSync(CDNOW);
if (!haveData) console.warn(`[cli.test] ${SHARED_DATA} is absent: the real-data backfill tests are skipped`);

let tmp: { dir: string; cleanup: () => void };
let usdConfig: string;
beforeAll(() => {
  tmp = tempDir('crm-cli-');
  usdConfig = path.join(tmp.dir, 'usd.json');
  writeFileSync(usdConfig, JSON.stringify({ validation: { currency: 'USD' } }));
});
afterAll(() => tmp?.cleanup());

function cli(args: string[]): { status: number | null; stdout: string; stderr: string } {
  const r = spawnSync(process.execPath, [CLI, ...args], { encoding: 'utf8', timeout: 120_000, maxBuffer: 64 << 20 });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

function profiles(dataDir: string): { user_id: string; purchases: number; revenue: number; events: number }[] {
  const out = path.join(dataDir, 'profiles.jsonl');
  expect(cli(['export', 'profiles', '--data-dir', dataDir, '--out', out]).status).toBe(0);
  return readFileSync(out, 'utf8').trim().split('\n').map((l) => JSON.parse(l));
}

describe.skipIf(!haveData)('backfill of the real data sets', () => {
  it('REES46 CSV with the example map: every row accepted, one profile per user, purchases and revenue as in the file', () => {
    const dir = path.join(tmp.dir, 'rees');
    const r = cli(['backfill', '--data-dir', dir, '--input', REES, '--map', 'examples/maps/rees46.json', '--config', usdConfig, '--no-progress']);
    expect(r.status, r.stderr).toBe(0);
    expect(JSON.parse(r.stdout)).toMatchObject({ rows: 17_434, accepted: 17_434, rejected: 0 });

    const rows = readFileSync(REES, 'utf8').trim().split(/\r?\n/).slice(1).map((l) => l.split(','));
    const users = new Set(rows.map((c) => c[7]));
    const purchases = rows.filter((c) => c[1] === 'purchase');
    const revenue = purchases.reduce((s, c) => s + Number(c[6]), 0);
    const ps = profiles(dir);
    expect(ps.length).toBe(users.size);
    expect(ps.reduce((s, p) => s + p.events, 0)).toBe(17_434);
    expect(ps.reduce((s, p) => s + p.purchases, 0)).toBe(purchases.length);
    expect(ps.reduce((s, p) => s + p.revenue, 0)).toBeCloseTo(revenue, 6);
  });

  it('CDNOW purchases with --tz: 69,659 purchases by 23,570 customers, revenue as in the file; a re-run changes nothing', () => {
    const dir = path.join(tmp.dir, 'cdnow');
    const args = ['backfill', '--data-dir', dir, '--input', CDNOW, '--format', 'csv', '--map', 'examples/maps/cdnow.json', '--tz', 'America/New_York', '--config', usdConfig, '--no-progress'];
    const r = cli(args);
    expect(r.status, r.stderr).toBe(0);
    const report = JSON.parse(r.stdout);
    expect(report).toMatchObject({ rows: 69_659, accepted: 69_659, rejected: 0 });
    // Calendar dates read as midnight New York time; the watermark ends at the last purchase.
    expect(report.watermark).toBe('1998-06-30T04:00:00.000Z');

    const rows = readFileSync(CDNOW, 'utf8').trim().split(/\r?\n/).slice(1).map((l) => l.trim().split(/\s+/));
    const byUser = new Map<string, number>();
    for (const c of rows) byUser.set(c[0]!, (byUser.get(c[0]!) ?? 0) + Number(c[3]));
    const ps = profiles(dir);
    expect(ps.length).toBe(23_570);
    for (const p of ps) expect(p.revenue).toBeCloseTo(byUser.get(p.user_id)!, 6);

    // Run again on the same state: the checkpoint says it is all done; nothing is counted twice.
    const again = cli(args);
    expect(again.status, again.stderr).toBe(0);
    expect(JSON.parse(again.stdout)).toMatchObject({ rows: 69_659, resumed_from_row: 69_659, accepted: 69_659 });
    expect(profiles(dir)).toEqual(ps);
  });
});

describe('command line contract', () => {
  it('--as-of advances the watermark past the data', () => {
    const dir = path.join(tmp.dir, 'asof');
    const input = path.join(tmp.dir, 'two.jsonl');
    writeFileSync(input, [
      JSON.stringify({ event_id: 'a', type: 'visit', anonymous_id: 'x', ts: '2024-03-01T10:00:00+09:00' }),
      JSON.stringify({ event_id: 'b', type: 'sign_up', anonymous_id: 'x', user_id: 'u', ts: '2024-03-01T10:05:00+09:00' }),
    ].join('\n'));
    const r = cli(['backfill', '--data-dir', dir, '--input', input, '--as-of', '2024-04-01T00:00:00Z', '--no-progress']);
    expect(r.status, r.stderr).toBe(0);
    expect(JSON.parse(r.stdout)).toMatchObject({ rows: 2, accepted: 2, watermark: '2024-04-01T00:00:00.000Z', aliases_this_run: 1 });
    expect(profiles(dir)).toMatchObject([{ user_id: 'u', events: 2 }]);
  });

  it('exits 2 with a message naming the field for an invalid config, and for unknown flags', () => {
    const bad = path.join(tmp.dir, 'bad.json');
    writeFileSync(bad, JSON.stringify({ time: { timeZone: 'Mars/Olympus', allowedLatenessMs: -1 } }));
    const r = cli(['backfill', '--data-dir', path.join(tmp.dir, 'x'), '--input', bad, '--config', bad, '--no-progress']);
    expect(r.status).toBe(2);
    expect(r.stderr).toContain('CONFIG_INVALID');
    expect(r.stderr).toContain('time.timeZone');
    expect(r.stderr).toContain('time.allowedLatenessMs');
    expect(cli(['backfill', '--no-such-flag']).status).toBe(2);
  });

  it('demo runs the engine on generated traffic and stops cleanly', () => {
    const dir = path.join(tmp.dir, 'demo');
    const r = cli(['demo', '--duration', '3', '--rate', '5000', '--users', '10000', '--data-dir', dir, '--port', '0']);
    expect(r.status, r.stderr).toBe(0);
    // Through Kafka: the stats line shows what the consumer took from the events topic.
    const m = /ev\/s produced\s+consumed=(\d+)\s+lag=\d+\s+accepted=(\d+)/.exec(r.stdout);
    expect(m, r.stdout).not.toBeNull();
    expect(Number(m![1])).toBeGreaterThan(0);
    expect(r.stdout).toContain('state checkpointed');
    expect(profiles(dir).length).toBeGreaterThan(100);
  });
});
