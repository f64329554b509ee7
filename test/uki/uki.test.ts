import { randomBytes } from 'node:crypto';
import { execFileSync } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, readdirSync, symlinkSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { UserError } from '../../src/errors.js';
import { authenticodeDigest, parsePe, peChecksum } from '../../src/pe/index.js';
import { listSignatures, signPe, verifyPe } from '../../src/secureboot/index.js';
import { buildUki, inspectUki, kernelVersion, planUki } from '../../src/uki/index.js';
import { runCli } from '../helpers/cli.js';
import { STUB, opensslCert, tempDir, tool } from './helpers.js';

/** A kernel-shaped payload: an x86 boot-protocol header with a version string, random body. */
function fakeBzImage(version: string): Buffer {
  const k = randomBytes(200_000);
  k.write('HdrS', 0x202, 'latin1');
  k.writeUInt16LE(0x300, 0x20e);
  k.write(`${version} (debian-kernel@lists.debian.org) #1 SMP\0`, 0x500, 'latin1');
  return k;
}

const t = tempDir('lamadist-uki-');
let db: { cert: string; key: string };
let other: { cert: string; key: string };
const kernel = fakeBzImage('6.1.0-99-amd64');
const initrd = randomBytes(30_000);
const osrel = Buffer.from('ID=lamadist\nNAME="LamaDist"\nVERSION_ID=1.0\n');
const cmdline = 'console=ttyS0,115200 roothash=' + 'ab'.repeat(32) + ' lamadist.slot=a';
let uki: Buffer;
let signed: Buffer;

beforeAll(async () => {
  db = opensslCert(t.dir, 'db');
  other = opensslCert(t.dir, 'other');
  uki = await buildUki({ stub: STUB, kernel, initrd, cmdline, osrel });
  signed = signPe(uki, { certPem: readFileSync(db.cert), keyPem: readFileSync(db.key) });
  writeFileSync(path.join(t.dir, 'uki.efi'), uki);
  writeFileSync(path.join(t.dir, 'signed.efi'), signed);
});
afterAll(() => t.remove());

describe('UKI assembly', () => {
  it('reads the kernel release from the bzImage header', () => {
    expect(kernelVersion(kernel)).toBe('6.1.0-99-amd64');
    expect(kernelVersion(Buffer.alloc(1024))).toBeUndefined();
  });

  it('plans sections in UKI order with .linux last', () => {
    const plan = planUki({ kernel, initrd, cmdline, osrel, splash: Buffer.from('BM') });
    expect(plan.map((s) => s.name)).toEqual(['.osrel', '.cmdline', '.splash', '.uname', '.initrd', '.linux']);
    expect(() => planUki({ kernel, cmdline: 'a\nb' })).toThrow(/single line/);
  });

  it('computes the same PE checksum the linker stored in the Debian stub', () => {
    const stub = readFileSync(STUB);
    const info = parsePe(stub);
    expect(peChecksum(stub, info.offsets.checksum)).toBe(info.checksum);
  });

  it('objdump reads the UKI: page-aligned sections with exact sizes, consistent headers', () => {
    const r = tool('objdump', ['-h', path.join(t.dir, 'uki.efi')]);
    expect(r.code).toBe(0);
    const rows = [...r.out.matchAll(/^\s*\d+\s+(\.\w+)\s+([0-9a-f]+)\s+([0-9a-f]+)\s+[0-9a-f]+\s+([0-9a-f]+)/gm)].map((m) => ({
      name: m[1],
      size: Number.parseInt(m[2] ?? '', 16),
      vma: Number.parseInt(m[3] ?? '', 16),
      off: Number.parseInt(m[4] ?? '', 16),
    }));
    const added = rows.filter((s) => ['.osrel', '.cmdline', '.uname', '.initrd', '.linux'].includes(s.name ?? ''));
    expect(added.map((s) => s.name)).toEqual(['.osrel', '.cmdline', '.uname', '.initrd', '.linux']);
    expect(added.find((s) => s.name === '.linux')?.size).toBe(kernel.length);
    expect(added.find((s) => s.name === '.initrd')?.size).toBe(initrd.length);
    for (const s of added) {
      expect(s.vma % 4096).toBe(0);
      expect(s.off % 512).toBe(0);
      expect(uki.subarray(s.off, s.off + 8).equals(
        s.name === '.linux' ? kernel.subarray(0, 8) : s.name === '.initrd' ? initrd.subarray(0, 8) : s.name === '.osrel' ? osrel.subarray(0, 8) : uki.subarray(s.off, s.off + 8),
      )).toBe(true);
    }
    const p = tool('objdump', ['-p', path.join(t.dir, 'uki.efi')]).out;
    const info = parsePe(uki);
    const last = info.sections[info.sections.length - 1]!;
    expect(Number.parseInt(/SizeOfImage\s+([0-9a-f]+)/.exec(p)?.[1] ?? '', 16)).toBe(Math.ceil((last.virtualAddress + last.virtualSize) / info.sectionAlignment) * info.sectionAlignment);
    expect(Number.parseInt(/CheckSum\s+([0-9a-f]+)/.exec(p)?.[1] ?? '', 16)).toBe(peChecksum(uki, info.offsets.checksum));
  });

  it('inspect reads back the command line, os-release and uname', () => {
    const i = inspectUki(uki);
    expect(i.cmdline).toBe(cmdline);
    expect(i.osrel?.NAME).toBe('LamaDist');
    expect(i.uname).toBe('6.1.0-99-amd64');
    expect(i.stub).toMatch(/^25\d/);
  });

  it('refuses a non-PE stub, a UKI as stub and a missing stub', async () => {
    await expect(buildUki({ stub: Buffer.from('not a PE at all'.repeat(10)), kernel, cmdline })).rejects.toMatchObject({ code: 'LAMA_E_NOT_PE' });
    await expect(buildUki({ stub: uki, kernel, cmdline })).rejects.toMatchObject({ code: 'LAMA_E_NOT_STUB' });
    await expect(buildUki({ stub: path.join(t.dir, 'nope.stub'), kernel, cmdline })).rejects.toMatchObject({ code: 'LAMA_E_NO_STUB' });
  });

  it('rejects a truncated PE with a one-line error', () => {
    expect(() => parsePe(uki.subarray(0, 0x20000), 'x.efi')).toThrow(UserError);
    expect(() => parsePe(uki.subarray(0, 0x20000), 'x.efi')).toThrow(/extends past the end/);
  });
});

