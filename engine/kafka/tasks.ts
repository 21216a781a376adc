/**
 * Scale-out on Kafka's consumer-group machinery, as Kafka Streams does it (docs/KAFKA.md "Several
 * instances"). Every instance of the group runs a ScaleOutRunner; the group's range assignor hands
 * each one the same partition numbers of two co-partitioned topics (N partitions each):
 *
 * - **events/q → route (stage 0, stateless).** Each message of an owned events partition is
 *   wrapped in a `Routed` record and produced to partition `partitionOf(routeKey)` of the route
 *   topic, with headers `crmstream-src: e<q>` and `crmstream-seq: <offset>`. The events offsets are
 *   committed to the group once those deliveries are acknowledged; a crash re-routes from the
 *   committed offset and the tasks drop what they have seen (below). Every `hintMs` q's stream
 *   time (the largest valid event time routed from it) and whether q is idle (read to its end, or
 *   silent for partitionIdleMs) go to every route partition (after those events: one producer,
 *   one partition, one order). Each task's watermark is the MINIMUM over the active events
 *   partitions (engine/watermarks.ts), as one engine reading them all keeps it, so a partition
 *   routed behind the others loses nothing. An events partition whose stream time runs
 *   `maxSkewMs` ahead of the slowest active one (as this instance knows it: its own partitions,
 *   and the hints its tasks received) is paused, so a backlog is routed with partitions together.
 *   Rows a task forwards reach their task later than the hints of their events partition (after
 *   the forwarding task's checkpoint): so each task also announces, once its forwards up to a
 *   checkpoint are delivered, its own event time over the events partitions (`crmstream-hint:
 *   t<p>`) to the other tasks, and a task's watermark is the minimum over those announcements
 *   too. A forwarded row was accepted against a watermark no later than the one its sender
 *   announced after it, so it is never `too_late` where it lands.
 * - **route/p → task p (stateful).** An Engine with `partitionRouter(p, N)` and its own state: a
 *   LevelDB copy under `<dataDir>/tasks/<p>` behind a ChangelogStore that logs every checkpoint to
 *   partition p of the changelog topic before applying it. A task is opened when p is assigned:
 *   restored from the changelog (or from its local copy when current), then its route partition is
 *   read from the offset its checkpoint covers. Rows whose profile lives in another partition are
 *   forwarded (outbox → route topic, headers `crmstream-src: t<p>e<q>`, seq = the event's input
 *   offset), with the anonymous profile when the row stitched it to a member held elsewhere.
 * - **Exactly-once state.** A task's position — its route offset and, per source, the highest
 *   seq it has processed — is part of the checkpoint, so state, offset and de-duplication move
 *   together. Re-sent records (stage-0 restarts, a task's outbox re-fed after a restore) carry the
 *   seq they had the first time and are skipped by it. Outputs (triggers, segment changes, dead
 *   letters) are at-least-once with stable ids, as with one instance.
 * - **Rebalances.** Revoked tasks are checkpointed and closed, and revoked events partitions
 *   flushed and committed, before the partitions are released (unassign).
 */
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import Kafka from 'node-rdkafka';
import type { Assignment, KafkaConsumer, LibrdKafkaError, Message, MessageHeader } from 'node-rdkafka';
import { crmstream } from '../../api/proto/gen/crmstream.js';
import { openStore } from '../../state/index.js';
import { EventColumns } from '../batch.js';
import { appendJsonEvent, appendProtoEvent } from '../codec.js';
import { resolveConfig, type ConfigInput, type EngineConfig } from '../config.js';
import { Engine } from '../engine.js';
import { CrmError } from '../errors.js';
import { Reject } from '../event-types.js';
import { Topic, type OutboxRecord, type OutboxSink } from '../outbox.js';
import { appendRouted, partitionOf, partitionRouter, routeKey } from '../routing.js';
import { SharedProducer, openChangelogStore, type ChangelogMessage, type RestoreStats } from './changelog.js';
import type { KafkaConfig } from './config.js';
import { publishPartials } from './partials.js';
import { header, partitionCount } from './util.js';
import type { InputTimesHolder, InputWatermarks } from '../watermarks.js';

const ERR_ASSIGN = -175;
const ERR_REVOKE = -174;
/** librdkafka's "the group's committed offset, else auto.offset.reset". */
const OFFSET_STORED = -1000;
const H_SRC = 'crmstream-src';
const H_SEQ = 'crmstream-seq';
/** Stream-time hints: the events partition they describe, and `1` when it is idle. */
const H_HINT = 'crmstream-hint';
const H_IDLE = 'crmstream-idle';

/**
 * A task's checkpointed position: its route offset, the highest seq processed per source, and the
 * events partitions' stream times and idle flags as the task had them (from in-band hints: restored
 * as they were, so the watermark continues exactly).
 */
export interface TaskPosition {
  readonly task: {
    readonly topic: string; readonly partition: number; readonly offset: number; readonly hw: Readonly<Record<string, number>>;
    readonly times?: Readonly<Record<string, number>> | null; readonly idle?: readonly number[] | null;
  };
}

/** The mutable `task` part of a TaskPosition: the engine fills `times` after the batch. */
interface TaskPositionPart extends InputTimesHolder {
  readonly topic: string;
  readonly partition: number;
  readonly offset: number;
  readonly hw: Record<string, number>;
}

