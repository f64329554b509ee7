import { randomBytes } from 'node:crypto';
import { chmodSync, mkdirSync, readdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { keyPath, readManifest, type KeyManifest } from '../../src/keys/index.js';
import { signPe, verifyAuthVariable, verifyPe } from '../../src/secureboot/index.js';
import { buildUki } from '../../src/uki/index.js';
import { runCli } from '../helpers/cli.js';
import { STUB, tempDir, tool } from '../uki/helpers.js';

const t = tempDir('lamadist-keys-');
const dir = path.join(t.dir, 'keys');
const k = (f: string): string => path.join(dir, f);
let manifest: KeyManifest;

beforeAll(async () => {
  const r = await runCli(['--json', 'keys', 'init', dir]);
  expect(r.code, r.stderr).toBe(0);
  manifest = JSON.parse(r.stdout) as KeyManifest;
}, 120_000);
afterAll(() => t.remove());

describe('keys init', () => {
  it('writes every file the manifest names; private keys are 0600, nothing secret on stdout', () => {
    const purposes = manifest.files.map((f) => f.purpose);
    for (const p of ['pk', 'kek', 'db']) for (const kind of ['cert', 'key', 'esl', 'auth']) expect(purposes).toContain(`secureboot-${p}-${kind}`);
    expect(purposes).toEqual(expect.arrayContaining(['rauc-ca-cert', 'rauc-ca-key', 'rauc-signing-cert', 'rauc-signing-key', 'rpm-signing-key', 'rpm-signing-public', 'recovery-cert', 'recovery-key', 'ima-cert', 'ima-cert-der', 'ima-key']));
    for (const f of manifest.files) {
      const mode = statSync(k(f.file)).mode & 0o777;
      expect(mode, f.file).toBe(f.secret ? 0o600 : 0o644);
    }
    expect(manifest.files.filter((f) => f.secret).map((f) => f.file).sort()).toEqual(['KEK.key', 'PK.key', 'db.key', 'ima/x509_ima.key', 'rauc-ca.key', 'rauc-signing.key', 'recovery.key', 'rpm-signing.asc']);
    expect(JSON.stringify(manifest)).not.toMatch(/PRIVATE KEY/);
    expect(statSync(dir).mode & 0o777).toBe(0o700);
    expect(readdirSync(t.dir).filter((f) => f.startsWith('.keys.'))).toEqual([]);
  });

  it('openssl x509 reads the certificates with the right extensions', () => {
    const text = (f: string): string => tool('openssl', ['x509', '-in', k(f), '-noout', '-text']).out;
    expect(text('rauc-ca.crt')).toMatch(/Basic Constraints: critical\s+CA:TRUE/);
    expect(text('rauc-ca.crt')).toMatch(/Key Usage: critical\s+Digital Signature, Certificate Sign, CRL Sign/);
    expect(text('rauc-ca.crt')).toMatch(/Public-Key: \(3072 bit\)/);
    expect(text('rauc-signing.crt')).toMatch(/Extended Key Usage:\s+Code Signing/);
    expect(text('rauc-signing.crt')).toMatch(/CA:FALSE/);
    expect(text('db.crt')).toMatch(/Extended Key Usage:\s+Code Signing/);
    expect(text('PK.crt')).toMatch(/Public-Key: \(2048 bit\)/);
  });

  it('the recovery pair: a self-signed RSA 3072 key-encipherment certificate openssl reads, its key 0600', () => {
    const text = tool('openssl', ['x509', '-in', k('recovery.crt'), '-noout', '-text']);
    expect(text.code, text.out).toBe(0);
    expect(text.out).toMatch(/Public-Key: \(3072 bit\)/);
    expect(text.out).toMatch(/Key Usage: critical\s+Key Encipherment\n/);
    expect(text.out).toMatch(/Subject: CN = LamaDist Recovery Key Escrow/);
    expect(tool('openssl', ['verify', '-CAfile', k('recovery.crt'), k('recovery.crt')]).code).toBe(0);
    expect(tool('openssl', ['x509', '-in', k('recovery.crt'), '-noout', '-modulus']).out).toBe(tool('openssl', ['rsa', '-in', k('recovery.key'), '-noout', '-modulus']).out);
    expect(statSync(k('recovery.key')).mode & 0o777).toBe(0o600);
    const entries = manifest.files.filter((f) => f.purpose.startsWith('recovery-'));
    expect(entries.map((f) => [f.file, f.purpose, f.secret])).toEqual([
      ['recovery.crt', 'recovery-cert', false],
      ['recovery.key', 'recovery-key', true],
    ]);
    expect(entries[0]?.sha256).toMatch(/^[0-9a-f]{64}$/);
  });

  it('the IMA pair: an RSA 2048 digitalSignature certificate, not a CA, in PEM and DER, where meta-signing-key looks (ima/x509_ima.*)', () => {
    const text = tool('openssl', ['x509', '-inform', 'DER', '-in', k('ima/x509_ima.der'), '-noout', '-text']);
    expect(text.code, text.out).toBe(0);
    expect(text.out).toMatch(/Public-Key: \(2048 bit\)/);
    expect(text.out).toMatch(/Key Usage: critical\s+Digital Signature\n/);
    expect(text.out).toMatch(/CA:FALSE/);
    expect(text.out).toMatch(/Subject Key Identifier/);
    expect(tool('openssl', ['x509', '-inform', 'DER', '-in', k('ima/x509_ima.der'), '-noout', '-fingerprint', '-sha256']).out).toBe(tool('openssl', ['x509', '-in', k('ima/x509_ima.crt'), '-noout', '-fingerprint', '-sha256']).out);
    expect(tool('openssl', ['x509', '-in', k('ima/x509_ima.crt'), '-noout', '-modulus']).out).toBe(tool('openssl', ['rsa', '-in', k('ima/x509_ima.key'), '-noout', '-modulus']).out);
    expect(statSync(k('ima/x509_ima.key')).mode & 0o777).toBe(0o600);
    expect(manifest.files.filter((f) => f.purpose.startsWith('ima-')).map((f) => [f.file, f.purpose, f.secret])).toEqual([
      ['ima/x509_ima.crt', 'ima-cert', false],
      ['ima/x509_ima.der', 'ima-cert-der', false],
      ['ima/x509_ima.key', 'ima-key', true],
    ]);
  });

  it('openssl verify accepts the chains PK → KEK → db and RAUC CA → signing, and not across them', () => {
    expect(tool('openssl', ['verify', '-CAfile', k('PK.crt'), '-untrusted', k('KEK.crt'), k('db.crt')]).code).toBe(0);
    expect(tool('openssl', ['verify', '-CAfile', k('rauc-ca.crt'), k('rauc-signing.crt')]).code).toBe(0);
    expect(tool('openssl', ['verify', '-CAfile', k('rauc-ca.crt'), k('db.crt')]).code).not.toBe(0);
    expect(tool('openssl', ['verify', '-purpose', 'any', '-CAfile', k('rauc-ca.crt'), k('rauc-signing.crt')]).out).toMatch(/OK/);
  });

  it('gpg --show-keys accepts the RPM signing key', () => {
    const home = path.join(t.dir, 'gnupg');
    mkdirSync(home, { mode: 0o700 });
    const pub = tool('gpg', ['--homedir', home, '--show-keys', '--with-colons', k('rpm-signing.pub.asc')]);
    expect(pub.code, pub.out).toBe(0);
    const fpr = manifest.files.find((f) => f.purpose === 'rpm-signing-public')?.fingerprint;
    expect(pub.out).toContain(`fpr:::::::::${fpr}:`);
    expect(pub.out).toMatch(/^pub:[^:]*:3072:1:/m);
    const sec = tool('gpg', ['--homedir', home, '--show-keys', '--with-colons', k('rpm-signing.asc')]);
    expect(sec.out).toMatch(/^sec:/m);
  });

  it('the .auth updates verify against their signers (PK signs PK and KEK, KEK signs db)', () => {
    expect(verifyAuthVariable(readFileSync(k('PK.auth')), 'PK', readFileSync(k('PK.crt'))).data.equals(readFileSync(k('PK.esl')))).toBe(true);
    expect(verifyAuthVariable(readFileSync(k('KEK.auth')), 'KEK', readFileSync(k('PK.crt'))).data.equals(readFileSync(k('KEK.esl')))).toBe(true);
    expect(verifyAuthVariable(readFileSync(k('db.auth')), 'db', readFileSync(k('KEK.crt'))).data.equals(readFileSync(k('db.esl')))).toBe(true);
    expect(tool('sig-list-to-certs', [k('KEK.esl'), path.join(t.dir, 'kek')]).out).toContain(manifest.owner);
  });

  it('rauc info --keyring accepts a bundle rauc signed with our RAUC certificate (check-purpose=codesign)', () => {
    const content = path.join(t.dir, 'bundle');
    mkdirSync(content);
    writeFileSync(path.join(content, 'rootfs.img'), randomBytes(256 * 1024));
    writeFileSync(path.join(content, 'manifest.raucm'), '[update]\ncompatible=lamadist-x86-64\nversion=1.0\n\n[bundle]\nformat=verity\n\n[image.rootfs]\nfilename=rootfs.img\n');
    const bundle = path.join(t.dir, 'update.raucb');
    const b = tool('rauc', ['bundle', '--cert', k('rauc-signing.crt'), '--key', k('rauc-signing.key'), content, bundle]);
    expect(b.code, b.out).toBe(0);
    const conf = (ca: string): string => {
      const f = path.join(t.dir, `system-${path.basename(ca)}.conf`);
      writeFileSync(f, `[system]\ncompatible=lamadist-x86-64\nbootloader=noop\n\n[keyring]\npath=${ca}\ncheck-purpose=codesign\n`);
      return f;
    };
    const ok = tool('rauc', ['info', '--conf', conf(k('rauc-ca.crt')), '--keyring', k('rauc-ca.crt'), bundle]);
    expect(ok.code, ok.out).toBe(0);
    expect(ok.out).toMatch(/Certificate Chain:\s+0 Subject: CN = LamaDist RAUC Bundle Signing\s+Issuer: CN = LamaDist RAUC CA/);
    const bad = tool('rauc', ['info', '--conf', conf(k('PK.crt')), '--keyring', k('PK.crt'), bundle]);
    expect(bad.code).not.toBe(0);
  }, 60_000);
});

describe('Secure Boot trust with the generated keys', () => {
  it('sbverify and our verifier agree: db.crt and its issuer KEK.crt accept a db-signed UKI, the RAUC CA does not', async () => {
    const uki = signPe(await buildUki({ stub: STUB, kernel: randomBytes(8192), cmdline: 'quiet' }), { certPem: readFileSync(k('db.crt')), keyPem: readFileSync(k('db.key')) });
    const file = path.join(t.dir, 'db-signed.efi');
    writeFileSync(file, uki);
    for (const [cert, accepted] of [['db.crt', true], ['KEK.crt', true], ['rauc-ca.crt', false]] as const) {
      expect(tool('sbverify', ['--cert', k(cert), file]).code === 0, `sbverify ${cert}`).toBe(accepted);
      let ours = true;
      try {
        verifyPe(uki, readFileSync(k(cert)));
      } catch {
        ours = false;
      }
      expect(ours, `verifyPe ${cert}`).toBe(accepted);
    }
  });
});

describe('keys CLI', () => {
  it('refuses to overwrite an existing key directory without --force and changes nothing', async () => {
    const before = readFileSync(k('db.key'));
    const r = await runCli(['keys', 'init', dir]);
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/already exists.*--force.*LAMA_E_EXISTS/);
    expect(readFileSync(k('db.key')).equals(before)).toBe(true);
  });

  it('keys device issues a CA-signed encryption certificate and records it', async () => {
    const r = await runCli(['--json', 'keys', 'device', 'node01', '--dir', dir]);
    expect(r.code, r.stderr).toBe(0);
    const m = await readManifest(dir);
    expect(await keyPath(dir, 'device-cert', 'node01')).toBe(k('device-node01.crt'));
    expect(m.files.find((f) => f.file === 'device-node01.key')?.secret).toBe(true);
    expect(statSync(k('device-node01.key')).mode & 0o777).toBe(0o600);
    expect(tool('openssl', ['verify', '-CAfile', k('rauc-ca.crt'), k('device-node01.crt')]).code).toBe(0);
    expect(tool('openssl', ['x509', '-in', k('device-node01.crt'), '-noout', '-text']).out).toMatch(/Key Encipherment/);
    const again = await runCli(['keys', 'device', 'node01', '--dir', dir]);
    expect(again.code).toBe(2);
    const bad = await runCli(['keys', 'device', 'Bad/Name', '--dir', dir]);
    expect(bad.code).toBe(2);
  }, 60_000);

  it('keys device --ec issues a P-256 key-agreement certificate; rauc opens a bundle encrypted to it with its key', async () => {
    const r = await runCli(['--json', 'keys', 'device', 'node02', '--ec', '--dir', dir]);
    expect(r.code, r.stderr).toBe(0);
    expect(statSync(k('device-node02.key')).mode & 0o777).toBe(0o600);
    expect(tool('openssl', ['verify', '-CAfile', k('rauc-ca.crt'), k('device-node02.crt')]).code).toBe(0);
    const text = tool('openssl', ['x509', '-in', k('device-node02.crt'), '-noout', '-text']).out;
    expect(text).toMatch(/id-ecPublicKey[\s\S]*ASN1 OID: prime256v1/);
    expect(text).toMatch(/Key Usage: critical\s+Digital Signature, Key Agreement/);
    expect(tool('openssl', ['pkey', '-in', k('device-node02.key'), '-noout', '-text']).out).toMatch(/prime256v1/);
    const img = path.join(t.dir, 'rootfs.img');
    writeFileSync(img, randomBytes(64 * 1024));
    const bundle = path.join(t.dir, 'ec.raucb');
    const made = await runCli(['bundle', 'create', '--format', 'crypt', '--compatible', 'lamadist-x86-64', '--version', '1', '--image', `rootfs=${img}`, '--keys', dir, '--to', k('device-node02.crt'), '-o', bundle]);
    expect(made.code, made.stderr).toBe(0);
    const conf = path.join(t.dir, 'system.conf');
    writeFileSync(conf, `[system]\ncompatible=lamadist-x86-64\nbootloader=noop\n[keyring]\npath=${k('rauc-ca.crt')}\ncheck-purpose=codesign\n[slot.rootfs.0]\ndevice=/dev/null\n`);
    const info = tool('rauc', ['info', '--conf', conf, '--keyring', k('rauc-ca.crt'), '--key', k('device-node02.key'), bundle]);
    expect(info.code, info.out).toBe(0);
    expect(tool('rauc', ['info', '--conf', conf, '--keyring', k('rauc-ca.crt'), '--key', k('device-node01.key'), bundle]).code).not.toBe(0);
    const ours = await runCli(['bundle', 'verify', '--keyring', k('rauc-ca.crt'), '--key', k('device-node02.key'), bundle]);
    expect(ours.code, ours.stderr).toBe(0);
  }, 60_000);

  for (const [which, files, refusal, check] of [
    ['recovery', ['recovery.crt', 'recovery.key'], /already has a recovery key \(recovery\.key\).*--force.*\[LAMA_E_EXISTS\]$/, /Key Encipherment/],
    ['ima', ['ima/x509_ima.crt', 'ima/x509_ima.der', 'ima/x509_ima.key'], /already has an IMA key \(ima\/x509_ima\.key\).*--force.*\[LAMA_E_EXISTS\]$/, /Digital Signature/],
  ] as const) {
    it(`keys ${which} issues the pair into a directory made without it, and replaces one only with --force`, async () => {
      const old = path.join(t.dir, `pre-${which}-keys`);
      mkdirSync(old, { mode: 0o700 });
      const kept = manifest.files.filter((x) => !x.purpose.startsWith(`${which}-`));
      for (const f of kept) {
        mkdirSync(path.dirname(path.join(old, f.file)), { recursive: true });
        writeFileSync(path.join(old, f.file), readFileSync(k(f.file)));
      }
      writeFileSync(path.join(old, 'manifest.json'), JSON.stringify({ ...manifest, files: kept }));
      const r = await runCli(['--json', 'keys', which, old]);
      expect(r.code, r.stderr).toBe(0);
      expect((JSON.parse(r.stdout) as { files: { file: string }[] }).files.map((f) => f.file)).toEqual(files);
      const [cert] = files;
      const key = files.at(-1) as string;
      expect(await keyPath(old, `${which}-cert`)).toBe(path.join(old, cert));
      expect(statSync(path.join(old, key)).mode & 0o777).toBe(0o600);
      expect(tool('openssl', ['x509', '-in', path.join(old, cert), '-noout', '-text']).out).toMatch(check);
      expect((await readManifest(old)).files.length).toBe(manifest.files.length);
      const before = readFileSync(path.join(old, key));
      const again = await runCli(['keys', which, old]);
      expect(again.code).toBe(2);
      expect(again.stderr.trim().split('\n')).toEqual([expect.stringMatching(refusal)]);
      expect(readFileSync(path.join(old, key)).equals(before)).toBe(true);
      const forced = await runCli(['keys', which, old, '--force']);
      expect(forced.code, forced.stderr).toBe(0);
      expect(readFileSync(path.join(old, key)).equals(before)).toBe(false);
      expect((await readManifest(old)).files.filter((f) => f.purpose === `${which}-key`)).toHaveLength(1);
    }, 60_000);
  }

  it('keys show lists every file and flags a secret made world-readable', async () => {
    const ok = await runCli(['--json', 'keys', 'show', dir]);
    expect(ok.code).toBe(0);
    expect((JSON.parse(ok.stdout) as { problems: string[] }).problems).toEqual([]);
    const human = await runCli(['keys', 'show', dir]);
    expect(human.stdout).toMatch(/db\.key\s+secret\s+Secure Boot signature database key/);
    expect(human.stdout).not.toMatch(/BEGIN/);
    chmodSync(k('rauc-ca.key'), 0o644);
    const flagged = await runCli(['--json', 'keys', 'show', dir]);
    chmodSync(k('rauc-ca.key'), 0o600);
    expect((JSON.parse(flagged.stdout) as { problems: string[] }).problems).toEqual([expect.stringMatching(/rauc-ca\.key is readable by others/)]);
    expect(flagged.stderr).toMatch(/warning: rauc-ca\.key/);
  });

  it('keys ovmf-vars writes an enrolled variable store', async () => {
    const out = path.join(t.dir, 'vars.fd');
    const r = await runCli(['--json', 'keys', 'ovmf-vars', dir, '-o', out]);
    expect(r.code, r.stderr).toBe(0);
    const vars = (JSON.parse(r.stdout) as { variables: { name: string; certificates: string[] }[] }).variables;
    expect(vars.find((v) => v.name === 'PK')?.certificates).toEqual(['CN=LamaDist Platform Key']);
  });
});
