import {
  X509Certificate,
  constants,
  createCipheriv,
  createDecipheriv,
  createHash,
  createPrivateKey,
  createPublicKey,
  diffieHellman,
  generateKeyPairSync,
  privateDecrypt,
  publicEncrypt,
  randomBytes,
  sign as cryptoSign,
  verify as cryptoVerify,
  type KeyObject,
} from 'node:crypto';
import * as asn1js from 'asn1js';
import * as pkijs from 'pkijs';
import { UserError } from '../errors.js';

/**
 * CMS as RAUC uses it: SignedData with the manifest embedded (OpenSSL's CMS_sign with CMS_BINARY |
 * CMS_NOSMIMECAP: signed attributes contentType, signingTime, messageDigest; signer certificate and
 * intermediates included), and EnvelopedData (CMS_encrypt with AES-256-CBC) wrapping that
 * SignedData for crypt bundles. The ASN.1 goes through pkijs; every cryptographic operation goes
 * through node:crypto so that nothing depends on WebCrypto's algorithm subset.
 */

const OID = {
  data: '1.2.840.113549.1.7.1',
  signedData: '1.2.840.113549.1.7.2',
  envelopedData: '1.2.840.113549.1.7.3',
  contentType: '1.2.840.113549.1.9.3',
  messageDigest: '1.2.840.113549.1.9.4',
  signingTime: '1.2.840.113549.1.9.5',
  sha256: '2.16.840.1.101.3.4.2.1',
  sha384: '2.16.840.1.101.3.4.2.2',
  sha512: '2.16.840.1.101.3.4.2.3',
  sha1: '1.3.14.3.2.26',
  rsaEncryption: '1.2.840.113549.1.1.1',
  rsaOaep: '1.2.840.113549.1.1.7',
  mgf1: '1.2.840.113549.1.1.8',
  sha256WithRsa: '1.2.840.113549.1.1.11',
  ecdsaSha256: '1.2.840.10045.4.3.2',
  aes256cbc: '2.16.840.1.101.3.4.1.42',
  codeSigning: '1.3.6.1.5.5.7.3.3',
  emailProtection: '1.3.6.1.5.5.7.3.4',
  anyEku: '2.5.29.37.0',
  ecPublicKey: '1.2.840.10045.2.1',
  stdDhSha1Kdf: '1.3.133.16.840.63.0.2',
  stdDhSha224Kdf: '1.3.132.1.11.0',
  stdDhSha256Kdf: '1.3.132.1.11.1',
  stdDhSha384Kdf: '1.3.132.1.11.2',
  stdDhSha512Kdf: '1.3.132.1.11.3',
  aes128wrap: '2.16.840.1.101.3.4.1.5',
  aes192wrap: '2.16.840.1.101.3.4.1.25',
  aes256wrap: '2.16.840.1.101.3.4.1.45',
} as const;

const DIGESTS: Record<string, string> = { [OID.sha256]: 'sha256', [OID.sha384]: 'sha384', [OID.sha512]: 'sha512', [OID.sha1]: 'sha1' };

function ab(buf: Uint8Array): ArrayBuffer {
  return buf.buffer.slice(buf.byteOffset, buf.byteOffset + buf.byteLength) as ArrayBuffer;
}

/** Split a PEM bundle into DER certificates (a keyring file may hold several CAs). */
export function pemCertificates(pem: string, what: string): Buffer[] {
  const out: Buffer[] = [];
  for (const m of pem.matchAll(/-----BEGIN CERTIFICATE-----([\s\S]*?)-----END CERTIFICATE-----/g)) {
    out.push(Buffer.from((m[1] ?? '').replace(/\s+/g, ''), 'base64'));
  }
  if (out.length === 0) throw new UserError('LAMA_E_BAD_CERT', `${what} contains no PEM certificate`);
  return out;
}

function parseCert(der: Buffer): pkijs.Certificate {
  return pkijs.Certificate.fromBER(ab(der));
}

function parseCms(der: Buffer): pkijs.ContentInfo {
  try {
    return pkijs.ContentInfo.fromBER(ab(der));
  } catch (err) {
    throw new UserError('LAMA_E_BUNDLE_BAD_SIGNATURE', `signature is not valid CMS DER (${(err as Error).message})`, { cause: err });
  }
}

/** The CMS type at the start of a bundle's signature area, or undefined when it is not CMS. */
export function cmsType(der: Buffer): 'signed' | 'enveloped' | 'other' | undefined {
  try {
    const ci = pkijs.ContentInfo.fromBER(ab(der));
    if (ci.contentType === OID.signedData) return 'signed';
    if (ci.contentType === OID.envelopedData) return 'enveloped';
    return 'other';
  } catch {
    return undefined;
  }
}

/** DER-encode a SET OF in canonical (sorted) order, as DER requires for signed attributes. */
function sortedAttributes(attrs: pkijs.Attribute[]): pkijs.Attribute[] {
  const enc = attrs.map((a) => ({ a, der: Buffer.from(a.toSchema().toBER(false)) }));
  enc.sort((x, y) => Buffer.compare(x.der, y.der));
  return enc.map((e) => e.a);
}

