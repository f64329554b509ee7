import { Command, CommanderError } from 'commander';
import { createRequire } from 'node:module';
import { EXIT_INTERRUPTED, EXIT_OK, EXIT_USER, Interrupted, UserError, exitCodeFor } from '../errors.js';
import { runCleanup } from '../util/cleanup.js';
import { COMMANDS } from './commands.js';

const require = createRequire(import.meta.url);
const pkg = require('../../package.json') as { version: string };

function buildProgram(): Command {
  const program = new Command('lamadist')
    .description('Build, sign, assemble, verify, deliver and operate LamaDist')
    .version(pkg.version, '-V, --toolkit-version', 'print the toolkit version')
    .option('--json', 'write only JSON to stdout (logs and progress go to stderr)')
    .option('-v, --verbose', 'more detail on stderr')
    .option('--debug', 'show stack traces for internal errors (implies -v)')
    .option('--no-color', 'no colours (NO_COLOR is honoured too)')
    .showHelpAfterError('(run with --help for usage)')
    .exitOverride()
    .configureOutput({ writeOut: (s) => process.stdout.write(s), writeErr: (s) => process.stderr.write(s) });
  return program;
}

/** Commander applies exitOverride per command; make every subcommand throw instead of exiting. */
function overrideAll(cmd: Command): void {
  cmd.exitOverride();
  for (const sub of cmd.commands) overrideAll(sub);
}

/**
 * The command line to parse instead of `argv` when it names a command that does not exist *and* asks
 * for help (`lamadist provison --help`, `lamadist help provison`): commander would print the
 * enclosing group's help and exit 0, so a typo would look like success to a script. Without the help
 * request commander reports the unknown command itself (with its "Did you mean" suggestion) before
 * any action runs. Undefined when `argv` needs no such treatment.
 */
function withoutHelpForUnknown(program: Command, argv: readonly string[]): string[] | undefined {
  let cmd = program;
  let helpAt: number | undefined;
  for (let i = 0; i < argv.length; i++) {
    const tok = argv[i] as string;
    if (tok === '--') return undefined;
    if (tok.startsWith('-')) {
      const flag = tok.split('=')[0];
      const opt = [cmd, program].flatMap((c) => c.options).find((o) => o.long === flag || o.short === flag);
      // An option's value is not a command name (`fleet --server URL devices`).
      if (opt && (opt.required || opt.optional) && !tok.includes('=')) i++;
      continue;
    }
    // A command without subcommands takes its operands as arguments.
    if (cmd.commands.length === 0) return undefined;
    if (tok === 'help' && helpAt === undefined) {
      helpAt = i;
      continue;
    }
    const sub = cmd.commands.find((c) => c.name() === tok || c.aliases().includes(tok));
    if (!sub) {
      const asksHelp = helpAt !== undefined || argv.some((a) => a === '-h' || a === '--help');
      return asksHelp ? argv.filter((a, j) => j !== helpAt && a !== '-h' && a !== '--help') : undefined;
    }
    if (helpAt !== undefined) return undefined;
    cmd = sub;
  }
  return undefined;
}

function firstVerb(argv: readonly string[]): string | undefined {
  return argv.find((a) => !a.startsWith('-'));
}

/**
 * Run the CLI and return the exit code. Exit codes are decided here only: 0 ok, 1 internal error,
 * 2 user error (including usage errors), 130 interrupted.
 */
export async function main(argv: string[]): Promise<number> {
  const debug = argv.includes('--debug');
  let interrupted: NodeJS.Signals | undefined;
  const onSignal = (sig: NodeJS.Signals): void => {
    if (interrupted) process.exit(EXIT_INTERRUPTED);
    interrupted = sig;
    process.stderr.write(`\nlamadist: interrupted, cleaning up\n`);
    void runCleanup().finally(() => process.exit(EXIT_INTERRUPTED));
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);

  const program = buildProgram();
  const verb = firstVerb(argv);
  const entry = verb ? COMMANDS[verb] : undefined;
  try {
    if (entry && verb) {
      const sub = program.command(verb).description(entry.summary);
      const mod = await entry.load();
      mod.configure(sub);
    } else {
      for (const [name, e] of Object.entries(COMMANDS)) program.command(name).description(e.summary);
    }
    overrideAll(program);
    if (argv.length === 0) {
      program.outputHelp({ error: true });
      return EXIT_USER;
    }
    await program.parseAsync(withoutHelpForUnknown(program, argv) ?? argv, { from: 'user' });
    return EXIT_OK;
  } catch (err) {
    if (err instanceof CommanderError) {
      if (
        err.code === 'commander.helpDisplayed' ||
        err.code === 'commander.version' ||
        err.code === 'commander.help'
      )
        return EXIT_OK;
      return EXIT_USER;
    }
    if (interrupted) return EXIT_INTERRUPTED;
    report(err, debug);
    return err instanceof Interrupted ? EXIT_INTERRUPTED : exitCodeFor(err);
  } finally {
    await runCleanup();
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
  }
}

function report(err: unknown, debug: boolean): void {
  if (err instanceof UserError) {
    process.stderr.write(`lamadist: error: ${err.line()}\n`);
    if (debug && err.cause) process.stderr.write(`${String((err.cause as Error).stack ?? err.cause)}\n`);
    return;
  }
  const e = err instanceof Error ? err : new Error(String(err));
  process.stderr.write(`lamadist: internal error: ${e.message}\n`);
  process.stderr.write(debug ? `${e.stack ?? ''}\n` : 'run again with --debug for the stack trace\n');
}
