/**
 * Per-input watermarks: the engine's event time when it reads several inputs (the partitions of a
 * Kafka topic, or the events partitions a scale-out task hears from), as Flink keeps a watermark
 * per source split and Kafka Streams a stream time per partition.
 *
 * - Each input's **stream time** is the largest event time accepted from it (or hinted for it).
 * - The **event time** of the engine is the MINIMUM stream time over the inputs that are assigned
 *   and not idle: a partition read behind the others holds the watermark back instead of having
 *   its events rejected `too_late` (with the maximum, a backlog read a little unevenly loses most
 *   of its data). An input with no accepted event yet counts as −∞: nothing moves until every
 *   active input has spoken (or been declared idle by its source).
 * - An **idle** input (caught up to its end, or silent for the source's idle time) does not hold
 *   the watermark back. When every input is idle, the event time follows the MAXIMUM over them
 *   (and over rows that came from no input, e.g. HTTP ingest into the same engine), so a quiet
 *   topic still fires its timers.
 * - No input assigned (before the first assignment, during a rebalance): the watermark holds.
 * - The watermark is `event time − outOfOrdernessMs`, floored to whole ticks, as without inputs.
 *
 * The engine updates the tracker per accepted row (`observe`, inside Engine.processRows, where
 * watermark moves split the runs as they always did), so its state is deterministic given the
 * rows and the idle flags. Stream times go into the source position stored with every checkpoint:
 * the source binds the batch it hands over to its input and to the position object (`bind`), and
 * the engine writes the times as they are after the batch into that position (`end`) before the
 * position is stored. A restart restores them (`restore`), so the watermark continues exactly.
 *
 * Memory: typed arrays indexed by input id (a partition number), grown on assignment only; no
 * allocation per event. `observe` is O(1) except when the row can raise the watermark (at most
 * once per tick of event time and input), where the minimum is recomputed over the inputs.
 *
 * @example
 * const inputs = engine.inputWatermarks();       // the engine's tracker (per-input mode)
 * inputs.assign([0, 1, 2]);                      // the source's partitions
 * inputs.bind(batch, 1, position.kafka);         // the next batch is partition 1's
 * await engine.ingestColumns(batch, position);   // position.kafka.times = stream times after it
 */

/** Stream time per input id (decimal string), ms: the largest event time accepted from it. */
export type StreamTimes = Record<string, number>;

/** The part of a source position that carries the inputs' times (filled by the engine). */
export interface InputTimesHolder {
  times: StreamTimes | null;
  /** Inputs idle when the times were taken (sources whose idleness is in-band restore it). */
  idle: number[] | null;
}

export interface InputWatermarksOptions {
  /** The engine's `time.outOfOrdernessMs`. */
  readonly outOfOrdernessMs: number;
  /** The engine's watermark tick (ms). */
  readonly tickMs: number;
}

/** Input ids are partition numbers: anything larger is not one (and would size the arrays). */
const MAX_INPUT = 1 << 20;

export class InputWatermarks {
  private readonly ooo: number;
  private readonly tick: number;
  /** Per input id: stream time (−∞ = nothing accepted yet). */
  private max = new Float64Array(0);
  /** Per input id: 1 = idle (does not hold the watermark back). */
  private idle = new Uint8Array(0);
  /** Per input id: 1 = assigned (counts); others keep their times for a later assignment. */
  private member = new Uint8Array(0);
  /** Largest event time of rows that came from no input (HTTP, library calls). */
  private other = Number.NEGATIVE_INFINITY;
  /** Assigned inputs, and those of them not idle. */
  private members = 0;
  private active = 0;
  /** The counts of the last scan(). */
  private scanMembers = 0;
  private scanActive = 0;
  /** The event time (see the module comment) and its watermark; `stale`: the event time may be low (the watermark is exact). */
  private combined = Number.NEGATIVE_INFINITY;
  private target = Number.NEGATIVE_INFINITY;
  private stale = false;
  /** The next batch handed to the engine: its input and the position holder to fill after it. */
  private boundKey: unknown = null;
  private boundInput = -1;
  private boundHolder: InputTimesHolder | null = null;

