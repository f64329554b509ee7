/**
 * The endorsement key (EK) side of attestation: the EK's public area, its certificate checked
 * against the fleet's trusted EK CAs, and TPM2_MakeCredential, which binds an attestation key to
 * that EK (only the TPM holding the EK's private part, and holding the AK with that name, can
 * recover the secret). Per TPM 2.0 Library Part 1 (credential protection, KDFa, KDFe) and the TCG
 * EK Credential Profile; no TPM on the server.
 */
import {
  X509Certificate,
  createCipheriv,
  createECDH,
  createHash,
  createHmac,
  publicEncrypt,
  randomBytes,
  constants,
} from 'node:crypto';
import * as x509 from '@peculiar/x509';
import { UserError } from '../errors.js';
import { missingAttributes, readPublicArea, type PublicArea } from './tpm.js';

/** TPMA_OBJECT bits of an endorsement key (TCG EK Credential Profile templates). */
const EK_ATTR = { fixedTPM: 1 << 1, fixedParent: 1 << 4, sensitiveDataOrigin: 1 << 5, restricted: 1 << 16, decrypt: 1 << 17 } as const;
const SIGN = 1 << 18;
const TPM_ALG_AES = 0x0006;
const TPM_ALG_CFB = 0x0043;

/** An endorsement key: a restricted decryption key whose symmetric algorithm is AES in CFB mode. */
export interface EkPublic extends PublicArea {
  symmetric: { alg: number; keyBits: number; mode: number };
}

/** An EK's public area: TPM2B_PUBLIC (`tpm2_createek -u`) or TPMT_PUBLIC. LAMA_E_ATTEST_EK when it is not one. */
export function parseEkPublic(buf: Buffer): EkPublic {
  const p = readPublicArea(buf, 'EK public', 'LAMA_E_ATTEST_EK');
  const missing = missingAttributes(p.attributes, EK_ATTR);
  const where = { where: 'EK public at byte 6' };
  if (missing.length || p.attributes & SIGN) {
    const why = missing.length ? `lack ${missing.join(', ')}` : 'allow signing';
    throw new UserError('LAMA_E_ATTEST_EK', `not an endorsement key: objectAttributes 0x${p.attributes.toString(16)} ${why}`, where);
  }
  const s = p.symmetric;
  if (!s || s.alg !== TPM_ALG_AES || s.mode !== TPM_ALG_CFB || ![128, 192, 256].includes(s.keyBits)) {
    throw new UserError('LAMA_E_ATTEST_EK', 'endorsement key does not protect with AES in CFB mode', where);
  }
  return { ...p, symmetric: s };
}

/** What the server shows of a device's EK certificate. */
export interface EkCertificateInfo {
  subject: string;
  issuer: string;
  serial: string;
  notAfter: string;
  /** From the subjectAltName's directoryName (TCG OIDs 2.23.133.2.1-3), when present. */
  tpm: { manufacturer?: string; model?: string; version?: string };
  /** The sha256 of the certificate (hex). */
  sha256: string;
}

/** What the chain check needs of a certificate's extensions, read once when it is parsed. */
interface Extensions {
  /** OIDs of its critical extensions. */
  critical: string[];
  /** Extended key usages, when the extension is present. */
  eku?: string[];
  /** basicConstraints pathLenConstraint, when given. */
  pathLength?: number;
  /** Empty subject and no critical subjectAltName (RFC 5280 4.2.1.6 forbids that). */
  nameless: boolean;
}

/** A parsed EK certificate: as OpenSSL sees it (signatures, names), its extensions, what it says. */
export interface EkCertificate {
  der: Buffer;
  cert: X509Certificate;
  extensions: Extensions;
  info: EkCertificateInfo;
}

const OID = {
  keyUsage: '2.5.29.15',
  subjectAltName: '2.5.29.17',
  basicConstraints: '2.5.29.19',
  extKeyUsage: '2.5.29.37',
  anyEku: '2.5.29.37.0',
  ekCertificate: '2.23.133.8.1',
  manufacturer: '2.23.133.2.1',
  model: '2.23.133.2.2',
  version: '2.23.133.2.3',
} as const;

/** The critical extensions this check processes; a certificate with another one is refused (RFC 5280 4.2). */
const HANDLED_CRITICAL: ReadonlySet<string> = new Set([OID.keyUsage, OID.subjectAltName, OID.basicConstraints, OID.extKeyUsage]);

/**
 * The DER certificate at the start of `buf`. NV indices are often larger than the certificate they
 * hold; padding (zeros or 0xff) after it is dropped, anything else is refused.
 */
