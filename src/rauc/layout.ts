import type { FileHandle } from 'node:fs/promises';
import { UserError } from '../errors.js';
import { cmsType } from './cms.js';
import { BLOCK } from './payload.js';

/**
 * Where the parts of a RAUC bundle sit. Every bundle ends in its CMS (SignedData, or EnvelopedData
 * for an encrypted crypt bundle) followed by the CMS size as a big-endian u64; in verity and crypt
 * bundles everything before the CMS is payload plus hash tree, a whole number of 4 KiB blocks. A
 * plain bundle's squashfs may end anywhere (`mksquashfs -nopad`): RAUC only notes it, so the
 * alignment is checked once the format is known, not here.
 */
export interface BundleLayout {
  fileSize: number;
  /** Byte offset of the CMS (= payload + hash tree size). */
  signatureOffset: number;
  signatureSize: number;
  signature: Buffer;
  cms: 'signed' | 'enveloped';
}

/** RAUC refuses signatures above this size unless system.conf raises it; we read up to 16 MiB. */
const MAX_SIGNATURE = 16 * 1024 * 1024;
const SQUASHFS_MAGIC = Buffer.from('hsqs');

async function readAt(h: FileHandle, length: number, position: number): Promise<Buffer> {
  const buf = Buffer.alloc(length);
  let got = 0;
  while (got < length) {
    const { bytesRead } = await h.read(buf, got, length - got, position + got);
    if (bytesRead === 0) break;
    got += bytesRead;
  }
  return buf.subarray(0, got);
}

/** Length of a DER TLV starting at buf[0] (definite lengths only), or undefined. */
export function derLength(buf: Buffer): number | undefined {
  if (buf.length < 2 || buf[0] !== 0x30) return undefined;
  const first = buf[1] as number;
  if (first < 0x80) return 2 + first;
  const n = first & 0x7f;
  if (n === 0 || n > 4 || buf.length < 2 + n) return undefined;
  let len = 0;
  for (let i = 0; i < n; i++) len = len * 256 + (buf[2 + i] as number);
  return 2 + n + len;
}

/**
 * Find and classify the signature. Failures say which part is wrong: LAMA_E_BUNDLE_NOT_A_BUNDLE
 * (no trailer, no squashfs), LAMA_E_BUNDLE_TRAILER (the CMS is intact but the size trailer is not),
 * LAMA_E_BUNDLE_TRUNCATED (the file ends early), LAMA_E_BUNDLE_BAD_SIGNATURE (no CMS where the
 * trailer points).
 */
export async function readLayout(h: FileHandle, file: string): Promise<BundleLayout> {
  const { size } = await h.stat();
  const head = await readAt(h, 4, 0);
  const looksSquashfs = head.equals(SQUASHFS_MAGIC);
  if (size < BLOCK + 8) {
    throw new UserError(looksSquashfs ? 'LAMA_E_BUNDLE_TRUNCATED' : 'LAMA_E_BUNDLE_NOT_A_BUNDLE',
      looksSquashfs ? `bundle is truncated: only ${size} bytes` : `not a RAUC bundle: only ${size} bytes`, { where: file });
  }
  const trailer = await readAt(h, 8, size - 8);
  const sigSize = trailer.readBigUInt64BE(0);
  const tailLen = Math.min(size - 8, MAX_SIGNATURE);
  if (sigSize > 0n && sigSize <= BigInt(tailLen)) {
    const offset = size - 8 - Number(sigSize);
    const sig = await readAt(h, Number(sigSize), offset);
    if (derLength(sig) === sig.length) {
      const type = cmsType(sig);
      if (type === 'signed' || type === 'enveloped') {
        return { fileSize: size, signatureOffset: offset, signatureSize: sig.length, signature: sig, cms: type };
      }
    }
  }
  // The trailer does not point at a CMS. If an intact CMS ends right before the trailer, only the
  // trailer is damaged; otherwise the end of the file is missing.
  const tail = await readAt(h, tailLen, size - 8 - tailLen);
  const tailStart = size - 8 - tailLen;
  for (let off = tailStart; off < size - 8; off++) {
    const rel = off - tailStart;
    if (tail[rel] !== 0x30) continue;
    const len = derLength(tail.subarray(rel, rel + 6));
    if (len !== undefined && off + len === size - 8 && cmsType(tail.subarray(rel, rel + len))) {
      throw new UserError('LAMA_E_BUNDLE_TRAILER', `size trailer at byte ${size - 8} says ${sigSize} but the signature at byte ${off} is ${len} bytes`, { where: file });
    }
  }
  if (looksSquashfs || sigSize <= BigInt(size)) {
    throw new UserError('LAMA_E_BUNDLE_TRUNCATED', `bundle is truncated or its end is damaged: no signature ends at byte ${size - 8} (trailer says ${sigSize} bytes)`, { where: file });
  }
  throw new UserError('LAMA_E_BUNDLE_NOT_A_BUNDLE', 'not a RAUC bundle: no squashfs payload and no signature trailer', { where: file });
}