describe('Authenticode', () => {
  it('sbverify accepts our signature with db.crt and rejects it with another certificate', () => {
    expect(tool('sbverify', ['--cert', db.cert, path.join(t.dir, 'signed.efi')]).code).toBe(0);
    expect(tool('sbverify', ['--cert', other.cert, path.join(t.dir, 'signed.efi')]).code).not.toBe(0);
    expect(tool('sbverify', ['--list', path.join(t.dir, 'signed.efi')]).out).toMatch(/CN=db/);
  });

  it('our verifier accepts with db.crt, rejects another certificate and an unsigned image', () => {
    expect(verifyPe(signed, readFileSync(db.cert)).subject).toBe('CN=db');
    expect(() => verifyPe(signed, readFileSync(other.cert))).toThrow(expect.objectContaining({ code: 'LAMA_E_UNTRUSTED_SIGNER' }));
    expect(() => verifyPe(uki, readFileSync(db.cert))).toThrow(expect.objectContaining({ code: 'LAMA_E_UNSIGNED' }));
  });

  it('rejects the UKI with one byte changed in any section or header', () => {
    const info = parsePe(signed);
    const spots = info.sections.map((s) => ({ name: s.name, at: s.pointerToRawData + Math.floor(Math.min(s.virtualSize, s.sizeOfRawData) / 2) }));
    spots.push({ name: 'header', at: info.offsets.sizeOfImage - 4 });
    for (const s of spots) {
      const bad = Buffer.from(signed);
      bad[s.at] = (bad[s.at] ?? 0) ^ 0x01;
      expect(() => verifyPe(bad, readFileSync(db.cert)), s.name).toThrow(expect.objectContaining({ code: 'LAMA_E_PE_DIGEST_MISMATCH' }));
    }
    const bad = Buffer.from(signed);
    const linux = info.sections.find((s) => s.name === '.linux')!;
    bad.writeUInt8(bad.readUInt8(linux.pointerToRawData + 100) ^ 0xff, linux.pointerToRawData + 100);
    writeFileSync(path.join(t.dir, 'tampered.efi'), bad);
    expect(tool('sbverify', ['--cert', db.cert, path.join(t.dir, 'tampered.efi')]).code).not.toBe(0);
  });

  it('computes the same image digest as sbsign (our verifier accepts sbsign output)', () => {
    const out = path.join(t.dir, 'sbsign.efi');
    expect(tool('sbsign', ['--key', db.key, '--cert', db.cert, '--output', out, path.join(t.dir, 'uki.efi')]).code).toBe(0);
    const peer = readFileSync(out);
    const sigs = listSignatures(peer);
    expect(sigs).toHaveLength(1);
    expect(sigs[0]?.digestMatches).toBe(true);
    expect(verifyPe(peer, readFileSync(db.cert)).subject).toBe('CN=db');
    expect(authenticodeDigest(signed).equals(authenticodeDigest(peer))).toBe(true);
  });

  it('re-signing replaces the signature instead of stacking a second one', () => {
    const again = signPe(signed, { certPem: readFileSync(other.cert), keyPem: readFileSync(other.key) });
    expect(listSignatures(again).map((s) => s.subject)).toEqual(['CN=other']);
    expect(verifyPe(again, readFileSync(other.cert)).subject).toBe('CN=other');
  });
});

