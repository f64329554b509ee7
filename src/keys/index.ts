/**
 * The fleet's key directory: Secure Boot PK/KEK/db (certificates, keys, signature lists and signed
 * authenticated-variable updates), the RAUC CA and code-signing certificate, per-device encryption
 * certificates, the OpenPGP key that signs RPMs, the recovery pair that hosts' LUKS recovery keys
 * are escrowed to and the IMA key that signs root images' files. Every file is listed with its purpose in
 * manifest.json; private keys are written 0600 and never printed.
 *
 * Public API:
 * - `initKeys(dir, { force?, commonName?, days?, now? })` → KeyManifest
 * - `addDeviceKey(dir, name, { force?, days?, ec? })` → KeyManifest (`ec`: P-256 device key);
 *   `ensureDeviceKey(dir, name)` → issued or not
 * - `addRecoveryKey(dir, { force?, commonName?, days? })` → KeyManifest (for directories made before
 *   `keys init` issued the recovery pair); `addImaKey(dir, { force?, commonName?, days? })` likewise for
 *   the IMA pair
 * - `signingPair(dir, 'secureboot-db' | 'rauc-signing')` → { certPem, keyPem }
 * - `readManifest(dir)` → KeyManifest; `keyPath(dir, purpose)` → absolute path of a file by purpose
 * - `createCertificate(spec)` → { certPem, keyPem } (one certificate, for tests and tools)
 */
import { randomBytes, randomUUID, webcrypto, createHash } from 'node:crypto';
import { constants, promises as fs } from 'node:fs';
import path from 'node:path';
import * as x509 from '@peculiar/x509';
import * as openpgp from 'openpgp';
import { UserError, isErrno } from '../errors.js';
import { makeAuthVariable, makeEsl } from '../secureboot/index.js';
import { onCleanup } from '../util/cleanup.js';
import { writeFileAtomic } from '../util/fsx.js';

type CryptoKey = webcrypto.CryptoKey;
type CryptoKeyPair = webcrypto.CryptoKeyPair;

x509.cryptoProvider.set(webcrypto as unknown as Parameters<typeof x509.cryptoProvider.set>[0]);

/** What a file in the key directory is for; `keyPath(dir, purpose)` finds it. */
export type KeyPurpose =
  | 'secureboot-pk-cert' | 'secureboot-pk-key' | 'secureboot-pk-esl' | 'secureboot-pk-auth'
  | 'secureboot-kek-cert' | 'secureboot-kek-key' | 'secureboot-kek-esl' | 'secureboot-kek-auth'
  | 'secureboot-db-cert' | 'secureboot-db-key' | 'secureboot-db-esl' | 'secureboot-db-auth'
  | 'rauc-ca-cert' | 'rauc-ca-key' | 'rauc-signing-cert' | 'rauc-signing-key'
  | 'device-cert' | 'device-key'
  | 'rpm-signing-key' | 'rpm-signing-public'
  | 'recovery-cert' | 'recovery-key'
  | 'ima-cert' | 'ima-cert-der' | 'ima-key';

export interface ManifestEntry {
  file: string;
  purpose: KeyPurpose;
  description: string;
  secret: boolean;
  /** For certificates: subject, issuer, validity and SHA-256 fingerprint. */
  subject?: string;
  issuer?: string;
  notBefore?: string;
  notAfter?: string;
  sha256?: string;
  /** For device certificates: the device name. */
  device?: string;
  /** For OpenPGP keys: the key fingerprint. */
  fingerprint?: string;
}

export interface KeyManifest {
  version: 1;
  created: string;
  /** EFI_SIGNATURE_DATA owner GUID written into the signature lists. */
  owner: string;
  files: ManifestEntry[];
}

export const MANIFEST = 'manifest.json';

const RSA = (bits: number): webcrypto.RsaHashedKeyGenParams => ({ name: 'RSASSA-PKCS1-v1_5', hash: 'SHA-256', publicExponent: new Uint8Array([1, 0, 1]), modulusLength: bits });

