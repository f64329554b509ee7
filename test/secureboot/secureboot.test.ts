import { readFileSync, existsSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createCertificate } from '../../src/keys/index.js';
import { buildUki } from '../../src/uki/index.js';
import {
  GUID,
  addStoreVariables,
  listStoreVariables,
  loadCertificate,
  makeAuthVariable,
  makeEsl,
  makeOvmfVars,
  parseEsl,
  readOvmfVars,
  signPe,
  verifyAuthVariable,
} from '../../src/secureboot/index.js';
import { runCli } from '../helpers/cli.js';
import { STUB, opensslCert, tempDir, tool } from '../uki/helpers.js';

const t = tempDir('lamadist-sb-');
let pk: { cert: string; key: string };
let kek: { cert: string; key: string };
let db: { cert: string; key: string };
const OWNER = '35c94b5d-876c-4956-b8f6-5a12f0c87de0';

beforeAll(() => {
  pk = opensslCert(t.dir, 'PK');
  kek = opensslCert(t.dir, 'KEK');
  db = opensslCert(t.dir, 'db');
});
afterAll(() => t.remove());

const keys = (p: { cert: string; key: string }): { certPem: Buffer; keyPem: Buffer } => ({ certPem: readFileSync(p.cert), keyPem: readFileSync(p.key) });

describe('EFI signature lists', () => {
  it('efitools sig-list-to-certs extracts our certificate and owner', () => {
    const esl = makeEsl(readFileSync(db.cert), OWNER);
    writeFileSync(path.join(t.dir, 'db.esl'), esl);
    const r = tool('sig-list-to-certs', [path.join(t.dir, 'db.esl'), path.join(t.dir, 'dbout')]);
    expect(r.code).toBe(0);
    expect(r.out).toContain(OWNER);
    expect(readFileSync(path.join(t.dir, 'dbout-0.der')).equals(loadCertificate(readFileSync(db.cert)).der)).toBe(true);
  });

  it('parses what efitools cert-to-efi-sig-list writes', () => {
    const out = path.join(t.dir, 'peer.esl');
    expect(tool('cert-to-efi-sig-list', ['-g', OWNER, pk.cert, out]).code).toBe(0);
    const peer = readFileSync(out);
    expect(peer.equals(makeEsl(readFileSync(pk.cert), OWNER))).toBe(true);
    expect(parseEsl(peer)[0]).toMatchObject({ type: GUID.certX509, owner: OWNER });
  });
});

describe('authenticated variables', () => {
  const when = new Date('2026-03-04T05:06:07Z');
  for (const [name, signerName] of [['PK', 'PK'], ['KEK', 'PK'], ['db', 'KEK']] as const) {
    it(`${name}.auth signed by ${signerName} is byte-identical to efitools sign-efi-sig-list`, () => {
      const certs = { PK: pk, KEK: kek, db };
      const signer = certs[signerName];
      const esl = makeEsl(readFileSync(certs[name].cert), OWNER);
      const eslPath = path.join(t.dir, `${name}.esl`);
      writeFileSync(eslPath, esl);
      const ours = makeAuthVariable({ name, data: esl, signer: keys(signer), timestamp: when });
      const peerPath = path.join(t.dir, `${name}.peer.auth`);
      const r = tool('sign-efi-sig-list', ['-t', '2026-03-04 05:06:07', '-k', signer.key, '-c', signer.cert, name, eslPath, peerPath]);
      expect(r.code, r.out).toBe(0);
      expect(ours.equals(readFileSync(peerPath))).toBe(true);
      expect(verifyAuthVariable(ours, name, readFileSync(signer.cert)).data.equals(esl)).toBe(true);
      const wrong = signerName === 'PK' ? kek : pk;
      expect(() => verifyAuthVariable(ours, name, readFileSync(wrong.cert))).toThrow(expect.objectContaining({ code: 'LAMA_E_UNTRUSTED_SIGNER' }));
      const tampered = Buffer.from(ours);
      tampered.writeUInt8(tampered.readUInt8(tampered.length - 10) ^ 1, tampered.length - 10);
      expect(() => verifyAuthVariable(tampered, name, readFileSync(signer.cert))).toThrow(/signature does not verify/);
    });
  }
});