function isTaskPosition(p: unknown, topic: string, partition: number): p is TaskPosition {
  const t = (p as { task?: { topic?: unknown; partition?: unknown; offset?: unknown; hw?: unknown } } | null)?.task;
  return t !== undefined && t.topic === topic && t.partition === partition && typeof t.offset === 'number' && typeof t.hw === 'object' && t.hw !== null;
}

export interface ScaleOutStats {
  /** Events partitions this instance routes, and tasks (route partitions) it runs. */
  readonly events: readonly number[];
  readonly tasks: readonly number[];
  readonly routed: number;
  readonly hints: number;
  /** Route records skipped as already processed (re-sent after a restart or restore). */
  readonly duplicatesSkipped: number;
  readonly processed: number;
  /** Rows this instance's tasks forwarded to another partition, and anonymous profiles that moved out / in with them. */
  readonly forwarded: number;
  readonly movedOut: number;
  readonly movedIn: number;
  readonly rebalances: number;
  readonly restores: readonly (RestoreStats & { readonly partition: number })[];
  readonly commits: number;
  readonly errors: number;
  /** KPI partials sets published (engine/kafka/partials.ts). */
  readonly partialsPublished: number;
}

export interface ScaleOutOptions {
  readonly engine: ConfigInput;
  readonly kafka: KafkaConfig;
  /** Tasks keep their local copies under `<dataDir>/tasks/<partition>`. */
  readonly dataDir: string;
  /** Stop once every assigned partition of both topics is read to its end and nothing is in flight. */
  readonly exitAtEnd?: boolean;
  readonly onError?: (err: unknown) => void;
  /** The output topics' sink, shared by every task (it is not closed by them). */
  readonly sink?: OutboxSink | null;
}

/** One task: an engine for one route partition. */
interface Task {
  readonly p: number;
  readonly engine: Engine;
  readonly batch: EventColumns;
  /** Next route offset to process; messages below it have been processed (or skipped) already. */
  next: number;
  readonly hw: Map<string, number>;
  /** The engine's per-input watermarks: one input per events partition. */
  readonly inputs: InputWatermarks;
  /** The input the rows in `batch` count for: their events partition, −1 for forwarded rows. */
  batchInput: number;
  /** The event time over the events partitions this task last announced to the others. */
  announced: number;
  /** Processed since the last checkpoint. */
  dirty: boolean;
  /** Processed since its KPI partials were last published. */
  unpublished: boolean;
}

/**
 * Runs this instance's share of a scaled-out group. `run()` returns after close() (SIGTERM) or,
 * with exitAtEnd, when the assigned partitions are drained.
 *
 * @example
 * const runner = await ScaleOutRunner.connect({ engine: cfg, kafka, dataDir: '/var/lib/crmstream' });
 * process.once('SIGTERM', () => runner.close());
 * await runner.run();
 */
export class ScaleOutRunner {
  private readonly tasks = new Map<number, Task>();
  /** Events partitions this instance routes → next offset to route. */
  private readonly eventsNext = new Map<number, number>();
  /** Largest valid event time routed per events partition, and the last hint broadcast (`ts|idle`). */
  private readonly maxTs = new Map<number, number>();
  private readonly hinted = new Map<number, string>();
  /** Per owned events partition: performance.now() of its last message (or its assignment). */
  private readonly lastMsgAt = new Map<number, number>();
  /** Owned events partitions paused for skew. */
  private readonly pausedEvents = new Set<number>();
  /** Other instances' events partitions as the hints received here describe them. */
  private readonly peers = new Map<number, { ts: number; idle: boolean }>();
  private readonly eofAt = new Map<string, number>();
  /** Rebalance callbacks, handled by the loop between consume calls (the work is async). */
  private readonly rebalances: { err: LibrdKafkaError; assignment: Assignment[] }[] = [];
  /** Stage-0 deliveries, in order: offsets are committed when their messages are acknowledged. */
  private stage0: Promise<void> = Promise.resolve();
  private stage0Error: unknown = null;
  private stage0InFlight = 0;
  private lastHint = 0;
  private lastPublish = 0;
  private lastCheckpoint = 0;
  private closing = false;
  /** Set when the tasks are closed: the revoke of the final disconnect is answered at once. */
  private stopped = false;
  /** The engine settings every task shares (defaults applied once): batch size, zone, backend, checkpoint interval. */
  private readonly cfg: EngineConfig;
  private readonly counters = { routed: 0, hints: 0, duplicatesSkipped: 0, processed: 0, rebalances: 0, commits: 0, errors: 0, partialsPublished: 0 };
  /** Engine routing counters of tasks already closed here (open ones are added in stats()). */
  private readonly closedRouting = { forwarded: 0, movedOut: 0, movedIn: 0 };
  private readonly restores: (RestoreStats & { partition: number })[] = [];
  private readonly scratch = new EventColumns(1);

  private constructor(
    private readonly opts: ScaleOutOptions,
    private readonly consumer: KafkaConsumer,
    private readonly producer: SharedProducer,
    private readonly n: number,
  ) {
    this.cfg = resolveConfig({ ...opts.engine, dataDir: opts.dataDir });
  }

  private get events(): string {
    return this.opts.kafka.topics.events;
  }

  private get route(): string {
    return this.opts.kafka.scaleOut!.routeTopic;
  }

