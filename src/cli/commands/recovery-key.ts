import { promises as fs } from 'node:fs';
import type { Command } from 'commander';
import { UserError } from '../../errors.js';
import { readManifest, keyPath } from '../../keys/index.js';
import { isInventoryName } from '../../host/index.js';
import { readStickFile } from '../../installer/index.js';
import { MAX_ESCROW_BYTES, findEscrow, openEscrow, readEscrow, type LuksContainer } from '../../recovery/index.js';
import { writeFileAtomic } from '../../util/fsx.js';
import { act } from '../action.js';
import type { Context } from '../context.js';

export interface RecoveryKeyOptions {
  keys: string;
  escrow: string;
  out?: string;
  force?: boolean;
}

/** What `--json` prints; `key` only when it is not written to `--out`. */
export interface RecoveryKeyResult {
  host: string;
  machineId: string;
  luks: LuksContainer[];
  escrow: string;
  key?: string;
}

/**
 * The escrow of `host`: in an installer stick's image or block device (its installer_data
 * partition, read without mounting), else a .cms file or a directory holding one.
 */
async function locate(p: string, host: string): Promise<{ escrow: string; der: Buffer }> {
  const st = await fs.stat(p).catch(() => undefined);
  if (st && (st.isBlockDevice() || (st.isFile() && st.size > MAX_ESCROW_BYTES))) {
    if (!isInventoryName(host)) throw new UserError('LAMA_E_BAD_NAME', `host name '${host}' is not a valid host name`);
    const der = await readStickFile(p, `escrow/${host}.cms`);
    if (!der) throw new UserError('LAMA_E_NOT_FOUND', `${p} is not an installer stick holding an escrow of host ${host} (escrow/${host}.cms on installer_data): was ${host} installed from it?`);
    return { escrow: `${p}:installer_data/escrow/${host}.cms`, der };
  }
  const escrow = await findEscrow(p, host);
  return { escrow, der: await readEscrow(escrow) };
}

/**
 * `lamadist recovery-key HOST --keys DIR --escrow PATH`: open HOST's escrow with the fleet
 * recovery key and print the LUKS recovery passphrase, or write it to `--out` (0600).
 */
export async function recoveryKey(ctx: Context, host: string, o: RecoveryKeyOptions): Promise<RecoveryKeyResult> {
  const m = await readManifest(o.keys);
  if (!m.files.some((f) => f.purpose === 'recovery-key')) {
    throw new UserError('LAMA_E_NO_KEY', `key directory ${o.keys} has no recovery key (issue one with 'lamadist keys recovery ${o.keys}' before installing hosts)`);
  }
  const pair = {
    certPem: await fs.readFile(await keyPath(o.keys, 'recovery-cert'), 'utf8'),
    keyPem: await fs.readFile(await keyPath(o.keys, 'recovery-key'), 'utf8'),
  };
  const { escrow, der } = await locate(o.escrow, host);
  const record = openEscrow(der, pair, escrow);
  if (record.host !== host) throw new UserError('LAMA_E_ESCROW_HOST', `the escrow holds the recovery key of host ${record.host}, not of ${host}`, { where: escrow });
  const base = { host: record.host, machineId: record.machineId, luks: record.luks, escrow };
  if (o.out !== undefined) {
    // No newline: the file is meant for `cryptsetup open --key-file`, which reads it whole.
    await writeFileAtomic(o.out, record.key, { force: o.force ?? false, mode: 0o600 });
    ctx.info(`wrote the recovery key of ${host} to ${o.out}`);
    ctx.result(base, '');
    return base;
  }
  const out = { ...base, key: record.key };
  ctx.result(out, record.key);
  return out;
}

export function configure(cmd: Command): void {
  cmd
    .description("print a host's LUKS recovery passphrase from its escrow (needs the fleet recovery key)")
    .argument('<host>', 'host name from the inventory')
    .requiredOption('--keys <dir>', 'fleet key directory holding the recovery key (`lamadist keys init`)')
    .requiredOption('--escrow <path>', "the installer stick (its image or block device), the host's .cms escrow, or a directory with <host>.cms or escrow/<host>.cms")
    .option('--out <file>', 'write the passphrase (no newline) to FILE, mode 0600, instead of stdout')
    .option('--force', 'replace an existing --out file')
    .addHelpText(
      'after',
      `
Prints the passphrase alone on stdout; with --json, {host, machineId, luks: [{label, uuid}], escrow,
key} (no key when --out is given). The passphrase opens the recovery keyslot of every container
the record lists, e.g.:

  lamadist recovery-key node01 --keys keys --escrow /dev/sdb | cryptsetup open /dev/sda5 var
  lamadist recovery-key node01 --keys keys --escrow node01.cms --out key
  cryptsetup open --key-file key /dev/disk/by-uuid/<LUKS UUID> var`,
    )
    .action(act<RecoveryKeyOptions>(async (ctx, [host], o) => void (await recoveryKey(ctx, host ?? '', o))));
}
