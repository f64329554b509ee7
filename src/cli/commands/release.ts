import type { Command } from 'commander';
import { getBsp } from '../../bsp/index.js';
import { UserError } from '../../errors.js';
import { loadInventory } from '../../host/index.js';
import { signingPair } from '../../keys/index.js';
import { createRelease, describeRelease, openRelease, releaseHosts, type CreatedRelease } from '../../release/index.js';
import { readUserFile } from '../../util/fsx.js';
import { act, collect } from '../action.js';
import type { Context } from '../context.js';
import { parseSigningTime } from './bundle.js';
import { DEFAULT_INVENTORY } from './host.js';

export interface ReleaseCreateOptions {
  output: string;
  bsp: string;
  version: string;
  build?: string;
  description?: string;
  rootfs: string;
  verity: string;
  rootHash: string;
  kernel: string;
  initrd: string[];
  osrel?: string;
  stub?: string;
  inventory: string;
  keys: string;
  format?: string;
  to: string[];
  signingTime?: string;
  force?: boolean;
}

/**
 * `lamadist release create`: one bundle for every host of the inventory, from a build's root
 * image, dm-verity tree, kernel and initramfs (see docs/host-identity.md).
 */
export async function releaseCreate(ctx: Context, o: ReleaseCreateOptions): Promise<CreatedRelease> {
  const format = o.format ?? 'verity';
  if (format !== 'verity' && format !== 'crypt') throw new UserError('LAMA_E_USAGE', `--format must be verity or crypt, got '${format}'`);
  if (o.to.length > 0 && format !== 'crypt') throw new UserError('LAMA_E_USAGE', '--to needs --format crypt');
  const bsp = getBsp(o.bsp);
  const inv = await loadInventory(o.inventory);
  const hosts = inv.hosts.filter((h) => (h.bsp ?? 'x86_64') === bsp.name);
  const created = await createRelease({
    out: o.output,
    bsp,
    version: o.version,
    ...(o.build !== undefined && { build: o.build }),
    ...(o.description !== undefined && { description: o.description }),
    rootfs: o.rootfs,
    verity: o.verity,
    rootHash: o.rootHash,
    kernel: await readUserFile(o.kernel, 'kernel'),
    initrd: await Promise.all(o.initrd.map((f) => readUserFile(f, 'initrd'))),
    ...(o.osrel && { osrel: await readUserFile(o.osrel, 'os-release') }),
    ...(o.stub && { stub: await readUserFile(o.stub, 'EFI stub') }),
    hosts: releaseHosts(hosts),
    db: await signingPair(o.keys, 'secureboot-db'),
    format,
    signer: await signingPair(o.keys, 'rauc-signing'),
    ...(o.to.length > 0 && { recipients: await Promise.all(o.to.map(async (f) => (await readUserFile(f, 'recipient certificate')).toString('utf8'))) }),
    signingTime: parseSigningTime(o.signingTime),
    force: o.force ?? false,
    onStep: (s) => ctx.detail(s),
  });
  ctx.result(created, () =>
    [
      `${ctx.c.green('created')} ${created.path} (${created.format}, ${created.size} bytes) for ${created.hosts.length} ${bsp.name} host(s)`,
      ...created.hosts.map((h) => `  ${h.name} (${h.machineId}): ${h.patchBytes}-byte UKI patch`),
    ].join('\n'),
  );
  return created;
}

/** `lamadist release show BUNDLE`: the verified release and the hosts it carries. */
export async function releaseShow(ctx: Context, bundle: string, o: { keys: string; bundleKey?: string }): Promise<Awaited<ReturnType<typeof describeRelease>>> {
  const r = await openRelease(bundle, { keys: o.keys, ...(o.bundleKey && { bundleKey: o.bundleKey }) });
  try {
    const d = await describeRelease(r);
    ctx.result(d, () =>
      [
        `${d.bundle}: ${d.bsp} (${d.compatible}) version ${d.version}, root hash ${d.rootHash}`,
        `${d.hosts.length} host(s):`,
        ...d.hosts.map((h) => `  ${h.name.padEnd(20)} ${h.machineId}  ${h.patchBytes}-byte UKI patch`),
      ].join('\n'),
    );
    return d;
  } finally {
    await r.close();
  }
}

export function configure(cmd: Command): void {
  cmd.description('make the release bundle that serves every host of the fleet (template UKIs plus a signed patch per host)');
  cmd
    .command('create')
    .description('one RAUC bundle for every inventory host of the BSP: root image, verity tree, template UKIs, per-host patches, install check')
    .requiredOption('-o, --output <file>', 'bundle to write')
    .requiredOption('--bsp <name>', 'board support package')
    .requiredOption('--version <version>', 'release version')
    .option('--build <id>', 'build id')
    .option('--description <text>', 'description')
    .requiredOption('--rootfs <file>', 'EROFS root image')
    .requiredOption('--verity <file>', 'its dm-verity hash tree (with superblock)')
    .requiredOption('--root-hash <hex>', 'the tree\'s root hash (checked against the image)')
    .requiredOption('--kernel <file>', 'kernel image')
    .option('--initrd <file>', 'initramfs (repeatable, concatenated)', collect, [])
    .option('--osrel <file>', 'os-release of the root image')
    .option('--stub <file>', 'systemd EFI stub (default: Debian\'s for the BSP)')
    .option('--inventory <file>', 'host inventory', DEFAULT_INVENTORY)
    .requiredOption('--keys <dir>', 'fleet key directory (db key signs the hosts\' UKIs, RAUC key the bundle)')
    .option('--format <verity|crypt>', 'bundle format', 'verity')
    .option('--to <cert>', 'crypt: recipient certificate (repeatable)', collect, [])
    .option('--signing-time <time>', 'signing time (ISO 8601 or epoch seconds; default SOURCE_DATE_EPOCH, else now)')
    .option('--force', 'overwrite the output')
    .action(act<ReleaseCreateOptions>(async (ctx, _a, o) => void (await releaseCreate(ctx, o))));
  cmd
    .command('show')
    .description('verify a release bundle and list the hosts it carries (a device not listed refuses it)')
    .argument('<bundle>', 'release bundle')
    .requiredOption('--keys <dir>', 'fleet key directory (RAUC keyring; device keys open a crypt release)')
    .option('--bundle-key <pem>', 'device key that opens a crypt release')
    .action(act<{ keys: string; bundleKey?: string }>(async (ctx, [bundle], o) => void (await releaseShow(ctx, bundle ?? '', o))));
}
