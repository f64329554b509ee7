/**
 * Provisioning: from the inventory, the fleet keys and a release bundle to what one host needs to
 * join the fleet. Per host it issues the device's bundle key pair (if missing), registers the
 * device on the update server (or leaves that to a gateway token), writes the update client's
 * configuration, signs the host's UKIs for both slots from the release's templates, and can build
 * the sealed A/B disk to write to the host's drive.
 *
 * The release is a release bundle (`bundle create --hosts`, or meta-lamadist's lamadist-bundle),
 * not a build's deploy directory: the bundle is what the update server serves, it is signed and
 * verified before anything in it is used, it exists for both build paths, and a disk made from it
 * holds exactly the root image the fleet runs, so the host's first update is adaptive from it.
 *
 * Public API:
 * - `hawkbitConf(ddi)`, `provisioningFiles(key, cert, ddi?)` (pure): the update client's
 *   configuration and the ESP files the initramfs moves into /var at first boot
 * - `registerHost(fleet, { controllerId, bsp, tags })` → the device's TargetToken (new or rotated)
 * - `provisionHost(release, host, opts)` → what was issued and written for one host, and its ESP files
 * - `provisionHosts(opts)` → the whole operator step (`lamadist provision`, `lamadist vm demo`):
 *   open and verify the release, upload it to the update server (found if stored: the server
 *   attests devices against the release they run), provision each host, then build the
 *   installer stick for them all
 */
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { UserError } from '../errors.js';
import type { FleetClient } from '../fleet/index.js';
import { hostArgs, type Host } from '../host/index.js';
import { buildImage, slotCmdline, type ImagePlan } from '../image/index.js';
import { ensureDeviceKey, keyPath, signingPair } from '../keys/index.js';
import { buildInstaller, checkInstallable, type InstallerHost } from '../installer/index.js';
import { openRelease, releaseUki, type OpenRelease } from '../release/index.js';
import { signPe, verifyPe } from '../secureboot/index.js';
import { inspectUki, setUkiCmdline } from '../uki/index.js';
import { writeFileAtomic } from '../util/fsx.js';

/** ESP directory whose tree lamadist-init moves into /var at first boot (then wipes it from the ESP). */
export const PROVISION_VAR_DIR = '/lamadist/var';

/** Where the update client (rauc-hawkbit-updater, or the fixture's stand-in) reaches the server. */
export interface DdiProvisioning {
  /** `host:port` as the device sees it. */
  server: string;
  /** Whether the device talks HTTPS to the server. */
  ssl?: boolean;
  tenant: string;
  controllerId: string;
  /** The device's TargetToken, or the tenant's GatewayToken when the device registers itself. */
  token: string;
  tokenKind?: 'target' | 'gateway';
}

/** rauc-hawkbit-updater's configuration file for a device (the fixture's DDI client reads the same keys). Pure. */
export function hawkbitConf(d: DdiProvisioning): string {
  return [
    '[client]',
    `hawkbit_server = ${d.server}`,
    `ssl = ${d.ssl ? 'true' : 'false'}`,
    `tenant_id = ${d.tenant}`,
    `target_name = ${d.controllerId}`,
    d.tokenKind === 'gateway' ? `gateway_token = ${d.token}` : `auth_token = ${d.token}`,
    'stream_bundle = true',
    'bundle_download_location = /var/tmp/lamadist-ddi/bundle.raucb',
    '',
  ].join('\n');
}

/**
 * The per-host files a device gets on its ESP under PROVISION_VAR_DIR: its bundle decryption key
 * pair where system.conf's [encryption] expects it, and the update client's configuration. Pure.
 */
export function provisioningFiles(keyPem: Buffer, certPem: Buffer, ddi?: DdiProvisioning): Record<string, Buffer> {
  const files: Record<string, Buffer> = {
    [`${PROVISION_VAR_DIR}/lib/rauc/encryption/device.key.pem`]: keyPem,
    [`${PROVISION_VAR_DIR}/lib/rauc/encryption/device.cert.pem`]: certPem,
  };
  if (ddi) files[`${PROVISION_VAR_DIR}/lib/lamadist/hawkbit.conf`] = Buffer.from(hawkbitConf(ddi));
  return files;
}

/**
 * Register a device on the update server and return its TargetToken: a new device is created
 * (with its BSP and tags), a known one gets a fresh token (the old one stops working) and the tags.
 */
export async function registerHost(fleet: FleetClient, d: { controllerId: string; bsp: string; tags: string[] }): Promise<string> {
  if ((await fleet.listDevices()).some((x) => x.controllerId === d.controllerId)) {
    const token = await fleet.rotateDeviceToken(d.controllerId);
    if (d.tags.length > 0) await fleet.updateDevice(d.controllerId, { addTags: d.tags });
    return token;
  }
  return (await fleet.registerDevice({ controllerId: d.controllerId, bsp: d.bsp, ...(d.tags.length > 0 && { tags: d.tags }) })).token;
}