function signingTimeValue(t: Date): asn1js.UTCTime | asn1js.GeneralizedTime {
  // RFC 5652: UTCTime for 1950..2049, GeneralizedTime otherwise (what OpenSSL writes too).
  const y = t.getUTCFullYear();
  return y >= 1950 && y < 2050 ? new asn1js.UTCTime({ valueDate: t }) : new asn1js.GeneralizedTime({ valueDate: t });
}

/** What signing needs: PEM texts of the signer certificate, its key and any intermediates. */
export interface SignerMaterial {
  certPem: string;
  keyPem: string;
  /** Intermediate CA certificates to embed (PEM texts). */
  chainPems?: string[];
}

/**
 * CMS SignedData over `content` with the content embedded (RAUC's verity/crypt manifest signature).
 * `signingTime` fixes the only varying input so that two runs produce identical DER (RSA PKCS#1 v1.5
 * signatures are deterministic; ECDSA is not).
 */
export function signEmbedded(content: Buffer, signer: SignerMaterial, signingTime: Date): Buffer {
  const certDer = pemCertificates(signer.certPem, 'signing certificate')[0] as Buffer;
  const cert = parseCert(certDer);
  let key: KeyObject;
  try {
    key = createPrivateKey(signer.keyPem);
  } catch (err) {
    throw new UserError('LAMA_E_BAD_KEY', `signing key is not a readable PEM private key`, { cause: err });
  }
  const x509 = new X509Certificate(certDer);
  if (!x509.checkPrivateKey(key)) throw new UserError('LAMA_E_BAD_KEY', 'signing key does not belong to the signing certificate');
  const chain = (signer.chainPems ?? []).flatMap((p) => pemCertificates(p, 'intermediate certificate')).map(parseCert);
  const digest = createHash('sha256').update(content).digest();
  const attrs = sortedAttributes([
    new pkijs.Attribute({ type: OID.contentType, values: [new asn1js.ObjectIdentifier({ value: OID.data })] }),
    new pkijs.Attribute({ type: OID.signingTime, values: [signingTimeValue(signingTime)] }),
    new pkijs.Attribute({ type: OID.messageDigest, values: [new asn1js.OctetString({ valueHex: ab(digest) })] }),
  ]);
  const setDer = Buffer.from(new asn1js.Set({ value: attrs.map((a) => a.toSchema()) }).toBER(false));
  const isRsa = key.asymmetricKeyType === 'rsa';
  if (!isRsa && key.asymmetricKeyType !== 'ec') {
    throw new UserError('LAMA_E_BAD_KEY', `unsupported signing key type '${key.asymmetricKeyType}' (RSA or EC)`);
  }
  const signature = cryptoSign('sha256', setDer, key);
  const signerInfo = new pkijs.SignerInfo({
    version: 1,
    sid: new pkijs.IssuerAndSerialNumber({ issuer: cert.issuer, serialNumber: cert.serialNumber }),
    digestAlgorithm: new pkijs.AlgorithmIdentifier({ algorithmId: OID.sha256 }),
    signedAttrs: new pkijs.SignedAndUnsignedAttributes({ type: 0, attributes: attrs }),
    // OpenSSL names plain rsaEncryption (with NULL parameters) as the RSA signature algorithm.
    signatureAlgorithm: isRsa
      ? new pkijs.AlgorithmIdentifier({ algorithmId: OID.rsaEncryption, algorithmParams: new asn1js.Null() })
      : new pkijs.AlgorithmIdentifier({ algorithmId: OID.ecdsaSha256 }),
    signature: new asn1js.OctetString({ valueHex: ab(signature) }),
  });
  const sd = new pkijs.SignedData({
    version: 1,
    digestAlgorithms: [new pkijs.AlgorithmIdentifier({ algorithmId: OID.sha256 })],
    encapContentInfo: new pkijs.EncapsulatedContentInfo({
      eContentType: OID.data,
      eContent: new asn1js.OctetString({ valueHex: ab(content) }),
    }),
    certificates: [cert, ...chain],
    signerInfos: [signerInfo],
  });
  const ci = new pkijs.ContentInfo({ contentType: OID.signedData, content: sd.toSchema(true) });
  return Buffer.from(ci.toSchema().toBER(false));
}

/** A certificate as inspect prints it. */
export interface CertSummary {
  subject: string;
  issuer: string;
  serial: string;
  /** SHA-256 over the SubjectPublicKeyInfo, colon-separated hex like `rauc info` prints it. */
  spkiSha256: string;
  notBefore: string;
  notAfter: string;
}

function summarize(c: X509Certificate): CertSummary {
  const spki = c.publicKey.export({ type: 'spki', format: 'der' });
  const fp = createHash('sha256').update(spki).digest('hex').toUpperCase().match(/../g)?.join(':') ?? '';
  return {
    subject: c.subject.replaceAll('\n', ', '),
    issuer: c.issuer.replaceAll('\n', ', '),
    serial: c.serialNumber,
    spkiSha256: fp,
    notBefore: new Date(c.validFrom).toISOString(),
    notAfter: new Date(c.validTo).toISOString(),
  };
}

/** The result of verifying a SignedData. */
export interface SignedContent {
  content: Buffer;
  signingTime?: Date;
  /** Signer first, trust anchor last. */
  chain: CertSummary[];
}

