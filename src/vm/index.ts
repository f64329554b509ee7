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
 *   timeoutMs, until?, serialLog?, onLine?, echo?, input?, signal?, accel?, stallMs?, resetWatchdogMs? }):
 *   Promise<QemuResult>` — resolves with `{ serial, matched, exitCode, timedOut, aborted, stalled,
 *   resets, durationMs, argv }`; a silent console (`stallMs`) ends the run, silence after the guest's
 *   restart line (`resetWatchdogMs`) gets a power cycle (QEMU and swtpm started again); QEMU and
 *   swtpm are always killed and temp files removed on return, timeout, abort or Ctrl-C.
 * - `planQemu(opts, runtime)`, `planSwtpm(...)`: the command lines as data.
 * - `OVMF`: Debian's firmware paths; `SERIAL_CONSOLE`: kernel arguments for the serial console.
 *
 * Test fixture and emulated device (acceptance tests, bench, `lamadist vm demo`):
 * - `fixtureRootfs({ keyring?, log? })` → `{ dir, kernel }`: debootstrap bookworm + meta-lamadist's
 *   on-target files, cached under ~/.cache/lamadist/rootfs/; `FIXTURE_KERNEL_ARGS`: what its hosts'
 *   command lines carry for SELinux (the distribution's UKI command line) and auditing.
 * - `fixtureInitramfs(kernel, out)`: meta-lamadist's lamadist-init with its tools and modules.
 * - `prepareDevice({ dir, hostname?, machineId?, encrypt? })` → Device (keys, disk, enrolled vars, TPM dir).
 * - `bootDevice(device, { mode: 'secure' | 'direct', timeoutMs?, serialLog?, until? })` → QemuResult +
 *   `report`; the OVMF variable store persists (boot entries, BootOrder, BootNext) like the TPM.
 * - `parseSlots(serial)` → `{ health, version, booted, state: { A, B }, efi, var_marker }` after the health check.
 *
 * Over the air (acceptance 2 and 3, `lamadist vm demo`):
 * - `prepareFleetDevice({ dir, hostname, machineId?, pollSeconds?, log? })` → `{ device, server, fleet,
 *   controllerId, serverCert }`: keys, update server in this process (guest: 10.0.2.2), the device
 *   registered and built with its bundle key and hawkbit.conf provisioned through the ESP.
 * - `rollOutRelease(fd, { version, failHealth?, log? })` → `{ release, releaseId, rolloutId }`.
 * - `fixtureBundle({ device, version, failHealth?, out, recipients?, log? })` → FixtureRelease.
 * - `watchDevice(device, { timeoutMs, serialLog?, onLine?, input? })` → `{ waitFor(re, from?), serial(), stop() }`.
 * - `otaMilestones(from, to, fromSlot)`, `matchAfter(text, re, from?)`: the update as the console shows it.
 *
 * A fleet from blank machines (issue 13: provision → installer stick → updates by tag):
 * - `blankMachine({ dir, name, smbiosUuid, diskBytes })` → FleetMachine: blank drive, setup-mode NVRAM, new TPM2.
 * - `installFromStick(machine, stick, { timeoutMs, serialLog?, signal? })` → QemuResult + `installed`, `error`.
 * - `fleetRelease({ dir, keys, inventory, version, out, recipients })`: a release for every inventory host.
 * - `startFleetServer(dir, keys, pollSeconds, log)` → `{ server, fleet, serverCert, adminTokenFile }`.
 * - `oneHostFleet({ dir, host, tag, payload?, timeoutMs, log })` → `{ fleet, steps }`: keys, host and
 *   server; release 1 and `provision --installer`; a blank machine installed from the stick
 *   (`vm demo` and `npm run bench ota`).
 *
 * Faults (acceptance 4a and 5):
 * - `tamperSlot({ disk, plan }, slot, { imageOffset? })` → Tamper: one byte of a slot's root image flipped on the disk.
 * - `readBootVariables(vars)` / `parseBootVariables(store)` → `{ order, next?, entries }`; `setBootNext(vars, slot)`;
 *   `slotEntry(bootVars, slot)`: the device's OVMF store while it is off.
 * - `cutPower(hooks => bootDevice(dev, { ...hooks }), { name, after, delayMs? })`: SIGKILL at a console marker.
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

export { OVMF, SERIAL_CONSOLE } from './constants.js';
export { fixtureRootfs, fixtureInitramfs, repoRoot, FIXTURE_PACKAGES, FIXTURE_KERNEL_ARGS, ON_TARGET_FILES, type FixtureRootfs } from './fixture.js';
export { prepareDevice, bootDevice, parseReport, parseSlots, DEVICE_SIZES, type Device, type BootableDevice, type BootMode, type SlotsReport } from './device.js';
export { blankMachine, installFromStick, fleetRelease, oneHostFleet, FLEET_SIZES, type FleetMachine, type InstallRun, type OneHostFleet } from './fleet.js';
export { fixtureBundle, fixtureRelease, startFleetServer, fixtureVariant, planVariant, prepareFleetDevice, rollOutRelease, SERVER_KEY_NAME, matchAfter, otaMilestones, watchDevice, type FleetDevice, type OtaMilestone, type DeviceWatch, FAILING_HEALTH_CHECK, type FixtureRelease, type VariantSpec } from './ota.js';
export { tamperSlot, slotByteOffset, parseBootVariables, readBootVariables, setBootNext, slotEntry, cutPower, SUPERBLOCK_OFFSET, type Tamper, type BootVariables, type CutPoint, type PowerCutRecord, type RunHooks } from './faults.js';
export { streamingRauc, debSrcSources, RAUC_CONFIGURE_FLAGS, type StreamingRauc } from './rauc.js';
export { UBOOT_QEMU_ARM64, UBOOT_ENV, UBOOT_PROMPT, PFLASH_KEPT_BYTES, mkimageScriptArgs, compileBootScript, planUbootQemu, createEnvFlash, parseUbootEnv, readUbootEnv, completeEnvWrite, startUboot, type UbootVmOptions, type UbootSession } from './uboot.js';