describe('OVMF variable store', () => {
  it('enrolls PK/KEK/db with Secure Boot enabled and leaves the rest of the template intact', async () => {
    const out = path.join(t.dir, 'vars.fd');
    await makeOvmfVars({ template: '/usr/share/OVMF/OVMF_VARS_4M.fd', out, pk: pk.cert, kek: kek.cert, db: db.cert, owner: OWNER });
    const image = readFileSync(out);
    const template = readFileSync('/usr/share/OVMF/OVMF_VARS_4M.fd');
    expect(image.length).toBe(template.length);
    const vars = await readOvmfVars(out);
    expect(vars.map((v) => v.name).sort()).toEqual(['CustomMode', 'KEK', 'PK', 'SecureBootEnable', 'db']);
    expect(vars.find((v) => v.name === 'db')).toMatchObject({ guid: GUID.imageSecurityDatabase, certificates: ['CN=db'] });
    const stored = listStoreVariables(image);
    expect(stored.find((v) => v.name === 'PK')?.attributes).toBe(0x27);
    const end = stored[stored.length - 1]!;
    const used = end.offset + 60 + (end.name.length + 1) * 2 + end.data.length;
    expect(image.subarray(used + 4).equals(template.subarray(used + 4))).toBe(true);
    expect(image.subarray(0, 0x64).equals(template.subarray(0, 0x64))).toBe(true);
  });

  it('replacing keys in a store that has some marks the old variables deleted', () => {
    const ms = readFileSync('/usr/share/OVMF/OVMF_VARS_4M.ms.fd');
    const out = addStoreVariables(ms, [{ name: 'PK', guid: GUID.globalVariable, attributes: 0x27, data: makeEsl(readFileSync(pk.cert), OWNER) }]);
    const pks = listStoreVariables(out).filter((v) => v.name === 'PK');
    expect(pks.map((v) => v.state)).toEqual([0x3d, 0x3f]);
  });

  it('refuses a file that is not a variable store', async () => {
    writeFileSync(path.join(t.dir, 'junk.fd'), Buffer.alloc(4096));
    await expect(makeOvmfVars({ template: path.join(t.dir, 'junk.fd'), out: path.join(t.dir, 'x.fd'), pk: pk.cert, kek: kek.cert, db: db.cert })).rejects.toMatchObject({ code: 'LAMA_E_BAD_VARSTORE' });
    expect(existsSync(path.join(t.dir, 'x.fd'))).toBe(false);
  });
});

describe('expired certificates', () => {
  it('signing with an expired certificate is a one-line error and writes nothing', async () => {
    const expired = await createCertificate({ commonName: 'old db', notBefore: new Date('2020-01-01T00:00:00Z'), notAfter: new Date('2021-01-01T00:00:00Z') });
    writeFileSync(path.join(t.dir, 'old.crt'), expired.certPem);
    writeFileSync(path.join(t.dir, 'old.key'), expired.keyPem, { mode: 0o600 });
    const uki = await buildUki({ stub: STUB, kernel: Buffer.alloc(4096, 1), cmdline: 'x' });
    expect(() => signPe(uki, { certPem: expired.certPem, keyPem: expired.keyPem })).toThrow(expect.objectContaining({ code: 'LAMA_E_CERT_EXPIRED' }));
    writeFileSync(path.join(t.dir, 'u.efi'), uki);
    const r = await runCli(['sign', 'efi', path.join(t.dir, 'u.efi'), '--cert', path.join(t.dir, 'old.crt'), '--key', path.join(t.dir, 'old.key'), '-o', path.join(t.dir, 'u.signed.efi')]);
    expect(r.code).toBe(2);
    expect(r.stderr.trim().split('\n')).toEqual([expect.stringMatching(/certificate CN=old db expired on 2021-01-01.*LAMA_E_CERT_EXPIRED/)]);
    expect(existsSync(path.join(t.dir, 'u.signed.efi'))).toBe(false);
  });

  it('a key that does not belong to the certificate is refused', () => {
    expect(() => signPe(Buffer.alloc(0), { certPem: readFileSync(db.cert), keyPem: readFileSync(pk.key) })).toThrow(expect.objectContaining({ code: 'LAMA_E_KEY_MISMATCH' }));
  });
});
