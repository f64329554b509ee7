import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { buildInitramfs, debianKernel, runQemu, SERIAL_CONSOLE, type DebianKernel } from '../../src/vm/index.js';

// The guest kit end to end: Debian's kernel boots a busybox initramfs under QEMU, loads modules
// with their dependencies, runs a copied host binary and reaches a marker.
describe('guest kit boots Debian kernel with a tiny initramfs', () => {
  let dir: string;
  let kernel: DebianKernel;
  beforeAll(async () => {
    dir = await fs.mkdtemp(path.join(os.tmpdir(), 'vm-kit-'));
    kernel = await debianKernel();
  });
  afterAll(async () => {
    await fs.rm(dir, { recursive: true, force: true });
  });

  it('reaches the marker with modules loaded and cryptsetup runnable', async () => {
    const initrd = await buildInitramfs({
      init: [
        'mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev',
        'modprobe -a virtio_pci virtio_blk dm_verity && echo MODPROBE-OK',
        'grep -q "^dm_verity " /proc/modules && grep -q "^dm_bufio " /proc/modules && echo DEPS-OK',
        'echo "CS=$(cryptsetup --version)"',
        'cat /dev/vda | head -c 16; echo',
        'echo "LAMA-MARKER $(uname -r) $(cat /etc/hello)"',
        'poweroff -f',
      ].join('\n'),
      binaries: ['cryptsetup'],
      modules: ['virtio_pci', 'virtio_blk', 'dm_verity'],
      files: { '/etc/hello': 'from-the-host' },
      out: path.join(dir, 'initrd.gz'),
    });
    const disk = path.join(dir, 'disk.img');
    await fs.writeFile(disk, Buffer.concat([Buffer.from('DISK-CONTENT-123'), Buffer.alloc(1024 * 1024 - 16)]));
    const r = await runQemu({
      kernel: kernel.vmlinuz,
      initrd,
      append: `${SERIAL_CONSOLE} panic=-1`,
      disks: [{ path: disk, readonly: true }],
      memMiB: 512,
      noReboot: true,
      timeoutMs: 240_000,
      until: /LAMA-MARKER .*\r?\n/,
      serialLog: path.join(dir, 'serial.log'),
    });
    expect(r.timedOut, r.serial.slice(-2000)).toBe(false);
    expect(r.matched, r.serial.slice(-3000)).toBe(true);
    expect(r.serial).toContain('MODPROBE-OK');
    expect(r.serial).toContain('DEPS-OK');
    expect(r.serial).toMatch(/CS=cryptsetup 2\./);
    expect(r.serial).toContain('DISK-CONTENT-123');
    expect(r.serial).toContain(`LAMA-MARKER ${kernel.version} from-the-host`);
    expect(await fs.readFile(path.join(dir, 'serial.log'), 'utf8')).toContain('LAMA-MARKER');
  });
});
