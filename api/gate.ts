import type { Engine } from '../engine/engine.js';

/**
 * The engine is single-writer (one ingest, checkpoint or watermark call at a time: ENGINE_BUSY
 * otherwise). Everything that drives it from outside — HTTP ingest, the demo's generator, queries
 * that checkpoint first — goes through one gate: calls run one after another in arrival order.
 */
export class EngineGate {
  private tail: Promise<unknown> = Promise.resolve();
  /** Calls waiting or running (metrics; a source can slow down when it grows). */
  depth = 0;

  constructor(readonly engine: Engine) {}

  run<T>(fn: (engine: Engine) => Promise<T> | T): Promise<T> {
    this.depth++;
    const next = this.tail.then(() => fn(this.engine));
    // The chain goes on after a failure: the caller gets the error, the next call runs.
    this.tail = next.then(() => undefined, () => undefined).finally(() => {
      this.depth--;
    });
    return next;
  }
}
