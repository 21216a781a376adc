import { readFileSync } from 'node:fs';
import fc from 'fast-check';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { crmstream } from '../../api/proto/gen/crmstream.js';
import { Engine } from '../../engine/engine.js';
import { Topic } from '../../engine/outbox.js';
import { parseSegments, withBuiltins, type SegmentDef } from '../../operators/segment-rules.js';
import { engineMembership, membershipDiff, toSegEvent, type Membership } from '../oracle/membership.js';
import { SegmentOracle, type SegEvent } from '../oracle/segment-oracle.js';
import { segmentsArb } from '../oracle/segment-rule-arb.js';
import { streamArb, type StreamEvent } from '../oracle/streams.js';
import { DAY, tempDir } from '../helpers.js';

/**
 * Reloading segment rules in a running engine (and by restarting with other rules), against the
 * DuckDB oracle over the NEW rules: every live segment equals it right after the reload and at
 * every later sample; a building segment has no members until the watermark reaches its
 * `ready_at`, and from then on is live and equal to the oracle; the change records (over both rule
 * sets) replay to the membership at every sample, with the removed segments' members exited.
 */

// 'wishlist' is read by no built-in: rules on it after a reload have no history to start from.
const TYPES_A = ['visit', 'page_view', 'sign_up', 'add_to_cart', 'purchase', 'refund', 'review'];
const TYPES_B = [...TYPES_A, 'wishlist'];

let oracle: SegmentOracle;
beforeAll(async () => {
  oracle = await SegmentOracle.create();
});
afterAll(async () => oracle?.close());

/** Replays SegmentChange records into a membership (every segment ever seen). */
function replayer(engine: Engine): { replay: Membership; count: () => number } {
  const replay: Membership = new Map();
  let n = 0;
  engine.onOutput((r) => {
    if (r.topic !== Topic.segmentChange) return;
    const ch = crmstream.v1.SegmentChange.decode(r.payload);
    n++;
    let m = replay.get(ch.segment_id);
    if (m === undefined) replay.set(ch.segment_id, (m = new Map()));
    if (ch.change === 'exit') m.delete(ch.user_id);
    else m.set(ch.user_id, ch.tier);
  });
  return { replay, count: () => n };
}

/** Rules B from A: per segment kept or replaced, the last ones possibly removed, one on 'wishlist' added. */
const reloadArb = fc.tuple(segmentsArb(TYPES_A, 10), segmentsArb(TYPES_B, 10), fc.array(fc.boolean(), { minLength: 10, maxLength: 10 }), fc.integer({ min: 6, max: 10 }), fc.constantFrom('1d', '7d', '30d'))
  .map(([a, gen, keep, n, d]) => {
    let b: SegmentDef[] = gen.map((g, i) => (keep[i] ? a[i]! : g)).slice(0, n);
    try {
      parseSegments({ segments: b });
    } catch {
      b = gen.slice(0, n); // a kept rule referenced a tier the replaced one does not have
    }
    b.push({ id: 'wish', rule: { did: 'wishlist', within: d } });
    return { a, b };
  });

