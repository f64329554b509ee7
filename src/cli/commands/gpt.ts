import type { Command } from 'commander';
import { UserError } from '../../errors.js';
import {
  attributeNames,
  dpsRoleOf,
  partitionExtent,
  readGpt,
  repairGpt,
  type GptReadResult,
  type GptTable,
} from '../../disk/index.js';
import { act } from '../action.js';
import type { Context } from '../context.js';

/** One partition as `gpt show` reports it. */
export interface GptRow {
  number: number;
  name: string;
  role: string | null;
  arch: string | null;
  typeGuid: string;
  uuid: string;
  firstLba: string;
  lastLba: string;
  offset: number;
  size: number;
  attributes: string[];
}

/** Rows with DPS roles and byte extents, for display and JSON. */
export function gptRows(t: GptTable): GptRow[] {
  return t.partitions.map((p) => {
    const dps = dpsRoleOf(p.typeGuid);
    const { offset, size } = partitionExtent(t, p);
    return {
      number: p.number,
      name: p.name,
      role: dps?.role ?? null,
      arch: dps?.arch ?? null,
      typeGuid: p.typeGuid,
      uuid: p.uuid,
      firstLba: p.firstLba.toString(),
      lastLba: p.lastLba.toString(),
      offset,
      size,
      attributes: attributeNames(p.attributes),
    };
  });
}

/** Human size with binary units, exact bytes when small. */
export function formatBytes(n: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let v = n;
  let u = 0;
  while (v >= 1024 && u < units.length - 1 && v % 1024 === 0) {
    v /= 1024;
    u++;
  }
  return `${v} ${units[u]}`;
}

/** The human table `gpt show` and `image inspect` print. */
export function gptTableText(ctx: Context, r: GptReadResult): string {
  const t = r.table;
  const head = `disk ${t.diskGuid}, ${formatBytes(Number(t.diskSectors) * t.sectorSize)}, ${t.sectorSize}-byte sectors, table from ${r.source} GPT`;
  const rows = gptRows(t).map((row) => [
    String(row.number),
    row.name,
    row.role ? `${row.role}${row.arch ? ` (${row.arch})` : ''}` : row.typeGuid,
    String(row.offset),
    formatBytes(row.size),
    row.uuid,
    row.attributes.join(',') || '-',
  ]);
  const header = ['#', 'name', 'role', 'offset', 'size', 'uuid', 'attributes'];
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r2) => (r2[i] as string).length)));
  const line = (cells: string[]): string =>
    cells
      .map((c, i) => c.padEnd(widths[i] as number))
      .join('  ')
      .trimEnd();
  return [head, ctx.c.bold(line(header)), ...rows.map(line)].join('\n');
}

/**
 * `lamadist gpt show IMAGE`: the partition table with DPS roles. A damaged primary is shown from the
 * backup, then reported as an error (exit 2) so scripts notice.
 */
export async function gptShow(ctx: Context, image: string): Promise<GptReadResult> {
  const r = await readGpt(image, { strict: false });
  ctx.result(
    {
      source: r.source,
      diskGuid: r.table.diskGuid,
      sectorSize: r.table.sectorSize,
      diskSectors: r.table.diskSectors,
      problems: r.problems,
      partitions: gptRows(r.table),
    },
    () => gptTableText(ctx, r),
  );
  if (r.problems.length > 0) {
    const extra = r.problems.length > 1 ? ` (and ${r.problems.length - 1} more problems)` : '';
    const hint = r.source === 'backup' ? '; `lamadist gpt repair` restores it from the backup' : '';
    throw new UserError('LAMA_E_GPT_CORRUPT', `${r.problems[0] as string}${extra}${hint}`, { where: image });
  }
  return r;
}

/** `lamadist gpt repair IMAGE`: rewrite both copies of the table from the intact one. */
export async function gptRepair(ctx: Context, image: string): Promise<string[]> {
  const r = await repairGpt(image);
  ctx.result({ repaired: r.before }, () =>
    r.before.length === 0
      ? 'GPT was healthy; both copies rewritten unchanged'
      : `repaired: ${r.before.join('; ')}`,
  );
  return r.before;
}

export function configure(cmd: Command): void {
  cmd
    .command('show')
    .description('print the GPT with DPS roles, offsets, sizes, names and attributes')
    .argument('<image>', 'disk image or block device')
    .action(act(async (ctx, args) => void (await gptShow(ctx, args[0] as string))));
  cmd
    .command('repair')
    .description('rewrite a damaged primary (or backup) GPT from the intact copy')
    .argument('<image>', 'disk image or block device')
    .action(act(async (ctx, args) => void (await gptRepair(ctx, args[0] as string))));
}