function getSignedData(der: Buffer): pkijs.SignedData {
  const ci = parseCms(der);
  if (ci.contentType !== OID.signedData) {
    throw new UserError('LAMA_E_BUNDLE_BAD_SIGNATURE', `signature is CMS ${ci.contentType}, expected SignedData`);
  }
  try {
    return new pkijs.SignedData({ schema: ci.content });
  } catch (err) {
    throw new UserError('LAMA_E_BUNDLE_BAD_SIGNATURE', `signature is not a valid SignedData (${(err as Error).message})`, { cause: err });
  }
}

function embeddedContent(sd: pkijs.SignedData): Buffer {
  const e = sd.encapContentInfo.eContent;
  if (!e) throw new UserError('LAMA_E_BUNDLE_BAD_SIGNATURE', 'signature is detached; verity and crypt bundles embed the manifest');
  // A constructed OCTET STRING (BER) is legal CMS: concatenate its segments.
  if (e.idBlock.isConstructed) {
    return Buffer.concat((e.valueBlock.value as asn1js.OctetString[]).map((p) => Buffer.from(p.valueBlock.valueHexView)));
  }
  return Buffer.from(e.valueBlock.valueHexView);
}

/** The embedded content without any check: for printing what an untrusted bundle claims. */
export function unverifiedContent(der: Buffer): Buffer {
  return embeddedContent(getSignedData(der));
}

/** The signer certificate of a SignedData, unverified: only for showing who claims to have signed. */
export function signerSummary(der: Buffer): CertSummary | undefined {
  try {
    const sd = getSignedData(der);
    const sid = sd.signerInfos[0]?.sid;
    const certs = (sd.certificates ?? []).map(certDerOf).filter((d): d is Buffer => d !== undefined).map((d) => new X509Certificate(d));
    const c = sid instanceof pkijs.IssuerAndSerialNumber ? certs.find((x) => sameIssuerSerial(x, sid)) : undefined;
    return c ? summarize(c) : undefined;
  } catch {
    return undefined;
  }
}

/**
 * The certificates a signature carries. They are untrusted bytes that pkijs parsed leniently: one
 * that node:crypto cannot load, or whose public key it cannot decode, refuses the signature.
 */
function includedCertificates(sd: pkijs.SignedData): X509Certificate[] {
  return (sd.certificates ?? []).map((item) => {
    try {
      const der = certDerOf(item);
      if (der === undefined) return undefined;
      const x = new X509Certificate(der);
      if (x.publicKey.type !== 'public') return undefined;
      return x;
    } catch {
      throw new UserError('LAMA_E_BUNDLE_BAD_SIGNATURE', 'the signature carries a malformed certificate');
    }
  }).filter((x): x is X509Certificate => x !== undefined);
}

function certDerOf(c: pkijs.CertificateSetItem): Buffer | undefined {
  return c instanceof pkijs.Certificate ? Buffer.from(c.toSchema().toBER(false)) : undefined;
}

function sameIssuerSerial(c: X509Certificate, sid: pkijs.IssuerAndSerialNumber): boolean {
  const pc = parseCert(Buffer.from(c.raw));
  return (
    Buffer.compare(Buffer.from(pc.serialNumber.valueBlock.valueHexView), Buffer.from(sid.serialNumber.valueBlock.valueHexView)) === 0 &&
    pc.issuer.isEqual(sid.issuer)
  );
}

function verifyAttrSignature(si: pkijs.SignerInfo, signed: Buffer, key: KeyObject, digestName: string): boolean {
  try {
    return cryptoVerify(digestName, signed, key, Buffer.from(si.signature.valueBlock.valueHexView));
  } catch {
    return false;
  }
}

function timeOk(c: X509Certificate, at: Date): boolean {
  return new Date(c.validFrom) <= at && at <= new Date(c.validTo);
}

/**
 * Verify an embedded SignedData the way RAUC does: the signature over the signed attributes, the
 * message digest over the embedded manifest, then a chain from the signer through the included
 * certificates to one of the keyring's CAs, valid now (or at the signing time with `useSigningTime`,
 * RAUC's `use-bundle-signing-time`), with a signer allowed to sign code (no EKU, codeSigning,
 * emailProtection or anyExtendedKeyUsage).
 * Throws LAMA_E_BUNDLE_BAD_SIGNATURE, LAMA_E_BUNDLE_MANIFEST_TAMPERED or LAMA_E_BUNDLE_UNTRUSTED_SIGNER.
 */
export function verifyEmbedded(der: Buffer, keyringPem: string, useSigningTime = false): SignedContent {
  const sd = getSignedData(der);
  const content = embeddedContent(sd);
  const r = verifySigner(sd, keyringPem, useSigningTime, {
    digest: (name) => createHash(name).update(content).digest(),
    content,
    mismatch: new UserError('LAMA_E_BUNDLE_MANIFEST_TAMPERED', 'the signed manifest does not match the digest in its signature'),
  });
  return { content, ...r };
}

/** True when the SignedData carries no content (a plain bundle's signature over the payload). */
export function isDetached(der: Buffer): boolean {
  return getSignedData(der).encapContentInfo.eContent === undefined;
}

