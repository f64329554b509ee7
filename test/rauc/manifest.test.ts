import { execFileSync, spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { chmodSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { decodeList, encodeList, escapeValue } from '../../src/rauc/keyfile.js';
import { createBundle, parseManifest, planBundle, renderManifest, slotClassesOf } from '../../src/rauc/index.js';
import { adaptiveFetchBytes, mksquashfsArgs, plain64Iv } from '../../src/rauc/payload.js';
import { makePki, type Pki } from './pki.js';

let pki: Pki;
let dir: string;
beforeAll(() => {
  pki = makePki();
  dir = mkdtempSync(path.join(os.tmpdir(), 'lamadist-rauc-manifest-'));
});
afterAll(() => {
  rmSync(dir, { recursive: true, force: true });
  rmSync(pki.dir, { recursive: true, force: true });
});

describe('GKeyFile values', () => {
  it('escapes like GLib and round-trips lists', () => {
    expect(escapeValue(' a\\b\nc\td')).toBe('\\sa\\\\b\\nc\\td');
    expect(encodeList(['block-hash-index'])).toBe('block-hash-index;');
    expect(decodeList(encodeList(['a;b', 'c']), 'x')).toEqual(['a;b', 'c']);
  });

  it('names file:line for malformed manifests', () => {
    expect(() => parseManifest('[update]\ncompatible=x\n[image.rootfs\n', 'm.raucm')).toThrow(expect.objectContaining({ where: 'm.raucm:3', code: 'LAMA_E_KEYFILE' }));
    expect(() => parseManifest('[update]\ncompatible=x\nno equals\n', 'm.raucm')).toThrow(expect.objectContaining({ where: 'm.raucm:3' }));
    expect(() => parseManifest('[update]\nversion=1\n', 'm.raucm')).toThrow(expect.objectContaining({ code: 'LAMA_E_MANIFEST' }));
    expect(() => parseManifest('[update]\ncompatible=x\n[image.rootfs]\nfilename=../etc/passwd\n', 'm.raucm')).toThrow(/plain file name/);
    expect(() => parseManifest('[update]\ncompatible=x\n[bundle]\nverity-size=12ab\n', 'm.raucm')).toThrow(/whole number/);
  });

  it('reads the slot classes of the efi family system.conf', () => {
    const f = path.resolve('meta-lamadist/recipes-core/rauc/files/efi/system.conf');
    expect(slotClassesOf(readFileSync(f, 'utf8'), f)).toEqual(['rootfs', 'verity', 'efi']);
  });
});

describe('manifests written by RAUC', () => {
  it('parse and re-render byte-identically (payload manifest and signed manifest)', () => {
    const c = mkdtempSync(path.join(dir, 'c-'));
    chmodSync(c, 0o755);
    writeFileSync(path.join(c, 'rootfs.img'), randomBytes(8192));
    writeFileSync(path.join(c, 'hook.sh'), '#!/bin/sh\n');
    writeFileSync(
      path.join(c, 'manifest.raucm'),
      '[update]\ncompatible=lamadist-x86-64\nversion=3.1\ndescription=\\sleading space; and \\\\ backslash\nbuild=42\n\n[bundle]\nformat=verity\n\n[hooks]\nfilename=hook.sh\nhooks=install-check;\n\n[image.rootfs]\nfilename=rootfs.img\nhooks=pre-install;post-install;\nadaptive=block-hash-index;\n',
    );
    const b = path.join(dir, 'm.raucb');
    const r = spawnSync('rauc', ['bundle', '--conf', pki.conf, '--cert', pki.cert, '--key', pki.key, c, b], { encoding: 'utf8' });
    expect(r.status, r.stderr).toBe(0);
    const inner = execFileSync('unsquashfs', ['-cat', b, 'manifest.raucm']).toString();
    const m = parseManifest(inner, 'inner');
    expect(m.description).toBe(' leading space; and \\ backslash');
    expect(m.images[0]?.hooks).toEqual(['pre-install', 'post-install']);
    expect(renderManifest(m)).toBe(inner);
    const data = readFileSync(b);
    const sigSize = Number(data.readBigUInt64BE(data.length - 8));
    const sigFile = path.join(dir, 'm.sig');
    writeFileSync(sigFile, data.subarray(data.length - 8 - sigSize, data.length - 8));
    const signed = execFileSync('openssl', ['cms', '-verify', '-noverify', '-binary', '-inform', 'DER', '-in', sigFile], { stdio: ['ignore', 'pipe', 'ignore'] }).toString();
    expect(renderManifest(parseManifest(signed, 'signed'))).toBe(signed);
  });

  it('rauc info shows the hooks of a bundle we create with a hook script', async () => {
    const hook = path.join(dir, 'hook.sh');
    writeFileSync(hook, '#!/bin/sh\nexit 0\n', { mode: 0o755 });
    const img = path.join(dir, 'root.img');
    writeFileSync(img, Buffer.alloc(16384, 3));
    const out = path.join(dir, 'hooks.raucb');
    await createBundle({
      out,
      compatible: 'lamadist-x86-64',
      version: '1',
      images: [{ slotClass: 'rootfs', path: img, hooks: ['post-install'] }],
      hookScript: hook,
      installCheck: true,
      signer: { certPem: readFileSync(pki.cert, 'utf8'), keyPem: readFileSync(pki.key, 'utf8') },
    });
    const r = spawnSync('rauc', ['info', '--conf', pki.conf, '--keyring', pki.ca, out], { encoding: 'utf8' });
    expect(r.status, r.stderr).toBe(0);
    // The 16 KiB of one byte compress to one squashfs block, which we pad so a hash tree exists.
    const x = path.join(dir, 'hooks-x');
    const e = spawnSync('rauc', ['extract', '--conf', pki.conf, '--keyring', pki.ca, out, x], { encoding: 'utf8' });
    expect(e.status, e.stderr).toBe(0);
    expect(readFileSync(path.join(x, 'root.img')).equals(readFileSync(img))).toBe(true);
    expect(r.stdout).toContain("Hooks:      \t'install-check'");
    expect(r.stdout).toMatch(/Hooks:\s+post-install/);
  });
});

describe('planning', () => {
  it('refuses slot classes the target does not define, duplicates and missing hook scripts', () => {
    const base = { compatible: 'c', version: '1', images: [{ slotClass: 'rootfs', path: '/x/rootfs.img' }] };
    expect(planBundle(base).manifest.images).toEqual([{ slotClass: 'rootfs', filename: 'rootfs.img' }]);
    expect(() => planBundle({ ...base, slotClasses: ['efi'] })).toThrow(/not defined by the target/);
    expect(() => planBundle({ ...base, images: [...base.images, { slotClass: 'rootfs', path: '/y/b.img' }] })).toThrow(/two images for slot class/);
    expect(() => planBundle({ ...base, installCheck: true })).toThrow(/no hook script/);
    expect(() => planBundle({ ...base, images: [{ slotClass: 'efi', path: '/x/manifest.raucm' }] })).toThrow(/not allowed/);
  });

  it('computes the mksquashfs command line RAUC uses, with fixed times', () => {
    expect(mksquashfsArgs('/c', '/o', 1700000000.5)).toEqual(['/c', '/o', '-noappend', '-no-progress', '-all-root', '-no-xattrs', '-quiet', '-all-time', '1700000000', '-mkfs-time', '1700000000']);
  });

  it('uses the plain64 IV of the 512-byte sector and counts adaptive fetch bytes', () => {
    expect(plain64Iv(3).toString('hex')).toBe('1800000000000000' + '0'.repeat(16));
    const a = Buffer.alloc(32 * 4);
    for (let i = 0; i < 4; i++) a.writeUInt8(i + 1, i * 32);
    const b = Buffer.from(a);
    b.writeUInt8(99, 2 * 32);
    expect(adaptiveFetchBytes(a, b)).toEqual({ blocks: 4, changed: 1, bytes: 4096 });
  });
});
