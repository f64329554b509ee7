import { createHash, getHashes } from 'node:crypto';
import { UserError } from '../errors.js';
import { parseLuks2JsonText, validateLuks2Json } from './validate.js';

/**
 * LUKS2 on-disk metadata: two copies of a 4096-byte binary header each followed by its JSON area,
 * every copy checksummed (sha256 over the binary header with the checksum field zeroed, plus the
 * JSON area). Layout and field offsets follow the LUKS2 on-disk format specification.
 */

export const LUKS2_MAGIC_PRIMARY = Buffer.from([0x4c, 0x55, 0x4b, 0x53, 0xba, 0xbe]);
export const LUKS2_MAGIC_SECONDARY = Buffer.from([0x53, 0x4b, 0x55, 0x4c, 0xba, 0xbe]);
const BINARY_SIZE = 4096;
/** Offsets the specification allows for the secondary header (= metadata area size). */
export const LUKS2_HDR_SIZES = [16384, 32768, 65536, 131072, 262144, 524288, 1048576, 2097152, 4194304];

export interface Luks2Keyslot {
  type: string;
  key_size: number;
  priority?: number;
  af: { type: string; stripes: number; hash: string };
  area: { type: string; offset: string; size: string; encryption: string; key_size: number };
  kdf: {
    type: string;
    hash?: string;
    iterations?: number;
    time?: number;
    memory?: number;
    cpus?: number;
    salt: string;
  };
}

export interface Luks2Segment {
  type: string;
  offset: string;
  size: string;
  iv_tweak: string;
  encryption: string;
  sector_size: number;
  flags?: string[];
}

export interface Luks2Digest {
  type: string;
  keyslots: string[];
  segments: string[];
  hash: string;
  iterations: number;
  salt: string;
  digest: string;
}

export interface Luks2Token {
  type: string;
  keyslots: string[];
  [k: string]: unknown;
}

export interface Luks2Json {
  keyslots: Record<string, Luks2Keyslot>;
  tokens: Record<string, Luks2Token>;
  segments: Record<string, Luks2Segment>;
  digests: Record<string, Luks2Digest>;
  config: { json_size: string; keyslots_size: string; flags?: string[]; requirements?: unknown };
}

export interface Luks2Header {
  hdrSize: number;
  seqid: bigint;
  label: string;
  subsystem: string;
  checksumAlg: string;
  uuid: string;
  json: Luks2Json;
}

/** Fields of one binary header copy that differ between the two copies. */
export interface Luks2CopyParams {
  secondary: boolean;
  /** 64-byte per-copy salt. */
  salt: Buffer;
}

function cstr(b: Buffer, start: number, len: number): string {
  const s = b.subarray(start, start + len);
  const nul = s.indexOf(0);
  return s.toString('latin1', 0, nul >= 0 ? nul : len);
}

/** Encode one metadata copy (binary header + JSON area, `hdrSize` bytes). Pure. */
export function encodeLuks2Copy(h: Luks2Header, copy: Luks2CopyParams): Buffer {
  const text = JSON.stringify(h.json);
  const jsonSize = h.hdrSize - BINARY_SIZE;
  if (Buffer.byteLength(text) >= jsonSize)
    throw new Error(`LUKS2 JSON metadata (${text.length} bytes) does not fit its ${jsonSize}-byte area`);
  const out = Buffer.alloc(h.hdrSize);
  (copy.secondary ? LUKS2_MAGIC_SECONDARY : LUKS2_MAGIC_PRIMARY).copy(out, 0);
  out.writeUInt16BE(2, 6);
  out.writeBigUInt64BE(BigInt(h.hdrSize), 8);
  out.writeBigUInt64BE(h.seqid, 16);
  out.write(h.label, 24, 48, 'latin1');
  out.write(h.checksumAlg, 72, 32, 'latin1');
  copy.salt.copy(out, 104, 0, 64);
  out.write(h.uuid, 168, 40, 'latin1');
  out.write(h.subsystem, 208, 48, 'latin1');
  out.writeBigUInt64BE(BigInt(copy.secondary ? h.hdrSize : 0), 256);
  out.write(text, BINARY_SIZE, 'utf8');
  createHash(h.checksumAlg).update(out).digest().copy(out, 448);
  return out;
}

/** Digest length of a hash, or undefined when OpenSSL lists it but will not compute it (legacy provider). */
function digestSize(alg: string): number | undefined {
  try {
    return createHash(alg).digest().length;
  } catch {
    return undefined;
  }
}

