import { cpSync } from 'node:fs';
import path from 'node:path';
import fc from 'fast-check';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { CrmError } from '../../engine/errors.js';
import { CHANGELOG_NEXT_KEY, SharedProducer, openChangelogStore, type ChangelogOptions, type ChangelogStore } from '../../engine/kafka/changelog.js';
import { MockCluster } from '../../engine/kafka/mock-cluster.js';
import { LevelStore } from '../../state/level.js';
import { MemoryStore, compareKeys } from '../../state/memory.js';
import type { KvStore, WriteOp } from '../../state/store.js';
import { tempDir } from '../helpers.js';

/**
 * The Kafka changelog of a state store (engine/kafka/changelog.ts) on librdkafka's mock cluster,
 * which runs in its own process (tools/kafka-mock.c, three brokers on 127.0.0.1).
 *
 * What must hold: a fresh local copy restored from the changelog equals the store that wrote it; a
 * current copy reads nothing; a copy that is behind catches up from its own `m/changelog-next`;
 * fragments of units that never got their marker (a crash mid-unit) are never applied; and when the
 * brokers go away a unit either lands later or fails with KAFKA_ERROR, after which the store refuses
 * writes and a reopen catches up to whatever the log holds.
 *
 * Every loop is bounded; nothing asserts a duration.
 */

const enc = new TextEncoder();
const bytes = (s: string): Uint8Array => enc.encode(s);
const hex = (v: Uint8Array): string => Buffer.from(v.buffer, v.byteOffset, v.byteLength).toString('hex');

type Unit =
  | { readonly kind: 'write'; readonly ops: readonly WriteOp[] }
  | { readonly kind: 'clear'; readonly gte: string; readonly lt: string };

/** What a store should hold: the ops of the units in order. */
class Model {
  readonly map = new Map<string, Uint8Array>();
  units = 0;
  ops = 0;

  apply(u: Unit): void {
    if (u.kind === 'clear') {
      for (const k of [...this.map.keys()]) {
        if (compareKeys(k, u.gte) >= 0 && compareKeys(k, u.lt) < 0) this.map.delete(k);
      }
      this.units++;
      this.ops++;
      return;
    }
    if (u.ops.length === 0) return; // an empty write is not a unit
    for (const op of u.ops) {
      if (op.type === 'put') this.map.set(op.key, op.value);
      else this.map.delete(op.key);
    }
    this.units++;
    this.ops += u.ops.length;
  }

  clone(): Model {
    const m = new Model();
    for (const [k, v] of this.map) m.map.set(k, v);
    m.units = this.units;
    m.ops = this.ops;
    return m;
  }

  /** Messages these units put on the changelog: every op plus one marker per unit. */
  get messages(): number {
    return this.ops + this.units;
  }

  contents(): [string, string][] {
    return [...this.map].sort((a, b) => compareKeys(a[0], b[0])).map(([k, v]) => [k, hex(v)]);
  }
}

/** The store's entries but the changelog pointer, in key order, values as hex. */
async function contents(store: KvStore): Promise<[string, string][]> {
  const out: [string, string][] = [];
  for await (const batch of store.scan({})) {
    for (const e of batch) if (e.key !== CHANGELOG_NEXT_KEY) out.push([e.key, hex(e.value)]);
  }
  return out;
}

async function pointer(store: KvStore): Promise<number | null> {
  const raw = await store.get(CHANGELOG_NEXT_KEY);
  return raw === undefined ? null : Number(Buffer.from(raw).toString('utf8'));
}

/** An open copy of a store, the pointer included: a local copy that stops here. */
async function copyStore(from: KvStore): Promise<MemoryStore> {
  const to = new MemoryStore();
  await to.open();
  for await (const batch of from.scan({})) {
    await to.write(batch.map((e) => ({ type: 'put' as const, key: e.key, value: e.value })));
  }
  return to;
}

/** Runs the unit on the store and, in the same order, on the model. */
function run(store: ChangelogStore, model: Model, u: Unit): Promise<void> {
  model.apply(u);
  return u.kind === 'clear' ? store.clearRange({ gte: u.gte, lt: u.lt }) : store.write(u.ops);
}

