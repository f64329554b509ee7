import { createHash } from 'node:crypto';

/**
 * The LUKS anti-forensic splitter ("luks1" AF type, used by LUKS2 keyslots too): the key is spread
 * over `stripes` blocks so that destroying any one stripe destroys the key. Each round XORs a
 * stripe into an accumulator and diffuses it with the hash, one digest-sized piece at a time, each
 * piece hashed with its big-endian 32-bit index in front.
 */

function diffuse(buf: Buffer, hash: string): Buffer {
  const out = Buffer.alloc(buf.length);
  const ds = createHash(hash).digest().length;
  const prefix = Buffer.alloc(4);
  for (let i = 0, at = 0; at < buf.length; i++, at += ds) {
    const len = Math.min(ds, buf.length - at);
    prefix.writeUInt32BE(i, 0);
    createHash(hash)
      .update(prefix)
      .update(buf.subarray(at, at + len))
      .digest()
      .copy(out, at, 0, len);
  }
  return out;
}

function xorInto(acc: Buffer, block: Buffer): void {
  for (let i = 0; i < acc.length; i++) acc[i] = (acc[i] as number) ^ (block[i] as number);
}

/** Split `key` into `stripes` blocks; `random` supplies the first stripes - 1 blocks. */
export function afSplit(key: Buffer, stripes: number, hash: string, random: Buffer): Buffer {
  const n = key.length;
  if (random.length < n * (stripes - 1)) throw new Error('not enough random bytes for the AF splitter');
  const out = Buffer.alloc(n * stripes);
  let acc: Buffer = Buffer.alloc(n);
  for (let i = 0; i < stripes - 1; i++) {
    const stripe = random.subarray(i * n, (i + 1) * n);
    stripe.copy(out, i * n);
    xorInto(acc, stripe);
    acc = diffuse(acc, hash);
  }
  xorInto(acc, key);
  acc.copy(out, (stripes - 1) * n);
  return out;
}

/** Recover the key from its `stripes` blocks. */
export function afMerge(material: Buffer, keySize: number, stripes: number, hash: string): Buffer {
  let acc: Buffer = Buffer.alloc(keySize);
  for (let i = 0; i < stripes - 1; i++) {
    xorInto(acc, material.subarray(i * keySize, (i + 1) * keySize));
    acc = diffuse(acc, hash);
  }
  xorInto(acc, material.subarray((stripes - 1) * keySize, stripes * keySize));
  return acc;
}
