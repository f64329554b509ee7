import type { Command } from 'commander';
import { BSPS, type Bsp } from '../../bsp/index.js';
import { act } from '../action.js';
import type { Context } from '../context.js';

/** `lamadist bsp list`: the BSP table. */
export async function bspList(ctx: Context): Promise<readonly Bsp[]> {
  ctx.result(BSPS, () => {
    const w = Math.max(...BSPS.map((b) => b.name.length));
    return BSPS.map((b) => `${ctx.c.bold(b.name.padEnd(w))}  ${b.arch.padEnd(6)}  ${b.machine.padEnd(18)}  ${b.title}`).join('\n');
  });
  return BSPS;
}

export function configure(cmd: Command): void {
  cmd
    .command('list', { isDefault: true })
    .description('list BSPs with architecture, machine and boot method')
    .action(act(async (ctx) => void (await bspList(ctx))));
}