/** One certificate to create: self-signed when `issuer` is absent. */
export interface CertSpec {
  commonName: string;
  bits?: number;
  notBefore?: Date;
  notAfter?: Date;
  ca?: boolean;
  /** Extended key usages by OID (code signing: 1.3.6.1.5.5.7.3.3). */
  eku?: string[];
  keyUsage?: number;
  /** A P-256 key instead of RSA (the issuer still signs with its own key). */
  ec?: boolean;
  issuer?: { certPem: string; keyPem: string };
}

const CODE_SIGNING = '1.3.6.1.5.5.7.3.3';

async function importPkcs8(pem: string): Promise<CryptoKey> {
  const der = Buffer.from(pem.replace(/-----[^-]+-----/g, '').replace(/\s+/g, ''), 'base64');
  return webcrypto.subtle.importKey('pkcs8', der, { name: 'RSASSA-PKCS1-v1_5', hash: 'SHA-256' }, false, ['sign']) as Promise<CryptoKey>;
}

function pem(label: string, der: ArrayBuffer): string {
  const b64 = Buffer.from(der).toString('base64').replace(/(.{64})/g, '$1\n').replace(/\n$/, '');
  return `-----BEGIN ${label}-----\n${b64}\n-----END ${label}-----\n`;
}

/** Create an RSA (or P-256) key pair and an X.509 certificate for it (issued by `spec.issuer` or self-signed). */
export async function createCertificate(spec: CertSpec): Promise<{ certPem: string; keyPem: string }> {
  const alg = RSA(spec.bits ?? 2048);
  const keys = (await webcrypto.subtle.generateKey(spec.ec ? { name: 'ECDSA', namedCurve: 'P-256' } : alg, true, ['sign', 'verify'])) as CryptoKeyPair;
  const notBefore = spec.notBefore ?? new Date(Date.now() - 60_000);
  const notAfter = spec.notAfter ?? new Date(notBefore.getTime() + 10 * 365 * 86_400_000);
  const usage = spec.keyUsage ?? (spec.ca ? x509.KeyUsageFlags.keyCertSign | x509.KeyUsageFlags.cRLSign | x509.KeyUsageFlags.digitalSignature : x509.KeyUsageFlags.digitalSignature);
  const extensions: x509.Extension[] = [
    new x509.BasicConstraintsExtension(Boolean(spec.ca), undefined, true),
    new x509.KeyUsagesExtension(usage, true),
    await x509.SubjectKeyIdentifierExtension.create(keys.publicKey as CryptoKey),
  ];
  if (spec.eku?.length) extensions.push(new x509.ExtendedKeyUsageExtension(spec.eku, false));
  // Positive 16-byte serial: random so two key directories never collide.
  const serial = randomBytes(16);
  serial[0] = (serial[0] ?? 0) & 0x7f;
  // Issuers are RSA (importPkcs8); a self-signed EC certificate signs itself with ECDSA.
  const signingAlgorithm = spec.ec && !spec.issuer ? { name: 'ECDSA', hash: 'SHA-256' } : alg;
  const common = { serialNumber: serial.toString('hex'), notBefore, notAfter, signingAlgorithm, extensions };
  let cert: x509.X509Certificate;
  if (spec.issuer) {
    const issuerCert = new x509.X509Certificate(spec.issuer.certPem);
    extensions.push(await x509.AuthorityKeyIdentifierExtension.create(issuerCert));
    cert = await x509.X509CertificateGenerator.create({
      ...common,
      subject: `CN=${spec.commonName}`,
      issuer: issuerCert.subject,
      publicKey: keys.publicKey as CryptoKey,
      signingKey: await importPkcs8(spec.issuer.keyPem),
    });
  } else {
    cert = await x509.X509CertificateGenerator.createSelfSigned({ ...common, name: `CN=${spec.commonName}`, keys: keys as CryptoKeyPair });
  }
  const keyPem = pem('PRIVATE KEY', await webcrypto.subtle.exportKey('pkcs8', keys.privateKey as CryptoKey));
  return { certPem: cert.toString('pem') + '\n', keyPem };
}

function certInfo(certPem: string): Pick<ManifestEntry, 'subject' | 'issuer' | 'notBefore' | 'notAfter' | 'sha256'> {
  const c = new x509.X509Certificate(certPem);
  return {
    subject: c.subject,
    issuer: c.issuer,
    notBefore: c.notBefore.toISOString(),
    notAfter: c.notAfter.toISOString(),
    sha256: createHash('sha256').update(Buffer.from(c.rawData)).digest('hex'),
  };
}

