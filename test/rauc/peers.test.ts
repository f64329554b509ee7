import { spawnSync } from 'node:child_process';
import { chmodSync, copyFileSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync, truncateSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createBundle, digestImage, encryptBundle, inspectBundle } from '../../src/rauc/index.js';
import { makePki, type Pki } from './pki.js';

// Every acceptance point here is checked against the real RAUC 1.8 (`rauc bundle`, `rauc encrypt`,
// `rauc info`, `rauc extract`) and squashfs-tools, not against our own output alone.

let pki: Pki;
let dir: string;
let content: string;
const T = new Date('2026-02-01T00:00:00Z');


function rauc(args: string[]): { code: number; out: string } {
  const r = spawnSync('rauc', args, { encoding: 'utf8' });
  return { code: r.status ?? 128, out: `${r.stdout}${r.stderr}` };
}

function raucInfo(bundle: string, extra: string[] = [], conf = pki.conf, keyring = pki.ca): { code: number; out: string } {
  return rauc(['info', '--conf', conf, '--keyring', keyring, ...extra, bundle]);
}

function raucExtract(bundle: string, extra: string[] = [], conf = pki.conf, keyring = pki.ca): { code: number; out: string; dir: string } {
  const out = mkdtempSync(path.join(dir, 'rx-'));
  rmSync(out, { recursive: true });
  return { ...rauc(['extract', '--conf', conf, '--keyring', keyring, ...extra, bundle, out]), dir: out };
}

/** Pick `key: 'value'` fields out of `rauc info` output. */
function field(out: string, name: string): string | undefined {
  return new RegExp(`${name}:\\s*'?([^'\\n]*)'?`).exec(out)?.[1];
}

const signer = (): { certPem: string; keyPem: string } => ({ certPem: readFileSync(pki.cert, 'utf8'), keyPem: readFileSync(pki.key, 'utf8') });

/** A RAUC content directory: images in mode 0644, manifest written by hand as a user would. */
function makeContent(format: string): string {
  const c = mkdtempSync(path.join(dir, 'content-'));
  // squashfs records the root directory's mode; a content directory is normally 0755 (mkdtemp: 0700).
  chmodSync(c, 0o755);
  for (const f of readdirSync(content)) copyFileSync(path.join(content, f), path.join(c, f));
  writeFileSync(
    path.join(c, 'manifest.raucm'),
    `[update]\ncompatible=lamadist-x86-64\nversion=2.0\nbuild=b7\n\n[bundle]\nformat=${format}\n\n[image.rootfs]\nfilename=rootfs.img\nadaptive=block-hash-index\n\n[image.efi]\nfilename=lamadist.efi\n`,
  );
  return c;
}

beforeAll(() => {
  pki = makePki();
  dir = mkdtempSync(path.join(os.tmpdir(), 'lamadist-rauc-peers-'));
  content = path.join(dir, 'images');
  mkdirSync(content);
  const img = Buffer.alloc(2 * 1024 * 1024);
  for (let i = 0; i < img.length; i += 512) img.writeUInt32LE((i * 2654435761) >>> 0, i);
  writeFileSync(path.join(content, 'rootfs.img'), img);
  writeFileSync(path.join(content, 'lamadist.efi'), 'MZ not really a UKI, odd length.');
});
afterAll(() => {
  if (process.env.KEEP) return;
  rmSync(dir, { recursive: true, force: true });
  rmSync(pki.dir, { recursive: true, force: true });
});

async function ours(name: string, format: 'verity' | 'crypt' = 'verity', extra: Partial<Parameters<typeof createBundle>[0]> = {}): Promise<string> {
  const out = path.join(dir, name);
  await createBundle({
    out,
    compatible: 'lamadist-x86-64',
    version: '2.0',
    build: 'b7',
    images: [
      { slotClass: 'rootfs', path: path.join(content, 'rootfs.img'), adaptive: true },
      { slotClass: 'efi', path: path.join(content, 'lamadist.efi') },
    ],
    format,
    signer: signer(),
    signingTime: T,
    ...extra,
  });
  return out;
}

