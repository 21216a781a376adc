import { z } from 'zod';
import { CrmError } from './errors.js';

const DAY = 86_400_000;

/**
 * The engine configuration. Validated once, at createEngine / CLI start, into a frozen object with
 * every default filled in; hot code reads fields, never re-validates. Every option documents its
 * default, unit and trade-off.
 */
export const ConfigSchema = z.object({
  /** Where LevelDB state, the dead-letter file and checkpoints live. Required for the `level` backend. */
  dataDir: z.string().min(1).nullable().default(null),
  state: z.object({
    /** `level` (durable, default when dataDir is set) or `memory` (ephemeral; tests and benchmarks). */
    backend: z.enum(['level', 'memory']).optional(),
    /**
     * Hot profiles kept decoded in memory (default 250,000). Larger = fewer LevelDB reads; each
     * cached profile costs a few hundred bytes. Dirty profiles stay until the next checkpoint.
     */
    cacheUsers: z.number().int().min(16).default(250_000),
  }).prefault({}),
  time: z.object({
    /** IANA zone in which calendar windows are cut (default Asia/Seoul). */
    timeZone: z.string().default('Asia/Seoul'),
    /** Watermark = max event time seen − this (ms, default 5 s). Larger tolerates more disorder, delays timers. */
    outOfOrdernessMs: z.number().int().min(0).default(5_000),
    /** Events older than watermark − this (ms, default 3 days) are rejected `too_late`. */
    allowedLatenessMs: z.number().int().min(0).default(3 * DAY),
    /** Timestamps outside [minTs, maxTs) (ms) are `bad_timestamp` (defaults 1990-01-01, 2100-01-01): catches seconds-for-ms and garbage. */
    minTs: z.number().default(Date.UTC(1990, 0, 1)),
    maxTs: z.number().default(Date.UTC(2100, 0, 1)),
    /**
     * Events dated more than this (ms, default 10 minutes) after the processing clock are rejected
     * `future_timestamp`: one far-future event would otherwise move the watermark there, make every
     * real event `too_late` and fire every timer at once. Device clocks run ahead by seconds to
     * minutes; raise it for sources that legitimately carry scheduled times. null = no bound
     * (backfills of synthetic data dated after today).
     */
    maxFutureMs: z.number().int().min(0).nullable().default(600_000),
  }).prefault({}),
  dedupe: z.object({
    /** Event ids are remembered this long in event time (ms, default 7 days); must be ≥ allowed lateness. */
    horizonMs: z.number().int().min(0).default(7 * DAY),
  }).prefault({}),
  validation: z.object({
    /** Encoded events larger than this (bytes, default 64 KiB) are rejected `too_large`. */
    maxEventBytes: z.number().int().min(256).default(64 * 1024),
    /** More props than this (default 64) is `too_large`. */
    maxProps: z.number().int().min(0).default(64),
    /** Ids longer than this (UTF-16 units, default 256) are `bad_field`: event_id, user_id, anonymous_id, order_id, trigger_id. */
    maxIdLength: z.number().int().min(16).default(256),
    /**
     * Names longer than this (default 64) are `bad_field`: type, channel, platform, campaign_id,
     * variant. Names become KPI dimensions and event-type codes kept in every checkpoint.
     */
    maxNameLength: z.number().int().min(8).default(64),
    /** The one reporting currency (ISO 4217, default KRW). Events without a currency are in it. */
    currency: z.string().regex(/^[A-Z]{3}$/, 'an ISO 4217 code such as KRW').default('KRW'),
    /** Other currencies accepted, as units of the reporting currency per unit (default none: rejected `unknown_currency`). */
    currencyRates: z.record(z.string().regex(/^[A-Z]{3}$/), z.number().positive()).default({}),
  }).prefault({}),
  checkpoint: z.object({
    /** A checkpoint is taken at the first batch boundary after this much processing time (ms, default 1000). */
    intervalMs: z.number().int().min(0).default(1_000),
    /** Also checkpoint when this many profiles are dirty (default 100,000): bounds memory between checkpoints. */
    maxDirtyUsers: z.number().int().min(1).default(100_000),
    /**
     * Triggers leave only with the checkpoint that makes them durable: when a batch produced one,
     * checkpoint at the first batch boundary this long (ms) after it was decided, whatever
     * intervalMs says (default 50; 0 = at the end of that batch, for the lowest delivery latency).
     */
    triggerLatencyMs: z.number().int().min(0).default(50),
    /**
     * A failed checkpoint write changes nothing and is retried this many times (default 5), after
     * `retryBackoffMs` (default 100 ms) doubling each time (≈ 3 s in all). When every retry failed
     * the engine fails closed: ENGINE_FAILED, unhealthy, `run`/`demo` exit non-zero; a restart
     * resumes from the last checkpoint.
     */
    /**
     * Changes that sit idle this long (ms, default 1,000) are checkpointed by a timer, so an
     * acknowledged-but-not-yet-durable change never waits for the next call. null = no timer (the
     * owner checkpoints: benchmarks, tools that drop engines). The timer holds the engine weakly.
     */
    idleMs: z.number().int().min(1).nullable().default(1_000),
    retries: z.number().int().min(0).max(20).default(5),
    retryBackoffMs: z.number().int().min(0).max(60_000).default(100),
  }).prefault({}),
  outbox: z.object({
    /** A failed sink is retried after about this long (ms, default 100), doubling per failure… */
    retryBaseMs: z.number().int().min(1).default(100),
    /** …up to this (ms, default 30,000), jittered to 50–100 %. A failing sink is never skipped. */
    retryMaxMs: z.number().int().min(1).default(30_000),
    /** Committed records kept in memory for sinks that are behind (default 65,536 records / 64 MiB); older ones are re-read from the store. */
    maxBufferedRecords: z.number().int().min(1).default(65_536),
    maxBufferedBytes: z.number().int().min(1).default(64 << 20),
    /** Records per deliver() call and per store read (default 4,096). */
    pageRecords: z.number().int().min(1).default(4096),
    /** After a checkpoint, wait this long (ms, default 10,000) for the sinks that are not failing; then delivery goes on in the background. */
    drainWaitMs: z.number().int().min(0).default(10_000),
    /** close() gives sinks this long (ms, default 10,000) to catch up, then fails with SINK_STALLED. */
    closeFlushMs: z.number().int().min(0).default(10_000),
  }).prefault({}),
  jsonl: z.object({
    /** The JSONL files (dead letters, segment changes, triggers) rotate at this size (bytes, default 256 MiB)… */
    maxFileBytes: z.number().int().min(1).default(256 << 20),
    /** …keeping this many files, the current one included (default 8); the oldest is deleted. */
    maxFiles: z.number().int().min(2).default(8),
  }).prefault({}),
  deadLetter: z.object({
    /** Dead-letter file (jsonl). Default `<dataDir>/deadletter.jsonl`; null with no dataDir keeps them in the outbox only. */
    path: z.string().nullable().default(null),
    /** Raw payload kept per dead letter (bytes, default 4096). */
    maxPayloadBytes: z.number().int().min(0).default(4096),
  }).prefault({}),
  kpi: z.object({
    /** KPIs, cohorts and funnels maintained (default true). Off: queries fail with KPI_DISABLED. */
    enabled: z.boolean().default(true),
    /** N of first_purchase_conversion: first purchase within N days of sign-up (default 7). */
    firstPurchaseDays: z.number().int().min(1).max(366).default(7),
    /** R of customers_at / crr / cohort_retention: purchase within the last R local days (default 90). */
    activeCustomerDays: z.number().int().min(1).max(3660).default(90),
    /**
     * Windows whose last day is more than this many days before the watermark's day are final and
     * leave memory (default 400). Larger keeps old windows open to identity stitches; memory grows
     * with it.
     */
    retentionDays: z.number().int().min(31).max(36_600).default(400),
  }).prefault({}),
  segments: z.object({
    /** Segments maintained (default true). */
    enabled: z.boolean().default(true),
    /**
     * Segment definitions (docs/SEGMENTS.md), validated when the engine starts. They override the
     * built-ins of the same id (cart_abandoners, dormant_30, dormant_60, vip, new_no_purchase_3d,
     * no_review_2d) and add to them. Default: the built-ins only.
     */
    definitions: z.array(z.unknown()).default([]),
    /** Segment changes as jsonl (default `<dataDir>/segment-changes.jsonl`; null with no dataDir: outbox only). */
    changesPath: z.string().nullable().default(null),
  }).prefault({}),
  campaigns: z.object({
    /**
     * A campaign document (docs/CAMPAIGNS.md: `{campaigns, caps, quietHours, attribution, consent}`),
     * validated when the engine starts; null: no campaigns. Needs segments on.
     */
    definitions: z.unknown().nullable().default(null),
    /** Triggers as jsonl (default `<dataDir>/triggers.jsonl`; null with no dataDir: outbox only). */
    triggersPath: z.string().nullable().default(null),
  }).prefault({}),
  /** Rows per batch handed through the pipeline (default 4096). */
  batchRows: z.number().int().min(1).max(1 << 20).default(4096),
}).superRefine((c, ctx) => {
  if (c.dedupe.horizonMs < c.time.allowedLatenessMs) {
    ctx.addIssue({ code: 'custom', path: ['dedupe', 'horizonMs'], message: `must be ≥ time.allowedLatenessMs (${c.time.allowedLatenessMs}) or late duplicates would be counted twice` });
  }
  if (c.state.backend === 'level' && c.dataDir === null) {
    ctx.addIssue({ code: 'custom', path: ['dataDir'], message: 'the level backend needs a dataDir' });
  }
  if (c.campaigns.definitions !== null && !c.segments.enabled) {
    ctx.addIssue({ code: 'custom', path: ['campaigns'], message: 'campaigns need segments.enabled (audiences and segment triggers are segments)' });
  }
  if (!isValidTimeZone(c.time.timeZone)) {
    ctx.addIssue({ code: 'custom', path: ['time', 'timeZone'], message: `unknown IANA time zone '${c.time.timeZone}' (e.g. Asia/Seoul, UTC)` });
  }
});