/** Runs the units `inFlight` at a time: the store queues them, the model takes them in call order. */
async function runAll(store: ChangelogStore, model: Model, units: readonly Unit[], inFlight = 8): Promise<void> {
  for (let i = 0; i < units.length; i += inFlight) {
    await Promise.all(units.slice(i, i + inFlight).map((u) => run(store, model, u)));
  }
}

/** mulberry32: fixed-seed units for the example-based cases. */
function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/**
 * `n` units over `keys` keys under `prefix`: puts (some with an empty value, which is not a
 * tombstone), overwrites, dels, and every 25th unit a clearRange over a slice of the keys.
 */
function randomUnits(seed: number, n: number, prefix: string, keys = 150): Unit[] {
  const rand = prng(seed);
  const key = (i: number): string => `${prefix}/${String(i).padStart(4, '0')}`;
  const units: Unit[] = [];
  for (let u = 0; u < n; u++) {
    if (u % 25 === 24) {
      const a = Math.floor(rand() * keys);
      const b = a + 1 + Math.floor(rand() * 20);
      units.push({ kind: 'clear', gte: key(a), lt: key(b) });
      continue;
    }
    const ops: WriteOp[] = [];
    const count = 1 + Math.floor(rand() * 12);
    for (let i = 0; i < count; i++) {
      const k = key(Math.floor(rand() * keys));
      const r = rand();
      if (r < 0.15) ops.push({ type: 'del', key: k });
      else if (r < 0.2) ops.push({ type: 'put', key: k, value: new Uint8Array(0) });
      else ops.push({ type: 'put', key: k, value: bytes(`${u}.${i}:${'x'.repeat(Math.floor(rand() * 40))}`) });
    }
    units.push({ kind: 'write', ops });
  }
  return units;
}

let mock: MockCluster;
let producer: SharedProducer;
let dirs: { dir: string; cleanup: () => void };
const openStores: ChangelogStore[] = [];

function opts(topic: string, partition: number, extra: Partial<ChangelogOptions> = {}): ChangelogOptions {
  return { brokers: mock.bootstrap, topic, partition, deliveryTimeoutMs: 20_000, restoreIdleTimeoutMs: 20_000, ...extra };
}

/** openChangelogStore, remembering the store so afterAll closes it if a test did not. */
async function open(local: KvStore, o: ChangelogOptions, p: SharedProducer = producer): ReturnType<typeof openChangelogStore> {
  const r = await openChangelogStore(local, p, o);
  openStores.push(r.store);
  return r;
}

