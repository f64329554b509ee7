import { createHash, randomUUID } from 'node:crypto';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { getBsp } from '../bsp/index.js';
import { UserError } from '../errors.js';
import { FleetClient } from '../fleet/index.js';
import { ensureDeviceKey, ensureImaKey, initKeys, keyPath, signingPair } from '../keys/index.js';
import { loadImaSigner } from '../ima/index.js';
import { buildRootErofs } from '../image/index.js';
import { registerHost } from '../provision/index.js';
import { LUKS2_DATA_OFFSET } from '../luks/index.js';
import type { CreatedBundle } from '../rauc/index.js';
import { createRelease, type ReleaseHost } from '../release/index.js';
import { startServer, type RunningServer } from '../server/index.js';
import { makeTempDir } from '../util/fsx.js';
import { run } from '../util/proc.js';
import { formatVerity, productSalt } from '../verity/index.js';
import { bootDevice, prepareDevice, type BootableDevice, type Device } from './device.js';
import { cachedTree, fixtureRootfs, pruneTrees, seededBytes } from './fixture.js';
import { cacheRoot } from './kernel.js';
import type { DebianKernel } from './kernel.js';
import type { QemuResult } from './qemu.js';

/** The health.d check a failing release carries (acceptance 3: its trial boot must fall back). */
export const FAILING_HEALTH_CHECK = '/etc/lamadist/health.d/50-fixture-fails';


/** Where a variant with a `payload` carries it: a package-sized file an update may change. */
export const PAYLOAD_FILE = '/usr/share/lamadist-fixture/payload.bin';
const PAYLOAD_BYTES = 1 << 20;

/**
 * What a fixture release changes in the root tree: its version, optionally a failing health check,
 * and optionally a 1 MiB file whose bytes follow from `payload` (a package another release updates).
 */
export interface VariantSpec {
  version: string;
  failHealth?: boolean;
  payload?: string;
}

/** The files a variant replaces or adds, by path in the tree, from the base tree's os-release. Pure. */
export function planVariant(osRelease: string, spec: VariantSpec): Record<string, { data: string | Buffer; mode: number }> {
  if (!/^[0-9A-Za-z][0-9A-Za-z.+~-]*$/.test(spec.version)) throw new UserError('LAMA_E_VM_INPUT', `version '${spec.version}' must be letters, digits and . + ~ -`);
  const lines = osRelease.split('\n').filter((l) => l !== '' && !l.startsWith('IMAGE_VERSION='));
  const files: Record<string, { data: string | Buffer; mode: number }> = {
    'usr/lib/os-release': { data: [...lines, `IMAGE_VERSION=${spec.version}`, ''].join('\n'), mode: 0o644 },
  };
  if (spec.failHealth) {
    files[FAILING_HEALTH_CHECK.slice(1)] = {
      data: '#!/bin/sh\n# Test fixture: this release is unhealthy on purpose, so its trial boot falls back.\necho "fixture release fails its health check" >&2\nexit 1\n',
      mode: 0o755,
    };
  }
  if (spec.payload !== undefined) files[PAYLOAD_FILE.slice(1)] = { data: seededBytes(spec.payload, PAYLOAD_BYTES), mode: 0o644 };
  return files;
}

/**
 * A fixture root tree for another release: a hard-link copy of the fixture tree (instant, no extra
 * space) with os-release's IMAGE_VERSION replaced and, with `failHealth`, a health.d check that
 * fails. Changed files are unlinked before writing so the base tree is never touched. Cached.
 */
export async function fixtureVariant(base: string, spec: VariantSpec): Promise<string> {
  const osRelease = await fs.readFile(path.join(base, 'usr/lib/os-release'), 'utf8');
  const files = planVariant(osRelease, spec);
  const h = createHash('sha256').update(path.basename(base));
  for (const [rel, f] of Object.entries(files)) h.update(`\0${rel}\0${f.mode}\0`).update(f.data);
  const key = h.digest('hex').slice(0, 16);
  const final = path.join(cacheRoot(), 'rootfs', `variant-${key}`);
  if (await cachedTree(final)) return final;
  const tmp = `${final}.tmp-${process.pid}`;
  await fs.rm(tmp, { recursive: true, force: true });
  try {
    await run('cp', ['-al', base, tmp]);
    for (const [rel, f] of Object.entries(files)) {
      const dest = path.join(tmp, rel);
      await fs.rm(dest, { force: true });
      await fs.mkdir(path.dirname(dest), { recursive: true });
      await fs.writeFile(dest, f.data, { mode: f.mode });
      await fs.chmod(dest, f.mode);
    }
    // The copy carries the base tree's completion marker: the rename is what publishes it.
    await fs.rm(final, { recursive: true, force: true });
    await fs.rename(tmp, final);
  } catch (err) {
    await fs.rm(tmp, { recursive: true, force: true });
    throw err;
  }
  await pruneTrees('variant');
  return final;
}

