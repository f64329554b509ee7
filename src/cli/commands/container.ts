import type { Command } from 'commander';
import { buildContainerImage, imageExists, planContainerRun, planImageRemove, resolveSettings } from '../../build/index.js';
import { UserError } from '../../errors.js';
import { run } from '../../util/proc.js';
import { act } from '../action.js';
import type { Context } from '../context.js';
import { containerOptions, imageBuildOutput, overridesFrom, shellLine, type ContainerFlags } from './build.js';

/** `lamadist container build`: build the kas build container from container/Containerfile. */
export async function containerBuild(ctx: Context, root: string, flags: ContainerFlags, opts: { noCache?: boolean } = {}): Promise<string> {
  const settings = await resolveSettings(root, overridesFrom(flags));
  const log = await buildContainerImage(settings, { ...opts, ...imageBuildOutput(ctx, settings.image) });
  ctx.result({ image: settings.image, log }, `built ${settings.image}`);
  return settings.image;
}


/** `lamadist container shell`: a plain shell in the build container (no kas environment). */
export async function containerShell(ctx: Context, root: string, flags: ContainerFlags): Promise<void> {
  const settings = await resolveSettings(root, overridesFrom(flags));
  const inv = planContainerRun(settings, ['bash', '-l'], { interactive: Boolean(process.stdin.isTTY) });
  ctx.detail(shellLine(inv));
  const r = await run(inv.cmd, inv.args, { inherit: true, allowFailure: true });
  if (r.code !== 0) throw new UserError('LAMA_E_SHELL', `container shell exited with ${r.code}`);
}

/** `lamadist container clean`: remove the build container image; absent is fine. */
export async function containerClean(ctx: Context, root: string, flags: ContainerFlags): Promise<boolean> {
  const settings = await resolveSettings(root, overridesFrom(flags));
  if (!(await imageExists(settings))) {
    ctx.result({ image: settings.image, removed: false }, `${settings.image} is not present`);
    return false;
  }
  const inv = planImageRemove(settings);
  await run(inv.cmd, inv.args, { userErrorCode: 'LAMA_E_CONTAINER_CLEAN' });
  ctx.result({ image: settings.image, removed: true }, `removed ${settings.image}`);
  return true;
}

export function configure(cmd: Command): void {
  cmd.description('build, enter or remove the kas build container');
  containerOptions(cmd.command('build').description('build the container image from container/Containerfile'))
    .option('-C, --dir <path>', 'repository root', '.')
    .option('--no-cache', 'rebuild every layer')
    .action(
      act<ContainerFlags & { dir: string; cache: boolean }>(async (ctx, _a, o) => {
        await containerBuild(ctx, o.dir, o, { noCache: !o.cache });
      }),
    );
  containerOptions(cmd.command('shell').description('open a shell in the build container (without kas)'))
    .option('-C, --dir <path>', 'repository root', '.')
    .action(act<ContainerFlags & { dir: string }>(async (ctx, _a, o) => containerShell(ctx, o.dir, o)));
  containerOptions(cmd.command('clean').description('remove the build container image'))
    .option('-C, --dir <path>', 'repository root', '.')
    .action(
      act<ContainerFlags & { dir: string }>(async (ctx, _a, o) => {
        await containerClean(ctx, o.dir, o);
      }),
    );
}
