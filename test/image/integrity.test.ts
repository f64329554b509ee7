// Root images carry SELinux labels and IMA signatures: built from a small tree of real ELF
// binaries, a shared library, a script and a data file, then read back through the kernel's own
// EROFS driver (loop mount) with getfattr, matchpathcon and evmctl as the judges.
import { execFileSync, spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { buildErofs } from '../../src/erofs/index.js';
import { IMA_CERT_PATH, IMA_POLICY_PATH, imaTargets, imaXattr, loadImaSigner, policyAppraises, setfattrRestore, type ImaSigner } from '../../src/ima/index.js';
import { buildRootErofs, type ImagePlan } from '../../src/image/index.js';
import { addImaKey, MANIFEST } from '../../src/keys/index.js';
import { REPO_ROOT, runCli } from '../helpers/cli.js';

const UUID = '3b8f0c2e-9d41-4e57-a6b3-7c2d1e0f9a85';
const REFPOLICY = '/etc/selinux/default/contexts/files/file_contexts';
const OWN_CONTEXTS = [
  '/.*\tsystem_u:object_r:default_t:s0',
  '/usr(/.*)?\tsystem_u:object_r:usr_t:s0',
  '/usr/bin(/.*)?\tsystem_u:object_r:bin_t:s0',
  '/usr/lib(/.*)?\tsystem_u:object_r:lib_t:s0',
  '/usr/lib/modules(/.*)?\tsystem_u:object_r:modules_object_t:s0',
  '/etc(/.*)?\tsystem_u:object_r:etc_t:s0',
  '',
].join('\n');

let dir: string;
let tree: string;
let keys: string;
let foreign: string;
let signer: ImaSigner;

/** Regular files of the test tree and whether they must be signed. */
const FILES: Record<string, boolean> = {
  'usr/bin/ls': true,
  'usr/bin/true': true,
  'usr/bin/true-again': true,
  'usr/bin/hello': true,
  'usr/bin/odd name\\x': true,
  'usr/lib/x86_64-linux-gnu/libz.so.1': true,
  'usr/lib/modules/6.1.0/kernel/fake.ko': true,
  'etc/motd': false,
};

async function keyDir(at: string): Promise<string> {
  await fs.mkdir(at, { recursive: true });
  await fs.writeFile(path.join(at, MANIFEST), JSON.stringify({ version: 1, created: new Date().toISOString(), owner: UUID, files: [] }));
  await addImaKey(at);
  return at;
}

function sh(cmd: string, args: string[]): { code: number; out: string; err: string } {
  const r = spawnSync(cmd, args, { encoding: 'utf8' });
  return { code: r.status ?? 128, out: r.stdout, err: r.stderr };
}

/** Run `fn` with `image` mounted read-only by the kernel's EROFS driver (optionally a partition of it). */
async function mounted<T>(image: string, fn: (root: string) => Promise<T> | T, part?: { offset: number; size: number }): Promise<T> {
  const mnt = await fs.mkdtemp(path.join(dir, 'mnt-'));
  const opts = ['ro', 'loop', ...(part ? [`offset=${part.offset}`, `sizelimit=${part.size}`] : [])].join(',');
  execFileSync('mount', ['-t', 'erofs', '-o', opts, image, mnt]);
  try {
    return await fn(mnt);
  } finally {
    execFileSync('umount', [mnt]);
    await fs.rmdir(mnt);
  }
}

function xattr(file: string, name: string): string | undefined {
  const r = spawnSync('getfattr', ['--absolute-names', '--only-values', '-n', name, file], { encoding: 'latin1' });
  return r.status === 0 ? r.stdout.replace(/\0$/, '') : undefined;
}

function expectedLabel(contexts: string, p: string, type: 'file' | 'dir'): string {
  return execFileSync('matchpathcon', ['-n', '-f', contexts, '-m', type, p], { encoding: 'utf8' }).trim();
}

const sha256 = async (f: string): Promise<string> => createHash('sha256').update(await fs.readFile(f)).digest('hex');

async function put(rel: string, data: Buffer | string, mode = 0o644): Promise<void> {
  await fs.mkdir(path.dirname(path.join(tree, rel)), { recursive: true });
  await fs.writeFile(path.join(tree, rel), data, { mode });
  await fs.chmod(path.join(tree, rel), mode);
}

beforeAll(async () => {
  dir = await fs.mkdtemp(path.join(os.tmpdir(), 'lamadist-integrity-'));
  tree = path.join(dir, 'tree');
  await put('usr/bin/ls', await fs.readFile('/usr/bin/ls'), 0o755);
  await put('usr/bin/true', await fs.readFile('/usr/bin/true'), 0o755);
  await fs.link(path.join(tree, 'usr/bin/true'), path.join(tree, 'usr/bin/true-again'));
  await put('usr/bin/hello', '#!/bin/sh\necho hello\n', 0o755);
  await put('usr/bin/odd name\\x', '#!/bin/sh\n', 0o700);
  // A shared library as distributions ship them: ELF, not executable.
  await put('usr/lib/x86_64-linux-gnu/libz.so.1', await fs.readFile(await fs.realpath('/usr/lib/x86_64-linux-gnu/libz.so.1')), 0o644);
  await put('usr/lib/modules/6.1.0/kernel/fake.ko', 'not really a module', 0o644);
  await put('etc/motd', 'welcome\n', 0o644);
  await fs.symlink('ls', path.join(tree, 'usr/bin/dir'));
  await fs.writeFile(path.join(dir, 'file_contexts'), OWN_CONTEXTS);
  keys = await keyDir(path.join(dir, 'keys'));
  foreign = await keyDir(path.join(dir, 'foreign'));
  signer = await loadImaSigner(keys);
}, 60_000);

afterAll(async () => {
  await fs.rm(dir, { recursive: true, force: true });
});

describe('which files are signed, and the signature format (pure)', () => {
  it('signs executables, ELF objects and kernel modules, nothing else', () => {
    expect(
      imaTargets([
        { path: 'b', mode: 0o100755, elf: false },
        { path: 'a.so', mode: 0o100644, elf: true },
        { path: 'm.ko.xz', mode: 0o100644, elf: false },
        { path: 'd.txt', mode: 0o100644, elf: false },
        { path: 'x', mode: 0o100700, elf: false },
      ]),
    ).toEqual(['a.so', 'b', 'm.ko.xz', 'x']);
  });

  it('writes type 3, version 2, SHA-256, the key id and a big-endian size before the signature', () => {
    const v = imaXattr(Buffer.from('a1b2c3d4', 'hex'), Buffer.alloc(256, 7));
    expect(v.subarray(0, 9).toString('hex')).toBe('030204a1b2c3d40100');
    expect(v.length).toBe(9 + 256);
  });

  it('quotes paths for setfattr --restore', () => {
    expect(setfattrRestore([{ file: '/r/a b\\c\u00e9', name: 'security.ima', value: Buffer.from([3]) }]).toString()).toBe(
      '# file: /r/a\\040b\\134c\\303\\251\nsecurity.ima=0x03\n\n',
    );
  });

  it('the key id is the last 4 bytes of the certificate subjectKeyIdentifier', () => {
    const text = execFileSync('openssl', ['x509', '-inform', 'DER', '-in', path.join(keys, 'ima/x509_ima.der'), '-noout', '-ext', 'subjectKeyIdentifier'], { encoding: 'utf8' });
    const skid = (/([0-9A-F]{2}(?::[0-9A-F]{2})+)/.exec(text)?.[1] ?? '').replace(/:/g, '').toLowerCase();
    expect(signer.keyId.toString('hex')).toBe(skid.slice(-8));
  });
});

describe('a labelled and signed root image, read back through the kernel', () => {
  let image: string;
  beforeAll(async () => {
    image = path.join(dir, 'signed.erofs');
    await buildRootErofs({ tree, out: image, uuid: UUID, timestamp: 1700000000, fileContexts: path.join(dir, 'file_contexts'), ima: signer, work: await fs.mkdtemp(path.join(dir, 'work-')) });
  }, 60_000);

  it('labels every inode as matchpathcon says the file_contexts does', async () => {
    await mounted(image, async (root) => {
      const contexts = path.join(dir, 'file_contexts');
      for (const p of ['/', '/usr', '/usr/bin', '/usr/lib/modules/6.1.0', '/etc'])
        expect([p, xattr(path.join(root, p), 'security.selinux')]).toEqual([p, expectedLabel(contexts, p, 'dir')]);
      for (const p of Object.keys(FILES))
        expect([p, xattr(path.join(root, p), 'security.selinux')]).toEqual([p, expectedLabel(contexts, `/${p}`, 'file')]);
      expect(xattr(path.join(root, 'usr/bin/ls'), 'security.selinux')).toBe('system_u:object_r:bin_t:s0');
      expect(xattr(path.join(root, 'usr/lib/x86_64-linux-gnu/libz.so.1'), 'security.selinux')).toBe('system_u:object_r:lib_t:s0');
    });
  });

  it('signatures verify with the fleet certificate and not with another key; data files carry none', async () => {
    const cert = path.join(keys, 'ima/x509_ima.der');
    const other = path.join(foreign, 'ima/x509_ima.der');
    await mounted(image, (root) => {
      for (const [p, signed] of Object.entries(FILES)) {
        const f = path.join(root, p);
        if (!signed) {
          expect([p, xattr(f, 'security.ima')]).toEqual([p, undefined]);
          continue;
        }
        const good = sh('evmctl', ['ima_verify', '--key', cert, f]);
        expect([p, good.code, good.err]).toEqual([p, 0, expect.anything()]);
        expect([p, sh('evmctl', ['ima_verify', '--key', other, f]).code]).not.toEqual([p, 0]);
      }
    });
  });

  it('carries the certificate that verifies its signatures where lamadist-init loads it', async () => {
    const cert = await fs.readFile(path.join(keys, 'ima/x509_ima.der'));
    await mounted(image, (root) => {
      const inImage = path.join(root, IMA_CERT_PATH);
      expect(execFileSync('stat', ['-c', '%a %U', inImage], { encoding: 'utf8' }).trim()).toBe('644 root');
      expect(sh('evmctl', ['ima_verify', '--key', inImage, path.join(root, 'usr/bin/ls')]).code).toBe(0);
    });
    await mounted(image, async (root) => expect((await fs.readFile(path.join(root, IMA_CERT_PATH))).equals(cert)).toBe(true));
    await expect(fs.access(path.join(tree, IMA_CERT_PATH))).rejects.toThrow();
  });

  it('leaves the operator tree without any xattr, hard links included', () => {
    const r = sh('getfattr', ['--absolute-names', '-R', '-d', '-m', '-', tree]);
    expect(r.out.trim()).toBe('');
  });

  it('is reproducible: the same tree and key give the same bytes', async () => {
    const again = path.join(dir, 'signed-again.erofs');
    await buildRootErofs({ tree, out: again, uuid: UUID, timestamp: 1700000000, fileContexts: path.join(dir, 'file_contexts'), ima: signer, work: await fs.mkdtemp(path.join(dir, 'work-')) });
    expect(await sha256(again)).toBe(await sha256(image));
  });
});

describe("the tree's own policy", () => {
  it("labels with the file_contexts the tree's /etc/selinux/config selects (Debian's refpolicy)", async () => {
    const own = path.join(dir, 'tree-with-policy');
    execFileSync('cp', ['-a', tree, own]);
    const fc = path.join(own, 'etc/selinux/default/contexts/files/file_contexts');
    await fs.mkdir(path.dirname(fc), { recursive: true });
    await fs.copyFile(REFPOLICY, fc);
    await fs.writeFile(path.join(own, 'etc/selinux/config'), 'SELINUX=enforcing\nSELINUXTYPE=default\n');
    const image = path.join(dir, 'refpolicy.erofs');
    await buildRootErofs({ tree: own, out: image, uuid: UUID, timestamp: 0, work: dir });
    await mounted(image, (root) => {
      for (const p of ['usr/bin/ls', 'usr/lib/x86_64-linux-gnu/libz.so.1', 'usr/lib/modules/6.1.0/kernel/fake.ko', 'etc/motd', 'etc/selinux/config'])
        expect([p, xattr(path.join(root, p), 'security.selinux')]).toEqual([p, expectedLabel(REFPOLICY, `/${p}`, 'file')]);
      expect(xattr(path.join(root, 'usr/bin/ls'), 'security.selinux')).toBe('system_u:object_r:bin_t:s0');
      expect(xattr(path.join(root, 'usr/lib/modules/6.1.0/kernel/fake.ko'), 'security.selinux')).toBe('system_u:object_r:modules_object_t:s0');
      expect(xattr(path.join(root, 'usr/bin/ls'), 'security.ima')).toBeUndefined();
    });
  });
});

describe('without the options', () => {
  it('is exactly the plain EROFS image, the same bytes as before labels and signatures existed', async () => {
    const fixed = path.join(dir, 'fixed');
    await fs.mkdir(path.join(fixed, 'usr/bin'), { recursive: true });
    await fs.writeFile(path.join(fixed, 'usr/bin/tool'), '#!/bin/sh\nexit 0\n', { mode: 0o755 });
    await fs.chmod(path.join(fixed, 'usr/bin/tool'), 0o755);
    await fs.writeFile(path.join(fixed, 'os-release'), 'ID=lamadist\n');
    await fs.chmod(path.join(fixed, 'os-release'), 0o644);
    for (const d of ['', 'usr', 'usr/bin']) await fs.chmod(path.join(fixed, d), 0o755);
    const a = path.join(dir, 'plain-root.erofs');
    const b = path.join(dir, 'plain-direct.erofs');
    await buildRootErofs({ tree: fixed, out: a, uuid: UUID, timestamp: 1700000000, work: dir });
    await buildErofs({ source: fixed, out: b, uuid: UUID, timestamp: 1700000000 });
    expect(await sha256(a)).toBe(await sha256(b));
    expect(await sha256(a)).toBe(PLAIN_SHA256);
  });
});

/** mkfs.erofs 1.5 (Debian 12) of the fixed tree above, as image build made it before this feature. */
const PLAIN_SHA256 = '674c22f9f8b783ea062e2a84988f12f5f0054b1bd68456e66fdeecb3c5627be6';

describe('lamadist image build --file-contexts --ima-key', () => {
  let kernel: string;
  beforeAll(async () => {
    kernel = path.join(dir, 'vmlinuz');
    await fs.writeFile(kernel, Buffer.alloc(64 * 1024, 1));
  });
  const build = (out: string, extra: string[]): ReturnType<typeof runCli> =>
    runCli(['--json', 'image', 'build', '-o', out, '--rootfs', tree, '--kernel', kernel, '--no-encrypt', '--empty-b', '--slot-size', '8', '--size', 'var=16', '--size', 'esp=16', '--size', 'verity_a=1', '--size', 'verity_b=1', ...extra], { timeoutMs: 300_000 });

  it('puts labels and signatures into slot A of the disk image', async () => {
    const out = path.join(dir, 'disk.img');
    const r = await build(out, ['--file-contexts', path.join(dir, 'file_contexts'), '--ima-key', keys]);
    expect(r.code, r.stderr).toBe(0);
    const slot = (JSON.parse(r.stdout) as ImagePlan).partitions.find((p) => p.label === 'rootfs_a');
    if (!slot) throw new Error('no rootfs_a');
    await mounted(out, (root) => {
      expect(xattr(path.join(root, 'usr/bin/true'), 'security.selinux')).toBe('system_u:object_r:bin_t:s0');
      expect(sh('evmctl', ['ima_verify', '--key', path.join(keys, 'ima/x509_ima.der'), path.join(root, 'usr/bin/true')]).code).toBe(0);
    }, { offset: slot.offset, size: slot.payloadBytes });
  });

  const refused = async (name: string, extra: string[], message: RegExp): Promise<void> => {
    const out = path.join(dir, `${name}.img`);
    const r = await build(out, extra);
    expect(r.code, r.stderr).toBe(2);
    expect(r.stderr.trim().split('\n')).toHaveLength(1);
    expect(r.stderr).toMatch(message);
    expect((await fs.readdir(dir)).filter((f) => f.includes(name))).toEqual([]);
  };

  it('refuses a missing file_contexts', () => refused('nofc', ['--file-contexts', path.join(dir, 'missing')], /file_contexts .*missing does not exist/));

  it('refuses a key file that is not a key', async () => {
    await fs.writeFile(path.join(dir, 'notakey.pem'), 'not a key\n');
    await refused('garbage', ['--ima-key', path.join(dir, 'notakey.pem'), '--ima-cert', path.join(keys, 'ima/x509_ima.der')], /not an unencrypted private key.*LAMA_E_IMA_KEY/);
  });

  it('refuses a key that is not the IMA key of the certificate', () =>
    refused('wrongkey', ['--ima-key', path.join(foreign, 'ima/x509_ima.key'), '--ima-cert', path.join(keys, 'ima/x509_ima.der')], /is not the key of the IMA certificate.*LAMA_E_IMA_KEY/));

  it("refuses to leave unsigned a tree whose own IMA policy appraises code (meta-lamadist's policy)", async () => {
    const policy = await fs.readFile(path.join(REPO_ROOT, 'meta-lamadist/recipes-core/lamadist-ima/files/ima-policy'), 'utf8');
    expect(policyAppraises(policy)).toBe(true);
    expect(policyAppraises(policy.replace(/^appraise /gm, '# appraise '))).toBe(false);
    await put(IMA_POLICY_PATH, policy);
    try {
      await refused('unsigned', [], /IMA policy appraises code.*--ima-key.*LAMA_E_IMA_UNSIGNED/);
    } finally {
      await fs.rm(path.join(tree, 'etc/ima'), { recursive: true });
    }
  });

  it('refuses a tree that carries another IMA certificate than the signing key', async () => {
    await put(IMA_CERT_PATH, await fs.readFile(path.join(foreign, 'ima/x509_ima.der')));
    try {
      await refused('othercert', ['--ima-key', keys], /carries another IMA certificate.*LAMA_E_IMA_KEY/);
    } finally {
      await fs.rm(path.join(tree, 'etc/keys'), { recursive: true });
    }
  });

  it('refuses a key directory without an IMA key', async () => {
    const bare = path.join(dir, 'bare-keys');
    await fs.mkdir(bare);
    await fs.writeFile(path.join(bare, MANIFEST), JSON.stringify({ version: 1, created: '', owner: UUID, files: [] }));
    await refused('nokey', ['--ima-key', bare], /has no ima-key.*LAMA_E_NO_KEY/);
  });
});
