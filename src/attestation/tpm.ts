/**
 * TPM 2.0 quotes checked without a TPM: the structures `tpm2_quote` writes (TPMS_ATTEST, or the
 * TPM2B_ATTEST around it, and TPMT_SIGNATURE) and the attestation key's public area (TPMT_PUBLIC or
 * TPM2B_PUBLIC), decoded per TPM 2.0 Library Part 2 and verified with node:crypto.
 */
import { createHash, createPublicKey, timingSafeEqual, verify, constants, type KeyObject } from 'node:crypto';
import { UserError, type ErrorCode } from '../errors.js';
import { Reader } from './reader.js';

/** TPM_ALG_ID values this module reads. */
export const ALG = {
  RSA: 0x0001,
  SHA1: 0x0004,
  SHA256: 0x000b,
  SHA384: 0x000c,
  SHA512: 0x000d,
  NULL: 0x0010,
  RSASSA: 0x0014,
  RSAPSS: 0x0016,
  ECDSA: 0x0018,
  ECDAA: 0x001a,
  ECC: 0x0023,
} as const;

const TPM_GENERATED_VALUE = 0xff544347;
const TPM_ST_ATTEST_QUOTE = 0x8018;
const TPM_ECC_NIST_P256 = 0x0003;

/** TPMA_OBJECT bits an attestation key must carry. */
const ATTR = { fixedTPM: 1 << 1, fixedParent: 1 << 4, sensitiveDataOrigin: 1 << 5, restricted: 1 << 16, sign: 1 << 18 } as const;

const HASHES: Record<number, string> = { [ALG.SHA1]: 'sha1', [ALG.SHA256]: 'sha256', [ALG.SHA384]: 'sha384', [ALG.SHA512]: 'sha512' };
const ST_NAMES: Record<number, string> = { 0x8014: 'certify', 0x8015: 'session audit', 0x8016: 'command audit', 0x8017: 'time', 0x8019: 'NV', 0x801a: 'creation', 0x801c: 'NV digest' };

/** One bank's PCRs in a quote's TPML_PCR_SELECTION, in the order the TPM digests them. */
export interface PcrSelection {
  hash: number;
  pcrs: number[];
}

/** A decoded TPMS_ATTEST of type TPM_ST_ATTEST_QUOTE. */
export interface QuoteInfo {
  qualifiedSigner: Buffer;
  /** The caller's qualifying data: the server's nonce. */
  extraData: Buffer;
  clock: bigint;
  /** TPM resets (reboots) and restarts since the TPM was cleared: a device that rebooted shows a new resetCount. */
  resetCount: number;
  restartCount: number;
  safe: boolean;
  firmwareVersion: bigint;
  selection: PcrSelection[];
  pcrDigest: Buffer;
}

/** A decoded TPMT_SIGNATURE. */
export type QuoteSignature =
  | { alg: 'rsassa' | 'rsapss'; hash: number; sig: Buffer }
  | { alg: 'ecdsa'; hash: number; r: Buffer; s: Buffer };

/** An attestation key's public area. */
export interface AkPublic {
  type: 'rsa' | 'ecc';
  key: KeyObject;
  /** The TPMT_PUBLIC bytes, as the TPM hashes them into the key's name. */
  tpmt: Buffer;
  /** TPM name: nameAlg followed by the nameAlg digest of `tpmt` (hex). */
  name: string;
  attributes: number;
}

function hashName(alg: number, r: Reader, at: number): string {
  const h = HASHES[alg];
  if (!h) r.fail('LAMA_E_ATTEST_FORMAT', `hash algorithm 0x${alg.toString(16).padStart(4, '0')} is not one of SHA-1/256/384/512`, at);
  return h;
}

