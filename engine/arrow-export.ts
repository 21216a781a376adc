import path from 'node:path';
import {
  Bool, Dictionary, Field, Float64, Int32, Int64, List, Map_, RecordBatch, Schema, Struct, Table, TimestampMillisecond, Utf8,
  makeBuilder, makeData, type Builder, type DataType,
} from 'apache-arrow';
import type { EngineConfig } from './config.js';
import { CrmError } from './errors.js';
import { readJsonl } from './sinks/jsonl-file.js';
import type { Engine } from './engine.js';
import { COHORT_FIELDS, KPI_FIELDS, type CohortGrain, type CohortKind, type CohortRow, type FunnelRow, type KpiGrain, type KpiRow } from '../operators/kpi-rows.js';
import type { ProfileView } from '../operators/profile.js';

/**
 * The typed shape of every export (SPEC §7/§9: KPI tables, cohort matrices, funnel, segment
 * members, profiles, triggers) and the one place rows become Arrow record batches. The jsonl / csv
 * writers print the rows as they are; the Arrow IPC (file, stream) and Parquet writers build
 * batches from the same rows with the declared column kinds, so a column's type never depends on
 * the values it happens to hold (a column of only nulls keeps its type).
 *
 * Column kinds:
 * - `string`: a categorical string, `Dictionary<Int32, Utf8>` (grain, window labels, channel, tier…);
 * - `text`: a string that is unique or nearly so per row (user ids, trigger ids), plain `Utf8` — a
 *   dictionary would only repeat the column;
 * - `timestamp`: an instant, `Timestamp<ms, "UTC">`; the rows may carry epoch ms or an ISO-8601 string;
 * - `float64`: money, rates (null where undefined);
 * - `int`: a count, `Int32`;
 * - `int64`: a sequence number, `Int64` (BigInt in apache-arrow, BIGINT in SQL);
 * - `bool`: `Bool`;
 * - `strings`: a list of strings, `List<Utf8>`;
 * - `string_map`: string → string, `Map<Utf8, Utf8>`.
 */
export type ColumnKind = 'string' | 'text' | 'timestamp' | 'float64' | 'int' | 'int64' | 'bool' | 'strings' | 'string_map';

/** Column name → kind, in output order (the jsonl key order, the csv header). */
export type ExportSchema = Readonly<Record<string, ColumnKind>>;

const KPI_FIELD_KINDS: Record<(typeof KPI_FIELDS)[number], ColumnKind> = {
  active_users: 'int', new_users: 'int', signups: 'int', signup_conversion: 'float64', purchasers: 'int', orders: 'int',
  revenue: 'float64', pcr: 'float64', arppu: 'float64', arpu: 'float64', repeat_purchase_rate: 'float64', first_purchasers: 'int',
  first_purchase_conversion: 'float64', revisit_rate_d1_3: 'float64', customers_start: 'int', customers_end: 'int', crr: 'float64',
  cohort_retention: 'float64', churn_rate: 'float64', spend: 'float64', cac: 'float64', clv: 'float64',
  first_purchase_maturing: 'bool', dormant_30: 'int', dormant_60: 'int', active_users_7d: 'int', active_users_30d: 'int',
};

/** `export kpis`: one row per (window, channel, platform); docs/KPIS.md. */
export const KPI_SCHEMA: ExportSchema = Object.freeze({
  grain: 'string', window: 'string', channel: 'string', platform: 'string',
  ...Object.fromEntries(KPI_FIELDS.map((f) => [f, KPI_FIELD_KINDS[f]])),
});

const COHORT_FIELD_KINDS: Record<(typeof COHORT_FIELDS)[number], ColumnKind> = {
  grain: 'string', cohort: 'string', size: 'int', age: 'int', active: 'int', purchasers: 'int', revenue: 'float64',
  kind: 'string', channel: 'string', platform: 'string', cum_revenue_per_user: 'float64',
};

/** `export cohorts`: cohort × age rows. */
export const COHORT_SCHEMA: ExportSchema = Object.freeze(Object.fromEntries(COHORT_FIELDS.map((f) => [f, COHORT_FIELD_KINDS[f]])));

/** `export funnel`: one row per sign-up cohort window and dimension. */
export const FUNNEL_SCHEMA: ExportSchema = Object.freeze({
  grain: 'string', cohort: 'string', channel: 'string', platform: 'string',
  visit: 'int', sign_up: 'int', first_purchase: 'int', revisit: 'int', repeat_purchase: 'int',
  sign_up_rate: 'float64', first_purchase_rate: 'float64', revisit_rate: 'float64', repeat_purchase_rate: 'float64',
} satisfies Record<keyof FunnelRow, ColumnKind>);

/** `export segment`: members with the instant they entered (jsonl: ISO-8601). */
export const SEGMENT_SCHEMA: ExportSchema = Object.freeze({ user_id: 'text', since: 'timestamp', tier: 'string' });

