import { spawnSync } from 'node:child_process';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { streamArb, type StreamEvent } from '../oracle/streams.js';
import { PROJECT_ROOT, runAndKill, tempDir } from '../helpers.js';

/**
 * Exactly one enter and one exit per real membership transition across SIGKILLs: the KPI worker
 * (tests/fixtures/kpi-worker.ts: arrival-order ingest with checkpoints every few ms) runs with the
 * built-in segments and a tiered one, is killed at random points and restarted; its
 * segment-changes.jsonl must equal the file of an uninterrupted run record for record (same
 * user, segment, change, tier, instant, cause) — no change lost, none written twice.
 */

/**
 * The segment changes a data dir's sink wrote, without `seq`: the outbox numbers every record, and
 * KPI correction records are coalesced per checkpoint, so the numbers (not the changes) depend on
 * where checkpoints fell. The numbers must still be unique and increasing.
 */
function read(dir: string): Record<string, unknown>[] {
  const rows = readFileSync(path.join(dir, 'segment-changes.jsonl'), 'utf8').trim().split('\n').map((l) => JSON.parse(l) as Record<string, unknown>);
  rows.forEach((r, i) => {
    if (i > 0 && !((r['seq'] as number) > (rows[i - 1]!['seq'] as number))) throw new Error(`seq not increasing at line ${i + 1} of ${dir}`);
  });
  return rows.map(({ seq: _, ...rest }) => rest);
}

const WORKER = path.join(PROJECT_ROOT, 'dist/tests/fixtures/kpi-worker.js');
const RELOAD_WORKER = path.join(PROJECT_ROOT, 'dist/tests/fixtures/segment-reload-worker.js');