  /** Connects, checks the three topics have the same partition count, and joins the group. */
  static async connect(opts: ScaleOutOptions): Promise<ScaleOutRunner> {
    const k = opts.kafka;
    if (k.scaleOut === null) throw new CrmError('CONFIG_INVALID', 'kafka.scaleOut is not set');
    let self: ScaleOutRunner | null = null;
    const producer = await SharedProducer.connect(k.brokers, k.clientId, k.producer);
    const consumer = new Kafka.KafkaConsumer({
      ...k.consumer,
      'metadata.broker.list': k.brokers,
      'group.id': k.groupId,
      'client.id': k.clientId,
      'enable.auto.commit': false,
      'enable.auto.offset.store': false,
      'enable.partition.eof': true,
      // Range gives a member the same partition numbers of both topics: its tasks' inputs.
      'partition.assignment.strategy': 'range',
      offset_commit_cb: (err: LibrdKafkaError | null) => {
        if (self === null) return;
        if (err) {
          self.counters.errors++;
          opts.onError?.(err);
        } else self.counters.commits++;
      },
      rebalance_cb: (err: LibrdKafkaError, assignment: Assignment[]) => {
        if (self === null) return;
        // Leaving the group (disconnect) revokes too, and waits for the unassign: the tasks are
        // closed by then, so it is answered here; the loop is no longer there to do it.
        if (self.stopped) consumer.unassign();
        else self.rebalances.push({ err, assignment });
      },
    }, { 'auto.offset.reset': k.startFrom });
    try {
      await new Promise<void>((resolve, reject) => {
        consumer.connect({ timeout: 30_000 }, (err) => (err ? reject(new CrmError('KAFKA_ERROR', `cannot connect the consumer to ${k.brokers}`, { cause: err })) : resolve()));
      });
      const n = await partitionCount(consumer, k.topics.events);
      for (const t of [k.scaleOut.routeTopic, k.scaleOut.changelogTopic, k.scaleOut.partialsTopic]) {
        const m = await partitionCount(consumer, t);
        if (m !== n) {
          throw new CrmError('CONFIG_INVALID', `scale-out: topic ${t} has ${m} partitions, the events topic ${k.topics.events} has ${n}: create it with ${n} (the changelog with cleanup.policy=delete, retention.ms=-1)`);
        }
      }
      self = new ScaleOutRunner(opts, consumer, producer, n);
    } catch (err) {
      await new Promise<void>((resolve) => consumer.disconnect(() => resolve()));
      await producer.close().catch(() => undefined);
      throw err;
    }
    const runner = self;
    consumer.on('event.error', (err) => {
      runner.counters.errors++;
      opts.onError?.(err);
    });
    consumer.on('partition.eof', (e) => runner.eofAt.set(`${e.topic}/${e.partition}`, e.offset));
    consumer.setDefaultConsumeTimeout(k.pollMs);
    consumer.subscribe([k.topics.events, k.scaleOut.routeTopic]);
    return runner;
  }

  stats(): ScaleOutStats {
    const routing = { ...this.closedRouting };
    for (const t of this.tasks.values()) addRouting(routing, t.engine);
    return {
      ...this.counters, ...routing, events: [...this.eventsNext.keys()].sort((a, b) => a - b), tasks: [...this.tasks.keys()].sort((a, b) => a - b),
      restores: [...this.restores],
    };
  }

  /** The engines of the tasks this instance runs now (queries; KPI partials). */
  engines(): ReadonlyMap<number, Engine> {
    return new Map([...this.tasks].map(([p, t]) => [p, t.engine]));
  }

  /** Asks run() to stop: it checkpoints and closes every task, then leaves the group. */
  close(): void {
    this.closing = true;
  }

  /** The consume → route → process loop. Resolves after close() or, with exitAtEnd, when drained. */
  async run(): Promise<void> {
    let failure: unknown = null;
    try {
      while (!this.closing) {
        await this.handleRebalances();
        if (this.stage0Error !== null) throw this.stage0Error;
        const msgs = await new Promise<Message[]>((resolve, reject) => {
          this.consumer.consume(this.opts.kafka.maxBatch, (err, m) => (err ? reject(new CrmError('KAFKA_ERROR', 'consuming failed', { cause: err })) : resolve(m)));
        });
        // A rebalance served during that consume decides which of these messages are still ours.
        await this.handleRebalances();
        await this.dispatch(msgs);
        await this.periodic();
        if (this.opts.exitAtEnd === true && msgs.length === 0 && (await this.drained())) break;
      }
    } catch (err) {
      failure = err;
    }
    try {
      await this.shutdown();
    } catch (err) {
      if (failure === null) failure = err;
    }
    if (failure !== null) throw failure;
  }

  // -------------------------------------------------------------------------------------------
  // Rebalances
  // -------------------------------------------------------------------------------------------

  private async handleRebalances(): Promise<void> {
    while (this.rebalances.length > 0) {
      const { err, assignment } = this.rebalances.shift()!;
      this.counters.rebalances++;
      if (err.code === ERR_ASSIGN) await this.assign(assignment);
      else if (err.code === ERR_REVOKE) await this.revoke();
      else throw new CrmError('KAFKA_ERROR', `rebalance failed: ${err.message}`, { cause: err });
    }
  }

