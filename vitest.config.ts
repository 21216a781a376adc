import os from 'node:os';
import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['tests/**/*.test.ts'],
    // Integration tests spawn processes and write LevelDB directories; each sets its own generous
    // timeout. No test asserts a duration.
    testTimeout: 60_000,
    hookTimeout: 120_000,
    pool: 'forks',
    // Vitest's default (CPUs − 1) runs the files one by one on a 2-core machine, while most of
    // them wait on child processes, sockets and Kafka timeouts: two at a time take ~430 s instead
    // of ~670 s there. No test asserts a duration, so the contention changes nothing else.
    maxWorkers: Math.max(2, os.availableParallelism() - 1),
  },
});
