import { spawnSync } from 'node:child_process';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { Rng, TrafficGenerator, toJsonLine } from '../../engine/sources/generator.js';
import { PROJECT_ROOT, runAndKill, tempDir } from '../helpers.js';

/**
 * Triggers across SIGKILL: the real CLI backfills generated traffic with campaigns on (event,
 * follow-up with cancel, segment enter, tier up; caps, quiet hours, a holdout), is killed at random
 * points and restarted; the set of trigger ids in its triggers.jsonl must equal an uninterrupted
 * run's, each id with the same decision — a line may repeat only as a re-delivery of the same
 * trigger (the sink's file is appended at-least-once), never as a second decision.
 */

const CLI = path.join(PROJECT_ROOT, 'dist/api/cli.js');

const CAMPAIGNS = {
  campaigns: [
    { id: 'welcome', trigger: { event: 'sign_up' }, action: { template: 'welcome', channels: ['alimtalk', 'push'] }, reentry: 'once' },
    {
      id: 'cart', trigger: { after: 'add_to_cart', delays: ['1h', '1d', '3d'], unless: 'purchase' },
      action: { template: 'cart', channels: ['alimtalk', 'push', 'sms'], params: { step: '{{step}}' } },
      experiment: { control: 0.2, variants: [{ name: 'a', weight: 1 }, { name: 'b', weight: 1 }] },
    },
    { id: 'winback', trigger: { segment: 'dormant_30' }, action: { template: 'winback', channels: ['sms'] } },
    { id: 'level_up', trigger: { segment: 'buyer_level', on: 'tier_up' }, action: { template: 'thanks', channels: ['push'] }, promotional: false },
  ],
  caps: [{ scope: 'user', max: 2, within: '1d' }],
  consent: { unknown: 'allow' },
};

describe('triggers across SIGKILL', () => {
  it('the trigger ids (and decisions) equal an uninterrupted run', async () => {
    if (!existsSync(CLI)) throw new Error(`${CLI} is missing: run \`npm run build\` first (npm test does)`);
    const tmp = tempDir('crm-camp-kill-');
    try {
      const gen = new TrafficGenerator({ seed: 9, users: 3_000, eventsPerSecond: 2, lateRate: 0.02, duplicateRate: 0.01, badRate: 0.002 });
      const lines: string[] = [];
      for (let i = 0; i < 60_000; i++) {
        const r = gen.nextRecord();
        lines.push('kind' in r ? r.json : toJsonLine(r));
      }
      const input = path.join(tmp.dir, 'events.jsonl');
      writeFileSync(input, lines.join('\n') + '\n');
      const campaigns = path.join(tmp.dir, 'campaigns.json');
      writeFileSync(campaigns, JSON.stringify(CAMPAIGNS));
      const segments = path.join(tmp.dir, 'segments.json');
      writeFileSync(segments, JSON.stringify({ segments: [{ id: 'buyer_level', tiers: [
        { name: 'repeat', rule: { did: 'purchase', atLeast: 2 } }, { name: 'first', rule: { did: 'purchase' } },
      ] }] }));
      // The traffic starts 2024-01-01 and spans hours; 50 days on, follow-ups have fired and buyers gone dormant.
      const asOf = '2024-02-20T00:00:00Z';
      const args = (dir: string) => [CLI, 'backfill', '--data-dir', dir, '--input', input, '--campaigns', campaigns, '--segments', segments, '--as-of', asOf, '--no-progress'];

      const ref = path.join(tmp.dir, 'ref');
      const r = spawnSync(process.execPath, args(ref), { encoding: 'utf8', timeout: 120_000 });
      expect(r.status, r.stderr).toBe(0);
      const read = (d: string): Record<string, unknown>[] => readFileSync(path.join(d, 'triggers.jsonl'), 'utf8').trim().split('\n').map((l) => JSON.parse(l) as Record<string, unknown>);
      const byId = (rows: Record<string, unknown>[]): Map<string, string> => {
        const m = new Map<string, string>();
        for (const { seq: _, ...t } of rows) {
          const id = t['trigger_id'] as string;
          const text = JSON.stringify(t);
          const had = m.get(id);
          if (had !== undefined && had !== text) throw new Error(`trigger ${id} decided twice differently:\n${had}\n${text}`);
          m.set(id, text);
        }
        return m;
      };
      const expected = byId(read(ref));
      expect(read(ref).length).toBe(expected.size); // one decision per id in an uninterrupted run
      const campaignsSeen = new Set([...expected.values()].map((t) => (JSON.parse(t) as { campaign_id: string }).campaign_id));
      expect(campaignsSeen).toEqual(new Set(['welcome', 'cart', 'winback', 'level_up']));

      const dir = path.join(tmp.dir, 'crash');
      const rng = new Rng(5);
      let kills = 0;
      for (let attempt = 0; attempt < 40 && kills < 12; attempt++) {
        if (!(await runAndKill(args(dir), /processing from row/, rng.int(500)))) break;
        kills++;
      }
      const last = spawnSync(process.execPath, args(dir), { encoding: 'utf8', timeout: 120_000 });
      expect(last.status, last.stderr).toBe(0);
      expect(kills).toBeGreaterThan(3);
      const got = byId(read(dir));
      expect([...got.keys()].sort()).toEqual([...expected.keys()].sort());
      for (const [id, t] of expected) expect(got.get(id), id).toBe(t);
    } finally {
      tmp.cleanup();
    }
  }, 300_000);
});