interface PlannedFile {
  entry: ManifestEntry;
  data: string | Buffer;
}

function file(name: string, purpose: KeyPurpose, description: string, data: string | Buffer, extra: Partial<ManifestEntry> = {}): PlannedFile {
  const secret = purpose.endsWith('-key');
  return { entry: { file: name, purpose, description, secret, ...extra }, data };
}

async function exists(p: string): Promise<boolean> {
  return fs.access(p, constants.F_OK).then(
    () => true,
    () => false,
  );
}

/**
 * Write planned files: every target is checked before the first write, so a refusal (existing key,
 * no --force) leaves the directory untouched; each file is atomic, secrets 0600, manifest last. A
 * new directory is filled under a temporary name and renamed into place, so an interrupted
 * `keys init` never leaves a half key directory behind.
 */
async function writePlanned(dir: string, planned: PlannedFile[], manifest: KeyManifest, force: boolean): Promise<void> {
  if (!force) {
    for (const p of planned) {
      const target = path.join(dir, p.entry.file);
      if (await exists(target)) throw new UserError('LAMA_E_EXISTS', `${target} already exists (use --force to replace it)`);
    }
  }
  const fresh = !(await exists(dir));
  let target = dir;
  let unregister = (): void => undefined;
  if (fresh) {
    const parent = path.dirname(path.resolve(dir));
    await fs.mkdir(parent, { recursive: true });
    target = await fs.mkdtemp(path.join(parent, `.${path.basename(dir)}.`));
    await fs.chmod(target, 0o700);
    const temp = target;
    unregister = onCleanup(() => fs.rm(temp, { recursive: true, force: true }));
  }
  try {
    for (const p of planned) await fs.mkdir(path.dirname(path.join(target, p.entry.file)), { recursive: true, mode: 0o700 });
    for (const p of planned) await writeFileAtomic(path.join(target, p.entry.file), p.data, { force: true, mode: p.entry.secret ? 0o600 : 0o644 });
    await writeFileAtomic(path.join(target, MANIFEST), JSON.stringify(manifest, null, 2) + '\n', { force: true, mode: 0o644 });
    if (fresh) await fs.rename(target, dir);
  } catch (err) {
    if (fresh) await fs.rm(target, { recursive: true, force: true });
    throw err;
  } finally {
    unregister();
  }
}

/**
 * The fleet recovery pair: a self-signed RSA 3072 key-encipherment certificate that installers
 * encrypt each host's LUKS recovery key to (CMS, RSA-OAEP). Self-signed and outside the Secure Boot
 * and RAUC hierarchies, so it can live offline without weakening either.
 */
async function recoveryPlanned(name: string, validity: { notBefore: Date; notAfter: Date }): Promise<PlannedFile[]> {
  const pair = await createCertificate({ commonName: `${name} Recovery Key Escrow`, bits: 3072, keyUsage: x509.KeyUsageFlags.keyEncipherment, ...validity });
  return [
    file('recovery.crt', 'recovery-cert', 'Recovery key escrow: certificate (installers encrypt each host\'s LUKS recovery key to it)', pair.certPem, certInfo(pair.certPem)),
    file('recovery.key', 'recovery-key', 'Recovery key escrow: private key (opens escrows with lamadist recovery-key; keep offline)', pair.keyPem),
  ];
}

/** Where the IMA pair lives: meta-signing-key's IMA_KEYS_DIR layout, which lamadist-security.inc points at. */
export const IMA_DIR = 'ima';

/**
 * The fleet IMA pair: a self-signed RSA 2048 digitalSignature certificate (not a CA; the kernel
 * refuses CA keys on `.ima` when CONFIG_INTEGRITY_CA_RESTRICTION is set) whose key signs root
 * images' executables and libraries (`security.ima`, IMA v2 digital signatures over SHA-256).
 * RSA 2048 because every kernel with IMA appraisal verifies it (ECDSA only since 5.13). The DER form
 * is what the kernel and `keyctl padd asymmetric` load; the key id in each signature is the last 4
 * bytes of the certificate's subjectKeyIdentifier (SHA-1 of the public key, as evmctl computes it).
 */
