import { spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { getBsp } from '../../src/bsp/index.js';
import { FleetClient } from '../../src/fleet/index.js';
import { addHost, loadInventory } from '../../src/host/index.js';
import { addDeviceKey, initKeys, keyPath } from '../../src/keys/index.js';
import { createRelease, releaseHosts } from '../../src/release/index.js';
import { startServer, type RunningServer } from '../../src/server/index.js';
import { checkInstallable } from '../../src/installer/index.js';
import { inspectUki } from '../../src/uki/index.js';
import { runCli } from '../helpers/cli.js';
import { tinyRoot } from '../helpers/root.js';
import { STUB } from '../uki/helpers.js';

const bsp = getBsp('x86_64');
// Small partitions: the root image here is a few KiB; /var stays above 512 MiB (4 KiB ext4 blocks).
const SIZES = ['--size', 'esp=40', '--size', 'rootfs_a=20', '--size', 'rootfs_b=20', '--size', 'verity_a=1', '--size', 'verity_b=1', '--size', 'var=520'];

function sh(cmd: string, args: string[]): { code: number; out: string } {
  const r = spawnSync(cmd, args, { encoding: 'utf8', maxBuffer: 64 << 20 });
  return { code: r.status ?? 128, out: `${r.stdout}${r.stderr}` };
}

let tmp: string;
let keys: string;
let inventory: string;
let release: string;
let server: RunningServer;
let adminToken: string;

beforeAll(async () => {
  tmp = await fs.mkdtemp(path.join(os.tmpdir(), 'lamadist-provision-'));
  keys = path.join(tmp, 'keys');
  await initKeys(keys);
  await addDeviceKey(keys, 'update-server');
  inventory = path.join(tmp, 'hosts.yaml');
  await addHost(inventory, { name: 'node1', ip: { address: '192.0.2.10/24', gateway: '192.0.2.1', interface: 'eth0' } });
  await addHost(inventory, { name: 'node2', ip: 'dhcp' });
  await addHost(inventory, { name: 'late' });
  await addHost(inventory, { name: 'board', bsp: 'rk1' });
  const { rootfs, verity, rootHash: releaseRoot } = await tinyRoot(tmp, { osRelease: 'ID=lamadist\nIMAGE_VERSION=1\n', salt: 5 });
  // The release carries node1 and node2; "late" joins the inventory after it was made.
  const inv = await loadInventory(inventory);
  release = path.join(tmp, 'release-1.raucb');
  await createRelease({
    out: release,
    bsp,
    rootHash: releaseRoot,
    stub: STUB,
    kernel: randomBytes(2 << 20),
    initrd: [randomBytes(1 << 20)],
    hosts: releaseHosts(inv.hosts.filter((h) => h.name === 'node1' || h.name === 'node2')),
    db: { certPem: await fs.readFile(path.join(keys, 'db.crt')), keyPem: await fs.readFile(path.join(keys, 'db.key')) },
    version: '1',
    rootfs,
    verity,
    format: 'crypt',
    signer: { certPem: await fs.readFile(path.join(keys, 'rauc-signing.crt'), 'utf8'), keyPem: await fs.readFile(path.join(keys, 'rauc-signing.key'), 'utf8') },
    recipients: [await fs.readFile(await keyPath(keys, 'device-cert', 'update-server'), 'utf8')],
  });
  // With its bundle key: it opens the crypt release that provision uploads.
  server = await startServer({
    store: path.join(tmp, 'server'),
    listen: '127.0.0.1:0',
    keyring: path.join(keys, 'rauc-ca.crt'),
    bundleKey: await keyPath(keys, 'device-key', 'update-server'),
    bundleCert: await keyPath(keys, 'device-cert', 'update-server'),
  });
  adminToken = (await fs.readFile(server.adminTokenFile as string, 'utf8')).trim();
}, 180_000);
afterAll(async () => {
  await server?.close();
  await fs.rm(tmp, { recursive: true, force: true });
});

const common = (): string[] => ['--release', release, '--keys', keys, '--inventory', inventory, '--server', server.url, '--device-server', '10.0.2.2:8080'];
const env = (): NodeJS.ProcessEnv => ({ LAMADIST_ADMIN_TOKEN: adminToken });

/** Files of the FAT ESP inside a disk image (mtools reads it at the partition's byte offset). */
function espFile(disk: string, offset: number, file: string): Buffer {
  const r = spawnSync('mtype', ['-i', `${disk}@@${offset}`, `::${file}`], { maxBuffer: 64 << 20 });
  if (r.status !== 0) throw new Error(`mtype ${file}: ${r.stderr.toString()}`);
  return r.stdout;
}

describe('lamadist provision', () => {
  it('provisions two hosts from one release: keys, registration, client configuration, signed UKIs and sealed disks', async () => {
    const out = path.join(tmp, 'out');
    const r = await runCli(['provision', 'node1', 'node2', ...common(), '--out', out, '--disk', path.join(out, '{host}.img'), '--tag', 'rack1', ...SIZES, '--json'], { env: env(), timeoutMs: 300_000 });
    expect(r.stderr).not.toMatch(/error/);
    expect(r.code).toBe(0);
    const done = JSON.parse(r.stdout) as { host: string; machineId: string; inRelease: boolean; staleInRelease: boolean; registered: string; deviceKeyIssued: boolean; outputs: Record<string, string> & { ukis: Record<string, string> }; luks: { label: string; uuid: string }[]; cmdline: Record<string, string> }[];
    expect(done.map((d) => [d.host, d.inRelease, d.staleInRelease, d.registered, d.deviceKeyIssued])).toEqual([
      ['node1', true, false, 'target-token', true],
      ['node2', true, false, 'target-token', true],
    ]);
    const fleet = new FleetClient({ url: server.url, token: adminToken });
    // The server holds the release the hosts were provisioned with (it attests them against it).
    const stored = await fleet.listReleases();
    expect(stored.map((x) => x.version)).toEqual(['1']);
    expect(done.map((d) => (d as { releaseId?: number }).releaseId)).toEqual([stored[0]?.id, stored[0]?.id]);
    const devices = await fleet.listDevices();
    expect(devices.map((d) => [d.controllerId, d.tags]).sort()).toEqual([
      ['node1', ['rack1']],
      ['node2', ['rack1']],
    ]);
    for (const d of done) {
      expect((await fs.stat(d.outputs.token as string)).mode & 0o777).toBe(0o600);
      expect((await fs.stat(d.outputs.config as string)).mode & 0o777).toBe(0o600);
      const conf = await fs.readFile(d.outputs.config as string, 'utf8');
      expect(conf).toContain(`target_name = ${d.host}`);
      expect(conf).toContain('hawkbit_server = 10.0.2.2:8080');
      expect(conf).toContain(`auth_token = ${(await fs.readFile(d.outputs.token as string, 'utf8')).trim()}`);
      for (const slot of ['a', 'b']) {
        expect(sh('sbverify', ['--cert', path.join(keys, 'db.crt'), d.outputs.ukis[slot] as string]).out).toMatch(/Signature verification OK/);
        expect(inspectUki(await fs.readFile(d.outputs.ukis[slot] as string)).cmdline).toBe(d.cmdline[slot]);
      }
      expect(d.cmdline.b).toContain(`systemd.hostname=${d.host} systemd.machine_id=${d.machineId}`);
      expect(d.luks.map((l) => l.label).sort()).toEqual(['rootfs_a', 'rootfs_b', 'var']);
    }
    expect(done[0]?.cmdline.a).toMatch(/ ip=192\.0\.2\.10::192\.0\.2\.1:255\.255\.255\.0:node1:eth0:none/);
    expect(done[1]?.cmdline.a).toMatch(/ ip=dhcp/);

    // The disk: a GPT sgdisk accepts, the host's UKI and provisioning on the ESP, LUKS2 that
    // cryptsetup opens with the recovery key.
    const d1 = done[0] as (typeof done)[number];
    const disk = d1.outputs.disk as string;
    expect(sh('sgdisk', ['-v', disk]).out).toMatch(/No problems found/);
    const parts = JSON.parse(sh('sfdisk', ['--json', disk]).out) as { partitiontable: { partitions: { start: number; name: string; size: number }[] } };
    const part = (name: string): { start: number; size: number } => parts.partitiontable.partitions.find((p) => p.name === name) as { start: number; size: number };
    const esp = part('esp').start * 512;
    expect(espFile(disk, esp, '/EFI/Linux/lamadist-b.efi').equals(await fs.readFile(d1.outputs.ukis.b as string))).toBe(true);
    expect(espFile(disk, esp, '/lamadist/var/lib/lamadist/hawkbit.conf').toString()).toBe(await fs.readFile(d1.outputs.config as string, 'utf8'));
    expect(espFile(disk, esp, '/lamadist/var/lib/rauc/encryption/device.cert.pem').equals(await fs.readFile(await keyPath(keys, 'device-cert', 'node1')))).toBe(true);
    const header = path.join(tmp, 'rootfs_a.luks');
    const rootA = part('rootfs_a');
    expect(sh('dd', [`if=${disk}`, `of=${header}`, 'bs=512', `skip=${rootA.start}`, 'count=32768', 'status=none']).code).toBe(0);
    const test = sh('cryptsetup', ['open', '--test-passphrase', '--key-file', d1.outputs.recoveryKey as string, header]);
    expect(test.code, test.out).toBe(0);
    expect(sh('cryptsetup', ['luksDump', header]).out).toContain(done[0]?.luks.find((l) => l.label === 'rootfs_a')?.uuid);
  }, 300_000);

  it('a host the release lacks is provisioned with a warning; --offline writes the gateway token instead of registering', async () => {
    const gw = path.join(tmp, 'gateway.token');
    await fs.writeFile(gw, 'gw-secret-token\n');
    const r = await runCli(['provision', 'late', ...common(), '--out', path.join(tmp, 'late'), '--offline', '--gateway-token-file', gw, '--json'], { env: env() });
    expect(r.code, r.stderr).toBe(0);
    expect(r.stderr).toMatch(/warning: late is not in release 1/);
    const [late] = JSON.parse(r.stdout) as { registered: string; inRelease: boolean; outputs: { config: string; token?: string } }[];
    expect(late?.registered).toBe('gateway-token');
    expect(late?.inRelease).toBe(false);
    expect(late?.outputs.token).toBeUndefined();
    expect(await fs.readFile(late?.outputs.config as string, 'utf8')).toContain('gateway_token = gw-secret-token');
    expect((await new FleetClient({ url: server.url, token: adminToken }).listDevices()).map((d) => d.controllerId)).not.toContain('late');

    // node1's entry changes after the release: its UKIs follow the inventory, with a warning.
    const text = await fs.readFile(inventory, 'utf8');
    await fs.writeFile(inventory, text.replace(/(\n {2}node1:\n)/, '$1    kernel-args: [quiet]\n'));
    try {
      const s = await runCli(['provision', 'node1', ...common(), '--out', path.join(tmp, 'stale'), '--offline', '--gateway-token-file', gw, '--json'], { env: env() });
      expect(s.code, s.stderr).toBe(0);
      expect(s.stderr).toMatch(/node1's inventory entry changed since release 1/);
      const [n1] = JSON.parse(s.stdout) as { staleInRelease: boolean; cmdline: { a: string } }[];
      expect(n1?.staleInRelease).toBe(true);
      expect(n1?.cmdline.a).toMatch(/ quiet$/);
    } finally {
      await fs.writeFile(inventory, text);
    }
  }, 120_000);

  it('refuses bad input with one line and exit 2, leaving no disk behind', async () => {
    const disk = path.join(tmp, 'bad.img');
    const cases: [string[], RegExp][] = [
      [['nosuch', ...common()], /nosuch/],
      [['node1', ...common().map((a) => (a === keys ? path.join(tmp, 'no-keys') : a))], /no-keys|manifest/],
      [['node1', ...common().map((a) => (a === server.url ? 'http://127.0.0.1:1' : a))], /cannot reach/],
      [['board', ...common()], /rk1 host; the release is for x86_64/],
      [['node1', 'node2', ...common(), '--disk', disk], /\{host\}/],
      [['node1', ...common(), '--offline'], /--gateway-token-file/],
    ];
    for (const [args, re] of cases) {
      const r = await runCli(['provision', ...args, '--out', path.join(tmp, 'bad'), '--disk', disk], { env: env() });
      expect(r.code, `${args.join(' ')}: ${r.stderr}`).toBe(2);
      expect(r.stderr.trim().split('\n'), r.stderr).toHaveLength(1);
      expect(r.stderr).toMatch(re);
      expect(existsSync(disk)).toBe(false);
    }
    const help = await runCli(['provision', '--help']);
    expect(help.code).toBe(0);
    expect(help.stdout).toMatch(/--release <bundle>/);
  }, 120_000);
});

/** A file of the ext4 data partition of an installer stick, read by debugfs at the partition's offset. */
function stickFile(stick: string, offset: number, file: string): Buffer {
  const r = spawnSync('debugfs', ['-R', `cat ${file}`, `${stick}?offset=${offset}`], { maxBuffer: 512 << 20 });
  if (r.status !== 0 || /File not found/.test(r.stderr.toString())) throw new Error(`debugfs ${file}: ${r.stderr.toString()}`);
  return r.stdout;
}

describe('lamadist provision --installer', () => {
  it('builds one stick for two hosts: the release root with its hash tree, a db-signed installer UKI, each host\'s plan and ESP, no disk key', async () => {
    await runCli(['host', 'add', 'inst1', '--inventory', inventory, '--dhcp', '--smbios-uuid', '4C414D41-0000-4000-8000-00000000000A']);
    await runCli(['host', 'add', 'inst2', '--inventory', inventory, '--dhcp', '--mac', '52:54:00:12:34:56']);
    const out = path.join(tmp, 'inst');
    const stick = path.join(tmp, 'stick.img');
    const r = await runCli(['provision', 'inst1', 'inst2', ...common(), '--out', out, '--installer', stick, ...SIZES, '--json'], { env: env(), timeoutMs: 300_000 });
    expect(r.code, r.stderr).toBe(0);
    const done = JSON.parse(r.stdout) as { host: string; machineId: string; luks: { label: string; uuid: string }[]; outputs: { installer: string; recoveryEscrow: string; ukis: Record<'a' | 'b', string> } }[];
    expect(done.map((d) => d.outputs.installer)).toEqual([stick, stick]);
    expect(done[0]?.outputs.recoveryEscrow).toBe(`${stick}:installer_data/escrow/inst1.cms`);
    // It carries each host's device key and token: a secret like the key directory.
    expect((await fs.stat(stick)).mode & 0o777).toBe(0o600);

    const table = JSON.parse(sh('sfdisk', ['--json', stick]).out) as { partitiontable: { partitions: { start: number; size: number; name: string }[] } };
    const parts = table.partitiontable.partitions;
    expect(parts.map((p) => p.name)).toEqual(['esp', 'installer_root', 'installer_verity', 'installer_data']);
    const at = (name: string): { start: number; size: number } => parts.find((p) => p.name === name) as { start: number; size: number };
    expect(sh('sgdisk', ['-v', stick]).out).toMatch(/No problems found/);

    // The installer UKI: the release's own kernel and initramfs, installer mode, signed with the fleet's db key.
    const uki = path.join(tmp, 'installer.efi');
    await fs.writeFile(uki, espFile(stick, at('esp').start * 512, '/EFI/BOOT/BOOTX64.EFI'));
    expect(sh('sbverify', ['--cert', path.join(keys, 'db.crt'), uki]).out).toMatch(/Signature verification OK/);
    const cmdline = inspectUki(await fs.readFile(uki)).cmdline;
    expect(cmdline).toMatch(/^roothash=[0-9a-f]{64} lamadist\.installer console=ttyS0,115200$/);

    // Root and hash tree as dm-verity's own tool sees them.
    const copy = (name: string, file: string): void => {
      const p = at(name);
      expect(sh('dd', [`if=${stick}`, `of=${file}`, 'bs=512', `skip=${p.start}`, `count=${p.size}`, 'status=none']).code).toBe(0);
    };
    copy('installer_root', path.join(tmp, 'root.part'));
    copy('installer_verity', path.join(tmp, 'verity.part'));
    const conf = stickFile(stick, at('installer_data').start * 512, '/installer.conf').toString();
    const rootHash = /^root-hash ([0-9a-f]{64})$/m.exec(conf)?.[1] as string;
    expect(cmdline).toContain(`roothash=${rootHash}`);
    const verify = sh('veritysetup', ['verify', path.join(tmp, 'root.part'), path.join(tmp, 'verity.part'), rootHash]);
    expect(verify.code, verify.out).toBe(0);

    const data = at('installer_data').start * 512;
    for (const d of done) {
      const hostConf = stickFile(stick, data, `/hosts/${d.host}/host.conf`).toString();
      expect(hostConf).toContain(`machine-id ${d.machineId}`);
      for (const l of d.luks) expect(hostConf).toContain(`luks ${l.label} ${l.uuid}`);
      // The partition table, applied by sfdisk to a blank drive larger than planned: /var takes the rest.
      const min = Number(/^min-bytes (\d+)$/m.exec(hostConf)?.[1]);
      const drive = path.join(tmp, `${d.host}.drive`);
      await fs.writeFile(drive, '');
      await fs.truncate(drive, min + 256 * 1024 * 1024);
      const script = path.join(tmp, `${d.host}.sfdisk`);
      await fs.writeFile(script, stickFile(stick, data, `/hosts/${d.host}/disk.sfdisk`));
      const applied = spawnSync('sfdisk', ['--quiet', drive], { input: await fs.readFile(script) });
      expect(applied.status, applied.stderr.toString()).toBe(0);
      const dparts = (JSON.parse(sh('sfdisk', ['--json', drive]).out) as typeof table).partitiontable.partitions;
      expect(dparts.map((p) => p.name)).toEqual(['esp', 'rootfs_a', 'verity_a', 'rootfs_b', 'verity_b', 'var']);
      const last = dparts[dparts.length - 1] as { start: number; size: number };
      expect((last.start + last.size) * 512).toBeGreaterThan(min);
      // The host's ESP: both signed UKIs and its provisioning, but no disk key: the device makes those.
      const esp = path.join(tmp, `${d.host}.esp`);
      await fs.writeFile(esp, stickFile(stick, data, `/hosts/${d.host}/esp.img`));
      const listing = sh('mdir', ['-/', '-b', '-i', esp, '::/']).out;
      expect(listing).toContain('::/EFI/Linux/lamadist-a.efi');
      expect(listing).toContain('::/lamadist/var/lib/lamadist/hawkbit.conf');
      expect(listing).not.toMatch(/provision\.key/i);
      expect(espFile(esp, 0, '/EFI/Linux/lamadist-b.efi').equals(await fs.readFile(d.outputs.ukis.b))).toBe(true);
    }
    // Nothing is escrowed until a machine is installed from the stick.
    const none = await runCli(['recovery-key', 'inst1', '--keys', keys, '--escrow', stick]);
    expect(none.code).toBe(2);
    expect(none.stderr.trim().split('\n')).toHaveLength(1);
    expect(none.stderr).toMatch(/not an installer stick holding an escrow of host inst1 .*was inst1 installed from it\?/);
    expect(stickFile(stick, data, '/recovery.cert.pem').toString()).toBe(await fs.readFile(await keyPath(keys, 'recovery-cert'), 'utf8'));
    expect(stickFile(stick, data, '/secureboot/PK.auth').equals(await fs.readFile(await keyPath(keys, 'secureboot-pk-auth')))).toBe(true);
  }, 300_000);

  it('refuses a host the installer could not recognise in one line, before registering anything, with no stick left behind', async () => {
    const stick = path.join(tmp, 'refused.img');
    const before = await new FleetClient({ url: server.url, token: adminToken }).getDevice('node2');
    const r = await runCli(['provision', 'node2', ...common(), '--out', path.join(tmp, 'refused'), '--installer', stick], { env: env() });
    expect(r.code, r.stderr).toBe(2);
    expect(r.stderr.trim().split('\n')).toHaveLength(1);
    expect(r.stderr).toMatch(/SMBIOS UUID or MAC; node2 has neither/);
    expect(existsSync(stick)).toBe(false);
    expect(existsSync(path.join(tmp, 'refused'))).toBe(false);
    // Its token was not rotated: the refusal came first.
    expect(await new FleetClient({ url: server.url, token: adminToken }).getDevice('node2')).toEqual(before);
    // U-Boot boards are installed from --disk images: the stick boots through UEFI only.
    const mac = { name: 'b', machineId: '0'.repeat(32), bsp: 'rk1', kernelArgs: [], macs: ['52:54:00:00:00:01'] };
    expect(() => checkInstallable(getBsp('rk1'), [mac])).toThrow(/rk1 boots through U-Boot/);
    expect(() => checkInstallable(bsp, [mac])).not.toThrow();
  }, 120_000);
});
