import { execFileSync, spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { UserError } from '../../src/errors.js';
import { buildErofs, erofsArgs, prepareRootfs, readErofsSuperblock, treeFileContexts } from '../../src/erofs/index.js';

let dir: string;
let tree: string;
const UUID = '5d6e7f80-1a2b-4c3d-8e9f-a0b1c2d3e4f5';

beforeAll(async () => {
  dir = await fs.mkdtemp(path.join(os.tmpdir(), 'lamadist-erofs-'));
  tree = path.join(dir, 'tree');
  await fs.mkdir(path.join(tree, 'etc'), { recursive: true });
  await fs.mkdir(path.join(tree, 'usr/lib'), { recursive: true });
  await fs.writeFile(path.join(tree, 'etc/os-release'), 'ID=lamadist\n');
  await fs.writeFile(path.join(tree, 'usr/lib/big'), 'lamadist '.repeat(50000));
  await fs.symlink('../usr/lib/big', path.join(tree, 'etc/big'));
  await fs.chmod(path.join(tree, 'etc/os-release'), 0o640);
});
afterAll(async () => {
  await fs.rm(dir, { recursive: true, force: true });
});

const sha = async (f: string): Promise<string> =>
  createHash('sha256')
    .update(await fs.readFile(f))
    .digest('hex');

describe('EROFS', () => {
  it('plans a reproducible mkfs.erofs command line', () => {
    expect(erofsArgs({ source: '/r', out: '/o', uuid: UUID, timestamp: 1700000000 })).toEqual([
      '--quiet',
      '-T1700000000',
      `-U${UUID}`,
      '-zlz4hc',
      '/o',
      '/r',
    ]);
    expect(
      erofsArgs({ source: '/r', out: '/o', uuid: UUID, timestamp: 0, compression: 'none' }),
    ).not.toContain('-zlz4hc');
    expect(erofsArgs({ source: '/r', out: '/o', uuid: UUID, timestamp: 0, fileContexts: '/fc' }).slice(-3)).toEqual([
      '--file-contexts=/fc',
      '/o',
      '/r',
    ]);
  });

  it("finds the file_contexts of the tree's own policy, and none where it is incomplete", async () => {
    const t = path.join(dir, 'policy-tree');
    await fs.mkdir(path.join(t, 'etc/selinux/targeted/contexts/files'), { recursive: true });
    expect(await treeFileContexts(t)).toBeUndefined();
    await fs.writeFile(path.join(t, 'etc/selinux/config'), '# comment\nSELINUX=enforcing\nSELINUXTYPE=targeted\n');
    expect(await treeFileContexts(t)).toBeUndefined();
    const fc = path.join(t, 'etc/selinux/targeted/contexts/files/file_contexts');
    await fs.writeFile(fc, '/.*\tsystem_u:object_r:default_t:s0\n');
    expect(await treeFileContexts(t)).toBe(fc);
    await fs.writeFile(path.join(t, 'etc/selinux/config'), 'SELINUX=disabled\n');
    expect(await treeFileContexts(t)).toBeUndefined();
  });

  it('builds byte-identical images that fsck.erofs accepts, and reads the superblock like dump.erofs', async () => {
    const a = path.join(dir, 'a.erofs');
    const b = path.join(dir, 'b.erofs');
    const sbA = await buildErofs({ source: tree, out: a, uuid: UUID, timestamp: 1700000000 });
    await fs.utimes(path.join(tree, 'etc/os-release'), new Date(), new Date());
    await buildErofs({ source: tree, out: b, uuid: UUID, timestamp: 1700000000 });
    expect(await sha(a)).toBe(await sha(b));
    expect(spawnSync('fsck.erofs', [a]).status).toBe(0);
    expect(sbA.uuid).toBe(UUID);
    expect(sbA.checksum).toBe('ok');
    expect(sbA.bytes).toBe((await fs.stat(a)).size);
    const dump = execFileSync('dump.erofs', ['-s', a], { encoding: 'utf8' });
    expect(dump).toContain(`Filesystem UUID:                              ${UUID}`);
    expect(dump).toMatch(new RegExp(`Filesystem blocks:\\s+${sbA.blocks}\\n`));
    expect(dump).toMatch(new RegExp(`Filesystem inode count:\\s+${sbA.inodes}\\n`));
    expect(dump).toMatch(new RegExp(`Filesystem root nid:\\s+${sbA.rootNid}\\n`));
    // lz4hc actually compressed the repetitive file
    expect(sbA.bytes).toBeLessThan(450000 / 2);
  });

  it('detects a damaged superblock', async () => {
    const a = path.join(dir, 'bad.erofs');
    await buildErofs({ source: tree, out: a, uuid: UUID, timestamp: 1 });
    const h = await fs.open(a, 'r+');
    await h.write(Buffer.from([0x77]), 0, 1, 1024 + 40);
    await h.close();
    const e = await readErofsSuperblock(a).catch((x: unknown) => x);
    expect(e).toBeInstanceOf(UserError);
    expect((e as UserError).code).toBe('LAMA_E_EROFS_CORRUPT');
    expect(await readErofsSuperblock(path.join(tree, 'etc/os-release'))).toBeUndefined();
  });

  it('takes a directory, a tarball or an EROFS image as rootfs', async () => {
    const d = await prepareRootfs(tree);
    expect(d).toMatchObject({ kind: 'dir', dir: tree });
    const tar = path.join(dir, 'root.tar.gz');
    execFileSync('tar', ['-czf', tar, '-C', tree, '.']);
    const t = await prepareRootfs(tar);
    if (t.kind !== 'dir') throw new Error('expected a directory');
    expect(await fs.readFile(path.join(t.dir, 'etc/os-release'), 'utf8')).toBe('ID=lamadist\n');
    expect((await fs.stat(path.join(t.dir, 'etc/os-release'))).mode & 0o777).toBe(0o640);
    await t.cleanup();
    await expect(fs.stat(t.dir)).rejects.toThrow();
    const img = path.join(dir, 'a.erofs');
    expect((await prepareRootfs(img)).kind).toBe('erofs');
    await expect(prepareRootfs(path.join(tree, 'etc/os-release'))).rejects.toThrow(/neither a directory/);
    await expect(prepareRootfs(path.join(dir, 'missing'))).rejects.toThrow(/does not exist/);
  });
});
