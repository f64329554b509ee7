import { promises as fs } from 'node:fs';
import path from 'node:path';
import { hostArgs, loadInventory } from '../host/index.js';
import { keyPath, readManifest } from '../keys/index.js';
import { bootDevice, type BootableDevice } from './device.js';
import { OVMF } from './constants.js';
import { fixtureInitramfs, fixtureRootfs } from './fixture.js';
import { fixtureRelease, type FixtureRelease } from './ota.js';
import type { QemuResult } from './qemu.js';

/**
 * New machines of a fleet as they arrive: a blank drive, firmware in setup mode (Debian's empty
 * OVMF variable store), a TPM2 nobody has used, and their own SMBIOS system UUID. They become
 * LamaDist hosts only through the product's path: `lamadist provision --installer`, booting the
 * stick, and updates from the server.
 */
export interface FleetMachine extends BootableDevice {
  name: string;
  dir: string;
  smbiosUuid: string;
}

/** A new machine in `dir`: blank sparse drive of `diskBytes`, setup-mode NVRAM, fresh TPM2 state, its NIC's MAC. */
export async function blankMachine(o: { dir: string; name: string; smbiosUuid: string; mac?: string; diskBytes: number }): Promise<FleetMachine> {
  const dir = path.resolve(o.dir, o.name);
  await fs.rm(dir, { recursive: true, force: true });
  await fs.mkdir(dir, { recursive: true });
  const disk = path.join(dir, 'disk.img');
  await fs.writeFile(disk, '');
  await fs.truncate(disk, o.diskBytes);
  const vars = path.join(dir, 'OVMF_VARS.fd');
  await fs.copyFile(OVMF.vars, vars);
  return {
    name: o.name,
    dir,
    smbiosUuid: o.smbiosUuid,
    disk,
    vars,
    tpmState: path.join(dir, 'tpm'),
    qemuArgs: ['-smbios', `type=1,uuid=${o.smbiosUuid}`],
    ...(o.mac && { mac: o.mac }),
  };
}

/** How an installer run ended: installed and powered off, or refused/failed with the installer's line. */
export interface InstallRun extends QemuResult {
  installed: boolean;
  error?: string;
}

/** The console line of a failed installation (the machine then stays on with it). */
const INSTALL_FAILED = /lamadist-install: error: [^\r\n]*|lamadist-init: installer: [^\r\n]*failed[^\r\n]*/;

/**
 * Boot `m` with the installer stick as its second drive and let lamadist-install run: it ends by
 * powering the machine off (QEMU exits) or with its error line on the console (the VM is stopped).
 */
export async function installFromStick(
  m: FleetMachine,
  stick: string,
  o: { timeoutMs: number; serialLog?: string; signal?: AbortSignal; onLine?: (l: string) => void },
): Promise<InstallRun> {
  const r = await bootDevice(
    { ...m, extraDisks: [stick] },
    {
      timeoutMs: o.timeoutMs,
      until: INSTALL_FAILED,
      ...(o.serialLog && { serialLog: o.serialLog }),
      ...(o.signal && { signal: o.signal }),
      ...(o.onLine && { onLine: o.onLine }),
    },
  );
  const error = INSTALL_FAILED.exec(r.serial)?.[0];
  return { ...r, installed: !error && r.exitCode !== null && /lamadist-install: host \S+ installed/.test(r.serial), ...(error && { error }) };
}

/**
 * A release of the fixture for every host of the inventory (each one's identity from hosts.yaml),
 * encrypted to the key directory's device certificates (issued by `provision`) and `recipients`.
 */
export async function fleetRelease(o: {
  dir: string;
  keys: string;
  inventory: string;
  version: string;
  out: string;
  recipients: string[];
  failHealth?: boolean;
  /** See VariantSpec. */
  payload?: string;
  /** Another build of the initramfs (fixtureInitramfs). */
  initramfsBuild?: string;
  log?: (m: string) => void;
}): Promise<FixtureRelease> {
  const inv = await loadInventory(o.inventory);
  const fixture = await fixtureRootfs({ keyring: await keyPath(o.keys, 'rauc-ca-cert'), ...(o.log && { log: o.log }) });
  const initrd = await fixtureInitramfs(fixture.kernel, path.join(o.dir, `initrd-${o.version}.gz`), o.initramfsBuild);
  // Encrypted to every device of the key directory, as a fleet's releases are: a host a release
  // leaves out can still open it, and its install check is what refuses it.
  const devices = (await readManifest(o.keys)).files.filter((f) => f.purpose === 'device-cert' && f.device).map((f) => f.device as string);
  const deviceCerts = await Promise.all(devices.map((d) => keyPath(o.keys, 'device-cert', d)));
  return fixtureRelease({
    keys: o.keys,
    kernel: fixture.kernel,
    initrd,
    hosts: inv.hosts.map((h) => ({ name: h.name, machineId: h.machineId, args: hostArgs(h) })),
    recipients: [...new Set([...deviceCerts, ...o.recipients].map((f) => path.resolve(f)))],
    version: o.version,
    ...(o.failHealth && { failHealth: true }),
    ...(o.payload !== undefined && { payload: o.payload }),
    out: o.out,
    ...(o.log && { log: o.log }),
  });
}
