import { spawnSync } from 'node:child_process';
import { chmodSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { encryptBundle, extractBundle, inspectBundle } from '../../src/rauc/index.js';
import { runCli } from '../helpers/cli.js';
import { addPkiExtras, makePki, type Pki, type PkiExtras } from './pki.js';

// RAUC's verdict on every bundle RAUC 1.8 makes: each bundle below is made by Debian's `rauc
// bundle`, `rauc encrypt`, `rauc convert` (with casync) or `rauc resign`, in every format and
// option they offer, then judged by `rauc info`/`rauc extract` and by us, intact and tampered with.

let pki: Pki;
let x: PkiExtras;
let dir: string;
let images: string;

interface Made {
  name: string;
  file: string;
  /** Device key (and cert) that opens an encrypted crypt bundle. */
  key?: string;
  cert?: string;
  keyring: string;
  conf: string;
  casync?: boolean;
}
const corpus = new Map<string, Made>();

function rauc(args: string[]): { code: number; out: string } {
  const r = spawnSync('rauc', args, { encoding: 'utf8' });
  return { code: r.status ?? 128, out: `${r.stdout}${r.stderr}` };
}

function raucOk(args: string[]): void {
  const r = rauc(args);
  if (r.code !== 0) throw new Error(`rauc ${args.join(' ')}: ${r.out}`);
}

const keyArgs = (m: { key?: string }): string[] => (m.key ? ['--key', m.key] : []);

function raucInfo(m: Made, file = m.file, keyring = m.keyring, conf = m.conf): { code: number; out: string } {
  return rauc(['info', '--conf', conf, '--keyring', keyring, ...keyArgs(m), file]);
}

function raucExtract(m: Made, file = m.file): { code: number; out: string; dir: string } {
  const out = path.join(mkdtempSync(path.join(dir, 'rx-')), 'x');
  return { ...rauc(['extract', '--conf', m.conf, '--keyring', m.keyring, ...keyArgs(m), file, out]), dir: out };
}

interface ContentOptions {
  format?: string;
  adaptive?: boolean;
  hooks?: boolean;
  tar?: boolean;
}

/** A content directory as a user writes it for `rauc bundle`. */
function content(name: string, o: ContentOptions = {}): string {
  const c = path.join(dir, `content-${name}`);
  mkdirSync(c);
  for (const f of readdirSync(images)) writeFileSync(path.join(c, f), readFileSync(path.join(images, f)));
  let m = `[update]\ncompatible=lamadist-x86-64\nversion=3.1\nbuild=${name}\ndescription=corpus ${name}\n\n`;
  if (o.format) m += `[bundle]\nformat=${o.format}\n\n`;
  if (o.hooks) {
    writeFileSync(path.join(c, 'hook.sh'), '#!/bin/sh\nexit 0\n', { mode: 0o755 });
    writeFileSync(path.join(c, 'handler.sh'), '#!/bin/sh\nexit 0\n', { mode: 0o755 });
    m += '[hooks]\nfilename=hook.sh\nhooks=install-check;\n\n[handler]\nfilename=handler.sh\nargs=--verbose\n\n[meta.lamadist]\nchannel=beta\n\n';
  }
  m += `[image.rootfs]\nfilename=rootfs.img\n${o.adaptive ? 'adaptive=block-hash-index;\n' : ''}${o.hooks ? 'hooks=pre-install;post-install;\n' : ''}\n`;
  m += '[image.efi]\nfilename=lamadist.efi\n';
  if (o.tar) {
    const src = path.join(dir, `tar-${name}`);
    mkdirSync(path.join(src, 'etc'), { recursive: true });
    writeFileSync(path.join(src, 'etc/app.conf'), 'answer=42\n');
    expect(spawnSync('tar', ['-C', src, '-cf', path.join(c, 'app.tar'), '.']).status).toBe(0);
    m += '\n[image.appfs]\nfilename=app.tar\n';
  }
  writeFileSync(path.join(c, 'manifest.raucm'), m);
  return c;
}

/** `rauc bundle` with the default signer into `<name>.raucb`. */
function bundle(name: string, o: ContentOptions, args: string[] = [], signer = [pki.cert, pki.key]): string {
  const out = file(name);
  raucOk(['bundle', '--conf', pki.conf, '--cert', signer[0] as string, '--key', signer[1] as string, ...args, content(name, o), out]);
  return out;
}

const file = (name: string): string => path.join(dir, `${name}.raucb`);

function encrypt(name: string, to: string[]): string {
  raucOk(['encrypt', '--conf', pki.conf, '--keyring', pki.ca, ...to.flatMap((t) => ['--to', t]), file('crypt'), file(name)]);
  return file(name);
}

function convert(name: string, from: string, args: string[] = []): string {
  raucOk(['convert', '--conf', pki.conf, '--keyring', pki.ca, '--cert', pki.cert, '--key', pki.key, ...args, from, file(name)]);
  return file(name);
}

type Recipe = [string, () => Omit<Made, 'name' | 'keyring' | 'conf'> & Partial<Made>];

/** The corpus, made in this order (later recipes reuse earlier bundles). */
const recipes: Recipe[] = [
  ['plain', () => ({ file: bundle('plain', {}) })],
  ['plain, mksquashfs -nopad (payload not 4 KiB aligned)', () => ({ file: bundle('plain-nopad', {}, ['--mksquashfs-args=-nopad']) })],
  ['verity', () => ({ file: bundle('verity', { format: 'verity' }) })],
  ['verity, mksquashfs -comp xz -b 64K', () => ({ file: bundle('verity-xz', { format: 'verity' }, ['--mksquashfs-args=-comp xz -b 65536']) })],
  ['verity, adaptive block-hash-index', () => ({ file: bundle('adaptive', { format: 'verity', adaptive: true }) })],
  ['verity, bundle and image hooks, handler, meta', () => ({ file: bundle('hooks', { format: 'verity', hooks: true }) })],
  ['verity, --signing-keyring', () => ({ file: bundle('signing-keyring', { format: 'verity' }, ['--signing-keyring', pki.ca]) })],
  ['verity, one --intermediate', () => ({ file: bundle('intermediate', { format: 'verity' }, ['--intermediate', x.int], [x.intSigner, x.intSignerKey]) })],
  ['verity, two --intermediate', () => ({ file: bundle('intermediate2', { format: 'verity' }, ['--intermediate', x.int, '--intermediate', x.int2], [x.int2Signer, x.int2SignerKey]) })],
  ['verity, EC (P-256) signer', () => ({ file: bundle('ec-signer', { format: 'verity' }, [], [x.ecSigner, x.ecSignerKey]) })],
  ['crypt, not encrypted', () => ({ file: bundle('crypt', { format: 'crypt', adaptive: true }) })],
  ['crypt, RSA recipients', () => ({ file: encrypt('crypt-rsa', [pki.device, pki.device2]), key: pki.device2Key })],
  ['crypt, EC recipient', () => ({ file: encrypt('crypt-ec', [x.ecDevice]), key: x.ecDeviceKey })],
  ['crypt, RSA and EC recipients, opened with the EC key', () => ({ file: encrypt('crypt-mixed', [pki.device, x.ecDevice, x.ecDevice2]), key: x.ecDevice2Key, cert: x.ecDevice2 })],
  ['crypt, RSA and EC recipients, opened with the RSA key', () => ({ file: file('crypt-mixed'), key: pki.deviceKey })],
  ['casync, plain format (1.4 style)', () => ({ file: convert('casync-plain', file('plain')), casync: true })],
  ['casync, plain format from -nopad', () => ({ file: convert('casync-plain-nopad', file('plain-nopad')), casync: true })],
  ['casync, verity format, blob and archive indexes', () => ({ file: convert('casync-verity', bundle('tar', { format: 'verity', tar: true })), casync: true })],
  // rauc 1.8 cannot convert crypt bundles ("Missing key for crypt bundle"), so there are no casync crypt bundles.
  [
    'casync, verity format, --casync-args SHA-256 chunk ids and 16K:32K:128K chunks',
    () => ({ file: convert('casync-args', file('verity'), ['--casync-args=--digest=sha256 --chunk-size=16K:32K:128K']), casync: true }),
  ],
  [
    'verity, rauc resign to another CA',
    () => {
      raucOk(['resign', '--conf', pki.conf, '--keyring', pki.ca, '--signing-keyring', pki.otherCa, '--cert', x.otherSigner, '--key', x.otherSignerKey, file('verity'), file('resigned')]);
      return { file: file('resigned'), keyring: pki.otherCa, conf: pki.otherConf };
    },
  ],
];

beforeAll(() => {
  pki = makePki();
  x = addPkiExtras(pki);
  dir = mkdtempSync(path.join(os.tmpdir(), 'lamadist-rauc-corpus-'));
  images = path.join(dir, 'images');
  mkdirSync(images);
  // Incompressible, so that the casync index of a converted verity bundle fills more than the one
  // 4 KiB block `rauc convert` refuses to make a verity payload of.
  const img = Buffer.alloc(6 * 1024 * 1024);
  let s = 0x12345678;
  for (let i = 0; i < img.length; i += 4) img.writeUInt32LE((s = (Math.imul(s, 1664525) + 1013904223) >>> 0), i);
  writeFileSync(path.join(images, 'rootfs.img'), img);
  writeFileSync(path.join(images, 'lamadist.efi'), 'MZ not really a UKI, odd length.');
  chmodSync(dir, 0o755);

  for (const [name, make] of recipes) corpus.set(name, { name, keyring: pki.ca, conf: pki.conf, ...make() });
}, 180_000);
afterAll(() => {
  if (process.env.KEEP) return;
  rmSync(dir, { recursive: true, force: true });
  rmSync(pki.dir, { recursive: true, force: true });
});

const ours = (m: Made, file = m.file, keyring = m.keyring): ReturnType<typeof inspectBundle> =>
  inspectBundle(file, { keyring, ...(m.key && { deviceKey: m.key }), ...(m.cert && { deviceCert: m.cert }), verifyPayload: true });

/** Every file under `d` with its bytes, for comparing two extractions. */
function tree(d: string): Record<string, string> {
  const out: Record<string, string> = {};
  for (const f of readdirSync(d, { recursive: true, withFileTypes: true })) {
    if (f.isFile()) out[path.relative(d, path.join(f.parentPath, f.name))] = readFileSync(path.join(f.parentPath, f.name)).toString('base64');
  }
  return out;
}

describe('every bundle rauc makes: rauc accepts it, and so do we', () => {
  for (const [name] of recipes) {
    it(name, async () => {
      const m = corpus.get(name) as Made;
      const info = raucInfo(m);
      expect(info.code, `${m.name}: rauc info: ${info.out}`).toBe(0);
      const i = await ours(m);
      expect(i, m.name).toMatchObject({ verified: true, payloadVerified: true, manifest: { compatible: 'lamadist-x86-64', version: '3.1' } });
      expect(info.out).toContain(`Bundle Format: \t${i.format}`);
      for (const img of i.manifest.images) expect(info.out, m.name).toContain(img.sha256);
      expect(i.chain.map((c) => c.spkiSha256), m.name).toEqual([...info.out.matchAll(/SPKI sha256: (\S+)/g)].map((r) => r[1]));
      // casync images are indexes whose chunks live in the store: said, never called tampered.
      expect(i.manifest.images.some((img) => img.casync), m.name).toBe(Boolean(m.casync));
      expect(i.unchecked.length > 0, m.name).toBe(Boolean(m.casync));
      const cli = await runCli(['bundle', 'verify', '--keyring', m.keyring, ...keyArgs(m), m.file]);
      expect(cli.code, `${m.name}: ${cli.stderr}`).toBe(0);
      if (m.casync) expect(cli.stdout).toMatch(/not checked: \[rootfs\] rootfs\.img\.caibx: the image's sha256 and the chunks need the casync chunk store/);
      const rx = raucExtract(m);
      expect(rx.code, `${m.name}: rauc extract: ${rx.out}`).toBe(0);
      const mine = path.join(mkdtempSync(path.join(dir, 'ox-')), 'x');
      await extractBundle(m.file, mine, { keyring: m.keyring, ...(m.key && { deviceKey: m.key }) });
      expect(tree(mine), m.name).toEqual(tree(rx.dir));
    });
  }
});

describe('tampered corpus: rauc refuses, so do we, naming the part', () => {
  function variant(m: Made, tag: string, edit: (b: Buffer) => void): string {
    const b = Buffer.from(readFileSync(m.file));
    edit(b);
    const f = path.join(dir, `${path.basename(m.file, '.raucb')}-${tag}.raucb`);
    writeFileSync(f, b);
    return f;
  }
  const flip = (b: Buffer, at: number): void => void b.writeUInt8(b.readUInt8(at) ^ 0x01, at);

  async function refusal(m: Made, file: string, keyring = m.keyring): Promise<{ code?: string; message?: string; where?: string }> {
    return ours(m, file, keyring).then(
      () => ({}),
      (e: unknown) => e as { code: string; message: string; where?: string },
    );
  }

  for (const [name] of recipes) {
    it(`${name}: payload byte, signature byte, another CA`, async () => {
      const m = corpus.get(name) as Made;
      const good = await ours(m);
      const payload = variant(m, 'payload', (b) => flip(b, Math.floor(good.sizes.payload / 2)));
      expect(raucExtract(m, payload).code, `${m.name}: rauc accepted a payload byte`).not.toBe(0);
      const p = await refusal(m, payload);
      expect(p.code, m.name).toBe('LAMA_E_BUNDLE_PAYLOAD_TAMPERED');
      expect(p.message).toMatch(/payload/);
      expect(p.where).toContain(payload);

      const sig = variant(m, 'sig', (b) => flip(b, b.length - 8 - 20));
      expect(raucInfo(m, sig).code, `${m.name}: rauc accepted a signature byte`).not.toBe(0);
      const s = await refusal(m, sig);
      expect(s.code, m.name).toBe('LAMA_E_BUNDLE_BAD_SIGNATURE');
      expect(s.message).toMatch(/signature/);

      const other = m.keyring === pki.ca ? { keyring: pki.otherCa, conf: pki.otherConf } : { keyring: pki.ca, conf: pki.conf };
      expect(raucInfo(m, m.file, other.keyring, other.conf).code, `${m.name}: rauc trusted another CA`).not.toBe(0);
      expect((await refusal(m, m.file, other.keyring)).code, m.name).toBe('LAMA_E_BUNDLE_UNTRUSTED_SIGNER');
    });
  }

  it('a keyring holding only the intermediate CA: rauc refuses (no partial chains), so do we', async () => {
    const m = corpus.get('verity, one --intermediate') as Made;
    expect(raucInfo(m, m.file, x.int).code).not.toBe(0);
    const e = await refusal(m, m.file, x.int);
    expect(e.code).toBe('LAMA_E_BUNDLE_UNTRUSTED_SIGNER');
    expect(e.message).toMatch(/chains only to keyring certificate CN=int, which is not a self-signed root/);
  });

  it('two signers (openssl cms -resign): rauc 1.8 refuses, so do we', async () => {
    const m = corpus.get('verity') as Made;
    const b = readFileSync(m.file);
    const n = Number(b.readBigUInt64BE(b.length - 8));
    const cms = path.join(dir, 'one-signer.cms');
    writeFileSync(cms, b.subarray(b.length - 8 - n, b.length - 8));
    const two = path.join(dir, 'two-signers.cms');
    const r = spawnSync('openssl', ['cms', '-resign', '-inform', 'DER', '-in', cms, '-signer', x.ecSigner, '-inkey', x.ecSignerKey, '-binary', '-nosmimecap', '-outform', 'DER', '-out', two]);
    expect(r.status, String(r.stderr)).toBe(0);
    const sd = readFileSync(two);
    const size = Buffer.alloc(8);
    size.writeBigUInt64BE(BigInt(sd.length));
    const f = path.join(dir, 'two-signers.raucb');
    writeFileSync(f, Buffer.concat([b.subarray(0, b.length - 8 - n), sd, size]));
    const info = raucInfo(m, f);
    expect(info.code).not.toBe(0);
    expect(info.out).toMatch(/Unsupported number of signers: 2/);
    const e = await refusal(m, f);
    expect(e).toMatchObject({ code: 'LAMA_E_BUNDLE_BAD_SIGNATURE', message: expect.stringMatching(/2 signers/) as unknown });
  });

  it('a casync index that disagrees with the signed image size is refused by name', async () => {
    const { parseCasyncIndex } = await import('../../src/rauc/casync.js');
    const m = corpus.get('casync, verity format, blob and archive indexes') as Made;
    const out = path.join(mkdtempSync(path.join(dir, 'cx-')), 'x');
    expect(raucExtract(m).code).toBe(0);
    await extractBundle(m.file, out, { keyring: m.keyring });
    const idx = readFileSync(path.join(out, 'rootfs.img.caibx'));
    expect(parseCasyncIndex(idx, 'caibx', 'rootfs.img.caibx')).toMatchObject({ size: 6 * 1024 * 1024, chunkDigest: 'sha512-256' });
    const args = await inspectBundle(file('casync-args'), { keyring: pki.ca });
    expect(args.manifest.images.find((i) => i.slotClass === 'rootfs')?.casync).toMatchObject({ kind: 'caibx', chunkDigest: 'sha256', indexSize: 6 * 1024 * 1024 });
    const cut = Buffer.from(idx);
    cut.writeBigUInt64LE(0x1234n, cut.length - 8);
    expect(() => parseCasyncIndex(cut, 'caibx', 'i')).toThrow(expect.objectContaining({ code: 'LAMA_E_BUNDLE_CASYNC_INDEX', where: `i@${cut.length - 8}` }) as Error);
  });
});

describe('casync bundles with their chunk store', () => {
  it('verify --casync-store rebuilds every blob image with casync and checks its sha256; a damaged chunk is refused by name', async () => {
    const m = corpus.get('casync, verity format, blob and archive indexes') as Made;
    const store = m.file.replace(/\.raucb$/, '.castr');
    const ok = await runCli(['--json', 'bundle', 'verify', '--keyring', m.keyring, '--casync-store', store, m.file]);
    expect(ok.code, ok.stderr).toBe(0);
    const i = JSON.parse(ok.stdout) as Awaited<ReturnType<typeof inspectBundle>>;
    expect(i.manifest.images.map((img) => [img.slotClass, img.casync?.kind, img.casync?.rebuilt])).toEqual([
      ['rootfs', 'caibx', true],
      ['efi', 'caibx', true],
      ['appfs', 'caidx', undefined],
    ]);
    expect(i.unchecked).toEqual([expect.stringMatching(/^\[appfs\] app\.tar\.caidx: the image's sha256 and size are those of the tar archive/)]);
    const bad = path.join(dir, 'damaged.castr');
    expect(spawnSync('cp', ['-r', store, bad]).status).toBe(0);
    const chunk = readdirSync(bad, { recursive: true, withFileTypes: true }).find((f) => f.name.endsWith('.cacnk'));
    expect(chunk).toBeDefined();
    writeFileSync(path.join(chunk?.parentPath ?? '', chunk?.name ?? ''), 'not a chunk');
    const r = await runCli(['bundle', 'verify', '--keyring', m.keyring, '--casync-store', bad, m.file]);
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/casync cannot rebuild \S+\.caibx from the chunk store .*damaged\.castr: .*\[LAMA_E_BUNDLE_CASYNC_STORE\]/);
    expect(r.stdout).toBe('');
  });
});

describe('EC recipients from us', () => {
  it('bundle encrypt --to an EC certificate: rauc info and rauc extract open it with the EC key', async () => {
    const crypt = path.join(dir, 'crypt.raucb');
    const out = path.join(dir, 'ours-ec.raucb');
    const r = await runCli(['bundle', 'encrypt', crypt, '-o', out, '--to', x.ecDevice, '--to', pki.device]);
    expect(r.code, r.stderr).toBe(0);
    const m: Made = { name: 'ours-ec', file: out, key: x.ecDeviceKey, keyring: pki.ca, conf: pki.conf };
    const info = raucInfo(m);
    expect(info.code, info.out).toBe(0);
    expect(raucInfo({ ...m, key: pki.deviceKey }).code).toBe(0);
    expect(raucInfo({ ...m, key: x.ecDevice2Key }).code).not.toBe(0);
    const rx = raucExtract(m);
    expect(rx.code, rx.out).toBe(0);
    expect(readFileSync(path.join(rx.dir, 'rootfs.img')).equals(readFileSync(path.join(images, 'rootfs.img')))).toBe(true);
    const i = await inspectBundle(out, { keyring: pki.ca, deviceKey: x.ecDeviceKey });
    expect(i.recipients?.map((p) => p.keyEncryption)).toEqual(['1.3.133.16.840.63.0.2', '1.2.840.113549.1.1.7']);
    await expect(inspectBundle(out, { keyring: pki.ca, deviceKey: x.ecDevice2Key })).rejects.toMatchObject({ code: 'LAMA_E_BUNDLE_WRONG_DEVICE_KEY' });
    // Re-encrypting with the EC key as the current recipient.
    const again = path.join(dir, 'ours-ec2.raucb');
    await encryptBundle(out, again, [x.ecDevice2], { deviceKey: x.ecDeviceKey, deviceCert: x.ecDevice });
    expect(raucInfo({ ...m, file: again, key: x.ecDevice2Key }).code).toBe(0);
  });
});
