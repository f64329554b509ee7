import type { Command } from 'commander';
import { DEFAULT_BSP } from '../../bsp/index.js';
import { UserError } from '../../errors.js';
import {
  buildImage,
  inspectImage,
  planText,
  type BuildImageOptions,
  type ImagePlan,
  type ImageReport,
} from '../../image/index.js';
import { readUserFile } from '../../util/fsx.js';
import { act, collect, intOption } from '../action.js';
import type { Context } from '../context.js';
import { formatBytes, gptRows, gptTableText } from './gpt.js';

/** Flags of `image build`: the library options plus the ones parsed here (sizes, raw regions). */
export interface ImageBuildCliOptions extends Pick<
  BuildImageOptions,
  | 'bsp'
  | 'rootfs'
  | 'kernel'
  | 'uki'
  | 'ukiB'
  | 'stub'
  | 'cmdline'
  | 'layout'
  | 'emptyB'
  | 'seed'
  | 'recoveryKey'
  | 'recoveryKeyOut'
  | 'dbCert'
  | 'dbKey'
  | 'keys'
  | 'fileContexts'
  | 'imaKey'
  | 'imaCert'
  | 'force'
  | 'dryRun'
> {
  output: string;
  initrd: string[];
  size: string[];
  slotSize?: number;
  diskSize?: number;
  encrypt: boolean;
  raw: string[];
  sourceDateEpoch?: number;
}

function pairs(list: string[], what: string): Record<string, string> {
  const out: Record<string, string> = {};
  for (const item of list) {
    const m = /^([^=]+)=(.+)$/.exec(item);
    if (!m) throw new UserError('LAMA_E_USAGE', `${what} takes NAME=VALUE, got '${item}'`);
    out[m[1] as string] = m[2] as string;
  }
  return out;
}

/** `--size LABEL=MiB` flags (image build, provision) as partition sizes in MiB by label. */
export function parseSizes(list: string[]): Record<string, number> {
  const sizes: Record<string, number> = {};
  for (const [label, v] of Object.entries(pairs(list, '--size'))) {
    if (!/^\d+$/.test(v) || Number(v) < 1)
      throw new UserError('LAMA_E_USAGE', `--size ${label}=${v}: the size must be a whole number of MiB`);
    sizes[label] = Number(v);
  }
  return sizes;
}

/** Turn CLI flags into build options (sizes, raw regions, timestamp). */
export function buildOptionsFrom(opts: ImageBuildCliOptions): BuildImageOptions {
  const sizes: Record<string, number> = {
    ...(opts.slotSize !== undefined && { rootfs_a: opts.slotSize, rootfs_b: opts.slotSize }),
    ...parseSizes(opts.size),
  };
  const env = process.env.SOURCE_DATE_EPOCH;
  if (opts.sourceDateEpoch === undefined && env !== undefined && !/^\d+$/.test(env)) {
    throw new UserError('LAMA_E_USAGE', `SOURCE_DATE_EPOCH must be a whole number of seconds, got '${env}'`);
  }
  return {
    out: opts.output,
    bsp: opts.bsp,
    rootfs: opts.rootfs,
    kernel: opts.kernel,
    initrd: opts.initrd.length > 0 ? opts.initrd : undefined,
    uki: opts.uki,
    ukiB: opts.ukiB,
    stub: opts.stub,
    cmdline: opts.cmdline,
    layout: opts.layout,
    sizes,
    diskSize: opts.diskSize === undefined ? undefined : opts.diskSize * 1024 * 1024,
    encrypt: opts.encrypt,
    emptyB: opts.emptyB,
    seed: opts.seed,
    recoveryKey: opts.recoveryKey,
    recoveryKeyOut: opts.recoveryKeyOut,
    dbCert: opts.dbCert,
    dbKey: opts.dbKey,
    keys: opts.keys,
    fileContexts: opts.fileContexts,
    imaKey: opts.imaKey,
    imaCert: opts.imaCert,
    raw: pairs(opts.raw, '--raw'),
    timestamp: opts.sourceDateEpoch ?? (env ? Number(env) : 0),
    force: opts.force,
    dryRun: opts.dryRun,
  };
}

/** `lamadist image build`: plan, print the plan, write the image. */
export async function imageBuild(ctx: Context, opts: ImageBuildCliOptions): Promise<ImagePlan> {
  const plan = await buildImage({
    ...buildOptionsFrom(opts),
    onStep: (s) => ctx.detail(`${s}…`),
    onPlan: (p) => {
      if (!ctx.json) ctx.info(planText(p));
    },
  });
  ctx.result(plan, () =>
    opts.dryRun
      ? 'dry run: nothing written'
      : `wrote ${opts.output} (${formatBytes(plan.disk.size)})${plan.keys ? `; recovery key in ${plan.keys.recoveryKeyFile}` : ''}`,
  );
  return plan;
}