function readSelection(r: Reader): PcrSelection[] {
  const count = r.u32('TPML_PCR_SELECTION count');
  // TPM 2.0 caps the list at HASH_COUNT banks; a larger count is garbage, not a bigger quote.
  if (count > 16) r.fail('LAMA_E_ATTEST_FORMAT', `PCR selection lists ${count} banks`, r.off - 4);
  const out: PcrSelection[] = [];
  for (let i = 0; i < count; i++) {
    const hash = r.u16(`bank ${i} hash`);
    const size = r.u8(`bank ${i} sizeofSelect`);
    const bits = r.bytes(size, `bank ${i} pcrSelect`);
    const pcrs: number[] = [];
    bits.forEach((b, byte) => {
      for (let bit = 0; bit < 8; bit++) if (b & (1 << bit)) pcrs.push(byte * 8 + bit);
    });
    out.push({ hash, pcrs });
  }
  return out;
}

/** Accept TPMS_ATTEST as `tpm2_quote -m` writes it, or the TPM2B_ATTEST the TPM returns. */
export function parseQuote(buf: Buffer): QuoteInfo {
  let r: Reader = new Reader(buf, 'quote');
  if (buf.length >= 4 && buf.readUInt32BE(0) !== TPM_GENERATED_VALUE) {
    const inner = r.tpm2b('TPM2B_ATTEST');
    r.end('TPM2B_ATTEST');
    r = new Reader(inner, 'quote (TPM2B_ATTEST body)');
  }
  const magic = r.u32('magic');
  if (magic !== TPM_GENERATED_VALUE) r.fail('LAMA_E_ATTEST_FORMAT', `magic is 0x${magic.toString(16)}, not TPM_GENERATED_VALUE: not made by a TPM`, r.off - 4);
  const type = r.u16('type');
  if (type !== TPM_ST_ATTEST_QUOTE) {
    r.fail('LAMA_E_ATTEST_FORMAT', `attestation is a ${ST_NAMES[type] ?? `0x${type.toString(16)}`} structure, not a quote`, r.off - 2);
  }
  const qualifiedSigner = r.tpm2b('qualifiedSigner');
  const extraData = r.tpm2b('extraData');
  const clock = r.u64('clock');
  const resetCount = r.u32('resetCount');
  const restartCount = r.u32('restartCount');
  const safe = r.u8('safe') === 1;
  const firmwareVersion = r.u64('firmwareVersion');
  const selection = readSelection(r);
  const pcrDigest = r.tpm2b('pcrDigest');
  r.end('quote');
  return { qualifiedSigner, extraData, clock, resetCount, restartCount, safe, firmwareVersion, selection, pcrDigest };
}

/** A TPMT_SIGNATURE (the `tpm2_quote -s` default "tss" format). */
export function parseSignature(buf: Buffer): QuoteSignature {
  const r: Reader = new Reader(buf, 'signature');
  const alg = r.u16('sigAlg');
  const hashAt = r.off;
  const hash = r.u16('hash');
  hashName(hash, r, hashAt);
  let sig: QuoteSignature;
  if (alg === ALG.RSASSA || alg === ALG.RSAPSS) {
    sig = { alg: alg === ALG.RSASSA ? 'rsassa' : 'rsapss', hash, sig: r.tpm2b('signature') };
  } else if (alg === ALG.ECDSA) {
    sig = { alg: 'ecdsa', hash, r: r.tpm2b('signatureR'), s: r.tpm2b('signatureS') };
  } else {
    r.fail('LAMA_E_ATTEST_FORMAT', `signature scheme 0x${alg.toString(16).padStart(4, '0')} is not RSASSA, RSAPSS or ECDSA`, 0);
  }
  r.end('signature');
  return sig;
}

