import { createHmac, randomBytes } from 'node:crypto';

/**
 * Where the disk engine's random values (UUIDs, salts, volume keys, keys) come from. Without a seed
 * every value is fresh from the OS CSPRNG. With a seed every value is HKDF-expanded from it under a
 * unique label, so the same inputs and seed give a byte-identical image; the seed then stands for
 * every key on the image and must be kept as secret as they are.
 */
export type RandomSource = (label: string, length: number) => Buffer;

/** A random source; deterministic per label when `seed` is given. */
export function createRandom(seed?: string | Buffer): RandomSource {
  if (seed === undefined) return (_label, length) => randomBytes(length);
  const prk = createHmac('sha256', 'lamadist-image-seed').update(seed).digest();
  const used = new Set<string>();
  return (label, length) => {
    // Two uses of one label would silently share bytes (e.g. two identical salts): refuse instead.
    if (used.has(label)) throw new Error(`random label '${label}' used twice`);
    used.add(label);
    const out: Buffer[] = [];
    let prev = Buffer.alloc(0);
    for (let i = 1, got = 0; got < length; i++) {
      prev = createHmac('sha256', prk)
        .update(prev)
        .update(label)
        .update(Buffer.from([i & 0xff, i >> 8]))
        .digest();
      out.push(prev);
      got += prev.length;
    }
    return Buffer.concat(out).subarray(0, length);
  };
}

/** A version-4 UUID from the random source. */
export function randomUuid(random: RandomSource, label: string): string {
  const b = random(label, 16);
  b[6] = ((b[6] as number) & 0x0f) | 0x40;
  b[8] = ((b[8] as number) & 0x3f) | 0x80;
  const h = b.toString('hex');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}