async function imaPlanned(name: string, validity: { notBefore: Date; notAfter: Date }): Promise<PlannedFile[]> {
  const pair = await createCertificate({ commonName: `${name} IMA Signing`, keyUsage: x509.KeyUsageFlags.digitalSignature, ...validity });
  const der = Buffer.from(new x509.X509Certificate(pair.certPem).rawData);
  const info = certInfo(pair.certPem);
  return [
    file(`${IMA_DIR}/x509_ima.crt`, 'ima-cert', 'IMA file signing: certificate (PEM)', pair.certPem, info),
    file(`${IMA_DIR}/x509_ima.der`, 'ima-cert-der', 'IMA file signing: certificate (DER, for the kernel\'s .ima keyring)', der, info),
    file(`${IMA_DIR}/x509_ima.key`, 'ima-key', 'IMA file signing: private key (signs executables and libraries of root images)', pair.keyPem),
  ];
}

/**
 * Create a fleet key directory. The Secure Boot hierarchy is PK (self-signed) → KEK → db, and the
 * .auth updates follow the enrollment rules: PK and KEK signed by PK, db signed by KEK. RSA 2048
 * for firmware keys (the size every UEFI implementation accepts), 3072 for RAUC.
 */
export async function initKeys(dir: string, opts: { force?: boolean; commonName?: string; days?: number; now?: Date } = {}): Promise<KeyManifest> {
  const name = opts.commonName ?? 'LamaDist';
  const now = opts.now ?? new Date();
  if (!opts.force && (await exists(path.join(dir, MANIFEST)))) {
    throw new UserError('LAMA_E_EXISTS', `${path.join(dir, MANIFEST)} already exists: this directory holds keys (use --force to replace them)`);
  }
  const notBefore = new Date(now.getTime() - 60_000);
  const notAfter = new Date(notBefore.getTime() + (opts.days ?? 3650) * 86_400_000);
  const v = { notBefore, notAfter };
  const owner = randomUUID();
  const pk = await createCertificate({ commonName: `${name} Platform Key`, ca: true, ...v });
  const kek = await createCertificate({ commonName: `${name} Key Exchange Key`, ca: true, issuer: pk, ...v });
  const db = await createCertificate({ commonName: `${name} Secure Boot Signing`, eku: [CODE_SIGNING], issuer: kek, ...v });
  const raucCa = await createCertificate({ commonName: `${name} RAUC CA`, bits: 3072, ca: true, ...v });
  const raucSigning = await createCertificate({ commonName: `${name} RAUC Bundle Signing`, bits: 3072, eku: [CODE_SIGNING], issuer: raucCa, ...v });
  const esl = (c: string): Buffer => makeEsl(c, owner);
  const auth = (varName: 'PK' | 'KEK' | 'db', data: Buffer, signer: { certPem: string; keyPem: string }): Buffer =>
    makeAuthVariable({ name: varName, data, signer, timestamp: now });
  const pgp = await openpgp.generateKey({ type: 'rsa', rsaBits: 3072, userIDs: [{ name: `${name} RPM Signing` }], format: 'armored' });
  const pgpKey = await openpgp.readKey({ armoredKey: pgp.publicKey });
  const fingerprint = pgpKey.getFingerprint().toUpperCase();

  const planned: PlannedFile[] = [];
  for (const [label, pair, signer, desc] of [
    ['PK', pk, pk, 'Secure Boot Platform Key'],
    ['KEK', kek, pk, 'Secure Boot Key Exchange Key'],
    ['db', db, kek, 'Secure Boot signature database key (signs UKIs)'],
  ] as const) {
    const lower = label.toLowerCase() as 'pk' | 'kek' | 'db';
    const e = esl(pair.certPem);
    planned.push(
      file(`${label}.crt`, `secureboot-${lower}-cert`, `${desc}: certificate`, pair.certPem, certInfo(pair.certPem)),
      file(`${label}.key`, `secureboot-${lower}-key`, `${desc}: private key`, pair.keyPem),
      file(`${label}.esl`, `secureboot-${lower}-esl`, `${desc}: EFI signature list`, e),
      file(`${label}.auth`, `secureboot-${lower}-auth`, `${desc}: signed ${label} variable update (signed by ${label === 'db' ? 'KEK' : 'PK'})`, auth(label, e, signer)),
    );
  }
  planned.push(
    file('rauc-ca.crt', 'rauc-ca-cert', 'RAUC keyring CA: certificate (the device keyring)', raucCa.certPem, certInfo(raucCa.certPem)),
    file('rauc-ca.key', 'rauc-ca-key', 'RAUC keyring CA: private key', raucCa.keyPem),
    file('rauc-signing.crt', 'rauc-signing-cert', 'RAUC bundle signing: code-signing certificate', raucSigning.certPem, certInfo(raucSigning.certPem)),
    file('rauc-signing.key', 'rauc-signing-key', 'RAUC bundle signing: private key', raucSigning.keyPem),
    file('rpm-signing.asc', 'rpm-signing-key', 'RPM signing: OpenPGP private key', pgp.privateKey, { fingerprint }),
    file('rpm-signing.pub.asc', 'rpm-signing-public', 'RPM signing: OpenPGP public key', pgp.publicKey, { fingerprint }),
    ...(await recoveryPlanned(name, v)),
    ...(await imaPlanned(name, v)),
  );
  const manifest: KeyManifest = { version: 1, created: now.toISOString(), owner, files: planned.map((p) => p.entry) };
  await writePlanned(dir, planned, manifest, opts.force ?? false);
  return manifest;
}

