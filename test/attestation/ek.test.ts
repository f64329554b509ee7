import { randomBytes } from 'node:crypto';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { loadEkTrust, makeCredential, parseEkCertificate, parseEkPublic, verifyEkCertificate, type EkTrust } from '../../src/attestation/ek.js';
import { createAk, manufactureSwtpm, startSwtpm, type Swtpm } from '../../src/fuzz/swtpm.js';
import { run } from '../../src/util/proc.js';
import { userErrorOf } from '../helpers/errors.js';
import { activateOnTpm, credentialFile, readEkCert } from './ek-tpm.js';

let dir: string;
let tpm: Swtpm;
let trust: EkTrust;
let otherTrust: EkTrust;
let ekCert: Buffer;
let otherEkCert: Buffer;
const ak: Record<'rsa' | 'ecc', { context: string; public: Buffer; name: Buffer; ekPublic: Buffer }> = {} as never;

/** An openssl-made CA or certificate for the cases swtpm_localca does not make. */
async function openssl(args: string[]): Promise<void> {
  await run('openssl', args, { cwd: dir });
}

beforeAll(async () => {
  dir = await fs.mkdtemp(path.join(os.tmpdir(), 'lamadist-ek-'));
  const ca = await manufactureSwtpm(path.join(dir, 'tpm'), path.join(dir, 'ca'));
  trust = loadEkTrust(await fs.readFile(ca.caBundle, 'utf8'), ca.caBundle);
  // A second TPM from the same CA (its EK certificate certifies another key) and a third from another CA.
  await manufactureSwtpm(path.join(dir, 'tpm2'), path.join(dir, 'ca'));
  const other = await manufactureSwtpm(path.join(dir, 'tpm3'), path.join(dir, 'other-ca'));
  otherTrust = loadEkTrust(await fs.readFile(other.caBundle, 'utf8'), other.caBundle);
  for (const t of ['tpm2', 'tpm3']) {
    const s = await startSwtpm(path.join(dir, t));
    try {
      const der = await readEkCert(s, 'rsa', dir);
      if (t === 'tpm2') otherEkCert = der;
    } finally {
      await s.close();
    }
  }
  tpm = await startSwtpm(path.join(dir, 'tpm'));
  ekCert = await readEkCert(tpm, 'rsa', dir);
  ak.rsa = await createAk(tpm, dir, 'ecdsa', 0x81010050, 'rsa');
  ak.ecc = await createAk(tpm, dir, 'ecdsa', 0x81010051, 'ecc');
}, 120_000);

afterAll(async () => {
  await tpm?.close();
  await fs.rm(dir, { recursive: true, force: true });
});

describe('endorsement key public area', () => {
  it('decodes the RSA and ECC EKs tpm2_createek makes, with their AES-128-CFB protection', () => {
    const rsa = parseEkPublic(ak.rsa.ekPublic);
    expect([rsa.type, rsa.hash, rsa.symmetric]).toEqual(['rsa', 'sha256', { alg: 0x0006, keyBits: 128, mode: 0x0043 }]);
    const ecc = parseEkPublic(ak.ecc.ekPublic);
    expect([ecc.type, ecc.point?.x.length]).toEqual(['ecc', 32]);
  });

  it('refuses an attestation key (a signing key) and a truncated area', () => {
    const e = userErrorOf(() => parseEkPublic(ak.rsa.public));
    expect(e.code).toBe('LAMA_E_ATTEST_EK');
    expect(e.message).toMatch(/^not an endorsement key: objectAttributes 0x[0-9a-f]+ lack decrypt$/);
    expect(userErrorOf(() => parseEkPublic(ak.rsa.ekPublic.subarray(2, 40))).code).toBe('LAMA_E_ATTEST_TRUNCATED');
  });
});

