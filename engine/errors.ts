/**
 * The one error catalogue of crmstream. Every error the engine raises carries a stable `code`;
 * callers and tests branch on the code, never on the message. `retriable` says whether doing the
 * same thing again can succeed (a broker hiccup) or not (a corrupt record).
 */
export const ErrorCodes = {
  CONFIG_INVALID: { retriable: false, doc: 'The configuration failed validation; the message lists each offending field.' },
  STATE_CORRUPT: { retriable: false, doc: 'A stored record could not be decoded; the data directory is damaged or from an incompatible version.' },
  STATE_IO: { retriable: true, doc: 'The state store failed to read or write.' },
  STATE_CLOSED: { retriable: false, doc: 'The state store was used after close().' },
  STATE_LOCKED: { retriable: true, doc: 'The state store is open in another process (LevelDB allows one); the message names its pid when it can be told. Stop it or use another data dir.' },
  STATE_NOT_FOUND: { retriable: false, doc: 'A read-only command (export) was pointed at a data dir that holds no checkpoint; the message names the path tried. Nothing is created there.' },
  SOURCE_DECODE: { retriable: false, doc: 'An input record could not be decoded (it is dead-lettered, the batch goes on).' },
  SOURCE_IO: { retriable: true, doc: 'An input file or stream could not be read.' },
  SOURCE_MAP_INVALID: { retriable: false, doc: 'A --map column mapping is malformed or names a missing column.' },
  INPUT_TOO_LARGE: { retriable: false, doc: 'The input exceeds a configured size limit.' },
  ENGINE_CLOSED: { retriable: false, doc: 'The engine was used after close().' },
  ENGINE_FAILED: { retriable: false, doc: 'A batch failed half-way (an operator threw); the in-memory state is no longer the checkpointed one. Restart: the engine resumes from the last checkpoint.' },
  ENGINE_BUSY: { retriable: true, doc: 'A second ingest was started while one is running; await the first.' },
  OPERATOR_FAILED: { retriable: false, doc: 'An operator threw while processing a batch or timer.' },
  CHECKPOINT_FAILED: { retriable: true, doc: 'The atomic checkpoint write failed; nothing of it became durable.' },
  SINK_IO: { retriable: true, doc: 'An output sink (dead-letter file, outbox drain) failed to write.' },
  SINK_STALLED: { retriable: true, doc: 'An output sink did not catch up with the committed outbox in time (flush, close, the end of a backfill); the message names each sink behind, its cursor and last error. Nothing is lost: the records stay in the store and go out from the sink\'s cursor at the next start.' },
  KAFKA_ERROR: { retriable: true, doc: 'A Kafka client (consumer, producer, admin, mock cluster) failed; librdkafka retries transient broker trouble itself, this is what it gave up on.' },
  CAMPAIGNS_DISABLED: { retriable: false, doc: 'A campaign query on an engine with no campaigns configured (campaigns.definitions).' },
  SEGMENTS_DISABLED: { retriable: false, doc: 'A segment query on an engine configured with segments.enabled = false.' },
  KPI_DISABLED: { retriable: false, doc: 'A KPI query on an engine configured with kpi.enabled = false.' },
  CLEANUP_FAILED: { retriable: false, doc: 'One or more errors happened while closing; `errors` holds each of them.' },
} as const;

export type ErrorCode = keyof typeof ErrorCodes;

/** The error type thrown by crmstream. */
export class CrmError extends Error {
  readonly code: ErrorCode;
  readonly retriable: boolean;
  /** Set on CLEANUP_FAILED: every error met during cleanup, none swallowed. */
  readonly errors: readonly unknown[];

  constructor(code: ErrorCode, message: string, options?: { cause?: unknown; errors?: readonly unknown[] }) {
    super(message, options?.cause === undefined ? undefined : { cause: options.cause });
    this.name = 'CrmError';
    this.code = code;
    this.retriable = ErrorCodes[code].retriable;
    this.errors = options?.errors ?? [];
  }
}

/** True when `err` is a CrmError with the given code. */
export function isCode(err: unknown, code: ErrorCode): boolean {
  return err instanceof CrmError && err.code === code;
}

/**
 * Runs every cleanup step even when earlier ones fail; throws one CLEANUP_FAILED holding all
 * failures (or the single failure's own error when only one step failed).
 */
export async function cleanupAll(steps: ReadonlyArray<() => unknown>): Promise<void> {
  const errors: unknown[] = [];
  for (const step of steps) {
    try {
      await step();
    } catch (err) {
      errors.push(err);
    }
  }
  if (errors.length === 1) throw errors[0];
  if (errors.length > 1) throw new CrmError('CLEANUP_FAILED', `${errors.length} errors during cleanup`, { errors });
}

/** An error's message with its cause's, once ("checkpoint 7 was not written: ENOSPC …"), for health reports and logs. */
export function errorText(err: unknown): string {
  if (!(err instanceof Error)) return String(err);
  const cause = err.cause;
  return cause instanceof Error && !err.message.includes(cause.message) ? `${err.message}: ${cause.message}` : err.message;
}