/** A TPMT_PUBLIC decoded far enough to use its key: what an AK and an EK have in common. */
export interface PublicArea {
  type: 'rsa' | 'ecc';
  key: KeyObject;
  /** The TPMT_PUBLIC bytes, as the TPM hashes them into the object's name. */
  tpmt: Buffer;
  /** TPM name: nameAlg followed by the nameAlg digest of `tpmt` (hex). */
  name: string;
  nameAlg: number;
  /** Node's name of `nameAlg` ('sha256', …). */
  hash: string;
  attributes: number;
  /** The symmetric algorithm of a storage key (TPMT_SYM_DEF_OBJECT), null when TPM_ALG_NULL. */
  symmetric: { alg: number; keyBits: number; mode: number } | null;
  /** ECC: the public point's coordinates as stored in the area (the TPM uses them as they are). */
  point?: { x: Buffer; y: Buffer };
}

/** An unsigned big-endian integer as base64url, without the leading zeros JWK forbids. */
function b64uInt(b: Buffer): string {
  let i = 0;
  while (i < b.length - 1 && b[i] === 0) i++;
  return b.subarray(i).toString('base64url');
}

/**
 * A TPMT_PUBLIC (`tpm2_readpublic -f tpmt`) or TPM2B_PUBLIC (the `.pub` file of `tpm2_createak -u`
 * and `tpm2_createek -u`) of an RSA or ECC NIST P-256 key. `code` names a key that decodes but is
 * not usable (unsupported curve, bad modulus).
 */
export function readPublicArea(buf: Buffer, where: string, code: ErrorCode): PublicArea {
  const outer = new Reader(buf, where);
  let tpmt = buf;
  // TPMT_PUBLIC starts with its type; TPM2B_PUBLIC with a size equal to the rest and then the type
  // (a TPMT_PUBLIC cut to 37 bytes would pass for a TPM2B of size 35 = TPM_ALG_ECC on size alone).
  const isType = (t: number): boolean => t === ALG.RSA || t === ALG.ECC;
  if (buf.length >= 4 && buf.readUInt16BE(0) === buf.length - 2 && isType(buf.readUInt16BE(2))) {
    tpmt = outer.tpm2b('TPM2B_PUBLIC');
    outer.end('TPM2B_PUBLIC');
  }
  const r: Reader = new Reader(tpmt, where);
  const type = r.u16('type');
  const nameAlgAt = r.off;
  const nameAlg = r.u16('nameAlg');
  const hash = hashName(nameAlg, r, nameAlgAt);
  const attributes = r.u32('objectAttributes');
  r.tpm2b('authPolicy');
  const bad: (message: string, at: number) => never = (message, at) => r.fail(code, message, at);
  const readSymmetric = (): PublicArea['symmetric'] => {
    const alg = r.u16('symmetric algorithm');
    return alg === ALG.NULL ? null : { alg, keyBits: r.u16('symmetric keyBits'), mode: r.u16('symmetric mode') };
  };
  let key: KeyObject;
  let symmetric: PublicArea['symmetric'];
  let point: PublicArea['point'];
  if (type === ALG.RSA) {
    symmetric = readSymmetric();
    const scheme = r.u16('RSA scheme');
    if (scheme !== ALG.NULL) r.u16('RSA scheme hash');
    const bits = r.u16('RSA keyBits');
    const exponent = r.u32('RSA exponent') || 65537;
    const at = r.off;
    const n = r.tpm2b('RSA modulus');
    if (n.length * 8 !== bits) bad(`RSA modulus is ${n.length * 8} bits, keyBits says ${bits}`, at);
    const e = Buffer.alloc(4);
    e.writeUInt32BE(exponent);
    try {
      key = createPublicKey({ key: { kty: 'RSA', n: b64uInt(n), e: b64uInt(e) }, format: 'jwk' });
    } catch (err) {
      bad(`RSA public key does not decode: ${(err as Error).message}`, at);
    }
  } else if (type === ALG.ECC) {
    symmetric = readSymmetric();
    const scheme = r.u16('ECC scheme');
    if (scheme !== ALG.NULL) {
      r.u16('ECC scheme hash');
      if (scheme === ALG.ECDAA) r.u16('ECDAA count');
    }
    const curveAt = r.off;
    const curve = r.u16('curveID');
    if (curve !== TPM_ECC_NIST_P256) bad(`ECC curve 0x${curve.toString(16).padStart(4, '0')} is not NIST P-256`, curveAt);
    if (r.u16('KDF scheme') !== ALG.NULL) r.u16('KDF hash');
    const at = r.off;
    const x = r.tpm2b('ECC point x');
    const y = r.tpm2b('ECC point y');
    if (x.length > 32 || y.length > 32) bad('ECC point coordinates are longer than 32 bytes', at);
    const pad = (c: Buffer): string => Buffer.concat([Buffer.alloc(32 - c.length), c]).toString('base64url');
    try {
      key = createPublicKey({ key: { kty: 'EC', crv: 'P-256', x: pad(x), y: pad(y) }, format: 'jwk' });
    } catch (err) {
      bad(`ECC point is not on P-256: ${(err as Error).message}`, at);
    }
    point = { x: Buffer.from(x), y: Buffer.from(y) };
  } else {
    r.fail(code, `key type 0x${type.toString(16).padStart(4, '0')} is neither RSA nor ECC`, 0);
  }
  r.end(`${where} area`);
  const name = Buffer.alloc(2);
  name.writeUInt16BE(nameAlg);
  const digest = createHash(hash).update(tpmt).digest();
  return {
    type: type === ALG.RSA ? 'rsa' : 'ecc',
    key,
    tpmt: Buffer.from(tpmt),
    name: Buffer.concat([name, digest]).toString('hex'),
    nameAlg,
    hash,
    attributes,
    symmetric,
    ...(point && { point }),
  };
}

