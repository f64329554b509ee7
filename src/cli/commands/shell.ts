import path from 'node:path';
import type { Command } from 'commander';
import { planContainerRun, planKasCommand, resolveSettings } from '../../build/index.js';
import { UserError } from '../../errors.js';
import type { KasSelection } from '../../kas/index.js';
import { run } from '../../util/proc.js';
import { act } from '../action.js';
import type { Context } from '../context.js';
import { containerOptions, overridesFrom, selectionFrom, selectionOptions, shellLine, validateSelection, type ContainerFlags, type SelectionFlags } from './build.js';

/** `lamadist shell`: an interactive `kas shell` (BitBake environment) in the build container. */
export async function shell(ctx: Context, root: string, sel: KasSelection, flags: ContainerFlags): Promise<void> {
  const src = path.resolve(root);
  validateSelection(src, sel);
  const settings = await resolveSettings(src, overridesFrom(flags));
  const inv = planContainerRun(settings, planKasCommand('shell', sel), { interactive: Boolean(process.stdin.isTTY) });
  ctx.detail(shellLine(inv));
  const r = await run(inv.cmd, inv.args, { inherit: true, allowFailure: true });
  if (r.code !== 0) throw new UserError('LAMA_E_SHELL', `kas shell exited with ${r.code}`);
}

export function configure(cmd: Command): void {
  containerOptions(selectionOptions(cmd))
    .description('open a kas shell (BitBake environment) for a BSP inside the build container')
    .option('-C, --dir <path>', 'repository root', '.')
    .action(
      act<SelectionFlags & ContainerFlags & { dir: string }>(async (ctx, _args, opts) => {
        await shell(ctx, opts.dir, selectionFrom(opts), opts);
      }),
    );
}
