import { crmstream } from '../api/proto/gen/crmstream.js';
import { ANON_PREFIX } from '../operators/operator.js';
import type { EventColumns } from './batch.js';
import { appendJsonEvent, appendProtoEvent } from './codec.js';
import { Reject } from './event-types.js';
import { hashA } from './hash.js';
import type { PartitionRouter } from './engine.js';

/**
 * Scale-out routing (SPEC §2, §7; docs/KAFKA.md "Several instances"), independent of Kafka.
 *
 * Every profile id lives in exactly one of N partitions: `partitionOf(id, n)`. An input event is
 * routed by its identity key — the anonymous profile `anon:<anonymous_id>` when it has one (the
 * partition of the anonymous id decides its alias: first link wins, as in one engine), else its
 * member id — and spend (`cost`, no user) by its event id. The engine of that partition resolves the
 * canonical id; a row whose profile lives elsewhere is forwarded there with the canonical id (and,
 * when it stitched the anonymous id to a member, the anonymous profile itself). The target never
 * resolves a forwarded row again, so a row travels at most two hops.
 */

const SEED = 0x5ca1e;

/** The partition of a profile id (or any routing key) among `n`. */
export function partitionOf(id: string, n: number): number {
  return hashA(SEED, id) % n;
}

/** The routing key of an input event: its anonymous profile, else its member id, else (spend) its event id. */
export function routeKey(userId: string, anonymousId: string, eventId: string): string {
  if (anonymousId !== '') return ANON_PREFIX + anonymousId;
  if (userId !== '') return userId;
  return eventId;
}

/** The router of partition `p` of `n`, for EngineOptions.router. */
export function partitionRouter(p: number, n: number): PartitionRouter {
  return { owns: (canonical) => partitionOf(canonical, n) === p };
}

/**
 * Appends one `Routed` message's event to `batch` (kind 'event'), or returns its watermark (kind
 * 'watermark'). A message that does not decode becomes a `bad_encoding` row carrying its bytes:
 * dead-lettered by the engine like any bad input, never dropped.
 */
export function appendRouted(
  batch: EventColumns, bytes: Uint8Array, origin: string, timeZone: string,
): { kind: 'event' } | { kind: 'watermark'; ts: number; advance: boolean } {
  let m: crmstream.v1.Routed;
  try {
    m = crmstream.v1.Routed.decode(bytes);
  } catch (err) {
    batch.pushUndecodable(bytes, bytes.byteLength, origin, Reject.bad_encoding, `protobuf Routed: ${(err as Error).message}`);
    return { kind: 'event' };
  }
  if (m.event.length === 0) {
    const ts = Number(m.watermark);
    if (Number.isFinite(ts) && ts > 0) return { kind: 'watermark', ts, advance: m.advance };
    batch.pushUndecodable(bytes, bytes.byteLength, origin, Reject.bad_encoding, 'Routed message without an event or a watermark');
    return { kind: 'event' };
  }
  const from = m.origin !== '' ? m.origin : origin;
  const i = m.json ? appendJsonEvent(batch, Buffer.from(m.event).toString('utf8'), from, timeZone) : appendProtoEvent(batch, m.event, from);
  if (m.canonical !== '' && batch.status[i] === Reject.ok) {
    batch.given[i] = m.canonical;
    batch.moved[i] = m.moved.length > 0 ? m.moved : null;
  }
  return { kind: 'event' };
}
