import { createCipheriv, createDecipheriv, createHash, getHashes, pbkdf2Sync, timingSafeEqual } from 'node:crypto';
import { promises as fs } from 'node:fs';
import type { FileHandle } from 'node:fs/promises';
import { UserError, isErrno } from '../errors.js';
import { readAt, readInto } from '../disk/index.js';
import { createRandom, randomUuid, type RandomSource } from '../disk/random.js';
import { afMerge, afSplit } from './af.js';
import {
  decodeLuks2,
  encodeLuks2Copy,
  type Luks2Digest,
  type Luks2Header,
  type Luks2Json,
  type Luks2Keyslot,
} from './header.js';

/**
 * LUKS2 containers written entirely in userspace (the build host has no device-mapper), readable by
 * cryptsetup and openable by the kernel: metadata in cryptsetup's default geometry (16 KiB per
 * header copy, 16 MiB before the data), pbkdf2 keyslots with the LUKS anti-forensic splitter, and the
 * payload encrypted with aes-xts-plain64 in 4096-byte sectors. dm-crypt computes plain64 IVs in
 * 512-byte units unless `iv_large_sectors` is set, which LUKS2 never sets, so sector k of 4096 bytes
 * uses IV `iv_tweak + 8k`.
 *
 * Public API:
 * - `planLuks2({ volumeKey, keys, uuid?, label?, random?, iterations? })` → `{ metadata, header }`: the
 *   16 MiB in front of the payload (both header copies and the keyslot areas). Pure given `random`.
 * - `encryptPayload({ source, out, ... })`, `decryptSectors(...)`: streaming aes-xts-plain64.
 * - `readLuks2(file, { offset })` → `{ header, source, problems }` (checksums checked, secondary used when
 *   the primary is damaged); `unlockLuks2(file, key, { offset })` → volume key, or LAMA_E_LUKS_WRONG_KEY.
 * - `luksSummary(header)` → segments/keyslots/tokens/digests for display.
 */

export { afMerge, afSplit } from './af.js';
export { decodeLuks2, encodeLuks2Copy } from './header.js';
export type {
  Luks2Digest,
  Luks2Header,
  Luks2Json,
  Luks2Keyslot,
  Luks2Segment,
  Luks2Token,
} from './header.js';

export const LUKS2_HDR_SIZE = 16384;
export const LUKS2_KEYSLOTS_OFFSET = 2 * LUKS2_HDR_SIZE;
/** Where the encrypted payload starts (cryptsetup's default for LUKS2). */
export const LUKS2_DATA_OFFSET = 16 * 1024 * 1024;
export const LUKS2_SECTOR_SIZE = 4096;
const CIPHER = 'aes-xts-plain64';
const VOLUME_KEY_SIZE = 64;
const STRIPES = 4000;
const HASH = 'sha256';
/**
 * Keyslot iterations. The keys LamaDist puts on an image are 256-bit random values, not passphrases,
 * so key stretching adds no security; cryptsetup's minimum keeps opening fast on small boards.
 */
export const DEFAULT_KEYSLOT_ITERATIONS = 1000;
const DIGEST_ITERATIONS = 1000;
/** cryptsetup refuses fewer PBKDF2 iterations than this for a keyslot. */
export const MIN_PBKDF2_ITERATIONS = 1000;
/** cryptsetup's default unlocking time for a LUKS2 keyslot (`--iter-time`). */
export const DEFAULT_ITER_TIME_MS = 2000;

/**
 * PBKDF2 iterations that take `iterTimeMs` on this machine for a keyslot key of `keySize` bytes, as
 * cryptsetup's `--iter-time` benchmark chooses them (never below cryptsetup's minimum): a passphrase
 * gets as much stretching as the wait its owner accepted. Doubles a trial run until it lasts 100 ms
 * (long enough that timer resolution is a small error), then scales linearly. Like cryptsetup it
 * counts CPU time, so other load on the machine does not lower the count.
 */
