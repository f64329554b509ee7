import type { Command } from 'commander';
import { randomBytes } from 'node:crypto';
import { promises as fs } from 'node:fs';
import { UserError } from '../../errors.js';
import { readUserFile, withAtomicFile } from '../../util/fsx.js';
import {
  DEFAULT_ITER_TIME_MS,
  LUKS2_DATA_OFFSET,
  MIN_PBKDF2_ITERATIONS,
  benchmarkPbkdf2,
  encryptPayload,
  luksSummary,
  planLuks2,
  readLuks2,
  type Luks2Header,
} from '../../luks/index.js';
import { act, collect, intOption } from '../action.js';
import type { Context } from '../context.js';

export interface LuksFormatOptions {
  keyFile: string[];
  uuid?: string;
  label?: string;
  force?: boolean;
  /** Milliseconds one keyslot should take to unlock on this machine (cryptsetup's --iter-time). */
  iterTime?: number;
  /** A fixed PBKDF2 iteration count instead of the benchmark (cryptsetup's --pbkdf-force-iterations). */
  pbkdfForceIterations?: number;
}

/**
 * Keyslot iterations for `luks format`: a key file may hold a passphrase, so they come from the
 * benchmark like cryptsetup's, and a count the user forces below one second's worth is named.
 */
function keyslotIterations(ctx: Context, opts: LuksFormatOptions): number {
  const oneSecond = benchmarkPbkdf2(1000);
  const forced = opts.pbkdfForceIterations;
  if (forced !== undefined && forced < MIN_PBKDF2_ITERATIONS)
    throw new UserError(
      'LAMA_E_USAGE',
      `--pbkdf-force-iterations ${forced} is below the ${MIN_PBKDF2_ITERATIONS} cryptsetup accepts for pbkdf2`,
    );
  if (opts.iterTime !== undefined && opts.iterTime < 1)
    throw new UserError('LAMA_E_USAGE', '--iter-time must be at least 1 ms');
  const iterTime = opts.iterTime ?? DEFAULT_ITER_TIME_MS;
  const iterations = forced ?? Math.max(MIN_PBKDF2_ITERATIONS, Math.round((oneSecond * iterTime) / 1000));
  const how = forced !== undefined ? 'forced' : `${iterTime} ms on this machine`;
  ctx.info(`keyslot pbkdf2-sha256: ${iterations} iterations (${how})`);
  if (iterations < oneSecond)
    ctx.warn(
      `${iterations} PBKDF2 iterations unlock in under a second here (${oneSecond} take 1 s): weak against guessing if a key file holds a passphrase`,
    );
  return iterations;
}

/**
 * `lamadist luks format PAYLOAD OUT --key-file K…`: a LUKS2 container holding PAYLOAD, one keyslot per
 * key file, written atomically.
 */
export async function luksFormat(
  ctx: Context,
  payload: string,
  out: string,
  opts: LuksFormatOptions,
): Promise<Luks2Header> {
  if (opts.keyFile.length === 0) throw new UserError('LAMA_E_LUKS_NO_KEY', 'give at least one --key-file');
  const keys = await Promise.all(opts.keyFile.map((k) => readUserFile(k, 'key file')));
  const src = await fs.open(payload, 'r').catch((e: NodeJS.ErrnoException) => {
    throw e.code === 'ENOENT' ? new UserError('LAMA_E_NOT_FOUND', `payload ${payload} does not exist`) : e;
  });
  try {
    const length = (await src.stat()).size;
    const iterations = keyslotIterations(ctx, opts);
    const volumeKey = randomBytes(64);
    const plan = planLuks2({ volumeKey, keys, uuid: opts.uuid, label: opts.label, iterations });
    const bar = ctx.progress('encrypting', length);
    await withAtomicFile(out, { force: opts.force }, async (o) => {
      await o.fd.write(plan.metadata, 0, plan.metadata.length, 0);
      const segment = Number(plan.header.json.segments['0']?.offset ?? LUKS2_DATA_OFFSET);
      await encryptPayload({
        source: src,
        length,
        out: o.fd,
        outOffset: segment,
        volumeKey,
        onProgress: (d) => bar.update(d),
      });
    });
    bar.finish();
    const s = luksSummary(plan.header);
    ctx.result(
      s,
      () =>
        `LUKS2 container ${plan.header.uuid} written to ${out} (${length} payload bytes, ${keys.length} keyslot${keys.length > 1 ? 's' : ''})`,
    );
    return plan.header;
  } finally {
    await src.close();
  }
}

