/**
 * Recovery key escrow. The installer makes each host's LUKS recovery key on the device and leaves
 * it only as a record encrypted to the fleet's recovery certificate (`openssl cms -encrypt`,
 * RSA-OAEP-SHA256 key transport, AES-256-CBC content). This module reads that record back with
 * the fleet's recovery key.
 *
 * The record, UTF-8, one field per line, each line ending in \n:
 *   lamadist-recovery 1
 *   host <inventory host name>
 *   machine-id <32 lowercase hex>
 *   luks <partition label> <LUKS UUID>      (1..16 lines, one per container)
 *   key <recovery passphrase>               (printable ASCII without spaces, 1..256 characters)
 *
 * Public API:
 * - `parseRecord(data, name?)` → RecoveryRecord; `renderRecord(record)` → string (both pure; errors
 *   are located `name:line`, and never quote the passphrase)
 * - `openEscrow(der, { certPem, keyPem }, where?)` → RecoveryRecord: a DER CMS EnvelopedData
 *   opened with the recovery pair; damage is located `where@byte`
 * - `findEscrow(path, host)` → the escrow file: `path` itself, or `<host>.cms` or `escrow/<host>.cms`
 *   in the directory `path` (an installer stick's data partition has `escrow/`); `readEscrow(file)`
 *   reads it, refusing anything larger than an escrow can be
 */
import { X509Certificate, constants, createDecipheriv, createPrivateKey, createPublicKey, privateDecrypt, type KeyObject } from 'node:crypto';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import * as asn1js from 'asn1js';
import * as pkijs from 'pkijs';
import { UserError, isErrno } from '../errors.js';
import { isInventoryName, isMachineId } from '../host/index.js';
import { readUserFile } from '../util/fsx.js';

export const RECORD_HEADER = 'lamadist-recovery 1';
export const MAX_CONTAINERS = 16;
/** A record is at most a few kilobytes; anything much larger is not an escrow. */
export const MAX_ESCROW_BYTES = 64 * 1024;

export interface LuksContainer {
  /** GPT partition label (also the LUKS2 label). */
  label: string;
  /** LUKS UUID, lowercase 8-4-4-4-12. */
  uuid: string;
}

export interface RecoveryRecord {
  host: string;
  machineId: string;
  luks: LuksContainer[];
  /** The passphrase in every container's recovery keyslot. */
  key: string;
}

const LABEL = /^[A-Za-z0-9_.-]{1,36}$/;
const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;
const KEY = /^[\x21-\x7e]{1,256}$/;

function lineError(name: string, line: number, message: string): UserError {
  return new UserError('LAMA_E_RECOVERY_RECORD', message, { where: `${name}:${line}` });
}

/** The record as text; invalid UTF-8 is refused on the line it occurs in. */
function recordText(data: string | Uint8Array, name: string): string {
  if (typeof data === 'string') return data;
  const decoder = new TextDecoder('utf-8', { fatal: true });
  try {
    return decoder.decode(data);
  } catch {
    let start = 0;
    for (let line = 1; ; line++) {
      const nl = data.indexOf(0x0a, start);
      const end = nl < 0 ? data.length : nl;
      try {
        decoder.decode(data.subarray(start, end));
      } catch {
        throw lineError(name, line, 'not UTF-8 text');
      }
      start = end + 1;
    }
  }
}

/**
 * Parse and validate a recovery record. The layout is fixed (the installer writes it with echo),
 * so anything else is refused rather than guessed at. LUKS UUIDs are accepted in either case and
 * returned lowercase.
 */
