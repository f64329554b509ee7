import { promises as fs } from 'node:fs';
import path from 'node:path';
import { UserError } from '../errors.js';
import { addHost, hostArgs, loadInventory } from '../host/index.js';
import { initKeys, keyPath, readManifest } from '../keys/index.js';
import { provisionHosts } from '../provision/index.js';
import { bootDevice, type BootableDevice } from './device.js';
import { OVMF } from './constants.js';
import { FIXTURE_KERNEL_ARGS, fixtureInitramfs, fixtureRootfs } from './fixture.js';
import { fixtureRelease, startFleetServer, type FixtureRelease } from './ota.js';
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

/**
 * The console line of a failed installation (the machine then stays on with it), up to its end:
 * the VM is stopped on this match, and a line cut where the serial output happened to pause would
 * lose the reason.
 */
const INSTALL_FAILED = /(lamadist-install: error: [^\r\n]*|lamadist-init: installer: [^\r\n]*failed[^\r\n]*)\r?\n/;

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
  const error = INSTALL_FAILED.exec(r.serial)?.[1];
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

/** Partition sizes (MiB) of an installed fleet machine: the fixture with room for updates. */
export const FLEET_SIZES = { esp: 300, rootfs_a: 640, verity_a: 16, rootfs_b: 640, verity_b: 16, var: 600 };

/** One emulated machine installed the operator's way, as `oneHostFleet` builds it step by step. */
export interface OneHostFleet {
  keys: string;
  inventory: string;
  stick: string;
  /** Set by the first step. */
  server?: Awaited<ReturnType<typeof startFleetServer>>;
  /** Set by the second step: the host's machine-id from the inventory. */
  machineId?: string;
  release1?: FixtureRelease;
  /** Set by the third step: the installed machine, powered off. */
  machine?: FleetMachine;
  /** A fixture release for the inventory, encrypted for the device and the update server. */
  release(o: { version: string; payload?: string; initramfsBuild?: string }): Promise<FixtureRelease>;
}

/**
 * The operator's path for one new machine, as three steps the caller runs in order (`vm demo`
 * shows each as it goes): fleet keys, the host by SMBIOS UUID and the update server; release 1 and
 * `provision --installer`, registering the host with `tag`; a blank machine (firmware in setup
 * mode, fresh TPM2) installed from the stick. Nothing here is test-only: every step is a product
 * capability an operator runs.
 */
export function oneHostFleet(o: {
  dir: string;
  host: { name: string; smbiosUuid: string };
  tag: string;
  /** Release 1's 1 MiB payload file (VariantSpec), if it has one. */
  payload?: string;
  timeoutMs: number;
  log: (m: string) => void;
}): { fleet: OneHostFleet; steps: (() => Promise<void>)[] } {
  const fleet: OneHostFleet = {
    keys: path.join(o.dir, 'keys'),
    inventory: path.join(o.dir, 'hosts.yaml'),
    stick: path.join(o.dir, 'installer.img'),
    release: (r) => {
      if (!fleet.server) throw new Error('the update server is not started');
      return fleetRelease({ dir: o.dir, keys: fleet.keys, inventory: fleet.inventory, ...r, out: path.join(o.dir, `release-${r.version}.raucb`), recipients: [fleet.server.serverCert], log: o.log });
    },
  };
  const steps = [
    async (): Promise<void> => {
      await initKeys(fleet.keys);
      await addHost(fleet.inventory, { name: o.host.name, ip: 'dhcp', smbiosUuid: o.host.smbiosUuid, kernelArgs: FIXTURE_KERNEL_ARGS });
      fleet.server = await startFleetServer(o.dir, fleet.keys, 5, o.log);
    },
    async (): Promise<void> => {
      const server = fleet.server as NonNullable<OneHostFleet['server']>;
      fleet.release1 = await fleet.release({ version: '1', ...(o.payload !== undefined && { payload: o.payload }) });
      const [host] = await provisionHosts({
        release: fleet.release1.bundle,
        keys: fleet.keys,
        hosts: (await loadInventory(fleet.inventory)).hosts,
        out: path.join(o.dir, 'provision'),
        fleet: server.fleet,
        tags: [o.tag],
        deviceServer: `10.0.2.2:${server.server.port}`,
        installer: fleet.stick,
        sizes: FLEET_SIZES,
        log: o.log,
      });
      fleet.machineId = host?.machineId;
    },
    async (): Promise<void> => {
      fleet.machine = await blankMachine({ dir: o.dir, name: o.host.name, smbiosUuid: o.host.smbiosUuid, diskBytes: 3 * 1024 ** 3 });
      const log = path.join(o.dir, 'install.log');
      const r = await installFromStick(fleet.machine, fleet.stick, { timeoutMs: o.timeoutMs, serialLog: log, onLine: o.log });
      if (!r.installed) throw new UserError('LAMA_E_VM_INSTALL', `the installer did not install ${o.host.name}${r.error ? `: ${r.error}` : ''}; see ${log}`);
    },
  ];
  return { fleet, steps };
}
