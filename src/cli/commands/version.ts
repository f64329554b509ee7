import type { Command } from 'commander';
import { gitVersion, type GitVersion } from '../../version/index.js';
import { act } from '../action.js';
import type { Context } from '../context.js';

/** `lamadist version`: the GitVersion-style version of the checkout (FullSemVer, or every variable with --json). */
export async function version(ctx: Context, dir: string, opts: { show?: keyof GitVersion } = {}): Promise<GitVersion> {
  const v = await gitVersion(dir);
  if (opts.show) ctx.result(v[opts.show], String(v[opts.show]));
  else ctx.result(v, () => (ctx.verbose ? `${v.FullSemVer}\n${v.InformationalVersion}` : v.FullSemVer));
  return v;
}

export function configure(cmd: Command): void {
  cmd
    .description('print the build version derived from git (GitVersion style: last vX.Y.Z tag, commits since, branch, SHA)')
    .option('-C, --dir <path>', 'git checkout to describe', '.')
    .option('--show <variable>', 'print one variable (e.g. SemVer, InformationalVersion, ShortSha)')
    .action(
      act<{ dir: string; show?: keyof GitVersion }>(async (ctx, _args, opts) => {
        await version(ctx, opts.dir, opts.show ? { show: opts.show } : {});
      }),
    );
}
