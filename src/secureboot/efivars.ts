/**
 * UEFI variable formats: EFI_SIGNATURE_LIST (X.509 entries), EFI_VARIABLE_AUTHENTICATION_2 signed
 * updates, and the OVMF/EDK2 authenticated variable store inside a firmware volume, so an emulator
 * can start with our PK/KEK/db enrolled and Secure Boot enforcing.
 */
import { randomUUID } from 'node:crypto';
import { promises as fs } from 'node:fs';
import { UserError } from '../errors.js';
import { readUserFile, writeFileAtomic } from '../util/fsx.js';
import { OID, buildSignedData, loadCertificate, loadSigner, parseSignedData, verifySignerInfo, type SignerKeys } from './cms.js';

export const GUID = {
  certX509: 'a5c059a1-94e4-4aa7-87b5-ab155c2bf072',
  globalVariable: '8be4df61-93ca-11d2-aa0d-00e098032b8c',
  imageSecurityDatabase: 'd719b2cb-3d3a-4596-a3bc-dad00e67656f',
  certTypePkcs7: '4aafd29d-68df-49ee-8aa9-347d375665a7',
  systemNvDataFv: 'fff12b8d-7696-4c8b-a985-2747075b4f50',
  authenticatedVariable: 'aaf32c78-947b-439a-a180-2e144ec37792',
  secureBootEnableDisable: 'f0a30bc7-af08-4556-99c4-001009c93a44',
  customMode: 'c076ec0c-7028-4399-a072-71ee5c448b9f',
} as const;

/** EFI_VARIABLE_NON_VOLATILE | BOOTSERVICE_ACCESS | RUNTIME_ACCESS | TIME_BASED_AUTHENTICATED_WRITE_ACCESS. */
export const ATTR_TIME_AUTH = 0x27;
/** EFI_VARIABLE_NON_VOLATILE | BOOTSERVICE_ACCESS. */
const ATTR_NV_BS = 0x03;

/** The Secure Boot key variables and their vendor GUIDs. */
export type KeyVariable = 'PK' | 'KEK' | 'db';
export const VARIABLE_GUID: Record<KeyVariable, string> = { PK: GUID.globalVariable, KEK: GUID.globalVariable, db: GUID.imageSecurityDatabase };

/** Encode a GUID string in EFI's mixed-endian byte order. */
export function guidBytes(guid: string): Buffer {
  const hex = guid.replace(/-/g, '');
  if (!/^[0-9a-f]{32}$/i.test(hex)) throw new UserError('LAMA_E_BAD_GUID', `not a GUID: ${guid}`);
  const b = Buffer.from(hex, 'hex');
  return Buffer.concat([Buffer.from(b.subarray(0, 4)).reverse(), Buffer.from(b.subarray(4, 6)).reverse(), Buffer.from(b.subarray(6, 8)).reverse(), b.subarray(8)]);
}

