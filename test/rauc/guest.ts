import { promises as fs } from 'node:fs';
import path from 'node:path';
import { buildInitramfs, runQemu, SERIAL_CONSOLE, type DebianKernel, type QemuResult } from '../../src/vm/index.js';
import type { Pki } from './pki.js';

/**
 * A RAUC test guest: Debian's kernel and an initramfs that starts a session D-Bus and `rauc
 * service` with a noop bootloader and two raw slots, /dev/vda (A, booted) and /dev/vdb (B), then
 * runs `steps` and powers off. Shared by the install and the streaming tests.
 */
export async function runRaucGuest(o: {
  dir: string;
  kernel: DebianKernel;
  pki: Pki;
  /** Extra `[system]` lines (e.g. data-directory for adaptive updates). */
  system?: string[];
  /** Shell lines run once RAUC answers; the guest powers off after them. */
  steps: string[];
  slotA: string;
  slotB: string;
  /** RAUC binary to run (default: the host's). */
  rauc?: string;
  modules?: string[];
  files?: Record<string, string | Buffer>;
  /** Bring up eth0 (QEMU user networking; the host is 10.0.2.2). */
  network?: boolean;
}): Promise<QemuResult> {
  const conf = [
    '[system]', 'compatible=lamadist-x86-64', 'bootloader=noop', 'mountprefix=/run/rauc', ...(o.system ?? ['statusfile=/run/rauc.status']),
    '[keyring]', 'path=/etc/rauc/ca.pem', 'check-purpose=codesign',
    '[encryption]', 'key=/etc/rauc/device.key', 'cert=/etc/rauc/device.pem',
    '[slot.rootfs.0]', 'device=/dev/vda', 'type=raw', 'bootname=A',
    '[slot.rootfs.1]', 'device=/dev/vdb', 'type=raw', 'bootname=B', '',
  ].join('\n');
  const busConf = '<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN" "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">\n' +
    '<busconfig><type>session</type><listen>unix:path=/run/dbus/bus</listen><auth>EXTERNAL</auth>' +
    '<policy context="default"><allow send_destination="*" eavesdrop="true"/><allow eavesdrop="true"/><allow own="*"/></policy></busconfig>\n';
  const modules = ['virtio_pci', 'virtio_blk', 'loop', 'dm_verity', 'dm_crypt', 'squashfs', ...(o.modules ?? [])];
  const init = [
    'mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev',
    'mkdir -p /run/dbus /run/rauc /tmp /var/lib/rauc',
    `modprobe -a ${modules.join(' ')}`,
    'i=0; while [ ! -b /dev/vdb ] && [ $i -lt 30 ]; do sleep 1; i=$((i+1)); done',
    ...(o.network ? ['ip link set lo up; ip link set eth0 up; ip addr add 10.0.2.15/24 dev eth0; ip route add default via 10.0.2.2'] : []),
    'dbus-daemon --config-file=/etc/bus.conf --fork --nopidfile',
    'export DBUS_SESSION_BUS_ADDRESS=unix:path=/run/dbus/bus DBUS_STARTER_BUS_TYPE=session',
    'rauc service > /tmp/service.log 2>&1 &',
    'i=0; while ! rauc status >/dev/null 2>&1 && [ $i -lt 60 ]; do sleep 1; i=$((i+1)); done',
    ...o.steps,
    'tail -n 30 /tmp/service.log',
    'echo LAMA-DONE',
    'poweroff -f',
  ].join('\n');
  const initrd = await buildInitramfs({
    init,
    binaries: [o.rauc ?? 'rauc', 'dbus-daemon'],
    modules,
    files: {
      ...(o.rauc ? { '/usr/bin/rauc': { data: await fs.readFile(o.rauc), mode: 0o755 } } : {}),
      '/etc/rauc/system.conf': conf,
      '/etc/rauc/ca.pem': await fs.readFile(o.pki.ca),
      '/etc/rauc/device.key': await fs.readFile(o.pki.deviceKey),
      '/etc/rauc/device.pem': await fs.readFile(o.pki.device),
      '/etc/bus.conf': busConf,
      // RAUC drops the streaming helper's privileges to `nobody`.
      '/etc/passwd': 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n',
      '/etc/group': 'root:x:0:\nnogroup:x:65534:\n',
      ...(o.files ?? {}),
    },
    out: path.join(o.dir, 'initrd.gz'),
  });
  return runQemu({
    kernel: o.kernel.vmlinuz,
    initrd,
    append: `${SERIAL_CONSOLE} panic=-1 rauc.slot=A`,
    disks: [{ path: o.slotA, format: 'raw' }, { path: o.slotB, format: 'raw' }],
    memMiB: 768,
    noReboot: true,
    timeoutMs: 600_000,
    until: /LAMA-DONE/,
    serialLog: path.join(o.dir, 'serial.log'),
  });
}