describe('segment changes across SIGKILL', () => {
  it('equal an uninterrupted run record for record', async () => {
    if (!existsSync(WORKER)) throw new Error(`${WORKER} is missing: run \`npm run build\` first (npm test does)`);
    const tmp = tempDir('crm-seg-kill-');
    try {
      const parts = fc.sample(streamArb({ maxEvents: 300 }), { seed: 31, numRuns: 20 });
      const events: StreamEvent[] = [];
      parts.forEach((p, k) => events.push(...p.events.map((e) => ({ ...e, event_id: `${k}-${e.event_id}`, ts: e.ts + k * 4 * 86_400_000 }))));
      const input = path.join(tmp.dir, 'events.jsonl');
      writeFileSync(input, events.map((e) => JSON.stringify(e)).join('\n') + '\n');
      const cfgFile = path.join(tmp.dir, 'config.json');
      writeFileSync(cfgFile, JSON.stringify({
        time: { timeZone: 'Asia/Seoul' },
        segments: { definitions: [{ id: 'active_buyer', tiers: [
          { name: 'heavy', rule: { did: 'purchase', within: '7d', atLeast: 3 } },
          { name: 'light', rule: { did: 'purchase', within: '7d' } },
        ] }] },
      }));
      const ref = path.join(tmp.dir, 'ref');
      const r = spawnSync(process.execPath, [WORKER, ref, input, cfgFile], { encoding: 'utf8', timeout: 120_000 });
      expect(r.status, r.stderr).toBe(0);

      const dir = path.join(tmp.dir, 'crash');
      let kills = 0;
      for (let attempt = 0; attempt < 40 && kills < 8; attempt++) {
        if (!(await runAndKill([WORKER, dir, input, cfgFile], /start \d+/, 30 + ((attempt * 53) % 400)))) break;
        kills++;
      }
      const last = spawnSync(process.execPath, [WORKER, dir, input, cfgFile], { encoding: 'utf8', timeout: 120_000 });
      expect(last.status, last.stderr).toBe(0);
      expect(kills).toBeGreaterThan(0);

      const expected = read(ref);
      expect(expected.length).toBeGreaterThan(100);
      expect(new Set(expected.map((x) => x['change']))).toEqual(new Set(['enter', 'exit', 'tier_change']));
      expect(read(dir)).toEqual(expected);
    } finally {
      tmp.cleanup();
    }
  }, 300_000);

  it('with a rule reload half-way: killed in the reload scan and in its resumption, the records equal an uninterrupted run', async () => {
    if (!existsSync(RELOAD_WORKER)) throw new Error(`${RELOAD_WORKER} is missing: run \`npm run build\` first (npm test does)`);
    const tmp = tempDir('crm-seg-reload-kill-');
    try {
      // Many profiles (users renamed per part), so the reload's scan spans many 64-profile chunks.
      const parts = fc.sample(streamArb({ maxEvents: 150 }), { seed: 7, numRuns: 80 });
      const events: StreamEvent[] = [];
      parts.forEach((p, k) => events.push(...p.events.map((e) => ({
        ...e, event_id: `${k}-${e.event_id}`, ts: e.ts + k * 2 * 86_400_000,
        user_id: e.user_id === '' ? '' : `${e.user_id}-${k}`, anonymous_id: e.anonymous_id === '' ? '' : `${e.anonymous_id}-${k}`,
      }))));
      const input = path.join(tmp.dir, 'events.jsonl');
      writeFileSync(input, events.map((e) => JSON.stringify(e)).join('\n') + '\n');
      const cfgFile = path.join(tmp.dir, 'config.json');
      writeFileSync(cfgFile, JSON.stringify({
        time: { timeZone: 'Asia/Seoul' },
        segments: { definitions: [
          { id: 'buyer', rule: { did: 'purchase', within: '7d' } },
          { id: 'gone', rule: { didNot: 'visit', within: '3d' } },
        ] },
      }));
      // Changed, removed, added (one answered from kept state, one building on 'wishlist'), a tier rename.
      const rulesFile = path.join(tmp.dir, 'rules-b.json');
      writeFileSync(rulesFile, JSON.stringify([
        { id: 'buyer', rule: { did: 'purchase', within: '30d', atLeast: 2 } },
        { id: 'wisher', rule: { did: 'wishlist', within: '30d' } },
        { id: 'vip', tiers: [{ name: 'top', rule: { sum: 'purchase', within: '365d', atLeast: 400 } }, { name: 'silver', rule: { sum: 'purchase', within: '365d', atLeast: 100 } }] },
      ]));
      const reloadAt = Math.floor(events.length / 2);
      const args = (dir: string) => [RELOAD_WORKER, dir, input, cfgFile, rulesFile, String(reloadAt)];
      const ref = path.join(tmp.dir, 'ref');
      const r = spawnSync(process.execPath, args(ref), { encoding: 'utf8', timeout: 120_000 });
      expect(r.status, r.stderr).toBe(0);
      const scanMs = Number(/reloaded in ([\d.]+) ms/.exec(r.stdout)![1]);
      const expected = read(ref);
      const causes = new Set(expected.map((x) => x['cause']));
      expect(causes.has('reload')).toBe(true);
      expect(causes.has('rule_ready')).toBe(true);

      // Each trial: a fresh data dir, killed at a different point of the reload's scan, then
      // killed again while the restart resumes it, then run to the end.
      let kills = 0;
      let resumed = 0;
      const log = (out: string): void => {
        resumed += Number(/resumed=(\d+)/.exec(out)?.[1] ?? 0);
      };
      for (let trial = 0; trial < 5; trial++) {
        const dir = path.join(tmp.dir, `crash-${trial}`);
        if (await runAndKill(args(dir), /reload \d+/, Math.floor(((trial + 0.5) * scanMs) / 5), log)) kills++;
        if (await runAndKill(args(dir), /opening/, 5 + trial * 9, log)) kills++;
        const last = spawnSync(process.execPath, args(dir), { encoding: 'utf8', timeout: 120_000 });
        expect(last.status, last.stderr).toBe(0);
        log(last.stdout);
        expect(read(dir), `trial ${trial}`).toEqual(expected);
      }
      expect(kills).toBeGreaterThan(5);
      expect(resumed, 'no restart found a reload scan to resume').toBeGreaterThan(0);
    } finally {
      tmp.cleanup();
    }
  }, 300_000);
});
