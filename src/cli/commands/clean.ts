import { existsSync, promises as fs } from 'node:fs';
import path from 'node:path';
import { createInterface } from 'node:readline/promises';
import type { Command } from 'commander';
import { resolveSettings } from '../../build/index.js';
import { UserError } from '../../errors.js';
import { act } from '../action.js';
import type { Context } from '../context.js';
import { containerClean } from './container.js';

export interface CleanOptions {
  /** The whole build directory: layer checkouts, downloads, configuration, everything. */
  all?: boolean;
  sstate?: boolean;
  container?: boolean;
  /** Do not ask before --all. */
  yes?: boolean;
}

/** What `lamadist clean` removes for a set of options (pure, for tests and --json). */
export function planClean(src: string, buildEntries: string[], sstateDir: string, o: CleanOptions): string[] {
  const build = path.join(src, 'build');
  const out: string[] = [];
  if (o.all) out.push(build);
  else if (!o.sstate && !o.container) out.push(...buildEntries.filter((e) => /^tmp(-.+)?$/.test(e)).map((e) => path.join(build, e)));
  if (o.sstate) out.push(sstateDir);
  return out;
}

async function confirm(ctx: Context, question: string): Promise<boolean> {
  if (!process.stdin.isTTY) return false;
  const rl = createInterface({ input: process.stdin, output: ctx.stderr });
  try {
    return /^y(es)?$/i.test((await rl.question(`${question} [y/N] `)).trim());
  } finally {
    rl.close();
  }
}

/**
 * `lamadist clean`: by default the build output (build/tmp*), keeping downloads, sstate and layer
 * checkouts so the next build is incremental. --all removes build/ entirely (after confirmation),
 * --sstate the shared-state cache, --container the build container image.
 */
export async function clean(ctx: Context, root: string, o: CleanOptions): Promise<string[]> {
  const src = path.resolve(root);
  const entries = await fs.readdir(path.join(src, 'build')).catch(() => [] as string[]);
  const sstateDir = path.resolve(src, process.env.LAMADIST_SSTATE_DIR || '.cache/sstate');
  const targets = planClean(src, entries, sstateDir, o).filter((t) => existsSync(t));
  if (o.all && targets.includes(path.join(src, 'build')) && !o.yes) {
    const ok = await confirm(ctx, `remove ${path.join(src, 'build')} with its downloads and layer checkouts?`);
    if (!ok) throw new UserError('LAMA_E_CONFIRM', `not removing ${path.join(src, 'build')} (confirm interactively or pass --yes)`);
  }
  for (const t of targets) {
    ctx.detail(`removing ${t}`);
    await fs.rm(t, { recursive: true, force: true });
  }
  if (o.container) {
    const settings = await resolveSettings(src).catch(() => undefined);
    if (settings) await containerClean(ctx, src, { ulimit: [] });
    else ctx.info('no container engine installed; no image to remove');
  }
  ctx.result({ removed: targets }, targets.length > 0 ? targets.map((t) => `removed ${path.relative(src, t) || t}`).join('\n') : o.container ? '' : 'nothing to remove');
  return targets;
}

export function configure(cmd: Command): void {
  cmd
    .description('remove build output (default), or everything (--all), the sstate cache (--sstate), the build container (--container)')
    .option('-C, --dir <path>', 'repository root', '.')
    .option('--all', 'remove the whole build directory (asks first unless --yes)')
    .option('--sstate', 'remove the shared-state cache (.cache/sstate or LAMADIST_SSTATE_DIR)')
    .option('--container', 'remove the build container image')
    .option('-y, --yes', 'do not ask for confirmation')
    .action(
      act<CleanOptions & { dir: string }>(async (ctx, _a, o) => {
        await clean(ctx, o.dir, o);
      }),
    );
}
