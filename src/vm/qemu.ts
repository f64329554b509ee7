import { spawn } from 'node:child_process';
import { createWriteStream, promises as fs } from 'node:fs';
import path from 'node:path';
import { UserError } from '../errors.js';
import { onCleanup } from '../util/cleanup.js';
import { makeTempDir } from '../util/fsx.js';
import { missingTool } from '../util/proc.js';
import { detectAccel } from './accel.js';
import { hmp } from './qmp.js';

/** A disk attached as virtio-blk. */
export interface QemuDisk {
  path: string;
  readonly?: boolean;
  /** raw (default) or qcow2. */
  format?: 'raw' | 'qcow2';
  /** virtio serial number, visible in the guest as /dev/disk/by-id/virtio-<serial>. */
  serial?: string;
}

/** UEFI firmware: OVMF code (read-only pflash) and a variable store template. */
export interface QemuFirmware {
  code: string;
  vars: string;
  /** Use `vars` in place so variable writes (BootNext, BootOrder) persist across runs; default: a per-VM copy. */
  persistVars?: boolean;
}

/** Host port forwarded to a guest TCP port (user networking). */
export interface HostForward {
  host: number;
  guest: number;
}

export interface QemuOptions {
  /** Direct kernel boot (no firmware needed). */
  kernel?: string;
  initrd?: string;
  append?: string;
  disks?: QemuDisk[];
  firmware?: QemuFirmware;
  /** Secure Boot capable firmware: SMM on and the pflash protected (default: code path contains "secboot"). */
  secureBoot?: boolean;
  /** swtpm TPM2 whose state lives in `stateDir` (kept between runs: the TPM "hardware" of the VM). */
  tpm?: { stateDir: string };
  memMiB?: number;
  cpus?: number;
  /** User networking (default on); the host is 10.0.2.2 from the guest. */
  network?: boolean;
  hostForward?: HostForward[];
  /** MAC address of the virtio NIC (QEMU picks 52:54:00:12:34:56 otherwise). */
  mac?: string;
  /** QEMU exits instead of rebooting the guest. */
  noReboot?: boolean;
  /** Give up (kill the VM) after this long; 0 means no limit. */
  timeoutMs: number;
  /** Stop the VM as soon as the serial console matches. Without it, runQemu waits for QEMU to exit. */
  until?: RegExp | ((serial: string) => boolean);
  /** Append the serial console to this file. */
  serialLog?: string;
  /** Called with each complete serial line. */
  onLine?: (line: string) => void;
  /** Copy of the raw serial output (a terminal, for `lamadist vm run`). */
  echo?: NodeJS.WritableStream;
  /** Keyboard input for the serial console. */
  input?: NodeJS.ReadableStream;
  /** Kill the VM when aborted (power cut at a chosen moment). */
  signal?: AbortSignal;
  /** Accelerator; default from detectAccel() (kvm only when it really boots a kernel). */
  accel?: 'kvm' | 'tcg';
  extraArgs?: string[];
  /**
   * Stop the VM when its serial console has been silent this long (result: `stalled`), after
   * writing where its CPUs were into the serial log. Fails a hung guest fast instead of at the
   * overall timeout.
   */
  stallMs?: number;
  /**
   * After the guest kernel announces a restart, the firmware must print something within this
   * long; otherwise the harness cuts the power and starts QEMU (and swtpm) again on the same disks,
   * variable store and TPM state, as a board's watchdog would reset it. Counted in `resets`. Off by default.
   */
  resetWatchdogMs?: number;
}

/** What a VM run ended with. */
export interface QemuResult {
  serial: string;
  /** `until` matched. */
  matched: boolean;
  /** QEMU's exit code when it exited by itself (guest poweroff, -no-reboot reboot); null when we stopped it. */
  exitCode: number | null;
  timedOut: boolean;
  aborted: boolean;
  durationMs: number;
  /** Stopped because the console stayed silent for `stallMs`. */
  stalled: boolean;
  /** Times the reset watchdog power-cycled a guest that hung on its way through a reboot. */
  resets: number;
  /** The argv QEMU ran with. */
  argv: string[];
}

/** Resolved environment for planQemu: the accelerator and per-VM paths. */
export interface QemuRuntime {
  accel: 'kvm' | 'tcg';
  /** The per-VM variable store (a copy of firmware.vars, or the file itself with persistVars). */
  varsPath?: string;
  tpmSocket?: string;
  /** QMP control socket: lets the harness record where the vCPUs are when a guest hangs. */
  qmpSocket?: string;
}

