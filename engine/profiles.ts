import { CrmError } from './errors.js';
import { BinReader, BinWriter } from '../state/codec.js';
import type { KvStore, WriteOp } from '../state/store.js';
import { UserRecord, type StateSlot } from '../operators/operator.js';
import { FilterNs, type KeyFilter } from './key-filter.js';

/**
 * Per-user records behind a bounded cache with write-behind.
 *
 * Hot path: `load(id)` is a Map lookup; a miss decodes the stored record (one synchronous getSync)
 * or creates an empty one. Records are only written at checkpoints (`snapshot`), once each however
 * many events touched them. Eviction is CLOCK (second chance via `touched`) and never evicts a
 * dirty record: when dirty records alone exceed the bound, the runtime checkpoints sooner
 * (`needsCheckpoint`) — that is the backpressure that keeps memory bounded.
 *
 * Stored record: `u/<id>` → [format 1][slot count] then per slot [slot id][length][slot bytes], so
 * operators can be added later and old records still decode (missing slots start empty).
 */

export const USER_PREFIX = 'u/';
const FORMAT = 1;

export class ProfileTable {
  private readonly cache = new Map<string, UserRecord>();
  private readonly dirtyList: UserRecord[] = [];
  private readonly writer = new BinWriter(512);
  /** Checkpoint arena: every dirty record of one snapshot, back to back. */
  private readonly arena = new BinWriter(1 << 16);
  private readonly bounds: number[] = [];
  private readonly reader = new BinReader();
  private readonly slotIndexById = new Map<number, number>();
  private store: KvStore | null = null;
  loads = 0;
  misses = 0;
  /** Profiles that did not exist before (this process); merged-away ones are subtracted. */
  created = 0;

  constructor(
    private readonly slots: readonly StateSlot<unknown>[],
    private readonly capacity: number,
    /** Answers "no such profile" without a store read for ids never seen. */
    private readonly filter: KeyFilter,
  ) {
    slots.forEach((s, i) => this.slotIndexById.set(s.id, i));
  }

  open(store: KvStore): void {
    this.store = store;
  }

  get dirtyCount(): number {
    return this.dirtyList.length;
  }

  /** Records changed since the last checkpoint (newer than their stored copy, or not stored yet). */
  dirtyRecords(): readonly UserRecord[] {
    return this.dirtyList;
  }

  get cachedCount(): number {
    return this.cache.size;
  }

  /** The record for `id`, created empty if there is none, marked dirty (the caller is about to change it). */
  load(id: string): UserRecord {
    return this.lookup(id, true)!;
  }

  /** Like load(), but undefined (and nothing created) when no record exists: one store read at most. */
  loadExisting(id: string): UserRecord | undefined {
    return this.lookup(id, false);
  }

  private lookup(id: string, create: boolean): UserRecord | undefined {
    this.loads++;
    let rec = this.cache.get(id);
    if (rec === undefined) {
      this.misses++;
      rec = this.read(id);
      if (rec === undefined) {
        if (!create) return undefined;
        rec = this.create(id);
        this.filter.add(FilterNs.user, id);
        this.created++;
      }
      if (this.cache.size >= this.capacity) this.evict();
      this.cache.set(id, rec);
    } else if (rec.deleted) {
      if (!create) return undefined;
      // Merged away earlier in this epoch and now used again (e.g. a timer for it): start afresh.
      rec = this.create(id);
      this.created++;
      this.cache.set(id, rec);
    }
    rec.touched = true;
    if (!rec.dirty) {
      rec.dirty = true;
      this.dirtyList.push(rec);
    }
    return rec;
  }

  /**
   * Scale-out: installs a record that moved here from another partition (encoded there by
   * `encode`), dirty, as if it had been created here. Returns false (and keeps the local one) when a
   * live record of that id already exists: a profile id lives in one partition only, so that is a
   * routing fault the caller counts.
   */
  adopt(id: string, raw: Uint8Array): boolean {
    const local = this.cache.get(id) ?? this.read(id);
    if (local !== undefined && !local.deleted) return false;
    const rec = this.decode(id, raw);
    if (this.cache.size >= this.capacity) this.evict();
    this.cache.set(id, rec);
    this.filter.add(FilterNs.user, id);
    this.created++;
    rec.touched = true;
    rec.dirty = true;
    this.dirtyList.push(rec);
    return true;
  }

  /** Read-only lookup (queries): does not mark dirty or fill the cache. */
  peek(id: string): UserRecord | undefined {
    const rec = this.cache.get(id);
    if (rec !== undefined) return rec.deleted ? undefined : rec;
    return this.read(id);
  }

  /** Marks a record deleted (merged into another); removed from the store at the next checkpoint. */
  remove(rec: UserRecord): void {
    rec.deleted = true;
    this.created--;
    if (!rec.dirty) {
      rec.dirty = true;
      this.dirtyList.push(rec);
    }
  }

