import { spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { getBsp } from '../../src/bsp/index.js';
import { addHost, loadInventory } from '../../src/host/index.js';
import { initKeys } from '../../src/keys/index.js';
import { authenticodeDigest } from '../../src/pe/index.js';
import {
  BUNDLE_HOOK,
  UKI_BLOCK,
  UKI_BLOCKS_DIR,
  applyUkiPatch,
  blockIndex,
  efiTarMembers,
  parsePatch,
  planHostCmdlines,
  releaseBootFiles,
  releaseHosts,
  type ReleaseBoot,
} from '../../src/release/index.js';
import { ALIGNED_SQUASHFS_ARGS, alignPayload } from '../../src/rauc/index.js';
import { inspectUki } from '../../src/uki/index.js';
import { REPO_ROOT } from '../helpers/cli.js';
import { skipBecause } from '../helpers/skip.js';
import { STUB } from '../uki/helpers.js';

// meta-lamadist's Yocto path (lib/lamadist/uki.py and release.py, run here outside BitBake) must
// make the same release as the toolkit (src/release) from the same inputs: the same template
// UKIs, and per host a patch in the toolkit's format that rebuilds a signed UKI with the same
// command line, which the real bundle hook installs.

const LIB = path.join(REPO_ROOT, 'meta-lamadist/lib');
const bsp = getBsp('x86_64');
const ROOT_HASH = 'cd'.repeat(32);
const SLOTS = ['a', 'b'] as const;

function sh(cmd: string, args: string[], env: NodeJS.ProcessEnv = {}): { code: number; out: string } {
  const r = spawnSync(cmd, args, { encoding: 'utf8', env: { ...process.env, ...env }, timeout: 120_000 });
  return { code: r.status ?? 128, out: `${r.stdout ?? ''}${r.stderr ?? ''}` };
}
// The interpreter python3 names, called directly: a version manager's shim costs seconds a call.
const PYTHON =
  spawnSync('python3', ['-c', 'import sys; print(sys.executable)'], { encoding: 'utf8' }).stdout.trim() ||
  'python3';
const py = (mod: string, args: string[], flags: string[] = []): { code: number; out: string } =>
  sh(PYTHON, [...flags, '-m', `lamadist.${mod}`, ...args], { PYTHONPATH: LIB, PYTHONDONTWRITEBYTECODE: '1' });

/** Python code run with meta-lamadist/lib on the path (sys.argv[1:] = args). */
const pyCall = (code: string, args: string[] = []): { code: number; out: string } =>
  sh(PYTHON, ['-c', code, ...args], { PYTHONPATH: LIB, PYTHONDONTWRITEBYTECODE: '1' });

/** meta-lamadist's uki.py: a UKI from this test's stub, kernel, initrd and os-release. */
const pyUki = (cmdline: string, out: string): { code: number; out: string } =>
  py('uki', ['--stub', STUB, '--linux', kernel, '--initrd', initrd, '--osrel', osrel, '--cmdline', cmdline, '--out', out]);

/** meta-lamadist's release.py over this test's templates and db key. */
const pyRelease = (hosts: string, out: string, extra: string[] = [], flags?: string[]): { code: number; out: string } =>
  py('release', ['--templates', efiTar, '--hosts', hosts, '--db-key', path.join(keys, 'db.key'), '--db-cert', path.join(keys, 'db.crt'), '--out', out, ...extra], flags);

let tmp: string;
let keys: string;
let inventory: string;
let kernel: string;
let initrd: string;
let osrel: string;
let boot: ReleaseBoot;
const pyTemplates = {} as Record<'a' | 'b', Buffer>;
let efiTar: string;
let pyOut: string;

const haveTools = existsSync(STUB) && sh('sh', ['-c', 'command -v sbsign && command -v sbverify']).code === 0;

beforeAll(async () => {
  if (!haveTools) return;
  tmp = await fs.mkdtemp(path.join(os.tmpdir(), 'lamadist-release-py-'));
  keys = path.join(tmp, 'keys');
  await initKeys(keys);
  inventory = path.join(tmp, 'hosts.yaml');
  // The installer's keys (SMBIOS UUID, MACs) ride along: release.py accepts and ignores them.
  await addHost(inventory, { name: 'dyn1', ip: 'dhcp', smbiosUuid: '4c414d41-0000-4000-8000-000000000001', macs: ['52:54:00:00:00:01', '52:54:00:00:00:02'] });
  await addHost(inventory, {
    name: 'static1',
    ip: { address: '192.0.2.10/24', gateway: '192.0.2.1', interface: 'eth0', dns: ['192.0.2.1'] },
    kernelArgs: ['quiet'],
  });
  // A raw ip= value the inventory normalises (the empty trailing field is dropped).
  await addHost(inventory, { name: 'raw1', ip: '192.0.2.30::192.0.2.1:255.255.255.0::eth0:off:' });
  kernel = path.join(tmp, 'vmlinuz');
  initrd = path.join(tmp, 'initrd');
  osrel = path.join(tmp, 'os-release');
  await fs.writeFile(kernel, randomBytes(3 << 20));
  await fs.writeFile(initrd, randomBytes(1 << 20));
  await fs.writeFile(osrel, 'ID=lamadist\nVERSION_ID=1\n');
  const db = {
    certPem: await fs.readFile(path.join(keys, 'db.crt')),
    keyPem: await fs.readFile(path.join(keys, 'db.key')),
  };
  const hosts = releaseHosts((await loadInventory(inventory)).hosts);
  boot = await releaseBootFiles({
    bsp,
    rootHash: ROOT_HASH,
    stub: STUB,
    kernel,
    initrd: [initrd],
    osrel,
    hosts,
    db,
  });

  // The Yocto path: template UKIs with the release's command line, their tar, the hosts' files.
  const plan = planHostCmdlines(bsp, ROOT_HASH, hosts);
  const dir = path.join(tmp, 'templates');
  await fs.mkdir(dir);
  for (const slot of SLOTS) {
    const out = path.join(dir, `lamadist-${slot}.efi`);
    const r = pyUki(plan.template[slot], out);
    if (r.code !== 0) throw new Error(r.out);
    pyTemplates[slot] = await fs.readFile(out);
  }
  efiTar = path.join(tmp, 'efi.tar');
  // lamadist-image.bbclass's efi image: write_templates, from the same templates.
  const t = pyCall(
    `import sys; from lamadist import release; release.write_templates(sys.argv[1], {s: open('${dir}/lamadist-%s.efi' % s, 'rb').read() for s in release.SLOTS}, 0)`,
    [efiTar],
  );
  if (t.code !== 0) throw new Error(t.out);
  pyOut = path.join(tmp, 'py');
  const r = pyRelease(inventory, pyOut, ['--ukis', path.join(tmp, 'py-ukis')]);
  if (r.code !== 0) throw new Error(r.out);
}, 180_000);
afterAll(async () => {
  if (tmp) await fs.rm(tmp, { recursive: true, force: true });
});

const files = async (
  machineId: string,
  slot: 'a' | 'b',
): Promise<{ cmdline: string; map: string; bin: Buffer }> => {
  const dir = path.join(pyOut, 'hosts', machineId);
  return {
    cmdline: await fs.readFile(path.join(dir, `cmdline-${slot}`), 'utf8'),
    map: await fs.readFile(path.join(dir, `uki-${slot}.map`), 'utf8'),
    bin: await fs.readFile(path.join(dir, `uki-${slot}.bin`)),
  };
};

describe.skipIf(
  skipBecause(
    !haveTools,
    'Yocto release path test',
    `needs ${STUB} (systemd-boot-efi) and sbsign/sbverify (sbsigntool)`,
  ),
)('the Yocto path (lib/lamadist) makes the toolkit release', () => {
  it('template UKIs: the same sections at the same offsets and addresses, byte for byte', () => {
    for (const slot of SLOTS) {
      expect(inspectUki(pyTemplates[slot]).sections).toEqual(inspectUki(boot.templates[slot]).sections);
      expect(pyTemplates[slot].equals(boot.templates[slot])).toBe(true);
    }
    const cmdline = inspectUki(pyTemplates.a).sections.find((s) => s.name === '.cmdline');
    expect(cmdline?.rawSize).toBe(4096);
  });

  it('sections after .cmdline stay where they are whatever the command line', async () => {
    const out = path.join(tmp, 'long.efi');
    const r = pyUki('x'.repeat(4000), out);
    expect(r).toEqual({ code: 0, out: '' });
    const long = inspectUki(await fs.readFile(out));
    const short = inspectUki(pyTemplates.a);
    expect(long.sections.map((s) => [s.name, s.fileOffset, s.virtualAddress])).toEqual(
      short.sections.map((s) => [s.name, s.fileOffset, s.virtualAddress]),
    );
    expect(long.cmdline).toBe('x'.repeat(4000));
    const over = py('uki', [
      '--stub',
      STUB,
      '--linux',
      kernel,
      '--cmdline',
      'x'.repeat(4097),
      '--out',
      path.join(tmp, 'over.efi'),
    ]);
    expect(over).toEqual({
      code: 2,
      out: 'lamadist.uki: error: kernel command line is 4097 bytes, more than the 4096 a UKI sets aside\n',
    });
    expect(existsSync(path.join(tmp, 'over.efi'))).toBe(false);
  });

  it("every host's patch parses with the toolkit, rebuilds a UKI sbverify accepts, with the toolkit's command line and signed image", async () => {
    expect((await fs.readdir(path.join(pyOut, 'hosts'))).sort()).toEqual(
      boot.hosts.map((h) => h.host.machineId).sort(),
    );
    // The template's block index the hook seeds from: the toolkit's bytes.
    for (const slot of SLOTS) {
      expect((await fs.readFile(path.join(pyOut, UKI_BLOCKS_DIR, `lamadist-${slot}.blocks`))).equals(blockIndex(boot.templates[slot])), slot).toBe(true);
    }
    for (const h of boot.hosts) {
      for (const slot of SLOTS) {
        const f = await files(h.host.machineId, slot);
        const where = `${h.host.name} slot ${slot}`;
        expect(f.cmdline, where).toBe(h.files[`hosts/${h.host.machineId}/cmdline-${slot}`]?.toString());
        const rebuilt = applyUkiPatch(boot.templates[slot], parsePatch(f.map, f.bin, where), where);
        expect(inspectUki(rebuilt).cmdline, where).toBe(inspectUki(h.ukis[slot]).cmdline);
        // Both paths signed the same image: only the signatures' bytes may differ.
        expect(authenticodeDigest(rebuilt).equals(authenticodeDigest(h.ukis[slot])), where).toBe(true);
        expect(
          rebuilt.equals(await fs.readFile(path.join(tmp, 'py-ukis', h.host.name, `lamadist-${slot}.efi`))),
          where,
        ).toBe(true);
        const file = path.join(tmp, `${h.host.name}-${slot}.efi`);
        await fs.writeFile(file, rebuilt);
        expect(sh('sbverify', ['--cert', path.join(keys, 'db.crt'), file]).out, where).toMatch(
          /Signature verification OK/,
        );
        expect(f.bin.length, where).toBeLessThan(16 * 1024);
      }
    }
    const dyn = boot.hosts.find((h) => h.host.name === 'dyn1');
    const raw = boot.hosts.find((h) => h.host.name === 'raw1');
    expect((await files(dyn?.host.machineId ?? '', 'b')).cmdline).toMatch(/ ip=dhcp\n$/);
    expect((await files(raw?.host.machineId ?? '', 'a')).cmdline).toMatch(
      / ip=192\.0\.2\.30::192\.0\.2\.1:255\.255\.255\.0::eth0:off\n$/,
    );
  });

  describe("meta-lamadist's bundle hook on the Yocto path's files", () => {
    let mount: string;
    let hook: string;
    const compat = { RAUC_MF_COMPATIBLE: bsp.compatible, RAUC_SYSTEM_COMPATIBLE: bsp.compatible };
    const running = (h: ReleaseBoot['hosts'][number]): string => inspectUki(h.ukis.a).cmdline as string;
    beforeAll(async () => {
      // Laid out like the mounted bundle: RAUC runs the hook as hook.sh from the bundle's root.
      mount = path.join(tmp, 'bundle');
      await fs.mkdir(mount);
      for (const d of ['hosts', UKI_BLOCKS_DIR]) await fs.cp(path.join(pyOut, d), path.join(mount, d), { recursive: true });
      await fs.copyFile(efiTar, path.join(mount, 'efi.tar'));
      hook = path.join(mount, 'hook.sh');
      await fs.copyFile(BUNDLE_HOOK, hook);
    });

    const check = async (cmdline: string): Promise<{ code: number; out: string }> => {
      const f = path.join(tmp, 'cmdline');
      await fs.writeFile(f, `${cmdline}\n`);
      return sh(hook, ['install-check'], { ...compat, LAMADIST_CMDLINE: f });
    };

    it('install-check accepts every host and refuses one the release lacks', async () => {
      for (const h of boot.hosts) expect(await check(running(h)), h.host.name).toEqual({ code: 0, out: '' });
      const h = boot.hosts[0] as ReleaseBoot['hosts'][number];
      const stranger = running(h).replaceAll(h.host.machineId, 'f'.repeat(32));
      expect(await check(stranger)).toEqual({
        code: 10,
        out: `lamadist-bundle-hook: host ${'f'.repeat(32)} (${h.host.name}) is not in this release\n`,
      });
    });

    const canUnshare = sh('unshare', ['--mount', 'true']).code === 0;
    it.skipIf(
      skipBecause(
        !canUnshare,
        'bundle hook slot-install on the Yocto files',
        'unshare --mount is not permitted here (it needs a private tmpfs ESP)',
      ),
    )(
      "slot-install writes each host's signed UKI for the target slot, with the toolkit's command line",
      async () => {
        const esp = path.join(tmp, 'esp');
        await fs.mkdir(esp, { recursive: true });
        // Every host once, the slots taken in turn.
        for (const [i, h] of boot.hosts.entries()) {
          const slot = SLOTS[i % 2] as 'a' | 'b';
          const cmdline = path.join(tmp, 'running');
          await fs.writeFile(cmdline, running(h));
          const out = path.join(tmp, `esp-${h.host.name}-${slot}.efi`);
          const env = {
            RAUC_SLOT_CLASS: 'efi',
            RAUC_SLOT_NAME: slot === 'a' ? 'efi.0' : 'efi.1',
            RAUC_IMAGE_NAME: path.join(mount, 'efi.tar'),
            LAMADIST_ESP: esp,
            LAMADIST_CMDLINE: cmdline,
          };
          const r = sh(
            'unshare',
            [
              '--mount',
              'sh',
              '-c',
              `mount -t tmpfs tmpfs '${esp}' && '${hook}' slot-install && cp '${esp}/EFI/Linux/lamadist-${slot}.efi' '${out}'`,
            ],
            env,
          );
          // An empty ESP: the whole template comes from tarfile's tar, found by its headers.
          expect(r, `${h.host.name} slot ${slot}`).toEqual({ code: 0, out: expect.stringMatching(/^lamadist-bundle-hook: UKI of slot [ab]: (\d+) of \1 blocks from the bundle/) });
          const installed = await fs.readFile(out);
          expect(
            installed.equals(
              await fs.readFile(path.join(tmp, 'py-ukis', h.host.name, `lamadist-${slot}.efi`)),
            ),
          ).toBe(true);
          expect(inspectUki(installed).cmdline).toBe(inspectUki(h.ukis[slot]).cmdline);
          expect(sh('sbverify', ['--cert', path.join(keys, 'db.crt'), out]).out).toMatch(
            /Signature verification OK/,
          );
        }
      },
      120_000,
    );
  });

  it("the efi image: each template UKI on a 16 KiB boundary (GNU tar's block numbers), the toolkit's members", () => {
    const listing = sh('tar', ['-tvRf', efiTar]);
    expect(listing.code).toBe(0);
    const at = new Map([...listing.out.matchAll(/^block (\d+): \S+ \S+\s+(\d+) \S+ \S+ (\S+)$/gm)].map((m) => [m[3], { data: (Number(m[1]) + 1) * 512, size: Number(m[2]) }]));
    for (const slot of SLOTS) {
      expect((at.get(`lamadist-${slot}.efi`)?.data as number) % UKI_BLOCK, slot).toBe(0);
    }
    const members = efiTarMembers({ a: pyTemplates.a.length, b: pyTemplates.b.length });
    expect([...at].map(([name, m]) => ({ name, size: m.size }))).toEqual(members);
  });

  it('align_bundle: rauc bundle puts every image on a 4 KiB boundary, where the toolkit plans it', async () => {
    const dir = path.join(tmp, 'align');
    const content = path.join(dir, 'content');
    await fs.mkdir(content, { recursive: true });
    const images = [
      { slot: 'verity', name: 'lama.verity', size: 5 * 4096 },
      { slot: 'rootfs', name: 'lama.erofs', size: 37 * 4096 },
      { slot: 'efi', name: 'lama.ukis.tar', size: 50 * 512 },
    ];
    let manifest = `[update]\ncompatible=${bsp.compatible}\nversion=1\n\n[bundle]\nformat=verity\n`;
    for (const img of images) {
      await fs.writeFile(path.join(content, img.name), randomBytes(img.size));
      manifest += `\n[image.${img.slot}]\nfilename=${img.name}\n`;
    }
    await fs.writeFile(path.join(content, 'manifest.raucm'), manifest);
    const sort = path.join(dir, 'bundle.sort');
    const r = pyCall(
      'import json, sys; from lamadist import release; print(json.dumps(release.align_bundle(sys.argv[1], sys.argv[3:], sys.argv[2])))',
      [content, sort, ...images.map((i) => i.name)],
    );
    expect(r.code, r.out).toBe(0);
    const placed = JSON.parse(r.out) as [string, number][];
    expect(placed.map(([name, offset]) => ({ name, offset }))).toEqual(alignPayload(images).placed.map(({ name, offset }) => ({ name, offset })));
    expect(await fs.readFile(sort, 'utf8')).toBe(alignPayload(images).sortFile);
    const bundle = path.join(dir, 'b.raucb');
    const made = sh('rauc', [
      'bundle',
      `--cert=${path.join(keys, 'rauc-signing.crt')}`,
      `--key=${path.join(keys, 'rauc-signing.key')}`,
      `--mksquashfs-args=-b 16384 ${ALIGNED_SQUASHFS_ARGS.join(' ')} -sort ${sort}`,
      content,
      bundle,
    ]);
    expect(made.code, made.out).toBe(0);
    const data = await fs.readFile(bundle);
    for (const [name, offset] of placed) {
      expect(offset % 4096, name).toBe(0);
      const img = await fs.readFile(path.join(content, name));
      expect(data.subarray(offset, offset + img.length).equals(img), name).toBe(true);
    }
  });

  describe('bad input: one line, exit 2, the place, no output', () => {
    const release = (hosts: string, out: string, flags?: string[]): { code: number; out: string } => pyRelease(hosts, out, [], flags);

    it('a bad ip, a duplicate machine-id, an inventory without hosts', async () => {
      const cases: [string, string][] = [
        [
          'hosts:\n  n1:\n    machine-id: 4f6c0a9e1d2b4c3e8a7f6b5c4d3e2f1a\n    ip: { address: 192.0.2.10/33 }\n',
          ":4:9: address '192.0.2.10/33' must be IPv4/prefix, e.g. 192.168.1.10/24",
        ],
        [
          'hosts:\n  n1:\n    machine-id: 4f6c0a9e1d2b4c3e8a7f6b5c4d3e2f1a\n  n2:\n    machine-id: 4f6c0a9e1d2b4c3e8a7f6b5c4d3e2f1a\n',
          ':5:17: host n2 has the same machine-id as host n1',
        ],
        [
          'hosts:\n  n1:\n    machine-id: 4f6c0a9e1d2b4c3e8a7f6b5c4d3e2f1a\n    kernel-args: [quiet, systemd.hostname=x]\n',
          ':4:26: host n1: kernel-args must not set systemd.hostname= (it comes from the inventory and the slot)',
        ],
        ['hosts: {}\n', ' lists no hosts: a release without hosts would be refused by every device'],
      ];
      for (const [i, [text, message]] of cases.entries()) {
        const file = path.join(tmp, `bad-${i}.yaml`);
        await fs.writeFile(file, text);
        const out = path.join(tmp, `bad-out-${i}`);
        expect(release(file, out)).toEqual({ code: 2, out: `lamadist.release: error: ${file}${message}\n` });
        expect(existsSync(path.join(out, 'hosts'))).toBe(false);
        expect(existsSync(out) ? await fs.readdir(out) : []).toEqual([]);
      }
    });

    it('an efi image without both templates', async () => {
      const tar = path.join(tmp, 'one.tar');
      expect(sh('tar', ['-cf', tar, '-C', path.join(tmp, 'templates'), 'lamadist-a.efi']).code).toBe(0);
      const out = path.join(tmp, 'one-out');
      const r = py('release', [
        '--templates',
        tar,
        '--hosts',
        inventory,
        '--db-key',
        path.join(keys, 'db.key'),
        '--db-cert',
        path.join(keys, 'db.crt'),
        '--out',
        out,
      ]);
      expect(r).toEqual({
        code: 2,
        out: `lamadist.release: error: ${tar} has no file lamadist-b.efi (the efi image must hold both template UKIs)\n`,
      });
      expect(existsSync(out)).toBe(false);
    });

    it('reads hosts.yaml as YAML 1.2, as the toolkit does: `ip: off` is the word off, not false', async () => {
      const file = path.join(tmp, 'off.yaml');
      await fs.writeFile(
        file,
        'hosts:\n  n1:\n    machine-id: 4f6c0a9e1d2b4c3e8a7f6b5c4d3e2f1a\n    ip: off\n',
      );
      const [host] = releaseHosts((await loadInventory(file)).hosts);
      const out = path.join(tmp, 'off-out');
      expect(release(file, out).code).toBe(0);
      const line = await fs.readFile(
        path.join(out, 'hosts/4f6c0a9e1d2b4c3e8a7f6b5c4d3e2f1a/cmdline-a'),
        'utf8',
      );
      expect(line).toBe(`${planHostCmdlines(bsp, ROOT_HASH, host ? [host] : []).hosts[0]?.cmdline.a}\n`);
      expect(line).toMatch(/ ip=off\n$/);
    });

    it('says so when PyYAML is missing (python3 -S leaves site-packages out)', () => {
      const r = release(inventory, path.join(tmp, 'no-yaml'), ['-S']);
      expect(r.code).toBe(2);
      expect(r.out).toMatch(
        /^lamadist\.release: error: reading .*hosts\.yaml needs PyYAML \(python3-yaml; kas depends on it\), which this Python .* lacks\n$/,
      );
    });
  });
});