export function benchmarkPbkdf2(iterTimeMs: number, keySize = VOLUME_KEY_SIZE, hash = HASH): number {
  const salt = Buffer.alloc(32);
  for (let n = MIN_PBKDF2_ITERATIONS; ; n *= 2) {
    const start = process.cpuUsage();
    pbkdf2Sync('benchmark', salt, n, keySize, hash);
    const used = process.cpuUsage(start);
    const ms = (used.user + used.system) / 1000;
    if (ms >= 100 || n >= 2 ** 31 / 2)
      return Math.max(MIN_PBKDF2_ITERATIONS, Math.min(2 ** 32 - 1, Math.round((n * iterTimeMs) / Math.max(ms, 0.001))));
  }
}

export interface Luks2Plan {
  /** Bytes 0 .. LUKS2_DATA_OFFSET of the container. */
  metadata: Buffer;
  header: Luks2Header;
}

export interface Luks2PlanOptions {
  volumeKey: Buffer;
  /** One keyslot per key, in slot order (slot 0 first). */
  keys: Buffer[];
  uuid?: string;
  label?: string;
  random?: RandomSource;
  iterations?: number;
}

function xtsCipherName(keySize: number): string {
  if (keySize === 64) return 'aes-256-xts';
  if (keySize === 32) return 'aes-128-xts';
  throw new UserError('LAMA_E_LUKS_UNSUPPORTED', `aes-xts with a ${keySize * 8}-bit key is not supported`);
}

function plain64Iv(sector512: bigint): Buffer {
  const iv = Buffer.alloc(16);
  iv.writeBigUInt64LE(sector512, 0);
  return iv;
}

/** aes-xts-plain64 over whole sectors of `data`; IVs count 512-byte units from `firstIv`. */
function xtsSectors(
  encrypt: boolean,
  key: Buffer,
  data: Buffer,
  sectorSize: number,
  firstIv: bigint,
): Buffer {
  const name = xtsCipherName(key.length);
  const out = Buffer.allocUnsafe(data.length);
  const step = BigInt(sectorSize / 512);
  for (let at = 0, iv = firstIv; at < data.length; at += sectorSize, iv += step) {
    const c = encrypt ? createCipheriv(name, key, plain64Iv(iv)) : createDecipheriv(name, key, plain64Iv(iv));
    const piece = c.update(data.subarray(at, at + sectorSize));
    piece.copy(out, at);
    c.final();
  }
  return out;
}

function keyslotAreaSize(keySize: number): number {
  return Math.ceil((keySize * STRIPES) / 4096) * 4096;
}

/**
 * Build the container's metadata and keyslots for `volumeKey`, one keyslot per key. Pure given the
 * random source, so a seeded build is byte-identical.
 */
