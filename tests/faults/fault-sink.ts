import type { OutboxRecord, OutboxSink } from '../../engine/outbox.js';
import type { KvStore } from '../../state/store.js';
import { enospc } from './fault-store.js';
import { CrmError } from '../../engine/errors.js';

/**
 * An outbox sink that records what it was given and fails on demand: the next N deliver() calls
 * throw (once, N times, or until heal()), by default with what a JSONL sink throws on a full disk
 * (SINK_IO caused by ENOSPC). A failed call records nothing, as a sink whose write did not happen.
 *
 * ```ts
 * const sink = new FaultSink('flaky', [Topic.deadLetter], { failDeliveries: 3 });
 * sink.failNext(2);          // arm more later
 * sink.seqs;                 // every seq taken, in call order (duplicates included)
 * ```
 */
export interface FaultSinkOptions {
  /** How many of the next deliver() calls fail (default 0). */
  readonly failDeliveries?: number;
  /** Builds the error (default: SINK_IO caused by ENOSPC). */
  readonly error?: () => Error;
}

export function sinkEnospcError(): Error {
  return new CrmError('SINK_IO', 'cannot write out.jsonl', { cause: enospc('out.jsonl') });
}

export class FaultSink implements OutboxSink {
  readonly topics: readonly number[];
  /** Records taken, in order (a re-delivered record appears again). */
  readonly records: OutboxRecord[] = [];
  deliverCalls = 0;
  failedDeliveries = 0;
  opened = 0;
  closed = 0;
  private failuresLeft: number;
  private readonly makeError: () => Error;
  /** When set, close() throws it (to test that the others still close). */
  closeError: Error | null = null;

  constructor(readonly name: string, topics: readonly number[], options: FaultSinkOptions = {}) {
    this.topics = topics;
    this.failuresLeft = options.failDeliveries ?? 0;
    this.makeError = options.error ?? sinkEnospcError;
  }

  get seqs(): number[] {
    return this.records.map((r) => r.seq);
  }

  failNext(n = 1): void {
    this.failuresLeft += n;
  }

  /** Fails every delivery until heal(). */
  failAlways(): void {
    this.failuresLeft = Number.POSITIVE_INFINITY;
  }

  heal(): void {
    this.failuresLeft = 0;
  }

  async open(_store: KvStore): Promise<void> {
    this.opened++;
  }

  async deliver(records: readonly OutboxRecord[]): Promise<void> {
    this.deliverCalls++;
    if (this.failuresLeft > 0) {
      this.failuresLeft--;
      this.failedDeliveries++;
      throw this.makeError();
    }
    for (const r of records) this.records.push({ seq: r.seq, topic: r.topic, payload: new Uint8Array(r.payload) });
  }

  async close(): Promise<void> {
    this.closed++;
    if (this.closeError !== null) throw this.closeError;
  }
}