/** A release of the fixture device: the signed, encrypted RAUC bundle and what it installs. */
export interface FixtureRelease {
  version: string;
  bundle: string;
  size: number;
  rootHash: string;
  erofsBytes: number;
  created: CreatedBundle;
}

/**
 * Build a release of the fixture as a fleet would: the fixture tree at `version` (optionally with a
 * failing health check) → EROFS → dm-verity tree → template UKIs and a per-host patch for every
 * host (signed with the fleet's db key) → a crypt bundle in the verity format with adaptive rootfs
 * and verity images, the efi image installed by meta-lamadist's bundle hook, signed with the
 * fleet's RAUC key and encrypted to the recipients' certificates.
 */
export async function fixtureRelease(opts: {
  keys: string;
  kernel: DebianKernel;
  initrd: string;
  hosts: ReleaseHost[];
  /** Certificate files the bundle is encrypted to (devices, and the update server, which verifies it). */
  recipients: string[];
  version: string;
  failHealth?: boolean;
  /** See VariantSpec. */
  payload?: string;
  out: string;
  /** Bytes a slot holds for the root image (checked before the bundle is made). */
  slotRoom?: number;
  log?: (m: string) => void;
}): Promise<FixtureRelease> {
  const log = opts.log ?? (() => undefined);
  const bsp = getBsp('x86_64');
  const fixture = await fixtureRootfs({ keyring: await keyPath(opts.keys, 'rauc-ca-cert'), log });
  log(`root tree of version ${opts.version}`);
  const tree = await fixtureVariant(fixture.dir, { version: opts.version, ...(opts.failHealth && { failHealth: true }), ...(opts.payload !== undefined && { payload: opts.payload }) });
  const tmp = await makeTempDir('lamadist-release-');
  try {
    log('EROFS root image, signed with the fleet IMA key');
    const rootfs = path.join(tmp.dir, 'rootfs.img');
    await ensureImaKey(opts.keys);
    const ima = await loadImaSigner(opts.keys);
    const sb = await buildRootErofs({ tree, out: rootfs, uuid: randomUUID(), timestamp: 0, ima, work: tmp.dir });
    const room = opts.slotRoom ?? Infinity;
    if (sb.bytes > room) throw new UserError('LAMA_E_VM_INPUT', `root image of version ${opts.version} (${sb.bytes} bytes) does not fit the ${room}-byte slot`);
    log('dm-verity hash tree');
    const verity = path.join(tmp.dir, 'verity.img');
    const v = await formatVerity({ dataPath: rootfs, dataBlocks: sb.bytes / 4096, hashPath: verity, salt: productSalt(bsp.compatible), uuid: randomUUID() });
    const rootHash = v.rootHash.toString('hex');
    log('RAUC crypt bundle: template UKIs and per-host patches, signed with the fleet keys');
    const created = await createRelease({
      out: opts.out,
      bsp,
      rootHash,
      kernel: opts.kernel.vmlinuz,
      initrd: [opts.initrd],
      osrel: path.join(tree, 'usr/lib/os-release'),
      hosts: opts.hosts,
      db: await signingPair(opts.keys, 'secureboot-db'),
      version: opts.version,
      description: `LamaDist test fixture ${opts.version}${opts.failHealth ? ' (fails its health check)' : ''}`,
      rootfs,
      verity,
      format: 'crypt',
      signer: await signingPair(opts.keys, 'rauc-signing'),
      recipients: await Promise.all(opts.recipients.map((f) => fs.readFile(f, 'utf8'))),
      force: true,
    });
    return { version: opts.version, bundle: created.path, size: created.size, rootHash, erofsBytes: sb.bytes, created };
  } finally {
    await tmp.remove();
  }
}

