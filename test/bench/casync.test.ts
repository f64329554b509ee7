import { randomBytes } from 'node:crypto';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { casyncExtractArgs, casyncFetch, casyncMakeArgs, changedBlocks } from '../../src/bench/casync.js';
import { buildErofs } from '../../src/erofs/index.js';

let dir: string;
let work: string;
let oldImg: string;
let newImg: string;
const UUID = '0b7c3f4e-9a1d-4e2b-8c5f-6d7e8f901a2b';
const FILES = 48;
const FILE_SIZE = 256 * 1024;

beforeAll(async () => {
  dir = await fs.mkdtemp(path.join(os.tmpdir(), 'lamadist-bench-casync-'));
  work = path.join(dir, 'work');
  await fs.mkdir(work);
  const oldTree = path.join(dir, 'old');
  const newTree = path.join(dir, 'new');
  for (const t of [oldTree, newTree]) await fs.mkdir(path.join(t, 'usr/lib'), { recursive: true });
  // Random content does not compress, so the changed file keeps its size and place in the image.
  for (let i = 0; i < FILES; i++) {
    const data = randomBytes(FILE_SIZE);
    await fs.writeFile(path.join(oldTree, `usr/lib/f${i}.bin`), data);
    if (i === FILES / 2) randomBytes(8192).copy(data, 0);
    await fs.writeFile(path.join(newTree, `usr/lib/f${i}.bin`), data);
  }
  oldImg = path.join(dir, 'old.erofs');
  newImg = path.join(dir, 'new.erofs');
  await buildErofs({ source: oldTree, out: oldImg, uuid: UUID, timestamp: 1700000000 });
  await buildErofs({ source: newTree, out: newImg, uuid: UUID, timestamp: 1700000000 });
});
afterAll(async () => {
  await fs.rm(dir, { recursive: true, force: true });
});

describe('casync peer figure', () => {
  it('runs casync with the arguments rauc convert and the RAUC installer use', () => {
    expect(casyncMakeArgs('/b/i.caibx', '/b/i.img', '/b.castr')).toEqual([
      'make',
      '/b/i.caibx',
      '/b/i.img',
      '--store',
      '/b.castr',
    ]);
    expect(casyncMakeArgs('/b/i.caibx', '/b/i.img', '/b.castr', 16384)).toContain('--chunk-size=16384');
    expect(casyncExtractArgs('/dev/seed', 'http://h/s/', 'http://h/i.caibx', '/dev/out')).toEqual([
      'extract',
      '--seed',
      '/dev/seed',
      '--store',
      'http://h/s/',
      '--seed-output=no',
      'http://h/i.caibx',
      '/dev/out',
    ]);
  });

  it('fetches a small part of the image when one file changed, and rebuilds it exactly', async () => {
    const empty = path.join(dir, 'empty.img');
    await fs.writeFile(empty, '');
    const full = await casyncFetch({ seed: empty, image: newImg, workDir: work });
    const one = await casyncFetch({ seed: oldImg, image: newImg, workDir: work });
    const imageBytes = (await fs.stat(newImg)).size;
    expect(one.imageBytes).toBe(imageBytes);
    expect(full.fetchedChunks).toBe(full.chunks);
    expect(full.fetchedBytes).toBeGreaterThan(imageBytes * 0.9);
    expect(one.chunks).toBe(full.chunks);
    expect(one.fetchedChunks).toBeGreaterThan(0);
    expect(one.fetchedBytes).toBeGreaterThan(one.indexBytes);
    expect(one.fetchedBytes).toBeLessThan(full.fetchedBytes / 4);
    expect(one.fetchedBytes).toBeGreaterThanOrEqual(8192);
    expect(await fs.readdir(work)).toEqual([]);
    console.log(
      `casync: image ${imageBytes} B, ${one.chunks} chunks; one file changed: ${one.fetchedBytes} B (${one.fetchedChunks} chunks, index ${one.indexBytes} B); full: ${full.fetchedBytes} B`,
    );
  });

  it('fetches only the index when the device already has the image', async () => {
    const r = await casyncFetch({ seed: oldImg, image: oldImg, workDir: work });
    expect(r.fetchedChunks).toBe(0);
    expect(r.fetchedBytes).toBe(r.indexBytes);
    expect(r.indexBytes).toBe(48 + 16 + 40 * r.chunks + 40);
  });

  it('passes the chunk size on to casync make', async () => {
    const dflt = await casyncFetch({ seed: oldImg, image: oldImg, workDir: work });
    const small = await casyncFetch({ seed: oldImg, image: oldImg, workDir: work, chunkSize: 16384 });
    expect(small.chunks).toBeGreaterThan(dflt.chunks * 2);
  });
});

describe('changedBlocks', () => {
  it('counts blocks that differ or lie past the old end, a short last block by its length', async () => {
    const a = path.join(dir, 'a.bin');
    const b = path.join(dir, 'b.bin');
    const old = randomBytes(10000);
    const neu = Buffer.concat([old, randomBytes(3000)]);
    neu[5000] = (neu[5000] as number) ^ 1;
    await fs.writeFile(a, old);
    await fs.writeFile(b, neu);
    // Block 1 changed, block 2 runs past the old end, block 3 is new and 712 bytes long.
    expect(await changedBlocks(a, b, 4096)).toEqual({ blocks: 4, changed: 3, bytes: 4096 + 4096 + 712 });
    expect(await changedBlocks(a, a, 4096)).toEqual({ blocks: 3, changed: 0, bytes: 0 });
    // A new image shorter than the old one: its short last block matches the old bytes there.
    expect(await changedBlocks(b, a, 4096)).toEqual({ blocks: 3, changed: 1, bytes: 4096 });
  });

  it('compares across read windows', async () => {
    const a = path.join(dir, 'big-a.bin');
    const b = path.join(dir, 'big-b.bin');
    const old = randomBytes(5 * 1024 * 1024 + 4096 * 3);
    const neu = Buffer.from(old);
    for (const at of [0, 1024 * 1024 - 1, 1024 * 1024, 4 * 1024 * 1024 + 17, neu.length - 1])
      neu[at] = (neu[at] as number) ^ 0xff;
    await fs.writeFile(a, old);
    await fs.writeFile(b, neu);
    expect(await changedBlocks(a, b, 4096)).toEqual({ blocks: 1283, changed: 5, bytes: 5 * 4096 });
    // 1000-byte blocks: the bytes either side of 1 MiB share block 1048, the last block is 168 bytes long.
    expect(await changedBlocks(a, b, 1000)).toEqual({ blocks: 5256, changed: 4, bytes: 3 * 1000 + 168 });
  });

  it('gives the floor for the EROFS pair: the changed file and little else', async () => {
    const r = await changedBlocks(oldImg, newImg, 4096);
    expect(r.changed).toBeGreaterThanOrEqual(2);
    expect(r.changed).toBeLessThanOrEqual(4);
    console.log(`changedBlocks: ${r.changed} of ${r.blocks} blocks, ${r.bytes} B`);
  });
});
