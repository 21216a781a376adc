import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { BinReader, BinWriter } from '../../state/codec.js';

/** One value written by the writer under test, read back by the reader. */
type Item =
  | { kind: 'uint'; v: number }
  | { kind: 'str'; v: string }
  | { kind: 'f64'; v: number }
  | { kind: 'section'; items: Item[] };

const leaf: fc.Arbitrary<Item> = fc.oneof(
  fc.integer({ min: 0, max: Number.MAX_SAFE_INTEGER }).map((v) => ({ kind: 'uint' as const, v })),
  // ASCII (the fast path), any Unicode, and lengths either side of the 43-unit short-string limit.
  fc.oneof(fc.string({ maxLength: 60 }), fc.string({ unit: 'grapheme', maxLength: 50 }), fc.string({ unit: 'binary', maxLength: 45 })).map((v) => ({ kind: 'str' as const, v })),
  fc.double({ noNaN: true }).map((v) => ({ kind: 'f64' as const, v })),
);
const item: fc.Arbitrary<Item> = fc.letrec<{ item: Item }>((tie) => ({
  item: fc.oneof({ depthSize: 'small' }, leaf, fc.array(tie('item'), { maxLength: 40 }).map((items) => ({ kind: 'section' as const, items }))),
})).item;

function write(w: BinWriter, it: Item): void {
  if (it.kind === 'uint') w.uint(it.v);
  else if (it.kind === 'str') w.str(it.v);
  else if (it.kind === 'f64') w.f64(it.v);
  else {
    const at = w.beginLen();
    for (const x of it.items) write(w, x);
    w.endLen(at);
  }
}

function check(r: BinReader, it: Item): void {
  if (it.kind === 'uint') expect(r.uint()).toBe(it.v);
  else if (it.kind === 'str') expect(r.str()).toBe(it.v);
  else if (it.kind === 'f64') expect(r.f64()).toBe(it.v);
  else {
    const len = r.uint();
    const end = r.pos + len;
    for (const x of it.items) check(r, x);
    expect(r.pos).toBe(end); // the length prefix covers exactly the section's bytes
  }
}

describe('BinWriter / BinReader', () => {
  it('round-trips varints, strings, doubles and nested length-prefixed sections (lengths past one varint byte move the body)', () => {
    fc.assert(
      fc.property(fc.array(item, { maxLength: 30 }), (items) => {
        const w = new BinWriter(8); // small start: every path through ensure() grows the buffer
        for (const it of items) write(w, it);
        const r = new BinReader(w.take());
        for (const it of items) check(r, it);
        expect(r.done).toBe(true);
      }),
      { numRuns: 300 },
    );
  });

  it('writes short ASCII and non-ASCII strings as the same UTF-8 bytes as TextEncoder', () => {
    for (const s of ['', 'web', 'u_123', 'é', 'a\u00ffb', '카카오', '🎉x', 'x'.repeat(42), 'y'.repeat(43)]) {
      const bytes = new TextEncoder().encode(s);
      const w = new BinWriter(4).str(s);
      const out = w.take();
      const r = new BinReader(out);
      expect(r.uint()).toBe(bytes.length);
      expect(out.subarray(r.pos)).toEqual(bytes);
    }
  });

  it('a section of 200 bytes takes a two-byte length', () => {
    const w = new BinWriter(4);
    const at = w.beginLen();
    for (let i = 0; i < 200; i++) w.u8(i);
    w.endLen(at);
    const out = w.take();
    expect(out.length).toBe(202);
    expect([out[0], out[1]]).toEqual([200 % 128 + 128, 1]);
    expect(out[2]).toBe(0);
    expect(out[201]).toBe(199);
  });
});
