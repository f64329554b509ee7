import { randomBytes } from 'node:crypto';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { UserError } from '../errors.js';
import { buildImage, type ImagePlan } from '../image/index.js';
import { ensureDeviceKey, ensureImaKey, initKeys, keyPath } from '../keys/index.js';
import { provisioningFiles, type DdiProvisioning } from '../provision/index.js';
import { makeOvmfVars } from '../secureboot/index.js';
import { FIXTURE_KERNEL_ARGS, fixtureInitramfs, fixtureRootfs } from './fixture.js';
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
  /** Per-host kernel arguments of its UKIs after the slot's own (identity, test switches). */
  cmdline: string;
  /** Name of its bundle encryption key pair in the key directory (`lamadist keys device NAME`). */
  deviceKeyName: string;
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
  /** Update server the device polls (its configuration is provisioned with the device key). */
  ddi?: DdiProvisioning;
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
  // The fixture's IMA policy runs only signed code: its images are signed with the fleet's key.
  if (await ensureImaKey(keys)) log('IMA key issued');
  log('fixture root file system');
  const fixture = await fixtureRootfs({ keyring: await keyPath(keys, 'rauc-ca-cert'), log });
  log('initramfs with lamadist-init');
  const initrd = await fixtureInitramfs(fixture.kernel, path.join(dir, 'initrd.gz'));
  const hostname = opts.hostname ?? 'lamadist-vm';
  const machineId = opts.machineId ?? randomBytes(16).toString('hex');
  const encrypt = opts.encrypt ?? true;
  const disk = path.join(dir, encrypt ? 'disk.img' : 'disk-plain.img');
  const recoveryKey = `${disk}.recovery-key`;
  // The device's own key pair for crypt bundles, issued once per host like `lamadist keys device`.
  const deviceKeyName = hostname;
  if (await ensureDeviceKey(keys, deviceKeyName)) log(`device key ${deviceKeyName} issued`);
  const espFiles = provisioningFiles(
    await fs.readFile(await keyPath(keys, 'device-key', deviceKeyName)),
    await fs.readFile(await keyPath(keys, 'device-cert', deviceKeyName)),
    opts.ddi,
  );
  log('A/B disk image');
  const cmdline = [`systemd.hostname=${hostname}`, `systemd.machine_id=${machineId}`, ...FIXTURE_KERNEL_ARGS, ...(encrypt ? [] : ['lamadist.unsealed=1']), opts.extraCmdline ?? '']
    .filter(Boolean)
    .join(' ');
  const plan = await buildImage({
    out: disk,
    bsp: 'x86_64',
    rootfs: fixture.dir,
    kernel: fixture.kernel.vmlinuz,
    initrd: [initrd],
    keys,
    imaKey: keys,
    cmdline,
    sizes: DEVICE_SIZES,
    encrypt,
    espFiles,
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
  return { dir, keys, disk, vars, tpmState, kernel: fixture.kernel, initrd, hostname, machineId, recoveryKey, plan, encrypt, cmdline, deviceKeyName };
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

/**
 * What booting a device takes: its drive, NVRAM and TPM, and for a direct boot its kernel, initramfs
 * and slot A's command line. A `Device` is one; a fleet machine installed from a stick is another.
 */
export interface BootableDevice {
  disk: string;
  vars: string;
  tpmState: string;
  /** Further drives after the boot drive (an installer stick). */
  extraDisks?: string[];
  /** Further QEMU arguments (the machine's SMBIOS identity). */
  qemuArgs?: string[];
  /** MAC address of its NIC. */
  mac?: string;
  kernel?: DebianKernel;
  initrd?: string;
  plan?: ImagePlan;
}

/** How a device boots: the full chain (OVMF Secure Boot + swtpm) or the kernel directly. */
export type BootMode = 'secure' | 'direct';

/** Console silence after which a device boot is given up (the VM's CPUs are recorded first). */
export const DEVICE_STALL_MS = 300_000;
/**
 * Time from the guest's restart to the firmware's first output before the harness power-cycles it.
 * OVMF prints within seconds of a reset even under TCG; in CI a device was seen printing nothing at
 * all for 25 minutes after its restart line, and a board's watchdog would end such a hang the same way.
 */
export const FIRMWARE_RESET_WATCHDOG_MS = 120_000;

/**
 * Boot the device until the fixture has reported its state (or `until` matched; the guest may
 * reboot itself meanwhile, QEMU keeps running across reboots). In
 * `secure` mode OVMF with our keys enrolled boots the signed UKI from the ESP and swtpm is the
 * TPM2; in `direct` mode QEMU loads the kernel and initramfs itself with slot A's command line.
 */
export async function bootDevice(
  dev: BootableDevice,
  opts: {
    mode?: BootMode;
    timeoutMs?: number;
    serialLog?: string;
    onLine?: (l: string) => void;
    signal?: AbortSignal;
    until?: RegExp | ((serial: string) => boolean);
    /** Console silence that ends the boot as stalled (default DEVICE_STALL_MS; 0: none). */
    stallMs?: number;
    /** What an operator types at the serial console. */
    input?: NodeJS.ReadableStream;
  } = {},
): Promise<QemuResult & { report: Record<string, string> | undefined }> {
  const mode = opts.mode ?? 'secure';
  const slotA = dev.plan?.slots.find((s) => s.slot === 'a');
  const base = {
    disks: [dev.disk, ...(dev.extraDisks ?? [])].map((p) => ({ path: p })),
    ...(dev.qemuArgs && { extraArgs: dev.qemuArgs }),
    ...(dev.mac && { mac: dev.mac }),
    memMiB: 1024,
    timeoutMs: opts.timeoutMs ?? 600_000,
    until: opts.until ?? /LAMADIST-REPORT-END/,
    // A device run spans several boots: a hung guest should fail in minutes, not at the overall timeout.
    stallMs: opts.stallMs ?? DEVICE_STALL_MS,
    resetWatchdogMs: FIRMWARE_RESET_WATCHDOG_MS,
    ...(opts.serialLog ? { serialLog: opts.serialLog } : {}),
    ...(opts.onLine ? { onLine: opts.onLine } : {}),
    ...(opts.signal ? { signal: opts.signal } : {}),
    ...(opts.input ? { input: opts.input } : {}),
  };
  const r =
    mode === 'secure'
      ? // The variable store is the device's NVRAM: boot entries, BootOrder and BootNext persist like the TPM.
        await runQemu({ ...base, firmware: { code: OVMF.secbootCode, vars: dev.vars, persistVars: true }, tpm: { stateDir: dev.tpmState } })
      : await runQemu({
          ...base,
          kernel: direct(dev.kernel).vmlinuz,
          initrd: direct(dev.initrd),
          append: slotA?.uki?.cmdline ?? `${SERIAL_CONSOLE}`,
        });
  return { ...r, report: parseReport(r.serial) };
}

function direct<T>(v: T | undefined): T {
  if (v === undefined) throw new UserError('LAMA_E_VM_INPUT', 'a direct boot needs the device\'s kernel and initramfs');
  return v;
}

/** What the fixture reports after the health check: result, version, RAUC's view of the slots, UEFI entries. */
export interface SlotsReport {
  health: string;
  version: string;
  /** Booted bootname (A or B) from rauc.slot=. */
  booted: string;
  /** RAUC state and boot status of each rootfs slot by bootname. */
  state: Record<string, { state: string; boot: string }>;
  /** efibootmgr's output lines. */
  efi: string[];
  var_marker: string;
  /** Every key=value fact of the block (identity, addresses, Secure Boot state). */
  facts: Record<string, string>;
}

/** The first LAMADIST-SLOTS block in `serial` (pass a slice to pick a later boot). */
export function parseSlots(serial: string): SlotsReport | undefined {
  const begin = serial.indexOf('LAMADIST-SLOTS-BEGIN');
  const end = serial.indexOf('LAMADIST-SLOTS-END', begin);
  if (begin < 0 || end < 0) return undefined;
  const kv: Record<string, string> = {};
  const efi: string[] = [];
  for (const line of serial.slice(begin, end).split(/\r?\n/)) {
    const m = /LAMADIST-SLOTS (efi (.*)|([A-Za-z_0-9]+)=(.*))$/.exec(line.trimEnd());
    if (m?.[2] !== undefined) efi.push(m[2]);
    else if (m?.[3]) kv[m[3]] = (m[4] ?? '').replace(/^'(.*)'$/, '$1');
  }
  const state: SlotsReport['state'] = {};
  for (const [k, v] of Object.entries(kv)) {
    const n = /^SLOT_CLASS_(\d+)$/.exec(k)?.[1];
    const name = n && v === 'rootfs' ? kv[`SLOT_BOOTNAME_${n}`] : undefined;
    if (n && name) state[name] = { state: kv[`SLOT_STATE_${n}`] ?? '', boot: kv[`SLOT_BOOT_STATUS_${n}`] ?? '' };
  }
  return { health: kv.health ?? '', version: kv.version ?? '', booted: kv.booted ?? '', state, efi, var_marker: kv.var_marker ?? '', facts: kv };
}