/** How one host is provisioned. */
export interface ProvisionHostOptions {
  keys: string;
  /** Per-host output directory: configuration, token, UKIs. */
  outDir: string;
  /** Register on this server (admin API) and give the device a TargetToken... */
  fleet?: FleetClient;
  /** Tags the device is registered with (rollouts target them). */
  tags?: string[];
  /** ...or write a GatewayToken into its configuration: the device registers itself at first contact. */
  gatewayToken?: string;
  /** The server as the device reaches it: `host:port`, and whether over HTTPS. */
  deviceServer: string;
  ssl?: boolean;
  tenant?: string;
  /** Build the sealed A/B disk here. */
  disk?: string;
  /** Partition sizes (MiB) by label, replacing the layout's. */
  sizes?: Record<string, number>;
  force?: boolean;
  log?: (m: string) => void;
}

/** What was issued and written for one host. */
export interface ProvisionedHost {
  host: string;
  machineId: string;
  bsp: string;
  /** The release carries this host's boot files (a release without it is refused on the host). */
  inRelease: boolean;
  /** The release carries the host with another command line than the inventory's now (its next release must be made). */
  staleInRelease: boolean;
  registered: 'target-token' | 'gateway-token';
  /** The update server's id of the release (uploaded, or found already stored, when registering there). */
  releaseId?: number;
  deviceKeyIssued: boolean;
  outputs: {
    config: string;
    token?: string;
    ukis: Record<'a' | 'b', string>;
    disk?: string;
    recoveryKey?: string;
    /** The installer stick that installs this host, and where on it the host leaves its recovery key escrow. */
    installer?: string;
    recoveryEscrow?: string;
  };
  luks?: { label: string; uuid: string }[];
  cmdline: Record<'a' | 'b', string>;
}

/** What makes a host unprovisionable from `release` before anything is issued or registered. */
function checkProvisionable(release: OpenRelease, host: Host, o: Pick<ProvisionHostOptions, 'fleet' | 'gatewayToken'>): void {
  if (host.bsp && host.bsp !== release.bsp.name) {
    throw new UserError('LAMA_E_PROVISION_BSP', `host ${host.name} is a ${host.bsp} host; the release is for ${release.bsp.name}`);
  }
  if (!o.fleet && !o.gatewayToken) throw new UserError('LAMA_E_USAGE', 'provisioning needs an update server to register on, or a gateway token (--offline --gateway-token-file)');
}

/**
 * Provision one inventory host from an opened release: the report (safe to print) and the files
 * its ESP hands to /var at first boot (secrets: they go onto a disk or an installer stick only).
 */
export async function provisionHost(
  release: OpenRelease,
  host: Host,
  o: ProvisionHostOptions,
): Promise<{ report: ProvisionedHost; espFiles: Record<string, Buffer> }> {
  const log = o.log ?? ((): void => undefined);
  checkProvisionable(release, host, o);
  const db = await signingPair(o.keys, 'secureboot-db');
  const deviceKeyIssued = await ensureDeviceKey(o.keys, host.name);
  if (deviceKeyIssued) log(`${host.name}: device key issued`);
  const keyPem = await fs.readFile(await keyPath(o.keys, 'device-key', host.name));
  const certPem = await fs.readFile(await keyPath(o.keys, 'device-cert', host.name));

  let token: string;
  let registered: ProvisionedHost['registered'];
  if (o.fleet) {
    log(`${host.name}: registering on the update server`);
    token = await registerHost(o.fleet, { controllerId: host.name, bsp: release.bsp.name, tags: o.tags ?? [] });
    registered = 'target-token';
  } else {
    token = o.gatewayToken as string;
    registered = 'gateway-token';
  }
  const ddi: DdiProvisioning = {
    server: o.deviceServer,
    ssl: o.ssl ?? false,
    tenant: o.tenant ?? 'DEFAULT',
    controllerId: host.name,
    token,
    tokenKind: registered === 'target-token' ? 'target' : 'gateway',
  };
  await fs.mkdir(o.outDir, { recursive: true });
  const force = o.force ?? false;
  const config = path.join(o.outDir, 'hawkbit.conf');
  await writeFileAtomic(config, hawkbitConf(ddi), { mode: 0o600, force });
  let tokenFile: string | undefined;
  if (registered === 'target-token') {
    tokenFile = path.join(o.outDir, 'target.token');
    await writeFileAtomic(tokenFile, `${token}\n`, { mode: 0o600, force });
  }

  // The host's UKIs: the release's own when it carries the host with its current inventory line
  // (byte-identical to what its updates install), else the template with that line, signed now.
  log(`${host.name}: signed UKIs`);
  const cmdline = {} as Record<'a' | 'b', string>;
  const ukis = {} as Record<'a' | 'b', string>;
  const inRelease = release.hosts.has(host.machineId);
  let stale = false;
  for (const slot of ['a', 'b'] as const) {
    cmdline[slot] = slotCmdline(release.rootHash, slot, release.bsp, hostArgs(host).join(' '));
    const shipped = inRelease ? await releaseUki(release, host.machineId, slot) : undefined;
    if (shipped && inspectUki(shipped).cmdline !== cmdline[slot]) stale = true;
    const pe = shipped && !stale ? shipped : signPe(setUkiCmdline(release.templates[slot], cmdline[slot], `lamadist-${slot}.efi`), db);
    verifyPe(pe, db.certPem, `${host.name} slot ${slot}`);
    ukis[slot] = path.join(o.outDir, `lamadist-${slot}.efi`);
    await writeFileAtomic(ukis[slot], pe, { force });
  }

  const espFiles = provisioningFiles(keyPem, certPem, ddi);
  let plan: ImagePlan | undefined;
  if (o.disk) {
    log(`${host.name}: sealed A/B disk ${o.disk}`);
    plan = await buildImage({
      out: o.disk,
      bsp: release.bsp.name,
      rootfs: release.rootfs,
      verity: { file: release.verity, rootHash: release.rootHash },
      uki: ukis.a,
      ukiB: ukis.b,
      encrypt: true,
      espFiles,
      ...(o.sizes && { sizes: o.sizes }),
      force,
    });
  }
  const report: ProvisionedHost = {
    host: host.name,
    machineId: host.machineId,
    bsp: release.bsp.name,
    inRelease,
    staleInRelease: stale,
    registered,
    deviceKeyIssued,
    outputs: {
      config,
      ...(tokenFile && { token: tokenFile }),
      ukis,
      ...(o.disk && { disk: o.disk, recoveryKey: plan?.keys?.recoveryKeyFile ?? `${o.disk}.recovery-key` }),
    },
    ...(plan && { luks: plan.partitions.filter((p) => p.luksUuid).map((p) => ({ label: p.label, uuid: p.luksUuid as string })) }),
    cmdline,
  };
  return { report, espFiles };
}