describe('uki/sign/verify CLI', () => {
  it('builds, signs, inspects and verifies through the CLI; sbverify agrees', async () => {
    const out = path.join(t.dir, 'cli.efi');
    writeFileSync(path.join(t.dir, 'vmlinuz'), kernel);
    writeFileSync(path.join(t.dir, 'initrd'), initrd);
    const b = await runCli(['--json', 'uki', 'build', '--kernel', path.join(t.dir, 'vmlinuz'), '--initrd', path.join(t.dir, 'initrd'), '--cmdline', cmdline, '--cert', db.cert, '--key', db.key, '-o', out]);
    expect(b.stderr).toMatch(/^\.osrel: \/(etc|usr\/lib)\/os-release of the running system \(no --osrel given; the initrd cannot be read: not a cpio archive \(byte 0\)\)\n$/);
    expect(b.code).toBe(0);
    expect(JSON.parse(b.stdout)).toMatchObject({ out, cmdline, signed: true });
    expect(tool('sbverify', ['--cert', db.cert, out]).code).toBe(0);
    const i = await runCli(['--json', 'uki', 'inspect', out, '--cert', db.cert]);
    expect(i.code).toBe(0);
    const info = JSON.parse(i.stdout) as { cmdline: string; verified: boolean; signatures: { subject: string }[] };
    expect(info).toMatchObject({ cmdline, verified: true });
    expect(info.signatures[0]?.subject).toBe('CN=db');
    const v = await runCli(['verify', 'efi', out, '--cert', other.cert]);
    expect(v.code).toBe(2);
    expect(v.stderr.trim().split('\n')).toHaveLength(1);
    expect(v.stderr).toMatch(/LAMA_E_UNTRUSTED_SIGNER/);
    const again = await runCli(['uki', 'build', '--kernel', path.join(t.dir, 'vmlinuz'), '--cmdline', 'x', '-o', out]);
    expect(again.code).toBe(2);
    expect(again.stderr).toMatch(/already exists/);
  });

  it('sign efi signs a copy sbverify accepts; a non-PE input is a one-line error with no output', async () => {
    const out = path.join(t.dir, 'cli-signed.efi');
    const s = await runCli(['sign', 'efi', path.join(t.dir, 'uki.efi'), '--cert', db.cert, '--key', db.key, '-o', out]);
    expect(s.code).toBe(0);
    expect(tool('sbverify', ['--cert', db.cert, out]).code).toBe(0);
    expect((await runCli(['verify', 'efi', out, '--cert', db.cert])).code).toBe(0);
    writeFileSync(path.join(t.dir, 'text.efi'), 'hello, not a PE\n'.repeat(8));
    const bad = await runCli(['sign', 'efi', path.join(t.dir, 'text.efi'), '--cert', db.cert, '--key', db.key, '-o', path.join(t.dir, 'text.signed.efi')]);
    expect(bad.code).toBe(2);
    expect(bad.stderr.trim().split('\n')).toEqual([expect.stringMatching(/not a PE image.*LAMA_E_NOT_PE/)]);
    expect(existsSync(path.join(t.dir, 'text.signed.efi'))).toBe(false);
  });

  it('a missing stub is a one-line error and writes nothing', async () => {
    const out = path.join(t.dir, 'nostub.efi');
    const r = await runCli(['uki', 'build', '--stub', path.join(t.dir, 'missing.stub'), '--kernel', path.join(t.dir, 'vmlinuz'), '--cmdline', 'x', '-o', out]);
    expect(r.code).toBe(2);
    expect(r.stderr.trim().split('\n')).toEqual([expect.stringMatching(/EFI stub .*missing\.stub does not exist.*LAMA_E_NO_STUB/)]);
    expect(readdirSync(t.dir).filter((f) => f.includes('nostub'))).toEqual([]);
  });
});

