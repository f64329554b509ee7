import { promises as fs } from 'node:fs';
import path from 'node:path';
import { buildErofs } from '../../src/erofs/index.js';
import { formatVerity } from '../../src/verity/index.js';

/**
 * A small but real root for releases made in tests: an EROFS image of a tree holding only
 * `usr/lib/os-release`, and its dm-verity hash tree. UUIDs and timestamp are fixed, so both are
 * the same in every run.
 */
export async function tinyRoot(dir: string, o: { osRelease: string; salt: number }): Promise<{ rootfs: string; verity: string; rootHash: string }> {
  const tree = path.join(dir, 'tree');
  await fs.mkdir(path.join(tree, 'usr/lib'), { recursive: true });
  await fs.writeFile(path.join(tree, 'usr/lib/os-release'), o.osRelease);
  const rootfs = path.join(dir, 'rootfs.img');
  const sb = await buildErofs({ source: tree, out: rootfs, uuid: '6a1d2e8c-5a4f-4b1e-9c3d-1f2e3d4c5b6a', timestamp: 0 });
  const verity = path.join(dir, 'verity.img');
  const v = await formatVerity({ dataPath: rootfs, dataBlocks: sb.bytes / 4096, hashPath: verity, salt: Buffer.alloc(32, o.salt), uuid: '1b2c3d4e-5f60-4172-8394-a5b6c7d8e9f0' });
  return { rootfs, verity, rootHash: v.rootHash.toString('hex') };
}