export function parseRecord(data: string | Uint8Array, name = 'record'): RecoveryRecord {
  const lines = recordText(data, name).split('\n');
  if (lines.length > 1 && lines[lines.length - 1] === '') lines.pop();
  let i = 0;
  const fail = (message: string): never => {
    throw lineError(name, i + 1, message);
  };
  const next = (what: string): string => {
    const l = lines[i];
    if (l === undefined) fail(`the record ends before its ${what} line`);
    if ((l as string).includes('\r')) fail('carriage return in the line (lines end with \\n alone)');
    return l as string;
  };

  const header = next('header');
  if (header !== RECORD_HEADER) {
    fail(/^lamadist-recovery \S+$/.test(header) ? `unsupported record version (this toolkit reads '${RECORD_HEADER}')` : `not a LamaDist recovery record (the first line is not '${RECORD_HEADER}')`);
  }
  i++;
  const host = /^host (.*)$/.exec(next('host'))?.[1];
  if (host === undefined) fail("expected 'host <name>'");
  if (!isInventoryName(host as string)) fail(`host '${String(host)}' is not a valid inventory host name`);
  i++;
  const machineId = /^machine-id (.*)$/.exec(next('machine-id'))?.[1];
  if (machineId === undefined) fail("expected 'machine-id <32 hex digits>'");
  if (!isMachineId(machineId as string)) fail(`machine-id '${String(machineId)}' is not 32 lowercase hex digits (not all zero)`);
  i++;

  const luks: LuksContainer[] = [];
  while (lines[i]?.startsWith('luks ')) {
    const parts = next('luks').split(' ');
    if (parts.length !== 3) fail("expected 'luks <partition label> <LUKS UUID>'");
    const [, label = '', rawUuid = ''] = parts;
    const uuid = rawUuid.toLowerCase();
    if (!LABEL.test(label)) fail(`partition label '${label}' must be 1 to 36 letters, digits, '_', '.' or '-'`);
    if (!UUID.test(uuid)) fail(`LUKS UUID '${rawUuid}' is not 8-4-4-4-12 hex digits`);
    if (luks.some((c) => c.label === label)) fail(`container ${label} is listed twice`);
    if (luks.some((c) => c.uuid === uuid)) fail(`LUKS UUID ${uuid} is listed twice`);
    if (luks.length === MAX_CONTAINERS) fail(`more than ${MAX_CONTAINERS} containers`);
    luks.push({ label, uuid });
    i++;
  }
  if (luks.length === 0) fail("expected 'luks <partition label> <LUKS UUID>' (a record names at least one container)");

  const keyLine = next('key');
  if (!keyLine.startsWith('key ')) fail("expected 'luks <partition label> <LUKS UUID>' or 'key <passphrase>'");
  const key = keyLine.slice(4);
  if (!KEY.test(key)) fail('the passphrase must be 1 to 256 printable ASCII characters without spaces');
  i++;
  if (i < lines.length) fail('unexpected line after the key line');
  return { host: host as string, machineId: machineId as string, luks, key };
}

/** The record's text, as the installer writes it; refuses a record `parseRecord` would refuse. */
export function renderRecord(r: RecoveryRecord): string {
  const text = [RECORD_HEADER, `host ${r.host}`, `machine-id ${r.machineId}`, ...r.luks.map((c) => `luks ${c.label} ${c.uuid}`), `key ${r.key}`].join('\n') + '\n';
  parseRecord(text);
  return text;
}

const OID = {
  envelopedData: '1.2.840.113549.1.7.3',
  data: '1.2.840.113549.1.7.1',
  rsaEncryption: '1.2.840.113549.1.1.1',
  rsaOaep: '1.2.840.113549.1.1.7',
  mgf1: '1.2.840.113549.1.1.8',
  pSpecified: '1.2.840.113549.1.1.9',
  subjectKeyIdentifier: '2.5.29.14',
} as const;

const OAEP_HASHES: Record<string, string> = {
  '1.3.14.3.2.26': 'sha1',
  '2.16.840.1.101.3.4.2.1': 'sha256',
  '2.16.840.1.101.3.4.2.2': 'sha384',
  '2.16.840.1.101.3.4.2.3': 'sha512',
};

const CIPHERS: Record<string, { name: string; keyLength: number }> = {
  '2.16.840.1.101.3.4.1.42': { name: 'aes-256-cbc', keyLength: 32 },
  '2.16.840.1.101.3.4.1.2': { name: 'aes-128-cbc', keyLength: 16 },
};