/** The QEMU command line as data (pure: no files touched). */
export function planQemu(opts: Omit<QemuOptions, 'timeoutMs'>, rt: QemuRuntime): string[] {
  const secureBoot = opts.secureBoot ?? Boolean(opts.firmware && /secboot/.test(path.basename(opts.firmware.code)));
  const machine = `q35${opts.firmware && secureBoot ? ',smm=on' : ''}`;
  const argv = [
    '-machine', machine,
    '-accel', rt.accel,
    '-cpu', rt.accel === 'kvm' ? 'host' : 'max',
    '-smp', String(opts.cpus ?? 2),
    '-m', String(opts.memMiB ?? 1024),
    '-nodefaults', '-no-user-config',
    '-display', 'none',
    '-monitor', 'none',
    '-serial', 'stdio',
    '-rtc', 'base=utc',
    '-device', 'virtio-rng-pci',
  ];
  if (opts.noReboot) argv.push('-no-reboot');
  if (opts.firmware) {
    if (!rt.varsPath) throw new Error('planQemu: firmware given without a variable store path');
    if (secureBoot) argv.push('-global', 'driver=cfi.pflash01,property=secure,value=on');
    argv.push(
      '-drive', `if=pflash,format=raw,unit=0,readonly=on,file=${opts.firmware.code}`,
      '-drive', `if=pflash,format=raw,unit=1,file=${rt.varsPath}`,
    );
  }
  if (opts.kernel) argv.push('-kernel', opts.kernel);
  if (opts.initrd) argv.push('-initrd', opts.initrd);
  if (opts.append !== undefined) argv.push('-append', opts.append);
  (opts.disks ?? []).forEach((d, i) => {
    const drive = [`file=${d.path}`, `format=${d.format ?? 'raw'}`, 'if=none', `id=disk${i}`];
    if (d.readonly) drive.push('readonly=on');
    const dev = ['virtio-blk-pci', `drive=disk${i}`, `bootindex=${i + 1}`];
    if (d.serial) dev.push(`serial=${d.serial}`);
    argv.push('-drive', drive.join(','), '-device', dev.join(','));
  });
  if (opts.tpm) {
    if (!rt.tpmSocket) throw new Error('planQemu: tpm given without a swtpm socket');
    argv.push(
      '-chardev', `socket,id=chrtpm,path=${rt.tpmSocket}`,
      '-tpmdev', 'emulator,id=tpm0,chardev=chrtpm',
      '-device', 'tpm-tis,tpmdev=tpm0',
    );
  }
  if (opts.network ?? true) {
    const fwd = (opts.hostForward ?? []).map((f) => `,hostfwd=tcp:127.0.0.1:${f.host}-:${f.guest}`).join('');
    argv.push('-netdev', `user,id=net0${fwd}`, '-device', `virtio-net-pci,netdev=net0${opts.mac ? `,mac=${opts.mac}` : ''}`);
  }
  if (rt.qmpSocket) argv.push('-qmp', `unix:${rt.qmpSocket},server=on,wait=off`);
  argv.push(...(opts.extraArgs ?? []));
  return argv;
}

/** The swtpm command line for a VM's TPM2 (pure). */
export function planSwtpm(stateDir: string, socket: string, log?: string): string[] {
  const argv = ['socket', '--tpm2', '--tpmstate', `dir=${stateDir}`, '--ctrl', `type=unixio,path=${socket}`, '--terminate'];
  if (log) argv.push('--log', `level=1,file=${log}`);
  return argv;
}