function reportText(ctx: Context, r: ImageReport): string {
  const out = [gptTableText(ctx, r.gpt)];
  for (const p of r.partitions) {
    const bits: string[] = [];
    if (p.luks)
      bits.push(
        `LUKS2 ${String(p.luks.uuid)} (${(p.luks.keyslots as unknown[]).length} keyslots, ${(p.luks.tokens as unknown[]).length} tokens)${p.unlockedKeyslot ? `, opened with keyslot ${p.unlockedKeyslot}` : ''}`,
      );
    if (p.erofs)
      bits.push(
        `EROFS ${p.erofs.uuid}, ${formatBytes(p.erofs.bytes)}, ${p.erofs.inodes} inodes, built ${new Date(p.erofs.buildTime * 1000).toISOString()}`,
      );
    if (p.verity)
      bits.push(`verity ${p.verity.uuid}, ${p.verity.algorithm}, ${p.verity.dataBlocks} data blocks`);
    if (p.ext4) bits.push(`ext4 '${p.ext4.label}' ${p.ext4.uuid}`);
    if (p.fat) bits.push('FAT');
    if (bits.length > 0) out.push(`${ctx.c.bold(p.label)}: ${bits.join('; ')}`);
  }
  for (const u of r.esp.ukis) {
    out.push(
      `${ctx.c.bold(u.path)} ${formatBytes(u.bytes)}${u.signatures.length ? `, signed by ${u.signatures.join(', ')}` : ', unsigned'}${u.cmdline ? `\n  cmdline: ${u.cmdline}` : ''}`,
    );
  }
  for (const s of r.slots) {
    const state =
      s.verified === true
        ? ctx.c.green('verified')
        : s.verified === false
          ? ctx.c.red(`FAILED: ${s.problem ?? ''}`)
          : s.rootHash
            ? 'not verified (encrypted: pass --key)'
            : 'empty';
    out.push(`slot ${s.slot}: ${s.rootHash ? `root hash ${s.rootHash}, ` : ''}${state}`);
  }
  return out.join('\n');
}

/** `lamadist image inspect IMAGE`: report, then exit 2 if any slot fails verification. */
export async function imageInspect(
  ctx: Context,
  image: string,
  opts: { key?: string; verify: boolean },
): Promise<ImageReport> {
  const key = opts.key ? await readUserFile(opts.key, 'key file') : undefined;
  const r = await inspectImage(image, { key, verify: opts.verify });
  const json = {
    image,
    source: r.gpt.source,
    diskGuid: r.gpt.table.diskGuid,
    table: gptRows(r.gpt.table),
    partitions: r.partitions,
    esp: r.esp,
    slots: r.slots,
  };
  ctx.result(json, () => reportText(ctx, r));
  const bad = r.slots.find((s) => s.verified === false);
  if (bad)
    throw new UserError('LAMA_E_VERITY_MISMATCH', bad.problem ?? `slot ${bad.slot} does not verify`, {
      where: image,
    });
  return r;
}

export function configure(cmd: Command): void {
  cmd
    .command('build')
    .description('write the split A/B disk image (ESP, LUKS2+EROFS slots with dm-verity, encrypted /var)')
    .requiredOption('-o, --output <image>', 'disk image to write')
    .requiredOption('--rootfs <path>', 'root file system: directory, tarball or EROFS image')
    .option('--bsp <name>', 'board support package (lamadist bsp list)', DEFAULT_BSP)
    .option('--kernel <file>', 'kernel image for the UKIs')
    .option('--initrd <file>', 'initramfs for the UKIs (repeatable, concatenated)', collect, [])
    .option('--uki <file>', 'prebuilt UKI for slot A (its roothash= must match the rootfs)')
    .option('--uki-b <file>', 'prebuilt UKI for slot B')
    .option('--stub <file>', 'systemd EFI stub (default: the one for the BSP architecture)')
    .option('--cmdline <args>', 'extra kernel command line arguments')
    .option('--layout <name|file>', "layout replacing the BSP's (meta-lamadist/wic/layouts)")
    .option('--size <label=MiB>', 'override a partition size (repeatable)', collect, [])
    .option('--slot-size <MiB>', 'size of both rootfs slots', intOption('--slot-size'))
    .option('--disk-size <MiB>', 'total disk size; var grows into the rest', intOption('--disk-size'))
    .option('--no-encrypt', 'plain EROFS slots and ext4 /var, no LUKS2')
    .option('--empty-b', 'leave slot B empty (filled by the first RAUC update)')
    .option('--seed <text>', 'derive all UUIDs, salts and keys from this secret seed (reproducible images)')
    .option(
      '--recovery-key <file>',
      'use this recovery passphrase instead of a fresh one per image (shared key)',
    )
    .option(
      '--recovery-key-out <file>',
      'where to write the generated recovery key (default IMAGE.recovery-key)',
    )
    .option('--db-cert <pem>', 'Secure Boot db certificate to sign the UKIs')
    .option('--db-key <pem>', 'Secure Boot db private key')
    .option('--keys <dir>', 'key directory from lamadist keys init (signs with its db key)')
    .option(
      '--file-contexts <file>',
      "SELinux file_contexts labelling the root image (default: the policy the tree's /etc/selinux/config selects)",
    )
    .option(
      '--ima-key <dir|file>',
      "sign executables, libraries and kernel modules (security.ima) with the key directory's IMA key, or this key file",
    )
    .option('--ima-cert <file>', 'certificate of an --ima-key file (DER or PEM)')
    .option(
      '--raw <name=file>',
      'raw boot loader region, e.g. idbloader=idbloader.img (repeatable)',
      collect,
      [],
    )
    .option(
      '--source-date-epoch <seconds>',
      'time stamped on every file (default $SOURCE_DATE_EPOCH or 0)',
      intOption('--source-date-epoch'),
    )
    .option('--dry-run', 'print the plan only')
    .option('--force', 'replace existing outputs')
    .action(act<ImageBuildCliOptions>(async (ctx, _args, opts) => void (await imageBuild(ctx, opts))));
  cmd
    .command('inspect')
    .description(
      'show partitions, LUKS2 headers, EROFS/verity superblocks, UKI command lines; verify each slot',
    )
    .argument('<image>', 'disk image')
    .option('--key <file>', 'key (recovery or provisioning) to unlock LUKS2 slots and verify them')
    .option('--no-verify', 'skip reading the slots against their root hashes')
    .action(
      act<{ key?: string; verify: boolean }>(
        async (ctx, args, opts) => void (await imageInspect(ctx, args[0] as string, opts)),
      ),
    );
}
