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

  // The harness's own watchdogs against a real QEMU: a guest that says it restarts and then goes
  // quiet is power-cycled (and boots again), a guest that goes quiet otherwise is stopped as stalled.
  // Both record where the vCPUs were, read over QMP.
  it('power-cycles a guest whose restart is followed by silence, and stops a silent guest as stalled', async () => {
    const initrd = await buildInitramfs({
      init: [
        'mount -t proc proc /proc; mount -t sysfs sys /sys',
        'echo "LAMA-BOOT $(cat /proc/sys/kernel/random/boot_id) TPM=$(cat /sys/class/tpm/tpm0/tpm_version_major 2>/dev/null)"',
        // The kernel's last words before a reset, then nothing: what a hung reboot looks like.
        'grep -q lama.hang=restart /proc/cmdline && echo "reboot: Restarting system"',
        'exec sleep 100000',
      ].join('\n'),
      out: path.join(dir, 'quiet.gz'),
    });
    // loglevel=1: no late kernel message may break the silence after the restart line.
    // With a TPM: a power cycle has to bring back swtpm on the same state too.
    const boot = (mode: string, extra: { stallMs?: number; resetWatchdogMs?: number; until?: (s: string) => boolean }) =>
      runQemu({
        kernel: kernel.vmlinuz,
        initrd,
        append: `${SERIAL_CONSOLE} loglevel=1 panic=-1 lama.hang=${mode}`,
        memMiB: 512,
        network: false,
        tpm: { stateDir: path.join(dir, 'tpm') },
        timeoutMs: 240_000,
        ...extra,
      });
    const bootsIn = (s: string): number => s.match(/LAMA-BOOT [0-9a-f-]{36} TPM=2/g)?.length ?? 0;

    const reset = await boot('restart', { resetWatchdogMs: 3_000, until: (s) => bootsIn(s) >= 2 });
    expect(reset.matched, reset.serial.slice(-2000)).toBe(true);
    expect(reset.resets).toBe(1);
    expect(reset.serial).toMatch(/lamadist-harness: no firmware output 3 s after the guest restarted \(CPU0 RIP=[0-9a-f]{16} CPU1 RIP=[0-9a-f]{16}\); power-cycling it/);
    const ids = reset.serial.match(/LAMA-BOOT [0-9a-f-]{36}/g) ?? [];
    expect(new Set(ids).size).toBe(2);

    // Long enough for the kernel to reach init without printing anything, even on a loaded machine.
    const quiet = await boot('none', { stallMs: 20_000, resetWatchdogMs: 1_000 });
    expect(quiet.stalled, quiet.serial.slice(-2000)).toBe(true);
    expect(quiet.serial.indexOf('LAMA-BOOT')).toBeGreaterThanOrEqual(0);
    expect(quiet.serial.indexOf('LAMA-BOOT')).toBeLessThan(quiet.serial.indexOf('lamadist-harness'));
    expect(quiet.timedOut).toBe(false);
    expect(quiet.resets).toBe(0);
    expect(quiet.exitCode).toBeNull();
    expect(quiet.serial).toMatch(/lamadist-harness: console silent for 20 s; stopping the VM \(CPU0 RIP=/);
  });
});