  /**
   * Tasks are restored first, then everything is assigned at once: events partitions at the
   * group's committed offset, route partitions at the offset each task's checkpoint covers. The
   * group waits for this assign, so nothing is fetched for a task before its state is back.
   */
  private async assign(assignment: Assignment[]): Promise<void> {
    const eventsParts = assignment.filter((a) => a.topic === this.events).map((a) => a.partition);
    const routeParts = assignment.filter((a) => a.topic === this.route).map((a) => a.partition);
    for (const a of assignment) this.eofAt.delete(`${a.topic}/${a.partition}`);
    for (const p of routeParts) this.tasks.set(p, await this.openTask(p));
    const now = performance.now();
    for (const q of eventsParts) {
      this.eventsNext.set(q, -1);
      this.lastMsgAt.set(q, now);
    }
    this.consumer.assign([
      ...eventsParts.map((partition) => ({ topic: this.events, partition, offset: OFFSET_STORED })),
      ...routeParts.map((partition) => ({ topic: this.route, partition, offset: this.tasks.get(partition)!.next })),
    ]);
  }

  /** Everything owned is made durable and committed, then released. */
  private async revoke(): Promise<void> {
    await this.flushStage0();
    for (const t of this.tasks.values()) await this.closeTask(t);
    this.tasks.clear();
    // What was routed from them stays known until their new owner's hints say more.
    for (const q of this.eventsNext.keys()) this.peers.set(q, { ts: Math.max(this.peers.get(q)?.ts ?? 0, this.maxTs.get(q) ?? 0), idle: false });
    try {
      if (this.pausedEvents.size > 0) this.consumer.resume([...this.pausedEvents].map((partition) => ({ topic: this.events, partition })));
    } catch (err) {
      this.counters.errors++;
      this.opts.onError?.(err);
    }
    this.pausedEvents.clear();
    this.eventsNext.clear();
    this.maxTs.clear();
    this.hinted.clear();
    this.lastMsgAt.clear();
    this.consumer.unassign();
  }

  private async openTask(p: number): Promise<Task> {
    const dir = path.join(this.opts.dataDir, 'tasks', String(p));
    const kind = this.cfg.state.backend;
    const local = openStore(kind, kind === 'level' ? path.join(dir, 'state') : null);
    const { store, restored } = await openChangelogStore(local, this.producer, {
      brokers: this.opts.kafka.brokers, topic: this.opts.kafka.scaleOut!.changelogTopic, partition: p, clientId: this.opts.kafka.clientId,
    });
    this.restores.push({ ...restored, partition: p });
    const sinks: OutboxSink[] = [new RouteSink(p, this.n, this.route, this.producer, this.opts.kafka.deliveryTimeoutMs)];
    if (this.opts.sink) sinks.push(shared(this.opts.sink));
    let engine: Engine;
    try {
      engine = await Engine.create({ ...this.opts.engine, dataDir: dir }, { store, router: partitionRouter(p, this.n), sinks });
    } catch (err) {
      await store.close().catch(() => undefined);
      throw err;
    }
    const pos = engine.position;
    // Per-input watermarks: one input per events partition, all of them counting from the start
    // (a partition not heard from yet holds the watermark, until its hint says it is idle).
    // Inputs 0..N-1: the events partitions (hints); N + p': the other tasks' announcements.
    const inputs = engine.inputWatermarks();
    inputs.assign(Array.from({ length: 2 * this.n }, (_, i) => i).filter((i) => i !== this.n + p));
    const task: Task = {
      p, engine, batch: new EventColumns(this.cfg.batchRows), next: 0, hw: new Map(), inputs, batchInput: -1, announced: Number.NEGATIVE_INFINITY,
      dirty: false, unpublished: true,
    };
    if (isTaskPosition(pos, this.route, p)) {
      task.next = pos.task.offset;
      for (const [src, seq] of Object.entries(pos.task.hw)) task.hw.set(src, seq);
      inputs.restore(pos.task.times ?? null, pos.task.idle ?? null);
    }
    engine.onCheckpoint((position) => {
      if (!isTaskPosition(position, this.route, p) || this.closing) return;
      try {
        this.consumer.commit([{ topic: this.route, partition: p, offset: position.task.offset }]);
      } catch (err) {
        this.counters.errors++;
        this.opts.onError?.(err);
      }
    });
    return task;
  }

  private async closeTask(t: Task): Promise<void> {
    if (t.unpublished) await this.publish(t);
    // Engine.close takes the last checkpoint (logged to the changelog) and delivers its outbox.
    await t.engine.close();
    addRouting(this.closedRouting, t.engine);
  }

  // -------------------------------------------------------------------------------------------
  // The loop's work
  // -------------------------------------------------------------------------------------------

  private async dispatch(msgs: Message[]): Promise<void> {
    if (msgs.length === 0) return;
    const routeByTask = new Map<number, Message[]>();
    const toRoute: Message[] = [];
    for (const m of msgs) {
      const key = `${m.topic}/${m.partition}`;
      if (m.offset >= (this.eofAt.get(key) ?? Infinity)) this.eofAt.delete(key);
      if (m.topic === this.events) {
        if (this.eventsNext.has(m.partition)) toRoute.push(m);
      } else if (m.topic === this.route) {
        const t = this.tasks.get(m.partition);
        if (t === undefined || m.offset < t.next) continue; // revoked, or already processed
        listOf(routeByTask, m.partition).push(m);
      }
    }
    if (toRoute.length > 0) this.routeEvents(toRoute);
    for (const [p, list] of routeByTask) await this.process(this.tasks.get(p)!, list);
  }