describe('uki build without --osrel (the UKI specification requires .osrel)', () => {
  const release = 'ID=lamadist\nNAME="LamaDist initrd"\nVERSION_ID=9.9\n';
  let vmlinuz: string;
  /** A newc initrd made by cpio(1), etc/os-release a symlink to usr/lib/os-release as systemd ships it. */
  let cpioArchive: Buffer;
  beforeAll(() => {
    vmlinuz = path.join(t.dir, 'osrel-vmlinuz');
    writeFileSync(vmlinuz, kernel);
    const root = path.join(t.dir, 'initrd-root');
    mkdirSync(path.join(root, 'usr/lib'), { recursive: true });
    mkdirSync(path.join(root, 'etc'));
    writeFileSync(path.join(root, 'usr/lib/os-release'), release);
    symlinkSync('../usr/lib/os-release', path.join(root, 'etc/os-release'));
    writeFileSync(path.join(root, 'init'), '#!/bin/sh\n');
    cpioArchive = execFileSync('cpio', ['-o', '-H', 'newc', '--quiet'], { cwd: root, input: '.\netc\netc/os-release\nusr\nusr/lib\nusr/lib/os-release\ninit\n' });
  });

  /** Build through the CLI, then read .osrel back with objdump (section present) and our inspector (contents). */
  async function build(name: string, initrds: Buffer[]): Promise<{ stderr: string; osrel: string }> {
    const args = ['uki', 'build', '--kernel', vmlinuz, '--cmdline', 'quiet', '-o', path.join(t.dir, `${name}.efi`)];
    initrds.forEach((b, i) => {
      const f = path.join(t.dir, `${name}.initrd${i}`);
      writeFileSync(f, b);
      args.push('--initrd', f);
    });
    const r = await runCli(args);
    expect(r.code, r.stderr).toBe(0);
    expect(tool('objdump', ['-h', path.join(t.dir, `${name}.efi`)]).out).toMatch(/^\s*\d+\s+\.osrel\s/m);
    const i = await runCli(['--json', 'uki', 'inspect', path.join(t.dir, `${name}.efi`)]);
    const section = (JSON.parse(i.stdout) as { osrel?: Record<string, string> }).osrel ?? {};
    return { stderr: r.stderr.replace(/^warning: no --keys.*\n/m, ''), osrel: Object.entries(section).map(([k, v]) => `${k}=${v}`).join(' ') };
  }

  for (const [kind, compress] of [
    ['uncompressed', (b: Buffer) => b],
    ['gzip', (b: Buffer) => execFileSync('gzip', ['-c'], { input: b })],
    ['zstd', (b: Buffer) => execFileSync('zstd', ['-c', '-q'], { input: b })],
    ['xz', (b: Buffer) => execFileSync('xz', ['-c', '--check=crc32'], { input: b })],
  ] as const) {
    it(`takes the os-release of a ${kind} initrd behind an uncompressed early cpio`, async () => {
      // an early-microcode style first archive, then the main one compressed, as dracut and
      // mkinitramfs lay them out
      const early = execFileSync('cpio', ['-o', '-H', 'newc', '--quiet'], { cwd: t.dir, input: '.\n' });
      const r = await build(`osrel-${kind}`, [early, compress(cpioArchive)]);
      expect(r.stderr).toBe('.osrel: etc/os-release -> usr/lib/os-release from the initrd (no --osrel given)\n');
      expect(r.osrel).toBe('ID=lamadist NAME=LamaDist initrd VERSION_ID=9.9');
    });
  }

  it("takes the running system's os-release when the initrd has none or cannot be read, and says why", async () => {
    const host = readFileSync(existsSync('/etc/os-release') ? '/etc/os-release' : '/usr/lib/os-release', 'utf8');
    const hostId = /^ID=(.*)$/m.exec(host)?.[1]?.replace(/"/g, '');
    const empty = execFileSync('cpio', ['-o', '-H', 'newc', '--quiet'], { cwd: t.dir, input: '.\n' });
    const lz4 = execFileSync('lz4', ['-c', '-l', '-q'], { input: cpioArchive });
    for (const [name, initrds, why] of [
      ['osrel-none', [empty], 'the initrd has no etc/os-release or usr/lib/os-release'],
      ['osrel-lz4', [lz4], 'the initrd cannot be read: lz4-compressed part at byte 0 cannot be read here'],
      ['osrel-noinitrd', [], 'no --initrd given'],
    ] as const) {
      const r = await build(name, [...initrds]);
      expect(r.stderr).toMatch(new RegExp(`^\\.osrel: /(etc|usr/lib)/os-release of the running system \\(no --osrel given; ${why.replace(/[()]/g, '\\$&')}\\)\n$`));
      expect(r.osrel).toContain(`ID=${hostId}`);
    }
  });
});

