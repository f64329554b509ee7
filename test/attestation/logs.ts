/**
 * Writers of the two logs a device sends, byte for byte as the kernel and EDK2 write them, so the
 * tests can extend a real (software) TPM with the same measurements and quote it.
 */
import { createHash } from 'node:crypto';
import { EV_NO_ACTION } from '../../src/attestation/index.js';
import { guidBytes } from '../../src/secureboot/efivars.js';

const sha1 = (b: Buffer): Buffer => createHash('sha1').update(b).digest();
const sha256 = (b: Buffer): Buffer => createHash('sha256').update(b).digest();
const u32 = (n: number): Buffer => {
  const b = Buffer.alloc(4);
  b.writeUInt32LE(n);
  return b;
};
const field = (b: Buffer): Buffer => Buffer.concat([u32(b.length), b]);

/** One IMA entry (ima-ng unless `sig` makes it ima-sig): both list forms and the SHA-256 PCR extend. */
export interface ImaRecord {
  binary: Buffer;
  ascii: string;
  /** What the kernel extends into PCR 10's SHA-256 bank for this entry. */
  extend: Buffer;
}

export function imaRecord(o: { path: string; fileDigest: Buffer; sig?: Buffer; violation?: boolean }): ImaRecord {
  const template = o.sig ? 'ima-sig' : 'ima-ng';
  const d = Buffer.concat([Buffer.from('sha256:\0', 'latin1'), o.fileDigest]);
  const data = Buffer.concat([field(d), field(Buffer.from(`${o.path}\0`, 'latin1')), ...(o.sig ? [field(o.sig)] : [])]);
  const templateHash = o.violation ? Buffer.alloc(20) : sha1(data);
  const name = Buffer.from(template, 'latin1');
  const binary = Buffer.concat([u32(10), templateHash, u32(name.length), name, u32(data.length), data]);
  const fields = [`sha256:${o.fileDigest.toString('hex')}`, o.path, ...(o.sig ? [o.sig.toString('hex')] : [])];
  const ascii = `10 ${templateHash.toString('hex')} ${template} ${fields.join(' ')}\n`;
  return { binary, ascii, extend: o.violation ? Buffer.alloc(32, 0xff) : sha256(data) };
}

/** UEFI_VARIABLE_DATA of a variable event. */
export function variableEventData(guid: string, name: string, data: Buffer): Buffer {
  const head = Buffer.alloc(32);
  guidBytes(guid).copy(head, 0);
  head.writeBigUInt64LE(BigInt(name.length), 16);
  head.writeBigUInt64LE(BigInt(data.length), 24);
  return Buffer.concat([head, Buffer.from(name, 'utf16le'), data]);
}

export interface LogEvent {
  pcr: number;
  type: number;
  data: Buffer;
  /** The SHA-256 digest extended (default: of `data`, as for variable and separator events). */
  digest?: Buffer;
}

/** A crypto-agile event log (SHA-1 and SHA-256 banks) as EDK2 writes it. Returns the SHA-256 digests to extend, per event. */
export function eventLog(events: readonly LogEvent[]): { log: Buffer; extends: { pcr: number; digest: Buffer }[] } {
  const algs = [
    [0x0004, 20],
    [0x000b, 32],
  ] as const;
  const spec = Buffer.concat([
    Buffer.from('Spec ID Event03\0', 'latin1'),
    u32(0),
    Buffer.from([0, 2, 0, 2]),
    u32(algs.length),
    ...algs.map(([a, s]) => {
      const b = Buffer.alloc(4);
      b.writeUInt16LE(a, 0);
      b.writeUInt16LE(s, 2);
      return b;
    }),
    Buffer.from([0]),
  ]);
  const parts = [u32(0), u32(EV_NO_ACTION), Buffer.alloc(20), u32(spec.length), spec];
  const out: { pcr: number; digest: Buffer }[] = [];
  for (const e of events) {
    const d256 = e.digest ?? sha256(e.data);
    const digests = Buffer.concat([Buffer.from([0x04, 0x00]), sha1(e.data), Buffer.from([0x0b, 0x00]), d256]);
    parts.push(u32(e.pcr), u32(e.type), u32(2), digests, u32(e.data.length), e.data);
    if (e.type !== EV_NO_ACTION) out.push({ pcr: e.pcr, digest: d256 });
  }
  return { log: Buffer.concat(parts), extends: out };
}
