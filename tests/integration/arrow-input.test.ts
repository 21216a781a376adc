import { spawnSync } from 'node:child_process';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import {
  Dictionary, Float64, Int32, Table, TimestampMicrosecond, Utf8, tableFromIPC, tableToIPC, vectorFromArray, makeVector,
} from 'apache-arrow';
import { afterAll, describe, expect, it } from 'vitest';
import { crmstream } from '../../api/proto/gen/crmstream.js';
import { Engine } from '../../engine/engine.js';
import { Topic } from '../../engine/outbox.js';
import { TrafficGenerator, isBad, type GenEvent } from '../../engine/sources/generator.js';
import { PROJECT_ROOT, SHARED_DATA, runAndKill, tempDir } from '../helpers.js';

/**
 * Arrow in (docs/ARROW.md): `convert` (csv / jsonl → Arrow), `backfill --format arrow` (streamed,
 * resumable) and `engine.ingestArrow` give the same state as the jsonl / csv paths, on generated
 * events with every column shape the reader accepts and on the REES46 file.
 */

const CLI = path.join(PROJECT_ROOT, 'dist/api/cli.js');
const REES = path.join(SHARED_DATA, 'rees46_oct2019_head/2019-Oct_head.csv');
const tmp = tempDir('crm-arrow-in-');
afterAll(() => tmp.cleanup());