/** The node:crypto name of the digest a detached signature was made with, so the caller can stream the content. */
export function detachedDigestName(der: Buffer): string {
  const si = getSignedData(der).signerInfos[0];
  const name = si ? DIGESTS[si.digestAlgorithm.algorithmId] : undefined;
  if (!name) throw new UserError('LAMA_E_BUNDLE_BAD_SIGNATURE', 'signature names no supported digest algorithm');
  return name;
}

/**
 * Verify a detached SignedData (RAUC's plain format) given the digest of the content, computed by
 * the caller with `detachedDigestName`. Same checks and errors as `verifyEmbedded`, except that a
 * digest mismatch is LAMA_E_BUNDLE_PAYLOAD_TAMPERED.
 */
export function verifyDetached(der: Buffer, keyringPem: string, contentDigest: Buffer, useSigningTime = false): Omit<SignedContent, 'content'> {
  return verifySigner(getSignedData(der), keyringPem, useSigningTime, {
    digest: () => contentDigest,
    mismatch: new UserError('LAMA_E_BUNDLE_PAYLOAD_TAMPERED', 'the payload does not match the digest in the signature (plain bundles have no per-block hashes to say where)'),
  });
}

function verifySigner(
  sd: pkijs.SignedData,
  keyringPem: string,
  useSigningTime: boolean,
  c: { digest: (name: string) => Buffer; content?: Buffer; mismatch: UserError },
): Omit<SignedContent, 'content'> {
  if (sd.signerInfos.length !== 1) {
    throw new UserError('LAMA_E_BUNDLE_BAD_SIGNATURE', `signature has ${sd.signerInfos.length} signers, expected exactly one`);
  }
  const si = sd.signerInfos[0] as pkijs.SignerInfo;
  const included = includedCertificates(sd);
  const sid = si.sid as pkijs.IssuerAndSerialNumber | asn1js.Primitive;
  const signerCert = sid instanceof pkijs.IssuerAndSerialNumber ? included.find((x) => sameIssuerSerial(x, sid)) : undefined;
  if (!signerCert) throw new UserError('LAMA_E_BUNDLE_BAD_SIGNATURE', 'the signer certificate is not included in the signature');
  const digestName = DIGESTS[si.digestAlgorithm.algorithmId];
  if (!digestName) throw new UserError('LAMA_E_BUNDLE_BAD_SIGNATURE', `unsupported digest algorithm ${si.digestAlgorithm.algorithmId}`);
  let signingTime: Date | undefined;
  if (!si.signedAttrs) {
    // Without signed attributes the signature covers the content itself (never written by OpenSSL's CMS_sign).
    if (!c.content) throw new UserError('LAMA_E_BUNDLE_BAD_SIGNATURE', 'a detached signature without signed attributes is not supported');
    if (!verifyAttrSignature(si, c.content, signerCert.publicKey, digestName)) {
      throw new UserError('LAMA_E_BUNDLE_BAD_SIGNATURE', 'the signature value does not verify with the signer certificate');
    }
  } else {
    const attrDer = Buffer.from(si.signedAttrs.encodedValue);
    if (!verifyAttrSignature(si, attrDer, signerCert.publicKey, digestName)) {
      throw new UserError('LAMA_E_BUNDLE_BAD_SIGNATURE', 'the signature value does not verify with the signer certificate');
    }
    const md = si.signedAttrs.attributes.find((a) => a.type === OID.messageDigest)?.values[0] as asn1js.OctetString | undefined;
    if (!md) throw new UserError('LAMA_E_BUNDLE_BAD_SIGNATURE', 'signature has no messageDigest attribute');
    if (Buffer.compare(c.digest(digestName), Buffer.from(md.valueBlock.valueHexView)) !== 0) throw c.mismatch;
    const st = si.signedAttrs.attributes.find((a) => a.type === OID.signingTime)?.values[0] as asn1js.UTCTime | undefined;
    if (st) signingTime = st.toDate();
  }
  const chain = buildChain(signerCert, included, keyringPem, (useSigningTime && signingTime) || new Date());
  const eku = signerCert.keyUsage;
  if (eku && eku.length > 0 && ![OID.codeSigning, OID.emailProtection, OID.anyEku].some((o) => eku.includes(o))) {
    throw new UserError('LAMA_E_BUNDLE_UNTRUSTED_SIGNER', `signer ${signerCert.subject.replaceAll('\n', ', ')} is not allowed to sign code (extended key usage ${eku.join(', ')})`);
  }
  return { ...(signingTime && { signingTime }), chain: chain.map(summarize) };
}

function selfSigned(c: X509Certificate): boolean {
  return c.checkIssued(c) && c.verify(c.publicKey);
}

/**
 * Signer to a self-signed root of the keyring, through the included certificates and the keyring's
 * own intermediates. Like OpenSSL's default (and RAUC without `allow-partial-chain`), a keyring
 * certificate that is not a self-signed root is not a trust anchor by itself.
 */
