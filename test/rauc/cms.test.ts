import { execFileSync } from 'node:child_process';
import { readFileSync, rmSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { decryptEnvelope, envelope, signEmbedded, verifyEmbedded } from '../../src/rauc/cms.js';
import { addPkiExtras, makePki, type Pki, type PkiExtras } from './pki.js';

let pki: Pki;
let x: PkiExtras;
beforeAll(() => {
  pki = makePki();
  x = addPkiExtras(pki);
});
afterAll(() => rmSync(pki.dir, { recursive: true, force: true }));

const signer = (): { certPem: string; keyPem: string } => ({ certPem: readFileSync(pki.cert, 'utf8'), keyPem: readFileSync(pki.key, 'utf8') });
const T = new Date('2026-03-01T12:00:00Z');

describe('CMS SignedData', () => {
  it('openssl cms -verify accepts our embedded signature and returns the content', () => {
    const der = signEmbedded(Buffer.from('[update]\ncompatible=x\n'), signer(), T);
    const f = path.join(pki.dir, 'sig.der');
    writeFileSync(f, der);
    const out = execFileSync('openssl', ['cms', '-verify', '-inform', 'DER', '-in', f, '-CAfile', pki.ca, '-purpose', 'any', '-binary'], { stdio: ['ignore', 'pipe', 'ignore'] });
    expect(out.toString()).toBe('[update]\ncompatible=x\n');
  });

  it('verifies an openssl-made signature and reports signer chain and signing time', () => {
    const f = path.join(pki.dir, 'content.txt');
    writeFileSync(f, 'abc');
    const der = execFileSync('openssl', ['cms', '-sign', '-binary', '-nosmimecap', '-nodetach', '-outform', 'DER', '-in', f, '-signer', pki.cert, '-inkey', pki.key, '-md', 'sha256']);
    const v = verifyEmbedded(der, pki.caPem);
    expect(v.content.toString()).toBe('abc');
    expect(v.chain.map((c) => c.subject)).toEqual(['CN=signer', 'CN=ca']);
    expect(v.signingTime).toBeInstanceOf(Date);
  });

  it('signs with an EC (P-256) key as well; openssl verifies it', () => {
    const run = (args: string[]): void => void execFileSync('openssl', args, { cwd: pki.dir, stdio: 'ignore' });
    run(['req', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', 'ec.key', '-out', 'ec.csr', '-subj', '/CN=ec-signer']);
    writeFileSync(path.join(pki.dir, 'ec.ext'), 'extendedKeyUsage=codeSigning\n');
    run(['x509', '-req', '-in', 'ec.csr', '-CA', 'ca.pem', '-CAkey', 'ca.key', '-CAcreateserial', '-out', 'ec.pem', '-days', '30', '-extfile', 'ec.ext']);
    const der = signEmbedded(Buffer.from('ec content'), { certPem: readFileSync(path.join(pki.dir, 'ec.pem'), 'utf8'), keyPem: readFileSync(path.join(pki.dir, 'ec.key'), 'utf8') }, T);
    const f = path.join(pki.dir, 'ec.der');
    writeFileSync(f, der);
    const out = execFileSync('openssl', ['cms', '-verify', '-inform', 'DER', '-in', f, '-CAfile', pki.ca, '-purpose', 'any', '-binary'], { stdio: ['ignore', 'pipe', 'ignore'] });
    expect(out.toString()).toBe('ec content');
    expect(verifyEmbedded(der, pki.caPem).chain[0]?.subject).toBe('CN=ec-signer');
  });

  it('is deterministic for a fixed signing time', () => {
    expect(signEmbedded(Buffer.from('m'), signer(), T)).toEqual(signEmbedded(Buffer.from('m'), signer(), T));
  });

  it('checks certificate validity now, or at the signing time like RAUC use-bundle-signing-time', () => {
    const early = signEmbedded(Buffer.from('m'), signer(), new Date('2001-01-01T00:00:00Z'));
    expect(verifyEmbedded(early, pki.caPem).content.toString()).toBe('m');
    expect(() => verifyEmbedded(early, pki.caPem, true)).toThrow(expect.objectContaining({ code: 'LAMA_E_BUNDLE_UNTRUSTED_SIGNER', message: expect.stringMatching(/not valid at 2001/) }));
  });

  it('rejects another CA as untrusted', () => {
    const der = signEmbedded(Buffer.from('m'), signer(), T);
    expect(() => verifyEmbedded(der, readFileSync(pki.otherCa, 'utf8'))).toThrow(expect.objectContaining({ code: 'LAMA_E_BUNDLE_UNTRUSTED_SIGNER' }));
  });

  it('rejects a changed manifest and a changed signature value with distinct codes', () => {
    const der = signEmbedded(Buffer.from('[update]\ncompatible=x\n'), signer(), T);
    const m = Buffer.from(der);
    const at = m.indexOf('compatible=x');
    m.writeUInt8(m.readUInt8(at) ^ 1, at);
    expect(() => verifyEmbedded(m, pki.caPem)).toThrow(expect.objectContaining({ code: 'LAMA_E_BUNDLE_MANIFEST_TAMPERED' }));
    const s = Buffer.from(der);
    s.writeUInt8(s.readUInt8(s.length - 10) ^ 1, s.length - 10);
    expect(() => verifyEmbedded(s, pki.caPem)).toThrow(expect.objectContaining({ code: 'LAMA_E_BUNDLE_BAD_SIGNATURE' }));
  });
});

describe('CMS EnvelopedData', () => {
  it('openssl cms -decrypt opens our envelope; we open openssl\'s (PKCS#1 v1.5) one', () => {
    const env = envelope(Buffer.from('secret signed data'), [readFileSync(pki.device, 'utf8'), readFileSync(pki.device2, 'utf8')]);
    const f = path.join(pki.dir, 'env.der');
    writeFileSync(f, env);
    for (const [c, k] of [[pki.device, pki.deviceKey], [pki.device2, pki.device2Key]] as const) {
      const out = execFileSync('openssl', ['cms', '-decrypt', '-binary', '-inform', 'DER', '-in', f, '-recip', c, '-inkey', k]);
      expect(out.toString()).toBe('secret signed data');
    }
    const plain = path.join(pki.dir, 'plain.bin');
    writeFileSync(plain, 'from openssl');
    const theirs = execFileSync('openssl', ['cms', '-encrypt', '-binary', '-aes-256-cbc', '-outform', 'DER', '-in', plain, pki.device]);
    expect(decryptEnvelope(theirs, readFileSync(pki.deviceKey, 'utf8'), readFileSync(pki.device, 'utf8')).toString()).toBe('from openssl');
    expect(() => decryptEnvelope(theirs, readFileSync(pki.device2Key, 'utf8'))).toThrow(expect.objectContaining({ code: 'LAMA_E_BUNDLE_WRONG_DEVICE_KEY' }));
  });

  it('EC recipients (ECDH key agreement): openssl opens ours with the EC key; we open openssl\'s, RSA and EC mixed', () => {
    const env = envelope(Buffer.from('signed data for EC'), [readFileSync(x.ecDevice, 'utf8'), readFileSync(pki.device, 'utf8')]);
    const f = path.join(pki.dir, 'env-ec.der');
    writeFileSync(f, env);
    const out = execFileSync('openssl', ['cms', '-decrypt', '-binary', '-inform', 'DER', '-in', f, '-recip', x.ecDevice, '-inkey', x.ecDeviceKey]);
    expect(out.toString()).toBe('signed data for EC');
    const printed = execFileSync('openssl', ['cms', '-cmsout', '-print', '-inform', 'DER', '-in', f]).toString();
    expect(printed).toMatch(/d\.kari:[\s\S]*dhSinglePass-stdDH-sha1kdf-scheme[\s\S]*id-aes256-wrap/);
    const plain = path.join(pki.dir, 'plain-ec.bin');
    writeFileSync(plain, 'from openssl to EC');
    const theirs = execFileSync('openssl', ['cms', '-encrypt', '-binary', '-aes-256-cbc', '-outform', 'DER', '-in', plain, pki.device, x.ecDevice, x.ecDevice2]);
    for (const [key, cert] of [[x.ecDeviceKey, x.ecDevice], [x.ecDevice2Key, undefined], [pki.deviceKey, undefined]] as const) {
      expect(decryptEnvelope(theirs, readFileSync(key, 'utf8'), cert && readFileSync(cert, 'utf8')).toString()).toBe('from openssl to EC');
    }
    const alone = execFileSync('openssl', ['cms', '-encrypt', '-binary', '-aes-256-cbc', '-outform', 'DER', '-in', plain, x.ecDevice2]);
    expect(() => decryptEnvelope(alone, readFileSync(x.ecDeviceKey, 'utf8'))).toThrow(expect.objectContaining({ code: 'LAMA_E_BUNDLE_WRONG_DEVICE_KEY' }));
    const damaged = Buffer.from(alone);
    damaged.writeUInt8(damaged.readUInt8(damaged.length - 3) ^ 1, damaged.length - 3);
    expect(() => decryptEnvelope(damaged, readFileSync(x.ecDevice2Key, 'utf8'))).toThrow(expect.objectContaining({ code: 'LAMA_E_BUNDLE_BAD_SIGNATURE', message: expect.stringMatching(/damaged/) }));
  });
});
