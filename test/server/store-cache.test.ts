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
            expect(got.length, `${s}-${e}`).toBe(e - s + 1);
            expect(got.equals(data.subarray(s, e + 1)), `${s}-${e}`).toBe(true);
          }
        }
      } finally {
        await store.close();
      }
    });
  }

  it('does not keep a failed read: the next request reads the file again', async () => {
    const store = await storeWith(64 * 1024 * 1024);
    try {
      const file = store.pathFor(sha);
      await fs.truncate(file, BLOCK_SIZE + 10);
      await expect(store.read(sha, data.length, 2 * BLOCK_SIZE, 2 * BLOCK_SIZE + 10)).rejects.toThrow(/shorter than its recorded size/);
      await fs.writeFile(file, data);
      const got = await store.read(sha, data.length, 2 * BLOCK_SIZE, 2 * BLOCK_SIZE + 10);
      expect(got.equals(data.subarray(2 * BLOCK_SIZE, 2 * BLOCK_SIZE + 11))).toBe(true);
    } finally {
      await store.close();
    }
  });
});
