import type { KvStore, WriteOp } from '../state/store.js';

/**
 * Poison records (SPEC §8: "a poison record is quarantined, never a crash loop").
 *
 * When an operator throws, memory holds part of a batch and the engine fails closed; the durable
 * state is the last checkpoint, and a restart replays the same input. Without more, the same
 * record fails again on every restart. So the failure is written down (outside the checkpoint,
 * under its own keys) before the engine stops:
 *
 * - an operator that threw on a run of rows can have thrown on any of them: the run's event ids
 *   become *suspects*. After the restart, each suspect row goes through the operators alone. One
 *   that throws again is *poison* (written down, the engine fails again); the others pass and stop
 *   being suspects.
 * - a row processed alone, or a timer (always alone), that throws is poison at once.
 * - poison event ids are rejected `poison` before anything else looks at them (dead-lettered with
 *   their payload, counted); poison timers are skipped and dead-lettered.
 *
 * So a poison record costs at most two restarts, and innocent rows of its batch are never dropped.
 *
 * Layout: `q/s/<event id>` suspects, `q/e/<event id>` poison events, `q/t/<kind|user|ts>` poison
 * timers. Bounded: at most MAX_ENTRIES (10,000) of each kind are remembered; past that, the first
 * in key order are forgotten (a forgotten poison record fails once more and is written down again).
 */

const SUSPECT = 'q/s/';
const EVENT = 'q/e/';
const TIMER = 'q/t/';
export const QUARANTINE_PREFIX = 'q/';
const MAX_ENTRIES = 10_000;
const EMPTY = new Uint8Array(0);

export class Quarantine {
  private readonly suspects = new Set<string>();
  private readonly poisonEvents = new Set<string>();
  private readonly poisonTimers = new Set<string>();
  /** Suspects cleared since the last checkpoint (their keys are deleted with it). */
  private cleared: string[] = [];
  /** Records rejected or timers skipped as poison (metrics). */
  quarantined = 0;

  /** True when any row could be a suspect or poison: the hot path checks ids only then. */
  get active(): boolean {
    return this.suspects.size > 0 || this.poisonEvents.size > 0;
  }

  get hasPoisonTimers(): boolean {
    return this.poisonTimers.size > 0;
  }

  async open(store: KvStore): Promise<void> {
    for await (const keys of store.scanKeys({ gte: QUARANTINE_PREFIX, lt: 'q0' }, 1024)) {
      for (const k of keys) {
        if (k.startsWith(SUSPECT)) this.suspects.add(k.slice(SUSPECT.length));
        else if (k.startsWith(EVENT)) this.poisonEvents.add(k.slice(EVENT.length));
        else if (k.startsWith(TIMER)) this.poisonTimers.add(k.slice(TIMER.length));
      }
    }
  }

  isPoison(eventId: string): boolean {
    return this.poisonEvents.has(eventId);
  }

  isSuspect(eventId: string): boolean {
    return this.suspects.has(eventId);
  }

  isPoisonTimer(key: string): boolean {
    return this.poisonTimers.has(key);
  }

  /** A suspect went through the operators alone without failing. */
  clear(eventId: string): void {
    if (this.suspects.delete(eventId)) this.cleared.push(eventId);
  }

  /** Checkpoint: cleared suspects' keys go (pure; `committed` forgets the list). */
  snapshot(ops: WriteOp[]): void {
    for (const id of this.cleared) ops.push({ type: 'del', key: SUSPECT + id });
  }

  committed(): void {
    this.cleared = [];
  }

  /**
   * Writes a failure down before the engine stops (its own write: the checkpointed state is not
   * touched). `suspects`: event ids of a run that failed; `poison`: a row that failed alone;
   * `timer`: a timer that failed.
   */
  async record(store: KvStore, f: { suspects?: readonly string[]; poison?: string; timer?: string }): Promise<void> {
    const ops: WriteOp[] = [];
    for (const id of (f.suspects ?? []).slice(0, MAX_ENTRIES)) ops.push({ type: 'put', key: SUSPECT + id, value: EMPTY });
    if (f.poison !== undefined) {
      ops.push({ type: 'put', key: EVENT + f.poison, value: EMPTY }, { type: 'del', key: SUSPECT + f.poison });
      this.trim(this.poisonEvents, EVENT, ops);
    }
    if (f.timer !== undefined) {
      ops.push({ type: 'put', key: TIMER + f.timer, value: EMPTY });
      this.trim(this.poisonTimers, TIMER, ops);
    }
    if (ops.length > 0) await store.write(ops);
  }

  private trim(set: Set<string>, prefix: string, ops: WriteOp[]): void {
    let over = set.size + 1 - MAX_ENTRIES;
    for (const id of set) {
      if (over-- <= 0) break;
      ops.push({ type: 'del', key: prefix + id });
    }
  }
}
