import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { cachedTree, pruneTrees } from '../../src/vm/fixture.js';

// Each test PKI makes its own fixture tree; the cache must not keep every one of them forever.
describe('cached root trees', () => {
  let home: string;
  const saved = process.env.XDG_CACHE_HOME;
  const root = (): string => path.join(home, 'lamadist', 'rootfs');
  const hoursAgo = (h: number): Date => new Date(Date.now() - h * 3600_000);

  async function tree(name: string, used: Date | undefined): Promise<string> {
    const dir = path.join(root(), name);
    await fs.mkdir(path.join(dir, 'usr'), { recursive: true });
    if (used) {
      await fs.writeFile(path.join(dir, '.lamadist-complete'), '');
      await fs.utimes(path.join(dir, '.lamadist-complete'), used, used);
    }
    return dir;
  }

  beforeEach(async () => {
    home = await fs.mkdtemp(path.join(os.tmpdir(), 'lamadist-cache-'));
    process.env.XDG_CACHE_HOME = home;
  });
  afterEach(async () => {
    if (saved === undefined) delete process.env.XDG_CACHE_HOME;
    else process.env.XDG_CACHE_HOME = saved;
    await fs.rm(home, { recursive: true, force: true });
  });

  it('keeps the newest trees and any used within the hour, and drops the rest', async () => {
    for (let i = 0; i < 7; i++) await tree(`fixture-${i}`, hoursAgo(2 + i));
    await tree('fixture-recent', hoursAgo(0.5));
    await tree('fixture-recent2', hoursAgo(0.2));
    await tree('fixture-building', undefined);
    await tree('variant-0', hoursAgo(30));
    const dropped = await pruneTrees('fixture');
    expect(dropped.map((d) => path.basename(d)).sort()).toEqual(['fixture-2', 'fixture-3', 'fixture-4', 'fixture-5', 'fixture-6']);
    // Newest four by use, an incomplete tree (someone is building it) and other kinds stay.
    expect((await fs.readdir(root())).sort()).toEqual(['fixture-0', 'fixture-1', 'fixture-building', 'fixture-recent', 'fixture-recent2', 'variant-0']);
  });

  it('marks a reused tree as used, so it outlives older ones', async () => {
    for (let i = 0; i < 6; i++) await tree(`fixture-${i}`, hoursAgo(2 + i));
    expect(await cachedTree(path.join(root(), 'fixture-5'))).toBe(true);
    expect(await cachedTree(path.join(root(), 'fixture-missing'))).toBe(false);
    await pruneTrees('fixture');
    expect((await fs.readdir(root())).sort()).toEqual(['fixture-0', 'fixture-1', 'fixture-2', 'fixture-5']);
  });
});
