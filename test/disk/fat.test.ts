import { spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { buildEsp, espDirectories, listEsp, mkfsArgs, readEspFile } from '../../src/fat/index.js';

let dir: string;
const MiB = 1024 * 1024;
beforeAll(async () => {
  dir = await fs.mkdtemp(path.join(os.tmpdir(), 'lamadist-fat-'));
});
afterAll(async () => {
  await fs.rm(dir, { recursive: true, force: true });
});

async function esp(name: string): Promise<string> {
  const image = path.join(dir, name);
  await fs.writeFile(image, '');
  await fs.truncate(image, 40 * MiB);
  const uki = path.join(dir, 'uki.efi');
  await fs.writeFile(uki, Buffer.alloc(70000, 0x4d));
  await buildEsp({
    image,
    offset: MiB,
    size: 32 * MiB,
    volumeId: '1a2b3c4d',
    timestamp: 1700000000,
    files: {
      '/EFI/BOOT/BOOTX64.EFI': uki,
      '/EFI/Linux/lamadist-a.efi': uki,
      '/loader/lamadist/provision.key': Buffer.from('secret'),
    },
  });
  return image;
}

describe('ESP via mkfs.vfat --offset and mtools', () => {
  it('plans directories and mkfs arguments', () => {
    expect(espDirectories(['/EFI/BOOT/BOOTX64.EFI', '/EFI/Linux/a.efi', '/x'])).toEqual([
      '/EFI',
      '/EFI/BOOT',
      '/EFI/Linux',
    ]);
    expect(mkfsArgs({ image: 'i', offset: MiB, size: 16 * MiB, volumeId: 'deadbeef' })).toContain('16');
    expect(mkfsArgs({ image: 'i', offset: MiB, size: 512 * MiB, volumeId: 'deadbeef' })).toEqual([
      '--invariant',
      '-F',
      '32',
      '-i',
      'deadbeef',
      '-n',
      'ESP',
      '--offset=2048',
      'i',
      '524288',
    ]);
    expect(() => mkfsArgs({ image: 'i', offset: 100, size: MiB, volumeId: 'deadbeef' })).toThrow(
      /multiple of 512/,
    );
  });

  it('writes a FAT filesystem fsck.vfat accepts, with the files readable back, reproducibly', async () => {
    const a = await esp('a.img');
    await new Promise((r) => setTimeout(r, 1100));
    const b = await esp('b.img');
    const sum = async (f: string): Promise<string> =>
      createHash('sha256')
        .update(await fs.readFile(f))
        .digest('hex');
    expect(await sum(a)).toBe(await sum(b));
    expect((await listEsp(a, MiB)).sort()).toEqual([
      '/EFI/BOOT/BOOTX64.EFI',
      '/EFI/Linux/lamadist-a.efi',
      '/loader/lamadist/provision.key',
    ]);
    expect((await readEspFile(a, MiB, '/loader/lamadist/provision.key')).toString()).toBe('secret');
    expect((await readEspFile(a, MiB, '/EFI/Linux/lamadist-a.efi')).equals(Buffer.alloc(70000, 0x4d))).toBe(
      true,
    );
    await expect(readEspFile(a, MiB, '/nope')).rejects.toThrow(/cannot read \/nope/);
    const part = path.join(dir, 'part.img');
    const h = await fs.open(a, 'r');
    const buf = Buffer.alloc(32 * MiB);
    await h.read(buf, 0, buf.length, MiB);
    await h.close();
    await fs.writeFile(part, buf);
    const fsck = spawnSync('fsck.vfat', ['-n', part], { encoding: 'utf8' });
    expect(fsck.status, fsck.stdout + fsck.stderr).toBe(0);
    // nothing outside the partition was touched
    const whole = await fs.readFile(a);
    expect(whole.subarray(0, MiB).every((x) => x === 0)).toBe(true);
    expect(whole.subarray(33 * MiB).every((x) => x === 0)).toBe(true);
  });

  it('formats a small ESP inside a much larger image (the FAT type follows the partition, not the file)', async () => {
    const image = path.join(dir, 'large.img');
    await fs.writeFile(image, '');
    await fs.truncate(image, 700 * MiB);
    await buildEsp({
      image,
      offset: MiB,
      size: 64 * MiB,
      volumeId: '0badcafe',
      timestamp: 0,
      files: { '/EFI/BOOT/BOOTX64.EFI': Buffer.from('x') },
    });
    expect(await listEsp(image, MiB)).toEqual(['/EFI/BOOT/BOOTX64.EFI']);
  });
});
