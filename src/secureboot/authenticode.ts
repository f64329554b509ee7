/**
 * Authenticode signing and verification of PE images (what UEFI Secure Boot checks against db):
 * the image digest (src/pe) in an SpcIndirectDataContent, wrapped in PKCS#7 SignedData, stored in
 * a WIN_CERTIFICATE at the end of the file and pointed to by the certificate-table directory.
 */
import type { X509Certificate } from 'node:crypto';
import * as asn1js from 'asn1js';
import * as pkijs from 'pkijs';
import { UserError } from '../errors.js';
import { alignUp, authenticodeDigest, parsePe, updateChecksum, type PeInfo } from '../pe/index.js';
import { OID, buildSignedData, certTrustedBy, derContents, hashForOid, loadCertificate, loadSigner, parseSignedData, verifySignerInfo, type SignerKeys } from './cms.js';

const WIN_CERT_REVISION_2_0 = 0x0200;
const WIN_CERT_TYPE_PKCS_SIGNED_DATA = 0x0002;

function spcIndirectDataContent(digest: Buffer): asn1js.Sequence {
  // SpcPeImageData: empty flags and an empty Unicode SpcString file link, as signtool and sbsign write.
  const file = new asn1js.Constructed({
    idBlock: { tagClass: 3, tagNumber: 0 },
    value: [
      new asn1js.Constructed({
        idBlock: { tagClass: 3, tagNumber: 2 },
        value: [new asn1js.Primitive({ idBlock: { tagClass: 3, tagNumber: 0 }, valueHex: new ArrayBuffer(0) })],
      }),
    ],
  });
  return new asn1js.Sequence({
    value: [
      new asn1js.Sequence({
        value: [new asn1js.ObjectIdentifier({ value: OID.spcPeImageData }), new asn1js.Sequence({ value: [new asn1js.BitString({ valueHex: new ArrayBuffer(0) }), file] })],
      }),
      new asn1js.Sequence({
        value: [new asn1js.Sequence({ value: [new asn1js.ObjectIdentifier({ value: OID.sha256 }), new asn1js.Null()] }), new asn1js.OctetString({ valueHex: digest })],
      }),
    ],
  });
}

/** The PE without its certificate table (which must be the file's tail) and with the directory entry cleared. */
export function stripSignature(pe: Buffer, info = parsePe(pe)): Buffer {
  if (info.certTable.size === 0) return pe;
  if (info.certTable.offset + info.certTable.size !== pe.length) {
    throw new UserError('LAMA_E_PE_LAYOUT', 'the certificate table is not at the end of the file; refusing to re-sign');
  }
  const out = Buffer.from(pe.subarray(0, info.certTable.offset));
  out.fill(0, info.offsets.certDirectory, info.offsets.certDirectory + 8);
  updateChecksum(out);
  return out;
}

/**
 * Sign a PE image with Authenticode (SHA-256) using the given certificate and key (normally the
 * Secure Boot db pair). An existing signature is replaced. The certificate must be currently valid.
 */
export function signPe(pe: Buffer, keys: SignerKeys): Buffer {
  const signer = loadSigner(keys);
  const unsigned = stripSignature(pe, parsePe(pe, 'input'));
  // The certificate table starts 8-byte aligned; the zero padding before it is part of the hashed image.
  const padded = unsigned.length % 8 === 0 ? unsigned : Buffer.concat([unsigned, Buffer.alloc(alignUp(unsigned.length, 8) - unsigned.length)]);
  const digest = authenticodeDigest(padded, 'sha256');
  const content = spcIndirectDataContent(digest);
  const contentDer = Buffer.from(content.toBER());
  const opus = new pkijs.Attribute({ type: OID.spcSpOpusInfo, values: [new asn1js.Sequence({ value: [] })] });
  const pkcs7 = buildSignedData({
    signer,
    contentType: OID.spcIndirectData,
    eContent: content,
    digestInput: derContents(contentDer),
    attributes: { extra: [opus] },
  });
  const entryLength = 8 + pkcs7.length;
  const tableSize = alignUp(entryLength, 8);
  const out = Buffer.allocUnsafe(padded.length + tableSize);
  padded.copy(out);
  out.fill(0, padded.length);
  out.writeUInt32LE(entryLength, padded.length);
  out.writeUInt16LE(WIN_CERT_REVISION_2_0, padded.length + 4);
  out.writeUInt16LE(WIN_CERT_TYPE_PKCS_SIGNED_DATA, padded.length + 6);
  pkcs7.copy(out, padded.length + 8);
  const info = parsePe(out);
  out.writeUInt32LE(padded.length, info.offsets.certDirectory);
  out.writeUInt32LE(tableSize, info.offsets.certDirectory + 4);
  updateChecksum(out);
  return out;
}

/** One Authenticode signature found in a PE, checked against the image. */
export interface PeSignature {
  subject: string;
  issuer: string;
  serial: string;
  digestAlgorithm: string;
  /** The image digest in the signature equals the image's current digest. */
  digestMatches: boolean;
  /** The signer's certificate (PEM). */
  certificatePem: string;
  /** Error from checking this signature, if any. */
  error?: string;
}

interface Entry {
  sig: PeSignature;
  signerCert?: X509Certificate;
  chain: X509Certificate[];
  error?: UserError;
}

