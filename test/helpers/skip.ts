/**
 * The condition for `it.skipIf` / `describe.skipIf` that says why: when `skip` is true it prints
 * `skip: <what>: <why>` to stderr (vitest shows it under the file's name), so a skipped test is
 * never silent in a run's output.
 */
export function skipBecause(skip: boolean, what: string, why: string): boolean {
  if (skip) console.warn(`skip: ${what}: ${why}`);
  return skip;
}
