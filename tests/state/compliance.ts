/**
 * The KvStore compliance suite: one contract, run against every backend (compliance.test.ts runs it
 * for MemoryStore and LevelStore in one line each, as classic-level runs abstract-level's suite).
 * A behaviour that differs between backends is a bug in one of them, so everything the engine may
 * rely on is asserted here — including the ordering of non-ASCII keys, where JavaScript string order
 * and LevelDB's UTF-8 byte order disagree.
 *
 * Errors are asserted by `code`, never by message.
 */
import fc from 'fast-check';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { cleanupAll, CrmError, type ErrorCode } from '../../engine/errors.js';
import { prefixEnd, type KvEntry, type KvStore, type Range, type WriteOp } from '../../state/store.js';

export interface MadeStore {
  /** A new, unopened store holding no data. */
  readonly store: KvStore;
  /** Removes what the store left behind (its directory); runs after the suite has closed the store. */
  readonly cleanup: () => Promise<void>;
}

const encoder = new TextEncoder();

function bytes(...values: number[]): Uint8Array {
  return Uint8Array.from(values);
}

function text(s: string): Uint8Array {
  return encoder.encode(s);
}

function put(key: string, value: Uint8Array | string): WriteOp {
  return { type: 'put', key, value: typeof value === 'string' ? text(value) : value };
}

function del(key: string): WriteOp {
  return { type: 'del', key };
}

/** Plain arrays compare the same whether a backend returns a Uint8Array or a Buffer. */
function arr(value: Uint8Array | undefined): number[] | undefined {
  return value === undefined ? undefined : Array.from(value);
}

/** LevelDB's key order: UTF-8 bytes. The reference model uses it, independently of the stores. */
function utf8Compare(a: string, b: string): number {
  return Buffer.compare(Buffer.from(a, 'utf8'), Buffer.from(b, 'utf8'));
}

function sortedUtf8(keys: Iterable<string>): string[] {
  return [...keys].sort(utf8Compare);
}

async function drainBatches(store: KvStore, range: Range, batchSize?: number): Promise<KvEntry[][]> {
  const batches: KvEntry[][] = [];
  for await (const batch of store.scan(range, batchSize)) batches.push([...batch]);
  return batches;
}

/**
 * The keys of a range, read both ways — `scan` and `scanKeys` — which must agree batch for batch,
 * so every range test below also covers scanKeys.
 */
async function scanKeys(store: KvStore, range: Range, batchSize?: number): Promise<string[]> {
  const viaScan = (await drainBatches(store, range, batchSize)).map((b) => b.map((e) => e.key));
  const viaKeys: string[][] = [];
  for await (const batch of store.scanKeys(range, batchSize)) viaKeys.push([...batch]);
  expect(viaKeys).toEqual(viaScan);
  return viaScan.flat();
}

async function scanEntries(store: KvStore, range: Range, batchSize?: number): Promise<Array<[string, number[]]>> {
  return (await drainBatches(store, range, batchSize)).flat().map((e) => [e.key, Array.from(e.value)]);
}

/** Asserts that `run` throws or rejects with a CrmError carrying `code`. */
async function expectCode(run: () => unknown, code: ErrorCode): Promise<void> {
  let caught: unknown = undefined;
  try {
    await run();
  } catch (err) {
    caught = err;
  }
  expect(caught, `expected a CrmError ${code}`).toBeInstanceOf(CrmError);
  expect((caught as CrmError).code).toBe(code);
}

function pad(i: number, width = 6): string {
  return String(i).padStart(width, '0');
}

/**
 * Registers the suite for one backend. `make` is called before every test and must return a fresh,
 * unopened store; the suite opens it, closes it after the test, then calls `cleanup`.
 */