  private create(id: string): UserRecord {
    const slots = new Array<unknown>(this.slots.length);
    for (let i = 0; i < this.slots.length; i++) slots[i] = this.slots[i]!.create();
    return new UserRecord(id, slots);
  }

  private read(id: string): UserRecord | undefined {
    if (!this.filter.mightContain(FilterNs.user, id)) return undefined;
    const raw = this.store?.getSync(USER_PREFIX + id);
    if (raw === undefined) return undefined;
    return this.decode(id, raw);
  }

  decode(id: string, raw: Uint8Array): UserRecord {
    const rec = this.create(id);
    const r = this.reader.reset(raw);
    try {
      const format = r.u8();
      if (format !== FORMAT) throw new RangeError(`unknown record format ${format}`);
      const n = r.uint();
      for (let k = 0; k < n; k++) {
        const slotId = r.uint();
        const len = r.uint();
        const end = r.pos + len;
        const idx = this.slotIndexById.get(slotId);
        if (idx !== undefined) {
          r.limit(end);
          rec.slots[idx] = this.slots[idx]!.decode(r);
          r.limit(raw.length);
        }
        r.pos = end; // skip slots of operators no longer configured
      }
    } catch (err) {
      throw new CrmError('STATE_CORRUPT', `user record ${JSON.stringify(id)} cannot be decoded`, { cause: err });
    }
    rec.dirty = false;
    return rec;
  }

  encode(rec: UserRecord): Uint8Array {
    return this.encodeInto(rec, this.writer.reset()).take();
  }

  /** Appends the record's encoding (format byte, then each slot id and its length-prefixed bytes). */
  private encodeInto(rec: UserRecord, w: BinWriter): BinWriter {
    w.u8(FORMAT).uint(this.slots.length);
    for (let i = 0; i < this.slots.length; i++) {
      const slot = this.slots[i]!;
      w.uint(slot.id);
      const at = w.beginLen();
      slot.encode(rec.slots[i], w);
      w.endLen(at);
    }
    return w;
  }

  /**
   * Puts every dirty record (deletes the merged ones) into the checkpoint batch. All records are
   * encoded into one arena and handed out as views of it: one buffer per checkpoint instead of one
   * allocation per record (the store copies values in write(), so the arena is reused).
   */
  snapshot(ops: WriteOp[]): void {
    const w = this.arena.reset();
    const bounds = this.bounds;
    bounds.length = 0;
    for (const rec of this.dirtyList) {
      if (rec.deleted) {
        ops.push({ type: 'del', key: USER_PREFIX + rec.id });
        continue;
      }
      bounds.push(w.pos);
      this.encodeInto(rec, w);
    }
    bounds.push(w.pos);
    const buf = w.written(); // only now: the arena may have grown while encoding
    let k = 0;
    for (const rec of this.dirtyList) {
      if (rec.deleted) continue;
      ops.push({ type: 'put', key: USER_PREFIX + rec.id, value: buf.subarray(bounds[k]!, bounds[k + 1]!) });
      k++;
    }
  }

  /** The checkpoint is durable: records are clean and may be evicted. */
  committed(): void {
    for (const rec of this.dirtyList) {
      rec.dirty = false;
      if (rec.deleted && this.cache.get(rec.id) === rec) this.cache.delete(rec.id);
    }
    this.dirtyList.length = 0;
  }

  /**
   * CLOCK sweep: frees up to 1/16 of the capacity. Dirty records cannot go (they are written at the
   * next checkpoint) and touched ones get a second chance; both move to the back, so the next
   * sweep starts with fresh candidates. The work per call is bounded, and a cache of only dirty
   * records returns at once: then it grows past its bound until the checkpoint that
   * `checkpoint.maxDirtyUsers` forces — O(1) per miss either way, never a scan per miss.
   */
  private evict(): void {
    if (this.cache.size - this.dirtyList.length <= 0) return;
    let want = Math.max(1, this.capacity >> 4);
    let budget = want * 4;
    for (const [id, rec] of this.cache) {
      if (want <= 0 || budget-- <= 0) break;
      if (rec.dirty || rec.touched) {
        rec.touched = false;
        this.cache.delete(id);
        this.cache.set(id, rec);
        continue;
      }
      this.cache.delete(id);
      want--;
    }
  }

  /** Empties the cache; every record must be clean (just after a checkpoint), so nothing is lost. */
  dropCache(): void {
    if (this.dirtyList.length > 0) throw new Error(`dropCache with ${this.dirtyList.length} dirty records`);
    this.cache.clear();
  }

  /** Every cached record (for full-state dumps in tests and exports of small states). */
  cached(): IterableIterator<UserRecord> {
    return this.cache.values();
  }
}
