/**
 * PKCS#7 SignedData as UEFI uses it, built with pkijs/asn1js and signed with node:crypto (RSA
 * PKCS#1 v1.5 or ECDSA, whatever the key is). Two shapes: Authenticode (embedded
 * SpcIndirectDataContent, signed attributes) and authenticated variables (detached, no attributes).
 */
import { X509Certificate, createHash, createPrivateKey, sign as nodeSign, verify as nodeVerify, type KeyObject } from 'node:crypto';
import * as asn1js from 'asn1js';
import * as pkijs from 'pkijs';
import { UserError } from '../errors.js';

export const OID = {
  data: '1.2.840.113549.1.7.1',
  signedData: '1.2.840.113549.1.7.2',
  contentType: '1.2.840.113549.1.9.3',
  messageDigest: '1.2.840.113549.1.9.4',
  rsaEncryption: '1.2.840.113549.1.1.1',
  ecPublicKey: '1.2.840.10045.2.1',
  ecdsaWithSha256: '1.2.840.10045.4.3.2',
  sha256: '2.16.840.1.101.3.4.2.1',
  sha384: '2.16.840.1.101.3.4.2.2',
  sha512: '2.16.840.1.101.3.4.2.3',
  sha1: '1.3.14.3.2.26',
  spcIndirectData: '1.3.6.1.4.1.311.2.1.4',
  spcPeImageData: '1.3.6.1.4.1.311.2.1.15',
  spcSpOpusInfo: '1.3.6.1.4.1.311.2.1.12',
} as const;

export type HashName = 'sha1' | 'sha256' | 'sha384' | 'sha512';

/** Map a digest OID back to node's hash name. */
export function hashForOid(oid: string): HashName | undefined {
  const table: Record<string, HashName> = { [OID.sha256]: 'sha256', [OID.sha384]: 'sha384', [OID.sha512]: 'sha512', [OID.sha1]: 'sha1' };
  return table[oid];
}

/** A signer: certificate (PEM or DER) and its private key (PEM). */
export interface SignerKeys {
  certPem: string | Buffer;
  keyPem: string | Buffer;
}

/** Parsed signer material, checked for a matching key and a currently valid certificate. */
export interface LoadedSigner {
  cert: pkijs.Certificate;
  certDer: Buffer;
  x509: X509Certificate;
  key: KeyObject;
}

/** Parse a PEM or DER certificate into pkijs and node forms. */
export function loadCertificate(pemOrDer: string | Buffer, where?: string): { cert: pkijs.Certificate; der: Buffer; x509: X509Certificate } {
  let x509: X509Certificate;
  try {
    x509 = new X509Certificate(pemOrDer);
  } catch {
    throw new UserError('LAMA_E_BAD_CERT', 'not an X.509 certificate (PEM or DER)', where ? { where } : undefined);
  }
  const der = x509.raw;
  const cert = pkijs.Certificate.fromBER(der);
  return { cert, der, x509 };
}

/**
 * Load a signer, refusing an expired or not-yet-valid certificate and a key that does not belong
 * to it: a signature made with either would be rejected later, far from the cause.
 */
export function loadSigner(keys: SignerKeys, now = new Date()): LoadedSigner {
  const { cert, der, x509 } = loadCertificate(keys.certPem);
  let key: KeyObject;
  try {
    key = createPrivateKey(keys.keyPem);
  } catch {
    throw new UserError('LAMA_E_BAD_KEY', 'not a private key (PEM PKCS#8, PKCS#1 or SEC1)');
  }
  if (!x509.checkPrivateKey(key)) throw new UserError('LAMA_E_KEY_MISMATCH', `private key does not match certificate ${x509.subject.replace(/\n/g, ', ')}`);
  if (new Date(x509.validTo) < now) {
    throw new UserError('LAMA_E_CERT_EXPIRED', `certificate ${x509.subject.replace(/\n/g, ', ')} expired on ${new Date(x509.validTo).toISOString()}`);
  }
  if (new Date(x509.validFrom) > now) {
    throw new UserError('LAMA_E_CERT_NOT_YET_VALID', `certificate ${x509.subject.replace(/\n/g, ', ')} is not valid before ${new Date(x509.validFrom).toISOString()}`);
  }
  return { cert, certDer: der, x509, key };
}