  constructor(opts: InputWatermarksOptions) {
    if (!(opts.tickMs >= 1)) throw new RangeError(`tickMs must be ≥ 1, got ${opts.tickMs}`);
    this.ooo = opts.outOfOrdernessMs;
    this.tick = opts.tickMs;
  }

  // ---------------------------------------------------------------------------------------------
  // The source's side
  // ---------------------------------------------------------------------------------------------

  /** The inputs that count from now on (a partition assignment); the others keep their times. */
  assign(inputs: Iterable<number>): void {
    this.member.fill(0);
    for (const id of inputs) {
      this.ensure(id);
      this.member[id] = 1;
    }
    this.recompute();
  }

  /**
   * Restores stream times (and, with `idle`, idle flags) from a stored position. Entries that are
   * not an input id with a finite time are ignored (a position from another version or source).
   */
  restore(times: unknown, idle: unknown = null): void {
    if (times !== null && typeof times === 'object') {
      for (const [k, v] of Object.entries(times as Record<string, unknown>)) {
        const id = Number(k);
        if (!isInputId(id) || typeof v !== 'number' || !Number.isFinite(v)) continue;
        this.ensure(id);
        if (v > this.max[id]!) this.max[id] = v;
      }
    }
    if (Array.isArray(idle)) {
      for (const v of idle) {
        if (typeof v !== 'number' || !isInputId(v)) continue;
        this.ensure(v);
        this.idle[v] = 1;
      }
    }
    this.recompute();
  }

  /**
   * Marks an input idle or active; returns whether that changed. Marking an input active never
   * raises the watermark; marking it idle may: callers then move the engine's watermark with
   * advanceTo (which loads the timers it fires first).
   */
  setIdle(input: number, idle: boolean): boolean {
    if (!isInputId(input)) return false;
    this.ensure(input);
    const v = idle ? 1 : 0;
    if (this.idle[input] === v) return false;
    this.idle[input] = v;
    this.recompute();
    return true;
  }

  isIdle(input: number): boolean {
    return input >= 0 && input < this.idle.length && this.idle[input] === 1;
  }

  /** An input's stream time (−∞: none). */
  streamTime(input: number): number {
    return input >= 0 && input < this.max.length ? this.max[input]! : Number.NEGATIVE_INFINITY;
  }

  /** The minimum stream time over the assigned, active inputs other than `input` (+∞: none). */
  othersMin(input: number): number {
    let m = Number.POSITIVE_INFINITY;
    for (let i = 0; i < this.max.length; i++) {
      if (i !== input && this.member[i] === 1 && this.idle[i] === 0 && this.max[i]! < m) m = this.max[i]!;
    }
    return m;
  }

  /** The engine's event time: minimum over the active inputs, the maximum when all are idle. */
  eventTime(): number {
    if (this.stale) this.recompute();
    return this.combined;
  }

  /**
   * The event time over the assigned inputs with ids in [from, to) only, by the same rule (a
   * scale-out task announces the one over its events partitions to the other tasks).
   */
  eventTimeOf(from: number, to: number): number {
    return this.scan(Math.max(0, from), Math.min(to, this.max.length), Number.NEGATIVE_INFINITY);
  }

  /**
   * The rule over the assigned inputs with ids in [from, to): the minimum over the active ones;
   * all idle: the maximum (at least `hi`); none assigned: −∞. Leaves the counts in
   * scanMembers / scanActive.
   */
  private scan(from: number, to: number, hi: number): number {
    let min = Number.POSITIVE_INFINITY;
    let members = 0;
    let active = 0;
    for (let i = from; i < to; i++) {
      if (this.member[i] === 0) continue;
      members++;
      const v = this.max[i]!;
      if (v > hi) hi = v;
      if (this.idle[i] === 1) continue;
      active++;
      if (v < min) min = v;
    }
    this.scanMembers = members;
    this.scanActive = active;
    return members === 0 ? Number.NEGATIVE_INFINITY : active > 0 ? min : hi;
  }

  /** The watermark the inputs allow: eventTime − outOfOrdernessMs, in ticks (−∞: none yet). */
  watermark(): number {
    return this.target;
  }

