import { spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { BUNDLE_HOOK } from '../../src/release/index.js';
import { formatVerity, productSalt } from '../../src/verity/index.js';

// meta-lamadist's bundle hook installing a root image into slot B of a device running slot A,
// with files standing in for the devices RAUC's system.conf names.

const MID = '0123456789abcdef0123456789abcdef';
const OLD_BLOCKS = 17_000; // more than 128 × 128: a tree of three levels
const SLOT_BLOCKS = 18_000;
const SALT = productSalt('lamadist-x86-64');

let dir: string;
let bundle: string;
let oldImage: Buffer;
let newImage: Buffer;
let changed: number[];
let rootHash: string;
let conf: string;
let cmdline: string;

const dev = (name: string): string => path.join(dir, name);

async function tree(data: Buffer, out: string, salt = SALT): Promise<string> {
  const file = `${out}.data`;
  await fs.writeFile(file, data);
  const v = await formatVerity({ dataPath: file, hashPath: out, salt });
  await fs.rm(file);
  return v.rootHash.toString('hex');
}

function hook(env: NodeJS.ProcessEnv): { code: number; out: string } {
  const r = spawnSync(path.join(bundle, 'hook.sh'), ['slot-install'], {
    encoding: 'utf8',
    env: {
      ...process.env,
      RAUC_SLOT_CLASS: 'rootfs',
      RAUC_SLOT_NAME: 'rootfs.1',
      RAUC_SLOT_DEVICE: dev('rootfs_b'),
      RAUC_IMAGE_NAME: path.join(bundle, 'rootfs.img'),
      LAMADIST_CMDLINE: cmdline,
      LAMADIST_RAUC_CONF: conf,
      ...env,
    },
  });
  return { code: r.status ?? 128, out: `${r.stdout}${r.stderr}` };
}

/** The new image as the bundle carries it, with every block the device should not read spoiled. */
async function spoiledBundleImage(): Promise<void> {
  const spoiled = Buffer.alloc(newImage.length, 0xee);
  for (const b of changed) newImage.copy(spoiled, b * 4096, b * 4096, (b + 1) * 4096);
  await fs.writeFile(path.join(bundle, 'rootfs.img'), spoiled);
}

beforeAll(async () => {
  dir = await fs.mkdtemp(path.join(os.tmpdir(), 'lamadist-hook-rootfs-'));
  bundle = path.join(dir, 'bundle');
  await fs.mkdir(path.join(bundle, 'hosts', MID), { recursive: true });
  await fs.copyFile(BUNDLE_HOOK, path.join(bundle, 'hook.sh'));
  // Mostly zeros with some random blocks, like a file system; the new release changes a few
  // blocks here and there and grows by ten.
  oldImage = Buffer.alloc(OLD_BLOCKS * 4096);
  for (let b = 0; b < OLD_BLOCKS; b += 97) randomBytes(4096).copy(oldImage, b * 4096);
  newImage = Buffer.concat([oldImage, randomBytes(10 * 4096)]);
  changed = [0, 1, 2, 500, 9_999, 16_999];
  for (const b of changed) randomBytes(4096).copy(newImage, b * 4096);
  changed.push(...Array.from({ length: 10 }, (_, i) => OLD_BLOCKS + i));
  await tree(oldImage, dev('verity_a'));
  rootHash = await tree(newImage, dev('verity_b'));
  await fs.writeFile(dev('rootfs_a'), Buffer.concat([oldImage, Buffer.alloc((SLOT_BLOCKS - OLD_BLOCKS) * 4096)]));
  await fs.writeFile(path.join(bundle, 'hosts', MID, 'cmdline-b'), `roothash=${rootHash} lamadist.slot=b rauc.slot=B systemd.machine_id=${MID}\n`);
  conf = path.join(dir, 'system.conf');
  await fs.writeFile(conf, [
    '[system]', 'compatible=lamadist-x86-64', 'bootloader=efi', '',
    '[slot.rootfs.0]', `device=${dev('rootfs_a')}`, 'type=raw', 'bootname=A', '',
    '[slot.rootfs.1]', `device=${dev('rootfs_b')}`, 'type=raw', 'bootname=B', '',
    '[slot.verity.0]', `device=${dev('verity_a')}`, 'type=raw', 'parent=rootfs.0', '',
    '[slot.verity.1]', `device=${dev('verity_b')}`, 'type=raw', 'parent=rootfs.1', '',
    '[slot.efi.0]', 'device=/dev/disk/by-partlabel/esp', 'type=vfat', 'parent=rootfs.0', '',
  ].join('\n'));
  cmdline = path.join(dir, 'cmdline');
  await fs.writeFile(cmdline, `roothash=${'ab'.repeat(32)} lamadist.slot=a rauc.slot=A systemd.machine_id=${MID}\n`);
}, 60_000);

afterAll(async () => {
  await fs.rm(dir, { recursive: true, force: true });
});

describe("meta-lamadist's bundle hook installing a root image", () => {
  const freshTarget = (): Promise<void> => fs.writeFile(dev('rootfs_b'), randomBytes(SLOT_BLOCKS * 4096));
  const written = async (): Promise<Buffer> => (await fs.readFile(dev('rootfs_b'))).subarray(0, newImage.length);

  it('reads from the bundle only the blocks whose hash changed, copies the rest from the running slot, and checks the root hash', async () => {
    await freshTarget();
    await spoiledBundleImage();
    const r = hook({});
    expect(r).toEqual({ code: 0, out: `lamadist-bundle-hook: root image of slot b: ${changed.length} of ${newImage.length / 4096} blocks from the bundle, the rest from ${dev('rootfs_a')}\n` });
    expect((await written()).equals(newImage)).toBe(true);
  });

  it('fails, naming the root hash, when a block it read from the bundle is not the release\'s', async () => {
    await freshTarget();
    await spoiledBundleImage();
    const img = path.join(bundle, 'rootfs.img');
    const fh = await fs.open(img, 'r+');
    await fh.write(Buffer.from('x'), 0, 1, 500 * 4096 + 7);
    await fh.close();
    const r = hook({});
    expect(r.code).toBe(1);
    expect(r.out).toMatch(new RegExp(`\\nlamadist-bundle-hook: slot b does not match the release's root hash ${rootHash} after writing\\n$`));
  });

  it('reads every block from the bundle when the running tree has another salt', async () => {
    await freshTarget();
    await fs.writeFile(path.join(bundle, 'rootfs.img'), newImage);
    const saved = await fs.readFile(dev('verity_a'));
    try {
      await tree(oldImage, dev('verity_a'), Buffer.alloc(32, 7));
      const r = hook({});
      expect(r.code, r.out).toBe(0);
      expect(r.out).toMatch(new RegExp(`: ${newImage.length / 4096} of ${newImage.length / 4096} blocks from the bundle`));
      expect((await written()).equals(newImage)).toBe(true);
    } finally {
      await fs.writeFile(dev('verity_a'), saved);
    }
  });

  it('refuses to write when the target verity slot holds no tree (the verity image was not installed first)', async () => {
    await freshTarget();
    const before = await fs.readFile(dev('rootfs_b'));
    const saved = await fs.readFile(dev('verity_b'));
    try {
      await fs.writeFile(dev('verity_b'), Buffer.alloc(saved.length));
      const r = hook({});
      expect(r).toEqual({ code: 1, out: `lamadist-bundle-hook: ${dev('verity_b')} holds no dm-verity tree (the release's verity image is installed first)\n` });
      expect((await fs.readFile(dev('rootfs_b'))).equals(before)).toBe(true);
    } finally {
      await fs.writeFile(dev('verity_b'), saved);
    }
  });
});
