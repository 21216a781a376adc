import { readFileSync } from 'node:fs';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import type { EventColumns } from '../../engine/batch.js';
import { Engine } from '../../engine/engine.js';
import type { Operator, OperatorContext, UserRecord } from '../../operators/operator.js';
import { tempDir } from '../helpers.js';

/**
 * Finding 10 of issue 17: an operator exception on one record used to fail the engine, and every
 * restart replayed the same record into the same exception — a crash loop. Now the failure is
 * written down: the rows of the failing run become suspects, each goes through alone after the
 * restart, the one that fails again is poison, and from the next restart on it is rejected
 * `poison` (dead-lettered) while its batch's other rows are processed. A timer that throws is
 * poison at once and is skipped after the restart.
 */

/** Throws on events whose props say `poison`, and on timers of kind `bomb`. */
class FragileOperator implements Operator {
  readonly name = 'fragile';
  readonly slot = null;
  readonly timerKinds = ['bomb'];
  seen = 0;
  async open(): Promise<void> {}
  processBatch(b: EventColumns, recs: readonly (UserRecord | null)[], start: number, end: number, ctx: OperatorContext): void {
    for (let i = start; i < end; i++) {
      if (b.status[i] !== 0) continue;
      if (b.props[i]?.['poison'] === '1') throw new Error(`cannot handle ${b.eventId[i]}`);
      if (b.props[i]?.['arm'] === '1' && recs[i] !== null) ctx.timers.register(recs[i]!.id, 'bomb', b.ts[i]! + 60_000);
      this.seen++;
    }
  }
  onTimer(): void {
    throw new Error('the bomb timer always fails');
  }
  snapshot(): void {}
  committed(): void {}
  async close(): Promise<void> {}
}

const cleanups: (() => void)[] = [];
afterEach(() => {
  for (const c of cleanups.splice(0)) c();
});

const T = Date.UTC(2024, 0, 1);
const batch = Array.from({ length: 10 }, (_, k) => ({
  event_id: `e${k}`, type: 'visit', user_id: `u${k}`, ts: T + k * 1000, props: k === 6 ? { poison: '1' } : {},
}));

async function attempt(dir: string, run: (e: Engine) => Promise<unknown>): Promise<{ error: string | null; engine: Engine; op: FragileOperator }> {
  const op = new FragileOperator();
  const engine = await Engine.create({ dataDir: dir, time: { maxFutureMs: null } }, { operators: [op] });
  let error: string | null = null;
  try {
    await run(engine);
  } catch (err) {
    error = (err as { code?: string }).code ?? String(err);
  }
  return { error, engine, op };
}

describe('poison records are quarantined, never a crash loop', () => {
  it('a record an operator throws on: suspects, then poison; its batch goes on without it', async () => {
    const tmp = tempDir('crm-poison-');
    cleanups.push(tmp.cleanup);
    const codes: (string | null)[] = [];
    let last: Awaited<ReturnType<typeof attempt>> | null = null;
    // Each restart replays the batch from the stored position (null: the start), as a source would.
    for (let restart = 0; restart < 4; restart++) {
      const a = await attempt(tmp.dir, (e) => e.ingest(batch, 'after-batch'));
      codes.push(a.error);
      if (a.error === null) {
        last = a;
        break;
      }
      await a.engine.close().catch(() => undefined);
    }
    expect(codes).toEqual(['OPERATOR_FAILED', 'OPERATOR_FAILED', null]);
    const e = last!.engine;
    expect(last!.op.seen).toBe(9);
    expect(e.acceptedCount).toBe(9);
    expect(e.rejectCounts().poison).toBe(1);
    await e.close();
    const dead = readFileSync(path.join(tmp.dir, 'deadletter.jsonl'), 'utf8').trim().split('\n').map((l) => JSON.parse(l) as { reason: string; payload: string; payload_encoding: string });
    expect(dead.map((d) => d.reason)).toEqual(['poison']);
    // The record itself is kept (protobuf Event, base64 in the JSON line) for whoever fixes the operator.
    expect(Buffer.from(dead[0]!.payload, dead[0]!.payload_encoding === 'base64' ? 'base64' : 'utf8').toString('latin1')).toContain('e6');
  }, 60_000);

  it('a timer an operator throws on is poison at once and skipped after the restart', async () => {
    const tmp = tempDir('crm-poison-timer-');
    cleanups.push(tmp.cleanup);
    const first = await attempt(tmp.dir, async (e) => {
      await e.ingest([{ event_id: 'x', type: 'visit', user_id: 'u', ts: T, props: { arm: '1' } }]);
      await e.checkpoint();
      await e.advanceTo(T + 3_600_000);
    });
    expect(first.error).toBe('OPERATOR_FAILED');
    await first.engine.close().catch(() => undefined);
    const second = await attempt(tmp.dir, (e) => e.advanceTo(T + 3_600_000));
    expect(second.error).toBe(null);
    expect(second.engine.watermark).toBe(T + 3_600_000);
    expect(second.engine.rejectCounts().poison).toBe(1);
    await second.engine.close();
    const dead = readFileSync(path.join(tmp.dir, 'deadletter.jsonl'), 'utf8').trim().split('\n').map((l) => JSON.parse(l) as { reason: string; source: string });
    expect(dead).toMatchObject([{ reason: 'poison', source: 'timer' }]);
  }, 60_000);
});