function cli(args: string[]): { status: number | null; stdout: string; stderr: string } {
  const r = spawnSync(process.execPath, [CLI, ...args], { encoding: 'utf8', timeout: 240_000 });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

/** Every export of a data dir as text, for comparing two states. */
function exports(dataDir: string): Record<string, string> {
  const out: Record<string, string> = {};
  for (const [name, args] of [
    ['kpis-day', ['export', 'kpis', '--grain', 'day']],
    ['kpis-month', ['export', 'kpis', '--grain', 'month']],
    ['cohorts', ['export', 'cohorts', '--grain', 'week', '--kind', 'both']],
    ['funnel', ['export', 'funnel', '--grain', 'week']],
    ['profiles', ['export', 'profiles']],
    ['cart_abandoners', ['export', 'segment', '--id', 'cart_abandoners']],
  ] as const) {
    const r = cli([...args, '--data-dir', dataDir]);
    expect(r.status, r.stderr).toBe(0);
    out[name] = r.stdout;
  }
  return out;
}

/** Generated events (with bad rows, duplicates and late ones) as jsonl; returns the file. */
function generatedJsonl(n: number): string {
  const gen = new TrafficGenerator({ seed: 5, users: 800, eventsPerSecond: 0.05, badRate: 0.01, duplicateRate: 0.01, lateRate: 0.02, maxLateMs: 86_400_000 });
  const lines: string[] = [];
  for (let i = 0; i < n; i++) {
    const r = gen.nextRecord();
    if (isBad(r)) {
      lines.push(r.json);
      continue;
    }
    const e: GenEvent = r;
    lines.push(JSON.stringify({
      event_id: e.event_id, type: e.type, user_id: e.user_id || undefined, anonymous_id: e.anonymous_id || undefined, ts: e.ts,
      amount: e.amount === 0 ? undefined : e.amount, currency: e.currency || undefined, order_id: e.order_id || undefined,
      channel: e.channel || undefined, platform: e.platform || undefined, props: Object.keys(e.props).length ? e.props : undefined,
    }));
  }
  const file = path.join(tmp.dir, 'gen.jsonl');
  writeFileSync(file, lines.join('\n') + '\n');
  return file;
}

describe('Arrow in', () => {
  it('convert → backfill --format arrow gives the state the jsonl backfill gives, also SIGKILLed and resumed', async () => {
    const jsonl = generatedJsonl(20_000);
    const arrow = path.join(tmp.dir, 'gen.arrow');
    const conv = cli(['convert', '--input', jsonl, '--out', arrow, '--tz', 'UTC']);
    expect(conv.status, conv.stderr).toBe(0);
    const report = JSON.parse(conv.stdout) as { rows: number; written: number; rejected: number; rejects_file: string | null };
    // Rows that do not decode are not in the Arrow file; they are reported and kept beside it.
    expect(report.rows).toBe(20_000);
    expect(report.rejected).toBeGreaterThan(0);
    expect(readFileSync(report.rejects_file!, 'utf8').trim().split('\n')).toHaveLength(report.rejected);

    const viaJsonl = path.join(tmp.dir, 'jsonl-state');
    const viaArrow = path.join(tmp.dir, 'arrow-state');
    const a = cli(['backfill', '--data-dir', viaJsonl, '--input', jsonl, '--tz', 'UTC', '--no-progress']);
    // The Arrow backfill is SIGKILLed a few times (small batches, a checkpoint each), then resumed.
    const cfg = path.join(tmp.dir, 'small-batches.json');
    writeFileSync(cfg, JSON.stringify({ batchRows: 256, checkpoint: { intervalMs: 0 } }));
    const args = ['backfill', '--data-dir', viaArrow, '--input', arrow, '--tz', 'UTC', '--config', cfg, '--no-progress'];
    let kills = 0;
    for (let i = 0; i < 4; i++) if (await runAndKill([CLI, ...args], /Arrow input/, 300 + 300 * i)) kills++;
    expect(kills).toBeGreaterThan(0);
    const b = cli(args);
    expect(a.status, a.stderr).toBe(0);
    expect(b.status, b.stderr).toBe(0);
    const ra = JSON.parse(a.stdout) as { accepted: number; rejects: Record<string, number> };
    const rb = JSON.parse(b.stdout) as { accepted: number; rejects: Record<string, number>; rows: number; resumed_from_row: number };
    expect(rb.rows).toBe(report.written);
    // Counters come from the checkpoints: the resumed run reports the totals of the whole backfill.
    expect(rb.accepted).toBe(ra.accepted);
    // Rows that did not decode stayed with convert (its report and rejects file); every other
    // reject — missing ids, duplicates, bad timestamps — happens in the Arrow backfill alike.
    const convRejects = (JSON.parse(conv.stdout) as { rejects: Record<string, number> }).rejects;
    expect(Object.keys(convRejects).length).toBeGreaterThan(0);
    const together: Record<string, number> = { ...rb.rejects };
    for (const [k, v] of Object.entries(convRejects)) together[k] = (together[k] ?? 0) + v;
    expect(together).toEqual(ra.rejects);
    expect(exports(viaArrow)).toEqual(exports(viaJsonl));
  }, 300_000);

  it('the REES46 file converted to Arrow and back-filled gives the KPIs of the csv path', () => {
    if (!existsSync(REES)) return;
    const usd = path.join(tmp.dir, 'usd.json');
    writeFileSync(usd, JSON.stringify({ validation: { currency: 'USD' } }));
    const arrow = path.join(tmp.dir, 'rees.arrows');
    const conv = cli(['convert', '--input', REES, '--map', 'examples/maps/rees46.json', '--tz', 'UTC', '--out', arrow, '--stream']);
    expect(conv.status, conv.stderr).toBe(0);
    expect(JSON.parse(conv.stdout)).toMatchObject({ rows: 17_434, written: 17_434, rejected: 0, format: 'arrow-stream' });
    const viaCsv = path.join(tmp.dir, 'rees-csv');
    const viaArrow = path.join(tmp.dir, 'rees-arrow');
    expect(cli(['backfill', '--data-dir', viaCsv, '--input', REES, '--map', 'examples/maps/rees46.json', '--config', usd, '--tz', 'UTC', '--no-progress']).status).toBe(0);
    const b = cli(['backfill', '--data-dir', viaArrow, '--input', arrow, '--format', 'arrow', '--config', usd, '--tz', 'UTC', '--no-progress']);
    expect(b.status, b.stderr).toBe(0);
    expect(JSON.parse(b.stdout)).toMatchObject({ rows: 17_434, accepted: 17_434, rejected: 0 });
    expect(exports(viaArrow)).toEqual(exports(viaCsv));
  }, 300_000);

  it('engine.ingestArrow reads every accepted column shape; bad values are rejected with reasons, not dropped', async () => {
    const n = 6;
    const base = Date.UTC(2024, 2, 1);
    // One shape per column: dictionary strings, plain strings with nulls, µs timestamps, int64 amounts, JSON props.
    const t = new Table({
      event_id: vectorFromArray(['e1', 'e2', 'e3', 'e4', 'e5', 'e6'], new Utf8()),
      type: vectorFromArray(['visit', 'sign_up', 'purchase', 'visit', 'purchase', 'visit'], new Dictionary(new Utf8(), new Int32())),
      user_id: vectorFromArray([null, 'u1', 'u1', 'u2', 'u2', null], new Utf8()),
      anonymous_id: vectorFromArray(['a1', 'a1', null, null, null, 'a3'], new Utf8()),
      // apache-arrow takes ms and stores µs: the reader must scale them back.
      ts: vectorFromArray([base, base + 1000, base + 2000, base + 3000, base + 4000, null], new TimestampMicrosecond()),
      amount: makeVector(BigInt64Array.from([0n, 0n, 1200n, 0n, 800n, 0n])),
      currency: vectorFromArray([null, null, 'KRW', null, 'KRW', null], new Dictionary(new Utf8(), new Int32())),
      order_id: vectorFromArray([null, null, 'o1', null, 'o2', null], new Utf8()),
      props: vectorFromArray([null, '{"consent_push":"true"}', null, 'not json', null, null], new Utf8()),
    });
    const e = await Engine.create({ time: { timeZone: 'UTC' } });
    const deadLetters: string[] = [];
    e.onOutput((o) => {
      if (o.topic === Topic.deadLetter) {
        const d = crmstream.v1.DeadLetter.decode(o.payload);
        deadLetters.push(`${d.reason} ${d.source} ${crmstream.v1.Event.decode(d.payload).event_id}`);
      }
    });
    try {
      const r = await e.ingestArrow(t.batches[0]!);
      await e.checkpoint();
      // Each reject names its row and carries the row itself.
      expect(deadLetters.sort()).toEqual(['bad_encoding arrow:3 e4', 'bad_timestamp arrow:5 e6']);
      // e4: props that are not a JSON object; e6: no ts.
      expect(r).toEqual({ accepted: 4, rejected: 2 });
      expect(Object.fromEntries(Object.entries(e.rejectCounts()).filter(([, v]) => v > 0))).toEqual({ bad_encoding: 1, bad_timestamp: 1 });
      const u1 = e.profile('u1')!;
      expect(u1).toMatchObject({ user_id: 'u1', purchases: 1, revenue: 1200, events: 3, signup_ts: base + 1000 });
      expect(e.profile('a1')).toEqual(u1); // the visit before sign-up counts towards the member
      expect(e.profile('u2')).toMatchObject({ purchases: 1, revenue: 800, events: 1 });
      const kpi = (await e.kpis('day')).find((x) => x.channel === '*' && x.platform === '*')!;
      expect(kpi).toMatchObject({ orders: 2, revenue: 2000, purchasers: 2, signups: 1 });
      expect(n).toBe(t.numRows);
    } finally {
      await e.close();
    }
  });

  it('a file without a required column is refused with a message naming it', async () => {
    const t = new Table({ event_id: vectorFromArray(['e1'], new Utf8()), ts: vectorFromArray([1], new Float64()) });
    const e = await Engine.create({});
    try {
      await expect(e.ingestArrow(t.batches[0]!)).rejects.toThrow(/no type column/);
    } finally {
      await e.close();
    }
    const file = path.join(tmp.dir, 'bad.arrow');
    writeFileSync(file, tableToIPC(t, 'file'));
    const r = cli(['backfill', '--data-dir', path.join(tmp.dir, 'bad-state'), '--input', file, '--no-progress']);
    expect(r.status).not.toBe(0);
    expect(r.stderr).toMatch(/no type column/);
    // Readable by any Arrow reader: what convert writes is checked the same way.
    expect(tableFromIPC(readFileSync(file)).schema.fields.map((f) => f.name)).toEqual(['event_id', 'ts']);
  });
});