/** Read and check a key directory's manifest. */
export async function readManifest(dir: string): Promise<KeyManifest> {
  const file = path.join(dir, MANIFEST);
  let text: string;
  try {
    text = await fs.readFile(file, 'utf8');
  } catch (err) {
    if (isErrno(err, 'ENOENT')) throw new UserError('LAMA_E_NO_KEYS', `${dir} is not a key directory (no ${MANIFEST}; run 'lamadist keys init ${dir}')`);
    throw err;
  }
  let m: KeyManifest;
  try {
    m = JSON.parse(text) as KeyManifest;
  } catch {
    throw new UserError('LAMA_E_BAD_MANIFEST', 'manifest is not valid JSON', { where: file });
  }
  if (m.version !== 1 || !Array.isArray(m.files)) throw new UserError('LAMA_E_BAD_MANIFEST', 'unsupported manifest version', { where: file });
  return m;
}

/** Absolute path of the file with `purpose` (for device files, of device `device`). */
export async function keyPath(dir: string, purpose: KeyPurpose, device?: string): Promise<string> {
  const m = await readManifest(dir);
  const e = m.files.find((f) => f.purpose === purpose && (device === undefined || f.device === device));
  if (!e) throw new UserError('LAMA_E_NO_KEY', `key directory ${dir} has no ${purpose}${device ? ` for device ${device}` : ''}`);
  return path.resolve(dir, e.file);
}

/** A signing pair of the key directory as PEM texts: the Secure Boot db pair (UKIs) or the RAUC pair (bundles). */
export async function signingPair(dir: string, which: 'secureboot-db' | 'rauc-signing'): Promise<{ certPem: string; keyPem: string }> {
  return {
    certPem: await fs.readFile(await keyPath(dir, `${which}-cert`), 'utf8'),
    keyPem: await fs.readFile(await keyPath(dir, `${which}-key`), 'utf8'),
  };
}

type PairOptions = { force?: boolean; commonName?: string; days?: number };

/**
 * Issue a self-signed pair (its files' purposes start with `prefix`) into an existing key
 * directory, replacing the pair it has only with `force`; `refusal` says why replacing matters.
 */