describe('segment rules reloaded in a running engine', () => {
  it('live segments equal the oracle over the new rules at once; building ones join when exact; changes replay (property)', async () => {
    let liveChanged = 0;
    let building = 0;
    let activated = 0;
    await fc.assert(
      fc.asyncProperty(streamArb({ maxEvents: 200 }), reloadArb, fc.integer({ min: 1, max: 3 }), async (c, { a, b }, cutAt) => {
        const engine = await Engine.create({ time: { timeZone: c.timeZone }, segments: { definitions: a } });
        const { replay } = replayer(engine);
        try {
          const accepted: SegEvent[] = [];
          const cut = Math.floor((c.events.length * cutAt) / 4);
          const ingest = async (slice: StreamEvent[]): Promise<void> => {
            const r = await engine.ingest(slice);
            slice.forEach((e, j) => r.reasons[j] === '' && accepted.push(toSegEvent(e)));
          };
          await ingest(c.events.slice(0, cut));
          const report = await engine.reloadSegments(b);
          const defsB = withBuiltins(b);
          expect(engine.segmentIds()).toEqual(defsB.map((d) => d.id));
          expect(report.removed.sort()).toEqual(a.map((d) => d.id).filter((id) => !b.some((x) => x.id === id)).sort());
          expect(report.added).toContain('wish');

          const check = async (label: string): Promise<void> => {
            const status = new Map(engine.segmentStatus().map((s) => [s.id, s]));
            const live = (id: string): boolean => status.get(id)!.state === 'live';
            for (const s of status.values()) {
              if (s.state === 'building') expect(s.ready_at === null || s.ready_at > engine.watermark, `${label} ${s.id} building past ready_at`).toBe(true);
            }
            const mine = await engineMembership(engine);
            for (const [id, m] of mine) if (!live(id)) expect(m.size, `${label} building ${id} has members`).toBe(0);
            await oracle.load(accepted);
            if (Number.isFinite(engine.watermark)) {
              expect(membershipDiff(mine, await oracle.members(defsB, engine.watermark, c.timeZone), label, live)).toEqual([]);
            }
            // Replayed changes: every current segment as it is, every removed one empty.
            expect(membershipDiff(replay, mine, `${label} replayed`, (id) => mine.has(id))).toEqual([]);
            for (const [id, m] of replay) if (!mine.has(id)) expect(m.size, `${label} removed ${id} still has members in the replay`).toBe(0);
          };
          await check('after reload');
          const statusAfter = engine.segmentStatus();
          liveChanged += statusAfter.filter((s) => s.state === 'live' && (report.changed.includes(s.id) || report.added.includes(s.id))).length;
          const wasBuilding = statusAfter.filter((s) => s.state === 'building').map((s) => s.id);
          building += wasBuilding.length;
          const rest = c.events.slice(cut);
          const step = Math.max(1, Math.ceil(rest.length / 2));
          for (let at = 0; at < rest.length; at += step) {
            await ingest(rest.slice(at, at + step));
            await check(`t=${engine.watermark}`);
          }
          // Time passes: windowed rules on 'wishlist' (≤ 30d) become exact and go live.
          if (Number.isFinite(engine.watermark)) {
            await engine.advanceTo(engine.watermark + 40 * DAY);
            await check('after 40 idle days');
            const now = new Map(engine.segmentStatus().map((s) => [s.id, s.state]));
            expect(now.get('wish')).toBe('live');
            activated += wasBuilding.filter((id) => now.get(id) === 'live').length;
          }
        } finally {
          await engine.close();
        }
      }),
      { numRuns: 25, seed: 11 },
    );
    // The runs covered all three paths: changed rules backfilled at once, building, and activation.
    expect(liveChanged).toBeGreaterThan(0);
    expect(building).toBeGreaterThan(0);
    expect(activated).toBeGreaterThan(0);
  }, 300_000);

  it('backfills a rule from kept state, builds one on a new type until exact, never claims an unbounded one', async () => {
    const engine = await Engine.create({ time: { timeZone: 'UTC' } });
    const t0 = Date.UTC(2024, 0, 1);
    const events = [];
    for (let u = 0; u < 6; u++) {
      for (let k = 0; k <= u; k++) events.push({ event_id: `p${u}-${k}`, type: 'purchase', user_id: `u${u}`, ts: t0 + (k * 10 + u) * DAY, amount: 100 });
      events.push({ event_id: `w${u}`, type: 'wishlist', user_id: `u${u}`, ts: t0 + u * DAY });
    }
    events.sort((x, y) => x.ts - y.ts);
    await engine.ingest(events);
    const report = await engine.reloadSegments([
      // purchases are kept for the built-in vip's 365 days: answered now
      { id: 'loyal', rule: { did: 'purchase', within: '90d', atLeast: 3 } },
      // wishlist was never kept: exact 7 days after the last event seen
      { id: 'wisher', rule: { did: 'wishlist', within: '7d' } },
      { id: 'never_wished', rule: { didNot: 'wishlist' } },
    ]);
    const maxTs = Math.max(...events.map((e) => e.ts));
    expect(report).toEqual({
      added: ['loyal', 'wisher', 'never_wished'], changed: [], removed: [], unchanged: expect.arrayContaining(['vip', 'cart_abandoners']) as unknown as string[],
      building: [{ id: 'wisher', ready_at: maxTs + 1 + 7 * DAY }, { id: 'never_wished', ready_at: null }],
    });
    const members = async (id: string): Promise<string[]> => {
      const out: string[] = [];
      for await (const m of engine.segmentMembers(id)) out.push(m.user_id);
      return out.sort();
    };
    // u2..u5 have ≥ 3 purchases (u had u + 1, ten days apart) within 90 days of the watermark.
    expect(await members('loyal')).toEqual(['u2', 'u3', 'u4', 'u5']);
    expect(await members('wisher')).toEqual([]);
    await engine.ingest([{ event_id: 'w-late', type: 'wishlist', user_id: 'u1', ts: maxTs + 3 * DAY }]);
    expect(await members('wisher')).toEqual([]); // still building
    await engine.ingest([{ event_id: 'v', type: 'visit', user_id: 'u9', ts: maxTs + 8 * DAY }]);
    const status = new Map(engine.segmentStatus().map((s) => [s.id, s]));
    expect(status.get('wisher')!.state).toBe('live');
    expect(status.get('never_wished')).toEqual({ id: 'never_wished', state: 'building', ready_at: null });
    expect(await members('wisher')).toEqual(['u1']); // the wishlist at +3d is within 7 days of +8d
    expect(await members('never_wished')).toEqual([]);
    await engine.close();
  });

  it('an invalid reload is rejected naming the rule and the field, and the engine goes on with the previous rules', async () => {
    const engine = await Engine.create({ time: { timeZone: 'UTC' }, segments: { definitions: [{ id: 'buyers', rule: { did: 'purchase' } }] } });
    const t0 = Date.UTC(2024, 0, 1);
    await engine.ingest([{ event_id: 'a', type: 'purchase', user_id: 'u1', ts: t0, amount: 5 }]);
    const before = engine.segmentIds();
    const err = await engine.reloadSegments([{ id: 'buyers', rule: { did: 'purchase' } }, { id: 'Bad', rule: { did: 'purchase', within: '2 weeks' } }]).catch((e: unknown) => e);
    expect((err as { code: string }).code).toBe('CONFIG_INVALID');
    expect(String((err as Error).message)).toMatch(/segment 'Bad' \(#2\): id: lower-case/);
    expect(String((err as Error).message)).toMatch(/segment 'Bad' \(#2\): rule\.within: a duration/);
    expect(engine.segmentIds()).toEqual(before);
    await engine.ingest([{ event_id: 'b', type: 'purchase', user_id: 'u2', ts: t0 + 1000, amount: 5 }]);
    await engine.advanceTo(t0 + DAY);
    expect(engine.segmentsOf('u2')!.map((m) => m.segment)).toContain('buyers');
    await engine.close();
  });

  it('a restart with other rules is a reload: unchanged members kept, changed ones re-evaluated, removed ones exited', async () => {
    const tmp = tempDir('crm-seg-restart-');
    try {
      const t0 = Date.UTC(2024, 0, 1);
      const cfg = (defs: SegmentDef[]) => ({ dataDir: tmp.dir, time: { timeZone: 'UTC' }, segments: { definitions: defs } });
      const a: SegmentDef[] = [{ id: 'buyers', rule: { did: 'purchase' } }, { id: 'two', rule: { did: 'purchase', atLeast: 2 } }];
      let engine = await Engine.create(cfg(a));
      await engine.ingest([
        { event_id: '1', type: 'purchase', user_id: 'u1', ts: t0, amount: 5 },
        { event_id: '2', type: 'purchase', user_id: 'u2', ts: t0 + 1000, amount: 5 },
        { event_id: '3', type: 'purchase', user_id: 'u2', ts: t0 + 2000, amount: 5 },
      ]);
      await engine.advanceTo(t0 + DAY);
      await engine.close();
      engine = await Engine.create(cfg([{ id: 'buyers', rule: { did: 'purchase' } }, { id: 'big', rule: { sum: 'purchase', atLeast: 10 } }]));
      expect(engine.segmentsOf('u1')!.map((m) => m.segment)).toEqual(['buyers']);
      expect(engine.segmentsOf('u2')!.map((m) => m.segment)).toEqual(['buyers', 'big']);
      await engine.close();
      // The restart's scan wrote only the exit of 'two' and the enter of 'big'.
      const lines = readFileSync(`${tmp.dir}/segment-changes.jsonl`, 'utf8').trim().split('\n').map((l) => JSON.parse(l) as { segment_id: string; user_id: string; change: string; cause: string });
      const reload = lines.filter((l) => l.cause === 'reload').map((l) => `${l.change} ${l.segment_id} ${l.user_id}`);
      expect(reload.sort()).toEqual(['enter big u2', 'exit two u2']);
    } finally {
      tmp.cleanup();
    }
  });

  it('segments switched on for a store that ran without them: facts seeded from profiles, the rest building', async () => {
    const tmp = tempDir('crm-seg-late-on-');
    try {
      const t0 = Date.UTC(2024, 0, 1);
      const base = { dataDir: tmp.dir, time: { timeZone: 'UTC' } };
      let engine = await Engine.create({ ...base, segments: { enabled: false } });
      await engine.ingest([
        { event_id: '2', type: 'sign_up', user_id: 'u2', ts: t0 - 5 * DAY, platform: 'web' },
        { event_id: '1', type: 'sign_up', user_id: 'u1', ts: t0, platform: 'app' },
        { event_id: '3', type: 'visit', user_id: 'u3', ts: t0 + 1000, platform: 'app' },
      ]);
      await engine.advanceTo(t0 + DAY);
      await engine.close();
      engine = await Engine.create({ ...base, segments: { definitions: [
        { id: 'fresh', rule: { signedUp: { within: '3d' } } },
        { id: 'on_app', rule: { attr: 'platform', in: ['app'] } },
      ] } });
      const status = new Map(engine.segmentStatus().map((s) => [s.id, s]));
      expect(status.get('fresh')!.state).toBe('live'); // sign-up times come from the profiles
      expect(status.get('on_app')!.state).toBe('live'); // so does the latest platform
      expect(status.get('new_no_purchase_3d')).toEqual({ id: 'new_no_purchase_3d', state: 'building', ready_at: null }); // "never purchased": unknown
      expect(status.get('vip')!.ready_at).toBe(t0 + 1000 + 1 + 365 * DAY);
      const of = (u: string) => engine.segmentsOf(u)!.map((m) => m.segment);
      expect(of('u1')).toEqual(['fresh', 'on_app']);
      expect(of('u2')).toEqual([]);
      expect(of('u3')).toEqual(['on_app']);
      await engine.close();
    } finally {
      tmp.cleanup();
    }
  });
});
