import { promises as fs } from 'node:fs';
import path from 'node:path';
import type { Command } from 'commander';
import { addDeviceKey, addImaKey, addRecoveryKey, initKeys, keyPath, readManifest, type KeyManifest } from '../../keys/index.js';
import { makeOvmfVars, readOvmfVars } from '../../secureboot/index.js';
import { act, intOption } from '../action.js';
import type { Context } from '../context.js';

/** Debian's blank 4M OVMF variable store (authenticated format, no keys). */
export const OVMF_VARS_TEMPLATE = '/usr/share/OVMF/OVMF_VARS_4M.fd';

function summary(ctx: Context, dir: string, m: KeyManifest): string {
  const w = Math.max(...m.files.map((f) => f.file.length));
  return m.files
    .map((f) => `${ctx.c.bold(f.file.padEnd(w))}  ${f.secret ? ctx.c.yellow('secret') : 'public'}  ${f.description}${f.notAfter ? ctx.c.dim(` (until ${f.notAfter.slice(0, 10)})`) : ''}`)
    .concat([ctx.c.dim(`${m.files.length} files in ${dir}`)])
    .join('\n');
}

/** `lamadist keys init [DIR]`: create the fleet key directory. */
export async function keysInit(ctx: Context, dir: string, opts: { force?: boolean; name?: string; days?: number } = {}): Promise<KeyManifest> {
  ctx.info(`generating keys in ${dir} (RSA key generation takes a few seconds)`);
  const m = await initKeys(dir, { force: opts.force, commonName: opts.name, days: opts.days });
  ctx.result({ dir, ...m }, () => summary(ctx, dir, m));
  return m;
}

/** `lamadist keys device NAME [--ec]`: issue a device bundle-encryption certificate (RSA, or P-256 with `ec`). */
export async function keysDevice(ctx: Context, dir: string, name: string, opts: { force?: boolean; days?: number; ec?: boolean } = {}): Promise<KeyManifest> {
  const m = await addDeviceKey(dir, name, opts);
  const files = m.files.filter((f) => f.device === name);
  ctx.result({ dir, device: name, files }, () => files.map((f) => `${ctx.c.bold(f.file)}  ${f.description}`).join('\n'));
  return m;
}

/** `lamadist keys recovery|ima [DIR]`: issue the fleet recovery or IMA pair into a directory made without it. */
export async function keysPair(ctx: Context, which: 'recovery' | 'ima', dir: string, opts: { force?: boolean; name?: string; days?: number } = {}): Promise<KeyManifest> {
  const m = await (which === 'recovery' ? addRecoveryKey : addImaKey)(dir, { force: opts.force, commonName: opts.name, days: opts.days });
  const files = m.files.filter((f) => f.purpose.startsWith(`${which}-`));
  ctx.result({ dir, files }, () => files.map((f) => `${ctx.c.bold(f.file)}  ${f.description}`).join('\n'));
  return m;
}

/** `lamadist keys show [DIR]`: the manifest, with a check that each file exists and secrets are 0600. */
export async function keysShow(ctx: Context, dir: string): Promise<KeyManifest & { problems: string[] }> {
  const m = await readManifest(dir);
  const problems: string[] = [];
  for (const f of m.files) {
    const st = await fs.stat(path.join(dir, f.file)).catch(() => undefined);
    if (!st) problems.push(`${f.file} is missing`);
    else if (f.secret && (st.mode & 0o077) !== 0) problems.push(`${f.file} is readable by others (mode ${(st.mode & 0o777).toString(8)}); run chmod 600`);
  }
  for (const p of problems) ctx.warn(p);
  const out = { ...m, problems };
  ctx.result(out, () => summary(ctx, dir, m));
  return out;
}