async function addPair(
  dir: string,
  prefix: 'recovery-' | 'ima-',
  plan: (name: string, validity: { notBefore: Date; notAfter: Date }) => Promise<PlannedFile[]>,
  refusal: (file: string) => string,
  opts: PairOptions,
): Promise<KeyManifest> {
  const m = await readManifest(dir);
  const existing = m.files.find((f) => f.purpose === `${prefix}key`);
  if (existing && !opts.force) throw new UserError('LAMA_E_EXISTS', `${dir} ${refusal(existing.file)} (use --force to replace it)`);
  const notBefore = new Date(Date.now() - 60_000);
  const planned = await plan(opts.commonName ?? 'LamaDist', { notBefore, notAfter: new Date(notBefore.getTime() + (opts.days ?? 3650) * 86_400_000) });
  const files = m.files.filter((f) => !f.purpose.startsWith(prefix)).concat(planned.map((p) => p.entry));
  const next: KeyManifest = { ...m, files };
  await writePlanned(dir, planned, next, opts.force ?? false);
  return next;
}

/**
 * Issue the recovery pair into an existing key directory. Replacing one needs `force`: escrows
 * made to the old certificate open only with the old key.
 */
export function addRecoveryKey(dir: string, opts: PairOptions = {}): Promise<KeyManifest> {
  return addPair(dir, 'recovery-', recoveryPlanned, (f) => `already has a recovery key (${f}); escrows made to its certificate open only with it`, opts);
}

/**
 * Issue the IMA pair into an existing key directory. Replacing one needs `force`: images signed
 * with the old key no longer appraise on devices that load only the new certificate.
 */
export function addImaKey(dir: string, opts: PairOptions = {}): Promise<KeyManifest> {
  return addPair(dir, 'ima-', imaPlanned, (f) => `already has an IMA key (${f}); images signed with it appraise only with its certificate`, opts);
}

/** Issue the IMA pair (`addImaKey`) unless the directory already has one (it predates them); true when issued. */
export async function ensureImaKey(dir: string): Promise<boolean> {
  if ((await readManifest(dir)).files.some((f) => f.purpose === 'ima-key')) return false;
  await addImaKey(dir);
  return true;
}

/** Issue device `name`'s key pair (`addDeviceKey`) unless the directory already has one; true when issued. */
export async function ensureDeviceKey(dir: string, name: string): Promise<boolean> {
  if ((await readManifest(dir)).files.some((f) => f.purpose === 'device-key' && f.device === name)) return false;
  await addDeviceKey(dir, name);
  return true;
}

/**
 * Issue a device certificate (RSA 2048, keyEncipherment) from the RAUC CA, the recipient RAUC
 * encrypts bundles to. The device's private key belongs on the device (installed by provisioning).
 */
export async function addDeviceKey(dir: string, name: string, opts: { force?: boolean; days?: number; ec?: boolean } = {}): Promise<KeyManifest> {
  if (!/^[a-z0-9][a-z0-9-]{0,62}$/.test(name)) throw new UserError('LAMA_E_BAD_NAME', `device name '${name}' must be lowercase letters, digits and '-' (at most 63)`);
  const m = await readManifest(dir);
  const ca = { certPem: await fs.readFile(await keyPath(dir, 'rauc-ca-cert'), 'utf8'), keyPem: await fs.readFile(await keyPath(dir, 'rauc-ca-key'), 'utf8') };
  const notBefore = new Date(Date.now() - 60_000);
  const dev = await createCertificate({
    commonName: `device ${name}`,
    issuer: ca,
    // An EC key cannot encipher: bundles reach it by ECDH key agreement (CMS KeyAgreeRecipientInfo).
    keyUsage: (opts.ec ? x509.KeyUsageFlags.keyAgreement : x509.KeyUsageFlags.keyEncipherment) | x509.KeyUsageFlags.digitalSignature,
    ...(opts.ec && { ec: true }),
    notBefore,
    notAfter: new Date(notBefore.getTime() + (opts.days ?? 3650) * 86_400_000),
  });
  const planned = [
    file(`device-${name}.crt`, 'device-cert', `device ${name}: bundle encryption certificate`, dev.certPem, { ...certInfo(dev.certPem), device: name }),
    file(`device-${name}.key`, 'device-key', `device ${name}: bundle decryption key (install on the device)`, dev.keyPem, { device: name }),
  ];
  const files = m.files.filter((f) => !planned.some((p) => p.entry.file === f.file)).concat(planned.map((p) => p.entry));
  const next: KeyManifest = { ...m, files };
  await writePlanned(dir, planned, next, opts.force ?? false);
  return next;
}