/** A release for one emulated device, encrypted to its bundle key. */
export async function fixtureBundle(opts: {
  device: Device;
  version: string;
  failHealth?: boolean;
  out: string;
  /** Certificate files of further recipients (the update server verifies crypt bundles with its own key). */
  recipients?: string[];
  log?: (m: string) => void;
}): Promise<FixtureRelease> {
  const { device } = opts;
  const slot = device.plan.partitions.find((p) => p.label === 'rootfs_a');
  const self = { name: device.hostname, machineId: device.machineId, args: device.cmdline.split(' ') };
  return fixtureRelease({
    keys: device.keys,
    kernel: device.kernel,
    initrd: device.initrd,
    hosts: [self],
    recipients: [await keyPath(device.keys, 'device-cert', device.deviceKeyName), ...(opts.recipients ?? [])],
    version: opts.version,
    ...(opts.failHealth && { failHealth: true }),
    out: opts.out,
    ...(slot && { slotRoom: slot.size - (device.encrypt ? LUKS2_DATA_OFFSET : 0) }),
    ...(opts.log && { log: opts.log }),
  });
}

/** The emulated device registered with an update server running in this process. */
export interface FleetDevice {
  device: Device;
  server: RunningServer;
  fleet: FleetClient;
  controllerId: string;
  /** The server's own recipient certificate: releases are encrypted to it too, so it can verify them. */
  serverCert: string;
}

/** Key pair name of the update server in the key directory (a recipient of every crypt bundle). */
export const SERVER_KEY_NAME = 'update-server';

/**
 * The update server a test fleet talks to, in this process on the host's loopback (the guests
 * reach it as 10.0.2.2), with its own bundle key pair so it can verify crypt releases, and an admin
 * client. Its store lives in `dir/server` (kept, with its admin token, across calls).
 */
export async function startFleetServer(
  dir: string,
  keys: string,
  pollSeconds: number,
  log: (m: string) => void,
): Promise<{ server: RunningServer; fleet: FleetClient; serverCert: string; adminTokenFile: string }> {
  await ensureDeviceKey(keys, SERVER_KEY_NAME);
  const serverCert = await keyPath(keys, 'device-cert', SERVER_KEY_NAME);
  log('update server');
  const server = await startServer({
    store: path.join(dir, 'server'),
    listen: '127.0.0.1:0',
    keyring: await keyPath(keys, 'rauc-ca-cert'),
    bundleKey: await keyPath(keys, 'device-key', SERVER_KEY_NAME),
    bundleCert: serverCert,
    // The fleet's Secure Boot keys: what PCR 7 of an attested device must show.
    keys,
    pollSeconds,
  });
  const adminTokenFile = server.adminTokenFile as string;
  const fleet = new FleetClient({ url: server.url, token: (await fs.readFile(adminTokenFile, 'utf8')).trim() });
  return { server, fleet, serverCert, adminTokenFile };
}

/**
 * A device as a fleet operator sets one up: fleet keys, the update server (listening on the host's
 * loopback, which the guest reaches as 10.0.2.2), the device registered with a TargetToken, and
 * its disk built with that token and its bundle key pair provisioned on the ESP. A directory used
 * before keeps its keys and server database; the device then gets a fresh token.
 */
export async function prepareFleetDevice(opts: {
  dir: string;
  hostname: string;
  machineId?: string;
  /** Poll interval the server tells the device (short in tests). */
  pollSeconds?: number;
  log?: (m: string) => void;
}): Promise<FleetDevice> {
  const log = opts.log ?? (() => undefined);
  const dir = path.resolve(opts.dir);
  const keys = path.join(dir, 'keys');
  await fs.mkdir(dir, { recursive: true });
  if (!(await fs.access(path.join(keys, 'manifest.json')).then(() => true, () => false))) {
    log('fleet keys');
    await initKeys(keys);
  }
  const { server, fleet, serverCert } = await startFleetServer(dir, keys, opts.pollSeconds ?? 5, log);
  try {
    const controllerId = opts.hostname;
    const token = await registerHost(fleet, { controllerId, bsp: 'x86_64', tags: [] });
    const device = await prepareDevice({
      dir,
      hostname: opts.hostname,
      ...(opts.machineId && { machineId: opts.machineId }),
      ddi: { server: `10.0.2.2:${server.port}`, tenant: 'DEFAULT', controllerId, token },
      log,
    });
    return { device, server, fleet, controllerId, serverCert };
  } catch (err) {
    await server.close();
    throw err;
  }
}