/** TPMA_OBJECT bits that are missing from `attributes`, by name. */
export function missingAttributes(attributes: number, required: Readonly<Record<string, number>>): string[] {
  return Object.keys(required).filter((k) => (attributes & (required[k] as number)) === 0);
}

/**
 * An attestation key's public area: TPMT_PUBLIC (`tpm2_readpublic -f tpmt`) or TPM2B_PUBLIC (the
 * `.pub` file of `tpm2_createak -u`). RSA and ECC NIST P-256 keys.
 */
export function parseAkPublic(buf: Buffer): AkPublic {
  const p = readPublicArea(buf, 'AK public', 'LAMA_E_ATTEST_KEY');
  // A restricted signing key signs only digests of structures the TPM made itself, so a quote under
  // it cannot be forged by whoever can use the key; fixedTPM keeps the key inside this TPM.
  const missing = missingAttributes(p.attributes, ATTR);
  if (missing.length) throw new UserError('LAMA_E_ATTEST_KEY', `not an attestation key: objectAttributes 0x${p.attributes.toString(16)} lack ${missing.join(', ')}`, { where: 'AK public at byte 6' });
  return { type: p.type, key: p.key, tpmt: p.tpmt, name: p.name, attributes: p.attributes };
}

function signatureValid(quote: Buffer, sig: QuoteSignature, ak: AkPublic): boolean {
  const hash = HASHES[sig.hash] as string;
  if (sig.alg === 'ecdsa') {
    if (ak.type !== 'ecc') return false;
    const strip = (b: Buffer): Buffer => {
      let i = 0;
      while (i < b.length && b[i] === 0) i++;
      return b.subarray(i);
    };
    const [r, s] = [strip(sig.r), strip(sig.s)];
    if (r.length > 32 || s.length > 32) return false;
    const p1363 = Buffer.concat([Buffer.alloc(32 - r.length), r, Buffer.alloc(32 - s.length), s]);
    return verify(hash, quote, { key: ak.key, dsaEncoding: 'ieee-p1363' }, p1363);
  }
  if (ak.type !== 'rsa') return false;
  const padding = sig.alg === 'rsassa' ? constants.RSA_PKCS1_PADDING : constants.RSA_PKCS1_PSS_PADDING;
  // TPMs differ in the PSS salt length (digest size, or the most the key allows): accept either.
  return verify(hash, quote, { key: ak.key, padding, ...(sig.alg === 'rsapss' ? { saltLength: constants.RSA_PSS_SALTLEN_AUTO } : {}) }, sig.sig);
}

