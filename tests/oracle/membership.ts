import type { Engine } from '../../engine/engine.js';
import type { SegEvent } from './segment-oracle.js';
import type { StreamEvent } from './streams.js';

/** Segment id → (user → tier): the shape the engine and the segment oracle are compared in. */
export type Membership = Map<string, Map<string, string>>;

/** Every segment's members from the engine (it checkpoints first, so every profile is read). */
export async function engineMembership(engine: Engine): Promise<Membership> {
  const out: Membership = new Map(engine.segmentIds().map((id) => [id, new Map<string, string>()]));
  for await (const x of engine.segmentMemberships()) out.get(x.segment)!.set(x.user_id, x.tier);
  return out;
}

/**
 * Differences between two memberships, as lines (at most 30): for every segment of `a` (or only
 * those `only` accepts), users in a different tier or out on one side.
 */
export function membershipDiff(a: Membership, b: Membership, label: string, only?: (id: string) => boolean): string[] {
  const out: string[] = [];
  for (const [id, ma] of a) {
    if (only !== undefined && !only(id)) continue;
    const mb = b.get(id) ?? new Map<string, string>();
    for (const [u, tier] of ma) if (mb.get(u) !== tier) out.push(`${label} ${id}: ${u} is '${tier}' here, '${mb.get(u) ?? '(out)'}' there`);
    for (const [u, tier] of mb) if (!ma.has(u)) out.push(`${label} ${id}: ${u} is out here, '${tier}' there`);
  }
  return out.slice(0, 30);
}

/** A generated stream event as the segment oracle loads it (no amount: NaN). */
export function toSegEvent(e: StreamEvent): SegEvent {
  return { ...e, amount: e.amount ?? Number.NaN };
}
