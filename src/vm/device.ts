import { randomBytes } from 'node:crypto';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { buildImage, type ImagePlan } from '../image/index.js';
import { initKeys, keyPath } from '../keys/index.js';
import { makeOvmfVars } from '../secureboot/index.js';
import { fixtureInitramfs, fixtureRootfs } from './fixture.js';
import type { DebianKernel } from './kernel.js';
import { OVMF, SERIAL_CONSOLE } from './constants.js';
import { runQemu, type QemuResult } from './qemu.js';

/** An emulated LamaDist device: its disk, firmware variables, TPM and identity. */
export interface Device {
  dir: string;
  keys: string;
  disk: string;
  /** OVMF variable store with our PK/KEK/db enrolled (Secure Boot enforcing). */
  vars: string;
  /** swtpm state: the device's TPM2, kept between boots. */
  tpmState: string;
  kernel: DebianKernel;
  initrd: string;
  hostname: string;
  machineId: string;
  /** LUKS2 recovery key file (0600) written by buildImage. */
  recoveryKey: string;
  plan: ImagePlan;
  encrypt: boolean;
}

/**
 * Partition sizes (MiB) that fit the fixture with room for updates, small enough for tests. /var
 * stays above 512 MiB so mke2fs picks 4096-byte blocks, which the 4096-byte-sector LUKS2 device needs.
 */
export const DEVICE_SIZES: Record<string, number> = { esp: 300, rootfs_a: 640, verity_a: 16, rootfs_b: 640, verity_b: 16, var: 600 };

/**
 * Everything a LamaDist device needs, built into `dir`: fleet keys (`lamadist keys init`), the
 * fixture rootfs with the RAUC keyring, the fixture initramfs (meta-lamadist's lamadist-init), the
 * A/B disk with signed per-host UKIs (LUKS2 unless `encrypt: false`), and the enrolled variable
 * store. Reuses keys already in `dir`.
 */
export async function prepareDevice(opts: {
  dir: string;
  hostname?: string;
  machineId?: string;
  encrypt?: boolean;
  extraCmdline?: string;
  log?: (m: string) => void;
}): Promise<Device> {
  const log = opts.log ?? (() => undefined);
  const dir = path.resolve(opts.dir);
  await fs.mkdir(dir, { recursive: true });
  const keys = path.join(dir, 'keys');
  if (!(await fs.access(path.join(keys, 'manifest.json')).then(() => true, () => false))) {
    log('fleet keys');
    await initKeys(keys);
  }
  log('fixture root file system');
  const fixture = await fixtureRootfs({ keyring: await keyPath(keys, 'rauc-ca-cert'), log });
  log('initramfs with lamadist-init');
  const initrd = await fixtureInitramfs(fixture.kernel, path.join(dir, 'initrd.gz'));
  const hostname = opts.hostname ?? 'lamadist-vm';
  const machineId = opts.machineId ?? randomBytes(16).toString('hex');
  const encrypt = opts.encrypt ?? true;
  const disk = path.join(dir, encrypt ? 'disk.img' : 'disk-plain.img');
  const recoveryKey = `${disk}.recovery-key`;
  log('A/B disk image');
  const cmdline = [`systemd.hostname=${hostname}`, `systemd.machine_id=${machineId}`, ...(encrypt ? [] : ['lamadist.unsealed=1']), opts.extraCmdline ?? '']
    .filter(Boolean)
    .join(' ');
  const plan = await buildImage({
    out: disk,
    bsp: 'x86_64',
    rootfs: fixture.dir,
    kernel: fixture.kernel.vmlinuz,
    initrd: [initrd],
    keys,
    cmdline,
    sizes: DEVICE_SIZES,
    encrypt,
    force: true,
  });
  const vars = path.join(dir, 'OVMF_VARS.enrolled.fd');
  await makeOvmfVars({
    template: OVMF.vars,
    out: vars,
    pk: await keyPath(keys, 'secureboot-pk-cert'),
    kek: await keyPath(keys, 'secureboot-kek-cert'),
    db: await keyPath(keys, 'secureboot-db-cert'),
    force: true,
  });
  const tpmState = path.join(dir, 'tpm');
  await fs.rm(tpmState, { recursive: true, force: true });
  return { dir, keys, disk, vars, tpmState, kernel: fixture.kernel, initrd, hostname, machineId, recoveryKey, plan, encrypt };
}

/** The key=value facts of the last LAMADIST-REPORT block on the serial console. */
export function parseReport(serial: string): Record<string, string> | undefined {
  const end = serial.lastIndexOf('LAMADIST-REPORT-END');
  const begin = serial.lastIndexOf('LAMADIST-REPORT-BEGIN', end);
  if (end < 0 || begin < 0) return undefined;
  const out: Record<string, string> = {};
  for (const line of serial.slice(begin, end).split(/\r?\n/)) {
    const m = /LAMADIST-REPORT ([a-z_]+)=(.*)$/.exec(line.trimEnd());
    if (m?.[1]) out[m[1]] = (m[2] ?? '').trim();
  }
  return out;
}

/** How a device boots: the full chain (OVMF Secure Boot + swtpm) or the kernel directly. */
export type BootMode = 'secure' | 'direct';

/**
 * Boot the device until the fixture has reported its state (after the health check ran). In
 * `secure` mode OVMF with our keys enrolled boots the signed UKI from the ESP and swtpm is the
 * TPM2; in `direct` mode QEMU loads the kernel and initramfs itself with slot A's command line.
 */
export async function bootDevice(
  dev: Device,
  opts: { mode?: BootMode; timeoutMs?: number; serialLog?: string; onLine?: (l: string) => void; signal?: AbortSignal; until?: RegExp } = {},
): Promise<QemuResult & { report: Record<string, string> | undefined }> {
  const mode = opts.mode ?? 'secure';
  const slotA = dev.plan.slots.find((s) => s.slot === 'a');
  const base = {
    disks: [{ path: dev.disk }],
    memMiB: 1024,
    timeoutMs: opts.timeoutMs ?? 600_000,
    until: opts.until ?? /LAMADIST-REPORT-END/,
    ...(opts.serialLog ? { serialLog: opts.serialLog } : {}),
    ...(opts.onLine ? { onLine: opts.onLine } : {}),
    ...(opts.signal ? { signal: opts.signal } : {}),
  };
  const r =
    mode === 'secure'
      ? await runQemu({ ...base, firmware: { code: OVMF.secbootCode, vars: dev.vars }, tpm: { stateDir: dev.tpmState } })
      : await runQemu({
          ...base,
          kernel: dev.kernel.vmlinuz,
          initrd: dev.initrd,
          append: slotA?.uki?.cmdline ?? `${SERIAL_CONSOLE}`,
        });
  return { ...r, report: parseReport(r.serial) };
}