export function runStoreCompliance(name: string, make: () => Promise<MadeStore>): void {
  describe(`KvStore compliance: ${name}`, () => {
    let store: KvStore;
    let cleanup: () => Promise<void>;

    beforeEach(async () => {
      const made = await make();
      store = made.store;
      cleanup = made.cleanup;
      await store.open();
    });

    afterEach(async () => {
      await cleanupAll([() => store.close(), () => cleanup()]);
    });

    describe('point reads and writes', () => {
      it('reports its kind', () => {
        expect(store.kind).toBe(name);
      });

      it('puts, gets (sync and async) and deletes', async () => {
        expect(store.getSync('a')).toBeUndefined();
        expect(await store.get('a')).toBeUndefined();
        await store.write([put('a', bytes(1, 2, 3))]);
        expect(arr(store.getSync('a'))).toEqual([1, 2, 3]);
        expect(arr(await store.get('a'))).toEqual([1, 2, 3]);
        await store.write([del('a')]);
        expect(store.getSync('a')).toBeUndefined();
        expect(await store.get('a')).toBeUndefined();
      });

      it('deleting an absent key is a no-op', async () => {
        await store.write([del('nope')]);
        expect(store.getSync('nope')).toBeUndefined();
        expect(await scanKeys(store, {})).toEqual([]);
      });

      it('overwrites', async () => {
        await store.write([put('k', 'one')]);
        await store.write([put('k', 'two')]);
        expect(arr(store.getSync('k'))).toEqual(Array.from(text('two')));
        expect(await scanKeys(store, {})).toEqual(['k']);
      });

      it('applies the ops of one batch in order: a later op on the same key wins', async () => {
        await store.write([put('x', 'first'), del('x'), put('x', 'second'), put('y', 'kept'), put('z', 'gone'), del('z')]);
        expect(arr(store.getSync('x'))).toEqual(Array.from(text('second')));
        expect(arr(store.getSync('y'))).toEqual(Array.from(text('kept')));
        expect(store.getSync('z')).toBeUndefined();
        expect(await scanKeys(store, {})).toEqual(['x', 'y']);
      });

      it('accepts an empty batch and changes nothing', async () => {
        await store.write([put('a', 'v')]);
        await store.write([]);
        expect(await scanEntries(store, {})).toEqual([['a', Array.from(text('v'))]]);
      });

      it('applies writes issued without awaiting in call order', async () => {
        const pending = [
          store.write([put('k', 'one')]),
          store.write([put('k', 'two'), put('m', 'x')]),
          store.clearRange({ gte: 'm', lt: 'n' }),
          store.write([put('k', 'three')]),
          store.write([put('m', 'again')]),
        ];
        await Promise.all(pending);
        expect(arr(store.getSync('k'))).toEqual(Array.from(text('three')));
        expect(arr(store.getSync('m'))).toEqual(Array.from(text('again')));
      });

      it('open() is idempotent and data survives close() and open()', async () => {
        await store.open();
        await store.write([put('keep', bytes(9))]);
        await store.close();
        await store.open();
        await store.open();
        expect(arr(store.getSync('keep'))).toEqual([9]);
      });
    });

    describe('bytes', () => {
      it('round-trips binary values with zero bytes exactly, including the empty value', async () => {
        const all = new Uint8Array(256);
        for (let i = 0; i < 256; i++) all[i] = i;
        const values: Array<[string, Uint8Array]> = [
          ['v/empty', new Uint8Array(0)],
          ['v/zero', bytes(0)],
          ['v/zeros', new Uint8Array(1000)],
          ['v/mixed', bytes(0, 255, 0, 1, 0)],
          ['v/all', all],
          ['v/big', Uint8Array.from({ length: 200_000 }, (_, i) => (i * 31) & 0xff)],
        ];
        await store.write(values.map(([k, v]) => put(k, v)));
        for (const [k, v] of values) {
          expect(arr(store.getSync(k)), k).toEqual(Array.from(v));
          expect(arr(await store.get(k)), k).toEqual(Array.from(v));
        }
        const scanned = await scanEntries(store, { gte: 'v/', lt: prefixEnd('v/') });
        expect(scanned).toEqual(sortedUtf8(values.map(([k]) => k)).map((k) => [k, Array.from(values.find(([kk]) => kk === k)![1])]));
      });

      it('copies written bytes: mutating the input afterwards changes nothing stored', async () => {
        const value = bytes(1, 2, 3);
        const ops = [put('a', value)];
        const written = store.write(ops);
        // Mutate before the write has even resolved: the store took its copy at the call.
        value.fill(9);
        (ops as WriteOp[]).length = 0;
        await written;
        expect(arr(store.getSync('a'))).toEqual([1, 2, 3]);
        value.fill(7);
        expect(arr(await store.get('a'))).toEqual([1, 2, 3]);
      });

      it('copies written bytes even from a Buffer view into a larger allocation', async () => {
        const backing = Buffer.from([5, 6, 7, 8, 9]);
        const view = backing.subarray(1, 3);
        await store.write([put('b', view)]);
        backing.fill(0);
        expect(arr(store.getSync('b'))).toEqual([6, 7]);
      });

      it('returns bytes the caller owns: mutating a read value changes nothing stored', async () => {
        await store.write([put('a', bytes(1, 2, 3))]);
        store.getSync('a')!.fill(0);
        (await store.get('a'))!.fill(0);
        for await (const batch of store.scan({})) for (const entry of batch) (entry.value as Uint8Array).fill(0);
        expect(arr(store.getSync('a'))).toEqual([1, 2, 3]);
      });
    });

    describe('range scans', () => {
      const keys = ['a', 'b', 'c', 'd', 'e', 'f'];

      beforeEach(async () => {
        await store.write(keys.map((k) => put(k, k)));
      });

      it('scans everything in key order', async () => {
        expect(await scanKeys(store, {})).toEqual(keys);
        expect(await scanEntries(store, {})).toEqual(keys.map((k) => [k, Array.from(text(k))]));
      });

      it('honours gte (inclusive) and lt (exclusive), present or not', async () => {
        expect(await scanKeys(store, { gte: 'b', lt: 'e' })).toEqual(['b', 'c', 'd']);
        expect(await scanKeys(store, { gte: 'bb', lt: 'dd' })).toEqual(['c', 'd']);
        expect(await scanKeys(store, { gte: 'c' })).toEqual(['c', 'd', 'e', 'f']);
        expect(await scanKeys(store, { lt: 'c' })).toEqual(['a', 'b']);
        expect(await scanKeys(store, { gte: '0', lt: 'z' })).toEqual(keys);
        expect(await scanKeys(store, { gte: 'g' })).toEqual([]);
        expect(await scanKeys(store, { lt: 'a' })).toEqual([]);
      });

      it('yields nothing for empty and inverted ranges', async () => {
        expect(await scanKeys(store, { gte: 'c', lt: 'c' })).toEqual([]);
        expect(await scanKeys(store, { gte: 'e', lt: 'b' })).toEqual([]);
        expect(await drainBatches(store, { gte: 'x', lt: 'y' })).toEqual([]);
      });

      it('honours limit, in both directions', async () => {
        expect(await scanKeys(store, { limit: 2 })).toEqual(['a', 'b']);
        expect(await scanKeys(store, { gte: 'b', limit: 3 })).toEqual(['b', 'c', 'd']);
        expect(await scanKeys(store, { reverse: true, limit: 2 })).toEqual(['f', 'e']);
        expect(await scanKeys(store, { lt: 'e', reverse: true, limit: 2 })).toEqual(['d', 'c']);
        expect(await scanKeys(store, { limit: 100 })).toEqual(keys);
        expect(await scanKeys(store, { limit: 0 })).toEqual([]);
      });

      it('scans in reverse', async () => {
        expect(await scanKeys(store, { reverse: true })).toEqual([...keys].reverse());
        expect(await scanKeys(store, { gte: 'b', lt: 'e', reverse: true })).toEqual(['d', 'c', 'b']);
      });

      it('rejects a batchSize that is not a positive integer', async () => {
        await expectCode(() => drainBatches(store, {}, 0), 'CONFIG_INVALID');
        await expectCode(() => drainBatches(store, {}, 1.5), 'CONFIG_INVALID');
      });
    });

    describe('scan batches', () => {
      async function fill(n: number): Promise<void> {
        const ops: WriteOp[] = [];
        for (let i = 0; i < n; i++) ops.push(put(`n/${pad(i)}`, bytes(i & 0xff, i >> 8)));
        await store.write(ops);
      }

      function sizes(batches: KvEntry[][]): number[] {
        return batches.map((b) => b.length);
      }

      it('yields full batches and a partial last one', async () => {
        await fill(2500);
        const batches = await drainBatches(store, {}, 1000);
        expect(sizes(batches)).toEqual([1000, 1000, 500]);
        expect(batches.flat().map((e) => e.key)).toEqual(Array.from({ length: 2500 }, (_, i) => `n/${pad(i)}`));
        expect(sizes(await drainBatches(store, { reverse: true }, 1000))).toEqual([1000, 1000, 500]);
        expect(sizes(await drainBatches(store, {}))).toEqual([1024, 1024, 452]);
        expect(sizes(await drainBatches(store, { limit: 1500 }, 1000))).toEqual([1000, 500]);
        expect(sizes(await drainBatches(store, { limit: 2000 }, 1000))).toEqual([1000, 1000]);
        expect(sizes(await drainBatches(store, { gte: `n/${pad(500)}` }, 1000))).toEqual([1000, 1000]);
        expect(sizes(await drainBatches(store, { gte: `n/${pad(10)}`, lt: `n/${pad(13)}` }, 1))).toEqual([1, 1, 1]);
      });

      it('yields no trailing empty batch when the range is a multiple of batchSize', async () => {
        await fill(2000);
        expect(sizes(await drainBatches(store, {}, 1000))).toEqual([1000, 1000]);
        expect(sizes(await drainBatches(store, { reverse: true }, 500))).toEqual([500, 500, 500, 500]);
      });

      it('fills batches of large values too', async () => {
        const value = new Uint8Array(64 * 1024).fill(3);
        await store.write(Array.from({ length: 50 }, (_, i) => put(`big/${pad(i)}`, value)));
        expect(sizes(await drainBatches(store, {}, 20))).toEqual([20, 20, 10]);
      });

      it('lets the consumer stop early', async () => {
        await fill(3000);
        let seen = 0;
        for await (const batch of store.scan({}, 100)) {
          seen += batch.length;
          if (seen >= 300) break;
        }
        expect(seen).toBe(300);
        // The store is still fully usable after an abandoned scan.
        await store.write([put('after', 'x')]);
        expect((await scanKeys(store, {})).length).toBe(3001);
      });
    });

    describe('snapshots', () => {
      it('a scan sees the store as it was at the call, not later writes', async () => {
        await store.write([put('a', '1'), put('b', '1'), put('c', '1')]);
        const scan = store.scan({}, 1);
        // Written after the call but before the first batch is pulled.
        await store.write([put('a', '2'), del('b'), put('bb', 'new')]);
        const seen: Array<[string, string]> = [];
        for await (const batch of scan) {
          for (const e of batch) seen.push([e.key, Buffer.from(e.value).toString()]);
          // And more writes between batches.
          await store.write([put('d', 'late'), del('c')]);
        }
        expect(seen).toEqual([
          ['a', '1'],
          ['b', '1'],
          ['c', '1'],
        ]);
        expect(await scanKeys(store, {})).toEqual(['a', 'bb', 'd']);
      });

      it('keeps many concurrent snapshots consistent through heavy rewrites', async () => {
        // Enough keys, inserts and deletes to reorganise any internal structure several times.
        const model = new Map<string, string>();
        const first: WriteOp[] = [];
        for (let i = 0; i < 4000; i += 2) {
          first.push(put(`s/${pad(i)}`, `v${i}`));
          model.set(`s/${pad(i)}`, `v${i}`);
        }
        await store.write(first);

        type Open = { iterator: AsyncIterator<readonly KvEntry[]>; expected: Array<[string, string]>; seen: Array<[string, string]> };
        const open: Open[] = [];
        const snapshotOf = (reverse: boolean): Array<[string, string]> => {
          const entries = sortedUtf8(model.keys()).map((k): [string, string] => [k, model.get(k)!]);
          return reverse ? entries.reverse() : entries;
        };
        const start = (reverse: boolean): void => {
          open.push({
            iterator: store.scan({ gte: 's/', lt: prefixEnd('s/'), reverse }, 97)[Symbol.asyncIterator](),
            expected: snapshotOf(reverse),
            seen: [],
          });
        };
        const step = async (o: Open): Promise<void> => {
          const r = await o.iterator.next();
          if (r.done !== true) for (const e of r.value) o.seen.push([e.key, Buffer.from(e.value).toString()]);
        };

        let rng = 12345;
        const next = (n: number): number => {
          rng = (rng * 1103515245 + 12345) & 0x7fffffff;
          return rng % n;
        };
        for (let round = 0; round < 40; round++) {
          if (round % 5 === 0) start(round % 10 === 0);
          const ops: WriteOp[] = [];
          for (let j = 0; j < 150; j++) {
            const key = `s/${pad(next(6000))}`;
            if (next(3) === 0) {
              ops.push(del(key));
              model.delete(key);
            } else {
              ops.push(put(key, `r${round}`));
              model.set(key, `r${round}`);
            }
          }
          await store.write(ops);
          for (const o of open) await step(o);
        }
        for (const o of open) {
          for (;;) {
            const before = o.seen.length;
            await step(o);
            if (o.seen.length === before) break;
          }
          expect(o.seen).toEqual(o.expected);
        }
        expect(await scanEntries(store, { gte: 's/', lt: prefixEnd('s/') })).toEqual(
          snapshotOf(false).map(([k, v]) => [k, Array.from(text(v))]),
        );
      });
    });

    describe('key order and prefixEnd', () => {
      it('orders keys by UTF-8 bytes, as LevelDB does', async () => {
        // U+E000..U+FFFF sort above U+D7FF but below astral characters (emoji) in UTF-8, unlike
        // JavaScript's UTF-16 `<`, which puts emoji (surrogates D800–DFFF) before U+E000.
        const keys = ['z', '가', '한', '\uD7FF', '\uE000', '\uFFFD', '😀', '🏿', '𝄞', 'a😀', 'a\uFFFD', 'a', '\u0001', '~'];
        await store.write(keys.map((k) => put(k, k)));
        const expected = sortedUtf8(keys);
        expect(expected.indexOf('\uFFFD')).toBeLessThan(expected.indexOf('😀'));
        expect(await scanKeys(store, {})).toEqual(expected);
        expect(await scanKeys(store, { reverse: true })).toEqual([...expected].reverse());
        expect(await scanKeys(store, { gte: '\uE000', lt: '😁' })).toEqual(expected.filter((k) => utf8Compare(k, '\uE000') >= 0 && utf8Compare(k, '😁') < 0));
      });

      it('prefixEnd bounds exactly the keys under a prefix, whatever follows the prefix', async () => {
        const under = ['p/', 'p/a', 'p/가', 'p/한국', 'p/😀', 'p/😀/x', 'p/\uE000', 'p/\uFFFD', 'p/\uFFFF', 'p/\u0000', 'p//'];
        const outside = ['p', 'p.', 'p0', 'p0/a', 'o', 'q', 'P/a', 'p\uFFFF'];
        await store.write([...under, ...outside].map((k) => put(k, k)));
        expect(prefixEnd('p/')).toBe('p0');
        expect(await scanKeys(store, { gte: 'p/', lt: prefixEnd('p/') })).toEqual(sortedUtf8(under));
        expect(await scanKeys(store, { gte: 'p/', lt: prefixEnd('p/'), reverse: true })).toEqual(sortedUtf8(under).reverse());
      });

      it('prefixEnd works for prefixes that end in non-ASCII characters', async () => {
        const cases: Array<{ prefix: string; under: string[]; outside: string[] }> = [
          { prefix: '사용자', under: ['사용자', '사용자/1', '사용자😀', '사용자\uFFFD', '사용자가'], outside: ['사용잒', '사용잒/1', '사용', '사용잔'] },
          { prefix: 'e/😀', under: ['e/😀', 'e/😀/1', 'e/😀😀', 'e/😀\uFFFF'], outside: ['e/😁', 'e/😁/1', 'e/😃', 'e/\uFFFD', 'e/'] },
        ];
        for (const { prefix, under, outside } of cases) {
          await store.write([...under, ...outside].map((k) => put(k, k)));
          expect(await scanKeys(store, { gte: prefix, lt: prefixEnd(prefix) }), prefix).toEqual(sortedUtf8(under));
          await store.clearRange({ gte: prefix, lt: prefixEnd(prefix) });
          for (const k of under) expect(store.getSync(k), k).toBeUndefined();
          for (const k of outside) expect(arr(store.getSync(k)), k).toEqual(Array.from(text(k)));
        }
      });
    });

    describe('clearRange', () => {
      it('deletes exactly [gte, lt)', async () => {
        await store.write(['a', 'b', 'c', 'cc', 'd', 'e'].map((k) => put(k, k)));
        await store.clearRange({ gte: 'b', lt: 'd' });
        expect(await scanKeys(store, {})).toEqual(['a', 'd', 'e']);
        expect(store.getSync('b')).toBeUndefined();
        expect(store.getSync('cc')).toBeUndefined();
      });

      it('is a no-op on empty and inverted ranges', async () => {
        await store.write(['a', 'b'].map((k) => put(k, k)));
        await store.clearRange({ gte: 'x', lt: 'y' });
        await store.clearRange({ gte: 'b', lt: 'b' });
        await store.clearRange({ gte: 'b', lt: 'a' });
        expect(await scanKeys(store, {})).toEqual(['a', 'b']);
      });

      it('clears a large prefix and leaves its neighbours', async () => {
        const ops: WriteOp[] = [put('t', 'before'), put('t0', 'after')];
        for (let i = 0; i < 5000; i++) ops.push(put(`t/${pad(i)}`, bytes(i & 0xff)));
        await store.write(ops);
        await store.clearRange({ gte: 't/', lt: prefixEnd('t/') });
        expect(await scanKeys(store, {})).toEqual(['t', 't0']);
      });

      it('keeps scans started before it intact', async () => {
        await store.write(['a', 'b', 'c'].map((k) => put(k, k)));
        const scan = store.scan({});
        await store.clearRange({ gte: 'a', lt: 'z' });
        expect((await (async () => {
          const keys: string[] = [];
          for await (const batch of scan) for (const e of batch) keys.push(e.key);
          return keys;
        })())).toEqual(['a', 'b', 'c']);
        expect(await scanKeys(store, {})).toEqual([]);
      });
    });

    describe('closed store', () => {
      it('throws STATE_CLOSED from every method after close(); close() is idempotent', async () => {
        await store.write([put('a', 'v')]);
        await store.close();
        await store.close();
        await expectCode(() => store.getSync('a'), 'STATE_CLOSED');
        expect(() => store.getSync('a')).toThrow(CrmError);
        await expectCode(() => store.get('a'), 'STATE_CLOSED');
        await expectCode(() => store.write([put('b', 'v')]), 'STATE_CLOSED');
        await expectCode(() => store.write([]), 'STATE_CLOSED');
        await expectCode(() => drainBatches(store, {}), 'STATE_CLOSED');
        await expectCode(async () => {
          for await (const _ of store.scanKeys({})) break;
        }, 'STATE_CLOSED');
        await expectCode(() => store.clearRange({ gte: 'a', lt: 'z' }), 'STATE_CLOSED');
        await store.open();
        expect(arr(store.getSync('a'))).toEqual(Array.from(text('v')));
      });

      it('throws STATE_CLOSED before the first open()', async () => {
        const fresh = await make();
        try {
          await expectCode(() => fresh.store.getSync('a'), 'STATE_CLOSED');
          await expectCode(() => fresh.store.write([put('a', 'v')]), 'STATE_CLOSED');
          await expectCode(() => drainBatches(fresh.store, {}), 'STATE_CLOSED');
        } finally {
          await cleanupAll([() => fresh.store.close(), () => fresh.cleanup()]);
        }
      });

      it('fails a scan in progress with STATE_CLOSED once the store is closed', async () => {
        await store.write(['a', 'b', 'c'].map((k) => put(k, k)));
        const iterator = store.scan({}, 1)[Symbol.asyncIterator]();
        const first = await iterator.next();
        expect(first.done).toBe(false);
        await store.close();
        await expectCode(() => iterator.next(), 'STATE_CLOSED');
      });

      it('completes writes issued before close()', async () => {
        const written = store.write([put('a', 'v')]);
        const closed = store.close();
        await Promise.all([written, closed]);
        await store.open();
        expect(arr(store.getSync('a'))).toEqual(Array.from(text('v')));
      });
    });

    describe('scale', () => {
      it('keeps 100k random keys ordered through inserts and deletes', { timeout: 60_000 }, async () => {
        let rng = 987654321;
        const next = (): number => {
          rng = (rng * 1103515245 + 12345) & 0x7fffffff;
          return rng;
        };
        const model = new Set<string>();
        const value = bytes(1);
        for (let b = 0; b < 10; b++) {
          const ops: WriteOp[] = [];
          for (let i = 0; i < 10_000; i++) {
            const key = `u/${next().toString(36)}`;
            ops.push(put(key, value));
            model.add(key);
          }
          await store.write(ops);
        }
        const expected = sortedUtf8(model);
        expect(await scanKeys(store, {}, 4096)).toEqual(expected);
        // Delete ~90% (drains most internal blocks) and check again, from both ends.
        const doomed = expected.filter(() => next() % 10 !== 0);
        await store.write(doomed.map((k) => del(k)));
        for (const k of doomed) model.delete(k);
        const left = sortedUtf8(model);
        expect(await scanKeys(store, {}, 4096)).toEqual(left);
        expect(await scanKeys(store, { reverse: true }, 4096)).toEqual([...left].reverse());
        for (const k of left.slice(0, 100)) expect(arr(store.getSync(k))).toEqual([1]);
        for (const k of doomed.slice(0, 100)) expect(store.getSync(k)).toBeUndefined();
      });
    });

    describe('against a reference model (property)', () => {
      // A small alphabet makes collisions (overwrites, deletes of live keys) likely, and mixes
      // characters whose UTF-16 and UTF-8 orders differ.
      const keyArb = fc
        .array(fc.constantFrom('a', 'b', 'z', '/', '\u0000', '가', '한', '\uE000', '\uFFFD', '😀', '🏿'), { minLength: 1, maxLength: 4 })
        .map((units) => units.join(''));
      const opArb: fc.Arbitrary<WriteOp> = fc.oneof(
        fc.record({ type: fc.constant('put' as const), key: keyArb, value: fc.uint8Array({ maxLength: 6 }) }),
        fc.record({ type: fc.constant('del' as const), key: keyArb }),
      );
      type Step =
        | { readonly kind: 'write'; readonly ops: WriteOp[] }
        | { readonly kind: 'clear'; readonly gte: string; readonly lt: string }
        | { readonly kind: 'scanStart'; readonly range: Range; readonly batchSize: number }
        | { readonly kind: 'scanNext'; readonly which: number };
      const rangeArb: fc.Arbitrary<Range> = fc.record(
        { gte: keyArb, lt: keyArb, limit: fc.integer({ min: 0, max: 8 }), reverse: fc.boolean() },
        { requiredKeys: ['reverse'] },
      );
      const stepArb: fc.Arbitrary<Step> = fc.oneof(
        { weight: 6, arbitrary: fc.array(opArb, { maxLength: 6 }).map((ops): Step => ({ kind: 'write', ops })) },
        { weight: 1, arbitrary: fc.tuple(keyArb, keyArb).map(([gte, lt]): Step => ({ kind: 'clear', gte, lt })) },
        {
          weight: 1,
          arbitrary: fc.tuple(rangeArb, fc.integer({ min: 1, max: 4 })).map(([range, batchSize]): Step => ({ kind: 'scanStart', range, batchSize })),
        },
        { weight: 2, arbitrary: fc.nat({ max: 7 }).map((which): Step => ({ kind: 'scanNext', which })) },
      );

      /** The model's answer to a scan: a plain sort and filter. */
      function modelScan(model: Map<string, Uint8Array>, prefix: string, range: Range): Array<[string, number[]]> {
        const gte = prefix + (range.gte ?? '');
        const lt = range.lt === undefined ? prefixEnd(prefix) : prefix + range.lt;
        let keys = sortedUtf8(model.keys()).filter((k) => utf8Compare(k, gte) >= 0 && utf8Compare(k, lt) < 0);
        if (range.reverse === true) keys.reverse();
        if (range.limit !== undefined) keys = keys.slice(0, range.limit);
        return keys.map((k) => [k, Array.from(model.get(k)!)]);
      }

      it('matches a Map-and-sort model for random op sequences', { timeout: 120_000 }, async () => {
        let run = 0;
        await fc.assert(
          fc.asyncProperty(fc.array(stepArb, { maxLength: 25 }), fc.array(keyArb, { maxLength: 8 }), async (steps, probes) => {
            // Each run gets its own prefix, so runs cannot see each other's data in one store.
            const prefix = `run${pad(run++)}/`;
            const model = new Map<string, Uint8Array>();
            const scans: Array<{ iterator: AsyncIterator<readonly KvEntry[]>; expected: Array<[string, number[]]>; seen: Array<[string, number[]]> }> = [];
            for (const step of steps) {
              switch (step.kind) {
                case 'write': {
                  const ops = step.ops.map((op): WriteOp => ({ ...op, key: prefix + op.key }));
                  await store.write(ops);
                  for (const op of ops) {
                    if (op.type === 'put') model.set(op.key, op.value.slice());
                    else model.delete(op.key);
                  }
                  break;
                }
                case 'clear': {
                  const gte = prefix + step.gte;
                  const lt = prefix + step.lt;
                  await store.clearRange({ gte, lt });
                  for (const k of [...model.keys()]) if (utf8Compare(k, gte) >= 0 && utf8Compare(k, lt) < 0) model.delete(k);
                  break;
                }
                case 'scanStart': {
                  const lt = step.range.lt === undefined ? prefixEnd(prefix) : prefix + step.range.lt;
                  const range: Range = { ...step.range, gte: prefix + (step.range.gte ?? ''), lt };
                  scans.push({
                    iterator: store.scan(range, step.batchSize)[Symbol.asyncIterator](),
                    expected: modelScan(model, prefix, step.range),
                    seen: [],
                  });
                  break;
                }
                case 'scanNext': {
                  const scan = scans[step.which % Math.max(scans.length, 1)];
                  if (scan === undefined) break;
                  const r = await scan.iterator.next();
                  if (r.done !== true) for (const e of r.value) scan.seen.push([e.key, Array.from(e.value)]);
                  break;
                }
              }
            }
            // Open scans still see the data as of their call.
            for (const scan of scans) {
              for (;;) {
                const r = await scan.iterator.next();
                if (r.done === true) break;
                for (const e of r.value) scan.seen.push([e.key, Array.from(e.value)]);
              }
              expect(scan.seen).toEqual(scan.expected);
            }
            // Point reads, for live and probably-absent keys alike.
            for (const key of [...model.keys(), ...probes.map((p) => prefix + p)]) {
              expect(arr(store.getSync(key))).toEqual(arr(model.get(key)));
              expect(arr(await store.get(key))).toEqual(arr(model.get(key)));
            }
            // Full scans in both directions.
            const everything = await scanEntries(store, { gte: prefix, lt: prefixEnd(prefix) }, 3);
            expect(everything).toEqual(modelScan(model, prefix, {}));
            const backwards = await scanEntries(store, { gte: prefix, lt: prefixEnd(prefix), reverse: true });
            expect(backwards).toEqual(modelScan(model, prefix, { reverse: true }));
          }),
          { numRuns: 150 },
        );
      });
    });
  });
}