describe('bundles made by rauc bundle', () => {
  it('we read and verify a rauc verity bundle with the same results as rauc info', async () => {
    const c = makeContent('verity');
    const b = path.join(dir, 'rauc-verity.raucb');
    const made = rauc(['bundle', '--conf', pki.conf, '--cert', pki.cert, '--key', pki.key, c, b]);
    expect(made.code, made.out).toBe(0);
    const info = raucInfo(b);
    expect(info.code, info.out).toBe(0);
    const i = await inspectBundle(b, { keyring: pki.ca });
    expect(i.verified && i.payloadVerified).toBe(true);
    expect(i.format).toBe('verity');
    expect(i.manifest.compatible).toBe(field(info.out, 'Compatible'));
    expect(i.manifest.version).toBe(field(info.out, 'Version'));
    expect(i.manifest.build).toBe(field(info.out, 'Build'));
    expect(i.manifest.verityHash).toBe(field(info.out, 'Verity Hash'));
    expect(i.manifest.veritySalt).toBe(field(info.out, 'Verity Salt'));
    expect(String(i.manifest.veritySize)).toBe(field(info.out, 'Verity Size'));
    expect(info.out).toContain(i.manifest.images[0]?.sha256);
    expect(i.chain.map((x) => x.spkiSha256)).toEqual([...info.out.matchAll(/SPKI sha256: (\S+)/g)].map((m) => m[1]));
  });

  it('we read and verify a rauc plain bundle (detached signature over the payload) like rauc info', async () => {
    const c = makeContent('plain');
    const b = path.join(dir, 'rauc-plain.raucb');
    const made = rauc(['bundle', '--conf', pki.conf, '--cert', pki.cert, '--key', pki.key, c, b]);
    expect(made.code, made.out).toBe(0);
    const info = raucInfo(b);
    expect(info.code, info.out).toBe(0);
    const i = await inspectBundle(b, { keyring: pki.ca });
    expect(i).toMatchObject({ format: 'plain', verified: true, payloadVerified: true });
    expect(i.manifest.version).toBe(field(info.out, 'Version'));
    expect(info.out).toContain(i.manifest.images[0]?.sha256);
    const bad = path.join(dir, 'rauc-plain-bad.raucb');
    const data = readFileSync(b);
    data.writeUInt8(data.readUInt8(5000) ^ 1, 5000);
    writeFileSync(bad, data);
    expect(raucInfo(bad).code).not.toBe(0);
    await expect(inspectBundle(bad, { keyring: pki.ca })).rejects.toMatchObject({ code: 'LAMA_E_BUNDLE_PAYLOAD_TAMPERED' });
  });

  it('payload, hash tree and block-hash-index are byte-identical to rauc bundle for the same content', async () => {
    const c = makeContent('verity');
    const b = path.join(dir, 'rauc-same.raucb');
    const made = rauc(['bundle', '--conf', pki.conf, '--cert', pki.cert, '--key', pki.key, '--mksquashfs-args=-all-time 0 -mkfs-time 0', c, b]);
    expect(made.code, made.out).toBe(0);
    const theirs = await inspectBundle(b, { keyring: pki.ca });
    const mine = await ours('same.raucb', 'verity', { salt: Buffer.from(theirs.manifest.veritySalt as string, 'hex') });
    const m = await inspectBundle(mine, { keyring: pki.ca });
    expect(m.manifest.verityHash).toBe(theirs.manifest.verityHash);
    expect(m.sizes.payload).toBe(theirs.sizes.payload);
    const upTo = theirs.sizes.payload + theirs.sizes.hashTree;
    expect(readFileSync(mine).subarray(0, upTo).equals(readFileSync(b).subarray(0, upTo))).toBe(true);
    // rauc bundle left its block-hash-index in the content directory; compare with ours.
    const idx = (await digestImage(path.join(content, 'rootfs.img'), { blockIndex: true })).blockHashIndex;
    expect(idx?.equals(readFileSync(path.join(c, 'rootfs.img.block-hash-index')))).toBe(true);
  });

  it('we open rauc encrypt output with the device key, as rauc info does', async () => {
    const c = makeContent('crypt');
    const plain = path.join(dir, 'rauc-crypt.raucb');
    const enc = path.join(dir, 'rauc-crypt-enc.raucb');
    expect(rauc(['bundle', '--conf', pki.conf, '--cert', pki.cert, '--key', pki.key, c, plain]).code).toBe(0);
    const e = rauc(['encrypt', '--conf', pki.conf, '--keyring', pki.ca, '--to', pki.device, plain, enc]);
    expect(e.code, e.out).toBe(0);
    const info = raucInfo(enc, ['--key', pki.deviceKey]);
    expect(info.code, info.out).toBe(0);
    const i = await inspectBundle(enc, { keyring: pki.ca, deviceKey: pki.deviceKey, deviceCert: pki.device });
    expect(i).toMatchObject({ format: 'crypt', encrypted: true, verified: true, payloadVerified: true });
    expect(i.manifest.verityHash).toBe(field(info.out, 'Verity Hash'));
    await expect(inspectBundle(enc, { keyring: pki.ca, deviceKey: pki.device2Key })).rejects.toMatchObject({ code: 'LAMA_E_BUNDLE_WRONG_DEVICE_KEY' });
    expect(raucInfo(enc, ['--key', pki.device2Key]).code).not.toBe(0);
  });
});

