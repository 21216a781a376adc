import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync, renameSync } from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { CrmError } from '../errors.js';

/**
 * librdkafka's mock cluster in a child process (tools/kafka-mock.c), for tests, benchmarks and the
 * demo. It speaks the real Kafka protocol on 127.0.0.1; node-rdkafka clients connect to
 * `bootstrap` like to any broker. Living in its own process, it survives the SIGKILL of an engine,
 * and it takes fault commands (broker down/up, injected request errors) that node-rdkafka does not
 * expose.
 *
 * The helper is compiled on first use with the system C compiler (node-rdkafka's install needs one
 * too) against the librdkafka that node-rdkafka built, and cached under node_modules/.cache.
 *
 * @example
 * const mock = await MockCluster.start({ brokers: 3 });
 * await mock.createTopic('events', 6);
 * // … clients use mock.bootstrap …
 * await mock.brokerDown(2);
 * await mock.stop();
 */
export class MockCluster {
  private readonly replies: ((line: string) => void)[] = [];
  private queue: Promise<unknown> = Promise.resolve();
  private exited = false;

  private constructor(
    private readonly child: ChildProcess,
    /** Comma-separated host:port list for `metadata.broker.list`. */
    readonly bootstrap: string,
    lines: AsyncIterator<string>,
  ) {
    child.once('exit', () => {
      this.exited = true;
      for (const r of this.replies.splice(0)) r('err mock cluster exited');
    });
    void (async () => {
      for (;;) {
        const next = await lines.next();
        if (next.done === true) return;
        this.replies.shift()?.(next.value);
      }
    })();
  }

  /** Builds the helper if needed, starts it and waits for its bootstrap line. */
  static async start(opts: { brokers?: number } = {}): Promise<MockCluster> {
    const bin = buildHelper();
    // Its own process group: a Ctrl-C in the terminal (SIGINT to the foreground group) stops the
    // demo or test, which then stops the cluster in order. It cannot outlive its parent either way:
    // it exits when its stdin (a pipe from this process) closes.
    const child = spawn(bin, [String(opts.brokers ?? 3)], { stdio: ['pipe', 'pipe', 'inherit'], detached: true });
    const lines = createInterface({ input: child.stdout! })[Symbol.asyncIterator]();
    const first = await Promise.race([
      lines.next(),
      new Promise<never>((_, reject) => child.once('error', reject)),
      new Promise<never>((_, reject) => child.once('exit', (code) => reject(new CrmError('KAFKA_ERROR', `kafka-mock exited with ${code} before it started`)))),
    ]);
    const m = first.done === true ? null : /^bootstrap (\S+)$/.exec(first.value);
    if (m === null) throw new CrmError('KAFKA_ERROR', `kafka-mock did not print its bootstrap servers`);
    return new MockCluster(child, m[1]!, lines);
  }

  /** The helper's process id (tests kill engines, never this). */
  get pid(): number {
    return this.child.pid ?? -1;
  }

  createTopic(name: string, partitions: number): Promise<void> {
    return this.command(`topic ${name} ${partitions}`);
  }

  /** Takes broker `id` (1-based) off the network until brokerUp. */
  brokerDown(id: number): Promise<void> {
    return this.command(`down ${id}`);
  }

  brokerUp(id: number): Promise<void> {
    return this.command(`up ${id}`);
  }

  /** Adds round-trip latency (ms) to broker `id`. */
  brokerRtt(id: number, ms: number): Promise<void> {
    return this.command(`rtt ${id} ${ms}`);
  }

  /**
   * Fails the next `count` requests with Kafka API key `apiKey` (0 Produce, 1 Fetch, 8 OffsetCommit,
   * 3 Metadata, …) with Kafka error `code` (e.g. 6 NOT_LEADER_OR_FOLLOWER, 7 REQUEST_TIMED_OUT).
   */
  pushRequestErrors(apiKey: number, count: number, code: number): Promise<void> {
    return this.command(`errors ${apiKey} ${count} ${code}`);
  }

  setLeader(topic: string, partition: number, broker: number): Promise<void> {
    return this.command(`leader ${topic} ${partition} ${broker}`);
  }

  /** Destroys the cluster and waits for the process to exit. */
  async stop(): Promise<void> {
    if (this.exited) return;
    const done = new Promise<void>((resolve) => this.child.once('exit', () => resolve()));
    this.child.stdin!.end('quit\n');
    const timer = setTimeout(() => this.child.kill('SIGKILL'), 5_000);
    await done;
    clearTimeout(timer);
  }

  /** One command at a time: replies come back in order, one line each. */
  private command(line: string): Promise<void> {
    const run = async (): Promise<void> => {
      if (this.exited) throw new CrmError('KAFKA_ERROR', 'the mock cluster has exited');
      const reply = new Promise<string>((resolve) => this.replies.push(resolve));
      this.child.stdin!.write(line + '\n');
      const r = await reply;
      if (r !== 'ok') throw new CrmError('KAFKA_ERROR', `kafka-mock '${line}': ${r}`);
    };
    const p = this.queue.then(run, run);
    this.queue = p.catch(() => undefined);
    return p;
  }
}

/** Compiles tools/kafka-mock.c unless a binary of this exact source is cached; returns its path. */
function buildHelper(): string {
  const here = path.dirname(fileURLToPath(import.meta.url));
  // The package root from the sources (engine/kafka) or from the build (dist/engine/kafka).
  const root = [path.resolve(here, '../..'), path.resolve(here, '../../..')].find((d) => existsSync(path.join(d, 'tools', 'kafka-mock.c')));
  if (root === undefined) throw new CrmError('KAFKA_ERROR', `tools/kafka-mock.c not found above ${here}`);
  const source = path.join(root, 'tools', 'kafka-mock.c');
  const rdkafka = path.dirname(createRequire(import.meta.url).resolve('node-rdkafka/package.json'));
  const deps = path.join(rdkafka, 'build', 'deps');
  const hash = createHash('sha256').update(readFileSync(source)).update(deps).digest('hex').slice(0, 12);
  const dir = path.join(root, 'node_modules', '.cache', 'crmstream');
  const bin = path.join(dir, `kafka-mock-${hash}`);
  if (existsSync(bin)) return bin;
  mkdirSync(dir, { recursive: true });
  const tmp = `${bin}.${process.pid}.tmp`;
  const cc = process.env['CC'] ?? 'cc';
  try {
    execFileSync(cc, ['-O1', '-o', tmp, source, `-I${path.join(deps, 'include')}`, `-L${deps}`, '-lrdkafka', `-Wl,-rpath,${deps}`], { stdio: ['ignore', 'ignore', 'pipe'] });
  } catch (err) {
    const stderr = (err as { stderr?: Buffer }).stderr?.toString() ?? '';
    throw new CrmError('KAFKA_ERROR', `cannot build the Kafka mock helper with ${cc} (a C compiler is needed, as for node-rdkafka): ${stderr || (err as Error).message}`);
  }
  renameSync(tmp, bin); // atomic: concurrent test workers never run a half-written binary
  return bin;
}
