import path from 'node:path';
import type { Command } from 'commander';
import { runChecks, type CheckReport } from '../../check/index.js';
import { UserError } from '../../errors.js';
import { act } from '../action.js';
import type { Context } from '../context.js';

/**
 * `lamadist check`: verify the distribution definition. Problems go to stdout (one per line, or the
 * whole report with --json); any problem makes the command exit 2.
 */
export async function check(ctx: Context, root: string, opts: { kasSchema?: string } = {}): Promise<CheckReport> {
  const report = await runChecks({ root, ...(opts.kasSchema ? { kasSchema: path.resolve(opts.kasSchema) } : {}) });
  ctx.result(report, () => {
    const lines = report.problems.map((p) => `${p.where}: ${p.message} [${p.code}]`);
    const c = report.checked;
    const what = `${c.kasFiles} kas files, ${c.compositions} compositions, ${c.layers} layers, ${c.machines} machines, ${c.wks} wks files, ${c.systemConfs} system.conf${report.peers.length ? ` (also loaded by ${report.peers.join(', ')})` : ''}`;
    lines.push(report.ok ? ctx.c.green(`ok: ${what}`) : ctx.c.red(`${report.problems.length} problem(s) in ${what}`));
    return lines.join('\n');
  });
  ctx.detail(`kas schema: ${report.schema}`);
  if (!report.ok) {
    throw new UserError('LAMA_E_CHECK_FAILED', `${report.problems.length} problem(s) in the distribution definition`, { where: path.resolve(root) });
  }
  return report;
}

export function configure(cmd: Command): void {
  cmd
    .description('check kas files, layers, machines, wks templates and RAUC system.conf against each other (file:line:col)')
    .option('-C, --dir <path>', 'repository to check', '.')
    .option('--kas-schema <path>', 'kas JSON schema (default: the pinned kas release, in the build container image or installed, else the schema shipped with lamadist)')
    .action(
      act<{ dir: string; kasSchema?: string }>(async (ctx, _args, opts) => {
        await check(ctx, opts.dir, opts.kasSchema ? { kasSchema: opts.kasSchema } : {});
      }),
    );
}
