/**
 * The crmstream library API.
 *
 * @example
 * import { createEngine } from 'crmstream';
 * const engine = await createEngine({ dataDir: './state' });
 * await engine.ingest([{ event_id: 'e1', type: 'visit', anonymous_id: 'a1', ts: Date.now() }]);
 * await engine.close();
 */
import { Engine, type EngineOptions } from './engine.js';
import type { ConfigInput } from './config.js';

export { Engine, formatDeadLetter, mergeKpis, type BatchResult, type EngineOptions, type SourceItem } from './engine.js';
export { EventColumns } from './batch.js';
export { resolveConfig, ConfigSchema, type ConfigInput, type EngineConfig } from './config.js';
export { CrmError, ErrorCodes, isCode, type ErrorCode } from './errors.js';
export { EventType, Reject, REJECT_NAMES, type RejectName } from './event-types.js';
export { Topic, type OutboxRecord, type OutboxSink } from './outbox.js';
export { JsonlFileSink } from './sinks/jsonl-file.js';
export type { Operator, OperatorContext, StateSlot, TimerApi, UserRecord } from '../operators/operator.js';
export type { ProfileView } from '../operators/profile.js';
export {
  COHORT_SCHEMA, FUNNEL_SCHEMA, KPI_SCHEMA, PROFILE_SCHEMA, SEGMENT_SCHEMA, TRIGGER_SCHEMA, ArrowRowBuilder, arrowSchema, rowsToTable,
  type ColumnKind, type ExportOptions, type ExportSchema, type ExportWhat,
} from './arrow-export.js';
export { MemoryStore, LevelStore, openStore, type KvStore } from '../state/index.js';

/** Creates an engine and restores it from its store (SPEC §7 `createEngine(config)`). */
export function createEngine(config: ConfigInput = {}, options: EngineOptions = {}): Promise<Engine> {
  return Engine.create(config, options);
}
