import type { KvStore, WriteOp } from '../state/store.js';
import { ANON_PREFIX } from './operator.js';
import { FilterNs, type KeyFilter } from '../engine/key-filter.js';
import { GenerationalCache } from '../engine/gen-cache.js';

/**
 * Identity stitching (SPEC §2): anonymous ids are aliased to member ids, and every event is keyed by
 * one canonical profile id.
 *
 * - An event with a user_id belongs to that member. If it also carries an anonymous_id that is not
 *   aliased yet, the alias anonymous_id → user_id is created and the runtime folds the anonymous
 *   profile (earlier anonymous events) into the member's.
 * - An event with only an anonymous_id belongs to the member it is aliased to, or else to the
 *   anonymous profile `anon:<id>`.
 * - The first pairing wins: an anonymous id later seen with a different user_id (a shared device)
 *   keeps its alias; the event still counts for the user_id it carries, and `conflicts` counts it.
 *
 * Aliases are durable (`a/<anonymous id>` → user id), written in the checkpoint batch. A bounded map
 * caches them; misses read the store synchronously (one getSync, no await on the hot path).
 */

export const ALIAS_PREFIX = 'a/';
const utf8 = new TextEncoder();
const utf8d = new TextDecoder();

export class IdentityResolver {
  private readonly cache: GenerationalCache<string>;
  /** Aliases created this epoch (not yet durable); never evicted before the checkpoint. */
  private readonly pending = new Map<string, string>();
  private store: KvStore | null = null;
  /** Anonymous ids seen with a second, different user id. */
  conflicts = 0;
  aliasesCreated = 0;

  constructor(
    cacheSize: number,
    /** Answers "never aliased" without a store read for most new anonymous ids. */
    private readonly filter: KeyFilter,
  ) {
    this.cache = new GenerationalCache(cacheSize);
  }

  open(store: KvStore): void {
    this.store = store;
  }

  /**
   * Canonical id of an event that has no user_id: the member the anonymous id is aliased to, or
   * the anonymous profile `anon:<id>`. The cache holds the canonical id itself, so the anonymous
   * profile's id is built once and the same (already hashed) string is handed out on every event:
   * one Map lookup per event here and a cheap one in the profile cache after it. link() overwrites
   * the entry when an alias is created; `pending` (not yet durable) is the fallback for an alias
   * the bounded cache has already dropped.
   */
  canonicalOfAnonymous(anon: string): string {
    const c = this.cache.get(anon);
    if (c !== undefined) return c;
    let canon = this.pending.get(anon);
    if (canon === undefined) {
      const raw = this.filter.mightContain(FilterNs.alias, anon) ? this.store?.getSync(ALIAS_PREFIX + anon) : undefined;
      canon = raw === undefined ? ANON_PREFIX + anon : utf8d.decode(raw);
    }
    this.cache.set(anon, canon);
    return canon;
  }

  /**
   * The member an anonymous id is aliased to, or undefined. Member ids never start with
   * ANON_PREFIX (validation rejects such user_ids), so the prefix tells the two apart.
   */
  aliasOf(anon: string): string | undefined {
    const canon = this.canonicalOfAnonymous(anon);
    return canon.startsWith(ANON_PREFIX) ? undefined : canon;
  }

  /**
   * Records the alias anon → user if the anonymous id has none; returns true when it was created
   * (the runtime then merges `anon:<anon>` into `user`).
   */
  link(anon: string, user: string): boolean {
    const existing = this.aliasOf(anon);
    if (existing !== undefined) {
      if (existing !== user) this.conflicts++;
      return false;
    }
    this.pending.set(anon, user);
    this.cache.set(anon, user);
    this.filter.add(FilterNs.alias, anon);
    this.aliasesCreated++;
    return true;
  }

  /**
   * Where a profile id now lives: itself, or — for an anonymous profile merged since (e.g. a timer
   * registered before the sign-up) — the member it was merged into.
   */
  resolve(canon: string): string {
    if (!canon.startsWith(ANON_PREFIX)) return canon;
    return this.aliasOf(canon.slice(ANON_PREFIX.length)) ?? canon;
  }

  snapshot(ops: WriteOp[]): void {
    for (const [anon, user] of this.pending) ops.push({ type: 'put', key: ALIAS_PREFIX + anon, value: utf8.encode(user) });
  }

  committed(): void {
    this.pending.clear();
  }
}