export function planLuks2(o: Luks2PlanOptions): Luks2Plan {
  const random = o.random ?? createRandom();
  if (o.volumeKey.length !== VOLUME_KEY_SIZE) throw new Error(`volume key must be ${VOLUME_KEY_SIZE} bytes`);
  if (o.keys.length === 0)
    throw new UserError('LAMA_E_LUKS_NO_KEY', 'a LUKS2 container needs at least one key');
  const iterations = o.iterations ?? DEFAULT_KEYSLOT_ITERATIONS;
  const area = keyslotAreaSize(VOLUME_KEY_SIZE);
  const metadata = Buffer.alloc(LUKS2_DATA_OFFSET);
  const keyslots: Record<string, Luks2Keyslot> = {};
  o.keys.forEach((key, slot) => {
    const offset = LUKS2_KEYSLOTS_OFFSET + slot * area;
    if (offset + area > LUKS2_DATA_OFFSET)
      throw new UserError('LAMA_E_LUKS_NO_KEY', 'too many keyslots for the keyslot area');
    const salt = random(`luks:${o.label ?? ''}:keyslot${slot}:salt`, 32);
    const slotKey = pbkdf2Sync(key, salt, iterations, VOLUME_KEY_SIZE, HASH);
    const material = afSplit(
      o.volumeKey,
      STRIPES,
      HASH,
      random(`luks:${o.label ?? ''}:keyslot${slot}:af`, VOLUME_KEY_SIZE * (STRIPES - 1)),
    );
    // Keyslot material is encrypted in 512-byte sectors, IVs counted from the start of its area.
    xtsSectors(true, slotKey, material, 512, 0n).copy(metadata, offset);
    keyslots[String(slot)] = {
      type: 'luks2',
      key_size: VOLUME_KEY_SIZE,
      af: { type: 'luks1', stripes: STRIPES, hash: HASH },
      area: {
        type: 'raw',
        offset: String(offset),
        size: String(area),
        encryption: CIPHER,
        key_size: VOLUME_KEY_SIZE,
      },
      kdf: { type: 'pbkdf2', hash: HASH, iterations, salt: salt.toString('base64') },
    };
  });
  const digestSalt = random(`luks:${o.label ?? ''}:digest:salt`, 32);
  const json: Luks2Json = {
    keyslots,
    tokens: {},
    segments: {
      '0': {
        type: 'crypt',
        offset: String(LUKS2_DATA_OFFSET),
        size: 'dynamic',
        iv_tweak: '0',
        encryption: CIPHER,
        sector_size: LUKS2_SECTOR_SIZE,
      },
    },
    digests: {
      '0': {
        type: 'pbkdf2',
        keyslots: Object.keys(keyslots),
        segments: ['0'],
        hash: HASH,
        iterations: DIGEST_ITERATIONS,
        salt: digestSalt.toString('base64'),
        digest: pbkdf2Sync(o.volumeKey, digestSalt, DIGEST_ITERATIONS, 32, HASH).toString('base64'),
      },
    },
    config: {
      json_size: String(LUKS2_HDR_SIZE - 4096),
      keyslots_size: String(LUKS2_DATA_OFFSET - LUKS2_KEYSLOTS_OFFSET),
    },
  };
  const header: Luks2Header = {
    hdrSize: LUKS2_HDR_SIZE,
    seqid: 1n,
    label: o.label ?? '',
    subsystem: '',
    checksumAlg: HASH,
    uuid: o.uuid ?? randomUuid(random, `luks:${o.label ?? ''}:uuid`),
    json,
  };
  encodeLuks2Copy(header, { secondary: false, salt: random(`luks:${o.label ?? ''}:hdr0:salt`, 64) }).copy(
    metadata,
    0,
  );
  encodeLuks2Copy(header, { secondary: true, salt: random(`luks:${o.label ?? ''}:hdr1:salt`, 64) }).copy(
    metadata,
    LUKS2_HDR_SIZE,
  );
  return { metadata, header };
}

/** Chunk size for payload encryption: large sequential I/O, a whole number of sectors. */
const CHUNK = 8 * 1024 * 1024;

export interface EncryptPayloadOptions {
  source: FileHandle;
  sourceOffset?: number;
  /** Plaintext bytes to encrypt; the last sector is zero-padded. */
  length: number;
  out: FileHandle;
  /** Byte offset of the LUKS2 data segment in `out` (container offset + LUKS2_DATA_OFFSET). */
  outOffset: number;
  volumeKey: Buffer;
  sectorSize?: number;
  ivTweak?: bigint;
  onProgress?: (done: number, total: number) => void;
}

/** Stream `length` bytes of plaintext into the data segment with aes-xts-plain64. Constant memory. */
export async function encryptPayload(o: EncryptPayloadOptions): Promise<void> {
  const ss = o.sectorSize ?? LUKS2_SECTOR_SIZE;
  const buf = Buffer.alloc(CHUNK);
  for (let done = 0; done < o.length;) {
    const want = Math.min(CHUNK, o.length - done);
    const got = await readInto(o.source, buf, 0, want, (o.sourceOffset ?? 0) + done);
    if (got < want)
      throw new UserError('LAMA_E_TRUNCATED', `payload ended after ${done + got} of ${o.length} bytes`);
    const padded = Math.ceil(want / ss) * ss;
    buf.fill(0, want, padded);
    const iv = (o.ivTweak ?? 0n) + BigInt(done / 512);
    const enc = xtsSectors(true, o.volumeKey, buf.subarray(0, padded), ss, iv);
    await o.out.write(enc, 0, enc.length, o.outOffset + done);
    done += want;
    o.onProgress?.(done, o.length);
  }
}

/** Decrypt `count` sectors starting at sector `first` of a data segment at `segmentOffset`. */
export async function decryptSectors(
  h: FileHandle,
  segmentOffset: number,
  volumeKey: Buffer,
  first: number,
  count: number,
  sectorSize = LUKS2_SECTOR_SIZE,
  ivTweak = 0n,
): Promise<Buffer> {
  const buf = Buffer.alloc(count * sectorSize);
  const got = await readInto(h, buf, 0, buf.length, segmentOffset + first * sectorSize);
  if (got < buf.length)
    throw new UserError(
      'LAMA_E_TRUNCATED',
      `encrypted data ends at byte ${segmentOffset + first * sectorSize + got}`,
    );
  return xtsSectors(false, volumeKey, buf, sectorSize, ivTweak + BigInt((first * sectorSize) / 512));
}