describe('crypt bundles we make', () => {
  it('rauc info and rauc extract accept them with the device key, images byte-identical', async () => {
    const unenc = await ours('crypt.raucb', 'crypt');
    const enc = path.join(dir, 'crypt-enc.raucb');
    await encryptBundle(unenc, enc, [pki.device, pki.device2]);
    for (const key of [pki.deviceKey, pki.device2Key]) {
      const info = raucInfo(enc, ['--key', key]);
      expect(info.code, info.out).toBe(0);
      expect(info.out).toContain('Bundle Format: \tcrypt');
    }
    const x = raucExtract(enc, ['--key', pki.deviceKey]);
    expect(x.code, x.out).toBe(0);
    expect(readFileSync(path.join(x.dir, 'rootfs.img')).equals(readFileSync(path.join(content, 'rootfs.img')))).toBe(true);
    expect(readFileSync(path.join(x.dir, 'lamadist.efi'))).toEqual(readFileSync(path.join(content, 'lamadist.efi')));
    const i = await inspectBundle(enc, { keyring: pki.ca, deviceKey: pki.device2Key });
    expect(i).toMatchObject({ format: 'crypt', encrypted: true, payloadVerified: true });
  });

  it('re-encrypting for another device rewrites only the signature and trailer', async () => {
    const unenc = await ours('crypt2.raucb', 'crypt');
    const a = path.join(dir, 'crypt2-a.raucb');
    const b = path.join(dir, 'crypt2-b.raucb');
    await encryptBundle(unenc, a, [pki.device]);
    await encryptBundle(a, b, [pki.device2], { deviceKey: pki.deviceKey });
    const ia = await inspectBundle(a, { deviceKey: pki.deviceKey, verifyPayload: false });
    const head = ia.sizes.payload + ia.sizes.hashTree;
    expect(readFileSync(a).subarray(0, head).equals(readFileSync(b).subarray(0, head))).toBe(true);
    expect(readFileSync(unenc).subarray(0, head).equals(readFileSync(b).subarray(0, head))).toBe(true);
    expect(raucInfo(b, ['--key', pki.device2Key]).code).toBe(0);
    expect(raucInfo(b, ['--key', pki.deviceKey]).code).not.toBe(0);
  });
});