/** Decode a mixed-endian GUID. */
export function guidString(b: Buffer): string {
  const h = Buffer.concat([Buffer.from(b.subarray(0, 4)).reverse(), Buffer.from(b.subarray(4, 6)).reverse(), Buffer.from(b.subarray(6, 8)).reverse(), b.subarray(8, 16)]).toString('hex');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

/** One EFI_SIGNATURE_LIST of type EFI_CERT_X509_GUID holding one certificate (DER). */
export function makeEsl(certDerOrPem: Buffer | string, owner: string): Buffer {
  const der = loadCertificate(certDerOrPem).der;
  const sigSize = 16 + der.length;
  const head = Buffer.alloc(28);
  guidBytes(GUID.certX509).copy(head, 0);
  head.writeUInt32LE(28 + sigSize, 16);
  head.writeUInt32LE(0, 20);
  head.writeUInt32LE(sigSize, 24);
  return Buffer.concat([head, guidBytes(owner), der]);
}

/** The entries of a signature database (a concatenation of EFI_SIGNATURE_LISTs). */
export function parseEsl(buf: Buffer, where = 'signature list'): { type: string; owner: string; data: Buffer }[] {
  const out: { type: string; owner: string; data: Buffer }[] = [];
  let off = 0;
  while (off < buf.length) {
    if (off + 28 > buf.length) throw new UserError('LAMA_E_BAD_ESL', `truncated EFI_SIGNATURE_LIST at offset ${off}`, { where });
    const type = guidString(buf.subarray(off, off + 16));
    const listSize = buf.readUInt32LE(off + 16);
    const headerSize = buf.readUInt32LE(off + 20);
    const sigSize = buf.readUInt32LE(off + 24);
    if (listSize < 28 || off + listSize > buf.length || sigSize < 16 || (listSize - 28 - headerSize) % sigSize !== 0) {
      throw new UserError('LAMA_E_BAD_ESL', `malformed EFI_SIGNATURE_LIST at offset ${off}`, { where });
    }
    for (let p = off + 28 + headerSize; p < off + listSize; p += sigSize) {
      out.push({ type, owner: guidString(buf.subarray(p, p + 16)), data: buf.subarray(p + 16, p + sigSize) });
    }
    off += listSize;
  }
  return out;
}

/** EFI_TIME (16 bytes) for a date, UTC, nanoseconds and zone zero as the spec requires for auth variables. */
export function efiTime(d: Date): Buffer {
  const b = Buffer.alloc(16);
  b.writeUInt16LE(d.getUTCFullYear(), 0);
  b.writeUInt8(d.getUTCMonth() + 1, 2);
  b.writeUInt8(d.getUTCDate(), 3);
  b.writeUInt8(d.getUTCHours(), 4);
  b.writeUInt8(d.getUTCMinutes(), 5);
  b.writeUInt8(d.getUTCSeconds(), 6);
  return b;
}

function utf16(name: string): Buffer {
  return Buffer.from(name, 'utf16le');
}

/** The bytes an EFI_VARIABLE_AUTHENTICATION_2 signature covers: name ‖ guid ‖ attributes ‖ timestamp ‖ data. */
export function authPayload(name: string, guid: string, attributes: number, timestamp: Buffer, data: Buffer): Buffer {
  const attrs = Buffer.alloc(4);
  attrs.writeUInt32LE(attributes >>> 0);
  return Buffer.concat([utf16(name), guidBytes(guid), attrs, timestamp, data]);
}

/**
 * A signed authenticated-variable update (EFI_VARIABLE_AUTHENTICATION_2 followed by the data), as
 * `efi-updatevar -f` and firmware setup accept it. The PKCS#7 is a detached SignedData without the
 * ContentInfo wrapper, as the UEFI specification defines CertData.
 */
export function makeAuthVariable(opts: { name: string; guid?: string; data: Buffer; signer: SignerKeys; timestamp?: Date; attributes?: number }): Buffer {
  const guid = opts.guid ?? VARIABLE_GUID[opts.name as KeyVariable] ?? GUID.globalVariable;
  const attributes = opts.attributes ?? ATTR_TIME_AUTH;
  const ts = efiTime(opts.timestamp ?? new Date());
  const signer = loadSigner(opts.signer);
  const contentInfo = buildSignedData({ signer, contentType: OID.data, digestInput: authPayload(opts.name, guid, attributes, ts, opts.data) });
  const signedData = unwrapContentInfo(contentInfo);
  const hdr = Buffer.alloc(24);
  hdr.writeUInt32LE(24 + signedData.length, 0);
  hdr.writeUInt16LE(0x0200, 4);
  hdr.writeUInt16LE(0x0ef1, 6);
  guidBytes(GUID.certTypePkcs7).copy(hdr, 8);
  return Buffer.concat([ts, hdr, signedData, opts.data]);
}

/** ContentInfo ::= SEQUENCE { contentType, [0] EXPLICIT content }: return the inner content's DER. */
function unwrapContentInfo(der: Buffer): Buffer {
  const skipHeader = (b: Buffer, off: number): number => {
    const l = b[off + 1] ?? 0;
    return off + 2 + (l & 0x80 ? l & 0x7f : 0);
  };
  let off = skipHeader(der, 0);
  off += 2 + (der[off + 1] ?? 0);
  off = skipHeader(der, off);
  return der.subarray(off);
}

/** Split a .auth file and verify its signature against `signerCert` (our own check of what we wrote). */
export function verifyAuthVariable(auth: Buffer, name: string, signerCert: string | Buffer, guid = VARIABLE_GUID[name as KeyVariable] ?? GUID.globalVariable): { data: Buffer; timestamp: Buffer } {
  if (auth.length < 40) throw new UserError('LAMA_E_BAD_AUTH', 'truncated authenticated variable');
  const ts = auth.subarray(0, 16);
  const len = auth.readUInt32LE(16);
  if (auth.readUInt16LE(22) !== 0x0ef1 || guidString(auth.subarray(24, 40)) !== GUID.certTypePkcs7 || 16 + len > auth.length) {
    throw new UserError('LAMA_E_BAD_AUTH', 'not an EFI_VARIABLE_AUTHENTICATION_2 with a PKCS#7 certificate');
  }
  const data = auth.subarray(16 + len);
  const parsed = parseSignedData(auth.subarray(40, 16 + len), name);
  verifySignerInfo(parsed, authPayload(name, guid, ATTR_TIME_AUTH, ts, data), name);
  const trusted = loadCertificate(signerCert).x509;
  if (!parsed.signerCert?.raw.equals(trusted.raw)) throw new UserError('LAMA_E_UNTRUSTED_SIGNER', `${name} update is not signed by ${trusted.subject}`);
  return { data, timestamp: ts };
}

/** A variable in an EDK2 authenticated variable store. */
export interface StoredVariable {
  offset: number;
  state: number;
  attributes: number;
  name: string;
  guid: string;
  timestamp: Buffer;
  data: Buffer;
}

const VAR_HEADER = 60;
const VAR_ADDED = 0x3f;
const VAR_DELETED_MASK = 0xfd;

function storeBounds(fd: Buffer, where: string): { start: number; end: number } {
  if (fd.length < 0x60 || fd.toString('latin1', 40, 44) !== '_FVH' || guidString(fd.subarray(16, 32)) !== GUID.systemNvDataFv) {
    throw new UserError('LAMA_E_BAD_VARSTORE', 'not an OVMF/EDK2 NV variable firmware volume', { where });
  }
  const headerLength = fd.readUInt16LE(48);
  if (guidString(fd.subarray(headerLength, headerLength + 16)) !== GUID.authenticatedVariable) {
    throw new UserError('LAMA_E_BAD_VARSTORE', 'variable store is not in the authenticated format (use the Secure Boot capable OVMF_VARS template)', { where });
  }
  const size = fd.readUInt32LE(headerLength + 16);
  if (fd[headerLength + 20] !== 0x5a || fd[headerLength + 21] !== 0xfe) throw new UserError('LAMA_E_BAD_VARSTORE', 'variable store is not formatted and healthy', { where });
  return { start: headerLength + 28, end: headerLength + size };
}

/** List the variables in an OVMF VARS image (deleted ones included, with their state). */
export function listStoreVariables(fd: Buffer, where = 'variable store'): StoredVariable[] {
  const { start, end } = storeBounds(fd, where);
  const out: StoredVariable[] = [];
  let off = start;
  while (off + VAR_HEADER <= end && fd.readUInt16LE(off) === 0x55aa) {
    const nameSize = fd.readUInt32LE(off + 36);
    const dataSize = fd.readUInt32LE(off + 40);
    const nameEnd = off + VAR_HEADER + nameSize;
    if (nameEnd + dataSize > end) throw new UserError('LAMA_E_BAD_VARSTORE', `variable at offset ${off} runs past the store`, { where });
    out.push({
      offset: off,
      state: fd[off + 2] ?? 0,
      attributes: fd.readUInt32LE(off + 4),
      timestamp: fd.subarray(off + 16, off + 32),
      name: fd.toString('utf16le', off + VAR_HEADER, nameEnd).replace(/\0+$/, ''),
      guid: guidString(fd.subarray(off + 44, off + 60)),
      data: fd.subarray(nameEnd, nameEnd + dataSize),
    });
    off = (nameEnd + dataSize + 3) & ~3;
  }
  return out;
}

/** A variable to add to a store. */
export interface NewVariable {
  name: string;
  guid: string;
  attributes: number;
  data: Buffer;
  timestamp?: Buffer;
}

/**
 * Add variables to a copy of an OVMF VARS image: older copies with the same name and GUID are marked
 * deleted (as the variable driver does), the new ones appended after the last entry.
 */
export function addStoreVariables(template: Buffer, vars: readonly NewVariable[], where = 'variable store'): Buffer {
  const fd = Buffer.from(template);
  const { start, end } = storeBounds(fd, where);
  const existing = listStoreVariables(fd, where);
  for (const e of existing) {
    if (vars.some((v) => v.name === e.name && v.guid === e.guid) && e.state === VAR_ADDED) fd[e.offset + 2] = e.state & VAR_DELETED_MASK;
  }
  const last = existing[existing.length - 1];
  let off = last ? (last.offset + VAR_HEADER + Buffer.byteLength(last.name, 'utf16le') + 2 + last.data.length + 3) & ~3 : start;
  for (const v of vars) {
    const name = Buffer.concat([utf16(v.name), Buffer.alloc(2)]);
    const total = VAR_HEADER + name.length + v.data.length;
    if (off + total > end) throw new UserError('LAMA_E_VARSTORE_FULL', `no room for variable ${v.name} in the variable store`, { where });
    const h = Buffer.alloc(VAR_HEADER);
    h.writeUInt16LE(0x55aa, 0);
    h.writeUInt8(VAR_ADDED, 2);
    h.writeUInt32LE(v.attributes, 4);
    (v.timestamp ?? Buffer.alloc(16)).copy(h, 16);
    h.writeUInt32LE(name.length, 36);
    h.writeUInt32LE(v.data.length, 40);
    guidBytes(v.guid).copy(h, 44);
    Buffer.concat([h, name, v.data]).copy(fd, off);
    off = (off + total + 3) & ~3;
  }
  return fd;
}

/** Certificates (PEM/DER file paths or contents) to enroll. */
export interface EnrollKeys {
  pk: string | Buffer;
  kek: string | Buffer;
  db: string | Buffer | (string | Buffer)[];
}

async function certBytes(c: string | Buffer): Promise<Buffer> {
  return Buffer.isBuffer(c) ? c : readUserFile(c, 'certificate');
}

/**
 * The variables that put an EDK2 firmware in user mode with Secure Boot enforcing: PK, KEK and db
 * as time-authenticated variables holding X.509 signature lists, SecureBootEnable=1, CustomMode=0.
 */
export async function planSecureBootVariables(keys: EnrollKeys, owner: string = randomUUID(), when = new Date()): Promise<NewVariable[]> {
  const ts = efiTime(when);
  const dbs = Array.isArray(keys.db) ? keys.db : [keys.db];
  const dbEsl = Buffer.concat(await Promise.all(dbs.map(async (c) => makeEsl(await certBytes(c), owner))));
  return [
    { name: 'db', guid: GUID.imageSecurityDatabase, attributes: ATTR_TIME_AUTH, data: dbEsl, timestamp: ts },
    { name: 'KEK', guid: GUID.globalVariable, attributes: ATTR_TIME_AUTH, data: makeEsl(await certBytes(keys.kek), owner), timestamp: ts },
    { name: 'PK', guid: GUID.globalVariable, attributes: ATTR_TIME_AUTH, data: makeEsl(await certBytes(keys.pk), owner), timestamp: ts },
    { name: 'SecureBootEnable', guid: GUID.secureBootEnableDisable, attributes: ATTR_NV_BS, data: Buffer.from([1]) },
    { name: 'CustomMode', guid: GUID.customMode, attributes: ATTR_NV_BS, data: Buffer.from([0]) },
  ];
}

/**
 * Write an OVMF variable store (from Debian's OVMF_VARS_4M.fd template) with our PK, KEK and db
 * enrolled and Secure Boot enforcing. `pk`, `kek`, `db` are certificate files or contents.
 */
export async function makeOvmfVars(opts: { template: string; out: string; force?: boolean; owner?: string } & EnrollKeys): Promise<void> {
  const template = await readUserFile(opts.template, 'OVMF variable template');
  const vars = await planSecureBootVariables(opts, opts.owner ?? randomUUID());
  const image = addStoreVariables(template, vars, opts.template);
  await writeFileAtomic(opts.out, image, { force: opts.force });
}

/** Enrolled Secure Boot state of a VARS image, for `lamadist` inspection and tests. */
export async function readOvmfVars(file: string): Promise<{ name: string; guid: string; certificates: string[] }[]> {
  const fd = await fs.readFile(file);
  return listStoreVariables(fd, file)
    .filter((v) => v.state === VAR_ADDED)
    .map((v) => ({
      name: v.name,
      guid: v.guid,
      certificates: ['PK', 'KEK', 'db', 'dbx'].includes(v.name)
        ? parseEsl(v.data, v.name)
            .filter((e) => e.type === GUID.certX509)
            .map((e) => loadCertificate(e.data).x509.subject.replace(/\n/g, ', '))
        : [],
    }));
}