describe('EK certificate chain (swtpm_setup --create-ek-cert, swtpm_localca)', () => {
  it('the certificate in NV index 0x01c00002 chains to the local CA and certifies the RSA EK', () => {
    const c = parseEkCertificate(ekCert);
    expect(c.info.issuer).toBe('CN=swtpm-localca');
    expect(c.info.tpm).toEqual({ manufacturer: 'id:00001014', model: 'swtpm', version: 'id:20191023' });
    // Its subjectAltName is critical: handled, so not a reason to refuse.
    expect(verifyEkCertificate(c, trust, parseEkPublic(ak.rsa.ekPublic))).toEqual(['CN=unknown', 'CN=swtpm-localca', 'CN=swtpm-localca-rootca']);
  });

  it('padding after the certificate (a larger NV index) is dropped; other trailing bytes or garbage are refused', () => {
    expect(parseEkCertificate(Buffer.concat([ekCert, Buffer.alloc(64, 0xff)])).der).toEqual(ekCert);
    expect(userErrorOf(() => parseEkCertificate(Buffer.concat([ekCert, Buffer.from([1])]))).code).toBe('LAMA_E_ATTEST_EK_CERT');
    expect(userErrorOf(() => parseEkCertificate(ekCert.subarray(0, 500))).message).toBe('EK certificate: DER says 1016 bytes, only 500 were sent');
    expect(userErrorOf(() => parseEkCertificate(randomBytes(100))).code).toBe('LAMA_E_ATTEST_EK_CERT');
  });

  it('an EK certificate of another CA is refused', () => {
    const e = userErrorOf(() => verifyEkCertificate(parseEkCertificate(ekCert), otherTrust, parseEkPublic(ak.rsa.ekPublic)));
    expect(e.line()).toBe('EK certificate (issuer CN=swtpm-localca) is not signed by a trusted EK CA [LAMA_E_ATTEST_EK_CHAIN]');
  });

  it('an EK certificate of the trusted CA for another TPM\'s EK is refused', () => {
    const e = userErrorOf(() => verifyEkCertificate(parseEkCertificate(otherEkCert), trust, parseEkPublic(ak.rsa.ekPublic)));
    expect(e.code).toBe('LAMA_E_ATTEST_EK_MISMATCH');
  });

  it('outside its validity the chain is refused', () => {
    const e = userErrorOf(() => verifyEkCertificate(parseEkCertificate(ekCert), trust, parseEkPublic(ak.rsa.ekPublic), new Date('2020-01-01T00:00:00Z')));
    expect(e.code).toBe('LAMA_E_ATTEST_EK_CHAIN');
    expect(e.message).toMatch(/^EK certificate is valid from .* not at 2020-01-01T00:00:00.000Z$/);
  });

  it('an unprocessed critical extension, a CA path length exceeded, and a bundle with a non-CA are refused', async () => {
    const ekPub = parseEkPublic(ak.rsa.ekPublic);
    await fs.writeFile(path.join(dir, 'ek.pem'), ekPub.key.export({ type: 'spki', format: 'pem' }));
    await fs.writeFile(path.join(dir, 'ca.ext'), 'basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign\n');
    await fs.writeFile(path.join(dir, 'leaf.ext'), 'basicConstraints=critical,CA:FALSE\n');
    await fs.writeFile(path.join(dir, 'critical.ext'), 'basicConstraints=critical,CA:FALSE\n1.2.3.4=critical,ASN1:NULL\n');
    await fs.writeFile(path.join(dir, 'notca.ext'), 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,keyCertSign\n');
    const ec = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes'];
    await openssl(['req', '-new', '-x509', ...ec, '-keyout', 'root.key', '-out', 'root.pem', '-subj', '/CN=root', '-days', '30', '-addext', 'basicConstraints=critical,CA:TRUE,pathlen:0', '-addext', 'keyUsage=critical,keyCertSign']);
    await openssl(['req', '-new', ...ec, '-keyout', 'sub.key', '-out', 'sub.csr', '-subj', '/CN=sub']);
    /** `csr` signed by `issuer` with the extensions of `ext`, for `pub`'s key when given. */
    const sign = async (out: string, csr: string, issuer: string, ext: string, pub?: string): Promise<Buffer> => {
      await openssl(['x509', '-req', '-in', csr, '-CA', `${issuer}.pem`, '-CAkey', `${issuer}.key`, '-set_serial', '7', '-days', '30', '-extfile', ext, '-out', out, '-outform', 'DER', ...(pub ? ['-force_pubkey', pub] : [])]);
      return fs.readFile(path.join(dir, out));
    };
    const rootPem = await fs.readFile(path.join(dir, 'root.pem'), 'utf8');
    const rootOnly = loadEkTrust(rootPem, 'root.pem');

    const critical = await sign('critical.der', 'sub.csr', 'root', 'critical.ext', 'ek.pem');
    expect(userErrorOf(() => verifyEkCertificate(parseEkCertificate(critical), rootOnly, ekPub)).line()).toBe(
      'EK certificate has critical extension 1.2.3.4, which this check does not process [LAMA_E_ATTEST_EK_CHAIN]',
    );
    // The same certificate without it verifies: the refusal is the extension's.
    expect(verifyEkCertificate(parseEkCertificate(await sign('plain.der', 'sub.csr', 'root', 'leaf.ext', 'ek.pem')), rootOnly, ekPub)).toEqual(['CN=sub', 'CN=root']);

    // root (pathlen:0) → sub CA → EK certificate: one CA below the root, which allows none.
    await sign('sub.der', 'sub.csr', 'root', 'ca.ext');
    await openssl(['x509', '-in', 'sub.der', '-inform', 'DER', '-out', 'sub.pem']);
    const subPem = await fs.readFile(path.join(dir, 'sub.pem'), 'utf8');
    const deep = await sign('deep.der', 'sub.csr', 'sub', 'leaf.ext', 'ek.pem');
    expect(userErrorOf(() => verifyEkCertificate(parseEkCertificate(deep), loadEkTrust(rootPem + subPem, 'bundle.pem'), ekPub)).line()).toBe(
      'CN=root allows 0 CAs below it, the chain has 1 [LAMA_E_ATTEST_EK_CHAIN]',
    );

    await sign('notca.der', 'sub.csr', 'root', 'notca.ext');
    await openssl(['x509', '-in', 'notca.der', '-inform', 'DER', '-out', 'notca.pem']);
    const notCa = await fs.readFile(path.join(dir, 'notca.pem'), 'utf8');
    expect(userErrorOf(() => loadEkTrust(rootPem + notCa, 'bundle.pem')).line()).toBe('bundle.pem: certificate 2 (CN=sub) is not a CA (basicConstraints) [LAMA_E_ATTEST_EK_CA]');
    expect(userErrorOf(() => loadEkTrust(subPem, 'sub.pem')).line()).toBe('sub.pem: holds no self-signed root certificate [LAMA_E_ATTEST_EK_CA]');
  });
});

describe('TPM2_MakeCredential in TypeScript, activated by swtpm', () => {
  it.each(['rsa', 'ecc'] as const)('tpm2_activatecredential recovers the secret made for an AK under the %s EK', async (alg) => {
    const secret = randomBytes(32);
    const ek = parseEkPublic(ak[alg].ekPublic);
    const cred = makeCredential(ek, ak[alg].name, secret);
    expect(await activateOnTpm(tpm, dir, alg, ak[alg].context, credentialFile(cred))).toEqual(secret);
    // Framed as tpm2_makecredential frames it (made here without a TPM: -T none).
    await fs.writeFile(path.join(dir, 'secret'), secret);
    await fs.writeFile(path.join(dir, 'ek.pub'), ak[alg].ekPublic);
    await run('tpm2_makecredential', ['-T', 'none', '-u', 'ek.pub', '-s', 'secret', '-n', ak[alg].name.toString('hex'), '-o', 'peer.cred'], { cwd: dir });
    const peer = await fs.readFile(path.join(dir, 'peer.cred'));
    expect(credentialFile(cred).length).toBe(peer.length);
    expect(cred.credentialBlob.subarray(0, 4)).toEqual(peer.subarray(8, 12));
    expect(await activateOnTpm(tpm, dir, alg, ak[alg].context, peer)).toEqual(secret);
  });

  it('the TPM refuses a credential made for another key\'s name, or altered', async () => {
    const ek = parseEkPublic(ak.rsa.ekPublic);
    const other = makeCredential(ek, ak.ecc.name, randomBytes(32));
    await expect(activateOnTpm(tpm, dir, 'rsa', ak.rsa.context, credentialFile(other))).rejects.toThrow(/tpm2_activatecredential/);
    const altered = credentialFile(makeCredential(ek, ak.rsa.name, randomBytes(32)));
    altered[50] = (altered[50] as number) ^ 1;
    await expect(activateOnTpm(tpm, dir, 'rsa', ak.rsa.context, altered)).rejects.toThrow(/tpm2_activatecredential/);
  });
});
