import { readFileSync } from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { crmstream } from '../../api/proto/gen/crmstream.js';
import { appendJsonEvent, appendProtoBatch, appendProtoEvent } from '../../engine/codec.js';
import { EventColumns } from '../../engine/batch.js';
import { Engine } from '../../engine/engine.js';
import { DAY, T0, tempDir } from '../helpers.js';

/**
 * Bad input through the whole engine: every kind of bad record is rejected with its reason code,
 * counted, and written to the dead-letter file, while the valid events of the same batch are
 * processed.
 */

const ok = (id: string, ts: number, extra: Record<string, unknown> = {}): string =>
  JSON.stringify({ event_id: id, type: 'visit', anonymous_id: 'dev-ok', ts, ...extra });

describe('bad input', () => {
  it('rejects each kind with its code, counts it, dead-letters it, and processes the valid events beside it', async () => {
    const { dir, cleanup } = tempDir();
    try {
      const engine = await Engine.create({ dataDir: dir, validation: { maxEventBytes: 1024 } }, { tickMs: 1 });
      const b = new EventColumns(64);
      const tz = 'UTC';
      // Valid events (interleaved with the bad ones below).
      appendJsonEvent(b, ok('v1', T0 + 10 * DAY), 'in:1', tz);
      // Malformed protobuf: a length-delimited field running past the end, and random bytes.
      appendProtoEvent(b, new Uint8Array([0x0a, 0x40, 0x61, 0x62]), 'in:2');
      appendProtoBatch(b, new Uint8Array([0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f, 0x01]), 'in:3');
      // Malformed JSON.
      appendJsonEvent(b, '{"event_id": "x1", "type": "visit",', 'in:4', tz);
      appendJsonEvent(b, '[1,2,3]', 'in:5', tz);
      // Missing ids.
      appendJsonEvent(b, JSON.stringify({ event_id: 'm1', type: 'visit', ts: T0 + 10 * DAY }), 'in:6', tz);
      appendJsonEvent(b, JSON.stringify({ type: 'visit', user_id: 'u', ts: T0 + 10 * DAY }), 'in:7', tz);
      // Non-numeric and absurd timestamps.
      appendJsonEvent(b, ok('t1', 0, { ts: 'yesterday-ish' }), 'in:8', tz);
      appendJsonEvent(b, ok('t2', 1_700_000_000), 'in:9', tz); // seconds, not ms
      appendJsonEvent(b, ok('t3', 9e15), 'in:10', tz);
      // Oversized.
      appendJsonEvent(b, ok('big', T0 + 10 * DAY, { props: { blob: 'x'.repeat(2000) } }), 'in:11', tz);
      // Unknown currency.
      appendJsonEvent(b, JSON.stringify({ event_id: 'c1', type: 'purchase', user_id: 'u1', ts: T0 + 10 * DAY, amount: 10, currency: 'XYZ' }), 'in:12', tz);
      // A second valid event after the bad ones.
      appendJsonEvent(b, JSON.stringify({ event_id: 'v2', type: 'purchase', user_id: 'u1', ts: T0 + 10 * DAY + 1, amount: 5000, order_id: 'o1' }), 'in:13', tz);
      // Later than the allowed lateness (3 days behind the watermark the valid events set).
      appendJsonEvent(b, ok('late', T0 + 6 * DAY), 'in:14', tz);
      // A valid protobuf event.
      appendProtoEvent(b, crmstream.v1.Event.encode({ event_id: 'v3', type: 'login', user_id: 'u1', anonymous_id: 'dev-ok', ts: T0 + 10 * DAY + 2 }).finish(), 'in:15');

      const r = await engine.ingestColumns(b);
      expect(r).toEqual({ accepted: 3, rejected: 12 });
      const counts = engine.rejectCounts();
      expect(counts).toMatchObject({ bad_encoding: 4, missing_id: 2, bad_timestamp: 3, too_large: 1, unknown_currency: 1, too_late: 1 });
      // The valid ones were processed: the login stitched dev-ok to u1.
      expect(engine.profile('u1')).toMatchObject({ events: 3, purchases: 1, revenue: 5000 });
      await engine.close();

      const dead = readFileSync(path.join(dir, 'deadletter.jsonl'), 'utf8').trim().split('\n').map((l) => JSON.parse(l) as { seq: number; reason: string; source: string; payload: string });
      expect(dead.map((d) => `${d.source} ${d.reason}`)).toEqual([
        'in:2 bad_encoding', 'in:3 bad_encoding', 'in:4 bad_encoding', 'in:5 bad_encoding', 'in:6 missing_id', 'in:7 missing_id',
        'in:8 bad_timestamp', 'in:9 bad_timestamp', 'in:10 bad_timestamp', 'in:11 too_large', 'in:12 unknown_currency', 'in:14 too_late',
      ]);
      // The raw input is kept (as text here), so the record can be fixed and replayed.
      expect(dead.find((d) => d.source === 'in:4')!.payload).toBe('{"event_id": "x1", "type": "visit",');
      // Counts survive a restart (they are part of the checkpoint).
      const again = await Engine.create({ dataDir: dir });
      expect(again.rejectCounts()).toEqual(counts);
      await again.close();
    } finally {
      cleanup();
    }
  });

  it('survives a stream of random garbage without throwing', async () => {
    const engine = await Engine.create({}, { tickMs: 1 });
    const b = new EventColumns(256);
    let seed = 12345;
    const rnd = (): number => ((seed = (Math.imul(seed, 1103515245) + 12345) >>> 0) / 2 ** 32);
    for (let round = 0; round < 20; round++) {
      b.reset();
      for (let k = 0; k < 200; k++) {
        const len = Math.floor(rnd() * 80);
        const bytes = new Uint8Array(len).map(() => Math.floor(rnd() * 256));
        if (k % 2 === 0) appendProtoEvent(b, bytes, 'fuzz');
        else appendJsonEvent(b, Buffer.from(bytes).toString('latin1'), 'fuzz', 'UTC');
      }
      const r = await engine.ingestColumns(b);
      expect(r.accepted + r.rejected).toBe(200);
    }
    const total = Object.values(engine.rejectCounts()).reduce((a, n) => a + n, 0);
    expect(total + engine.acceptedCount).toBe(4000);
    await engine.close();
  });
});