async function openFile(file: string): Promise<FileHandle> {
  try {
    return await fs.open(file, 'r');
  } catch (err) {
    if (isErrno(err, 'ENOENT')) throw new UserError('LAMA_E_NOT_FOUND', `${file} does not exist`);
    throw err;
  }
}

function reader(h: FileHandle, base: number): (len: number, pos: number) => Promise<Buffer> {
  return (len, pos) => readAt(h, len, base + pos);
}

/** Read the LUKS2 metadata of a container at `offset` of an open file. */
export function readLuks2From(h: FileHandle, offset: number, where: string): ReturnType<typeof decodeLuks2> {
  return decodeLuks2(reader(h, offset), where);
}

/** Read the LUKS2 metadata of `file` (a container, or a disk image with `offset`). */
export async function readLuks2(
  file: string,
  options: { offset?: number } = {},
): Promise<Awaited<ReturnType<typeof decodeLuks2>>> {
  const h = await openFile(file);
  try {
    return await readLuks2From(h, options.offset ?? 0, file);
  } finally {
    await h.close();
  }
}

/**
 * Why a keyslot cannot be tried here, or undefined. The header passed cryptsetup's validation, which
 * leaves the digest's fields, hash names and sizes to the code that opens a keyslot.
 */
function cannotTry(slot: Luks2Keyslot, d: Luks2Digest): string | undefined {
  // argon2 needs a native implementation Node 20 lacks; TPM2 and FIDO2 slots use it.
  if (slot.type !== 'luks2' || slot.kdf.type !== 'pbkdf2') return slot.type === 'luks2' ? slot.kdf.type : slot.type;
  const hashes = getHashes();
  const b64 = (v: unknown): boolean => typeof v === 'string' && /^[A-Za-z0-9+/]*={0,2}$/.test(v);
  if (![slot.kdf.hash, slot.af.hash, d.hash].every((h) => typeof h === 'string' && hashes.includes(h))) return 'unknown hash';
  if (d.type !== 'pbkdf2' || !Number.isInteger(d.iterations) || d.iterations < 1 || !b64(d.salt) || !b64(d.digest))
    return `${String(d.type)} digest`;
  if (!Number.isInteger(slot.kdf.iterations) || (slot.kdf.iterations ?? 0) < 1 || !b64(slot.kdf.salt)) return 'bad kdf';
  if (slot.area.encryption !== CIPHER || ![32, 64].includes(slot.area.key_size)) return slot.area.encryption;
  if (slot.key_size < 1 || slot.af.stripes < 1 || slot.key_size * slot.af.stripes > Number(slot.area.size))
    return 'key material larger than its area';
  return undefined;
}

/**
 * Recover the volume key with `key` by trying every pbkdf2 keyslot and checking the result against
 * the volume key digest. Throws LAMA_E_LUKS_WRONG_KEY when no keyslot opens.
 */
export async function unlockLuks2From(
  h: FileHandle,
  offset: number,
  header: Luks2Header,
  key: Buffer,
  where: string,
): Promise<{ volumeKey: Buffer; keyslot: string }> {
  const read = reader(h, offset);
  const skipped: string[] = [];
  for (const [id, slot] of Object.entries(header.json.keyslots)) {
    const digest = Object.values(header.json.digests).find((d) => d.keyslots.includes(id));
    if (!digest) continue;
    const why = cannotTry(slot, digest);
    if (why) {
      skipped.push(`${id} (${why})`);
      continue;
    }
    const slotKey = pbkdf2Sync(
      key,
      Buffer.from(slot.kdf.salt, 'base64'),
      slot.kdf.iterations ?? 0,
      slot.area.key_size,
      slot.kdf.hash ?? HASH,
    );
    const areaOffset = Number(slot.area.offset);
    const materialSize = Math.ceil((slot.key_size * slot.af.stripes) / 512) * 512;
    const enc = await read(materialSize, areaOffset);
    if (enc.length < materialSize)
      throw new UserError('LAMA_E_TRUNCATED', `keyslot ${id} area is cut off`, { where });
    const material = xtsSectors(false, slotKey, enc, 512, 0n);
    const volumeKey = afMerge(material, slot.key_size, slot.af.stripes, slot.af.hash);
    const check = pbkdf2Sync(
      volumeKey,
      Buffer.from(digest.salt, 'base64'),
      digest.iterations,
      Buffer.from(digest.digest, 'base64').length,
      digest.hash,
    );
    if (timingSafeEqual(check, Buffer.from(digest.digest, 'base64'))) return { volumeKey, keyslot: id };
  }
  const note = skipped.length > 0 ? ` (keyslots ${skipped.join(', ')} cannot be tried here)` : '';
  throw new UserError(
    'LAMA_E_LUKS_WRONG_KEY',
    `the key opens no keyslot of LUKS2 container ${header.uuid}${note}`,
    { where },
  );
}

