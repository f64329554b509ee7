import { randomBytes } from 'node:crypto';
import { promises as fs } from 'node:fs';

/** Shared inputs for benchmarks, so each capability measures against the same kind of data. */

export const MiB = 1024 * 1024;

/** `bytes` times LAMADIST_BENCH_SCALE (default 1), rounded down to whole MiB, at least 1 MiB. */
export function scaled(bytes: number): number {
  const s = Number(process.env.LAMADIST_BENCH_SCALE ?? '1');
  const f = Number.isFinite(s) && s > 0 ? s : 1;
  return Math.max(MiB, Math.floor((bytes * f) / MiB) * MiB);
}

/** Half random, half zero per 4 KiB block: compresses about 2:1 like a real root filesystem. */
export async function writeCompressible(file: string, size: number): Promise<void> {
  const h = await fs.open(file, 'w');
  try {
    const chunk = Buffer.alloc(8 * MiB);
    for (let pos = 0; pos < size; pos += chunk.length) {
      for (let b = 0; b < chunk.length; b += 4096) randomBytes(2048).copy(chunk, b);
      await h.write(chunk, 0, Math.min(chunk.length, size - pos), pos);
    }
  } finally {
    await h.close();
  }
}
