import { createHash, randomBytes } from 'node:crypto';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { ImagePlan } from '../../src/image/index.js';
import {
  buildInitramfs,
  debianKernel,
  runQemu,
  SERIAL_CONSOLE,
  type DebianKernel,
} from '../../src/vm/index.js';
import { runCli } from '../helpers/cli.js';

// The acceptance check that only a real kernel can give: an image written entirely in userspace by
// `lamadist image build` is opened by the kernel's dm-crypt (our LUKS2 header, keyslots and
// aes-xts-plain64 payload with 512-byte IV units), dm-verity (our hash tree and root hash) and EROFS,
// and a file read back inside the guest matches the input byte for byte.
describe('image build → QEMU guest: cryptsetup open, veritysetup open, mount -t erofs', () => {
  let dir: string;
  let kernel: DebianKernel;
  let plan: ImagePlan;
  let image: string;
  let payloadSha: string;

  beforeAll(async () => {
    dir = await fs.mkdtemp(path.join(os.tmpdir(), 'lamadist-guest-'));
    kernel = await debianKernel();
    const rootfs = path.join(dir, 'rootfs');
    await fs.mkdir(path.join(rootfs, 'etc'), { recursive: true });
    await fs.mkdir(path.join(rootfs, 'usr/share/lamadist'), { recursive: true });
    await fs.writeFile(path.join(rootfs, 'etc/os-release'), 'ID=lamadist\n');
    const payload = Buffer.concat([randomBytes(3 * 1024 * 1024), Buffer.from('lamadist '.repeat(100000))]);
    payloadSha = createHash('sha256').update(payload).digest('hex');
    await fs.writeFile(path.join(rootfs, 'usr/share/lamadist/payload'), payload);
    image = path.join(dir, 'disk.img');
    const r = await runCli(
      [
        '--json',
        'image',
        'build',
        '-o',
        image,
        '--rootfs',
        rootfs,
        '--kernel',
        kernel.vmlinuz,
        '--seed',
        'guest',
        '--slot-size',
        '24',
        '--size',
        'esp=64',
        '--size',
        'verity_a=1',
        '--size',
        'verity_b=1',
        '--size',
        'var=32',
      ],
      { timeoutMs: 600_000 },
    );
    if (r.code !== 0) throw new Error(r.stderr);
    plan = JSON.parse(r.stdout) as ImagePlan;
  });
  afterAll(async () => {
    await fs.rm(dir, { recursive: true, force: true });
  });

  it('opens slot A with the recovery key and /var with the ESP provisioning key, and reads the file back', async () => {
    const rootHash = plan.slots[0]?.verity?.rootHash as string;
    const init = [
      'mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev',
      'mkdir -p /run/cryptsetup /mnt/root /mnt/esp /mnt/var',
      // xts(aes) is built from the ecb template; ext4's libcrc32c needs the crc32c driver loaded first.
      'modprobe -a crc32c_generic ecb xts virtio_pci virtio_blk dm_crypt dm_verity erofs vfat nls_cp437 nls_ascii ext4',
      'i=0; while [ ! -b /dev/vda6 ] && [ $i -lt 30 ]; do sleep 1; i=$((i+1)); done',
      'cryptsetup open --key-file /recovery.key /dev/vda2 rootfs_a && echo LAMA-LUKS-OK',
      `veritysetup open /dev/mapper/rootfs_a root /dev/vda3 ${rootHash} && echo LAMA-VERITY-OK`,
      'mount -t erofs -o ro /dev/mapper/root /mnt/root && echo LAMA-EROFS-OK',
      'echo "LAMA-SHA=$(sha256sum /mnt/root/usr/share/lamadist/payload | cut -d" " -f1)"',
      `veritysetup open /dev/mapper/rootfs_a wrong /dev/vda3 ${'0'.repeat(64)} 2>/dev/null || echo LAMA-WRONG-HASH-REFUSED`,
      'mount -t vfat -o ro /dev/vda1 /mnt/esp && cryptsetup open --key-file /mnt/esp/lamadist/provision.key /dev/vda6 var && echo LAMA-VAR-LUKS-OK',
      'mount -t ext4 -o ro /dev/mapper/var /mnt/var && [ -d /mnt/var/overlay/etc/upper ] && [ -d /mnt/var/overlay/etc/work ] && echo LAMA-VAR-OK',
      'cryptsetup open --test-passphrase --key-file /recovery.key /dev/vda4 && echo LAMA-SLOT-B-KEY-OK',
      'echo LAMA-DONE',
      'poweroff -f',
    ].join('\n');
    const initrd = await buildInitramfs({
      init,
      binaries: ['cryptsetup', 'veritysetup'],
      modules: [
        'crc32c_generic',
        'ecb',
        'xts',
        'virtio_pci',
        'virtio_blk',
        'dm_crypt',
        'dm_verity',
        'erofs',
        'vfat',
        'nls_cp437',
        'nls_ascii',
        'ext4',
      ],
      files: { '/recovery.key': await fs.readFile(`${image}.recovery-key`) },
      out: path.join(dir, 'initrd.gz'),
    });
    const r = await runQemu({
      kernel: kernel.vmlinuz,
      initrd,
      append: `${SERIAL_CONSOLE} panic=-1`,
      disks: [{ path: image }],
      memMiB: 768,
      noReboot: true,
      timeoutMs: 600_000,
      until: /LAMA-DONE/,
      serialLog: path.join(dir, 'serial.log'),
    });
    const tail = r.serial.slice(-4000);
    expect(r.timedOut, tail).toBe(false);
    expect(r.serial, tail).toContain('LAMA-LUKS-OK');
    expect(r.serial, tail).toContain('LAMA-VERITY-OK');
    expect(r.serial, tail).toContain('LAMA-EROFS-OK');
    expect(r.serial, tail).toContain(`LAMA-SHA=${payloadSha}`);
    expect(r.serial, tail).toContain('LAMA-WRONG-HASH-REFUSED');
    expect(r.serial, tail).toContain('LAMA-VAR-LUKS-OK');
    expect(r.serial, tail).toContain('LAMA-VAR-OK');
    expect(r.serial, tail).toContain('LAMA-SLOT-B-KEY-OK');
  });
});
