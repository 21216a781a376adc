/**
 * A bounded map with near-LRU eviction at O(1) per operation: two generations of plain Maps. New
 * and recently used entries live in `young`; when it holds half the capacity, it becomes `old` and
 * the previous `old` is dropped whole. A hit in `old` moves the entry back to `young`.
 *
 * Why not one Map trimmed from its oldest end: deleting from the front of a V8 Map leaves
 * tombstones that later iterations walk again, which made trimming O(n) per eviction at a million
 * entries. Dropping a whole Map costs nothing but its garbage.
 */
export class GenerationalCache<V> {
  private young = new Map<string, V>();
  private old = new Map<string, V>();
  private readonly half: number;

  constructor(capacity: number) {
    this.half = Math.max(1, capacity >> 1);
  }

  get(key: string): V | undefined {
    const v = this.young.get(key);
    if (v !== undefined) return v;
    const o = this.old.get(key);
    if (o !== undefined) this.set(key, o);
    return o;
  }

  has(key: string): boolean {
    return this.young.has(key) || this.old.has(key);
  }

  set(key: string, value: V): void {
    if (this.young.size >= this.half && !this.young.has(key)) {
      this.old = this.young;
      this.young = new Map();
    }
    this.young.set(key, value);
  }

  /** Entries held (an entry moved between generations may count twice until the next turn). */
  get size(): number {
    return this.young.size + this.old.size;
  }
}
