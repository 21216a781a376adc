import { spawn } from 'node:child_process';
import path from 'node:path';
import Kafka from 'node-rdkafka';
import { PROJECT_ROOT } from './helpers.js';

const CLI = path.join(PROJECT_ROOT, 'dist/api/cli.js');

/**
 * Produces keyed records to `topic` with an idempotent producer and waits until every one is
 * acknowledged (a full local queue is waited out; bounded: 2,000 tries per record, 30 s flush).
 * A record's `partition` pins it there; without, librdkafka's partitioner picks by key.
 */
export async function produceAll(bootstrap: string, topic: string, records: readonly { key: string; value: Buffer; partition?: number }[]): Promise<void> {
  const p = new Kafka.Producer({ 'metadata.broker.list': bootstrap, 'linger.ms': 5, 'enable.idempotence': true });
  await new Promise<void>((resolve, reject) => p.connect({}, (e) => (e ? reject(e) : resolve())));
  p.setPollInterval(10);
  for (const r of records) {
    for (let tries = 0; ; tries++) {
      try {
        p.produce(topic, r.partition ?? null, r.value, r.key);
        break;
      } catch (err) {
        if (tries > 2000) throw err;
        await new Promise((res) => setTimeout(res, 5));
      }
    }
  }
  await new Promise<void>((resolve, reject) => p.flush(30_000, (e) => (e ? reject(e) : resolve())));
  await new Promise<void>((resolve) => p.disconnect(() => resolve()));
}

/** Runs the built CLI (`dist/api/cli.js`) to its end: exit code and stdout + stderr (killed after `timeoutMs`). */
export function runCli(args: string[], timeoutMs = 120_000): Promise<{ code: number | null; out: string }> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [CLI, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    child.stdout.on('data', (d: Buffer) => (out += d.toString()));
    child.stderr.on('data', (d: Buffer) => (out += d.toString()));
    const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
    child.on('exit', (code) => {
      clearTimeout(timer);
      resolve({ code, out });
    });
  });
}

/** Every message of `topic`, read from the beginning until none came for `idleMs` (bounded: `maxMs`). */
export async function readTopic(bootstrap: string, topic: string, idleMs: number, maxMs = 60_000): Promise<Kafka.Message[]> {
  const c = new Kafka.KafkaConsumer({ 'metadata.broker.list': bootstrap, 'group.id': `reader-${topic}-${Date.now()}`, 'enable.auto.commit': false }, { 'auto.offset.reset': 'earliest' });
  await new Promise<void>((resolve, reject) => c.connect({}, (e) => (e ? reject(e) : resolve())));
  c.subscribe([topic]);
  const out: Kafka.Message[] = [];
  let idleSince = Date.now();
  const deadline = Date.now() + maxMs;
  while (Date.now() - idleSince < idleMs && Date.now() < deadline) {
    const msgs = await new Promise<Kafka.Message[]>((resolve, reject) => c.consume(1000, (e, m) => (e ? reject(e) : resolve(m))));
    if (msgs.length > 0) idleSince = Date.now();
    out.push(...msgs);
  }
  await new Promise<void>((resolve) => c.disconnect(() => resolve()));
  return out;
}
