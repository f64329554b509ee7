import { spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { getBsp } from '../../src/bsp/index.js';
import { buildErofs } from '../../src/erofs/index.js';
import { UserError } from '../../src/errors.js';
import { addHost } from '../../src/host/index.js';
import { initKeys, keyPath } from '../../src/keys/index.js';
import { inspectBundle } from '../../src/rauc/index.js';
import { BUNDLE_HOOK, UKI_BLOCK, UKI_BLOCKS_DIR, applyUkiPatch, blockIndex, createRelease, diffUki, parsePatch, planHostCmdlines, releaseBootFiles, renderPatch, type ReleaseBoot, type ReleaseHost } from '../../src/release/index.js';
import { buildUki, inspectUki, setUkiCmdline } from '../../src/uki/index.js';
import { formatVerity } from '../../src/verity/index.js';
import { runCli } from '../helpers/cli.js';
import { skipBecause } from '../helpers/skip.js';
import { STUB } from '../uki/helpers.js';

const bsp = getBsp('x86_64');
const ROOT_HASH = 'ab'.repeat(32);
const mid = (n: number): string => n.toString(16).padStart(32, '0');
const host = (n: number, extra: string[] = []): ReleaseHost => ({
  name: `node${n}`,
  machineId: mid(n),
  args: [`systemd.hostname=node${n}`, `systemd.machine_id=${mid(n)}`, ...extra],
});

function sh(cmd: string, args: string[], env: NodeJS.ProcessEnv = {}): { code: number; out: string } {
  const r = spawnSync(cmd, args, { encoding: 'utf8', env: { ...process.env, ...env } });
  return { code: r.status ?? 128, out: `${r.stdout}${r.stderr}` };
}

let tmp: string;
let keys: string;
let db: { certPem: Buffer; keyPem: Buffer };
let kernel: Buffer;
let initrd: Buffer;
let boot: ReleaseBoot;
const hosts = [host(1, ['ip=192.0.2.10::192.0.2.1:255.255.255.0:node1:eth0:off']), host(2)];

beforeAll(async () => {
  tmp = await fs.mkdtemp(path.join(os.tmpdir(), 'lamadist-release-'));
  keys = path.join(tmp, 'keys');
  await initKeys(keys);
  db = { certPem: await fs.readFile(await keyPath(keys, 'secureboot-db-cert')), keyPem: await fs.readFile(await keyPath(keys, 'secureboot-db-key')) };
  kernel = randomBytes(3 << 20);
  initrd = randomBytes(1 << 20);
  boot = await releaseBootFiles({ bsp, rootHash: ROOT_HASH, stub: STUB, kernel, initrd: [initrd], osrel: Buffer.from('ID=lamadist\n'), hosts, db });
}, 120_000);
afterAll(async () => {
  await fs.rm(tmp, { recursive: true, force: true });
});

describe('per-host UKIs as patches of one template', () => {
  it('the template carries no identity and every host its own, with the release root hash and slot', () => {
    const plan = planHostCmdlines(bsp, ROOT_HASH, hosts);
    expect(plan.template.b).toBe(`roothash=${ROOT_HASH} lamadist.slot=b rauc.slot=B ${bsp.console} rw`);
    expect(plan.hosts[0]?.cmdline.a).toBe(`${plan.template.a} ${hosts[0]?.args.join(' ')}`);
    expect(() => planHostCmdlines(bsp, ROOT_HASH, [host(3), host(3)])).toThrow(/share machine-id/);
    expect(() => planHostCmdlines(bsp, ROOT_HASH, [{ ...host(4), machineId: 'NOT-HEX' }])).toThrow(UserError);
  });

  it('changing the command line of the template gives the bytes buildUki gives', async () => {
    const cmdline = planHostCmdlines(bsp, ROOT_HASH, hosts).hosts[1]?.cmdline.b as string;
    const direct = await buildUki({ stub: STUB, kernel, initrd: [initrd], cmdline, osrel: Buffer.from('ID=lamadist\n') });
    expect(setUkiCmdline(boot.templates.b, cmdline).equals(direct)).toBe(true);
    expect(() => setUkiCmdline(boot.templates.b, 'x'.repeat(4097))).toThrow(/sets aside 4096/);
  });

  it('sections after .cmdline keep their offsets whatever the command line', async () => {
    const short = inspectUki(await buildUki({ stub: STUB, kernel, initrd: [initrd], cmdline: 'a' }));
    const long = inspectUki(await buildUki({ stub: STUB, kernel, initrd: [initrd], cmdline: 'a'.repeat(3000) }));
    const at = (i: typeof short, n: string): number[] => {
      const s = i.sections.find((x) => x.name === n);
      return [s?.fileOffset ?? -1, s?.virtualAddress ?? -1];
    };
    for (const n of ['.uname', '.initrd', '.linux']) if (short.sections.some((s) => s.name === n)) expect(at(long, n)).toEqual(at(short, n));
  });

  it('.initrd and .linux keep their offsets whatever the os-release and kernel release (fixed areas); a longer os-release takes whole 4 KiB', async () => {
    const uki = async (osrel: string, uname: string): Promise<ReturnType<typeof inspectUki>> =>
      inspectUki(await buildUki({ stub: STUB, kernel, initrd: [initrd], cmdline: 'a', osrel: Buffer.from(osrel), uname }));
    const one = await uki('ID=lamadist\nVERSION_ID=1\n', '6.1.0-47-amd64');
    const two = await uki(`ID=lamadist\nVERSION_ID=2.0.1\nBUILD_ID=${'x'.repeat(3000)}\n`, '6.1.0-47-amd64+lamadist.1');
    const offset = (i: typeof one, n: string): number | undefined => i.sections.find((x) => x.name === n)?.fileOffset;
    for (const n of ['.cmdline', '.uname', '.initrd', '.linux']) expect(offset(two, n), n).toBe(offset(one, n));
    expect(two.osrel?.VERSION_ID).toBe('2.0.1');
    expect(two.uname).toBe('6.1.0-47-amd64+lamadist.1');
    const big = await uki(`ID=lamadist\nX=${'y'.repeat(5000)}\n`, '6.1.0-47-amd64');
    expect((offset(big, '.linux') ?? 0) - (offset(one, '.linux') ?? 0)).toBe(4096);
    await expect(uki('ID=lamadist\n', 'v'.repeat(257))).rejects.toThrow(/more than the 256 a UKI sets aside/);
  });

  it('each host patch rebuilds its signed UKI byte for byte, sbverify accepts it, and it is small', async () => {
    for (const h of boot.hosts) {
      for (const slot of ['a', 'b'] as const) {
        const map = h.files[`hosts/${h.host.machineId}/uki-${slot}.map`]?.toString() as string;
        const bin = h.files[`hosts/${h.host.machineId}/uki-${slot}.bin`] as Buffer;
        const rebuilt = applyUkiPatch(boot.templates[slot], parsePatch(map, bin));
        expect(rebuilt.equals(h.ukis[slot])).toBe(true);
        expect(bin.length).toBeLessThan(16 * 1024);
        expect(inspectUki(rebuilt).cmdline).toContain(`systemd.machine_id=${h.host.machineId}`);
        const f = path.join(tmp, `${h.host.name}-${slot}.efi`);
        await fs.writeFile(f, rebuilt);
        expect(sh('sbverify', ['--cert', path.join(keys, 'db.crt'), f]).out).toMatch(/Signature verification OK/);
      }
    }
  });

  it('a patch is refused against another template, with a corrupt data file, or when malformed', () => {
    const h = boot.hosts[0] as ReleaseBoot['hosts'][number];
    const map = h.files[`hosts/${h.host.machineId}/uki-a.map`]?.toString() as string;
    const bin = h.files[`hosts/${h.host.machineId}/uki-a.bin`] as Buffer;
    expect(() => applyUkiPatch(boot.templates.b, parsePatch(map, bin))).toThrow(/not the one this host's patch was made from/);
    const flipped = Buffer.from(bin);
    flipped[10] = (flipped[10] as number) ^ 1;
    expect(() => applyUkiPatch(boot.templates.a, parsePatch(map, flipped))).toThrow(/does not have the hash/);
    expect(() => parsePatch(map, bin.subarray(1))).toThrow(UserError);
    const where = (f: () => unknown): string | undefined => {
      try {
        f();
      } catch (err) {
        return err instanceof UserError ? err.where : 'not a UserError';
      }
      return undefined;
    };
    expect(where(() => parsePatch(map.replace('lamadist-uki-patch 1', 'x'), bin, 'm'))).toBe('m:1:1');
    expect(where(() => parsePatch(map.replace(/write (\d+)/, 'write -$1'), bin, 'm'))).toBe('m:4:1');
    const lines = map.trimEnd().split('\n');
    const swapped = [...lines.slice(0, 3), lines[4], lines[3], ...lines.slice(5)].join('\n');
    expect(() => parsePatch(swapped, bin)).toThrow(/increasing offset/);
    expect(() => diffUki(Buffer.alloc(10), Buffer.alloc(5))).toThrow();
    const { map: m2, data } = renderPatch(diffUki(Buffer.from('abcdef'), Buffer.from('abXdefGH')));
    expect(applyUkiPatch(Buffer.from('abcdef'), parsePatch(m2, data)).toString()).toBe('abXdefGH');
  });
});

/** Byte offset of a tar member's data (ustar headers: name at 0, octal size at 124). */
function tarMemberOffset(tar: Buffer, name: string): number {
  for (let off = 0; off + 512 <= tar.length; ) {
    const n = tar.toString('latin1', off, off + 100).replace(/\0.*$/s, '');
    if (!n) break;
    const size = parseInt(tar.toString('latin1', off + 124, off + 136).replace(/[^0-7]/g, ''), 8);
    if (n === name) return off + 512;
    off += 512 + Math.ceil(size / 512) * 512;
  }
  throw new Error(`${name} is not in the tar`);
}

describe("meta-lamadist's bundle hook on a release's files", () => {
  let mount: string;
  let tar: string;
  let hook: string;
  const compat = { RAUC_MF_COMPATIBLE: bsp.compatible, RAUC_SYSTEM_COMPATIBLE: bsp.compatible };
  /** The command line a host runs with: its slot A UKI's. */
  const running = (h: ReleaseBoot['hosts'][number]): string => inspectUki(h.ukis.a).cmdline as string;

  beforeAll(async () => {
    mount = path.join(tmp, 'bundle');
    for (const h of boot.hosts) {
      for (const [name, data] of Object.entries(h.files)) {
        await fs.mkdir(path.dirname(path.join(mount, name)), { recursive: true });
        await fs.writeFile(path.join(mount, name), data);
      }
    }
    await fs.mkdir(path.join(mount, UKI_BLOCKS_DIR), { recursive: true });
    for (const slot of ['a', 'b'] as const) {
      await fs.writeFile(path.join(tmp, `lamadist-${slot}.efi`), boot.templates[slot]);
      await fs.writeFile(path.join(mount, UKI_BLOCKS_DIR, `lamadist-${slot}.blocks`), blockIndex(boot.templates[slot]));
    }
    // RAUC runs the hook as hook.sh from the bundle's root, which is how the hook finds the bundle.
    hook = path.join(mount, 'hook.sh');
    await fs.copyFile(BUNDLE_HOOK, hook);
    tar = path.join(mount, 'efi.tar');
    expect(sh('tar', ['-cf', tar, '-C', tmp, 'lamadist-a.efi', 'lamadist-b.efi']).code).toBe(0);
  });

  const check = async (cmdline: string, env: NodeJS.ProcessEnv = compat, script = hook): Promise<{ code: number; out: string }> => {
    const f = path.join(tmp, 'cmdline');
    await fs.writeFile(f, `${cmdline}\n`);
    return sh(script, ['install-check'], { ...env, LAMADIST_CMDLINE: f });
  };

  it('install-check accepts a host of the release', async () => {
    for (const h of boot.hosts) expect(await check(running(h))).toEqual({ code: 0, out: '' });
  });

  it('install-check refuses, with exit 10 and one line, a host the release lacks, an identity it drops, and a bundle without hosts', async () => {
    const h1 = boot.hosts[0] as ReleaseBoot['hosts'][number];
    const other = running(h1).replaceAll(h1.host.machineId, mid(99));
    expect(await check(other)).toEqual({ code: 10, out: `lamadist-bundle-hook: host ${mid(99)} (node1) is not in this release\n` });
    // node2 runs with a static address today; the release's line for it has none.
    const h2 = boot.hosts[1] as ReleaseBoot['hosts'][number];
    const withIp = `${running(h2)} ip=192.0.2.20::192.0.2.1:255.255.255.0:node2:eth0:off`;
    expect(await check(withIp)).toEqual({ code: 10, out: 'lamadist-bundle-hook: release would drop ip=192.0.2.20::192.0.2.1:255.255.255.0:node2:eth0:off from this host\'s command line (slot a)\n' });
    expect((await check('console=ttyS0 roothash=00')).code).toBe(10);
    const empty = path.join(tmp, 'empty-bundle');
    await fs.mkdir(empty, { recursive: true });
    await fs.copyFile(BUNDLE_HOOK, path.join(empty, 'hook.sh'));
    const r = await check(running(h1), compat, path.join(empty, 'hook.sh'));
    expect(r.code).toBe(10);
    expect(r.out).toMatch(/no per-host boot files.*drop this host's identity/);
    // With an install-check hook RAUC skips its own compatible check: the hook makes it.
    expect(await check(running(h1), { RAUC_MF_COMPATIBLE: 'lamadist-rk1', RAUC_SYSTEM_COMPATIBLE: bsp.compatible })).toEqual({
      code: 10,
      out: `lamadist-bundle-hook: bundle is for 'lamadist-rk1', this system is '${bsp.compatible}'\n`,
    });
  });

  const canUnshare = sh('unshare', ['--mount', 'true']).code === 0;
  it.skipIf(skipBecause(!canUnshare, 'bundle hook slot-install', 'unshare --mount is not permitted here (it needs a private tmpfs ESP)'))('slot-install writes the host\'s signed UKI for the target slot only, atomically; a corrupt patch changes nothing', async () => {
    const h = boot.hosts[0] as ReleaseBoot['hosts'][number];
    const esp = path.join(tmp, 'esp');
    const out = path.join(tmp, 'esp-after');
    await fs.mkdir(esp, { recursive: true });
    const cmdline = path.join(tmp, 'running');
    await fs.writeFile(cmdline, running(h));
    const env = { RAUC_SLOT_CLASS: 'efi', RAUC_SLOT_NAME: 'efi.1', RAUC_IMAGE_NAME: tar, LAMADIST_ESP: esp, LAMADIST_CMDLINE: cmdline };
    // The hook insists on a mounted ESP: a private tmpfs in its own mount namespace, copied out after.
    const inNs = (script: string, e: NodeJS.ProcessEnv): { code: number; out: string } =>
      sh('unshare', ['--mount', 'sh', '-c', `mount -t tmpfs tmpfs '${esp}' && ${script}; rc=$?; rm -rf '${out}'; cp -a '${esp}' '${out}'; exit $rc`], e);
    const r = inNs(`'${hook}' slot-install`, env);
    // No UKI on the ESP to copy from: every block comes from the bundle.
    const blocks = Math.ceil(boot.templates.b.length / UKI_BLOCK);
    expect(r).toEqual({ code: 0, out: `lamadist-bundle-hook: UKI of slot b: ${blocks} of ${blocks} blocks from the bundle, the rest from ${esp}/EFI/Linux/lamadist-a.efi\n` });
    expect((await fs.readFile(path.join(out, 'EFI/Linux/lamadist-b.efi'))).equals(h.ukis.b)).toBe(true);
    expect(existsSync(path.join(out, 'EFI/Linux/lamadist-a.efi'))).toBe(false);
    expect(sh('sbverify', ['--cert', path.join(keys, 'db.crt'), path.join(out, 'EFI/Linux/lamadist-b.efi')]).out).toMatch(/Signature verification OK/);

    // A corrupt patch: the old UKI stays, no temporary file is left.
    const bin = path.join(mount, `hosts/${h.host.machineId}/uki-b.bin`);
    const good = await fs.readFile(bin);
    const bad = Buffer.from(good);
    bad[20] = (bad[20] as number) ^ 0xff;
    await fs.writeFile(bin, bad);
    try {
      const seeded = `mkdir -p '${esp}/EFI/Linux' && echo OLD > '${esp}/EFI/Linux/lamadist-b.efi' && '${hook}' slot-install`;
      const c = inNs(seeded, env);
      expect(c.code).toBe(1);
      expect(c.out).toMatch(/\nlamadist-bundle-hook: the rebuilt UKI of slot b does not have the hash the release promises\n$/);
      expect(await fs.readFile(path.join(out, 'EFI/Linux/lamadist-b.efi'), 'utf8')).toBe('OLD\n');
      expect(await fs.readdir(path.join(out, 'EFI/Linux'))).toEqual(['lamadist-b.efi']);
    } finally {
      await fs.writeFile(bin, good);
    }

    // The running slot A has the last release's UKI: same kernel and initrd, another version and
    // root hash. Only the blocks that differ are read from the bundle. Proof: the template's
    // kernel blocks in the efi image are overwritten, and the result is still the release's UKI.
    const last = await releaseBootFiles({ bsp, rootHash: 'cd'.repeat(32), stub: STUB, kernel, initrd: [initrd], osrel: Buffer.from('ID=lamadist\nVERSION_ID=0.9\n'), hosts, db });
    const lastA = last.hosts[0]?.ukis.a as Buffer;
    const info = inspectUki(boot.templates.b);
    const linux = info.sections.find((x) => x.name === '.linux');
    expect(linux?.fileOffset).toBeGreaterThan(0);
    expect(linux?.fileOffset).toBe(inspectUki(lastA).sections.find((x) => x.name === '.linux')?.fileOffset);
    const spoiled = path.join(tmp, 'spoiled.tar');
    await fs.copyFile(tar, spoiled);
    const member = tarMemberOffset(await fs.readFile(spoiled), 'lamadist-b.efi');
    const fh = await fs.open(spoiled, 'r+');
    await fh.write(Buffer.alloc(1 << 20, 0xee), 0, 1 << 20, member + (linux?.fileOffset ?? 0) + 8192);
    await fh.close();
    const seed = path.join(tmp, 'seed-a.efi');
    await fs.writeFile(seed, lastA);
    const s2 = inNs(`mkdir -p '${esp}/EFI/Linux' && cp '${seed}' '${esp}/EFI/Linux/lamadist-a.efi' && '${hook}' slot-install`, { ...env, RAUC_IMAGE_NAME: spoiled });
    expect(s2.code, s2.out).toBe(0);
    const fetched = Number(/: (\d+) of \d+ blocks from the bundle/.exec(s2.out)?.[1]);
    expect(fetched).toBeGreaterThan(0);
    expect(fetched).toBeLessThanOrEqual(4);
    expect((await fs.readFile(path.join(out, 'EFI/Linux/lamadist-b.efi'))).equals(h.ukis.b)).toBe(true);
    expect((await fs.readFile(path.join(out, 'EFI/Linux/lamadist-a.efi'))).equals(lastA)).toBe(true);

    const unknown = inNs(`'${hook}' slot-install`, { ...env, RAUC_SLOT_NAME: 'efi.7' });
    expect(unknown.out).toMatch(/unknown efi slot efi\.7/);
    expect(sh(hook, ['slot-install'], env).out).toMatch(/the ESP is not mounted/);
  });
});

describe('release bundles', () => {
  let rootfs: string;
  let verity: string;
  let rootHash: string;
  beforeAll(async () => {
    const tree = path.join(tmp, 'tree');
    await fs.mkdir(path.join(tree, 'usr/lib'), { recursive: true });
    await fs.writeFile(path.join(tree, 'usr/lib/os-release'), 'ID=lamadist\nVERSION_ID=1\n');
    rootfs = path.join(tmp, 'rootfs.img');
    const sb = await buildErofs({ source: tree, out: rootfs, uuid: '6a1d2e8c-5a4f-4b1e-9c3d-1f2e3d4c5b6a', timestamp: 0 });
    verity = path.join(tmp, 'verity.img');
    const v = await formatVerity({ dataPath: rootfs, dataBlocks: sb.bytes / 4096, hashPath: verity, salt: Buffer.alloc(32, 7), uuid: '1b2c3d4e-5f60-4172-8394-a5b6c7d8e9f0' });
    rootHash = v.rootHash.toString('hex');
  });

  const release = async (n: number, out: string) =>
    createRelease({
      out,
      bsp,
      rootHash,
      stub: STUB,
      kernel,
      initrd: [initrd],
      hosts: Array.from({ length: n }, (_, i) => host(i + 1)),
      db,
      version: '1.0',
      rootfs,
      verity,
      signer: { certPem: await fs.readFile(path.join(keys, 'rauc-signing.crt'), 'utf8'), keyPem: await fs.readFile(path.join(keys, 'rauc-signing.key'), 'utf8') },
      signingTime: new Date('2026-01-01T00:00:00Z'),
    });

  it('one bundle for 10 hosts is at most a few KiB per host larger than for 1, and rauc accepts it', async () => {
    const one = await release(1, path.join(tmp, 'one.raucb'));
    const ten = await release(10, path.join(tmp, 'ten.raucb'));
    expect(ten.hosts).toHaveLength(10);
    console.log(`release bundle: 1 host ${one.size} bytes, 10 hosts ${ten.size} bytes (+${Math.round((ten.size - one.size) / 9)} bytes per host); patch per host ${ten.hosts[0]?.patchBytes} bytes for both slots`);
    expect(ten.size - one.size).toBeLessThan(10 * 1024 * 1024);
    expect((ten.size - one.size) / 9).toBeLessThan(64 * 1024);
    expect(ten.manifest.installCheck).toBe(true);
    const info = await inspectBundle(ten.path, { keyring: path.join(keys, 'rauc-ca.crt') });
    expect(info.payloadVerified).toBe(true);
    // The device's system.conf checks the signer's code-signing purpose, as meta-lamadist's does.
    const conf = path.join(tmp, 'system.conf');
    await fs.writeFile(conf, `[system]\ncompatible=${bsp.compatible}\nbootloader=noop\n[keyring]\npath=${keys}/rauc-ca.crt\ncheck-purpose=codesign\n[slot.rootfs.0]\ndevice=/dev/null\n`);
    const r = sh('rauc', ['info', '--conf', conf, '--keyring', path.join(keys, 'rauc-ca.crt'), ten.path]);
    expect(r.code, r.out).toBe(0);
    expect(r.out).toMatch(/Hooks:\s+'install-check'/);
    const x = path.join(tmp, 'extracted');
    expect(sh('rauc', ['extract', '--conf', conf, '--keyring', path.join(keys, 'rauc-ca.crt'), ten.path, x]).code).toBe(0);
    expect((await fs.readdir(path.join(x, 'hosts'))).sort()).toEqual(Array.from({ length: 10 }, (_, i) => mid(i + 1)));
    expect((await fs.readFile(path.join(x, `hosts/${mid(3)}/cmdline-b`), 'utf8')).trim()).toBe(`roothash=${rootHash} lamadist.slot=b rauc.slot=B ${bsp.console} rw systemd.hostname=node3 systemd.machine_id=${mid(3)}`);
  }, 120_000);

  it('lamadist release create builds it from the inventory and refuses a root hash the image does not have', async () => {
    const inventory = path.join(tmp, 'hosts.yaml');
    await addHost(inventory, { name: 'alpha', ip: 'dhcp' });
    await addHost(inventory, { name: 'beta' });
    await addHost(inventory, { name: 'gamma', bsp: 'rk1' });
    await fs.writeFile(path.join(tmp, 'kernel'), kernel);
    await fs.writeFile(path.join(tmp, 'initrd'), initrd);
    const args = (out: string, hash: string): string[] =>
      ['release', 'create', '-o', out, '--bsp', 'x86_64', '--version', '2.0', '--rootfs', rootfs, '--verity', verity, '--root-hash', hash, '--kernel', path.join(tmp, 'kernel'), '--initrd', path.join(tmp, 'initrd'), '--inventory', inventory, '--keys', keys, '--json'];
    const out = path.join(tmp, 'cli.raucb');
    const r = await runCli(args(out, rootHash));
    expect(r.code, r.stderr).toBe(0);
    const created = JSON.parse(r.stdout) as { hosts: { name: string }[]; manifest: { version: string } };
    // Only the BSP's hosts: the rk1 board gets its own release.
    expect(created.hosts.map((h) => h.name)).toEqual(['alpha', 'beta']);
    expect(created.manifest.version).toBe('2.0');
    const shown = await runCli(['release', 'show', out, '--keys', keys, '--json']);
    expect(shown.code, shown.stderr).toBe(0);
    const show = JSON.parse(shown.stdout) as { version: string; rootHash: string; hosts: { name: string; patchBytes: number }[] };
    expect([show.version, show.rootHash]).toEqual(['2.0', rootHash]);
    expect(show.hosts.map((h) => h.name).sort()).toEqual(['alpha', 'beta']);
    expect(show.hosts.every((h) => h.patchBytes > 0)).toBe(true);
    const bad = path.join(tmp, 'bad.raucb');
    const wrong = await runCli(args(bad, 'cd'.repeat(32)));
    expect(wrong.code).toBe(2);
    expect(wrong.stderr.trim().split('\n')).toHaveLength(1);
    expect(wrong.stderr).toMatch(/LAMA_E_VERITY_MISMATCH/);
    expect(existsSync(bad)).toBe(false);
  }, 120_000);
});