function readEntries(pe: Buffer, info: PeInfo, where: string): Entry[] {
  const entries: Entry[] = [];
  let off = info.certTable.offset;
  const end = info.certTable.offset + info.certTable.size;
  while (off + 8 <= end) {
    const length = pe.readUInt32LE(off);
    const revision = pe.readUInt16LE(off + 4);
    const type = pe.readUInt16LE(off + 6);
    if (length < 8 || off + length > end) throw new UserError('LAMA_E_BAD_SIGNATURE', `malformed WIN_CERTIFICATE at offset ${off}`, { where });
    if (revision === WIN_CERT_REVISION_2_0 && type === WIN_CERT_TYPE_PKCS_SIGNED_DATA) entries.push(checkEntry(pe, info, pe.subarray(off + 8, off + length), `${where}@${off}`));
    off += alignUp(length, 8);
  }
  return entries;
}

function checkEntry(pe: Buffer, info: PeInfo, der: Buffer, where: string): Entry {
  const p = parseSignedData(der, where);
  const c = p.signerCert;
  const sig: PeSignature = {
    subject: c?.subject.replace(/\n/g, ', ') ?? '(certificate not included)',
    issuer: c?.issuer.replace(/\n/g, ', ') ?? '',
    serial: c?.serialNumber ?? '',
    digestAlgorithm: '',
    digestMatches: false,
    certificatePem: c?.toString() ?? '',
  };
  const entry: Entry = { sig, signerCert: c, chain: p.certificates };
  try {
    if (p.signed.encapContentInfo.eContentType !== OID.spcIndirectData) throw new UserError('LAMA_E_BAD_SIGNATURE', 'signature does not hold SpcIndirectDataContent', { where });
    const econtent = p.signed.encapContentInfo.eContent as asn1js.AsnType | undefined;
    if (!econtent) throw new UserError('LAMA_E_BAD_SIGNATURE', 'signature has no content', { where });
    const contentDer = Buffer.from(econtent.valueBeforeDecodeView.byteLength > 0 ? econtent.valueBeforeDecodeView : new Uint8Array(econtent.toBER()));
    const indirect = asn1js.fromBER(new Uint8Array(contentDer)).result as asn1js.Sequence;
    const digestInfo = indirect.valueBlock.value[1] as asn1js.Sequence | undefined;
    const algSeq = digestInfo?.valueBlock.value[0] as asn1js.Sequence | undefined;
    const algOid = (algSeq?.valueBlock.value[0] as asn1js.ObjectIdentifier | undefined)?.valueBlock.toString();
    const digestOctets = digestInfo?.valueBlock.value[1] as asn1js.OctetString | undefined;
    const hash = algOid ? hashForOid(algOid) : undefined;
    if (!hash || !digestOctets) throw new UserError('LAMA_E_BAD_SIGNATURE', 'malformed SpcIndirectDataContent', { where });
    sig.digestAlgorithm = hash;
    const expected = authenticodeDigest(pe, hash, info);
    sig.digestMatches = expected.equals(Buffer.from(digestOctets.valueBlock.valueHexView));
    if (!sig.digestMatches) throw new UserError('LAMA_E_PE_DIGEST_MISMATCH', 'image digest does not match its signature (the image was changed after signing)', { where });
    verifySignerInfo(p, derContents(contentDer), where);
  } catch (e) {
    if (!(e instanceof UserError)) throw e;
    entry.error = e;
    sig.error = e.message;
  }
  return entry;
}

/** List the Authenticode signatures of a PE image, each checked against the image (no trust decision). */
export function listSignatures(pe: Buffer, where = 'image'): PeSignature[] {
  const info = parsePe(pe, where);
  if (info.certTable.size === 0) return [];
  return readEntries(pe, info, where).map((e) => e.sig);
}

function chainsTo(cert: X509Certificate, pool: X509Certificate[], trusted: X509Certificate, depth = 0): boolean {
  if (certTrustedBy(cert, trusted)) return true;
  if (depth > 4) return false;
  return pool.some((issuer) => !issuer.raw.equals(cert.raw) && cert.checkIssued(issuer) && cert.verify(issuer.publicKey) && chainsTo(issuer, pool, trusted, depth + 1));
}

/**
 * Verify a PE image's Authenticode signature against a trusted certificate (as firmware does with a
 * db entry): some signature must match the image digest, verify cryptographically and be made by
 * `certPem` or a certificate it issued. Throws a one-line UserError otherwise.
 */
export function verifyPe(pe: Buffer, certPem: string | Buffer, where = 'image'): PeSignature {
  const trusted = loadCertificate(certPem, 'trusted certificate').x509;
  const info = parsePe(pe, where);
  if (info.certTable.size === 0) throw new UserError('LAMA_E_UNSIGNED', 'image is not signed', { where });
  const entries = readEntries(pe, info, where);
  if (entries.length === 0) throw new UserError('LAMA_E_UNSIGNED', 'image has no PKCS#7 Authenticode signature', { where });
  const valid = entries.filter((e) => !e.error);
  if (valid.length === 0) throw entries[0]?.error ?? new UserError('LAMA_E_BAD_SIGNATURE', 'no valid signature', { where });
  const ok = valid.find((e) => e.signerCert && chainsTo(e.signerCert, e.chain, trusted));
  if (!ok) {
    const who = valid.map((e) => e.sig.subject).join('; ');
    throw new UserError('LAMA_E_UNTRUSTED_SIGNER', `signed by ${who}, which is not ${trusted.subject.replace(/\n/g, ', ')} nor issued by it`, { where });
  }
  return ok.sig;
}