function buildChain(leaf: X509Certificate, included: X509Certificate[], keyringPem: string, at: Date): X509Certificate[] {
  const anchors = pemCertificates(keyringPem, 'keyring').map((d) => new X509Certificate(d));
  const name = (c: X509Certificate): string => c.subject.replaceAll('\n', ', ');
  const issuedBy = (cur: X509Certificate, c: X509Certificate): boolean => !c.raw.equals(cur.raw) && c.ca && cur.checkIssued(c) && cur.verify(c.publicKey);
  const chain = [leaf];
  let cur = leaf;
  let partial: X509Certificate | undefined;
  for (let depth = 0; depth < 8; depth++) {
    if (!timeOk(cur, at)) throw new UserError('LAMA_E_BUNDLE_UNTRUSTED_SIGNER', `certificate ${name(cur)} is not valid at ${at.toISOString()}`);
    const trusted = anchors.some((a) => a.raw.equals(cur.raw));
    if (trusted && selfSigned(cur)) return chain;
    if (trusted) partial ??= cur;
    const next = anchors.find((a) => issuedBy(cur, a)) ?? included.find((c) => issuedBy(cur, c));
    if (!next) break;
    chain.push(next);
    cur = next;
  }
  if (partial) {
    throw new UserError('LAMA_E_BUNDLE_UNTRUSTED_SIGNER', `signer ${name(leaf)} chains only to keyring certificate ${name(partial)}, which is not a self-signed root (RAUC needs allow-partial-chain for that)`);
  }
  throw new UserError('LAMA_E_BUNDLE_UNTRUSTED_SIGNER', `signer ${name(leaf)} does not chain to a CA in the keyring`);
}

/** RFC 3394 AES key wrap, named by key size: the KEK algorithm OpenSSL pairs with AES content encryption. */
const AES_WRAP: Record<string, { cipher: string; keyLength: number }> = {
  [OID.aes128wrap]: { cipher: 'id-aes128-wrap', keyLength: 16 },
  [OID.aes192wrap]: { cipher: 'id-aes192-wrap', keyLength: 24 },
  [OID.aes256wrap]: { cipher: 'id-aes256-wrap', keyLength: 32 },
};
/** RFC 5753 standard (non-cofactor) ECDH key agreement schemes and the X9.63 KDF hash of each. */
const ECDH_KDF: Record<string, string> = {
  [OID.stdDhSha1Kdf]: 'sha1',
  [OID.stdDhSha224Kdf]: 'sha224',
  [OID.stdDhSha256Kdf]: 'sha256',
  [OID.stdDhSha384Kdf]: 'sha384',
  [OID.stdDhSha512Kdf]: 'sha512',
};
const WRAP_IV = Buffer.from('a6a6a6a6a6a6a6a6', 'hex');

/**
 * The key-encryption key of a KeyAgreeRecipientInfo (RFC 5753): the ANSI X9.63 KDF over the ECDH
 * shared secret and the DER of ECC-CMS-SharedInfo (wrap algorithm, optional ukm, KEK length in bits).
 */
function x963Kek(hash: string, z: Buffer, wrapOid: string, keyLength: number, ukm?: Buffer): Buffer {
  const suppPubInfo = Buffer.alloc(4);
  suppPubInfo.writeUInt32BE(keyLength * 8);
  const sharedInfo = new pkijs.ECCCMSSharedInfo({
    keyInfo: new pkijs.AlgorithmIdentifier({ algorithmId: wrapOid }),
    ...(ukm && { entityUInfo: new asn1js.OctetString({ valueHex: ab(ukm) }) }),
    suppPubInfo: new asn1js.OctetString({ valueHex: ab(suppPubInfo) }),
  });
  const info = Buffer.from(sharedInfo.toSchema().toBER(false));
  const out: Buffer[] = [];
  for (let counter = 1; out.length * createHash(hash).digest().length < keyLength; counter++) {
    const c = Buffer.alloc(4);
    c.writeUInt32BE(counter);
    out.push(createHash(hash).update(z).update(c).update(info).digest());
  }
  return Buffer.concat(out).subarray(0, keyLength);
}

/** An uncompressed EC point (0x04 || X || Y) as a public key on the curve of `like`. */
function ecPoint(point: Buffer, like: KeyObject): KeyObject {
  const crv = (like.export({ format: 'jwk' }) as { crv?: string }).crv;
  const half = (point.length - 1) / 2;
  if (point[0] !== 0x04 || !Number.isInteger(half) || !crv) {
    throw new UserError('LAMA_E_BUNDLE_BAD_SIGNATURE', 'the originator key of an EC recipient entry is not an uncompressed point');
  }
  const b64 = (b: Buffer): string => b.toString('base64url');
  try {
    return createPublicKey({ key: { kty: 'EC', crv, x: b64(point.subarray(1, 1 + half)), y: b64(point.subarray(1 + half)) }, format: 'jwk' });
  } catch (err) {
    throw new UserError('LAMA_E_BUNDLE_BAD_SIGNATURE', 'the originator key of an EC recipient entry is not a point on the device key\'s curve', { cause: err });
  }
}

function uncompressedPoint(key: KeyObject): Buffer {
  const jwk = key.export({ format: 'jwk' }) as { x?: string; y?: string };
  return Buffer.concat([Buffer.from([4]), Buffer.from(jwk.x ?? '', 'base64url'), Buffer.from(jwk.y ?? '', 'base64url')]);
}