/** `lamadist keys ovmf-vars [DIR] -o OUT`: an OVMF variable store with this directory's PK/KEK/db enrolled. */
export async function keysOvmfVars(ctx: Context, dir: string, opts: { out: string; template?: string; force?: boolean }): Promise<void> {
  const m = await readManifest(dir);
  await makeOvmfVars({
    template: opts.template ?? OVMF_VARS_TEMPLATE,
    out: opts.out,
    force: opts.force,
    owner: m.owner,
    pk: await keyPath(dir, 'secureboot-pk-cert'),
    kek: await keyPath(dir, 'secureboot-kek-cert'),
    db: await keyPath(dir, 'secureboot-db-cert'),
  });
  const vars = await readOvmfVars(opts.out);
  ctx.result({ out: opts.out, variables: vars }, () =>
    [...vars.map((v) => `${ctx.c.bold(v.name.padEnd(16))} ${v.certificates.join('; ')}`), ctx.c.dim(`wrote ${opts.out} (Secure Boot enforcing)`)].join('\n'),
  );
}

export function configure(cmd: Command): void {
  cmd.description('create and inspect the fleet key directory (Secure Boot, RAUC, devices, RPM, recovery, IMA)');
  cmd
    .command('init')
    .description('create PK/KEK/db, RAUC CA and signing certificate, the RPM OpenPGP key, the recovery key pair and the IMA signing pair')
    .argument('[dir]', 'key directory', 'keys')
    .option('--name <cn>', 'name used in certificate subjects', 'LamaDist')
    .option('--days <n>', 'certificate validity in days', intOption('--days'), 3650)
    .option('--force', 'replace existing keys')
    .action(act<{ name: string; days: number; force?: boolean }>(async (ctx, [dir], o) => void (await keysInit(ctx, dir ?? 'keys', o))));
  cmd
    .command('device')
    .description('issue a per-device bundle-encryption certificate from the RAUC CA')
    .argument('<name>', 'device name')
    .option('--dir <dir>', 'key directory', 'keys')
    .option('--days <n>', 'certificate validity in days', intOption('--days'), 3650)
    .option('--ec', 'P-256 key instead of RSA (for a key kept in a TPM or secure element)')
    .option('--force', 'replace an existing device certificate')
    .action(act<{ dir: string; days: number; ec?: boolean; force?: boolean }>(async (ctx, [name], o) => void (await keysDevice(ctx, o.dir, name ?? '', o))));
  for (const [which, description, force] of [
    ['recovery', 'issue the fleet recovery key pair (escrow certificate for LUKS recovery keys) into an existing key directory', 'replace an existing recovery key pair (escrows made to the old certificate need the old key)'],
    ['ima', 'issue the fleet IMA signing key pair (signs executables and libraries of root images) into an existing key directory', 'replace an existing IMA key pair (images signed with the old key need the old certificate)'],
  ] as const) {
    cmd
      .command(which)
      .description(description)
      .argument('[dir]', 'key directory', 'keys')
      .option('--name <cn>', 'name used in the certificate subject', 'LamaDist')
      .option('--days <n>', 'certificate validity in days', intOption('--days'), 3650)
      .option('--force', force)
      .action(act<{ name: string; days: number; force?: boolean }>(async (ctx, [dir], o) => void (await keysPair(ctx, which, dir ?? 'keys', o))));
  }
  cmd
    .command('show')
    .description('list the key directory with each file\'s purpose')
    .argument('[dir]', 'key directory', 'keys')
    .action(act(async (ctx, [dir]) => void (await keysShow(ctx, dir ?? 'keys'))));
  cmd
    .command('ovmf-vars')
    .description('write an OVMF variable store with PK/KEK/db enrolled and Secure Boot enforcing')
    .argument('[dir]', 'key directory', 'keys')
    .requiredOption('-o, --out <file>', 'output VARS image')
    .option('--template <file>', 'blank OVMF VARS template', OVMF_VARS_TEMPLATE)
    .option('--force', 'replace the output')
    .action(act<{ out: string; template: string; force?: boolean }>(async (ctx, [dir], o) => void (await keysOvmfVars(ctx, dir ?? 'keys', o))));
}
