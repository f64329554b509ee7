import type { Command } from 'commander';
import { stringify } from 'yaml';
import { DEFAULT_BSP } from '../../bsp/index.js';
import { composeKas, kasFilesFor, type KasSelection } from '../../kas/index.js';
import { act } from '../action.js';
import type { Context } from '../context.js';
import { selectionFrom, selectionOptions, validateSelection, type SelectionFlags } from './build.js';

/**
 * `lamadist dump`: the fully composed kas configuration for a BSP (and extras), computed by the
 * toolkit itself, so it works offline and without kas on the host. YAML by default, JSON with --json.
 */
export async function dump(ctx: Context, root: string, sel: KasSelection): Promise<Record<string, unknown>> {
  validateSelection(root, sel);
  const comp = await composeKas(kasFilesFor(sel), { repoRoot: root });
  const versions = comp.files.map((f) => (f.yaml.value.header as { version?: unknown } | undefined)?.version).filter((v): v is number => typeof v === 'number');
  const config = { ...comp.config, header: { version: versions.length > 0 ? Math.max(...versions) : undefined } };
  ctx.result(config, () => stringify(config, { lineWidth: 0, nullStr: '' }));
  ctx.detail(`composed from ${comp.files.map((f) => f.rel).join(', ')}`);
  return config;
}

export function configure(cmd: Command): void {
  selectionOptions(cmd)
    .description(`print the composed kas configuration for a BSP (default ${DEFAULT_BSP}), computed offline`)
    .option('-C, --dir <path>', 'repository root', '.')
    .action(
      act<SelectionFlags & { dir: string }>(async (ctx, _args, opts) => {
        await dump(ctx, opts.dir, selectionFrom(opts));
      }),
    );
}
