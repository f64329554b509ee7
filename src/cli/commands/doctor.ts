import path from 'node:path';
import type { Command } from 'commander';
import { cannotBuildReason, diagnose, type Finding } from '../../doctor/index.js';
import { UserError } from '../../errors.js';
import { act } from '../action.js';
import type { Context } from '../context.js';

export interface DoctorFlags {
  /** Probe the layer hosts (default true). */
  network?: boolean;
}

/** `lamadist doctor`: every host prerequisite with its fix; exit 2 when something blocks a build. */
export async function doctor(ctx: Context, root: string, flags: DoctorFlags = {}): Promise<Finding[]> {
  const findings = await diagnose({ root: path.resolve(root), probeNetwork: flags.network ?? true });
  ctx.result(findings, () =>
    findings
      .filter((f) => f.severity !== 'ok' || ctx.verbose)
      .map((f) => {
        const mark = f.severity === 'ok' ? ctx.c.green('ok   ') : f.severity === 'warn' ? ctx.c.yellow('warn ') : ctx.c.red('error');
        return `${mark} ${f.id}: ${f.detail}${f.fix ? `\n      fix: ${f.fix}` : ''}`;
      })
      .concat(`${findings.filter((f) => f.severity === 'ok').length} ok, ${findings.filter((f) => f.severity === 'warn').length} warnings, ${findings.filter((f) => f.severity === 'error').length} errors`)
      .join('\n'),
  );
  const errors = findings.filter((f) => f.severity === 'error');
  if (errors.length > 0) throw new UserError('LAMA_E_DOCTOR', `${errors.length} prerequisite(s) missing: ${errors.map((e) => e.id).join(', ')}`);
  return findings;
}

/** `lamadist doctor --can-build`: exit 0 when `lamadist build` can run here, else one line saying why and what to do. */
export async function canBuild(ctx: Context, root: string, flags: DoctorFlags = {}): Promise<void> {
  const reason = await cannotBuildReason({ root: path.resolve(root), probeNetwork: flags.network ?? true });
  if (reason) throw new UserError('LAMA_E_CANNOT_BUILD', reason);
  ctx.result({ canBuild: true }, 'this host can build LamaDist');
}

export function configure(cmd: Command): void {
  cmd
    .description('check host prerequisites (container engine, user namespaces, disk, locale, tools, layer hosts), each with its fix')
    .option('-C, --dir <path>', 'repository root', '.')
    .option('--can-build', 'only answer whether `lamadist build` can run on this host (exit 0) or not (exit 2, one line)')
    .option('--no-network', 'do not probe the layer repository hosts')
    .action(
      act<DoctorFlags & { dir: string; canBuild?: boolean }>(async (ctx, _a, o) => {
        if (o.canBuild) await canBuild(ctx, o.dir, o);
        else await doctor(ctx, o.dir, o);
      }),
    );
}
