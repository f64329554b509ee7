import { spawnSync } from 'node:child_process';
import { existsSync, promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { BSPS } from '../../src/bsp/index.js';
import { runChecks } from '../../src/check/index.js';
import { KAS_PROJECT_SCHEMA } from '../../src/kas/index.js';
import { parseBbConf, parseIni } from '../../src/check/parsers.js';
import { REPO_ROOT } from '../helpers/cli.js';
import { skipBecause } from '../helpers/skip.js';

const LAYER = path.join(REPO_ROOT, 'meta-lamadist');

function sh(cmd: string, args: string[], opts: { cwd?: string; env?: NodeJS.ProcessEnv; input?: string } = {}): { code: number; out: string } {
  const r = spawnSync(cmd, args, { cwd: opts.cwd ?? REPO_ROOT, env: { ...process.env, ...opts.env }, input: opts.input, encoding: 'utf8', timeout: 120_000 });
  return { code: r.status ?? 128, out: `${r.stdout ?? ''}${r.stderr ?? ''}` };
}

function have(tool: string): boolean {
  return sh('sh', ['-c', `command -v ${tool}`]).code === 0;
}

let tmp: string;
beforeAll(async () => {
  tmp = await fs.mkdtemp(path.join(os.tmpdir(), 'lamadist-distro-'));
});
afterAll(async () => {
  await fs.rm(tmp, { recursive: true, force: true });
});

describe('lamadist check on the distribution definition', () => {
  it('finds no problem in kas, layers, machines, wks templates or RAUC system.conf', async () => {
    const report = await runChecks({ root: REPO_ROOT, kasSchema: KAS_PROJECT_SCHEMA });
    expect(report.problems.map((p) => `${p.where}: ${p.message} [${p.code}]`)).toEqual([]);
    expect(report.checked.machines).toBe(BSPS.length);
    expect(report.checked.wks).toBe(3);
    expect(report.checked.systemConfs).toBe(2);
  });
});

describe('RAUC system.conf per family', () => {
  const families = ['efi', 'uboot'] as const;
  const conf = (f: string): string => path.join(LAYER, 'recipes-core/rauc/files', f, 'system.conf');

  for (const family of families) {
    it.skipIf(skipBecause(!have('rauc'), `RAUC loads the ${family} system.conf`, 'no rauc (Debian package rauc)'))(`${family}: RAUC itself loads the configuration`, () => {
      // `rauc info` loads the system configuration first; a bad key or value fails there, before
      // it ever looks at the (missing) bundle.
      const r = sh('rauc', [`--conf=${conf(family)}`, 'info', path.join(tmp, 'missing.raucb')]);
      expect(r.out).not.toMatch(/Failed to (initialize context|load system config)/);
      expect(r.out).toMatch(/missing\.raucb/);
    });

    it(`${family}: slot pairs target the LUKS mappers and the verity partitions`, async () => {
      const { sections, issues } = parseIni(await fs.readFile(conf(family), 'utf8'));
      expect(issues).toEqual([]);
      const get = (s: string, k: string): string | undefined => sections.find((x) => x.name === s)?.keys.get(k)?.value;
      expect(get('system', 'bootloader')).toBe(family === 'efi' ? 'efi' : 'uboot');
      expect(get('system', 'data-directory')).toBe('/var/lib/rauc');
      expect(get('keyring', 'path')).toBe('/etc/rauc/keyring.pem');
      expect(get('slot.rootfs.0', 'device')).toBe('/dev/mapper/rootfs_a');
      expect(get('slot.rootfs.1', 'device')).toBe('/dev/mapper/rootfs_b');
      expect(get('slot.verity.0', 'device')).toBe('/dev/disk/by-partlabel/verity_a');
      expect(get('slot.verity.1', 'device')).toBe('/dev/disk/by-partlabel/verity_b');
      expect(get('slot.verity.0', 'parent')).toBe('rootfs.0');
      expect(get('slot.efi.1', 'parent')).toBe('rootfs.1');
      expect([get('slot.rootfs.0', 'bootname'), get('slot.rootfs.1', 'bootname')]).toEqual(['A', 'B']);
    });
  }

  it.skipIf(skipBecause(!have('rauc'), 'RAUC rejects a broken system.conf', 'no rauc (Debian package rauc)'))('rauc rejects a broken configuration (the load check can fail)', () => {
    const bad = path.join(tmp, 'bad.conf');
    spawnSync('sh', ['-c', `sed 's/^bootloader=efi/bootloader=grubby/' '${conf('efi')}' > '${bad}'`]);
    expect(sh('rauc', [`--conf=${bad}`, 'info', path.join(tmp, 'missing.raucb')]).out).toMatch(/Failed to (initialize context|load system config)/);
  });
});

describe('on-target scripts', () => {
  const scripts = [
    'recipes-core/lamadist-boot/files/lamadist-init',
    'recipes-core/lamadist-boot/files/lamadist-enroll',
    'recipes-core/lamadist-health/files/lamadist-health',
    'recipes-core/lamadist-installer/files/lamadist-install',
    'recipes-core/lamadist-installer/files/lamadist-secureboot-enroll',
    'recipes-core/lamadist-grow-var/files/lamadist-grow-var',
    'recipes-core/lamadist-attest/files/lamadist-attest',
    'dynamic-layers/rauc/recipes-core/bundles/files/lamadist-bundle-hook',
  ];
  const shells = [
    ['dash', ['-n']],
    ['busybox', ['sh', '-n']],
    ['bash', ['--posix', '-n']],
  ] as const;
  for (const s of scripts) {
    it(`${path.basename(s)} is POSIX sh that dash, busybox and bash accept`, async () => {
      const file = path.join(LAYER, s);
      expect((await fs.stat(file)).mode & 0o111).not.toBe(0);
      expect((await fs.readFile(file, 'utf8')).startsWith('#!/bin/sh\n')).toBe(true);
      for (const [shell, args] of shells) {
        if (!have(shell)) {
          console.warn(`skip: ${shell} -n ${path.basename(s)}: ${shell} is not installed`);
          continue;
        }
        const r = sh(shell, [...args, file]);
        expect(r.out, `${shell}: ${r.out}`).toBe('');
        expect(r.code).toBe(0);
      }
    });
  }
});

describe('UKI assembly (lib/lamadist/uki.py) on the systemd EFI stub', () => {
  const stub = '/usr/lib/systemd/boot/efi/linuxx64.efi.stub';
  const py = (args: string[]): { code: number; out: string } =>
    sh('python3', ['-m', 'lamadist.uki', ...args], { env: { PYTHONPATH: path.join(LAYER, 'lib') } });

  it.skipIf(skipBecause(!existsSync(stub) || !have('objdump'), 'UKI assembly test', `needs ${stub} (systemd-boot-efi) and objdump (binutils)`))('adds the UKI sections above the stub, in order, without overlap', async () => {
    const kernel = path.join(tmp, 'vmlinuz');
    const initrd = path.join(tmp, 'initrd');
    const osrel = path.join(tmp, 'os-release');
    await fs.writeFile(kernel, Buffer.alloc(3 * 1024 * 1024 + 17, 7));
    await fs.writeFile(initrd, Buffer.alloc(200_001, 3));
    await fs.writeFile(osrel, 'ID=lamadist\nNAME=LamaDist\n');
    const out = path.join(tmp, 'uki.efi');
    const cmdline = 'roothash=0123abcd lamadist.slot=b console=ttyS0,115200';
    const r = py(['--stub', stub, '--linux', kernel, '--initrd', initrd, '--osrel', osrel, '--uname', '6.6.0-lamadist', '--cmdline', cmdline, '--out', out]);
    expect(r.out).toBe('');
    expect(r.code).toBe(0);
    const dump = sh('objdump', ['-h', out]);
    expect(dump.out).toMatch(/file format pei-x86-64/);
    const sections = [...dump.out.matchAll(/^\s*\d+\s+(\S+)\s+([0-9a-f]+)\s+([0-9a-f]+)/gm)].map((m) => ({
      name: m[1] ?? '',
      size: parseInt(m[2] ?? '0', 16),
      vma: parseInt(m[3] ?? '0', 16),
    }));
    const names = sections.map((s) => s.name);
    expect(names.slice(-5)).toEqual(['.osrel', '.cmdline', '.uname', '.initrd', '.linux']);
    for (let i = 1; i < sections.length; i++) {
      const prev = sections[i - 1];
      const cur = sections[i];
      if (prev && cur) expect(cur.vma).toBeGreaterThanOrEqual(prev.vma + prev.size);
    }
    expect(sections.find((s) => s.name === '.linux')?.size).toBe(3 * 1024 * 1024 + 17);
    const cmd = sh('objcopy', ['-O', 'binary', '--only-section=.cmdline', out, path.join(tmp, 'cmdline.bin')]);
    expect(cmd.code).toBe(0);
    expect((await fs.readFile(path.join(tmp, 'cmdline.bin'), 'utf8')).trim()).toBe(cmdline);
  });

  it('refuses a stub that is not a PE file, with one error line', async () => {
    const fake = path.join(tmp, 'not-a-stub');
    await fs.writeFile(fake, 'hello');
    await fs.writeFile(path.join(tmp, 'k'), 'k');
    const r = py(['--stub', fake, '--linux', path.join(tmp, 'k'), '--out', path.join(tmp, 'x.efi')]);
    expect(r.code).toBe(2);
    expect(r.out.trim()).toBe('lamadist.uki: error: stub is not a PE file (no MZ header)');
    expect(existsSync(path.join(tmp, 'x.efi'))).toBe(false);
  });
});

describe('layer metadata', () => {
  const vars = async (file: string): Promise<Map<string, string>> =>
    new Map(parseBbConf(await fs.readFile(file, 'utf8')).map((a) => [a.name, a.value.trim()] as const));

  it('meta-lamadist: priority 50, depends on core only, scarthgap, and no machine configs', async () => {
    const v = await vars(path.join(LAYER, 'conf/layer.conf'));
    expect(v.get('BBFILE_PRIORITY_lamadist')).toBe('50');
    expect(v.get('LAYERDEPENDS_lamadist')).toBe('core');
    expect(v.get('LAYERSERIES_COMPAT_lamadist')).toBe('scarthgap');
    expect(existsSync(path.join(LAYER, 'conf/machine'))).toBe(false);
    expect(existsSync(path.join(LAYER, 'README.md'))).toBe(true);
  });

  it('every BSP machine lives in meta-lamadist-bsp and names its layout, RAUC family and compatible', async () => {
    for (const b of BSPS) {
      const file = path.join(REPO_ROOT, 'meta-lamadist-bsp/conf/machine', `${b.machine}.conf`);
      const text = await fs.readFile(file, 'utf8');
      const inc = b.boot === 'u-boot' ? await fs.readFile(path.join(REPO_ROOT, 'meta-lamadist-bsp/conf/machine/include/lamadist-rockchip.inc'), 'utf8') : text;
      expect(inc).toMatch(new RegExp(`^LAMADIST_LAYOUT = "${b.layout}"$`, 'm'));
      expect(inc).toMatch(new RegExp(`^LAMADIST_RAUC_FAMILY = "${b.raucFamily}"$`, 'm'));
      expect(text).toMatch(new RegExp(`^RAUC_COMPATIBLE = "${b.compatible}"$`, 'm'));
      expect(text).toMatch(new RegExp(`^LAMADIST_CONSOLE = "${b.console}"$`, 'm'));
    }
  });

  it('every distro policy point of the issue has its include', async () => {
    const dir = path.join(LAYER, 'conf/distro/include');
    const all = (await Promise.all((await fs.readdir(dir)).map((f) => fs.readFile(path.join(dir, f), 'utf8')))).join('\n');
    const points: [string, RegExp][] = [
      ['systemd init', /^INIT_MANAGER = "systemd"$/m],
      ['networkd/resolved/timesyncd', /networkd resolved .*timesyncd/],
      ['no connman/NetworkManager/sysvinit', /SKIP_RECIPE\[connman\][\s\S]*SKIP_RECIPE\[networkmanager\][\s\S]*SKIP_RECIPE\[sysvinit\]/],
      ['RPM', /^PACKAGE_CLASSES = "package_rpm"$/m],
      ['mandatory RPM signing', /^INHERIT \+= "sign_rpm"$/m],
      ['key from the environment', /^RPM_GPG_NAME = "\$\{LAMADIST_RPM_GPG_NAME\}"$/m],
      ['zstd 11', /^ZSTD_COMPRESSION_LEVEL = "-11"$/m],
      ['-Os', /^FULL_OPTIMIZATION = "-Os /m],
      ['reproducible', /^SOURCE_DATE_EPOCH_FALLBACK = "\d+"$/m],
      ['SPDX 3.0', /^INHERIT \+= "create-spdx-3.0"$/m],
      ['SELinux targeted enforcing', /^POLICY_TYPE = "targeted"$[\s\S]*^DEFAULT_ENFORCING = "enforcing"$/m],
      ['no AppArmor', /SKIP_RECIPE\[apparmor\]/],
      ['IMA', /\bima\b/],
      ['TPM2 and LUKS2 tooling', /cryptsetup[\s\S]*tpm2-tools/],
      ['k3s', /k3s/],
    ];
    expect(points.filter(([, re]) => !re.test(all)).map(([name]) => name)).toEqual([]);
  });
});
