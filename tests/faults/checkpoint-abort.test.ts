import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { Engine } from '../../engine/engine.js';
import { isCode } from '../../engine/errors.js';
import { LevelStore } from '../../state/level.js';
import { tempDir } from '../helpers.js';
import { FaultStore } from './fault-store.js';
import { config, snapshotOf, stream } from './state-snapshot.js';

/**
 * Finding 2 of issue 17: a failed checkpoint must change nothing. Operators used to clear their
 * dirty marks (KPI cells, campaign cells, segment sizes, segment state) while preparing the
 * checkpoint, so after a failed write the next successful one stored profiles without the
 * matching aggregate changes: KPIs and campaign figures — running differences — stayed wrong
 * for good. Here checkpoints fail (disk-full errors) while a stream with KPIs, segments and
 * campaigns goes in; the state in memory AND the state a restart reads from disk must equal an
 * uninterrupted run's, field by field.
 */

const cleanups: (() => void)[] = [];
afterEach(() => {
  for (const c of cleanups.splice(0)) c();
});

describe('a failed checkpoint changes nothing (prepare → commit / abort)', () => {
  const events = stream(6_000);
  const asOf = Math.max(...events.map((e) => (e as { ts: number }).ts)) + 40 * 86_400_000;

  async function reference(): Promise<unknown> {
    const tmp = tempDir('crm-cp-ref-');
    cleanups.push(tmp.cleanup);
    const e = await Engine.create(config(tmp.dir));
    for (let i = 0; i < events.length; i += 250) await e.ingest(events.slice(i, i + 250));
    await e.advanceTo(asOf);
    await e.checkpoint();
    const snap = await snapshotOf(e);
    await e.close();
    return snap;
  }

  it('write failures retried: memory and the reopened store equal an uninterrupted run', async () => {
    const ref = await reference();
    const tmp = tempDir('crm-cp-fault-');
    cleanups.push(tmp.cleanup);
    const store = new FaultStore(new LevelStore(path.join(tmp.dir, 'state')));
    const e = await Engine.create(config(tmp.dir), { store });
    const refused: string[] = [];
    // A caller that carries on after a refused checkpoint (CHECKPOINT_FAILED is retriable), as the
    // engine used to invite.
    const carryOn = async (what: string, fn: () => Promise<unknown>): Promise<void> => {
      try {
        await fn();
      } catch (err) {
        if (!isCode(err, 'CHECKPOINT_FAILED')) throw err;
        refused.push(what);
      }
    };
    for (let i = 0, k = 0; i < events.length; i += 250, k++) {
      if (k % 3 === 1) store.failNext(k % 2 === 0 ? 1 : 2); // the checkpoint of this batch fails once or twice
      await carryOn(`batch ${k}`, () => e.ingest(events.slice(i, i + 250)));
    }
    store.failNext(1);
    await carryOn('advance', () => e.advanceTo(asOf));
    await carryOn('checkpoint', () => e.checkpoint());
    await carryOn('checkpoint', () => e.checkpoint());
    expect(store.failedWrites).toBeGreaterThan(10);
    const live = await snapshotOf(e);
    await e.close();
    // What a restart reads: the durable aggregates must hold every difference.
    const again = await Engine.create(config(tmp.dir));
    const reopened = await snapshotOf(again);
    const health = e.health();
    await again.close();
    expect(reopened).toEqual(ref);
    expect(live).toEqual(ref);
    expect(refused, 'no checkpoint failure reaches the caller while retries succeed').toEqual([]);
    expect(health.checkpointFailuresTotal).toBe(store.failedWrites);
    expect(health.consecutiveCheckpointFailures).toBe(0);
  }, 120_000);

  it('failures past the retries fail closed; close still releases the store; a restart resumes exactly', async () => {
    const ref = await reference();
    const tmp = tempDir('crm-cp-closed-');
    cleanups.push(tmp.cleanup);
    const store = new FaultStore(new LevelStore(path.join(tmp.dir, 'state')));
    const e = await Engine.create(config(tmp.dir), { store });
    const half = 3_000;
    for (let i = 0; i < half; i += 250) await e.ingest(events.slice(i, i + 250), i + 250);
    store.failNext(1_000); // the disk stays full
    let caught: unknown = null;
    try {
      await e.ingest(events.slice(half, half + 250), half + 250);
    } catch (err) {
      caught = err;
    }
    expect(isCode(caught, 'CHECKPOINT_FAILED')).toBe(true);
    expect(e.health().failed?.code).toBe('CHECKPOINT_FAILED');
    await expect(e.failed).resolves.toBeDefined();
    // Nothing more is taken: a client would get 503 and send it again after the restart.
    await expect(e.ingest(events.slice(half, half + 1))).rejects.toMatchObject({ code: 'ENGINE_FAILED' });
    await e.close().catch(() => undefined);
    store.heal();
    // The LevelDB lock is released: the data dir opens again, at the last durable position.
    const again = await Engine.create(config(tmp.dir));
    const from = again.position as number;
    expect(from).toBe(half);
    for (let i = from; i < events.length; i += 250) await again.ingest(events.slice(i, i + 250), i + 250);
    await again.advanceTo(asOf);
    await again.checkpoint();
    expect(await snapshotOf(again)).toEqual(ref);
    await again.close();
  }, 120_000);
});