function dumpText(ctx: Context, s: ReturnType<typeof luksSummary>, problems: string[]): string {
  const b = ctx.c.bold;
  const lines = [
    `${b('LUKS2')} ${String(s.uuid)}  label ${String(s.label) || '-'}  epoch ${String(s.epoch)}`,
  ];
  lines.push(b('Data segments:'));
  for (const seg of s.segments as Record<string, unknown>[]) {
    lines.push(
      `  ${String(seg.id)}: ${String(seg.type)} ${String(seg.cipher)}, offset ${String(seg.offset)}, length ${String(seg.size)}, sector ${String(seg.sectorSize)}`,
    );
  }
  lines.push(b('Keyslots:'));
  for (const k of s.keyslots as Record<string, unknown>[]) {
    lines.push(
      `  ${String(k.id)}: ${String(k.type)} ${String(k.keyBits)}-bit ${String(k.cipher)}, ${String(k.pbkdf)}${k.iterations ? ` ${String(k.iterations)} iterations` : ''}, area ${String(k.areaOffset)}+${String(k.areaLength)}`,
    );
  }
  lines.push(b('Tokens:'));
  for (const t of s.tokens as Record<string, unknown>[])
    lines.push(`  ${String(t.id)}: ${String(t.type)} (keyslots ${(t.keyslots as string[]).join(',')})`);
  lines.push(b('Digests:'));
  for (const d of s.digests as Record<string, unknown>[])
    lines.push(
      `  ${String(d.id)}: ${String(d.type)} ${String(d.hash)} (keyslots ${(d.keyslots as string[]).join(',')})`,
    );
  for (const p of problems) lines.push(ctx.c.yellow(`warning: ${p}`));
  return lines.join('\n');
}

/** `lamadist luks dump FILE`: print a LUKS2 header (segments, keyslots, tokens, digests). */
export async function luksDump(ctx: Context, file: string, opts: { offset?: number }): Promise<Luks2Header> {
  const r = await readLuks2(file, { offset: opts.offset });
  const s = luksSummary(r.header);
  ctx.result({ ...s, source: r.source, problems: r.problems }, () => dumpText(ctx, s, r.problems));
  return r.header;
}

export function configure(cmd: Command): void {
  cmd
    .command('format')
    .description('create a LUKS2 container (aes-xts-plain64, 4096-byte sectors) holding a payload file')
    .argument('<payload>', 'plaintext to encrypt')
    .argument('<out>', 'container file to write')
    .option('--key-file <file>', 'key for one keyslot (repeat for more keyslots)', collect, [])
    .option('--uuid <uuid>', 'container UUID')
    .option('--label <label>', 'LUKS2 label')
    .option(
      '--iter-time <ms>',
      `keyslot unlocking time on this machine, for the PBKDF2 benchmark (default ${DEFAULT_ITER_TIME_MS}, as cryptsetup)`,
      intOption('--iter-time'),
    )
    .option(
      '--pbkdf-force-iterations <n>',
      `PBKDF2 iterations instead of the benchmark (at least ${MIN_PBKDF2_ITERATIONS}; warns below one second's worth)`,
      intOption('--pbkdf-force-iterations'),
    )
    .option('--force', 'replace an existing output')
    .action(
      act<LuksFormatOptions>(
        async (ctx, args, opts) => void (await luksFormat(ctx, args[0] as string, args[1] as string, opts)),
      ),
    );
  cmd
    .command('dump')
    .description('print a LUKS2 header: segments, keyslots, tokens, digests')
    .argument('<file>', 'container, partition or disk image')
    .option('--offset <bytes>', 'byte offset of the container inside FILE', intOption('--offset'))
    .action(
      act<{ offset?: number }>(
        async (ctx, args, opts) => void (await luksDump(ctx, args[0] as string, opts)),
      ),
    );
}