/** `lamadist provision`: a release, hosts of the inventory, and where their outputs go. */
export interface ProvisionHostsOptions extends Omit<ProvisionHostOptions, 'outDir' | 'disk' | 'log'> {
  release: string;
  bundleKey?: string;
  hosts: Host[];
  /** Per-host outputs go to `<out>/<host>/`. */
  out: string;
  /** Sealed disk per host; `{host}` is replaced by its name. */
  disk?: string;
  /** One installer stick for all the hosts. */
  installer?: string;
  log?: (m: string) => void;
  warn?: (m: string) => void;
}

/** Provision `hosts` from a release bundle: verify and open it, provision each host, build the stick. */
export async function provisionHosts(o: ProvisionHostsOptions): Promise<ProvisionedHost[]> {
  const log = o.log ?? ((): void => undefined);
  const warn = o.warn ?? log;
  if (o.hosts.length === 0) throw new UserError('LAMA_E_USAGE', 'name at least one host of the inventory');
  if (o.disk && o.hosts.length > 1 && !o.disk.includes('{host}'))
    throw new UserError('LAMA_E_USAGE', '--disk names one file: with several hosts, put {host} in it');
  log(`release ${o.release}: verifying and unpacking`);
  const release = await openRelease(o.release, { keys: o.keys, ...(o.bundleKey && { bundleKey: o.bundleKey }) });
  const done: ProvisionedHost[] = [];
  const staged: InstallerHost[] = [];
  try {
    if (o.installer) checkInstallable(release.bsp, o.hosts);
    for (const host of o.hosts) checkProvisionable(release, host, o);
    // The server must hold the release its new devices run: it predicts their PCR 11 from it
    // (attestation) and shows what they run. Before any registration, so a refusal changes nothing.
    let releaseId: number | undefined;
    if (o.fleet) {
      log(`release ${release.version}: uploading to the update server`);
      releaseId = (await o.fleet.uploadRelease(o.release)).release.id;
    }
    for (const host of o.hosts) {
      const { report: r, espFiles } = await provisionHost(release, host, {
        ...o,
        outDir: path.join(o.out, host.name),
        ...(o.disk && { disk: o.disk.replaceAll('{host}', host.name) }),
        log,
      });
      if (r.staleInRelease) warn(`${host.name}'s inventory entry changed since release ${release.version}: its UKIs are signed with the new line, and the next release must carry it`);
      if (releaseId !== undefined) r.releaseId = releaseId;
      if (!r.inRelease) warn(`${host.name} is not in release ${release.version}: its disk boots it, but devices refuse a release without them, so include it in the next one`);
      done.push(r);
      staged.push({ host, ukis: r.outputs.ukis, espFiles });
    }
    if (o.installer) {
      log(`installer ${o.installer}`);
      const stick = await buildInstaller({ out: o.installer, release, keys: o.keys, hosts: staged, ...(o.sizes && { sizes: o.sizes }), force: o.force ?? false, log });
      for (const r of done) {
        r.outputs.installer = stick.out;
        r.outputs.recoveryEscrow = `${stick.out}:installer_data/escrow/${r.host}.cms`;
        const h = stick.hosts.find((x) => x.host === r.host);
        if (h) r.luks = h.luks;
      }
    }
  } finally {
    await release.close();
  }
  return done;
}