/** A KeyTransRecipientInfo for an RSA certificate: RSAES-OAEP (SHA-256) over the content key. */
function rsaRecipient(x: X509Certificate, c: pkijs.Certificate, cek: Buffer): pkijs.RecipientInfo {
  const wrapped = publicEncrypt({ key: x.publicKey, padding: constants.RSA_PKCS1_OAEP_PADDING, oaepHash: 'sha256' }, cek);
  const oaepParams = new pkijs.RSAESOAEPParams({
    hashAlgorithm: new pkijs.AlgorithmIdentifier({ algorithmId: OID.sha256 }),
    maskGenAlgorithm: new pkijs.AlgorithmIdentifier({
      algorithmId: OID.mgf1,
      algorithmParams: new pkijs.AlgorithmIdentifier({ algorithmId: OID.sha256 }).toSchema(),
    }),
  });
  return new pkijs.RecipientInfo({
    variant: 1,
    value: new pkijs.KeyTransRecipientInfo({
      version: 0,
      rid: new pkijs.IssuerAndSerialNumber({ issuer: c.issuer, serialNumber: c.serialNumber }),
      keyEncryptionAlgorithm: new pkijs.AlgorithmIdentifier({ algorithmId: OID.rsaOaep, algorithmParams: oaepParams.toSchema() }),
      encryptedKey: new asn1js.OctetString({ valueHex: ab(wrapped) }),
    }),
  });
}

/**
 * A KeyAgreeRecipientInfo for an EC certificate exactly as OpenSSL's CMS_encrypt (and so `rauc
 * encrypt`) writes it: a fresh ephemeral key on the recipient's curve as originatorKey (parameters
 * absent), dhSinglePass-stdDH-sha1kdf-scheme with aes256-wrap, no ukm.
 */
function ecRecipient(x: X509Certificate, c: pkijs.Certificate, cek: Buffer): pkijs.RecipientInfo {
  const namedCurve = x.publicKey.asymmetricKeyDetails?.namedCurve;
  if (!namedCurve) throw new UserError('LAMA_E_BUNDLE_RECIPIENT', `recipient ${x.subject.replaceAll('\n', ', ')} has an EC key on an unnamed curve`);
  const eph = generateKeyPairSync('ec', { namedCurve });
  const z = diffieHellman({ privateKey: eph.privateKey, publicKey: x.publicKey });
  const kek = x963Kek('sha1', z, OID.aes256wrap, 32);
  const w = createCipheriv('id-aes256-wrap', kek, WRAP_IV);
  const wrapped = Buffer.concat([w.update(cek), w.final()]);
  return new pkijs.RecipientInfo({
    variant: 2,
    value: new pkijs.KeyAgreeRecipientInfo({
      version: 3,
      originator: new pkijs.OriginatorIdentifierOrKey({
        variant: 3,
        value: new pkijs.OriginatorPublicKey({
          algorithm: new pkijs.AlgorithmIdentifier({ algorithmId: OID.ecPublicKey }),
          publicKey: new asn1js.BitString({ valueHex: ab(uncompressedPoint(eph.publicKey)) }),
        }),
      }),
      keyEncryptionAlgorithm: new pkijs.AlgorithmIdentifier({
        algorithmId: OID.stdDhSha1Kdf,
        algorithmParams: new pkijs.AlgorithmIdentifier({ algorithmId: OID.aes256wrap }).toSchema(),
      }),
      recipientEncryptedKeys: new pkijs.RecipientEncryptedKeys({
        encryptedKeys: [
          new pkijs.RecipientEncryptedKey({
            rid: new pkijs.KeyAgreeRecipientIdentifier({ variant: 1, value: new pkijs.IssuerAndSerialNumber({ issuer: c.issuer, serialNumber: c.serialNumber }) }),
            encryptedKey: new asn1js.OctetString({ valueHex: ab(wrapped) }),
          }),
        ],
      }),
    }),
  });
}

/**
 * CMS EnvelopedData of `content` (the bundle's SignedData) for every recipient certificate: a fresh
 * AES-256-CBC content key, wrapped per RSA recipient with RSAES-OAEP (SHA-256) and per EC recipient
 * with ECDH key agreement (RFC 5753, as OpenSSL writes it), both of which OpenSSL and so RAUC
 * decrypt. Recipients are identified by issuer and serial number, as OpenSSL does.
 */
export function envelope(content: Buffer, recipientPems: string[]): Buffer {
  if (recipientPems.length === 0) throw new UserError('LAMA_E_BUNDLE_NO_RECIPIENTS', 'encrypting needs at least one recipient certificate');
  const cek = randomBytes(32);
  const iv = randomBytes(16);
  const cipher = createCipheriv('aes-256-cbc', cek, iv);
  const encrypted = Buffer.concat([cipher.update(content), cipher.final()]);
  const recipientInfos = recipientPems.flatMap((pem) => pemCertificates(pem, 'recipient certificate')).map((der) => {
    const x = new X509Certificate(der);
    const type = x.publicKey.asymmetricKeyType;
    if (type === 'rsa') return rsaRecipient(x, parseCert(der), cek);
    if (type === 'ec') return ecRecipient(x, parseCert(der), cek);
    throw new UserError('LAMA_E_BUNDLE_RECIPIENT', `recipient ${x.subject.replaceAll('\n', ', ')} has a ${type} key; only RSA and EC recipients are supported`);
  });
  const ed = new pkijs.EnvelopedData({
    // RFC 5652 6.1: version 2 as soon as one recipient entry is not a version 0 KeyTransRecipientInfo.
    version: recipientInfos.every((r) => r.variant === 1) ? 0 : 2,
    recipientInfos,
    encryptedContentInfo: new pkijs.EncryptedContentInfo({
      contentType: OID.data,
      contentEncryptionAlgorithm: new pkijs.AlgorithmIdentifier({
        algorithmId: OID.aes256cbc,
        algorithmParams: new asn1js.OctetString({ valueHex: ab(iv) }),
      }),
      encryptedContent: new asn1js.OctetString({ valueHex: ab(encrypted) }),
      // pkijs otherwise splits large content into an indefinite-length BER string; the trailer
      // format and our own size checks want plain DER.
      disableSplit: true,
    }),
  });
  const ci = new pkijs.ContentInfo({ contentType: OID.envelopedData, content: ed.toSchema() });
  return Buffer.from(ci.toSchema().toBER(false));
}

