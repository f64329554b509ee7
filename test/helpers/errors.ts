import { UserError } from '../../src/errors.js';

/** The UserError `fn` throws; anything else it throws, or no error at all, fails the test. */
export function userErrorOf(fn: () => unknown): UserError {
  try {
    fn();
  } catch (e) {
    if (e instanceof UserError) return e;
    throw e;
  }
  throw new Error('expected a UserError');
}