type Fail = (at: number, message: string) => never;

/** Byte offset of a node asn1js decoded from the escrow (its views index the input). */
function offsetOf(node: asn1js.AsnType | undefined): number {
  return (node as { valueBeforeDecodeView?: Uint8Array } | undefined)?.valueBeforeDecodeView?.byteOffset ?? 0;
}

function children(node: asn1js.AsnType | undefined): asn1js.AsnType[] {
  return node instanceof asn1js.Constructed ? node.valueBlock.value : [];
}

/**
 * Check the DER framing of every element (tag, definite length within its parent, exactly one
 * top-level element) so that truncation and damaged lengths are reported at the byte where they
 * are; asn1js only says that decoding failed. Returns the primitive elements' ranges.
 */
function checkFraming(der: Uint8Array, fail: Fail): [number, number][] {
  const primitives: [number, number][] = [];
  const element = (at: number, end: number, depth: number): number => {
    let o = at;
    const tag = der[o++] as number;
    if ((tag & 0x1f) === 0x1f) {
      do {
        if (o >= end) fail(at, 'DER tag runs past the end of its enclosing element');
      } while (((der[o++] as number) & 0x80) !== 0);
    }
    if (o >= end) fail(at, 'DER element ends before its length');
    let len = der[o++] as number;
    if (len === 0x80) fail(at, 'indefinite length (BER): an escrow is DER');
    if (len > 0x80) {
      const n = len & 0x7f;
      if (n > 4) fail(at, `DER length of ${n} bytes`);
      if (o + n > end) fail(at, 'DER length runs past the end of its enclosing element');
      len = 0;
      for (let k = 0; k < n; k++) len = len * 256 + (der[o++] as number);
    }
    if (o + len > end) fail(at, `DER element of ${len} bytes runs past the end of ${end === der.length ? 'the escrow' : 'its enclosing element'} (${end - o} bytes left)`);
    if ((tag & 0x20) !== 0) {
      if (depth >= 32) fail(at, 'DER nested more than 32 levels deep');
      for (let c = o; c < o + len; ) c = element(c, o + len, depth + 1);
    } else {
      primitives.push([at, o + len]);
    }
    return o + len;
  };
  if (der.length === 0) fail(0, 'the escrow is empty');
  const end = element(0, der.length, 0);
  if (end !== der.length) fail(end, `${der.length - end} bytes follow the CMS structure`);
  return primitives;
}

function arrayBuffer(b: Uint8Array): ArrayBuffer {
  return b.buffer.slice(b.byteOffset, b.byteOffset + b.byteLength) as ArrayBuffer;
}

/** asn1js's verdict on one DER encoding: the decoded tree, or why not (it also throws on some strings). */
function fromDer(der: Uint8Array): { node: asn1js.AsnType } | { error: string } {
  try {
    const decoded = asn1js.fromBER(arrayBuffer(der));
    return decoded.offset === -1 ? { error: decoded.result.error || 'asn1js cannot decode it' } : { node: decoded.result };
  } catch (err) {
    return { error: err instanceof Error ? err.message : String(err) };
  }
}

function decodeDer(der: Uint8Array, fail: Fail): asn1js.AsnType {
  const primitives = checkFraming(der, fail);
  const decoded = fromDer(der);
  if ('error' in decoded) {
    // The framing is sound, so one element's content is malformed (an OID, a string...): find it.
    const bad = primitives.find(([s, e]) => 'error' in fromDer(der.subarray(s, e)));
    return fail(bad?.[0] ?? 0, `malformed DER: ${decoded.error}`);
  }
  return decoded.node;
}

/** What of the recovery certificate a KeyTransRecipientInfo can name it by. */
interface Recipient {
  issuer: Buffer;
  serial: Buffer;
  ski: Buffer | undefined;
}

