import type { FileHandle } from 'node:fs/promises';

/**
 * Positional reads that loop over short reads, so callers see a short result only at the end of
 * the file (a truncated image), never because the kernel returned less than asked.
 */

/** Read up to `length` bytes at `position` into `buf` at `offset`; returns the bytes read. */
export async function readInto(
  h: FileHandle,
  buf: Buffer,
  offset: number,
  length: number,
  position: number,
): Promise<number> {
  let got = 0;
  while (got < length) {
    const { bytesRead } = await h.read(buf, offset + got, length - got, position + got);
    if (bytesRead === 0) break;
    got += bytesRead;
  }
  return got;
}

/** Read up to `length` bytes at `position`; the buffer is shorter only at the end of the file. */
export async function readAt(h: FileHandle, length: number, position: number): Promise<Buffer> {
  const buf = Buffer.alloc(length);
  const got = await readInto(h, buf, 0, length, position);
  return got === length ? buf : buf.subarray(0, got);
}