  /** Assigned inputs not idle. */
  get activeCount(): number {
    return this.active;
  }

  /**
   * The next thing handed to the engine (`key`: the batch for ingestColumns, or the position for
   * observeEventTime) comes from `input`; after it, the engine writes the stream times into
   * `holder` (part of the position stored with the checkpoint).
   */
  bind(key: unknown, input: number, holder: InputTimesHolder): void {
    this.boundKey = key;
    this.boundInput = input;
    this.boundHolder = holder;
  }

  /** The times and idle inputs now (a new object: positions keep it). */
  snapshot(): { times: StreamTimes; idle: number[] } {
    const times: StreamTimes = {};
    const idle: number[] = [];
    for (let i = 0; i < this.max.length; i++) {
      if (Number.isFinite(this.max[i]!)) times[String(i)] = this.max[i]!;
      if (this.idle[i] === 1) idle.push(i);
    }
    return { times, idle };
  }

  // ---------------------------------------------------------------------------------------------
  // The engine's side (Engine.processRows, Engine.observeEventTime)
  // ---------------------------------------------------------------------------------------------

  /** The input `key` was bound to, or −1 (rows from no input: HTTP, library calls). */
  begin(key: unknown): number {
    return key === this.boundKey && key !== null ? this.boundInput : -1;
  }

  /**
   * An accepted event at `t` from `input` (−1: from no input). Returns the watermark the inputs
   * allow now. No allocation; O(1) unless the row can raise the watermark.
   */
  observe(input: number, t: number): number {
    if (input < 0 || input >= this.member.length || this.member[input] === 0) {
      if (t > this.other) {
        this.other = t;
        if (this.members > 0 && this.active === 0) this.follow(t);
      }
      return this.target;
    }
    if (!(t > this.max[input]!)) return this.target;
    this.max[input] = t;
    if (this.active === 0) {
      this.follow(t);
      return this.target;
    }
    if (this.idle[input] === 1) return this.target; // neither holds nor leads
    // The minimum over the active inputs is at most t (this input's new time): if t cannot raise
    // the watermark, neither can the new minimum. The event time is then only known to be ≥ the
    // cached one (recomputed when asked for).
    if (this.floor(t) <= this.target) {
      this.stale = true;
      return this.target;
    }
    this.recompute();
    return this.target;
  }

  /** After the bound batch (or hint): its times go into the holder, and the binding ends. */
  end(key: unknown): void {
    if (key !== this.boundKey || key === null) return;
    const holder = this.boundHolder!;
    const s = this.snapshot();
    holder.times = s.times;
    holder.idle = s.idle;
    this.boundKey = null;
    this.boundInput = -1;
    this.boundHolder = null;
  }

  // ---------------------------------------------------------------------------------------------

  private floor(t: number): number {
    return Math.floor((t - this.ooo) / this.tick) * this.tick;
  }

  /** Every input idle: the event time follows the maximum. */
  private follow(t: number): void {
    if (t <= this.combined) return;
    this.combined = t;
    this.target = this.floor(t);
  }

  private recompute(): void {
    this.combined = this.scan(0, this.max.length, this.other);
    this.members = this.scanMembers;
    this.active = this.scanActive;
    this.target = Number.isFinite(this.combined) ? this.floor(this.combined) : Number.NEGATIVE_INFINITY;
    this.stale = false;
  }

  private ensure(id: number): void {
    if (!isInputId(id)) throw new RangeError(`input id ${id} is not a partition number in [0, ${MAX_INPUT})`);
    if (id < this.max.length) return;
    let n = Math.max(8, this.max.length);
    while (n <= id) n *= 2;
    const max = new Float64Array(n).fill(Number.NEGATIVE_INFINITY);
    max.set(this.max);
    const idle = new Uint8Array(n);
    idle.set(this.idle);
    const member = new Uint8Array(n);
    member.set(this.member);
    this.max = max;
    this.idle = idle;
    this.member = member;
  }
}

function isInputId(id: number): boolean {
  return Number.isInteger(id) && id >= 0 && id < MAX_INPUT;
}