function algorithmId(oid: string, withNull: boolean): pkijs.AlgorithmIdentifier {
  return new pkijs.AlgorithmIdentifier({ algorithmId: oid, ...(withNull ? { algorithmParams: new asn1js.Null() } : {}) });
}

function signatureAlgorithm(key: KeyObject): pkijs.AlgorithmIdentifier {
  if (key.asymmetricKeyType === 'rsa') return algorithmId(OID.rsaEncryption, true);
  if (key.asymmetricKeyType === 'ec') return algorithmId(OID.ecdsaWithSha256, false);
  throw new UserError('LAMA_E_BAD_KEY', `unsupported key type ${key.asymmetricKeyType ?? 'unknown'} (RSA or EC needed)`);
}

function toBuf(ab: ArrayBuffer | ArrayBufferView): Buffer {
  return ab instanceof ArrayBuffer ? Buffer.from(ab) : Buffer.from(ab.buffer, ab.byteOffset, ab.byteLength);
}

function attribute(type: string, value: asn1js.AsnType): pkijs.Attribute {
  return new pkijs.Attribute({ type, values: [value] });
}

/**
 * Build a SignedData. With `attributes`, the signature covers the DER SET of signed attributes
 * (content type, message digest of `digestInput`, extras) as Authenticode requires; without, it
 * covers `digestInput` directly (authenticated variables). DER sorts a SET OF by encoding.
 */
export function buildSignedData(opts: {
  signer: LoadedSigner;
  contentType: string;
  /** Embedded content (Authenticode); omit for a detached signature. */
  eContent?: asn1js.AsnType;
  digestInput: Buffer;
  attributes?: { extra?: pkijs.Attribute[] };
}): Buffer {
  const { signer } = opts;
  const hash = 'sha256';
  const signerInfo = new pkijs.SignerInfo({
    version: 1,
    sid: new pkijs.IssuerAndSerialNumber({ issuer: signer.cert.issuer, serialNumber: signer.cert.serialNumber }),
    digestAlgorithm: algorithmId(OID.sha256, true),
    signatureAlgorithm: signatureAlgorithm(signer.key),
  });
  let toSign = opts.digestInput;
  if (opts.attributes) {
    const attrs = [
      attribute(OID.contentType, new asn1js.ObjectIdentifier({ value: opts.contentType })),
      attribute(OID.messageDigest, new asn1js.OctetString({ valueHex: createHash(hash).update(opts.digestInput).digest() })),
      ...(opts.attributes.extra ?? []),
    ]
      .map((a) => ({ a, der: toBuf(a.toSchema().toBER()) }))
      .sort((x, y) => Buffer.compare(x.der, y.der));
    signerInfo.signedAttrs = new pkijs.SignedAndUnsignedAttributes({ type: 0, attributes: attrs.map((x) => x.a) });
    toSign = toBuf(new asn1js.Set({ value: attrs.map((x) => x.a.toSchema()) }).toBER());
  }
  const signature = nodeSign(hash, toSign, signer.key);
  signerInfo.signature = new asn1js.OctetString({ valueHex: signature });
  const signed = new pkijs.SignedData({
    version: 1,
    digestAlgorithms: [algorithmId(OID.sha256, true)],
    encapContentInfo: new pkijs.EncapsulatedContentInfo({
      eContentType: opts.contentType,
      ...(opts.eContent ? { eContent: opts.eContent as asn1js.OctetString } : {}),
    }),
    certificates: [signer.cert],
    signerInfos: [signerInfo],
  });
  const info = new pkijs.ContentInfo({ contentType: OID.signedData, content: signed.toSchema(true) });
  return toBuf(info.toSchema().toBER());
}

/** A parsed SignedData with its single signer's certificate. */
export interface ParsedSignedData {
  signed: pkijs.SignedData;
  signerInfo: pkijs.SignerInfo;
  /** Certificate matching the signer's issuer and serial, when the blob carries it. */
  signerCert?: X509Certificate;
  certificates: X509Certificate[];
}