async function expectCode(p: Promise<unknown>, code: string): Promise<void> {
  const err = await p.then(() => null, (e: unknown) => e);
  expect(err).toBeInstanceOf(CrmError);
  expect((err as CrmError).code).toBe(code);
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

beforeAll(async () => {
  mock = await MockCluster.start({ brokers: 3 });
  dirs = tempDir('crm-changelog-');
  producer = await SharedProducer.connect(mock.bootstrap, 'changelog-test', { 'reconnect.backoff.max.ms': 500 });
}, 60_000);

afterAll(async () => {
  for (const s of openStores) await s.close().catch(() => undefined);
  await producer?.close();
  await mock?.stop();
  dirs?.cleanup();
});

describe('changelog restore (LevelDB local copies)', () => {
  const TOPIC = 'cl-restore';
  const dirA = (): string => path.join(dirs.dir, 'a');
  const dirB = (): string => path.join(dirs.dir, 'b');
  const dirC = (): string => path.join(dirs.dir, 'c');
  const model = new Model();
  let storeA: ChangelogStore;
  let pointerB = -1;

  beforeAll(async () => {
    await mock.createTopic(TOPIC, 2);
  });

  it('a fresh local copy restores to exactly what the writer holds', async () => {
    const { store, restored: first } = await open(new LevelStore(dirA()), opts(TOPIC, 0));
    storeA = store;
    expect(first).toMatchObject({ fromOffset: 0, toOffset: 0, units: 0, current: true });

    // Another task's store writes partition 1 of the same topic at the same time.
    const other = await open(new MemoryStore(), opts(TOPIC, 1));
    const otherModel = new Model();
    const units = randomUnits(1, 300, 'u');
    await Promise.all([runAll(storeA, model, units), runAll(other.store, otherModel, randomUnits(2, 60, 'u'))]);
    expect(await contents(storeA)).toEqual(model.contents());
    expect(storeA.stats()).toMatchObject({ units: model.units, messages: model.messages });

    const { store: b, restored } = await open(new LevelStore(dirB()), opts(TOPIC, 0));
    expect(restored).toMatchObject({ fromOffset: 0, toOffset: model.messages, units: model.units, ops: model.ops, discarded: 0, current: false });
    expect(await contents(b)).toEqual(await contents(storeA));
    expect(await contents(b)).toEqual(model.contents());
    expect(model.map.size).toBeGreaterThan(50);
    // Empty values are puts, not tombstones (node-rdkafka produces a zero-length value as null).
    expect(model.contents().filter(([, v]) => v === '').length).toBeGreaterThan(0);
    expect(await pointer(b)).toBe(model.messages);
    expect(await pointer(storeA)).toBe(model.messages);
    pointerB = (await pointer(b))!;
    await b.close();

    const o = await open(new MemoryStore(), opts(TOPIC, 1));
    expect(o.restored).toMatchObject({ units: otherModel.units, ops: otherModel.ops, discarded: 0 });
    expect(await contents(o.store)).toEqual(otherModel.contents());
    await o.store.close();
    await other.store.close();
  });

  it('a current local copy reads nothing', async () => {
    const before = await contents(storeA);
    await storeA.close();
    const { store, restored } = await open(new LevelStore(dirA()), opts(TOPIC, 0));
    storeA = store;
    expect(restored).toMatchObject({ fromOffset: model.messages, toOffset: model.messages, units: 0, ops: 0, current: true });
    expect(await contents(storeA)).toEqual(before);
  });

  it('a local copy that is behind catches up from its own pointer', async () => {
    cpSync(dirB(), dirC(), { recursive: true });
    const more = randomUnits(3, 80, 'u');
    const before = model.units;
    const beforeOps = model.ops;
    await runAll(storeA, model, more, 4);
    const { store: c, restored } = await open(new LevelStore(dirC()), opts(TOPIC, 0));
    expect(restored).toMatchObject({ fromOffset: pointerB, toOffset: model.messages, units: model.units - before, ops: model.ops - beforeOps, discarded: 0, current: false });
    expect(await contents(c)).toEqual(await contents(storeA));
    expect(await contents(c)).toEqual(model.contents());
    await c.close();
  });

  it('reserved keys throw TypeError and do not break the store', async () => {
    const reserved: WriteOp[] = [
      { type: 'put', key: CHANGELOG_NEXT_KEY, value: bytes('0') },
      { type: 'del', key: CHANGELOG_NEXT_KEY },
      { type: 'put', key: '\u0000unit', value: bytes('x') },
      { type: 'del', key: '\u0000anything' },
    ];
    for (const op of reserved) {
      expect(() => storeA.write([{ type: 'put', key: 'fine', value: bytes('1') }, op])).toThrow(TypeError);
    }
    expect(await storeA.get('fine')).toBeUndefined();
    await run(storeA, model, { kind: 'write', ops: [{ type: 'put', key: 'fine', value: bytes('2') }] });
    expect(await contents(storeA)).toEqual(model.contents());
    await storeA.close();
  });
});

describe('changelog fragments of crashed units', () => {
  const TOPIC = 'cl-fragment';

  /** Raw messages with the changelog's headers, as a crashed (or misbehaving) writer left them. */
  function op(unit: string, seq: number, key: string, value: string | null): { key: string; value: Uint8Array | null; headers: { [k: string]: string }[] } {
    return { key, value: value === null ? null : bytes(value), headers: [{ 'crmstream-unit': unit }, { 'crmstream-seq': String(seq) }] };
  }
  function marker(unit: string, count: number): { key: string; value: Uint8Array; headers: { [k: string]: string }[] } {
    return { key: '\u0000unit', value: bytes(JSON.stringify({ id: unit, count })), headers: [{ 'crmstream-unit': unit }] };
  }

  it('are discarded; complete units around them are applied', async () => {
    await mock.createTopic(TOPIC, 1);
    const model = new Model();
    const local = new MemoryStore();
    const first = await open(local, opts(TOPIC, 0));
    await runAll(first.store, model, randomUnits(4, 20, 'f'));
    await first.store.close();

    // A writer that died after logging 5 ops of its unit, before the marker.
    const fragment = [0, 1, 2, 3, 4].map((i) => op('dead-1:7', i, `frag/${i}`, `v${i}`));
    // A marker whose unit lacks an op (seq 1 of 3): ChangelogStore never logs one (it produces the
    // marker after every op is acknowledged), but a restore must not apply it either.
    const holed = [op('dead-1:8', 0, 'frag/holed-0', 'h0'), op('dead-1:8', 2, 'frag/holed-2', 'h2'), marker('dead-1:8', 3)];
    // A unit whose seq 1 landed first and seq 0 twice (re-sent after a failed report that the broker
    // had stored anyway): applied once, in seq order.
    const resent = [op('alive-2:1', 1, 'dup/a', 'second'), op('alive-2:1', 0, 'dup/a', 'first'), op('alive-2:1', 0, 'dup/a', 'first'), op('alive-2:1', 2, 'dup/b', null), marker('alive-2:1', 3)];
    for (const batch of [fragment, holed, resent]) {
      const out = await producer.produceBatch(TOPIC, 0, batch);
      expect(out.failed).toBe(0);
    }
    model.apply({ kind: 'write', ops: [{ type: 'put', key: 'dup/a', value: bytes('first') }, { type: 'put', key: 'dup/a', value: bytes('second') }, { type: 'del', key: 'dup/b' }] });
    // On the log: these raw messages instead of the 3 ops + 1 marker the model counts for `resent`.
    const rawMessages = fragment.length + holed.length + resent.length - 4;

    // The writer's own local copy catches up over them, and goes on with complete units.
    const second = await open(local, opts(TOPIC, 0));
    expect(second.restored).toMatchObject({ units: 1, ops: 3, discarded: 5 + 3 + 1, current: false });
    await runAll(second.store, model, randomUnits(5, 20, 'f'));
    await second.store.close();

    // Another crash mid-unit, at the end of the log this time; the restart discards it too.
    const tail = [op('dead-3:1', 0, 'frag/tail-0', 't0'), op('dead-3:1', 1, 'frag/tail-1', 't1')];
    expect((await producer.produceBatch(TOPIC, 0, tail)).failed).toBe(0);
    const third = await open(local, opts(TOPIC, 0));
    expect(third.restored).toMatchObject({ units: 0, ops: 0, discarded: 2, current: false });
    await runAll(third.store, model, randomUnits(6, 5, 'f'));
    expect(await contents(third.store)).toEqual(model.contents());
    await third.store.close();

    const dir = path.join(dirs.dir, 'fragment');
    const fresh = await open(new LevelStore(dir), opts(TOPIC, 0));
    expect(fresh.restored).toMatchObject({ fromOffset: 0, toOffset: model.messages + rawMessages + tail.length, units: model.units, discarded: 5 + 3 + 1 + 2, current: false });
    const got = await contents(fresh.store);
    expect(got.filter(([k]) => k.startsWith('frag/'))).toEqual([]);
    expect(got).toEqual(model.contents());
    expect(fresh.store.getSync('dup/a')).toEqual(Buffer.from('second'));
    await fresh.store.close();
  });
});

describe('changelog property: restore equals a model of the ops', () => {
  // 'm/a'..'m/z' brackets CHANGELOG_NEXT_KEY: a clearRange over it removes the local pointer for a
  // moment, which the store and the restore must put back.
  const keyArb = fc.constantFrom('a', 'b', 'c', 'k/1', 'k/10', 'k/2', 'm/a', 'm/z', 'zz', 'é', '日本');
  const opArb: fc.Arbitrary<WriteOp> = fc.oneof(
    { weight: 3, arbitrary: fc.record({ type: fc.constant('put' as const), key: keyArb, value: fc.uint8Array({ maxLength: 6 }) }) },
    { weight: 1, arbitrary: fc.record({ type: fc.constant('del' as const), key: keyArb }) },
  );
  const unitArb: fc.Arbitrary<Unit> = fc.oneof(
    { weight: 4, arbitrary: fc.array(opArb, { maxLength: 6 }).map((ops): Unit => ({ kind: 'write', ops })) },
    { weight: 1, arbitrary: fc.tuple(keyArb, keyArb).map(([x, y]): Unit => (compareKeys(x, y) <= 0 ? { kind: 'clear', gte: x, lt: y } : { kind: 'clear', gte: y, lt: x })) },
  );
  let runNo = 0;

  it('holds for random units, for a fresh copy and for a copy that stopped partway', async () => {
    await fc.assert(
      fc.asyncProperty(fc.array(unitArb, { minLength: 1, maxLength: 14 }), fc.nat(), async (units, cutSeed) => {
        const topic = `cl-prop-${runNo++}`;
        await mock.createTopic(topic, 1);
        const cut = cutSeed % (units.length + 1);
        const model = new Model();
        const writer = await open(new MemoryStore(), opts(topic, 0));
        for (const u of units.slice(0, cut)) await run(writer.store, model, u);
        const partway = await copyStore(writer.store);
        const partwayPointer = await pointer(partway);
        const partwayUnits = model.units;
        await runAll(writer.store, model, units.slice(cut), 3);
        expect(await contents(writer.store)).toEqual(model.contents());
        await writer.store.close();

        const fresh = await open(new MemoryStore(), opts(topic, 0));
        expect(fresh.restored).toMatchObject({ fromOffset: 0, toOffset: model.messages, units: model.units, ops: model.ops, discarded: 0 });
        expect(fresh.restored.current).toBe(model.units === 0);
        expect(await contents(fresh.store)).toEqual(model.contents());
        await fresh.store.close();

        const behind = await open(partway, opts(topic, 0));
        expect(behind.restored).toMatchObject({ fromOffset: partwayPointer ?? 0, toOffset: model.messages, units: model.units - partwayUnits, discarded: 0 });
        expect(await contents(behind.store)).toEqual(model.contents());
        await behind.store.close();
      }),
      // No shrinking: every run talks to the cluster; a failure is reported with its seed and case.
      { numRuns: 15, endOnFailure: true },
    );
  }, 120_000);
});

describe('changelog with brokers down', () => {
  const TOPIC = 'cl-faults';
  let faulty: SharedProducer;

  beforeAll(async () => {
    await mock.createTopic(TOPIC, 3);
    // Known leaders, set before anything is produced: partition p on broker p + 1.
    for (let p = 0; p < 3; p++) await mock.setLeader(TOPIC, p, p + 1);
    faulty = await SharedProducer.connect(mock.bootstrap, 'changelog-faults', { 'reconnect.backoff.ms': 50, 'reconnect.backoff.max.ms': 300 });
  });

  afterAll(async () => {
    for (let b = 1; b <= 3; b++) await mock.brokerUp(b).catch(() => undefined);
    await faulty?.close();
  });

  it('units written while the leader is down land once it is back; the restore equals the writer', async () => {
    const model = new Model();
    const w = await open(new LevelStore(path.join(dirs.dir, 'down-a')), opts(TOPIC, 0), faulty);
    await runAll(w.store, model, randomUnits(7, 10, 'd'));

    await mock.brokerDown(1);
    let settledWhileDown = 0;
    let downPhase = true;
    const pending = randomUnits(8, 12, 'd').map((u) => run(w.store, model, u).finally(() => {
      if (downPhase) settledWhileDown++;
    }));
    await sleep(2_000);
    downPhase = false;
    await mock.brokerUp(1);
    await Promise.all(pending);
    // The fault was real: nothing could be acknowledged while the leader was away.
    expect(settledWhileDown).toBe(0);
    expect(await contents(w.store)).toEqual(model.contents());

    const r = await open(new LevelStore(path.join(dirs.dir, 'down-b')), opts(TOPIC, 0), faulty);
    expect(r.restored).toMatchObject({ units: model.units, ops: model.ops });
    expect(await contents(r.store)).toEqual(model.contents());
    await r.store.close();
    await w.store.close();
  });

  it('a unit that times out with every broker down fails with KAFKA_ERROR, breaks the store, and a reopen catches up', async () => {
    const dir = path.join(dirs.dir, 'down-all');
    const model = new Model();
    const w = await open(new LevelStore(dir), opts(TOPIC, 1, { deliveryTimeoutMs: 1_500 }), faulty);
    await runAll(w.store, model, randomUnits(9, 6, 'e'));

    for (let b = 1; b <= 3; b++) await mock.brokerDown(b);
    const failedUnit: Unit = { kind: 'write', ops: [{ type: 'put', key: 'e/failed', value: bytes('maybe') }, { type: 'del', key: 'e/0001' }] };
    await expectCode(w.store.write(failedUnit.ops), 'KAFKA_ERROR');
    for (let b = 1; b <= 3; b++) await mock.brokerUp(b);
    // Broken, even with the brokers back: later units are refused without touching the log (the
    // log may hold the failed unit while the local copy does not), and the local copy is unchanged.
    await expectCode(w.store.write([{ type: 'put', key: 'e/refused', value: bytes('no') }]), 'KAFKA_ERROR');
    await expectCode(w.store.clearRange({ gte: 'e/', lt: 'e0' }), 'KAFKA_ERROR');
    expect(await contents(w.store)).toEqual(model.contents());
    await w.store.close();

    // The failed unit's ops are still in the shared producer; the reopen waits for them to land.
    // No op was acknowledged before the deadline, so its marker was never produced: what lands is a
    // fragment, which the reopen discards. (The next case covers a failed unit that does land.)
    const again = await open(new LevelStore(dir), opts(TOPIC, 1), faulty);
    expect(again.restored).toMatchObject({ units: 0, ops: 0, discarded: failedUnit.ops.length, current: false });
    expect(await contents(again.store)).toEqual(model.contents());
    await runAll(again.store, model, randomUnits(10, 5, 'e'));
    expect(await contents(again.store)).toEqual(model.contents());

    const fresh = await open(new MemoryStore(), opts(TOPIC, 1), faulty);
    expect(fresh.restored).toMatchObject({ units: model.units, ops: model.ops, discarded: failedUnit.ops.length });
    expect(await contents(fresh.store)).toEqual(model.contents());
    await fresh.store.close();
    await again.store.close();
  });

  it('a unit whose marker is acknowledged too late fails, and a reopen applies it once the marker lands', async () => {
    const dir = path.join(dirs.dir, 'slow');
    const model = new Model();
    const w = await open(new LevelStore(dir), opts(TOPIC, 2, { deliveryTimeoutMs: 1_500 }), faulty);
    await runAll(w.store, model, randomUnits(11, 6, 's'));

    // Each round trip to the leader now takes ~1 s: the ops are acknowledged, the marker misses
    // the deadline (or, on a slow machine, the ops do). Either way the log decides.
    await mock.brokerRtt(3, 1_000);
    const slowUnit: Unit = { kind: 'write', ops: [{ type: 'put', key: 's/slow', value: bytes('late') }] };
    const withSlow = model.clone();
    withSlow.apply(slowUnit);
    await expectCode(w.store.write(slowUnit.ops), 'KAFKA_ERROR');
    expect(await w.store.get('s/slow')).toBeUndefined();
    await mock.brokerRtt(3, 0);
    await w.store.close();

    const again = await open(new LevelStore(dir), opts(TOPIC, 2), faulty);
    const got = await contents(again.store);
    const landed = got.some(([k]) => k === 's/slow');
    const after = landed ? withSlow : model;
    expect(got).toEqual(after.contents());
    await runAll(again.store, after, randomUnits(12, 4, 's'));
    const fresh = await open(new MemoryStore(), opts(TOPIC, 2), faulty);
    expect(fresh.restored).toMatchObject({ units: after.units, ops: after.ops });
    expect(await contents(fresh.store)).toEqual(after.contents());
    expect(await contents(fresh.store)).toEqual(await contents(again.store));
    await fresh.store.close();
    await again.store.close();
  });
});