/** `export profiles`: the profile view (jsonl: times as epoch ms). */
export const PROFILE_SCHEMA: ExportSchema = Object.freeze({
  user_id: 'text', first_ts: 'timestamp', first_channel: 'string', last_ts: 'timestamp', last_platform: 'string',
  signup_ts: 'timestamp', first_purchase_ts: 'timestamp', last_purchase_ts: 'timestamp',
  purchases: 'int', refunds: 'int', revenue: 'float64', events: 'int',
} satisfies Record<keyof ProfileView, ColumnKind>);

/** `export triggers`: the lines of the triggers file (docs/CAMPAIGNS.md; jsonl: times as epoch ms). */
export const TRIGGER_SCHEMA: ExportSchema = Object.freeze({
  seq: 'int64', trigger_id: 'text', campaign_id: 'string', variant: 'string', control: 'bool', user_id: 'text',
  channels: 'strings', template_id: 'string', params: 'string_map', reason: 'text', ts: 'timestamp', send_after: 'timestamp',
});

function arrowType(kind: ColumnKind): DataType {
  switch (kind) {
    case 'string': return new Dictionary(new Utf8(), new Int32());
    case 'text': return new Utf8();
    case 'timestamp': return new TimestampMillisecond('UTC');
    case 'float64': return new Float64();
    case 'int': return new Int32();
    case 'int64': return new Int64();
    case 'bool': return new Bool();
    case 'strings': return new List(new Field('item', new Utf8(), true));
    case 'string_map': {
      const entries = new Struct<{ key: Utf8; value: Utf8 }>([new Field('key', new Utf8(), false), new Field('value', new Utf8(), true)]);
      return new Map_<Utf8, Utf8>(new Field('entries', entries, false));
    }
  }
}

/** The Arrow schema of an export (every column nullable). Each call makes new dictionary ids. */
export function arrowSchema(schema: ExportSchema): Schema {
  return new Schema(Object.entries(schema).map(([name, kind]) => new Field(name, arrowType(kind), true)));
}

type Convert = (v: unknown) => unknown;
const asIs: Convert = (v) => v;
/** Epoch ms or an ISO-8601 string → epoch ms (integral: the column stores int64 ms). */
const toMs: Convert = (v) => {
  if (v === null) return null;
  const ms = typeof v === 'number' ? v : Date.parse(String(v));
  return Number.isFinite(ms) ? Math.trunc(ms) : null;
};
const toBigInt: Convert = (v) => (v === null ? null : BigInt(v as number));

/**
 * Rows → record batches of one export schema. Appending is column by column through builders
 * chosen when the schema is set (no per-value switch on the kind); `flush` hands over what was
 * appended as one batch. Dictionaries grow across flushes, so the batches of one builder share
 * them (the IPC writers emit the additions as delta dictionaries).
 *
 * @example
 * const b = new ArrowRowBuilder(SEGMENT_SCHEMA);
 * b.append({ user_id: 'u1', since: '2024-03-01T00:00:00.000Z', tier: 'gold' });
 * const batch = b.flush();
 */
export class ArrowRowBuilder {
  readonly schema: Schema;
  private readonly names: string[];
  private readonly builders: Builder[];
  private readonly converts: Convert[];
  /** Rows appended since the last flush. */
  length = 0;

  constructor(schema: ExportSchema) {
    this.schema = arrowSchema(schema);
    this.names = Object.keys(schema);
    this.builders = this.schema.fields.map((f) => makeBuilder({ type: f.type, nullValues: [null, undefined] }));
    this.converts = Object.values(schema).map((k) => (k === 'timestamp' ? toMs : k === 'int64' ? toBigInt : asIs));
  }

  append(row: Readonly<Record<string, unknown>>): void {
    const { names, builders, converts } = this;
    for (let c = 0; c < names.length; c++) builders[c]!.append(converts[c]!(row[names[c]!] ?? null));
    this.length++;
  }

  /** The rows appended since the last flush as one batch (possibly empty). */
  flush(): RecordBatch {
    const children = this.builders.map((b) => b.flush());
    const length = this.length;
    this.length = 0;
    return new RecordBatch(this.schema, makeData({ type: new Struct(this.schema.fields), length, nullCount: 0, children }));
  }
}

/** An Arrow table of rows with the export's declared column types. */
export function rowsToTable(rows: Iterable<Readonly<Record<string, unknown>>>, schema: ExportSchema): Table {
  const b = new ArrowRowBuilder(schema);
  for (const r of rows) b.append(r);
  return new Table(b.schema, [b.flush()]);
}

/** What `exportArrow` / `crmstream export` can export. */
export type ExportWhat = 'kpis' | 'cohorts' | 'funnel' | 'segment' | 'profiles' | 'triggers';

export interface ExportOptions {
  /** kpis, funnel: day | week | month; cohorts: week | month. */
  grain?: KpiGrain;
  /** cohorts: by first activity (default), by sign-up, or both kinds one after the other. */
  kind?: CohortKind | 'both';
  /** segment: the segment id. */
  segment?: string;
}

