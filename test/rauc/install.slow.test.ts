import { createHash, randomBytes } from 'node:crypto';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createBundle, encryptBundle } from '../../src/rauc/index.js';
import { buildInitramfs, debianKernel, runQemu, SERIAL_CONSOLE, type DebianKernel } from '../../src/vm/index.js';
import { makePki, type Pki } from './pki.js';

// What only a kernel with device-mapper can show: the real `rauc install` (RAUC 1.8's service on a
// session bus, noop bootloader) mounts our verity bundle through loop + dm-verity, and our crypt
// bundle through dm-verity + dm-crypt after opening its envelope with the device key, and writes
// the image into the inactive slot; the slot's bytes are then compared with the input on the host.

const SIZE = 2 * 1024 * 1024;

describe('rauc install of our bundles in a QEMU guest', () => {
  let dir: string;
  let pki: Pki;
  let kernel: DebianKernel;
  let image: Buffer;
  let verityBundle: string;
  let cryptBundle: string;

  beforeAll(async () => {
    dir = await fs.mkdtemp(path.join(os.tmpdir(), 'lamadist-rauc-install-'));
    pki = makePki();
    kernel = await debianKernel();
    image = randomBytes(SIZE);
    const img = path.join(dir, 'rootfs.img');
    await fs.writeFile(img, image);
    const signer = { certPem: await fs.readFile(pki.cert, 'utf8'), keyPem: await fs.readFile(pki.key, 'utf8') };
    const common = { compatible: 'lamadist-x86-64', version: '1', images: [{ slotClass: 'rootfs', path: img, adaptive: true }], signer };
    verityBundle = path.join(dir, 'verity.raucb');
    await createBundle({ ...common, out: verityBundle });
    const unencrypted = path.join(dir, 'crypt-plain.raucb');
    await createBundle({ ...common, out: unencrypted, format: 'crypt' });
    cryptBundle = path.join(dir, 'crypt.raucb');
    await encryptBundle(unencrypted, cryptBundle, [pki.device]);
  });
  afterAll(async () => {
    await fs.rm(dir, { recursive: true, force: true });
    await fs.rm(pki.dir, { recursive: true, force: true });
  });

  it('installs the verity bundle and the encrypted crypt bundle into slot B', async () => {
    const slotA = path.join(dir, 'slot-a.img');
    const slotB = path.join(dir, 'slot-b.img');
    await fs.writeFile(slotA, Buffer.alloc(SIZE + 1024 * 1024));
    await fs.writeFile(slotB, Buffer.alloc(SIZE + 1024 * 1024));
    const conf = [
      '[system]', 'compatible=lamadist-x86-64', 'bootloader=noop', 'mountprefix=/run/rauc', 'statusfile=/run/rauc.status',
      '[keyring]', 'path=/etc/rauc/ca.pem', 'check-purpose=codesign',
      '[encryption]', 'key=/etc/rauc/device.key', 'cert=/etc/rauc/device.pem',
      '[slot.rootfs.0]', 'device=/dev/vda', 'type=raw', 'bootname=A',
      '[slot.rootfs.1]', 'device=/dev/vdb', 'type=raw', 'bootname=B', '',
    ].join('\n');
    const busConf = '<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN" "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">\n' +
      '<busconfig><type>session</type><listen>unix:path=/run/dbus/bus</listen><auth>EXTERNAL</auth>' +
      '<policy context="default"><allow send_destination="*" eavesdrop="true"/><allow eavesdrop="true"/><allow own="*"/></policy></busconfig>\n';
    const slotSha = `head -c ${SIZE} /dev/vdb | sha256sum | cut -d" " -f1`;
    const init = [
      'mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev',
      'mkdir -p /run/dbus /run/rauc /tmp',
      'modprobe -a virtio_pci virtio_blk loop dm_verity dm_crypt squashfs',
      'i=0; while [ ! -b /dev/vdb ] && [ $i -lt 30 ]; do sleep 1; i=$((i+1)); done',
      'dbus-daemon --config-file=/etc/bus.conf --fork --nopidfile',
      'export DBUS_SESSION_BUS_ADDRESS=unix:path=/run/dbus/bus DBUS_STARTER_BUS_TYPE=session',
      'rauc service > /tmp/service.log 2>&1 &',
      'i=0; while ! rauc status >/dev/null 2>&1 && [ $i -lt 60 ]; do sleep 1; i=$((i+1)); done',
      'rauc status 2>&1 | head -5',
      'rauc install /verity.raucb && echo LAMA-VERITY-INSTALLED',
      `echo "LAMA-SHA-VERITY=$(${slotSha})"`,
      'dd if=/dev/zero of=/dev/vdb bs=1M count=2 2>/dev/null; sync',
      'rauc install /crypt.raucb && echo LAMA-CRYPT-INSTALLED',
      `echo "LAMA-SHA-CRYPT=$(${slotSha})"`,
      'tail -n 20 /tmp/service.log',
      'echo LAMA-DONE',
      'poweroff -f',
    ].join('\n');
    const initrd = await buildInitramfs({
      init,
      binaries: ['rauc', 'dbus-daemon'],
      modules: ['virtio_pci', 'virtio_blk', 'loop', 'dm_verity', 'dm_crypt', 'squashfs'],
      files: {
        '/etc/rauc/system.conf': conf,
        '/etc/rauc/ca.pem': await fs.readFile(pki.ca),
        '/etc/rauc/device.key': await fs.readFile(pki.deviceKey),
        '/etc/rauc/device.pem': await fs.readFile(pki.device),
        '/etc/bus.conf': busConf,
        '/etc/passwd': 'root:x:0:0:root:/root:/bin/sh\n',
        '/etc/group': 'root:x:0:\n',
        '/verity.raucb': await fs.readFile(verityBundle),
        '/crypt.raucb': await fs.readFile(cryptBundle),
      },
      out: path.join(dir, 'initrd.gz'),
    });
    const r = await runQemu({
      kernel: kernel.vmlinuz,
      initrd,
      append: `${SERIAL_CONSOLE} panic=-1 rauc.slot=A`,
      disks: [{ path: slotA, format: 'raw' }, { path: slotB, format: 'raw' }],
      memMiB: 768,
      noReboot: true,
      timeoutMs: 600_000,
      until: /LAMA-DONE/,
      serialLog: path.join(dir, 'serial.log'),
    });
    const tail = r.serial.slice(-6000);
    const want = createHash('sha256').update(image).digest('hex');
    expect(r.timedOut, tail).toBe(false);
    expect(r.serial, tail).toContain('LAMA-VERITY-INSTALLED');
    expect(r.serial, tail).toContain(`LAMA-SHA-VERITY=${want}`);
    expect(r.serial, tail).toContain('LAMA-CRYPT-INSTALLED');
    expect(r.serial, tail).toContain(`LAMA-SHA-CRYPT=${want}`);
    const b = await fs.readFile(slotB);
    expect(b.subarray(0, SIZE).equals(image)).toBe(true);
    expect(b.subarray(0, SIZE).equals(Buffer.alloc(SIZE))).toBe(false);
    const a = await fs.readFile(slotA);
    expect(a.equals(Buffer.alloc(a.length))).toBe(true);
  });
});