function derCertificate(buf: Buffer, what: string): Buffer {
  const bad = (message: string): never => {
    throw new UserError('LAMA_E_ATTEST_EK_CERT', `${what}: ${message}`);
  };
  if (buf.length < 2 || buf[0] !== 0x30) bad('not a DER certificate (no SEQUENCE at byte 0)');
  const first = buf[1] as number;
  let len = first;
  let head = 2;
  if (first & 0x80) {
    const n = first & 0x7f;
    if (n === 0 || n > 3 || buf.length < 2 + n) bad('DER length is malformed');
    len = 0;
    for (let i = 0; i < n; i++) len = len * 256 + (buf[2 + i] as number);
    head = 2 + n;
  }
  const end = head + len;
  if (end > buf.length) bad(`DER says ${end} bytes, only ${buf.length} were sent`);
  const rest = buf.subarray(end);
  if (!rest.every((b) => b === 0) && !rest.every((b) => b === 0xff)) bad(`${rest.length} bytes follow the certificate`);
  return buf.subarray(0, end);
}

function oneLine(name: string): string {
  return name.replaceAll('\n', ', ');
}

/** The extensions of `der` (already decoded by OpenSSL) as the chain check needs them, and the TPM it names. */
function readExtensions(der: Buffer): { extensions: Extensions; tpm: EkCertificateInfo['tpm'] } {
  const asn = new x509.X509Certificate(der);
  const exts = asn.extensions;
  const san = asn.getExtension(x509.SubjectAlternativeNameExtension);
  const tpm: EkCertificateInfo['tpm'] = {};
  for (const n of san?.names.items ?? []) {
    if (n.type !== 'dn') continue;
    for (const rdn of new x509.Name(n.value).toJSON()) {
      for (const [oid, [v]] of Object.entries(rdn)) {
        if (v === undefined) continue;
        if (oid === OID.manufacturer) tpm.manufacturer = v;
        if (oid === OID.model) tpm.model = v;
        if (oid === OID.version) tpm.version = v;
      }
    }
  }
  const eku = asn.getExtension(x509.ExtendedKeyUsageExtension)?.usages.map(String);
  const pathLength = asn.getExtension(x509.BasicConstraintsExtension)?.pathLength;
  return {
    extensions: {
      critical: exts.filter((e) => e.critical).map((e) => e.type),
      ...(eku && { eku }),
      ...(pathLength !== undefined && { pathLength }),
      nameless: asn.subjectName.toJSON().length === 0 && !san?.critical,
    },
    tpm,
  };
}

/** Parse an EK certificate (DER, as read from the TPM's NV index). LAMA_E_ATTEST_EK_CERT when malformed. */
export function parseEkCertificate(buf: Buffer): EkCertificate {
  const der = derCertificate(buf, 'EK certificate');
  let cert: X509Certificate;
  let ext: ReturnType<typeof readExtensions>;
  try {
    cert = new X509Certificate(der);
    ext = readExtensions(der);
  } catch (err) {
    throw new UserError('LAMA_E_ATTEST_EK_CERT', `EK certificate does not decode: ${(err as Error).message}`);
  }
  return {
    der,
    cert,
    extensions: ext.extensions,
    info: {
      subject: oneLine(cert.subject),
      issuer: oneLine(cert.issuer),
      serial: cert.serialNumber,
      notAfter: new Date(cert.validTo).toISOString(),
      tpm: ext.tpm,
      sha256: createHash('sha256').update(der).digest('hex'),
    },
  };
}

/** A CA certificate of the trust bundle. */
interface TrustedCa {
  cert: X509Certificate;
  extensions: Extensions;
}

/** The fleet's trusted EK CAs: self-signed roots (trust anchors) and the intermediates below them. */
export interface EkTrust {
  roots: TrustedCa[];
  intermediates: TrustedCa[];
}

