import { defineConfig } from 'vitest/config';

// Two projects: "fast" (pure logic and real-tool tests that finish in seconds) and "slow"
// (QEMU guests, PostgreSQL flows, browser tests). Slow test files end in `.slow.test.ts`.
export default defineConfig({
  test: {
    projects: [
      {
        test: {
          name: 'fast',
          include: ['test/**/*.test.ts'],
          exclude: ['test/**/*.slow.test.ts'],
          testTimeout: 60_000,
          hookTimeout: 120_000,
        },
      },
      {
        test: {
          name: 'slow',
          include: ['test/**/*.slow.test.ts'],
          testTimeout: 900_000,
          hookTimeout: 1_200_000,
          // QEMU under TCG saturates both cores: one slow file at a time.
          fileParallelism: false,
        },
      },
    ],
  },
});
