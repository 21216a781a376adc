/**
 * The same-run baseline (SPEC §10: engine-core throughput / protobuf decode alone ≥ 0.25): decode
 * N pre-encoded `crmstream.v1.Event` messages, one Uint8Array each as a Kafka consumer receives
 * them, and fold two fields of every decoded event into a checksum. Nothing else: no validation,
 * no batch columns, no state — the floor under every ingest path.
 *
 * Also a benny micro-suite (`node dist/bench/decode.bench.js [--quick]`): one protobuf decode vs
 * one JSON.parse of the same event as a line vs one protobuf encode vs one generator nextEvent().
 */
import { pathToFileURL } from 'node:url';
import { crmstream } from '../api/proto/gen/crmstream.js';
import { TrafficGenerator, encodeProto, toJsonLine, type GenEvent, type TrafficOptions } from '../engine/sources/generator.js';
import { consume, runMicroSuite, type MicroSummary, type Scenario } from './harness.js';

/**
 * The benchmark traffic: 1 M users, 100 events/s of event time (1 M events ≈ 2.8 h, 10 M ≈ 1.2 days),
 * the generator's default noise (1 % late, 0.5 % duplicates). Other scenarios should use the same
 * stream so their ratio to this baseline compares like with like.
 */
export function benchTraffic(): TrafficOptions {
  return { seed: 42, users: 1_000_000, eventsPerSecond: 100 };
}

/** Events in the decode input: 1 M (SPEC §10 sizes), 200 k with --quick. */
export function decodeItems(quick: boolean): number {
  return quick ? 200_000 : 1_000_000;
}

const CHUNK = 4096;

export interface DecodeState {
  readonly messages: Uint8Array[];
  readonly bytes: number;
  readonly genMs: number;
  readonly encodeMs: number;
  readonly users: number;
}

export const decodeScenario: Scenario<DecodeState> = {
  name: 'protobuf decode',
  baseline: true,

  async setup(ctx) {
    const n = decodeItems(ctx.quick);
    const gen = new TrafficGenerator(benchTraffic());
    const messages = new Array<Uint8Array>(n);
    // Generation and encoding are timed apart, in chunks (a clock read per event would cost more
    // than the event): setup figures for the report, not part of the run.
    const chunk = new Array<GenEvent>(CHUNK);
    let genNs = 0n;
    let encNs = 0n;
    let bytes = 0;
    for (let at = 0; at < n; at += CHUNK) {
      const m = Math.min(CHUNK, n - at);
      const t0 = process.hrtime.bigint();
      for (let i = 0; i < m; i++) chunk[i] = gen.nextEvent();
      const t1 = process.hrtime.bigint();
      for (let i = 0; i < m; i++) {
        const b = encodeProto(chunk[i] as GenEvent);
        messages[at + i] = b;
        bytes += b.length;
      }
      encNs += process.hrtime.bigint() - t1;
      genNs += t1 - t0;
    }
    return { messages, bytes, genMs: Number(genNs) / 1e6, encodeMs: Number(encNs) / 1e6, users: gen.stats.users };
  },

  async run(state) {
    const msgs = state.messages;
    const n = msgs.length;
    let sum = 0;
    for (let i = 0; i < n; i++) {
      const e = crmstream.v1.Event.decode(msgs[i] as Uint8Array);
      // A number and a string of every event, so no field decode can be skipped as unused.
      sum += e.amount + e.event_id.length + ((e.ts as number) % 1024);
    }
    consume(sum);
    return n;
  },

  notes(s) {
    const n = s.messages.length;
    return `${n.toLocaleString('en-US')} events of ${s.users.toLocaleString('en-US')} users (population 1,000,000), `
      + `avg ${(s.bytes / n).toFixed(1)} B; setup: generator ${Math.round(n / (s.genMs / 1000)).toLocaleString('en-US')} ev/s, `
      + `encode ${Math.round(n / (s.encodeMs / 1000)).toLocaleString('en-US')} ev/s`;
  },
};

// ---------------------------------------------------------------------------------------------------
// Micro-suite

const SAMPLE = 4096; // distinct inputs cycled through, so no case measures one constant input

/** One event at a time: protobuf decode vs JSON.parse of the same event vs encode vs generation. */
export async function runDecodeMicroSuite(quick: boolean): Promise<MicroSummary> {
  const sampleGen = new TrafficGenerator(benchTraffic());
  const events = sampleGen.take(SAMPLE);
  const protos = events.map(encodeProto);
  const lines = events.map(toJsonLine);
  const gen = new TrafficGenerator(benchTraffic());
  let i = 0;
  let j = 0;
  let k = 0;
  return runMicroSuite('decode one event', [
    {
      name: 'protobuf decode Event',
      fn: () => {
        const e = crmstream.v1.Event.decode(protos[i++ & (SAMPLE - 1)] as Uint8Array);
        return e.amount + e.event_id.length;
      },
    },
    {
      name: 'JSON.parse Event line',
      fn: () => {
        const e = JSON.parse(lines[j++ & (SAMPLE - 1)] as string) as { amount: number; event_id: string };
        return e.amount + e.event_id.length;
      },
    },
    {
      name: 'protobuf encode Event',
      fn: () => encodeProto(events[k++ & (SAMPLE - 1)]!).length,
    },
    {
      name: 'generator nextEvent',
      fn: () => {
        const e = gen.nextEvent();
        return e.ts + e.event_id.length;
      },
    },
  ], { quick });
}

if (process.argv[1] !== undefined && import.meta.url === pathToFileURL(process.argv[1]).href) {
  await runDecodeMicroSuite(process.argv.includes('--quick'));
}
