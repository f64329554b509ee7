/**
 * The IMA runtime measurement list, replayed into the PCR the TPM's SHA-256 bank holds.
 *
 * Since Linux 5.8 the kernel extends each PCR bank with a template digest made by that bank's own
 * algorithm: the SHA-256 bank gets SHA-256 over the entry's template data (every field as a u32
 * length and its bytes), while both list formats only show the SHA-1 digest. So replay hashes the
 * template data itself. The binary list (`binary_runtime_measurements`) carries that data verbatim
 * and is exact for every template except the legacy `ima`; the ASCII list
 * (`ascii_runtime_measurements`) is rebuilt into template data for ima-ng, ima-sig, ima-buf and
 * ima-modsig, and each rebuilt entry must hash to the SHA-1 digest the line shows, so a line that
 * does not rebuild exactly is refused rather than replayed wrong. A violation (an all-zero template
 * digest: a file measured while open for writing) extends all-ones, as the kernel does.
 * Little-endian lists only (x86-64, arm64); big-endian kernels write lengths in their own order.
 */
import { createHash } from 'node:crypto';
import { UserError } from '../errors.js';
import { Reader } from './reader.js';

export interface ImaEntry {
  pcr: number;
  template: string;
  /** SHA-1 template digest as listed; all zeros for a violation. */
  templateHash: Buffer;
  /** Template data: each field as u32 length + bytes, exactly as the kernel hashed it. */
  data: Buffer;
  violation: boolean;
}

/** Field kinds of the templates the ASCII list can be rebuilt from. */
type Field = 'digest' | 'string' | 'hex';
const ASCII_TEMPLATES: Record<string, Field[]> = {
  'ima-ng': ['digest', 'string'],
  'ima-sig': ['digest', 'string', 'hex'],
  'ima-buf': ['digest', 'string', 'hex'],
  'ima-modsig': ['digest', 'string', 'hex', 'digest', 'hex'],
};

const ZERO_SHA1 = Buffer.alloc(20);

function checkTemplateHash(e: ImaEntry, where: string): void {
  if (e.violation) return;
  if (!createHash('sha1').update(e.data).digest().equals(e.templateHash)) {
    throw new UserError('LAMA_E_ATTEST_IMA', `template data of this ${e.template} entry does not hash to its listed SHA-1 template digest`, { where });
  }
}

/** Parse `binary_runtime_measurements`. */
export function parseImaBinary(buf: Buffer): ImaEntry[] {
  const r: Reader = new Reader(buf, 'IMA list', true);
  const out: ImaEntry[] = [];
  while (r.left > 0) {
    const at = r.off;
    const pcr = r.u32('PCR index');
    const templateHash = r.bytes(20, 'template digest');
    const nameLen = r.u32('template name length');
    if (nameLen === 0 || nameLen > 255) r.fail('LAMA_E_ATTEST_IMA', `template name length ${nameLen} is out of range`, r.off - 4);
    const template = r.bytes(nameLen, 'template name').toString('latin1');
    // The legacy `ima` template has no data length and a different hash rule; kernels since 3.13 default to ima-ng.
    if (template === 'ima') r.fail('LAMA_E_ATTEST_IMA', 'legacy "ima" template entries cannot be replayed; boot with ima_template=ima-ng', at);
    const data = r.bytes(r.u32('template data length'), 'template data');
    const e = { pcr, template, templateHash, data, violation: templateHash.equals(ZERO_SHA1) };
    checkTemplateHash(e, `IMA list at byte ${at}`);
    out.push(e);
  }
  return out;
}

function field(bytes: Buffer): Buffer {
  const len = Buffer.alloc(4);
  len.writeUInt32LE(bytes.length);
  return Buffer.concat([len, bytes]);
}

function hexBytes(text: string, where: string, what: string): Buffer {
  if (!/^(?:[0-9a-f]{2})*$/.test(text)) throw new UserError('LAMA_E_ATTEST_IMA', `${what} '${text.slice(0, 40)}' is not lower-case hex`, { where });
  return Buffer.from(text, 'hex');
}

/**
 * Parse `ascii_runtime_measurements`, rebuilding each entry's template data. `text` is the file
 * decoded as latin1, so file names that are not UTF-8 come back byte for byte.
 */
export function parseImaAscii(text: string): ImaEntry[] {
  const out: ImaEntry[] = [];
  const lines = text.split('\n');
  if (lines[lines.length - 1] === '') lines.pop();
  lines.forEach((line, i) => {
    const where = `IMA list line ${i + 1}`;
    const m = /^ ?(\d{1,2}) ([0-9a-f]{40}) (\S+) (.*)$/.exec(line);
    if (!m) throw new UserError('LAMA_E_ATTEST_IMA', 'line is not "PCR template-digest template fields…"', { where });
    const [, pcr, hash, template, rest] = m as unknown as [string, string, string, string, string];
    const kinds = ASCII_TEMPLATES[template];
    if (!kinds) throw new UserError('LAMA_E_ATTEST_IMA', `template '${template}' cannot be rebuilt from the ASCII list; send the binary list`, { where });
    // One space before every field, nothing for an empty one; the kernel turns spaces in names into '_'.
    const tokens = rest.split(' ');
    if (tokens.length !== kinds.length) throw new UserError('LAMA_E_ATTEST_IMA', `${template} has ${kinds.length} fields, the line has ${tokens.length}`, { where });
    const data = Buffer.concat(
      kinds.map((kind, f) => {
        const t = tokens[f] as string;
        if (t === '') return field(Buffer.alloc(0));
        if (kind === 'string') return field(Buffer.from(`${t}\0`, 'latin1'));
        if (kind === 'hex') return field(hexBytes(t, where, `field ${f + 1}`));
        const d = /^([a-z0-9-]{1,32}):(.*)$/.exec(t);
        if (!d) throw new UserError('LAMA_E_ATTEST_IMA', `field ${f + 1} '${t.slice(0, 40)}' is not ALGO:HEX`, { where });
        return field(Buffer.concat([Buffer.from(`${d[1]}:\0`, 'latin1'), hexBytes(d[2] as string, where, 'digest')]));
      }),
    );
    const templateHash = Buffer.from(hash, 'hex');
    const e = { pcr: Number(pcr), template, templateHash, data, violation: templateHash.equals(ZERO_SHA1) };
    checkTemplateHash(e, where);
    out.push(e);
  });
  return out;
}

/** Either list: the ASCII one starts with a PCR number in digits, the binary one with a u32. */
export function parseImaLog(buf: Buffer): ImaEntry[] {
  const c = buf[0];
  const ascii = c !== undefined && (c === 0x20 || (c >= 0x30 && c <= 0x39));
  return ascii ? parseImaAscii(buf.toString('latin1')) : parseImaBinary(buf);
}

/** The SHA-256 value PCR `pcr` (default 10) holds after the kernel extended it with `entries`. */
export function replayIma(entries: readonly ImaEntry[], pcr = 10): Buffer {
  let value = Buffer.alloc(32);
  const violation = Buffer.alloc(32, 0xff);
  for (const e of entries) {
    if (e.pcr !== pcr) continue;
    const digest = e.violation ? violation : createHash('sha256').update(e.data).digest();
    value = createHash('sha256').update(value).update(digest).digest();
  }
  return value;
}