  /** Stage 0: re-keys events by identity into the route topic (acknowledged before their offsets are committed). */
  private routeEvents(msgs: Message[]): void {
    const json = this.opts.kafka.format === 'json';
    const tz = this.cfg.time.timeZone;
    const byDest = new Map<number, ChangelogMessage[]>();
    const commit = new Map<number, number>();
    const b = this.scratch;
    // Only a time the tasks will accept is a stream time: one far-future event (rejected there,
    // future_timestamp) must not become the hint that moves every task's watermark.
    const { minTs, maxTs: maxTsAbs, maxFutureMs } = this.cfg.time;
    const tsBound = Math.min(maxTsAbs, maxFutureMs === null ? Number.POSITIVE_INFINITY : Date.now() + maxFutureMs);
    const now = performance.now();
    for (const m of msgs) {
      const origin = `${m.topic}/${m.partition}@${m.offset}`;
      const value = m.value ?? EMPTY;
      b.reset();
      if (json) appendJsonEvent(b, value.toString('utf8'), origin, tz);
      else appendProtoEvent(b, value, origin);
      // An event that does not decode still goes to a task (by its origin), to be dead-lettered there.
      const key = b.status[0] === Reject.ok ? routeKey(b.userId[0]!, b.anonymousId[0]!, b.eventId[0]!) : origin;
      const ts = b.ts[0]!;
      if (b.status[0] === Reject.ok && ts >= minTs && ts < tsBound && ts > (this.maxTs.get(m.partition) ?? -Infinity)) this.maxTs.set(m.partition, ts);
      this.lastMsgAt.set(m.partition, now);
      const dest = partitionOf(key, this.n);
      listOf(byDest, dest).push({
        key,
        value: crmstream.v1.Routed.encode({ event: value, json, origin }).finish(),
        headers: [{ [H_SRC]: `e${m.partition}` }, { [H_SEQ]: String(m.offset) }],
      });
      commit.set(m.partition, m.offset + 1);
      this.eventsNext.set(m.partition, m.offset + 1);
    }
    this.counters.routed += msgs.length;
    this.send(byDest, commit);
  }

  /** Produces, and chains the commit of `commit` behind every earlier stage-0 delivery. */
  private send(byDest: Map<number, ChangelogMessage[]>, commit: Map<number, number>): void {
    const deliveries = [...byDest].map(([p, list]) => this.producer.produceBatch(this.route, p, list));
    this.stage0InFlight++;
    this.stage0 = this.stage0.then(async () => {
      const outs = await Promise.all(deliveries);
      this.stage0InFlight--;
      const failed = outs.find((o) => o.failed > 0);
      if (failed !== undefined) {
        // librdkafka retried for message.timeout.ms: stop; a restart re-routes from the committed offsets.
        throw new CrmError('KAFKA_ERROR', `routing to ${this.route} failed: ${failed.errors.find((e) => e !== null)!.message}`);
      }
      const tps = [...commit].filter(([q]) => this.eventsNext.has(q)).map(([partition, offset]) => ({ topic: this.events, partition, offset }));
      if (tps.length > 0) this.consumer.commit(tps);
    }).catch((err: unknown) => {
      this.stage0Error ??= err;
    });
  }

  private async flushStage0(): Promise<void> {
    this.broadcastHints();
    await this.stage0;
    if (this.stage0Error !== null) throw this.stage0Error;
  }

  /**
   * Each owned events partition's stream time and idleness, to every task (after the events it
   * covers), when they changed. Routed.watermark 0 = no valid event routed from it yet.
   */
  private broadcastHints(): void {
    const byDest = new Map<number, ChangelogMessage[]>();
    const now = performance.now();
    for (const q of this.eventsNext.keys()) {
      const ts = this.maxTs.get(q) ?? 0;
      const idle = this.eventsIdle(q, now);
      if (ts === 0 && !idle) continue; // nothing to say yet
      const said = `${ts}|${idle ? 1 : 0}`;
      if (this.hinted.get(q) === said) continue;
      this.hinted.set(q, said);
      const value = crmstream.v1.Routed.encode({ watermark: ts }).finish();
      const headers: MessageHeader[] = [{ [H_HINT]: String(q) }, { [H_IDLE]: idle ? '1' : '0' }];
      for (let p = 0; p < this.n; p++) listOf(byDest, p).push({ key: `hint-e${q}`, value, headers });
      this.counters.hints++;
    }
    if (byDest.size > 0) this.send(byDest, new Map());
  }

  /**
   * An owned events partition is idle when everything up to its end offset (partition EOF, or the
   * high watermark librdkafka cached from fetch responses) is routed, or when, not paused, no
   * message came for partitionIdleMs.
   */
  private eventsIdle(q: number, now: number): boolean {
    // Silence counts only while it is fetched (a partition paused for skew gets nothing by our doing).
    if (!this.pausedEvents.has(q) && now - (this.lastMsgAt.get(q) ?? now) >= this.opts.kafka.partitionIdleMs) return true;
    const next = this.eventsNext.get(q) ?? -1;
    const eof = this.eofAt.get(`${this.events}/${q}`);
    if (eof !== undefined && (next < 0 || next >= eof)) return true;
    if (next < 0) return false; // starts at the committed offset: not known here
    try {
      const w = this.consumer.getWatermarkOffsets(this.events, q);
      return w.highOffset >= 0 && next >= w.highOffset;
    } catch {
      return false; // nothing fetched yet
    }
  }

