/**
 * Restart time (SPEC §10: "restart after SIGKILL with 1 M users: serving again ≤ 5 s"): a LevelDB
 * state directory holding the benchmark traffic (5 M events, ~1 M profiles; --quick: 300 k) is
 * reopened and one event is processed — the time until the engine serves again. Items are the
 * profiles restored, so ops/s is profiles per second and `median ms` is the restart time.
 *
 * The directory is written once in setup. Reopening costs the same whether the last process
 * closed cleanly or was killed after its last checkpoint: LevelDB replays its small log either way,
 * and the engine restores from the checkpoint alone (a crash only adds re-reading the source).
 */
import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { EventColumns } from '../engine/batch.js';
import { Engine } from '../engine/engine.js';
import { TrafficGenerator, encodeProto } from '../engine/sources/generator.js';
import { appendProtoEvent } from '../engine/codec.js';
import { benchTraffic } from './decode.bench.js';
import { engineItems } from './engine.bench.js';
import { consume, type Scenario } from './harness.js';

interface RestartState {
  readonly dir: string;
  readonly profiles: number;
  probe: number;
}

export const restartScenario: Scenario<RestartState> = {
  name: 'restart with LevelDB state',
  async setup(ctx) {
    const dir = mkdtempSync(path.join(os.tmpdir(), 'crm-restart-'));
    const gen = new TrafficGenerator(benchTraffic());
    const engine = await Engine.create({ dataDir: dir });
    const b = new EventColumns(4096);
    const n = engineItems(ctx.quick);
    for (let at = 0; at < n; at += 4096) {
      b.reset();
      for (let i = 0; i < 4096 && at + i < n; i++) appendProtoEvent(b, encodeProto(gen.nextEvent()), 'bench');
      await engine.ingestColumns(b);
    }
    const profiles = engine.stats()['profilesCreated']!;
    await engine.close();
    return { dir, profiles, probe: 0 };
  },
  async run(s) {
    const engine = await Engine.create({ dataDir: s.dir });
    // Serving again = the next event is processed (a new id each run, so it is never a duplicate).
    const b = new EventColumns(1);
    appendProtoEvent(b, crmProbe(s.probe++), 'bench');
    const r = await engine.ingestColumns(b);
    await engine.close();
    consume(r.accepted + s.profiles);
    return s.profiles;
  },
  async teardown(s) {
    rmSync(s.dir, { recursive: true, force: true });
  },
  notes: (s) => `${s.profiles.toLocaleString('en-US')} profiles in LevelDB; time = Engine.create (key filter scan, dedupe ids, timers) + one event + close`,
};

function crmProbe(k: number): Uint8Array {
  return encodeProto({
    event_id: `restart-probe-${k}`, type: 'visit', user_id: `probe-${k}`, anonymous_id: '', ts: Date.UTC(2024, 0, 1, 12),
    amount: 0, currency: '', order_id: '', channel: '', platform: '', campaign_id: '', variant: '', trigger_id: '', props: {},
  });
}
