/**
 * Compact binary encoding for per-user state and checkpoint records: LEB128 varints for counts and
 * millisecond timestamps (6 bytes for a 2020s timestamp, against 8 for a double, 20+ as JSON text),
 * doubles only where fractions occur (money), length-prefixed UTF-8 strings. No JSON on the hot path.
 *
 * One `BinWriter` is reused for every record of a checkpoint: `reset()`, write, `take()` copies out
 * exactly the written bytes.
 */

const utf8 = new TextEncoder();
const utf8d = new TextDecoder('utf-8', { fatal: true });

export class BinWriter {
  private buf: Uint8Array;
  private view: DataView;
  pos = 0;

  constructor(initial = 256) {
    this.buf = new Uint8Array(initial);
    this.view = new DataView(this.buf.buffer);
  }

  reset(): this {
    this.pos = 0;
    return this;
  }

  private ensure(n: number): void {
    if (this.pos + n <= this.buf.length) return;
    let size = this.buf.length * 2;
    while (size < this.pos + n) size *= 2;
    const next = new Uint8Array(size);
    next.set(this.buf.subarray(0, this.pos));
    this.buf = next;
    this.view = new DataView(next.buffer);
  }

  /** Unsigned varint for integers in [0, 2^53). */
  uint(v: number): this {
    this.ensure(8);
    // Arithmetic instead of bit ops: bit ops truncate to 32 bits and timestamps need 41+.
    while (v >= 0x80) {
      this.buf[this.pos++] = (v % 0x80) | 0x80;
      v = Math.floor(v / 0x80);
    }
    this.buf[this.pos++] = v;
    return this;
  }

  /**
   * Optional timestamp / non-negative integer: NaN (absent) is stored as 0 and real values as v+1,
   * so "no purchase yet" costs one byte.
   */
  optUint(v: number): this {
    return this.uint(Number.isNaN(v) ? 0 : v + 1);
  }

  f64(v: number): this {
    this.ensure(8);
    this.view.setFloat64(this.pos, v, true);
    this.pos += 8;
    return this;
  }

  u8(v: number): this {
    this.ensure(1);
    this.buf[this.pos++] = v;
    return this;
  }

  str(s: string): this {
    // Worst case 3 bytes per UTF-16 unit; encodeInto writes in place, no intermediate buffer.
    this.ensure(5 + s.length * 3);
    const lenPos = this.pos;
    // Reserve a fixed 1-byte length for short strings, the common case; fall back for long ones.
    if (s.length < 43) {
      // ASCII (ids, platforms, channels) is copied unit by unit: encodeInto needs a subarray view
      // per call, an allocation that costs more than the copy of a short string.
      const buf = this.buf;
      let p = lenPos + 1;
      let k = 0;
      for (; k < s.length; k++) {
        const c = s.charCodeAt(k);
        if (c >= 0x80) break;
        buf[p++] = c;
      }
      if (k === s.length) {
        buf[lenPos] = k;
        this.pos = p;
        return this;
      }
      const { written } = utf8.encodeInto(s, this.buf.subarray(lenPos + 1));
      this.buf[lenPos] = written;
      this.pos = lenPos + 1 + written;
      return this;
    }
    const bytes = utf8.encode(s);
    this.uint(bytes.length);
    this.ensure(bytes.length);
    this.buf.set(bytes, this.pos);
    this.pos += bytes.length;
    return this;
  }

  /**
   * Starts a length-prefixed section written in place (no scratch copy): reserves one length byte
   * and returns its position for endLen().
   */
  beginLen(): number {
    this.ensure(1);
    return this.pos++;
  }

  /** Ends the section begun at `at`: writes its length as a varint, moving the bytes if it needs more than one. */
  endLen(at: number): this {
    const len = this.pos - at - 1;
    if (len < 0x80) {
      this.buf[at] = len;
      return this;
    }
    let extra = 0;
    for (let v = len; v >= 0x80; v = Math.floor(v / 0x80)) extra++;
    this.ensure(extra);
    this.buf.copyWithin(at + 1 + extra, at + 1, this.pos);
    const end = this.pos + extra;
    this.pos = at;
    this.uint(len);
    this.pos = end;
    return this;
  }

  bytes(b: Uint8Array): this {
    this.uint(b.length);
    this.ensure(b.length);
    this.buf.set(b, this.pos);
    this.pos += b.length;
    return this;
  }

  /** Appends bytes as they are (no length prefix). */
  raw(b: Uint8Array): this {
    this.ensure(b.length);
    this.buf.set(b, this.pos);
    this.pos += b.length;
    return this;
  }

  /** The bytes written since reset(), without copying: valid until the next write or reset. */
  written(): Uint8Array {
    return this.buf.subarray(0, this.pos);
  }

  /** A copy of the bytes written since reset(). */
  take(): Uint8Array {
    return this.buf.slice(0, this.pos);
  }
}

export class BinReader {
  private buf: Uint8Array;
  private view: DataView;
  pos = 0;
  end = 0;

  constructor(buf: Uint8Array = new Uint8Array(0)) {
    this.buf = buf;
    this.view = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
    this.end = buf.length;
  }

  /** Points the reader at another buffer (reuse, no allocation). */
  reset(buf: Uint8Array): this {
    this.buf = buf;
    this.view = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
    this.pos = 0;
    this.end = buf.length;
    return this;
  }

  get done(): boolean {
    return this.pos >= this.end;
  }

  uint(): number {
    let result = 0;
    let mul = 1;
    for (;;) {
      if (this.pos >= this.end) throw new RangeError('varint past end of record');
      const b = this.buf[this.pos++]!;
      result += (b & 0x7f) * mul;
      if (b < 0x80) return result;
      mul *= 0x80;
      if (mul > 2 ** 56) throw new RangeError('varint too long');
    }
  }

  optUint(): number {
    const v = this.uint();
    return v === 0 ? Number.NaN : v - 1;
  }

  f64(): number {
    if (this.pos + 8 > this.end) throw new RangeError('double past end of record');
    const v = this.view.getFloat64(this.pos, true);
    this.pos += 8;
    return v;
  }

  u8(): number {
    if (this.pos >= this.end) throw new RangeError('byte past end of record');
    return this.buf[this.pos++]!;
  }

  str(): string {
    const len = this.uint();
    if (this.pos + len > this.end) throw new RangeError('string past end of record');
    const s = len === 0 ? '' : utf8d.decode(this.buf.subarray(this.pos, this.pos + len));
    this.pos += len;
    return s;
  }

  bytes(): Uint8Array {
    const len = this.uint();
    if (this.pos + len > this.end) throw new RangeError('bytes past end of record');
    const b = this.buf.slice(this.pos, this.pos + len);
    this.pos += len;
    return b;
  }

  /** Moves the end of the readable region (for length-delimited sections). */
  limit(end: number): void {
    this.end = end;
  }
}