describe('tamper matrix: rauc and our verify both reject, our error names the part', () => {
  let good: string;
  let payload: number;
  let tree: number;
  let sigOffset: number;
  beforeAll(async () => {
    good = await ours('good.raucb');
    const i = await inspectBundle(good, { keyring: pki.ca });
    payload = i.sizes.payload;
    tree = i.sizes.hashTree;
    sigOffset = payload + tree;
  });

  function variant(name: string, edit: (b: Buffer) => Buffer): string {
    const f = path.join(dir, `t-${name}.raucb`);
    writeFileSync(f, edit(Buffer.from(readFileSync(good))));
    return f;
  }
  const flip = (at: (b: Buffer) => number) => (b: Buffer): Buffer => {
    const o = at(b);
    b.writeUInt8(b.readUInt8(o) ^ 0x01, o);
    return b;
  };

  const cases: [string, () => { file: string; code: string; part: RegExp; conf?: string; keyring?: string; raucArgs?: string[]; ourOpts?: object }][] = [
    ['payload byte', () => ({ file: variant('payload', flip(() => Math.floor(payload / 2) + 7)), code: 'LAMA_E_BUNDLE_PAYLOAD_TAMPERED', part: /payload tampered with: data block \d+ at byte offset \d+/ })],
    ['hash tree byte', () => ({ file: variant('tree', flip(() => payload + 40)), code: 'LAMA_E_BUNDLE_HASH_TREE_TAMPERED', part: /hash tree tampered with/ })],
    ['signature byte', () => ({ file: variant('sig', flip((b) => b.length - 8 - 20)), code: 'LAMA_E_BUNDLE_BAD_SIGNATURE', part: /signature value/ })],
    ['manifest byte', () => ({ file: variant('manifest', flip((b) => b.indexOf('compatible=', sigOffset) + 12)), code: 'LAMA_E_BUNDLE_MANIFEST_TAMPERED', part: /signed manifest/ })],
    ['trailer byte', () => ({ file: variant('trailer', flip((b) => b.length - 1)), code: 'LAMA_E_BUNDLE_TRAILER', part: /size trailer/ })],
    ['truncated', () => ({ file: variant('trunc', (b) => b.subarray(0, b.length - 100)), code: 'LAMA_E_BUNDLE_TRUNCATED', part: /truncated/ })],
    ['truncated into the payload', () => ({ file: variant('trunc2', (b) => b.subarray(0, payload - 4096)), code: 'LAMA_E_BUNDLE_TRUNCATED', part: /truncated/ })],
    ['another CA', () => ({ file: good, code: 'LAMA_E_BUNDLE_UNTRUSTED_SIGNER', part: /does not chain to a CA in the keyring/, conf: pki.otherConf, keyring: pki.otherCa })],
  ];

  for (const [name, make] of cases) {
    it(name, async () => {
      const c = make();
      const r = raucExtract(c.file, [], c.conf, c.keyring);
      expect(r.code, `rauc accepted ${name}: ${r.out}`).not.toBe(0);
      const err = await inspectBundle(c.file, { keyring: c.keyring ?? pki.ca }).then(
        () => undefined,
        (e: unknown) => e as { code: string; message: string; where?: string },
      );
      expect(err?.code).toBe(c.code);
      expect(err?.message).toMatch(c.part);
      expect(err?.where).toContain(c.file);
    });
  }

  it('encrypted to a different device', async () => {
    const unenc = await ours('t-crypt.raucb', 'crypt');
    const enc = path.join(dir, 't-crypt-enc.raucb');
    await encryptBundle(unenc, enc, [pki.device2]);
    expect(raucInfo(enc, ['--key', pki.deviceKey]).code).not.toBe(0);
    await expect(inspectBundle(enc, { keyring: pki.ca, deviceKey: pki.deviceKey })).rejects.toMatchObject({ code: 'LAMA_E_BUNDLE_WRONG_DEVICE_KEY' });
  });

  it('not a bundle, and wrong compatible', async () => {
    const f = path.join(dir, 'not.raucb');
    writeFileSync(f, Buffer.alloc(20000, 'x'));
    expect(raucInfo(f).code).not.toBe(0);
    await expect(inspectBundle(f, { keyring: pki.ca })).rejects.toMatchObject({ code: 'LAMA_E_BUNDLE_NOT_A_BUNDLE' });
    await expect(inspectBundle(good, { keyring: pki.ca, compatible: 'lamadist-rk1' })).rejects.toMatchObject({ code: 'LAMA_E_BUNDLE_WRONG_COMPATIBLE' });
    truncateSync(f, 0);
    await expect(inspectBundle(f)).rejects.toMatchObject({ code: 'LAMA_E_BUNDLE_NOT_A_BUNDLE' });
  });
});