/** Certificates of a PEM bundle (`--ek-ca`). LAMA_E_ATTEST_EK_CA when it holds none or one does not decode. */
export function loadEkTrust(pem: string, file: string): EkTrust {
  const blocks = [...pem.matchAll(/-----BEGIN CERTIFICATE-----[\s\S]*?-----END CERTIFICATE-----/g)].map((m) => m[0]);
  if (blocks.length === 0) throw new UserError('LAMA_E_ATTEST_EK_CA', 'holds no PEM certificate', { where: file });
  const out: EkTrust = { roots: [], intermediates: [] };
  for (const [i, b] of blocks.entries()) {
    let ca: TrustedCa;
    try {
      const cert = new X509Certificate(b);
      ca = { cert, extensions: readExtensions(cert.raw).extensions };
    } catch (err) {
      throw new UserError('LAMA_E_ATTEST_EK_CA', `certificate ${i + 1} does not decode: ${(err as Error).message}`, { where: file });
    }
    const c = ca.cert;
    if (!c.ca) throw new UserError('LAMA_E_ATTEST_EK_CA', `certificate ${i + 1} (${oneLine(c.subject)}) is not a CA (basicConstraints)`, { where: file });
    (c.checkIssued(c) && c.verify(c.publicKey) ? out.roots : out.intermediates).push(ca);
  }
  if (out.roots.length === 0) throw new UserError('LAMA_E_ATTEST_EK_CA', 'holds no self-signed root certificate', { where: file });
  return out;
}

function refuse(message: string): never {
  throw new UserError('LAMA_E_ATTEST_EK_CHAIN', message);
}

/** Refuse a certificate with a critical extension this check does not process. */
function criticalHandled(e: Extensions, label: string): void {
  const unhandled = e.critical.filter((oid) => !HANDLED_CRITICAL.has(oid));
  if (unhandled.length) refuse(`${label} has critical extension ${unhandled.join(', ')}, which this check does not process`);
}

/**
 * Check that `ek` chains to a root of `trust` at time `at`: each certificate valid then, signed by
 * the next, every issuer a CA (basicConstraints, keyCertSign, path length), no unprocessed critical
 * extension, the EK certificate's extended key usage (if any) allowing an EK, and its key equal to
 * the EK the device sent. Returns the subjects from the EK certificate up to the root. Throws
 * LAMA_E_ATTEST_EK_CHAIN, or LAMA_E_ATTEST_EK_MISMATCH when only the key differs.
 */
export function verifyEkCertificate(ek: EkCertificate, trust: EkTrust, ekPublic: EkPublic, at = new Date()): string[] {
  criticalHandled(ek.extensions, 'EK certificate');
  const eku = ek.extensions.eku;
  if (eku && !eku.some((u) => u === OID.ekCertificate || u === OID.anyEku)) {
    refuse(`EK certificate's extended key usage (${eku.join(', ')}) does not include tcg-kp-EKCertificate`);
  }
  // An EK certificate's subject is usually empty; its identity is then the subjectAltName.
  if (ek.extensions.nameless) refuse('EK certificate has an empty subject and no critical subjectAltName');
  const all = [...trust.roots, ...trust.intermediates];
  const chain = [ek.cert];
  let cur = ek.cert;
  for (let depth = 0; depth < 8; depth++) {
    const label = depth === 0 ? 'EK certificate' : `CA certificate ${oneLine(cur.subject)}`;
    if (Date.parse(cur.validFrom) > at.getTime() || Date.parse(cur.validTo) < at.getTime()) {
      refuse(`${label} is valid from ${new Date(cur.validFrom).toISOString()} to ${new Date(cur.validTo).toISOString()}, not at ${at.toISOString()}`);
    }
    if (trust.roots.some((r) => r.cert.raw.equals(cur.raw))) {
      if (!ek.cert.publicKey.equals(ekPublic.key)) {
        throw new UserError('LAMA_E_ATTEST_EK_MISMATCH', `EK certificate (serial ${ek.info.serial}) certifies another key than the endorsement key sent`);
      }
      return chain.map((c) => oneLine(c.subject));
    }
    // checkIssued matches names and key identifiers and wants keyCertSign in the issuer's keyUsage;
    // every certificate of the trust bundle is a CA (loadEkTrust refuses others).
    const issuer = all.find((c) => !c.cert.raw.equals(cur.raw) && cur.checkIssued(c.cert) && cur.verify(c.cert.publicKey));
    if (!issuer) refuse(`${label} (issuer ${oneLine(cur.issuer)}) is not signed by a trusted EK CA`);
    const name = oneLine(issuer.cert.subject);
    criticalHandled(issuer.extensions, `CA certificate ${name}`);
    // CA certificates between this issuer and the EK certificate: those already in the chain but the first.
    const { pathLength } = issuer.extensions;
    if (pathLength !== undefined && chain.length - 1 > pathLength) refuse(`${name} allows ${pathLength} CAs below it, the chain has ${chain.length - 1}`);
    chain.push(issuer.cert);
    cur = issuer.cert;
  }
  return refuse('EK certificate chain is longer than 8 certificates');
}

function u32(n: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(n);
  return b;
}

function tpm2b(b: Buffer): Buffer {
  const size = Buffer.alloc(2);
  size.writeUInt16BE(b.length);
  return Buffer.concat([size, b]);
}

