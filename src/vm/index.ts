/**
 * The emulated LamaDist device: Debian guest kernel, initramfs builder and QEMU/OVMF/swtpm launcher.
 *
 * Guest kit (used by the disk and boot capabilities' guest tests):
 * - `debianKernel(): Promise<{ vmlinuz, version, debVersion, modulesDir }>` — Debian's
 *   linux-image-amd64 via `apt-get download`, unpacked into ~/.cache/lamadist/kernel/, cached per version.
 * - `buildInitramfs({ init, binaries?, modules?, modulesDir?, files?, out }): Promise<string>` —
 *   gzip newc cpio with busybox-static (merged /usr, /bin/sh), host binaries + their libraries,
 *   kernel modules + dependencies. In the guest, load modules with
 *   `modprobe -a virtio_blk dm_verity` (busybox modprobe reads the generated modules.dep) or
 *   insmod each line of /lib/modules/$(uname -r)/modules.load, which is in dependency order.
 * - `runQemu({ kernel?, initrd?, append?, disks?, firmware?: { code, vars, persistVars? },
 *   secureBoot?, tpm?: { stateDir }, memMiB?, cpus?, hostForward?: { host, guest }[], noReboot?,
 *   timeoutMs, until?, serialLog?, onLine?, echo?, input?, signal?, accel? }): Promise<QemuResult>`
 *   — resolves with `{ serial, matched, exitCode, timedOut, aborted, durationMs, argv }`; QEMU and
 *   swtpm are always killed and temp files removed on return, timeout, abort or Ctrl-C.
 * - `planQemu(opts, runtime)`, `planSwtpm(...)`: the command lines as data.
 * - `OVMF`: Debian's firmware paths; `SERIAL_CONSOLE`: kernel arguments for the serial console.
 */
export { debianKernel, cacheRoot, type DebianKernel } from './kernel.js';
export { buildInitramfs, gatherInitramfs, planInitramfs, parseLdd, mergedPath, type InitramfsSpec, type InitramfsFile } from './initramfs.js';
export { encodeNewc, type CpioEntry } from './cpio.js';
export { resolveModules, readModinfo, moduleDeps, modulesDepText, type ResolvedModule } from './modules.js';
export {
  runQemu,
  planQemu,
  planSwtpm,
  type QemuOptions,
  type QemuResult,
  type QemuDisk,
  type QemuFirmware,
  type HostForward,
  type QemuRuntime,
} from './qemu.js';
export { detectAccel } from './accel.js';

/** Debian 12's OVMF builds (package ovmf). */
export const OVMF = {
  /** Secure Boot capable code (needs SMM; runQemu turns it on). */
  secbootCode: '/usr/share/OVMF/OVMF_CODE_4M.secboot.fd',
  code: '/usr/share/OVMF/OVMF_CODE_4M.fd',
  /** Empty variable store (Secure Boot not enrolled). */
  vars: '/usr/share/OVMF/OVMF_VARS_4M.fd',
  /** Variable store with Microsoft's keys enrolled (Secure Boot on, our keys refused). */
  msVars: '/usr/share/OVMF/OVMF_VARS_4M.ms.fd',
} as const;

/** Kernel arguments that put the console on the VM's serial port (what runQemu streams). */
export const SERIAL_CONSOLE = 'console=ttyS0,115200';