function ridText(rid: unknown): { issuer: string; serial: string } {
  if (!(rid instanceof pkijs.IssuerAndSerialNumber)) return { issuer: '', serial: '' };
  return {
    issuer: rid.issuer.typesAndValues.map((t) => `${t.type}=${t.value.valueBlock.value}`).join(', '),
    serial: Buffer.from(rid.serialNumber.valueBlock.valueHexView).toString('hex').toUpperCase(),
  };
}

/** Recipients of an EnvelopedData, for inspect: one row per RSA entry and per EC recipient key. */
export function recipientsOf(der: Buffer): { issuer: string; serial: string; keyEncryption: string }[] {
  const ed = getEnveloped(der);
  return ed.recipientInfos.flatMap((ri) => {
    if (ri.variant === 2) {
      const k = ri.value as pkijs.KeyAgreeRecipientInfo;
      return k.recipientEncryptedKeys.encryptedKeys.map((r) => ({ ...ridText(r.rid.value), keyEncryption: k.keyEncryptionAlgorithm.algorithmId }));
    }
    const k = ri.value as pkijs.KeyTransRecipientInfo;
    return [{ ...ridText(k.rid), keyEncryption: k.keyEncryptionAlgorithm?.algorithmId ?? 'unknown' }];
  });
}

function getEnveloped(der: Buffer): pkijs.EnvelopedData {
  const ci = parseCms(der);
  if (ci.contentType !== OID.envelopedData) throw new UserError('LAMA_E_BUNDLE_BAD_SIGNATURE', 'signature area is not CMS EnvelopedData');
  try {
    return new pkijs.EnvelopedData({ schema: ci.content });
  } catch (err) {
    throw new UserError('LAMA_E_BUNDLE_BAD_SIGNATURE', `signature is not a valid EnvelopedData (${(err as Error).message})`, { cause: err });
  }
}

/** PKCS#1 v1.5 type 2 unpadding after a raw RSA decryption (OpenSSL's default CMS key transport). */
function unpadPkcs1(block: Buffer): Buffer | undefined {
  if (block[0] !== 0 || block[1] !== 2) return undefined;
  const sep = block.indexOf(0, 2);
  if (sep < 10) return undefined;
  return block.subarray(sep + 1);
}

function unwrapRsa(k: pkijs.KeyTransRecipientInfo, key: KeyObject): Buffer | undefined {
  const wrapped = Buffer.from(k.encryptedKey.valueBlock.valueHexView);
  try {
    if (k.keyEncryptionAlgorithm.algorithmId === OID.rsaOaep) {
      const params = k.keyEncryptionAlgorithm.algorithmParams
        ? new pkijs.RSAESOAEPParams({ schema: k.keyEncryptionAlgorithm.algorithmParams })
        : undefined;
      const hash = DIGESTS[params?.hashAlgorithm.algorithmId ?? OID.sha1] ?? 'sha1';
      return privateDecrypt({ key, padding: constants.RSA_PKCS1_OAEP_PADDING, oaepHash: hash }, wrapped);
    }
    if (k.keyEncryptionAlgorithm.algorithmId === OID.rsaEncryption) {
      return unpadPkcs1(privateDecrypt({ key, padding: constants.RSA_NO_PADDING }, wrapped));
    }
  } catch {
    return undefined;
  }
  return undefined;
}

/**
 * The content key from one EC recipient entry: ECDH between the device key and the originator's
 * ephemeral key, X9.63 KDF, AES key unwrap. Undefined when the entry is not for this key (the key
 * unwrap's integrity check fails).
 */
