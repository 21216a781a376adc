import type { KvStore } from '../state/store.js';
import { hashA, hashB } from './hash.js';

/**
 * "Could this key be in the store?" — a scalable Bloom filter over every profile and alias key, so
 * that the hot path's store lookups for ids never seen before (most anonymous visitors, every new
 * user) are answered in memory instead of by a LevelDB read (~3.5 µs each through classic-level's
 * getSync, even with LevelDB's own Bloom filters). Never a false "no": keys are added before they
 * are written, and deleted keys stay (a harmless false "maybe").
 *
 * Scalable: when a layer holds its capacity a new layer of twice the size is added (Almeida et al.);
 * a lookup checks every layer, so nothing is ever rebuilt. About 1.2 bytes per key at a ~1 % false
 * "maybe" rate per layer. Filled at open by one keys scan of the two prefixes.
 */

const BITS_PER_KEY = 10;
const HASHES = 7;

class Layer {
  readonly bits: Uint32Array;
  readonly mask: number;
  readonly capacity: number;
  count = 0;

  constructor(capacity: number) {
    let m = 1 << 16;
    while (m < capacity * BITS_PER_KEY) m *= 2;
    this.bits = new Uint32Array(m >>> 5);
    this.mask = m - 1;
    this.capacity = capacity;
  }
}

/** Double-hashing bases for (namespace, key), without building the prefixed string; the step is odd (a full cycle). */
const h1 = hashA;
const h2 = (ns: number, s: string): number => hashB(ns, s) | 1;

export class KeyFilter {
  private layers: Layer[];

  constructor(initialCapacity = 1 << 20) {
    this.layers = [new Layer(initialCapacity)];
  }

  add(ns: number, key: string): void {
    let layer = this.layers[this.layers.length - 1]!;
    if (layer.count >= layer.capacity) {
      layer = new Layer(layer.capacity * 2);
      this.layers.push(layer);
    }
    const a = h1(ns, key);
    const b = h2(ns, key);
    const { bits, mask } = layer;
    for (let k = 0; k < HASHES; k++) {
      const bit = (a + Math.imul(k, b)) & mask;
      bits[bit >>> 5]! |= 1 << (bit & 31);
    }
    layer.count++;
  }

  mightContain(ns: number, key: string): boolean {
    const a = h1(ns, key);
    const b = h2(ns, key);
    for (const layer of this.layers) {
      const { bits, mask } = layer;
      let all = true;
      for (let k = 0; k < HASHES; k++) {
        const bit = (a + Math.imul(k, b)) & mask;
        if ((bits[bit >>> 5]! & (1 << (bit & 31))) === 0) {
          all = false;
          break;
        }
      }
      if (all) return true;
    }
    return false;
  }

  /** Adds every stored key under `prefix` (namespace `ns`): one scan at open. */
  async load(store: KvStore, prefix: string, end: string, ns: number): Promise<number> {
    let n = 0;
    for await (const keys of store.scanKeys({ gte: prefix, lt: end }, 4096)) {
      for (const key of keys) this.add(ns, key.slice(prefix.length));
      n += keys.length;
    }
    return n;
  }

  get keys(): number {
    let n = 0;
    for (const l of this.layers) n += l.count;
    return n;
  }
}

/** Namespaces of the keys the filter covers. */
export const FilterNs = { user: 1, alias: 2 } as const;
