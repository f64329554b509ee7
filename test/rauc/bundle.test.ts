import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createBundle, encryptBundle, extractBundle, inspectBundle } from '../../src/rauc/index.js';
import { makePki, type Pki } from './pki.js';

let pki: Pki;
let dir: string;
let rootfs: string;
let verity: string;
let uki: string;
const T = new Date('2026-02-01T00:00:00Z');

function rauc(args: string[]): { code: number; out: string } {
  const r = spawnSync('rauc', args, { encoding: 'utf8' });
  return { code: r.status ?? 128, out: `${r.stdout}${r.stderr}` };
}

beforeAll(() => {
  pki = makePki();
  dir = mkdtempSync(path.join(os.tmpdir(), 'lamadist-rauc-'));
  rootfs = path.join(dir, 'rootfs.erofs');
  verity = path.join(dir, 'rootfs.verity');
  uki = path.join(dir, 'lamadist.efi');
  const img = Buffer.alloc(3 * 1024 * 1024);
  for (let i = 0; i < img.length; i += 4096) img.writeUInt32LE(i * 2654435761 >>> 0, i);
  writeFileSync(rootfs, img);
  writeFileSync(verity, img.subarray(0, 64 * 1024));
  writeFileSync(uki, 'MZ fake UKI of odd length');
});
afterAll(() => {
  rmSync(dir, { recursive: true, force: true });
  rmSync(pki.dir, { recursive: true, force: true });
});

const signer = (): { certPem: string; keyPem: string } => ({ certPem: readFileSync(pki.cert, 'utf8'), keyPem: readFileSync(pki.key, 'utf8') });

async function make(out: string, format: 'verity' | 'crypt' = 'verity', signingTime = T): Promise<string> {
  const p = path.join(dir, out);
  await createBundle({
    out: p,
    compatible: 'lamadist-x86-64',
    version: '1.2.3',
    build: '20260201',
    images: [
      { slotClass: 'rootfs', path: rootfs, adaptive: true },
      { slotClass: 'verity', path: verity, adaptive: true },
      { slotClass: 'efi', path: uki },
    ],
    format,
    signer: signer(),
    signingTime,
  });
  return p;
}

describe('verity bundle', () => {
  it('rauc info accepts it and rauc extract yields the input images byte for byte', async () => {
    const b = await make('a.raucb');
    const info = rauc(['info', '--conf', pki.conf, '--keyring', pki.ca, b]);
    expect(info.out).toContain("Compatible: \t'lamadist-x86-64'");
    expect(info.code, info.out).toBe(0);
    const x = path.join(dir, 'x');
    const ex = rauc(['extract', '--conf', pki.conf, '--keyring', pki.ca, b, x]);
    expect(ex.code, ex.out).toBe(0);
    expect(readFileSync(path.join(x, 'rootfs.erofs')).equals(readFileSync(rootfs))).toBe(true);
    expect(readFileSync(path.join(x, 'lamadist.efi'))).toEqual(readFileSync(uki));
    const ours = await inspectBundle(b, { keyring: pki.ca, compatible: 'lamadist-x86-64' });
    expect(ours.verified && ours.payloadVerified).toBe(true);
    expect(ours.manifest.images.map((i) => i.slotClass)).toEqual(['rootfs', 'verity', 'efi']);
  });

  it('alignImages: stored verbatim, every image on a 4 KiB boundary; rauc info and rauc extract accept it', async () => {
    const b = path.join(dir, 'aligned.raucb');
    const created = await createBundle({
      out: b,
      compatible: 'lamadist-x86-64',
      version: '1',
      images: [
        { slotClass: 'verity', path: verity, adaptive: true },
        { slotClass: 'efi', path: uki },
        { slotClass: 'rootfs', path: rootfs },
      ],
      signer: signer(),
      signingTime: T,
      squashfsBlockSize: 16384,
      alignImages: true,
    });
    expect(rauc(['info', '--conf', pki.conf, '--keyring', pki.ca, b]).code).toBe(0);
    const x = path.join(dir, 'aligned-x');
    expect(rauc(['extract', '--conf', pki.conf, '--keyring', pki.ca, b, x]).code).toBe(0);
    const payload = readFileSync(b).subarray(0, created.payloadSize);
    // Where each image is, found by its bytes (unique here), not by the plan.
    for (const f of [verity, uki, rootfs]) {
      const img = readFileSync(f);
      const at = payload.indexOf(img);
      expect(at % 4096, f).toBe(0);
      expect(readFileSync(path.join(x, path.basename(f))).equals(img)).toBe(true);
    }
    // The odd-length efi image is followed by padding that puts the root image on a boundary.
    expect(payload.indexOf(readFileSync(rootfs))).toBe(payload.indexOf(readFileSync(uki)) + 4096);
  });

  it('extractBundle verifies and unpacks like rauc extract, refusing an existing directory', async () => {
    const b = await make('e.raucb', 'crypt');
    const x = path.join(dir, 'ours-x');
    const info = await extractBundle(b, x, { keyring: pki.ca });
    expect(info.payloadVerified).toBe(true);
    expect(readFileSync(path.join(x, 'rootfs.erofs')).equals(readFileSync(rootfs))).toBe(true);
    expect(readFileSync(path.join(x, 'rootfs.erofs.block-hash-index')).length).toBe((3 * 1024 * 1024 / 4096) * 32);
    await expect(extractBundle(b, x, { keyring: pki.ca })).rejects.toMatchObject({ code: 'LAMA_E_EXISTS' });
  });

  it('encrypt refuses verity bundles, an untrusted signer and an existing output', async () => {
    const v = await make('v.raucb');
    await expect(encryptBundle(v, path.join(dir, 'v-enc.raucb'), [pki.device])).rejects.toMatchObject({ code: 'LAMA_E_BUNDLE_FORMAT' });
    const c = await make('c.raucb', 'crypt');
    await expect(encryptBundle(c, path.join(dir, 'c-enc.raucb'), [pki.device], { keyring: pki.otherCa })).rejects.toMatchObject({ code: 'LAMA_E_BUNDLE_UNTRUSTED_SIGNER', where: c });
    await expect(encryptBundle(c, c, [pki.device])).rejects.toMatchObject({ code: 'LAMA_E_EXISTS' });
    await encryptBundle(c, c, [pki.device], { keyring: pki.ca, force: true });
    expect((await inspectBundle(c, { keyring: pki.ca, deviceKey: pki.deviceKey })).encrypted).toBe(true);
  });

  it('is byte-identical when created twice with the same signing time, and differs only in the signature otherwise', async () => {
    const a = await make('r1.raucb');
    const b = await make('r2.raucb');
    expect(readFileSync(a).equals(readFileSync(b))).toBe(true);
    const c = readFileSync(await make('r3.raucb', 'verity', new Date('2026-02-01T00:00:07Z')));
    const i = await inspectBundle(a);
    const sigAt = i.sizes.payload + i.sizes.hashTree;
    const x = readFileSync(a);
    expect(c.length).toBe(x.length);
    expect(c.subarray(0, sigAt).equals(x.subarray(0, sigAt))).toBe(true);
    expect(c.subarray(sigAt).equals(x.subarray(sigAt))).toBe(false);
  });
});