  /**
   * Pauses an owned events partition whose stream time runs maxSkewMs ahead of the slowest active
   * events partition this instance knows of (its own, and others' from the hints its tasks got;
   * one not heard from yet counts as −∞), and resumes it at half that. Route partitions are never
   * paused: they carry the other instances' hints, so no instance waits on another for good.
   */
  private updateSkewPauses(): void {
    if (this.eventsNext.size === 0) return;
    const now = performance.now();
    const skew = this.opts.kafka.maxSkewMs;
    let low1 = Number.POSITIVE_INFINITY;
    let low2 = Number.POSITIVE_INFINITY;
    let lowAt = -1;
    for (let q = 0; q < this.n; q++) {
      let ts: number;
      if (this.eventsNext.has(q)) {
        if (this.eventsIdle(q, now)) continue;
        ts = this.maxTs.get(q) ?? Number.NEGATIVE_INFINITY;
      } else {
        const peer = this.peers.get(q);
        if (peer?.idle === true) continue;
        ts = peer === undefined || peer.ts === 0 ? Number.NEGATIVE_INFINITY : peer.ts;
      }
      if (lowAt < 0 || ts < low1) {
        low2 = low1;
        low1 = ts;
        lowAt = q;
      } else if (ts < low2) low2 = ts;
    }
    const pause: { topic: string; partition: number }[] = [];
    const resume: { topic: string; partition: number }[] = [];
    for (const q of this.eventsNext.keys()) {
      const paused = this.pausedEvents.has(q);
      const others = q === lowAt ? low2 : low1;
      const ts = this.maxTs.get(q) ?? Number.NEGATIVE_INFINITY;
      const ahead = !this.eventsIdle(q, now) && ts > others + (paused ? skew / 2 : skew);
      if (ahead === paused) continue;
      if (ahead) {
        this.pausedEvents.add(q);
        pause.push({ topic: this.events, partition: q });
      } else {
        this.pausedEvents.delete(q);
        this.lastMsgAt.set(q, now);
        resume.push({ topic: this.events, partition: q });
      }
    }
    try {
      if (pause.length > 0) this.consumer.pause(pause);
      if (resume.length > 0) this.consumer.resume(resume);
    } catch (err) {
      this.counters.errors++;
      this.opts.onError?.(err);
    }
  }

  /**
   * Task p: de-duplicates by source seq, cuts batches at hints and where the events partition the
   * rows come from changes (the engine attributes a batch's rows to one input), and ingests.
   */
  private async process(t: Task, msgs: Message[]): Promise<void> {
    const tz = this.cfg.time.timeZone;
    const b = t.batch;
    b.reset();
    for (const m of msgs) {
      t.dirty = true;
      t.unpublished = true;
      const hint = header(m, H_HINT);
      if (hint !== null) {
        // The rows before it are one batch whose position stops short of the hint; the hint's own
        // position covers it, so a replay applies it exactly once, in its place.
        await this.ingest(t);
        t.next = m.offset + 1;
        // `<q>`: events partition q (from its router); `t<p'>`: task p' (its announcement).
        const input = hint.startsWith('t') ? this.n + Number(hint.slice(1)) : Number(hint);
        await this.hint(t, input, m, header(m, H_IDLE) === '1');
        continue;
      }
      const src = header(m, H_SRC);
      const seq = src === null ? -1 : Number(header(m, H_SEQ));
      if (src !== null && seq <= (t.hw.get(src) ?? -1)) {
        this.counters.duplicatesSkipped++;
        t.next = m.offset + 1;
        continue;
      }
      const input = src === null ? -1 : inputOf(src, this.n);
      if (input !== t.batchInput) {
        // Before this row counts as seen (hw): the batch's position must not cover it.
        if (b.length > 0) await this.ingest(t);
        t.batchInput = input;
      }
      if (src !== null) t.hw.set(src, seq);
      const r = appendRouted(b, m.value ?? EMPTY, `${m.topic}/${m.partition}@${m.offset}`, tz);
      if (r.kind === 'watermark') {
        await this.ingest(t);
        t.next = m.offset + 1;
        if (r.advance) {
          await t.engine.advanceTo(r.ts, this.position(t));
        } else {
          // A hint without headers (written before per-partition hints): its partition is in the key.
          const q = /^hint-e(\d+)$/.exec(m.key?.toString() ?? '');
          const pos = this.position(t);
          if (q !== null) t.inputs.bind(pos, Number(q[1]), pos.task as TaskPositionPart);
          await t.engine.observeEventTime(r.ts, pos);
        }
        continue;
      }
      t.next = m.offset + 1;
      this.counters.processed++;
      if (b.length === b.capacity) await this.ingest(t);
    }
    await this.ingest(t);
  }

  private async ingest(t: Task): Promise<void> {
    const pos = this.position(t);
    t.inputs.bind(t.batch, t.batchInput, pos.task as TaskPositionPart);
    await t.engine.ingestColumns(t.batch, pos);
    t.batch.reset();
  }