/** An export's schema and its rows (streamed where the source is large: profiles, members, triggers). */
export interface ExportSource {
  readonly schema: ExportSchema;
  readonly rows: AsyncIterable<Record<string, unknown>>;
}

/** The rows of a query, run when the iteration starts (not before: nothing runs for an export never read). */
async function* each<T extends object>(query: () => Promise<readonly T[]>): AsyncGenerator<Record<string, unknown>> {
  for (const r of await query()) yield r as Record<string, unknown>;
}

function needGrain<G extends string>(what: string, grain: string | undefined, allowed: readonly G[]): G {
  if (grain === undefined || !(allowed as readonly string[]).includes(grain)) {
    throw new CrmError('CONFIG_INVALID', `export ${what} needs a grain: one of ${allowed.join(', ')} (got ${String(grain)})`);
  }
  return grain as G;
}

/** The triggers file of a configuration (docs/CAMPAIGNS.md), or null when triggers are not written to one. */
export function triggersFile(config: Pick<EngineConfig, 'dataDir'> & { campaigns: Pick<EngineConfig['campaigns'], 'triggersPath'> }): string | null {
  return config.campaigns.triggersPath ?? (config.dataDir === null ? null : path.join(config.dataDir, 'triggers.jsonl'));
}

/**
 * The triggers of a triggers file and of its rotated files (`<file>.<seq>`, engine/sinks/jsonl-file.ts),
 * oldest first, one object a line, read in 64 KiB chunks. A last line without its newline is a write a
 * crash cut short (the sink cuts it off when it reopens): skipped. A file that does not exist yet
 * holds no triggers. Each outbox seq is read once (the sink also writes it once); de-duplicate on
 * `trigger_id` where a trigger may have been decided twice.
 */
export async function* readTriggers(file: string): AsyncGenerator<Record<string, unknown>> {
  yield* readJsonl(file);
}

/**
 * The rows of one export with its schema — shared by `crmstream export` and `engine.exportArrow`.
 * Segment members carry `since` as ISO-8601 and profiles their times as epoch ms, as their jsonl
 * always has; the Arrow builders turn both into timestamps.
 */
export function exportSource(engine: Engine, what: ExportWhat, opts: ExportOptions = {}): ExportSource {
  switch (what) {
    case 'kpis': {
      const grain = needGrain(what, opts.grain, ['day', 'week', 'month'] as const);
      return { schema: KPI_SCHEMA, rows: each<KpiRow>(() => engine.kpis(grain)) };
    }
    case 'cohorts': {
      const grain = needGrain<CohortGrain>(what, opts.grain, ['week', 'month']);
      const kind = opts.kind ?? 'first_activity';
      const kinds: CohortKind[] = kind === 'both' ? ['first_activity', 'signup'] : [kind];
      return { schema: COHORT_SCHEMA, rows: each<CohortRow>(async () => (await Promise.all(kinds.map((k) => engine.cohorts(grain, k)))).flat()) };
    }
    case 'funnel': {
      const grain = needGrain(what, opts.grain, ['day', 'week', 'month'] as const);
      return { schema: FUNNEL_SCHEMA, rows: each<FunnelRow>(() => engine.funnel(grain)) };
    }
    case 'segment': {
      const id = opts.segment;
      if (id === undefined) throw new CrmError('CONFIG_INVALID', 'export segment needs a segment id (segment)');
      return {
        schema: SEGMENT_SCHEMA,
        rows: (async function* () {
          for await (const m of engine.segmentMembers(id)) yield { user_id: m.user_id, since: new Date(m.since).toISOString(), tier: m.tier };
        })(),
      };
    }
    case 'profiles':
      return {
        schema: PROFILE_SCHEMA,
        rows: (async function* () {
          // The scan reads the store: checkpoint first so it holds every profile (as segmentMembers does).
          await engine.checkpoint();
          for await (const p of engine.profilesStored()) yield p as unknown as Record<string, unknown>;
        })(),
      };
    case 'triggers': {
      const file = triggersFile(engine.config);
      if (file === null) throw new CrmError('CAMPAIGNS_DISABLED', 'triggers are written to no file in this engine (no dataDir, no campaigns.triggersPath): listen with onTrigger');
      return {
        schema: TRIGGER_SCHEMA,
        rows: (async function* () {
          // A checkpoint hands the triggers decided so far to the file sink.
          await engine.checkpoint();
          yield* readTriggers(file);
        })(),
      };
    }
    default:
      throw new CrmError('CONFIG_INVALID', `nothing to export as '${String(what)}' (kpis, cohorts, funnel, segment, profiles, triggers)`);
  }
}

/** One export as an Arrow table (the whole export in memory; `crmstream export` streams batches instead). */
export async function exportTable(engine: Engine, what: ExportWhat, opts: ExportOptions = {}): Promise<Table> {
  const { schema, rows } = exportSource(engine, what, opts);
  const b = new ArrowRowBuilder(schema);
  for await (const r of rows) b.append(r);
  return new Table(b.schema, [b.flush()]);
}
