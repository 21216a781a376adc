import { existsSync, readFileSync } from 'node:fs';
import path from 'node:path';
import fc from 'fast-check';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { crmstream } from '../../api/proto/gen/crmstream.js';
import { Engine } from '../../engine/engine.js';
import { Topic } from '../../engine/outbox.js';
import type { EventColumns } from '../../engine/batch.js';
import { parseMap } from '../../engine/sources/csv.js';
import { SortedInput } from '../../engine/sources/files.js';
import { BUILTIN_SEGMENTS, withBuiltins, type SegmentDef } from '../../operators/segment-rules.js';
import { engineMembership, membershipDiff, toSegEvent, type Membership } from '../oracle/membership.js';
import { SegmentOracle, type SegEvent } from '../oracle/segment-oracle.js';
import { segmentsArb } from '../oracle/segment-rule-arb.js';
import { streamArb } from '../oracle/streams.js';
import { PROJECT_ROOT, SHARED_DATA } from '../helpers.js';

/**
 * Segment membership against an independent DuckDB evaluation of the same rules
 * (tests/oracle/segment-oracle.ts): the built-ins and ten random rules, at every sample point of a
 * generated stream (out of order, late, duplicates, stitching) and on the real data; and the
 * enter/exit/tier_change records replayed in order give the same membership at every sample.
 */

const TYPES = ['visit', 'page_view', 'sign_up', 'add_to_cart', 'purchase', 'refund', 'review', 'wishlist'];

let oracle: SegmentOracle;
beforeAll(async () => {
  oracle = await SegmentOracle.create();
});
afterAll(async () => oracle?.close());