export interface VerifyQuoteInput {
  /** TPMS_ATTEST or TPM2B_ATTEST. */
  quote: Buffer;
  /** TPMT_SIGNATURE. */
  signature: Buffer;
  /** The pinned attestation key: TPMT_PUBLIC / TPM2B_PUBLIC bytes, or already parsed. */
  akPublic: Buffer | AkPublic;
  /** The nonce the server issued for this quote. */
  nonce: Buffer;
  /** SHA-256 PCR values the device reports, by index. */
  pcrs: Readonly<Record<number, Buffer>>;
  /** PCRs the quote must cover (default: every PCR in `pcrs`). */
  require?: readonly number[];
}

/**
 * Verify a TPM2 quote: the AK signed it, it carries our nonce, its selection covers the PCRs we
 * asked for (SHA-256 bank only), and its PCR digest is the SHA-256 of the reported PCR values in
 * selection order. On success the reported values are what the TPM held when it signed. Each
 * failure has its own code: LAMA_E_ATTEST_TRUNCATED / _FORMAT / _KEY (malformed input),
 * _SIGNATURE, _NONCE, _SELECTION, _PCR_DIGEST.
 */
export function verifyQuote(input: VerifyQuoteInput): QuoteInfo {
  const ak = Buffer.isBuffer(input.akPublic) ? parseAkPublic(input.akPublic) : input.akPublic;
  const info = parseQuote(input.quote);
  const sig = parseSignature(input.signature);
  // The signature covers TPMS_ATTEST, without the TPM2B size in front.
  const signed = input.quote.readUInt32BE(0) === TPM_GENERATED_VALUE ? input.quote : input.quote.subarray(2);
  if (sig.hash !== ALG.SHA256) throw new UserError('LAMA_E_ATTEST_SIGNATURE', `quote is signed with ${HASHES[sig.hash]}, not SHA-256`);
  if (!signatureValid(signed, sig, ak)) {
    throw new UserError('LAMA_E_ATTEST_SIGNATURE', `quote signature (${sig.alg}) does not verify under the device's attestation key ${ak.name}`);
  }
  const n = info.extraData;
  if (n.length !== input.nonce.length || !timingSafeEqual(n, input.nonce)) {
    throw new UserError('LAMA_E_ATTEST_NONCE', 'quote does not carry the nonce the server issued (replayed or stale quote)');
  }
  const banks = info.selection.filter((s) => s.pcrs.length > 0);
  const other = banks.find((s) => s.hash !== ALG.SHA256);
  if (other) throw new UserError('LAMA_E_ATTEST_SELECTION', `quote selects PCRs of bank 0x${other.hash.toString(16).padStart(4, '0')}; only the SHA-256 bank is checked`);
  const selected = banks.flatMap((s) => s.pcrs);
  const required = input.require ?? Object.keys(input.pcrs).map(Number);
  const uncovered = required.filter((p) => !selected.includes(p));
  if (uncovered.length) throw new UserError('LAMA_E_ATTEST_SELECTION', `quote does not cover PCR ${uncovered.join(', ')} (it selects sha256:${selected.join(',') || 'none'})`);
  const h = createHash('sha256');
  for (const p of selected) {
    const v = input.pcrs[p];
    if (!v) throw new UserError('LAMA_E_ATTEST_SELECTION', `quote selects PCR ${p} but no value was reported for it`);
    if (v.length !== 32) throw new UserError('LAMA_E_ATTEST_SELECTION', `PCR ${p} value is ${v.length} bytes, not a SHA-256 digest`);
    h.update(v);
  }
  if (!h.digest().equals(info.pcrDigest)) {
    throw new UserError('LAMA_E_ATTEST_PCR_DIGEST', `reported values of PCR ${selected.join(', ')} do not match the quoted PCR digest`);
  }
  return info;
}