/** Unlock `file` (or the container at `offset` inside it) with `key`. */
export async function unlockLuks2(
  file: string,
  key: Buffer,
  options: { offset?: number } = {},
): Promise<{ volumeKey: Buffer; keyslot: string; header: Luks2Header }> {
  const h = await openFile(file);
  try {
    const offset = options.offset ?? 0;
    const { header } = await readLuks2From(h, offset, file);
    return { ...(await unlockLuks2From(h, offset, header, key, file)), header };
  } finally {
    await h.close();
  }
}

/** The data segment of a container we can decrypt (aes-xts-plain64), with byte offset and sector size. */
export function dataSegment(header: Luks2Header): {
  offset: number;
  size: string;
  sectorSize: number;
  ivTweak: bigint;
} {
  const seg = header.json.segments['0'];
  if (!seg || seg.type !== 'crypt' || seg.encryption !== CIPHER) {
    throw new UserError(
      'LAMA_E_LUKS_UNSUPPORTED',
      `segment 0 is ${seg ? `${seg.type}/${seg.encryption}` : 'missing'}; only ${CIPHER} is supported`,
    );
  }
  return {
    offset: Number(seg.offset),
    size: seg.size,
    sectorSize: seg.sector_size,
    ivTweak: BigInt(seg.iv_tweak),
  };
}

/** A display-friendly summary of a header: what `luks dump` prints. */
export function luksSummary(h: Luks2Header): Record<string, unknown> {
  return {
    version: 2,
    uuid: h.uuid,
    label: h.label,
    subsystem: h.subsystem,
    epoch: h.seqid.toString(),
    metadataBytes: h.hdrSize,
    keyslotsBytes: Number(h.json.config.keyslots_size),
    segments: Object.entries(h.json.segments).map(([id, s]) => ({
      id,
      type: s.type,
      offset: Number(s.offset),
      size: s.size,
      cipher: s.encryption,
      sectorSize: s.sector_size,
      ivTweak: s.iv_tweak,
    })),
    // Only luks2 keyslots are bound to have kdf, af and area; other types are shown as far as they go.
    keyslots: Object.entries(h.json.keyslots as Record<string, Partial<Luks2Keyslot>>).map(([id, k]) => ({
      id,
      type: k.type,
      keyBits: (k.key_size ?? 0) * 8,
      cipher: k.area?.encryption,
      pbkdf: k.kdf?.type,
      hash: k.kdf?.hash,
      iterations: k.kdf?.iterations,
      memory: k.kdf?.memory,
      afStripes: k.af?.stripes,
      areaOffset: k.area ? Number(k.area.offset) : undefined,
      areaLength: k.area ? Number(k.area.size) : undefined,
    })),
    tokens: Object.entries(h.json.tokens).map(([id, t]) => ({ id, type: t.type, keyslots: t.keyslots })),
    digests: Object.entries(h.json.digests).map(([id, d]) => ({
      id,
      type: d.type,
      hash: d.hash,
      iterations: d.iterations,
      keyslots: d.keyslots,
      segments: d.segments,
    })),
  };
}

/** Fingerprint of a key for logs and prompts: never the key itself. */
export function keyFingerprint(key: Buffer): string {
  return createHash('sha256').update(key).digest('hex').slice(0, 16);
}
