import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['tests/**/*.test.ts'],
    // Integration tests spawn processes and write LevelDB directories; each sets its own generous
    // timeout. No test asserts a duration.
    testTimeout: 60_000,
    hookTimeout: 120_000,
    pool: 'forks',
  },
});