  /**
   * A stream-time hint for input `input` (an events partition, or N + an announcing task): its
   * idleness, then its time (0: none yet); the task's watermark moves to the minimum over the
   * active inputs.
   */
  private async hint(t: Task, input: number, m: Message, idle: boolean): Promise<void> {
    let ts = 0;
    try {
      ts = Number(crmstream.v1.Routed.decode(m.value ?? EMPTY).watermark);
    } catch {
      this.counters.errors++; // not ours to dead-letter: a hint carries no event
    }
    if (!(Number.isInteger(input) && input >= 0 && input < 2 * this.n) || input === this.n + t.p) return;
    if (input < this.n) {
      const peer = this.peers.get(input);
      this.peers.set(input, { ts: Math.max(peer?.ts ?? 0, Number.isFinite(ts) ? ts : 0), idle });
    }
    t.inputs.setIdle(input, idle);
    const pos = this.position(t);
    if (Number.isFinite(ts) && ts > 0) {
      t.inputs.bind(pos, input, pos.task as TaskPositionPart);
      await t.engine.observeEventTime(ts, pos);
    } else {
      await t.engine.advanceTo(t.inputs.watermark(), pos);
    }
  }

  /**
   * Task t's event time over the events partitions, to every other task — only when everything it
   * processed is checkpointed and its forwarded rows up to there are delivered (the route sink is
   * at the outbox head), so the announcement lands after them in every route partition.
   */
  private announce(t: Task): void {
    if (t.engine.hasUncommitted) return;
    const route = t.engine.health().sinks.find((s) => s.name === 'route');
    if (route !== undefined && route.cursor < route.head) return;
    const d = t.inputs.eventTimeOf(0, this.n);
    if (!Number.isFinite(d) || d <= t.announced) return;
    t.announced = d;
    const value = crmstream.v1.Routed.encode({ watermark: d }).finish();
    const headers: MessageHeader[] = [{ [H_HINT]: `t${t.p}` }, { [H_IDLE]: '0' }];
    const byDest = new Map<number, ChangelogMessage[]>();
    for (let p = 0; p < this.n; p++) if (p !== t.p) listOf(byDest, p).push({ key: `hint-t${t.p}`, value, headers });
    this.counters.hints++;
    if (byDest.size > 0) this.send(byDest, new Map());
  }

  /** A fresh object each time: the engine keeps it until its next checkpoint (and fills its times). */
  private position(t: Task): TaskPosition {
    const s = t.inputs.snapshot();
    const part: TaskPositionPart = { topic: this.route, partition: t.p, offset: t.next, hw: Object.fromEntries(t.hw), times: s.times, idle: s.idle };
    return { task: part };
  }

  /**
   * Publishes a task's KPI partials: everything it has processed. Taken between batches, so they
   * are the KPIs of a prefix of its route partition — a consistent cut of that task.
   */
  private async publish(t: Task): Promise<void> {
    t.unpublished = false;
    await publishPartials(this.producer, this.opts.kafka.scaleOut!.partialsTopic, t.p, await t.engine.kpiPartials());
    this.counters.partialsPublished++;
  }

  /** Hints every hintMs; idle tasks checkpointed (so their offsets commit) every checkpoint interval; partials every partialsMs. */
  private async periodic(): Promise<void> {
    const now = performance.now();
    if (now - this.lastPublish >= this.opts.kafka.scaleOut!.partialsMs) {
      this.lastPublish = now;
      for (const t of this.tasks.values()) if (t.unpublished) await this.publish(t);
    }
    if (now - this.lastHint >= this.opts.kafka.scaleOut!.hintMs) {
      this.lastHint = now;
      this.broadcastHints();
    }
    this.updateSkewPauses();
    const every = this.cfg.checkpoint.intervalMs;
    if (now - this.lastCheckpoint >= every) {
      this.lastCheckpoint = now;
      for (const t of this.tasks.values()) {
        if (t.dirty) {
          t.dirty = false;
          await t.engine.checkpoint();
        }
        this.announce(t);
      }
    }
  }

  /** Every owned partition read to its end, every delivery acknowledged, every task checkpointed. */
  private async drained(): Promise<boolean> {
    if (this.eventsNext.size === 0 && this.tasks.size === 0) return false;
    for (const [q, next] of this.eventsNext) {
      const eof = this.eofAt.get(`${this.events}/${q}`);
      if (eof === undefined || (next >= 0 && next < eof)) return false;
    }
    for (const t of this.tasks.values()) {
      const eof = this.eofAt.get(`${this.route}/${t.p}`);
      if (eof === undefined || t.next < eof) return false;
    }
    if (this.stage0InFlight > 0 || [...this.tasks.values()].some((t) => t.dirty)) return false;
    this.broadcastHints();
    return this.stage0InFlight === 0;
  }

  private async shutdown(): Promise<void> {
    const errors: unknown[] = [];
    try {
      await this.flushStage0();
    } catch (err) {
      errors.push(err);
    }
    for (const t of this.tasks.values()) {
      try {
        await this.closeTask(t);
      } catch (err) {
        errors.push(err);
      }
    }
    this.tasks.clear();
    this.stopped = true;
    await new Promise<void>((resolve) => this.consumer.disconnect(() => resolve()));
    try {
      await this.producer.close();
    } catch (err) {
      errors.push(err);
    }
    if (errors.length === 1) throw errors[0];
    if (errors.length > 1) throw new CrmError('CLEANUP_FAILED', 'stopping the scale-out runner failed', { errors });
  }
}

