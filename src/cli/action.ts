import type { Command } from 'commander';
import { createContext, type Context, type GlobalOptions } from './context.js';

/**
 * Wrap a command handler for commander: builds the Context from the global flags and hands the
 * handler its positional arguments and options. Handlers stay plain async functions of
 * (ctx, args, opts) and are callable from tests without the parser.
 */
export function act<O = Record<string, unknown>>(
  handler: (ctx: Context, args: string[], opts: O, cmd: Command) => Promise<void>,
): (...a: unknown[]) => Promise<void> {
  return async (...a: unknown[]) => {
    const cmd = a[a.length - 1] as Command;
    const all = cmd.optsWithGlobals<GlobalOptions>();
    const ctx = createContext({ json: all.json, verbose: all.verbose, debug: all.debug, color: colorFlag(all) });
    const args = (cmd.processedArgs as unknown[]).flatMap((v) => (Array.isArray(v) ? v.map(String) : v === undefined ? [] : [String(v)]));
    await handler(ctx, args, cmd.opts<O & object>() as O, cmd);
  };
}

function colorFlag(all: GlobalOptions): boolean | undefined {
  // commander sets color=true by default for --no-color; only an explicit --no-color forces it off.
  return all.color === false ? false : undefined;
}

/** Commander argument parser of a repeatable option: every occurrence, in order. */
export const collect = (v: string, prev: string[] = []): string[] => [...prev, v];

/** Parse a decimal integer option, rejecting garbage with a clear message. */
export function intOption(name: string): (value: string) => number {
  return (value: string) => {
    if (!/^\d+$/.test(value)) throw new Error(`${name} must be a whole number, got '${value}'`);
    return Number.parseInt(value, 10);
  };
}