function unwrapEc(k: pkijs.KeyAgreeRecipientInfo, encryptedKey: Buffer, key: KeyObject): Buffer | undefined {
  const kdf = ECDH_KDF[k.keyEncryptionAlgorithm.algorithmId];
  if (!kdf) {
    throw new UserError('LAMA_E_BUNDLE_BAD_SIGNATURE', `unsupported EC key agreement ${k.keyEncryptionAlgorithm.algorithmId} (only the standard ECDH schemes)`);
  }
  if (k.originator.variant !== 3) throw new UserError('LAMA_E_BUNDLE_BAD_SIGNATURE', 'EC recipient entry has no originator public key');
  let wrapOid: string;
  try {
    wrapOid = new pkijs.AlgorithmIdentifier({ schema: k.keyEncryptionAlgorithm.algorithmParams }).algorithmId;
  } catch (err) {
    throw new UserError('LAMA_E_BUNDLE_BAD_SIGNATURE', 'EC recipient entry names no key wrap algorithm', { cause: err });
  }
  const wrap = AES_WRAP[wrapOid];
  if (!wrap) throw new UserError('LAMA_E_BUNDLE_BAD_SIGNATURE', `unsupported key wrap algorithm ${wrapOid}`);
  const origin = k.originator.value as pkijs.OriginatorPublicKey;
  const z = diffieHellman({ privateKey: key, publicKey: ecPoint(Buffer.from(origin.publicKey.valueBlock.valueHexView), key) });
  const ukm = k.ukm ? Buffer.from(k.ukm.valueBlock.valueHexView) : undefined;
  const kek = x963Kek(kdf, z, wrapOid, wrap.keyLength, ukm);
  try {
    const d = createDecipheriv(wrap.cipher, kek, WRAP_IV);
    return Buffer.concat([d.update(encryptedKey), d.final()]);
  } catch {
    return undefined;
  }
}

/** Every content key candidate this device key can unwrap, restricted to the certificate's entries when given. */
function contentKeys(ed: pkijs.EnvelopedData, key: KeyObject, cert?: X509Certificate): Buffer[] {
  const mine = (rid: unknown): boolean => !cert || (rid instanceof pkijs.IssuerAndSerialNumber && sameIssuerSerial(cert, rid));
  const keys: (Buffer | undefined)[] = [];
  for (const ri of ed.recipientInfos) {
    if (ri.variant === 1 && key.asymmetricKeyType === 'rsa') {
      const k = ri.value as pkijs.KeyTransRecipientInfo;
      if (mine(k.rid)) keys.push(unwrapRsa(k, key));
    } else if (ri.variant === 2 && key.asymmetricKeyType === 'ec') {
      const k = ri.value as pkijs.KeyAgreeRecipientInfo;
      for (const r of k.recipientEncryptedKeys.encryptedKeys) {
        if (mine(r.rid.value)) keys.push(unwrapEc(k, Buffer.from(r.encryptedKey.valueBlock.valueHexView), key));
      }
    }
  }
  return keys.filter((k): k is Buffer => k?.length === 32);
}

/**
 * Decrypt an EnvelopedData with a device's private key, RSA (key transport) or EC (key agreement),
 * and optionally its certificate to pick its recipient entries. Throws
 * LAMA_E_BUNDLE_WRONG_DEVICE_KEY when the key is not one of the recipients.
 */
export function decryptEnvelope(der: Buffer, keyPem: string, certPem?: string): Buffer {
  const ed = getEnveloped(der);
  let key: KeyObject;
  try {
    key = createPrivateKey(keyPem);
  } catch (err) {
    throw new UserError('LAMA_E_BAD_KEY', 'device key is not a readable PEM private key', { cause: err });
  }
  const pub = createPublicKey(key);
  const cert = certPem ? new X509Certificate(pemCertificates(certPem, 'device certificate')[0] as Buffer) : undefined;
  if (cert && !cert.publicKey.equals(pub)) throw new UserError('LAMA_E_BAD_KEY', 'device key does not belong to the device certificate');
  const eci = ed.encryptedContentInfo;
  if (eci.contentEncryptionAlgorithm.algorithmId !== OID.aes256cbc) {
    throw new UserError('LAMA_E_BUNDLE_BAD_SIGNATURE', `unsupported content encryption ${eci.contentEncryptionAlgorithm.algorithmId}`);
  }
  const ivParam = eci.contentEncryptionAlgorithm.algorithmParams;
  if (!(ivParam instanceof asn1js.OctetString) || ivParam.valueBlock.valueHexView.length !== 16) {
    throw new UserError('LAMA_E_BUNDLE_BAD_SIGNATURE', 'EnvelopedData has no 16-byte AES IV');
  }
  const iv = Buffer.from(ivParam.valueBlock.valueHexView);
  const ec = eci.encryptedContent;
  if (!ec) throw new UserError('LAMA_E_BUNDLE_BAD_SIGNATURE', 'EnvelopedData carries no encrypted content');
  const encrypted = ec.idBlock.isConstructed
    ? Buffer.concat((ec.valueBlock.value as asn1js.OctetString[]).map((p) => Buffer.from(p.valueBlock.valueHexView)))
    : Buffer.from(ec.valueBlock.valueHexView);
  const keys = contentKeys(ed, key, cert);
  for (const cek of keys) {
    try {
      const d = createDecipheriv('aes-256-cbc', cek, iv);
      return Buffer.concat([d.update(encrypted), d.final()]);
    } catch {
      // Wrong key material shows up as bad padding; try the next recipient entry.
    }
  }
  // OAEP and AES key wrap refuse a wrong key, so an unwrapped key that does not decrypt means damage.
  if (keys.length > 0) throw new UserError('LAMA_E_BUNDLE_BAD_SIGNATURE', 'the encrypted signature is damaged: the device key opens its recipient entry but the content does not decrypt');
  throw new UserError('LAMA_E_BUNDLE_WRONG_DEVICE_KEY', 'the device key is not among the bundle\'s recipients');
}
