import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { Engine } from '../../engine/engine.js';
import { PROJECT_ROOT, tempDir } from '../helpers.js';

/**
 * Finding 1 of issue 17: an acknowledged event must survive a SIGKILL right after the answer.
 * The server used to answer POST /v1/events once the engine had processed the events, but the
 * engine checkpointed only when one was due, and never while idle. Each case acknowledges events
 * in a real process, SIGKILLs it at once, and opens its data dir: the events must be there.
 */

const WORKER = path.join(PROJECT_ROOT, 'dist/tests/fixtures/ingest-worker.js');
const KEY = 'crm_test_ingest_key';
const now = Date.now();
const visit = (id: string, user: string, ts = now - 60_000) => ({ event_id: id, type: 'visit', user_id: user, ts });

interface Worker {
  child: ChildProcess;
  waitFor(re: RegExp, ms?: number): Promise<RegExpMatchArray>;
}

const running: ChildProcess[] = [];
const cleanups: (() => void)[] = [];
afterEach(() => {
  for (const c of running.splice(0)) c.kill('SIGKILL');
  for (const c of cleanups.splice(0)) c();
});

function startWorker(dataDir: string, mode: string): Worker {
  if (!existsSync(WORKER)) throw new Error(`${WORKER} is missing: run \`npm run build\` first (npm test does)`);
  const child = spawn(process.execPath, [WORKER, dataDir, mode, KEY], { stdio: ['pipe', 'pipe', 'inherit'] });
  running.push(child);
  let out = '';
  const waiters: { re: RegExp; resolve: (m: RegExpMatchArray) => void }[] = [];
  child.stdout!.setEncoding('utf8');
  child.stdout!.on('data', (d: string) => {
    out += d;
    for (const w of [...waiters]) {
      const m = out.match(w.re);
      if (m !== null) {
        waiters.splice(waiters.indexOf(w), 1);
        w.resolve(m);
      }
    }
  });
  return {
    child,
    waitFor: (re, ms = 30_000) => new Promise((resolve, reject) => {
      const m = out.match(re);
      if (m !== null) return resolve(m);
      const timer = setTimeout(() => reject(new Error(`no ${re} from the worker within ${ms} ms; it printed: ${out}`)), ms);
      waiters.push({ re, resolve: (mm) => { clearTimeout(timer); resolve(mm); } });
    }),
  };
}

async function kill(w: Worker): Promise<void> {
  const gone = new Promise((resolve) => w.child.once('exit', resolve));
  w.child.kill('SIGKILL');
  await gone;
}

async function profilesIn(dataDir: string, ids: string[]): Promise<(string | null)[]> {
  const e = await Engine.create({ dataDir, time: { maxFutureMs: null } });
  try {
    const stored = new Set<string>();
    for await (const p of e.profilesStored()) stored.add(p.user_id);
    return ids.map((id) => (stored.has(id) ? id : null));
  } finally {
    await e.close();
  }
}

describe('acknowledged events survive SIGKILL', () => {
  it('HTTP: a 200 from POST /v1/events means the events are in a checkpoint', async () => {
    const tmp = tempDir('crm-ack-http-');
    cleanups.push(tmp.cleanup);
    const w = startWorker(tmp.dir, 'http');
    const port = (await w.waitFor(/ready (\d+)/))[1];
    const post = async (events: unknown[]) => {
      const r = await fetch(`http://127.0.0.1:${port}/v1/events`, {
        method: 'POST', headers: { authorization: `Bearer ${KEY}`, 'content-type': 'application/json' }, body: JSON.stringify(events),
      });
      expect(r.status).toBe(200);
      return (await r.json()) as { accepted: number };
    };
    // Two requests in a row: the second comes well within the checkpoint interval of the first.
    expect((await post([visit('e1', 'first')])).accepted).toBe(1);
    expect((await post([visit('e2', 'second')])).accepted).toBe(1);
    await kill(w);
    expect(await profilesIn(tmp.dir, ['first', 'second'])).toEqual(['first', 'second']);
  }, 60_000);

  it('library: ingest(events, position, { durable: true }) resolves only once they are durable', async () => {
    const tmp = tempDir('crm-ack-lib-');
    cleanups.push(tmp.cleanup);
    const w = startWorker(tmp.dir, 'library');
    await w.waitFor(/ready/);
    w.child.stdin!.write(JSON.stringify([visit('e1', 'first')]) + '\n');
    await w.waitFor(/acked 1/);
    w.child.stdin!.write(JSON.stringify([visit('e2', 'second')]) + '\n');
    await w.waitFor(/acked 1[^]*acked 1/);
    await kill(w);
    expect(await profilesIn(tmp.dir, ['first', 'second'])).toEqual(['first', 'second']);
  }, 60_000);

  it('idle engine: processed events become durable without another call (idle checkpoint)', async () => {
    const tmp = tempDir('crm-ack-idle-');
    cleanups.push(tmp.cleanup);
    const w = startWorker(tmp.dir, 'idle');
    await w.waitFor(/ready/);
    // Two calls in a row: the second finds no checkpoint due (the worker's interval is 2 s).
    w.child.stdin!.write(JSON.stringify([visit('e1', 'first')]) + '\n');
    w.child.stdin!.write(JSON.stringify([visit('e2', 'second')]) + '\n');
    // No more calls: the engine must checkpoint on its own (checkpoint.intervalMs after the last change).
    await w.waitFor(/acked 1[^]*acked 1\ncheckpointed/, 20_000);
    await kill(w);
    expect(await profilesIn(tmp.dir, ['first', 'second'])).toEqual(['first', 'second']);
  }, 60_000);
});
