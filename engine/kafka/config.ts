import { z } from 'zod';
import { CrmError } from '../errors.js';

/** librdkafka properties passed through as they are (https://github.com/confluentinc/librdkafka/blob/master/CONFIGURATION.md). */
const RdkafkaProps = z.record(z.string(), z.union([z.string(), z.number(), z.boolean()]));

/**
 * The `kafka` section of a `crmstream run` configuration: where events come from and where
 * outputs go. Topics left null are not produced.
 */
export const KafkaConfigSchema = z.object({
  /** Bootstrap brokers, `host:port[,host:port…]`. */
  brokers: z.string().min(1, 'give at least one host:port'),
  /** Consumer group; instances with the same group share the events topic's partitions. */
  groupId: z.string().min(1).default('crmstream'),
  clientId: z.string().min(1).default('crmstream'),
  topics: z.object({
    /** The events topic (protobuf `crmstream.v1.Event` or JSON per `format`). */
    events: z.string().min(1).default('events'),
    /** Triggers (protobuf `Trigger`), keyed by user id. */
    triggers: z.string().min(1).nullable().default(null),
    /** Segment changes (protobuf `SegmentChange`), keyed by user id. */
    segmentChanges: z.string().min(1).nullable().default(null),
    /** KPI changes (protobuf `KpiUpdate`), keyed by KPI and window. */
    kpiUpdates: z.string().min(1).nullable().default(null),
    /** Dead letters (protobuf `DeadLetter`), keyed by reason. */
    deadLetters: z.string().min(1).nullable().default(null),
  }).strict().prefault({}),
  /** Encoding of event messages: `protobuf` (default) or `json` (one SPEC §1 object per message). */
  format: z.enum(['protobuf', 'json']).default('protobuf'),
  /**
   * Where a partition starts when the state has no offset for it (fresh data dir): `earliest`
   * (default: the state then covers the whole topic) or `latest`. Offsets committed to Kafka by
   * the group are not used for that: the checkpoint's offsets are the ones that match the state.
   */
  startFrom: z.enum(['earliest', 'latest']).default('earliest'),
  /**
   * Messages taken per consume call (default 16,384). Engine batches are cut from the buffer at
   * batchRows; a larger consume keeps the fetch ahead of the engine, so the engine never waits.
   */
  maxBatch: z.number().int().min(1).max(1 << 20).default(16_384),
  /** How long one consume call waits for the first message (ms, default 50): the idle poll period. */
  pollMs: z.number().int().min(1).max(10_000).default(50),
  /**
   * Delivered-but-unprocessed messages held at most (default 100,000), shared evenly by the
   * assigned partitions: a partition holding its share is paused until half of it is processed.
   */
  maxBuffered: z.number().int().min(1).default(100_000),
  /**
   * How far (ms of event time, default 60,000) a partition's stream time may run ahead of the
   * slowest active partition's (docs/KAFKA.md "Event time across partitions"). A partition that
   * far ahead is paused and not handed to the engine until the others catch up, so a backlog is
   * read with the partitions advancing together: the engine sees events at most this much (plus
   * one batch's first row) ahead of its watermark, and its pending timers and open windows stay
   * bounded. Small against allowed lateness (3 days) and timer horizons (minutes to days), large
   * enough that a dense topic still gives full batches; a sparse one gives small batches.
   */
  maxSkewMs: z.number().int().min(0).default(60_000),
  /**
   * A partition with nothing buffered and no message for this long (ms, default 30,000; a paused
   * one excepted) is idle: it stops holding the watermark back (Flink's idleness). A partition read
   * to its end offset is idle at once. A partition whose broker is down longer than this lets the
   * watermark go on; its events are then judged against it (accepted within allowed lateness, 3
   * days by default): raise it to make the watermark wait for such a partition instead.
   */
  partitionIdleMs: z.number().int().min(1).default(30_000),
  /** A sink keeps re-sending what the broker refused for this long before the run fails (ms, default 300,000). */
  deliveryTimeoutMs: z.number().int().min(1_000).default(300_000),
  /**
   * Scale-out across instances of one consumer group (docs/KAFKA.md "Several instances"). When set,
   * every instance in the group takes a share of the partitions; each partition of the events topic
   * is re-keyed by identity into `routeTopic`, and each partition of that topic is a task with its
   * own state, logged to `changelogTopic`. Both topics need as many partitions as the events topic;
   * the changelog needs cleanup.policy=delete and unlimited retention. Null: one instance per group.
   */
  scaleOut: z.object({
    routeTopic: z.string().min(1).default('crmstream-route'),
    changelogTopic: z.string().min(1).default('crmstream-changelog'),
    /**
     * How often each events partition's stream time (largest valid event time routed) and idleness
     * are broadcast to every task (ms, default 1,000); each task's watermark is the minimum over
     * the active events partitions (docs/KAFKA.md "Event time across partitions").
     */
    hintMs: z.number().int().min(10).max(60_000).default(1_000),
    /** Each task's KPI partials, for global KPIs any instance can read (`crmstream kpis`); N partitions. */
    partialsTopic: z.string().min(1).default('crmstream-kpi-partials'),
    /** How often a task whose KPIs changed publishes them (ms, default 5,000); also when it stops. */
    partialsMs: z.number().int().min(100).default(5_000),
  }).strict().nullable().default(null),
  /** Extra librdkafka properties for the consumer and the producer. */
  consumer: RdkafkaProps.default({}),
  producer: RdkafkaProps.default({}),
}).strict();

export type KafkaConfigInput = z.input<typeof KafkaConfigSchema>;
export type KafkaConfig = z.output<typeof KafkaConfigSchema>;

/** Validates a `kafka` section; CONFIG_INVALID lists every offending field as `kafka.<path>`. */
export function resolveKafkaConfig(input: unknown): KafkaConfig {
  const parsed = KafkaConfigSchema.safeParse(input);
  if (!parsed.success) {
    const lines = parsed.error.issues.map((i) => `  kafka${i.path.length ? '.' + i.path.join('.') : ''}: ${i.message}`);
    throw new CrmError('CONFIG_INVALID', `invalid kafka configuration:\n${lines.join('\n')}`);
  }
  return parsed.data;
}