export type ConfigInput = z.input<typeof ConfigSchema>;
export type EngineConfig = Readonly<Omit<z.output<typeof ConfigSchema>, 'state'> & {
  state: { readonly backend: 'level' | 'memory'; readonly cacheUsers: number };
}>;

function isValidTimeZone(tz: string): boolean {
  try {
    new Intl.DateTimeFormat('en', { timeZone: tz });
    return true;
  } catch {
    return false;
  }
}

function deepFreeze<T>(o: T): T {
  if (o !== null && typeof o === 'object') {
    for (const v of Object.values(o)) deepFreeze(v);
    Object.freeze(o);
  }
  return o;
}

/** Validates and defaults a configuration; throws CONFIG_INVALID listing every problem with its path. */
export function resolveConfig(input: ConfigInput = {}): EngineConfig {
  const parsed = ConfigSchema.safeParse(input);
  if (!parsed.success) {
    const lines = parsed.error.issues.map((i) => `  ${i.path.length ? i.path.join('.') : '(root)'}: ${i.message}`);
    throw new CrmError('CONFIG_INVALID', `invalid crmstream configuration:\n${lines.join('\n')}`);
  }
  const c = parsed.data;
  const backend = c.state.backend ?? (c.dataDir === null ? 'memory' : 'level');
  return deepFreeze({ ...c, state: { ...c.state, backend } });
}
