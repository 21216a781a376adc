import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { EventColumns } from '../engine/batch.js';

export const DAY = 86_400_000;
export const HOUR = 3_600_000;
export const T0 = Date.UTC(2024, 0, 1);

export interface Ev {
  event_id: string;
  type: string;
  user_id?: string;
  anonymous_id?: string;
  ts: number;
  amount?: number;
  currency?: string;
  order_id?: string;
  channel?: string;
  platform?: string;
  props?: Record<string, string>;
}

/** Builds a columnar batch straight from event objects (independent of the JSON/protobuf codecs). */
export function columnsOf(events: readonly Ev[], capacity = Math.max(1, events.length)): EventColumns {
  const b = new EventColumns(capacity);
  for (const e of events) {
    b.push(e.event_id, e.type, e.user_id ?? '', e.anonymous_id ?? '', e.ts, e.amount ?? Number.NaN, e.currency ?? '',
      e.order_id ?? '', e.channel ?? '', e.platform ?? '', '', '', '', e.props ?? null, 100, JSON.stringify(e), 'test');
  }
  return b;
}

export function tempDir(prefix = 'crm-test-'): { dir: string; cleanup: () => void } {
  const dir = mkdtempSync(path.join(os.tmpdir(), prefix));
  return { dir, cleanup: () => rmSync(dir, { recursive: true, force: true }) };
}

export const PROJECT_ROOT = path.resolve(import.meta.dirname, '..');
export const SHARED_DATA = path.resolve(PROJECT_ROOT, '../shared/data');

/**
 * Starts `node args…` and SIGKILLs it `delayMs` after it says it has started processing (a line
 * matching `ready` on stdout or stderr), so kills land in processing, not in reading the input.
 * Resolves true if it was killed, false if it had finished first; rejects on any other exit.
 * `log` gets everything it printed.
 */
export function runAndKill(args: string[], ready: RegExp, delayMs: number, log?: (output: string) => void): Promise<boolean> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let output = '';
    let timer: NodeJS.Timeout | undefined;
    const onData = (d: Buffer): void => {
      output += d.toString();
      if (timer === undefined && ready.test(output)) timer = setTimeout(() => child.kill('SIGKILL'), delayMs);
    };
    child.stdout.on('data', onData);
    child.stderr.on('data', onData);
    child.on('exit', (code, signal) => {
      clearTimeout(timer);
      log?.(output);
      if (signal === 'SIGKILL') resolve(true);
      else if (code === 0) resolve(false);
      else reject(new Error(`exit ${code}: ${output}`));
    });
  });
}

/** Polls `cond` every 20 ms until it holds or `ms` pass; returns whether it held. */
export async function until(cond: () => boolean, ms = 10_000): Promise<boolean> {
  const end = Date.now() + ms;
  while (Date.now() < end) {
    if (cond()) return true;
    await new Promise((r) => setTimeout(r, 20));
  }
  return cond();
}

/** The child's exit code once it exits; SIGKILLed (code null) when it has not after `timeoutMs`. */
export function exited(child: ChildProcess, timeoutMs: number): Promise<number | null> {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve(child.exitCode);
  return new Promise((resolve) => {
    const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
    child.once('exit', (code) => {
      clearTimeout(timer);
      resolve(code);
    });
  });
}