/**
 * A task's forwarded rows to the route partition of their canonical id. The seq header is the
 * event's input offset (from its origin), so a re-sent row is recognised whichever batch or
 * checkpoint re-sent it.
 */
class RouteSink implements OutboxSink {
  readonly name = 'route';
  readonly topics = [Topic.route];

  constructor(
    private readonly p: number,
    private readonly n: number,
    private readonly topic: string,
    private readonly producer: SharedProducer,
    private readonly deliveryTimeoutMs: number,
  ) {}

  async open(): Promise<void> {}

  async deliver(records: readonly OutboxRecord[]): Promise<void> {
    const byDest = new Map<number, ChangelogMessage[]>();
    for (const r of records) {
      const m = crmstream.v1.Routed.decode(r.payload);
      const at = /\/(\d+)@(\d+)$/.exec(m.origin);
      // Rows from the events topic always carry their origin; a row without one is made unique by
      // its outbox seq instead, rather than lost.
      const headers: MessageHeader[] = at === null
        ? [{ [H_SRC]: `t${this.p}o` }, { [H_SEQ]: String(r.seq) }]
        : [{ [H_SRC]: `t${this.p}e${at[1]}` }, { [H_SEQ]: at[2]! }];
      const dest = partitionOf(m.canonical, this.n);
      listOf(byDest, dest).push({ key: m.canonical, value: r.payload, headers });
    }
    const deadline = performance.now() + this.deliveryTimeoutMs;
    const outs = await Promise.all([...byDest].map(([dest, list]) => this.producer.produceBatch(this.topic, dest, list, deadline)));
    const failed = outs.find((o) => o.failed > 0);
    // The outbox keeps them: this sink's cursor stays, and the outbox retries the whole page from it
    // with backoff (the seq headers make re-sending safe). Re-sending only the failed ones here
    // could reorder a partition's records.
    if (failed !== undefined) throw new CrmError('SINK_IO', `forwarding to ${this.topic} failed: ${failed.errors.find((e) => e !== null)!.message}`);
  }

  async close(): Promise<void> {}
}

/**
 * The input a routed row counts for: events partition q for a row routed from it (source header
 * `e<q>`); −1 for a row another task forwarded (`t<p>e<q>`, `t<p>o`): it may be older than what q's
 * router has said, and its lateness is covered by its sender's announcements instead.
 */
function inputOf(src: string, n: number): number {
  if (!src.startsWith('e')) return -1;
  const q = Number(src.slice(1));
  return Number.isInteger(q) && q >= 0 && q < n && src.length > 1 ? q : -1;
}

/** The list of `key` in `map`, created empty on first use. */
function listOf<K, V>(map: Map<K, V[]>, key: K): V[] {
  let list = map.get(key);
  if (list === undefined) map.set(key, (list = []));
  return list;
}

function addRouting(into: { forwarded: number; movedOut: number; movedIn: number }, engine: Engine): void {
  const s = engine.stats();
  into.forwarded += s['forwarded'] ?? 0;
  into.movedOut += s['movedOut'] ?? 0;
  into.movedIn += s['movedIn'] ?? 0;
}

/** A sink shared by every task: their engines must not close it. */
function shared(sink: OutboxSink): OutboxSink {
  return { name: sink.name, topics: sink.topics, open: (s) => sink.open(s), deliver: (r) => sink.deliver(r), close: async () => {} };
}

const EMPTY = Buffer.alloc(0);

/**
 * Moves every task's watermark to exactly `ts` (firing every timer up to it), as the end of a
 * stream does for one instance: one `Routed{watermark, advance}` to each route partition, behind
 * whatever is already there. `crmstream advance` runs it.
 */
export async function advanceAll(kafka: KafkaConfig, ts: number): Promise<number> {
  if (kafka.scaleOut === null) throw new CrmError('CONFIG_INVALID', 'kafka.scaleOut is not set');
  const producer = await SharedProducer.connect(kafka.brokers, kafka.clientId, kafka.producer);
  try {
    const probe = new Kafka.KafkaConsumer({ 'metadata.broker.list': kafka.brokers, 'group.id': `${kafka.groupId}-advance` }, {});
    await new Promise<void>((resolve, reject) => probe.connect({ timeout: 30_000 }, (err) => (err ? reject(new CrmError('KAFKA_ERROR', `cannot connect to ${kafka.brokers}`, { cause: err })) : resolve())));
    let n: number;
    try {
      n = await partitionCount(probe, kafka.scaleOut.routeTopic);
    } finally {
      await new Promise<void>((resolve) => probe.disconnect(() => resolve()));
    }
    const value = crmstream.v1.Routed.encode({ watermark: ts, advance: true }).finish();
    const outs = await Promise.all(Array.from({ length: n }, (_, p) => producer.produceBatch(kafka.scaleOut!.routeTopic, p, [{ key: 'advance', value, headers: [] }])));
    const failed = outs.find((o) => o.failed > 0);
    if (failed !== undefined) throw new CrmError('KAFKA_ERROR', `advance: ${failed.errors.find((e) => e !== null)!.message}`);
    return n;
  } finally {
    await producer.close();
  }
}
