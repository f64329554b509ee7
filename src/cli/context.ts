import pc from 'picocolors';
import { Listr, ListrLogger, ProcessOutput, type ListrTask } from 'listr2';

/** Global flags every command honours. */
export interface GlobalOptions {
  json?: boolean;
  verbose?: boolean;
  debug?: boolean;
  color?: boolean;
}

/** Colour helpers that turn into the identity when colour is off. */
export type Colors = Pick<typeof pc, 'bold' | 'dim' | 'red' | 'green' | 'yellow' | 'cyan' | 'magenta'>;

/** A determinate progress bar on a TTY; silent elsewhere. */
export interface Progress {
  update(done: number, total?: number, label?: string): void;
  finish(): void;
}

/**
 * What a command needs from its surroundings: where to print, how loud, whether stderr is a
 * terminal. Commands take a Context instead of touching process.stdout so they can be called from
 * tests and other commands without the parser.
 */
export interface Context {
  json: boolean;
  verbose: boolean;
  debug: boolean;
  /** stderr is a terminal: progress bars and task lists are shown. */
  tty: boolean;
  color: boolean;
  c: Colors;
  /** Human progress and diagnostics: always stderr. */
  info(message: string): void;
  /** Only with -v. */
  detail(message: string): void;
  warn(message: string): void;
  /**
   * The command's result: with --json, exactly one JSON document on stdout; otherwise `human`
   * (a string or a function producing one) on stdout.
   */
  result(data: unknown, human?: string | (() => string)): void;
  progress(label: string, total: number): Progress;
  /** A task list on a TTY, plain "step…" lines otherwise; all on stderr. */
  steps<T extends object>(tasks: { title: string; run: (ctx: T) => Promise<void> }[], initial: T): Promise<T>;
  stdout: NodeJS.WritableStream;
  stderr: NodeJS.WriteStream | NodeJS.WritableStream;
}

function identity(s: string | number | null | undefined): string {
  return String(s);
}

/** Build a Context; defaults suit library and test use (no colour, no TTY, quiet). */
export function createContext(
  opts: GlobalOptions = {},
  streams: { stdout?: NodeJS.WritableStream; stderr?: NodeJS.WriteStream | NodeJS.WritableStream } = {},
): Context {
  const stdout = streams.stdout ?? process.stdout;
  const stderr = streams.stderr ?? process.stderr;
  const tty = Boolean((stderr as NodeJS.WriteStream).isTTY) && !opts.json;
  const color = opts.color ?? (tty && !process.env.NO_COLOR && process.env.TERM !== 'dumb');
  const c: Colors = color
    ? pc
    : { bold: identity, dim: identity, red: identity, green: identity, yellow: identity, cyan: identity, magenta: identity };
  const errLine = (s: string): void => {
    stderr.write(s + '\n');
  };
  const ctx: Context = {
    json: Boolean(opts.json),
    verbose: Boolean(opts.verbose || opts.debug),
    debug: Boolean(opts.debug),
    tty,
    color,
    c,
    stdout,
    stderr,
    info: (m) => errLine(m),
    detail: (m) => {
      if (ctx.verbose) errLine(c.dim(m));
    },
    warn: (m) => errLine(`${c.yellow('warning:')} ${m}`),
    result(data, human) {
      if (ctx.json) {
        stdout.write(JSON.stringify(data, jsonReplacer, 2) + '\n');
        return;
      }
      const text = typeof human === 'function' ? human() : (human ?? JSON.stringify(data, jsonReplacer, 2));
      if (text.length > 0) stdout.write(text.endsWith('\n') ? text : text + '\n');
    },
    progress(label, total) {
      return tty ? new TtyBar(stderr as NodeJS.WriteStream, label, total) : { update: () => undefined, finish: () => undefined };
    },
    steps: (tasks, initial) => runSteps(ctx, tasks, initial),
  };
  return ctx;
}

async function runSteps<T extends object>(
  ctx: Context,
  tasks: { title: string; run: (ctx: T) => Promise<void> }[],
  initial: T,
): Promise<T> {
  if (!ctx.tty) {
    for (const t of tasks) {
      ctx.detail(`${t.title}…`);
      await t.run(initial);
    }
    return initial;
  }
  const err = ctx.stderr as NodeJS.WriteStream;
  const list = new Listr<T>(
    tasks.map((t): ListrTask<T> => ({ title: t.title, task: async (c2) => t.run(c2) })),
    {
      concurrent: false,
      exitOnError: true,
      registerSignalListeners: false,
      rendererOptions: { logger: new ListrLogger({ processOutput: new ProcessOutput(err, err) }) },
    },
  );
  return list.run(initial);
}

/** JSON.stringify replacer: bigints as decimal strings, Buffers as hex. */
export function jsonReplacer(_key: string, value: unknown): unknown {
  if (typeof value === 'bigint') return value.toString();
  if (value && typeof value === 'object' && (value as { type?: string }).type === 'Buffer') {
    const data = (value as { data?: number[] }).data;
    if (Array.isArray(data)) return Buffer.from(data).toString('hex');
  }
  return value;
}

class TtyBar implements Progress {
  private last = 0;
  private label: string;
  private total: number;
  constructor(
    private readonly stream: NodeJS.WriteStream,
    label: string,
    total: number,
  ) {
    this.label = label;
    this.total = total;
  }
  update(done: number, total?: number, label?: string): void {
    if (total !== undefined) this.total = total;
    if (label !== undefined) this.label = label;
    const now = Date.now();
    if (now - this.last < 100 && done < this.total) return;
    this.last = now;
    const width = Math.max(10, Math.min(40, (this.stream.columns ?? 80) - this.label.length - 20));
    const frac = this.total > 0 ? Math.min(1, done / this.total) : 0;
    const filled = Math.round(frac * width);
    const bar = '█'.repeat(filled) + '░'.repeat(width - filled);
    this.stream.write(`\r\x1b[2K${this.label} ${bar} ${(frac * 100).toFixed(0).padStart(3)}% (${done}/${this.total})`);
  }
  finish(): void {
    this.stream.write('\r\x1b[2K');
  }
}
