/**
 * Engine scenarios (SPEC §10), on the benchmark traffic of decode.bench.ts (same generator, same
 * seed, 1 M user population):
 *
 * - `engine core (memory)`: decoded events (columns built in setup, as a source hands them over)
 *   through validation, lateness, de-duplication, identity, the per-user profile state and the
 *   built-in operators; state in memory, no checkpoint (the engine is dropped, not closed).
 * - `engine + LevelDB (checkpoint 1 s)`: the same with the classic-level backend, a bounded profile
 *   cache (250 k, the default) and an atomic checkpoint every second, the last one included.
 *
 * Each run starts from an empty store, so every run does the same work; the checksum is the
 * number of accepted events plus the profile count, identical run to run. The KPI operator is on
 * (the default); segment and campaign operators join these scenarios as they land.
 */
import { mkdtempSync, readdirSync, rmSync, statSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { EventColumns } from '../engine/batch.js';
import { Engine } from '../engine/engine.js';
import { TrafficGenerator, encodeProto } from '../engine/sources/generator.js';
import { appendProtoEvent } from '../engine/codec.js';
import { benchTraffic } from './decode.bench.js';
import { consume, type Scenario } from './harness.js';

const BATCH = 4096;

export interface EngineBenchState {
  readonly batches: EventColumns[];
  readonly events: number;
  readonly users: number;
  /** Bytes of the LevelDB directory after the last run (level scenario). */
  diskBytes: number;
  profiles: number;
}

/** 5 M events reach ~1 M distinct users of the population; --quick: 300 k. */
export function engineItems(quick: boolean): number {
  return quick ? 300_000 : 5_000_000;
}

/** The benchmark traffic as decoded batches, as a source hands them over (shared by the engine scenarios). */
export function buildBatches(n: number): { batches: EventColumns[]; users: number } {
  const gen = new TrafficGenerator(benchTraffic());
  const batches: EventColumns[] = [];
  for (let at = 0; at < n; at += BATCH) {
    const m = Math.min(BATCH, n - at);
    const b = new EventColumns(m);
    // Through the real decoder, as a Kafka or HTTP source would hand them over (flat strings, the
    // raw bytes kept for dead letters).
    for (let i = 0; i < m; i++) appendProtoEvent(b, encodeProto(gen.nextEvent()), 'bench');
    batches.push(b);
  }
  return { batches, users: gen.stats.users };
}

/** Rows rejected (duplicate, too_late) by a previous run are fresh again: every run does the same work. */
export function resetStatus(batches: readonly EventColumns[]): void {
  for (const b of batches) b.status.fill(0);
}

function dirBytes(dir: string): number {
  let total = 0;
  for (const f of readdirSync(dir, { recursive: true, withFileTypes: true })) {
    if (f.isFile()) total += statSync(path.join(f.parentPath, f.name)).size;
  }
  return total;
}

async function runEngine(state: EngineBenchState, dataDir: string | null): Promise<number> {
  resetStatus(state.batches);
  const engine = await Engine.create(dataDir === null
    ? { checkpoint: { intervalMs: 1e9, idleMs: null, maxDirtyUsers: 10_000_000 } }
    : { dataDir, checkpoint: { intervalMs: 1000 } });
  for (const b of state.batches) await engine.ingestColumns(b);
  // Core: the state stays in memory (what is measured is the processing). With LevelDB: the last
  // checkpoint is part of the work — nothing counts until it is durable.
  if (dataDir !== null) await engine.checkpoint();
  const profiles = engine.stats()['profilesCreated']!;
  const accepted = engine.acceptedCount;
  if (dataDir !== null) await engine.close();
  state.profiles = profiles;
  consume(accepted + profiles);
  return state.events;
}

async function setup(quick: boolean): Promise<EngineBenchState> {
  const n = engineItems(quick);
  const { batches, users } = buildBatches(n);
  return { batches, events: n, users, diskBytes: 0, profiles: 0 };
}

export const engineCoreScenario: Scenario<EngineBenchState> = {
  name: 'engine core (memory)',
  setup: (ctx) => setup(ctx.quick),
  run: (s) => runEngine(s, null),
  notes: (s) => `${s.events.toLocaleString('en-US')} events, ${s.profiles.toLocaleString('en-US')} profiles (generator: ${s.users.toLocaleString('en-US')} users); identity + profile state + validation + dedupe + all KPIs (docs/KPIS.md) + the 6 built-in segments; campaigns not yet in`,
};

export const engineLevelScenario: Scenario<EngineBenchState & { dir: string }> = {
  name: 'engine + LevelDB (checkpoint 1 s)',
  async setup(ctx) {
    return { ...(await setup(ctx.quick)), dir: mkdtempSync(path.join(os.tmpdir(), 'crm-bench-')) };
  },
  async run(s) {
    const dataDir = path.join(s.dir, 'run');
    rmSync(dataDir, { recursive: true, force: true });
    const n = await runEngine(s, dataDir);
    s.diskBytes = dirBytes(path.join(dataDir, 'state'));
    return n;
  },
  async teardown(s) {
    rmSync(s.dir, { recursive: true, force: true });
  },
  notes: (s) => `${s.events.toLocaleString('en-US')} events, ${s.profiles.toLocaleString('en-US')} profiles; LevelDB dir ${(s.diskBytes / 2 ** 20).toFixed(1)} MiB = ${Math.round(s.diskBytes / Math.max(1, s.profiles))} B per profile (incl. aliases, dedupe ids, timers; before compaction)`,
};