async function waitForSocket(file: string, child: { exitCode: number | null }, ms: number): Promise<void> {
  const end = Date.now() + ms;
  while (Date.now() < end) {
    if (child.exitCode !== null) throw new Error(`swtpm exited with ${child.exitCode} before creating ${file}`);
    if (await fs.stat(file).then((s) => s.isSocket(), () => false)) return;
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error(`swtpm did not create ${file} within ${ms} ms`);
}

async function mustExist(file: string | undefined, what: string): Promise<void> {
  if (file === undefined) return;
  await fs.access(file).catch(() => {
    throw new UserError('LAMA_E_VM_INPUT', `${what} ${file} does not exist`);
  });
}

/**
 * Boot a VM and watch its serial console. Resolves when `until` matches (the VM is then stopped),
 * when QEMU exits by itself, on timeout or on abort. QEMU and swtpm are always killed and the
 * per-VM temp dir (variable store copy, TPM socket) removed, also when lamadist is interrupted.
 */
export async function runQemu(opts: QemuOptions): Promise<QemuResult> {
  await mustExist(opts.kernel, 'kernel');
  await mustExist(opts.initrd, 'initrd');
  await mustExist(opts.firmware?.code, 'firmware code');
  await mustExist(opts.firmware?.vars, 'firmware variable store');
  for (const d of opts.disks ?? []) await mustExist(d.path, 'disk image');

  const tmp = await makeTempDir('lamadist-vm-');
  const kids: import('node:child_process').ChildProcess[] = [];
  const killAll = (): void => {
    for (const k of kids) if (k.exitCode === null && k.signalCode === null) k.kill('SIGKILL');
  };
  // Killed and waited for: swtpm must have let go of its state before another one opens it.
  const powerOff = async (): Promise<void> => {
    killAll();
    await Promise.all(kids.map((k) => (k.exitCode === null && k.signalCode === null ? new Promise((r) => k.once('close', r)) : undefined)));
    kids.length = 0;
  };
  const unregister = onCleanup(killAll);
  try {
    const rt: QemuRuntime = { accel: opts.accel ?? (await detectAccel()), qmpSocket: path.join(tmp.dir, 'qmp.sock') };
    if (opts.firmware) {
      rt.varsPath = opts.firmware.persistVars ? opts.firmware.vars : path.join(tmp.dir, 'OVMF_VARS.fd');
      if (!opts.firmware.persistVars) await fs.copyFile(opts.firmware.vars, rt.varsPath);
    }
    if (opts.tpm) await fs.mkdir(opts.tpm.stateDir, { recursive: true });
    const carry: Carry = { serial: '', resets: 0, started: Date.now() };
    for (let power = 1; ; power++) {
      if (opts.tpm) {
        // A fresh control socket per power-on: swtpm ends with the QEMU that used the last one.
        rt.tpmSocket = path.join(tmp.dir, `swtpm-${power}.sock`);
        const swtpm = spawn('swtpm', planSwtpm(opts.tpm.stateDir, rt.tpmSocket, path.join(tmp.dir, 'swtpm.log')), { stdio: 'ignore' });
        kids.push(swtpm);
        const spawnError = new Promise<never>((_, reject) => swtpm.on('error', (e: NodeJS.ErrnoException) => reject(e.code === 'ENOENT' ? missingTool('swtpm') : e)));
        await Promise.race([waitForSocket(rt.tpmSocket, swtpm, 10_000), spawnError]);
      }
      const argv = planQemu(opts, rt);
      const r = await watch(opts, argv, kids, rt.qmpSocket, carry);
      if (r !== 'power-cycle') return r;
      await powerOff();
      await fs.rm(rt.qmpSocket!, { force: true });
    }
  } finally {
    await powerOff();
    unregister();
    await tmp.remove();
  }
}

/** What a VM run carries over a harness power cycle: the console so far, the count, the start time. */
interface Carry {
  serial: string;
  resets: number;
  started: number;
}

/** The guest kernel's last words before the machine resets (x86 `machine_restart`). */
const RESTART_LINE = /reboot: (?:Restarting system|machine restart)[^\n]*\n?\s*$/;

/** Where each vCPU is, from `info registers -a`: one "CPU#n RIP=..." summary for the serial log. */
async function cpuState(qmpSocket: string | undefined): Promise<string> {
  if (!qmpSocket) return 'no QMP socket';
  try {
    const regs = await hmp(qmpSocket, 'info registers -a', 5_000);
    const rips = [...regs.matchAll(/RIP=([0-9a-f]+)/g)].map((m, i) => `CPU${i} RIP=${m[1]}`);
    return rips.length ? rips.join(' ') : regs.trim().split('\n')[0] ?? '';
  } catch (e) {
    return (e as Error).message;
  }
}

/**
 * One power-on of the VM. Resolves with the run's result, or with 'power-cycle' when the reset
 * watchdog cut the power (the console so far and the count are then in `carry`).
 */
function watch(opts: QemuOptions, argv: string[], kids: import('node:child_process').ChildProcess[], qmpSocket: string | undefined, carry: Carry): Promise<QemuResult | 'power-cycle'> {
  return new Promise((resolve, reject) => {
    const started = carry.started;
    const qemu = spawn('qemu-system-x86_64', argv, { stdio: ['pipe', 'pipe', 'pipe'] });
    kids.push(qemu);
    const log = opts.serialLog ? createWriteStream(opts.serialLog, { flags: 'a' }) : undefined;
    let serial = carry.serial;
    let stderr = '';
    let partial = '';
    let matched = false;
    let timedOut = false;
    let aborted = false;
    let stalled = false;
    let resets = carry.resets;
    let powerCycle = false;
    let settled = false;
    let closed = false;
    const stop = (): void => {
      if (qemu.exitCode === null && qemu.signalCode === null) qemu.kill('SIGKILL');
    };
    // The harness's own notes go into the console record so a failed test shows them in place.
    const note = (text: string): void => {
      // A note computed while QEMU was exiting has nowhere to go: the log stream is closed.
      if (closed) return;
      const line = `lamadist-harness: ${text}`;
      serial += `\r\n${line}\r\n`;
      log?.write(`\r\n${line}\r\n`);
      opts.onLine?.(line);
    };
    let silence: NodeJS.Timeout | undefined;
    let hungReboot: NodeJS.Timeout | undefined;
    const clearWatchdogs = (): void => {
      clearTimeout(silence);
      clearTimeout(hungReboot);
    };
    const armWatchdogs = (): void => {
      clearWatchdogs();
      if (opts.stallMs && opts.stallMs > 0) {
        silence = setTimeout(() => {
          void cpuState(qmpSocket).then((where) => {
            note(`console silent for ${Math.round(opts.stallMs! / 1000)} s; stopping the VM (${where})`);
            stalled = true;
            stop();
          });
        }, opts.stallMs);
      }
      if (opts.resetWatchdogMs && opts.resetWatchdogMs > 0 && RESTART_LINE.test(serial.slice(-200))) {
        hungReboot = setTimeout(() => {
          void cpuState(qmpSocket).then((where) => {
            resets += 1;
            // A power cycle rather than QMP's system_reset: a hang that holds QEMU's main loop
            // (a TPM or firmware flash call that never returns) would not see the reset either.
            note(`no firmware output ${Math.round(opts.resetWatchdogMs! / 1000)} s after the guest restarted (${where}); power-cycling it`);
            powerCycle = true;
            stop();
          });
        }, opts.resetWatchdogMs);
      }
    };
    armWatchdogs();
    const test = (): boolean => (typeof opts.until === 'function' ? opts.until(serial) : opts.until ? opts.until.test(serial) : false);
    qemu.stdout.on('data', (chunk: Buffer) => {
      const text = chunk.toString('utf8');
      serial += text;
      log?.write(chunk);
      opts.echo?.write(chunk);
      partial += text;
      const lines = partial.split(/\r?\n/);
      partial = lines.pop() ?? '';
      for (const l of lines) opts.onLine?.(l);
      if (!matched && opts.until && test()) {
        matched = true;
        stop();
      }
      if (!matched) armWatchdogs();
    });
    qemu.stderr.on('data', (c: Buffer) => {
      stderr += c.toString('utf8');
    });
    qemu.stdin.on('error', () => undefined);
    if (opts.input) opts.input.pipe(qemu.stdin);
    // A timeout of 0 (or Infinity) means none: `lamadist vm run` runs until the guest powers off.
    const timer =
      opts.timeoutMs > 0 && Number.isFinite(opts.timeoutMs)
        ? setTimeout(() => {
            timedOut = true;
            void cpuState(qmpSocket).then((where) => {
              note(`timeout of ${Math.round(opts.timeoutMs / 1000)} s reached; stopping the VM (${where})`);
              stop();
            });
          }, Math.max(0, opts.timeoutMs - (Date.now() - started)))
        : undefined;
    const onAbort = (): void => {
      aborted = true;
      stop();
    };
    if (opts.signal?.aborted) onAbort();
    opts.signal?.addEventListener('abort', onAbort);
    qemu.on('error', (e: NodeJS.ErrnoException) => {
      settled = true;
      clearTimeout(timer);
      clearWatchdogs();
      reject(e.code === 'ENOENT' ? missingTool('qemu-system-x86_64') : e);
    });
    qemu.on('close', (code) => {
      closed = true;
      if (settled) return;
      clearTimeout(timer);
      clearWatchdogs();
      opts.signal?.removeEventListener('abort', onAbort);
      if (opts.input) opts.input.unpipe(qemu.stdin);
      if (partial) opts.onLine?.(partial);
      log?.end();
      if (powerCycle && !matched && !timedOut && !aborted) {
        carry.serial = serial;
        carry.resets = resets;
        resolve('power-cycle');
        return;
      }
      const stoppedByUs = matched || timedOut || aborted || stalled;
      if (!stoppedByUs && code !== 0 && serial.length === 0) {
        reject(new UserError('LAMA_E_VM_START', `qemu-system-x86_64 failed (exit ${code}): ${stderr.trim().split('\n').pop() ?? ''}`));
        return;
      }
      resolve({ serial, matched, exitCode: stoppedByUs ? null : code, timedOut, aborted, stalled, resets, durationMs: Date.now() - started, argv });
    });
  });
}