function recipientOf(certPem: string): Recipient {
  let der: Buffer;
  try {
    der = Buffer.from(new X509Certificate(certPem).raw);
  } catch (err) {
    throw new UserError('LAMA_E_BAD_CERT', 'the recovery certificate is not a readable PEM certificate', { cause: err });
  }
  const cert = pkijs.Certificate.fromBER(arrayBuffer(der));
  const ski = cert.extensions?.find((e) => e.extnID === OID.subjectKeyIdentifier)?.parsedValue as asn1js.OctetString | undefined;
  return {
    issuer: Buffer.from(cert.issuer.toSchema().toBER(false)),
    serial: Buffer.from(cert.serialNumber.valueBlock.valueHexView),
    ski: ski ? Buffer.from(ski.valueBlock.valueHexView) : undefined,
  };
}

function isOurs(rid: pkijs.KeyTransRecipientInfo['rid'], me: Recipient): boolean {
  if (rid instanceof pkijs.IssuerAndSerialNumber) {
    return Buffer.from(rid.issuer.toSchema().toBER(false)).equals(me.issuer) && Buffer.from(rid.serialNumber.valueBlock.valueHexView).equals(me.serial);
  }
  return me.ski !== undefined && Buffer.from(rid.valueBlock.valueHexView).equals(me.ski);
}

function recoveryKey(pair: { certPem: string; keyPem: string }): KeyObject {
  let key: KeyObject;
  try {
    key = createPrivateKey(pair.keyPem);
  } catch (err) {
    throw new UserError('LAMA_E_BAD_KEY', 'the recovery key is not a readable PEM private key', { cause: err });
  }
  if (key.asymmetricKeyType !== 'rsa') throw new UserError('LAMA_E_BAD_KEY', `the recovery key is ${String(key.asymmetricKeyType)}, not RSA`);
  if (!new X509Certificate(pair.certPem).publicKey.equals(createPublicKey(key))) {
    throw new UserError('LAMA_E_BAD_KEY', 'the recovery key does not belong to the recovery certificate');
  }
  return key;
}

/** RFC 5652 6.1: the version an EnvelopedData with these parts must carry. */
function envelopedVersion(ed: pkijs.EnvelopedData): number {
  if (ed.recipientInfos.some((ri) => ri.variant === 4 || ri.variant === 5)) return 3;
  const allV0 = ed.recipientInfos.every((ri) => ri.variant === 1 && (ri.value as pkijs.KeyTransRecipientInfo).version === 0);
  return ed.originatorInfo || ed.unprotectedAttrs || !allV0 ? 2 : 0;
}

/** The OAEP digest (Node uses one digest for OAEP and MGF1, as the installer's escrows do). */
function oaepHash(alg: pkijs.AlgorithmIdentifier, at: number, fail: Fail): string {
  if (alg.algorithmId === OID.rsaEncryption) fail(at, 'the content key is wrapped with RSA PKCS#1 v1.5; escrows use RSA-OAEP (openssl cms -keyopt rsa_padding_mode:oaep)');
  if (alg.algorithmId !== OID.rsaOaep) fail(at, `unsupported key transport ${alg.algorithmId} (escrows use RSA-OAEP)`);
  let params: pkijs.RSAESOAEPParams;
  try {
    params = alg.algorithmParams ? new pkijs.RSAESOAEPParams({ schema: alg.algorithmParams }) : new pkijs.RSAESOAEPParams();
  } catch {
    return fail(at, 'malformed RSA-OAEP parameters');
  }
  const hash = OAEP_HASHES[params.hashAlgorithm.algorithmId];
  if (!hash) fail(at, `unsupported RSA-OAEP digest ${params.hashAlgorithm.algorithmId}`);
  const mgf = params.maskGenAlgorithm;
  let mgfHash: string | undefined;
  try {
    mgfHash = mgf.algorithmId === OID.mgf1 ? OAEP_HASHES[new pkijs.AlgorithmIdentifier({ schema: mgf.algorithmParams }).algorithmId] : undefined;
  } catch {
    mgfHash = undefined;
  }
  if (mgfHash !== hash) fail(at, `RSA-OAEP with a mask generation function other than MGF1 with ${String(hash)} is not supported`);
  // An absent pSourceAlgorithm is the empty label (RFC 8017 A.2.1); pkijs fills in a non-empty
  // default instead, so only a label present in the DER is looked at.
  const labelled = children(alg.algorithmParams as asn1js.AsnType | undefined).some((n) => n.idBlock.tagClass === 3 && n.idBlock.tagNumber === 2);
  if (labelled && (params.pSourceAlgorithm.algorithmId !== OID.pSpecified || (params.pSourceAlgorithm.algorithmParams as asn1js.OctetString | undefined)?.valueBlock.valueHexView.length !== 0)) {
    fail(at, 'RSA-OAEP with a label is not supported');
  }
  return hash as string;
}

