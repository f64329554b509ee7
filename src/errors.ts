/**
 * The toolkit's two kinds of failure. A UserError is something the operator can fix (bad input,
 * missing tool, wrong key): one line, no stack, exit 2. Anything else is a bug in lamadist: exit 1,
 * stack only with --debug. The mapping to exit codes lives in `exitCodeFor` and nowhere else.
 */

/** Stable, searchable error codes. Add new ones here so they stay unique and documented. */
export type ErrorCode = `LAMA_E_${string}`;

/** An error the user caused and can fix. `code` is searchable; `message` is one line. */
export class UserError extends Error {
  readonly code: ErrorCode;
  /** Where the problem is (file:line:col, device offset, ...), shown before the message. */
  readonly where: string | undefined;

  constructor(code: ErrorCode, message: string, options?: { where?: string; cause?: unknown }) {
    super(message, options?.cause === undefined ? undefined : { cause: options.cause });
    this.name = 'UserError';
    this.code = code;
    this.where = options?.where;
  }

  /**
   * The one line printed to stderr. Messages quote what the user wrote (file names, kas includes,
   * host names), so line breaks in it are escaped: the error stays one line whatever the input.
   */
  line(): string {
    const where = this.where ? `${this.where}: ` : '';
    return `${where}${this.message} [${this.code}]`.replace(/[\r\n]/g, (c) => JSON.stringify(c).slice(1, -1));
  }
}

/** Raised when the user interrupts (Ctrl-C); maps to exit 130. */
export class Interrupted extends Error {
  constructor(signal: NodeJS.Signals = 'SIGINT') {
    super(`interrupted by ${signal}`);
    this.name = 'Interrupted';
  }
}

export const EXIT_OK = 0;
export const EXIT_INTERNAL = 1;
export const EXIT_USER = 2;
export const EXIT_INTERRUPTED = 130;

/** The single place where failures become process exit codes. */
export function exitCodeFor(err: unknown): number {
  if (err instanceof UserError) return EXIT_USER;
  if (err instanceof Interrupted) return EXIT_INTERRUPTED;
  return EXIT_INTERNAL;
}

/** Narrow an unknown thrown value to a Node system error with a `code` (ENOENT, EEXIST, ...). */
export function isErrno(err: unknown, code?: string): err is NodeJS.ErrnoException {
  return err instanceof Error && typeof (err as NodeJS.ErrnoException).code === 'string' &&
    (code === undefined || (err as NodeJS.ErrnoException).code === code);
}