describe('segment membership equals the DuckDB oracle', () => {
  it('built-ins + 10 random rules on generated streams, at every sample; the change records replay to it (property)', async () => {
    let changesSeen = 0;
    await fc.assert(
      fc.asyncProperty(streamArb({ maxEvents: 200 }), segmentsArb(TYPES, 10), async (c, random) => {
        const defs: SegmentDef[] = withBuiltins(random);
        const engine = await Engine.create({ time: { timeZone: c.timeZone }, segments: { definitions: random } });
        const replay: Membership = new Map(defs.map((d) => [d.id, new Map()]));
        engine.onOutput((r) => {
          if (r.topic !== Topic.segmentChange) return;
          const ch = crmstream.v1.SegmentChange.decode(r.payload);
          changesSeen++;
          const m = replay.get(ch.segment_id)!;
          if (ch.change === 'exit') m.delete(ch.user_id);
          else m.set(ch.user_id, ch.tier);
        });
        try {
          const accepted: SegEvent[] = [];
          const step = Math.max(1, Math.ceil(c.events.length / 3));
          for (let at = 0; at < c.events.length; at += step) {
            const slice = c.events.slice(at, at + step);
            const r = await engine.ingest(slice);
            slice.forEach((e, j) => r.reasons[j] === '' && accepted.push(toSegEvent(e)));
            if (!Number.isFinite(engine.watermark)) continue;
            const mine = await engineMembership(engine); // checkpoints: the records are out
            await oracle.load(accepted);
            const theirs = await oracle.members(defs, engine.watermark, c.timeZone);
            expect(membershipDiff(mine, theirs, `t=${engine.watermark}`)).toEqual([]);
            expect(membershipDiff(replay, mine, 'replayed')).toEqual([]);
          }
          // Time passes with no events: every timer-driven exit and entry, then the same check.
          await engine.advanceTo(engine.watermark + 40 * 86_400_000);
          const mine = await engineMembership(engine);
          expect(membershipDiff(mine, await oracle.members(defs, engine.watermark, c.timeZone), 'after 40 idle days')).toEqual([]);
          expect(membershipDiff(replay, mine, 'replayed')).toEqual([]);
          // Segment sizes (a KPI per window): the watermark's day row is the member count.
          const sizes = await engine.segmentSizes('day');
          for (const [id, m] of mine) {
            const rows = sizes.filter((r) => r.segment === id && r.tier === '*');
            expect(rows.length === 0 ? 0 : rows[rows.length - 1]!.size, `size of ${id}`).toBe(m.size);
          }
        } finally {
          await engine.close();
        }
      }),
      { numRuns: 40, seed: 5 },
    );
    expect(changesSeen).toBeGreaterThan(0);
  }, 300_000);

  it('invalid rule definitions are rejected at start with a message naming the segment and the problem', async () => {
    const err = await Engine.create({ segments: { definitions: [{ id: 'big', rule: { did: 'purchase', within: '30 days' } }] } }).catch((e: unknown) => e);
    expect((err as { code: string }).code).toBe('CONFIG_INVALID');
    expect(String((err as Error).message)).toMatch(/segment 'big' \(#1\).*within/);
  });
});

const REES = path.join(SHARED_DATA, 'rees46_oct2019_head/2019-Oct_head.csv');
const CDNOW = path.join(SHARED_DATA, 'cdnow/CDNOW_master.txt');
const haveData = existsSync(REES) && existsSync(CDNOW);
if (!haveData) console.warn(`[segments-exact.test] ${SHARED_DATA} is absent: the real-data segment tests are skipped`);

describe.skipIf(!haveData)('segment membership on the real data', () => {
  async function realData(file: string, mapFile: string, tz: string, defs: readonly SegmentDef[], laterDays: number): Promise<void> {
    const map = parseMap(JSON.parse(readFileSync(path.join(PROJECT_ROOT, mapFile), 'utf8')));
    const input = await SortedInput.load([file], { format: 'csv', map, tz });
    const custom = defs.filter((d) => !BUILTIN_SEGMENTS.some((b) => b.id === d.id));
    const engine = await Engine.create({ time: { timeZone: tz }, validation: { currency: 'USD' }, segments: { definitions: custom } });
    const accepted: SegEvent[] = [];
    for (const item of input.batches(0, 4096)) {
      if (item.kind !== 'batch') continue;
      await engine.ingestColumns(item.batch, item.position);
      rowsOf(item.batch, accepted);
    }
    await oracle.load(accepted);
    expect(membershipDiff(await engineMembership(engine), await oracle.members(defs, engine.watermark, tz), 'end')).toEqual([]);
    await engine.advanceTo(engine.watermark + laterDays * 86_400_000);
    expect(membershipDiff(await engineMembership(engine), await oracle.members(defs, engine.watermark, tz), `+${laterDays}d`)).toEqual([]);
    await engine.close();
  }

  it('REES46: built-ins at the end of the data and 3 days later equal the oracle', async () => {
    await realData(REES, 'examples/maps/rees46.json', 'UTC', BUILTIN_SEGMENTS, 3);
  });

  it('CDNOW: built-ins and repeat-buyer tiers at the end of 1998-06 and 90 days later equal the oracle', async () => {
    const defs = withBuiltins([{ id: 'repeat_buyers', tiers: [
      { name: 'frequent', rule: { did: 'purchase', within: '180d', atLeast: 4 } },
      { name: 'returning', rule: { did: 'purchase', within: '365d', atLeast: 2 } },
    ] }]);
    await realData(CDNOW, 'examples/maps/cdnow.json', 'America/New_York', defs, 90);
  });
});

function rowsOf(b: EventColumns, out: SegEvent[]): void {
  for (let i = 0; i < b.length; i++) {
    if (b.status[i] !== 0) continue;
    out.push({ event_id: b.eventId[i]!, type: b.type[i]!, user_id: b.userId[i]!, anonymous_id: b.anonymousId[i]!, ts: b.ts[i]!, amount: b.amount[i]!, channel: b.channel[i]!, platform: b.platform[i]!, props: b.props[i] ?? undefined });
  }
}