/**
 * Open a recovery escrow: a DER CMS EnvelopedData whose KeyTransRecipientInfo names the recovery
 * certificate (issuer and serial, or subject key identifier). Damaged or truncated input is
 * LAMA_E_ESCROW at `where@byte`; an escrow for another certificate is LAMA_E_ESCROW_RECIPIENT.
 */
export function openEscrow(der: Uint8Array, pair: { certPem: string; keyPem: string }, where = 'escrow'): RecoveryRecord {
  const fail: Fail = (at, message) => {
    throw new UserError('LAMA_E_ESCROW', message, { where: `${where}@${at}` });
  };
  const me = recipientOf(pair.certPem);
  const key = recoveryKey(pair);
  if (der.length > MAX_ESCROW_BYTES) fail(0, `${der.length} bytes is not a recovery escrow (at most ${MAX_ESCROW_BYTES})`);
  const root = decodeDer(der, fail);

  let ci: pkijs.ContentInfo;
  try {
    ci = new pkijs.ContentInfo({ schema: root });
  } catch {
    return fail(0, 'not a CMS ContentInfo');
  }
  const [typeNode, wrapper] = children(root);
  if (ci.contentType !== OID.envelopedData) fail(offsetOf(typeNode), `CMS content type ${ci.contentType} is not EnvelopedData`);
  const edNode = children(wrapper)[0];
  let ed: pkijs.EnvelopedData;
  try {
    ed = new pkijs.EnvelopedData({ schema: ci.content });
  } catch {
    return fail(offsetOf(edNode), 'not a valid CMS EnvelopedData');
  }
  const edParts = children(edNode);
  if (ed.version !== envelopedVersion(ed)) fail(offsetOf(edParts[0]), `EnvelopedData version ${ed.version} does not match its contents (RFC 5652 6.1 gives ${envelopedVersion(ed)})`);
  const riSet = edParts.find((n) => n instanceof asn1js.Set);
  const riNodes = children(riSet);

  const mine = ed.recipientInfos.findIndex((ri) => ri.variant === 1 && isOurs((ri.value as pkijs.KeyTransRecipientInfo).rid, me));
  if (mine < 0) throw new UserError('LAMA_E_ESCROW_RECIPIENT', "not encrypted to this fleet's recovery certificate", { where });
  const ktri = ed.recipientInfos[mine]?.value as pkijs.KeyTransRecipientInfo;
  const [versionNode, , algNode, wrappedNode] = children(riNodes[mine]);
  const ridVersion = ktri.rid instanceof pkijs.IssuerAndSerialNumber ? 0 : 2;
  if (ktri.version !== ridVersion) fail(offsetOf(versionNode), `KeyTransRecipientInfo version ${ktri.version} does not match its recipient identifier (RFC 5652 6.2.1 gives ${ridVersion})`);
  const hash = oaepHash(ktri.keyEncryptionAlgorithm, offsetOf(algNode), fail);
  let cek: Buffer;
  try {
    cek = privateDecrypt({ key, padding: constants.RSA_PKCS1_OAEP_PADDING, oaepHash: hash }, ktri.encryptedKey.valueBlock.valueHexView);
  } catch {
    // The key belongs to the certificate the entry names, so only damage makes OAEP refuse it.
    return fail(offsetOf(wrappedNode), 'the encrypted content key does not decrypt with the recovery key (the escrow is damaged)');
  }

  const eciNode = riSet ? edParts[edParts.indexOf(riSet) + 1] : undefined;
  const [ctNode, calgNode, contentNode] = children(eciNode);
  const eci = ed.encryptedContentInfo;
  if (eci.contentType !== OID.data) fail(offsetOf(ctNode), `encrypted content type ${eci.contentType} is not data`);
  const cipher = CIPHERS[eci.contentEncryptionAlgorithm.algorithmId];
  if (!cipher) fail(offsetOf(calgNode), `unsupported content encryption ${eci.contentEncryptionAlgorithm.algorithmId} (escrows use aes-256-cbc)`);
  const { name: cipherName, keyLength } = cipher as { name: string; keyLength: number };
  const iv = eci.contentEncryptionAlgorithm.algorithmParams;
  if (!(iv instanceof asn1js.OctetString) || iv.valueBlock.valueHexView.length !== 16) fail(offsetOf(calgNode), `${cipherName} needs a 16-byte IV`);
  if (cek.length !== keyLength) fail(offsetOf(wrappedNode), `the content key is ${cek.length} bytes, ${cipherName} takes ${keyLength} (the escrow is damaged)`);
  const ec = eci.encryptedContent;
  if (!ec) return fail(offsetOf(eciNode), 'the EnvelopedData carries no encrypted content');
  const encrypted = ec.idBlock.isConstructed
    ? Buffer.concat((ec.valueBlock.value as asn1js.OctetString[]).map((p) => Buffer.from(p.valueBlock.valueHexView)))
    : Buffer.from(ec.valueBlock.valueHexView);
  let plain: Buffer;
  try {
    const d = createDecipheriv(cipherName, cek, (iv as asn1js.OctetString).valueBlock.valueHexView);
    plain = Buffer.concat([d.update(encrypted), d.final()]);
  } catch {
    return fail(offsetOf(contentNode), 'the encrypted content does not decrypt (the escrow is damaged)');
  }
  return parseRecord(plain, `${where} record`);
}

