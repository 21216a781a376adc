/**
 * Backfill input formats on the same events (the benchmark traffic of decode.bench.ts), all from
 * memory so the disk is not measured:
 *
 * - `backfill decode: <format> → columns`: the bytes a backfill reads, into engine batches
 *   (EventColumns of 4096 rows) — protobuf messages (appendProtoEvent), JSON lines
 *   (appendJsonEvent), and an Arrow IPC stream as `crmstream convert` writes it (apache-arrow's
 *   RecordBatchReader, then appendArrowRows: column by column, dictionaries decoded once).
 * - `backfill: <format> → engine`: the same, each batch then through the engine (memory state,
 *   as engine core): what a backfill costs end to end without the disk.
 *
 * SPEC target (issue 9): the Arrow path at least 2× the protobuf path.
 */
import { PassThrough } from 'node:stream';
import { RecordBatchReader, type RecordBatch } from 'apache-arrow';
import { EventColumns } from '../engine/batch.js';
import { appendJsonEvent, appendProtoEvent } from '../engine/codec.js';
import { Engine } from '../engine/engine.js';
import { appendArrowRows, arrowReaders, writeArrowEvents } from '../engine/sources/arrow.js';
import { TrafficGenerator, encodeProto, toJsonLine } from '../engine/sources/generator.js';
import { benchTraffic, decodeItems } from './decode.bench.js';
import { consume, type Scenario } from './harness.js';

const BATCH = 4096;

type Format = 'protobuf' | 'jsonl' | 'arrow';

interface InputState {
  readonly n: number;
  readonly protos: Uint8Array[];
  readonly lines: string[];
  /** The Arrow IPC stream of the same events (convert's layout: 64 Ki rows per record batch). */
  readonly arrow: Buffer;
  readonly bytes: Record<Format, number>;
}

/** The six scenarios share one input (generated once per size). */
const inputs = new Map<boolean, Promise<InputState>>();
function buildInputs(quick: boolean): Promise<InputState> {
  let p = inputs.get(quick);
  if (p === undefined) inputs.set(quick, (p = makeInputs(quick)));
  return p;
}

async function makeInputs(quick: boolean): Promise<InputState> {
  const n = decodeItems(quick);
  const gen = new TrafficGenerator(benchTraffic());
  const protos: Uint8Array[] = new Array(n);
  const lines: string[] = new Array(n);
  const cols: EventColumns[] = [];
  let protoBytes = 0;
  let lineBytes = 0;
  for (let at = 0; at < n; at += BATCH) {
    const b = new EventColumns(Math.min(BATCH, n - at));
    for (let i = 0; i < b.capacity; i++) {
      const e = gen.nextEvent();
      const p = encodeProto(e);
      protos[at + i] = p;
      lines[at + i] = toJsonLine(e);
      protoBytes += p.length;
      lineBytes += lines[at + i]!.length + 1;
      appendProtoEvent(b, p, 'bench');
    }
    cols.push(b);
  }
  const sink = new PassThrough();
  const chunks: Buffer[] = [];
  sink.on('data', (c: Buffer) => chunks.push(c));
  await writeArrowEvents(sink, 'stream', (emit) => {
    for (const b of cols) for (let i = 0; i < b.length; i++) emit(b, i);
  });
  const arrow = Buffer.concat(chunks);
  return { n, protos, lines, arrow, bytes: { protobuf: protoBytes, jsonl: lineBytes, arrow: arrow.length } };
}

/** Decodes every event of `format` into batches; `each` gets every full (and the last) batch. */
async function decodeAll(s: InputState, format: Format, each: (b: EventColumns) => Promise<void> | void): Promise<number> {
  const b = new EventColumns(BATCH);
  let rows = 0;
  const flush = async (): Promise<void> => {
    rows += b.length;
    await each(b);
    b.reset();
  };
  if (format === 'protobuf') {
    for (let i = 0; i < s.n; i++) {
      appendProtoEvent(b, s.protos[i]!, 'bench');
      if (b.full) await flush();
    }
  } else if (format === 'jsonl') {
    for (let i = 0; i < s.n; i++) {
      appendJsonEvent(b, s.lines[i]!, 'bench', 'UTC');
      if (b.full) await flush();
    }
  } else {
    const reader = RecordBatchReader.from(s.arrow);
    for (const rb of reader as Iterable<RecordBatch>) {
      const readers = arrowReaders(rb, 'bench');
      for (let i = 0; i < rb.numRows; ) {
        const take = Math.min(rb.numRows - i, b.capacity - b.length);
        appendArrowRows(b, rb, i, i + take, 'bench:', readers);
        i += take;
        if (b.full) await flush();
      }
    }
  }
  if (b.length > 0) await flush();
  return rows;
}

function checksum(b: EventColumns): number {
  let sum = 0;
  for (let i = 0; i < b.length; i++) sum += b.ts[i]! % 1024 + b.eventId[i]!.length + b.userId[i]!.length;
  return sum;
}

function decodeScenario(format: Format): Scenario<InputState> {
  return {
    name: `backfill decode: ${format} → columns`,
    setup: (ctx) => buildInputs(ctx.quick),
    async run(s) {
      let sum = 0;
      const rows = await decodeAll(s, format, (b) => {
        sum += checksum(b);
      });
      consume(sum);
      if (rows !== s.n) throw new Error(`${format}: ${rows} of ${s.n} rows`);
      return rows;
    },
    notes: (s) => `${s.n.toLocaleString('en-US')} events, ${(s.bytes[format] / s.n).toFixed(1)} B/event as ${format}${format === 'arrow' ? ' (IPC stream, 64 Ki rows per record batch, low-cardinality columns dictionary-encoded)' : ''}; batches of ${BATCH}`,
  };
}

function engineScenario(format: Format): Scenario<InputState> {
  return {
    name: `backfill: ${format} → engine (memory)`,
    setup: (ctx) => buildInputs(ctx.quick),
    async run(s) {
      const engine = await Engine.create({ checkpoint: { intervalMs: 1e9, idleMs: null, maxDirtyUsers: 10_000_000 } });
      const rows = await decodeAll(s, format, async (b) => {
        await engine.ingestColumns(b);
      });
      consume(engine.acceptedCount);
      if (rows !== s.n) throw new Error(`${format}: ${rows} of ${s.n} rows`);
      return rows;
    },
    notes: (s) => `${s.n.toLocaleString('en-US')} events decoded from ${format} and processed as engine core (memory state, all KPIs + built-in segments)`,
  };
}

export const arrowScenarios: readonly Scenario<InputState>[] = [
  decodeScenario('protobuf'), decodeScenario('jsonl'), decodeScenario('arrow'),
  engineScenario('protobuf'), engineScenario('jsonl'), engineScenario('arrow'),
];
