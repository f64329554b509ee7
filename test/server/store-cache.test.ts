import { createHash, randomBytes } from 'node:crypto';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ArtifactStore, BLOCK_SIZE } from '../../src/server/store.js';

// Range reads come from an LRU of aligned blocks; every answer must equal the file's bytes, whether
// the range sits in one block, spans several, ends in the short last block, or the cache is off.
describe('artifact store block cache', () => {
  let dir: string;
  let data: Buffer;
  let sha: string;

  async function storeWith(cacheBytes: number): Promise<ArtifactStore> {
    const store = await ArtifactStore.open(path.join(dir, `store-${cacheBytes}`), { cacheBytes });
    const file = store.pathFor(sha);
    await fs.mkdir(path.dirname(file), { recursive: true });
    await fs.writeFile(file, data);
    return store;
  }

  beforeAll(async () => {
    dir = await fs.mkdtemp(path.join(os.tmpdir(), 'store-cache-'));
    data = randomBytes(2 * BLOCK_SIZE + 12345);
    sha = createHash('sha256').update(data).digest('hex');
  });
  afterAll(async () => {
    await fs.rm(dir, { recursive: true, force: true });
  });

  const ranges: [number, number][] = [
    [0, 0],
    [0, 3],
    [BLOCK_SIZE - 1, BLOCK_SIZE],
    [BLOCK_SIZE - 100, 2 * BLOCK_SIZE + 99],
    [2 * BLOCK_SIZE, 2 * BLOCK_SIZE + 12344],
    [131072, 262143],
    [0, 2 * BLOCK_SIZE + 12344],
  ];

  for (const cacheBytes of [64 * 1024 * 1024, BLOCK_SIZE, 0]) {
    it(`returns the file's bytes with a ${cacheBytes / 1048576} MiB cache`, async () => {
      const store = await storeWith(cacheBytes);
      try {
        for (let pass = 0; pass < 2; pass++) {
          for (const [s, e] of ranges) {
            const got = await store.read(sha, data.length, s, e);
            expect(got.data.length, `${s}-${e}`).toBe(e - s + 1);
            expect(got.data.equals(data.subarray(s, e + 1)), `${s}-${e}`).toBe(true);
            got.release();
          }
        }
        const st = store.cacheStats();
        expect(st.leased).toBe(0);
        expect(st.slabs).toBeLessThanOrEqual(Math.floor(cacheBytes / BLOCK_SIZE));
      } finally {
        await store.close();
      }
    });
  }

  it('never reuses a slab while a lease still holds it', async () => {
    const store = await storeWith(2 * BLOCK_SIZE);
    try {
      const held = await store.read(sha, data.length, 100, 4195);
      const copy = Buffer.from(held.data);
      // Blocks 1 and 2 (and read-ahead) compete for the one other slab; block 0 stays leased.
      for (const [s, e] of [[BLOCK_SIZE, BLOCK_SIZE + 99], [2 * BLOCK_SIZE, 2 * BLOCK_SIZE + 99], [BLOCK_SIZE + 5, BLOCK_SIZE + 9]] as const) {
        const l = await store.read(sha, data.length, s, e);
        expect(l.data.equals(data.subarray(s, e + 1))).toBe(true);
        l.release();
      }
      expect(held.data.equals(copy)).toBe(true);
      expect(held.data.equals(data.subarray(100, 4196))).toBe(true);
      expect(store.cacheStats()).toMatchObject({ slabs: 2, leased: 1 });
      held.release();
      expect(store.cacheStats().leased).toBe(0);
    } finally {
      await store.close();
    }
  });

  it('serves from a fresh buffer when every slab is leased', async () => {
    const store = await storeWith(BLOCK_SIZE);
    try {
      const a = await store.read(sha, data.length, 0, 9);
      const b = await store.read(sha, data.length, BLOCK_SIZE, BLOCK_SIZE + 9);
      expect(b.data.equals(data.subarray(BLOCK_SIZE, BLOCK_SIZE + 10))).toBe(true);
      expect(a.data.equals(data.subarray(0, 10))).toBe(true);
      expect(store.cacheStats()).toMatchObject({ slabs: 1, leased: 1 });
      a.release();
      b.release();
    } finally {
      await store.close();
    }
  });

  it('frees idle blocks and spare slabs, but never a leased one, and grows again on the next read', async () => {
    const store = await storeWith(64 * 1024 * 1024);
    try {
      for (const s of [0, BLOCK_SIZE, 2 * BLOCK_SIZE]) (await store.read(sha, data.length, s, s + 9)).release();
      const held = await store.read(sha, data.length, 100, 199);
      expect(store.trimIdle(60_000)).toBe(0);
      expect(store.cacheStats().slabs).toBe(3);
      expect(store.trimIdle(0)).toBe(2);
      expect(store.cacheStats()).toMatchObject({ slabs: 1, leased: 1, blocks: 1 });
      expect(held.data.equals(data.subarray(100, 200))).toBe(true);
      held.release();
      expect(store.trimIdle(0)).toBe(1);
      expect(store.cacheStats()).toMatchObject({ slabs: 0, blocks: 0 });
      const again = await store.read(sha, data.length, BLOCK_SIZE + 5, BLOCK_SIZE + 9);
      expect(again.data.equals(data.subarray(BLOCK_SIZE + 5, BLOCK_SIZE + 10))).toBe(true);
      again.release();
      expect(store.cacheStats().slabs).toBeGreaterThan(0);
    } finally {
      await store.close();
    }
  });

  it('does not keep a failed read: the next request reads the file again', async () => {
    const store = await storeWith(64 * 1024 * 1024);
    try {
      const file = store.pathFor(sha);
      await fs.truncate(file, BLOCK_SIZE + 10);
      await expect(store.read(sha, data.length, 2 * BLOCK_SIZE, 2 * BLOCK_SIZE + 10)).rejects.toThrow(/shorter than its recorded size/);
      await fs.writeFile(file, data);
      const got = await store.read(sha, data.length, 2 * BLOCK_SIZE, 2 * BLOCK_SIZE + 10);
      expect(got.data.equals(data.subarray(2 * BLOCK_SIZE, 2 * BLOCK_SIZE + 11))).toBe(true);
      got.release();
    } finally {
      await store.close();
    }
  });
});