/** Result of decoding one copy: the header, or why it is unusable. */
export type Luks2CopyResult =
  { ok: true; header: Luks2Header; offset: number } | { ok: false; problem: string; offset: number };

/**
 * Decode and checksum one metadata copy. `read(len, pos)` reads from the container; `at` is the
 * copy's offset within it.
 */
export async function decodeLuks2Copy(
  read: (len: number, pos: number) => Promise<Buffer>,
  at: number,
): Promise<Luks2CopyResult> {
  const bin = await read(BINARY_SIZE, at);
  const bad = (problem: string): Luks2CopyResult => ({
    ok: false,
    problem: `LUKS2 header at byte ${at}: ${problem}`,
    offset: at,
  });
  if (bin.length < BINARY_SIZE) return bad('cut off by the end of the file');
  const magic = bin.subarray(0, 6);
  if (!magic.equals(at === 0 ? LUKS2_MAGIC_PRIMARY : LUKS2_MAGIC_SECONDARY)) return bad('no LUKS magic');
  const version = bin.readUInt16BE(6);
  if (version !== 2) return bad(`version ${version} is not LUKS2`);
  const hdrSize = Number(bin.readBigUInt64BE(8));
  if (!LUKS2_HDR_SIZES.includes(hdrSize)) return bad(`invalid metadata size ${hdrSize}`);
  if (Number(bin.readBigUInt64BE(256)) !== at) return bad(`claims to be at byte ${bin.readBigUInt64BE(256)}`);
  const full = await read(hdrSize, at);
  if (full.length < hdrSize) return bad('JSON area cut off by the end of the file');
  const checksumAlg = cstr(bin, 72, 32);
  // cryptsetup takes any hash its crypto library knows whose digest fits the 64-byte field.
  if (!getHashes().includes(checksumAlg) || (digestSize(checksumAlg) ?? 65) > 64)
    return bad(`unsupported checksum algorithm '${checksumAlg}'`);
  const stored = Buffer.from(full.subarray(448, 448 + 64));
  const zeroed = Buffer.from(full);
  zeroed.fill(0, 448, 512);
  const actual = createHash(checksumAlg).update(zeroed).digest();
  if (!actual.equals(stored.subarray(0, actual.length))) return bad('checksum mismatch (header damaged)');
  const jsonText = cstr(full, BINARY_SIZE, hdrSize - BINARY_SIZE);
  let parsed: unknown;
  try {
    parsed = parseLuks2JsonText(jsonText);
  } catch (e) {
    return bad(`JSON metadata does not parse: ${(e as Error).message}`);
  }
  const invalid = validateLuks2Json(parsed, hdrSize);
  if (invalid) return bad(`JSON ${invalid.path}: ${invalid.message}`);
  const json = parsed as Luks2Json;
  return {
    ok: true,
    offset: at,
    header: {
      hdrSize,
      seqid: bin.readBigUInt64BE(16),
      label: cstr(bin, 24, 48),
      subsystem: cstr(bin, 208, 48),
      checksumAlg,
      uuid: cstr(bin, 168, 40),
      json,
    },
  };
}

/**
 * Read a LUKS2 container's metadata: the primary copy, or the secondary when the primary is
 * damaged (noted in `problems`). Throws LAMA_E_LUKS_HEADER when neither copy is valid.
 */
export async function decodeLuks2(
  read: (len: number, pos: number) => Promise<Buffer>,
  where: string,
): Promise<{ header: Luks2Header; source: 'primary' | 'secondary'; problems: string[] }> {
  const problems: string[] = [];
  const primary = await decodeLuks2Copy(read, 0);
  if (primary.ok) {
    const secondary = await decodeLuks2Copy(read, primary.header.hdrSize);
    if (!secondary.ok) problems.push(secondary.problem);
    else if (secondary.header.seqid !== primary.header.seqid)
      problems.push('primary and secondary LUKS2 headers have different sequence ids');
    return { header: primary.header, source: 'primary', problems };
  }
  problems.push(primary.problem);
  for (const size of LUKS2_HDR_SIZES) {
    const secondary = await decodeLuks2Copy(read, size);
    if (secondary.ok) return { header: secondary.header, source: 'secondary', problems };
  }
  const magic = await read(6, 0);
  if (!magic.equals(LUKS2_MAGIC_PRIMARY))
    throw new UserError('LAMA_E_LUKS_HEADER', 'not a LUKS2 container (no LUKS magic at byte 0)', { where });
  throw new UserError('LAMA_E_LUKS_HEADER', `no valid LUKS2 header: ${problems.join('; ')}`, { where });
}