/** Build a release for the device, upload it to the server (which verifies it) and roll it out to the device. */
export async function rollOutRelease(
  fd: FleetDevice,
  spec: VariantSpec & { log?: (m: string) => void },
): Promise<{ release: FixtureRelease; releaseId: number; rolloutId: number }> {
  const out = path.join(fd.device.dir, `release-${spec.version}.raucb`);
  const release = await fixtureBundle({
    device: fd.device,
    version: spec.version,
    ...(spec.failHealth && { failHealth: true }),
    out,
    recipients: [fd.serverCert],
    ...(spec.log && { log: spec.log }),
  });
  spec.log?.(`upload ${path.basename(out)} (${release.size} bytes)`);
  const uploaded = await fd.fleet.uploadRelease(out);
  const rollout = await fd.fleet.createRollout({ releaseId: uploaded.release.id, name: `fixture ${spec.version}`, filter: { devices: [fd.controllerId] }, start: true });
  return { release, releaseId: uploaded.release.id, rolloutId: rollout.id };
}

/** Index just past the first match of `re` in `text` at or after `from`, or -1. Pure. */
export function matchAfter(text: string, re: RegExp, from = 0): number {
  const g = new RegExp(re.source, re.flags.includes('g') ? re.flags : `${re.flags}g`);
  g.lastIndex = Math.max(0, from);
  const m = g.exec(text);
  return m ? m.index + m[0].length : -1;
}

/** One step of an over-the-air update as the device's console shows it, in order. */
export interface OtaMilestone {
  title: string;
  /** Console line that ends the step (searched after the previous milestone, or after milestone `since`). */
  marker: RegExp;
  /**
   * Index of the milestone after which `marker` is searched, when it may come before the previous
   * one: the new slot's report to the server and its slot report come in either order.
   */
  since?: number;
}

/**
 * The console milestones of a device on `fromSlot` running `from` taking release `to` into the
 * other slot: report, install, trial boot marked good, report from the new slot. Pure.
 */
export function otaMilestones(from: string, to: string, fromSlot: 'A' | 'B' = 'A'): OtaMilestone[] {
  const toSlot = fromSlot === 'A' ? 'B' : 'A';
  const esc = (s: string): string => s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
  return [
    { title: `slot ${fromSlot} runs version ${from} and reports it to the server`, marker: new RegExp(`lamadist-ddi: reported version ${esc(from)} slot ${fromSlot}`) },
    { title: `RAUC streams version ${to} from the server into slot ${toSlot}`, marker: new RegExp(`lamadist-ddi: installed version ${esc(to)}; rebooting`) },
    { title: `reboot into slot ${toSlot} (BootNext); the health check marks it good`, marker: /LAMADIST-SLOTS-END/ },
    { title: `slot ${toSlot} reports version ${to}: the server closes the action`, marker: new RegExp(`lamadist-ddi: reported version ${esc(to)} slot ${toSlot}`), since: 1 },
  ];
}

/** A running device whose console can be awaited milestone by milestone. */
export interface DeviceWatch {
  /** Resolve with the index past `re` once the console shows it after `from`; reject when the VM ends first. */
  waitFor(re: RegExp, from?: number): Promise<number>;
  serial(): string;
  /** Power the VM off (kill QEMU) and return how the run ended. */
  stop(): Promise<QemuResult>;
}

/** Boot the device (Secure Boot, TPM2, persistent NVRAM) and keep it running across its own reboots until stopped. */
export function watchDevice(device: BootableDevice, opts: { timeoutMs: number; serialLog?: string; onLine?: (l: string) => void; input?: NodeJS.ReadableStream }): DeviceWatch {
  const abort = new AbortController();
  let text = '';
  let ended = false;
  const waiters = new Set<() => void>();
  const wake = (): void => {
    for (const w of [...waiters]) w();
  };
  const run = bootDevice(device, {
    timeoutMs: opts.timeoutMs,
    ...(opts.serialLog && { serialLog: opts.serialLog }),
    ...(opts.input && { input: opts.input }),
    signal: abort.signal,
    onLine: (l) => {
      text += `${l}\n`;
      opts.onLine?.(l);
      wake();
    },
    until: () => false,
  }).finally(() => {
    ended = true;
    wake();
  });
  return {
    serial: () => text,
    waitFor: (re, from = 0) =>
      new Promise((resolve, reject) => {
        const check = (): void => {
          const at = matchAfter(text, re, from);
          if (at >= 0) {
            waiters.delete(check);
            resolve(at);
          } else if (ended) {
            waiters.delete(check);
            reject(new UserError('LAMA_E_VM_TIMEOUT', `the device stopped before its console showed /${re.source}/${opts.serialLog ? `; see ${opts.serialLog}` : ''}`));
          }
        };
        waiters.add(check);
        check();
      }),
    stop: async () => {
      abort.abort();
      return run;
    },
  };
}