/** Parse DER ContentInfo(SignedData) or a bare SignedData. */
export function parseSignedData(der: Buffer, where?: string): ParsedSignedData {
  const bad = (m: string): never => {
    throw new UserError('LAMA_E_BAD_SIGNATURE', m, where ? { where } : undefined);
  };
  let signed: pkijs.SignedData | undefined;
  try {
    const asn = asn1js.fromBER(new Uint8Array(der));
    if (asn.offset === -1) bad('signature is not valid DER');
    let schema = asn.result;
    try {
      const ci = new pkijs.ContentInfo({ schema });
      if (ci.contentType !== OID.signedData) bad(`signature content type ${ci.contentType} is not SignedData`);
      schema = ci.content as asn1js.AsnType;
    } catch (e) {
      if (e instanceof UserError) throw e;
    }
    signed = new pkijs.SignedData({ schema });
  } catch (e) {
    if (e instanceof UserError) throw e;
    bad('signature is not a PKCS#7 SignedData');
  }
  const sd = signed as pkijs.SignedData;
  const signerInfo = sd.signerInfos[0];
  if (!signerInfo) return bad('SignedData has no signer');
  const certificates = (sd.certificates ?? [])
    .filter((c): c is pkijs.Certificate => c instanceof pkijs.Certificate)
    .map((c) => new X509Certificate(toBuf(c.toSchema().toBER())));
  let signerCert: X509Certificate | undefined;
  const sid = signerInfo.sid as pkijs.IssuerAndSerialNumber;
  if (sid instanceof pkijs.IssuerAndSerialNumber) {
    const serial = toBuf(sid.serialNumber.valueBlock.valueHexView).toString('hex').replace(/^0+/, '').toUpperCase();
    signerCert = certificates.find((c) => c.serialNumber.replace(/^0+/, '').toUpperCase() === serial);
  }
  return { signed: sd, signerInfo, signerCert, certificates };
}

/** The value bytes of a DER TLV (what Authenticode's messageDigest covers for the SpcIndirectDataContent). */
export function derContents(tlv: Buffer): Buffer {
  let off = 1;
  const first = tlv[off++] ?? 0;
  if (first & 0x80) off += first & 0x7f;
  return tlv.subarray(off);
}

/**
 * Check the signer's signature: over the signed attributes (whose messageDigest must equal the
 * digest of `content`) or directly over `content` when there are none.
 */
export function verifySignerInfo(p: ParsedSignedData, content: Buffer, where?: string): void {
  const bad = (m: string): never => {
    throw new UserError('LAMA_E_BAD_SIGNATURE', m, where ? { where } : undefined);
  };
  if (!p.signerCert) return bad('the signer certificate is not included in the signature');
  const hash = hashForOid(p.signerInfo.digestAlgorithm.algorithmId);
  if (!hash) return bad(`unsupported digest algorithm ${p.signerInfo.digestAlgorithm.algorithmId}`);
  const signature = toBuf(p.signerInfo.signature.valueBlock.valueHexView);
  let data = content;
  if (p.signerInfo.signedAttrs) {
    const md = p.signerInfo.signedAttrs.attributes.find((a) => a.type === OID.messageDigest);
    const value = md?.values[0] as asn1js.OctetString | undefined;
    if (!value) return bad('signed attributes have no message digest');
    const expected = createHash(hash).update(content).digest();
    if (!expected.equals(toBuf(value.valueBlock.valueHexView))) bad('message digest does not match the signed content');
    data = toBuf(p.signerInfo.signedAttrs.encodedValue);
  }
  if (!nodeVerify(hash, data, p.signerCert.publicKey, signature)) bad('signature does not verify with the signer certificate');
}

/**
 * True when `cert` is `trusted` itself or was issued and signed by it: UEFI db entries are either
 * the signing certificate or a CA above it.
 */
export function certTrustedBy(cert: X509Certificate, trusted: X509Certificate): boolean {
  if (cert.raw.equals(trusted.raw)) return true;
  return cert.checkIssued(trusted) && cert.verify(trusted.publicKey);
}
