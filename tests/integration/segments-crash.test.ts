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
 * segment-changes.jsonl must equal the file of an uninterrupted run record for record (same seq,
 * user, segment, change, tier, instant, cause) — no change lost, none written twice.
 */

const WORKER = path.join(PROJECT_ROOT, 'dist/tests/fixtures/kpi-worker.js');

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

      const read = (d: string) => readFileSync(path.join(d, 'segment-changes.jsonl'), 'utf8').trim().split('\n').map((l) => JSON.parse(l) as Record<string, unknown>);
      const expected = read(ref);
      expect(expected.length).toBeGreaterThan(100);
      expect(new Set(expected.map((x) => x['change']))).toEqual(new Set(['enter', 'exit', 'tier_change']));
      expect(read(dir)).toEqual(expected);
    } finally {
      tmp.cleanup();
    }
  }, 300_000);
});