/**
 * The escrow of `host` under `p`: `p` itself when it is a file, else `<host>.cms` or
 * `escrow/<host>.cms` inside the directory `p`.
 */
export async function findEscrow(p: string, host: string): Promise<string> {
  if (!isInventoryName(host)) throw new UserError('LAMA_E_BAD_NAME', `host name '${host}' is not a valid host name`);
  const st = await fs.stat(p).catch((err: unknown) => {
    if (isErrno(err, 'ENOENT')) throw new UserError('LAMA_E_NOT_FOUND', `escrow ${p} does not exist`);
    throw err;
  });
  if (st.isFile()) return p;
  if (!st.isDirectory()) throw new UserError('LAMA_E_NOT_FOUND', `escrow ${p} is neither a .cms file nor a directory (mount the stick's installer_data partition)`);
  const candidates = [path.join(p, `${host}.cms`), path.join(p, 'escrow', `${host}.cms`)];
  for (const c of candidates) {
    if ((await fs.stat(c).catch(() => undefined))?.isFile()) return c;
  }
  throw new UserError('LAMA_E_NOT_FOUND', `no escrow of host ${host} in ${p} (looked for ${host}.cms and escrow/${host}.cms)`);
}

/** Read an escrow file, refusing one too large to be an escrow before reading it. */
export async function readEscrow(file: string): Promise<Buffer> {
  const st = await fs.stat(file).catch(() => undefined);
  if (st && st.size > MAX_ESCROW_BYTES) throw new UserError('LAMA_E_ESCROW', `${st.size} bytes is not a recovery escrow (at most ${MAX_ESCROW_BYTES})`, { where: file });
  return readUserFile(file, 'escrow');
}