/** A label as the TPM uses it: the string with its terminating zero octet. */
function label(s: string): Buffer {
  return Buffer.from(`${s}\0`, 'latin1');
}

/** KDFa (Part 1, 11.4.10.2): SP 800-108 counter mode with HMAC over counter, label, contexts and the bit count. */
function kdfa(hash: string, key: Buffer, use: string, contextU: Buffer, contextV: Buffer, bits: number): Buffer {
  const out: Buffer[] = [];
  const want = Math.ceil(bits / 8);
  for (let i = 1, have = 0; have < want; i++) {
    const block = createHmac(hash, key).update(Buffer.concat([u32(i), label(use), contextU, contextV, u32(bits)])).digest();
    out.push(block);
    have += block.length;
  }
  return Buffer.concat(out).subarray(0, want);
}

/** KDFe (Part 1, 11.4.10.3): SP 800-56A concatenation KDF over counter, Z, label and both parties' x. */
function kdfe(hash: string, z: Buffer, use: string, partyU: Buffer, partyV: Buffer, bits: number): Buffer {
  const out: Buffer[] = [];
  const want = Math.ceil(bits / 8);
  for (let i = 1, have = 0; have < want; i++) {
    const block = createHash(hash).update(Buffer.concat([u32(i), z, label(use), partyU, partyV])).digest();
    out.push(block);
    have += block.length;
  }
  return Buffer.concat(out).subarray(0, want);
}

/** What TPM2_ActivateCredential takes: TPM2B_ID_OBJECT and TPM2B_ENCRYPTED_SECRET, sizes included. */
export interface Credential {
  credentialBlob: Buffer;
  encryptedSecret: Buffer;
}

/**
 * TPM2_MakeCredential (Part 1, 24): protect `secret` so that only the TPM holding `ek` can recover
 * it, and only for the object named `objectName` (the AK's name). A seed is encrypted to the EK
 * (RSA-OAEP with the EK's name hash and label "IDENTITY", or ECDH with an ephemeral key and KDFe);
 * the secret is encrypted under KDFa(seed, "STORAGE", name) with the EK's symmetric algorithm in
 * CFB mode and protected by an HMAC under KDFa(seed, "INTEGRITY") over the ciphertext and the name.
 */
export function makeCredential(ek: EkPublic, objectName: Buffer, secret: Buffer): Credential {
  const digestSize = createHash(ek.hash).digest().length;
  if (secret.length > digestSize) throw new UserError('LAMA_E_ATTEST_EK', `credential is ${secret.length} bytes; the EK's name hash allows ${digestSize}`);
  let seed: Buffer;
  let encrypted: Buffer;
  if (ek.type === 'rsa') {
    seed = randomBytes(digestSize);
    encrypted = publicEncrypt({ key: ek.key, padding: constants.RSA_PKCS1_OAEP_PADDING, oaepHash: ek.hash, oaepLabel: label('IDENTITY') }, seed);
  } else {
    const point = ek.point as { x: Buffer; y: Buffer };
    const pad = (c: Buffer): Buffer => Buffer.concat([Buffer.alloc(32 - c.length), c]);
    const ecdh = createECDH('prime256v1');
    const ephemeral = ecdh.generateKeys();
    const [x, y] = [ephemeral.subarray(1, 33), ephemeral.subarray(33, 65)];
    // Z is the x coordinate of the shared point; the TPM uses the EK's x as stored in its public area.
    const z = ecdh.computeSecret(Buffer.concat([Buffer.from([4]), pad(point.x), pad(point.y)]));
    seed = kdfe(ek.hash, z, 'IDENTITY', x, point.x, digestSize * 8);
    encrypted = Buffer.concat([tpm2b(x), tpm2b(y)]);
  }
  const symKey = kdfa(ek.hash, seed, 'STORAGE', objectName, Buffer.alloc(0), ek.symmetric.keyBits);
  const cipher = createCipheriv(`aes-${ek.symmetric.keyBits}-cfb`, symKey, Buffer.alloc(16));
  const encIdentity = Buffer.concat([cipher.update(tpm2b(secret)), cipher.final()]);
  const hmacKey = kdfa(ek.hash, seed, 'INTEGRITY', Buffer.alloc(0), Buffer.alloc(0), digestSize * 8);
  const integrity = createHmac(ek.hash, hmacKey).update(Buffer.concat([encIdentity, objectName])).digest();
  return { credentialBlob: tpm2b(Buffer.concat([tpm2b(integrity), encIdentity])), encryptedSecret: tpm2b(encrypted) };
}
