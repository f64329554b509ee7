import { spawn, type ChildProcess } from 'node:child_process';
import { promises as fs } from 'node:fs';
import { crc32 } from 'node:zlib';
import { onCleanup } from '../util/cleanup.js';
import { missingTool, run } from '../util/proc.js';

/**
 * Real U-Boot in QEMU: Debian's qemu_arm64 build (package u-boot-qemu) on `-M virt`, used to run
 * meta-lamadist's boot.scr the way a U-Boot board does (distro boot finds it on the ESP).
 *
 * That build keeps its environment in the second CFI flash bank (CONFIG_ENV_IS_IN_FLASH,
 * CONFIG_ENV_ADDR=0x4000000, CONFIG_ENV_SIZE=0x40000): a 64 MiB image given as pflash unit 1.
 * Debian 12's QEMU (7.2) has a flash model bug (QEMU issue #2343, fixed upstream by "hw/pflash: fix
 * block write start", not in 7.2.x): of U-Boot's buffered writes only the first write buffer of
 * each flash sector reaches the image, so `saveenv` keeps the CRC and the first 4 KiB of the
 * environment and leaves the rest of the sector erased. `completeEnvWrite` finishes such a write
 * between two QEMU runs: it zero-fills what the model dropped (U-Boot pads the environment with
 * zeros) and accepts the result only when U-Boot's own CRC32 over the whole area then matches, so it
 * can restore only padding, never invent variables. The environment must therefore stay under 4 KiB.
 */

/** Debian's U-Boot for `qemu-system-aarch64 -M virt` (package u-boot-qemu). */
export const UBOOT_QEMU_ARM64 = '/usr/lib/u-boot/qemu_arm64/u-boot.bin';

/** Where Debian's qemu_arm64 U-Boot keeps its environment inside flash bank 1 (bytes). */
export const UBOOT_ENV = { offset: 0, size: 0x40000, flashSize: 64 * 1024 * 1024 } as const;

/** Bytes of a flash sector that QEMU 7.2 keeps from a U-Boot buffered write (one write buffer). */
export const PFLASH_KEPT_BYTES = 0x1000;

/** U-Boot's console prompt (CONFIG_SYS_PROMPT). */
export const UBOOT_PROMPT = '=> ';

/**
 * mkimage argv that turns a U-Boot script into boot.scr, exactly as lamadist-boot-script's
 * do_compile does (`-A ${UBOOT_ARCH} -O linux -T script -C none -n "LamaDist A/B"`). Pure.
 */
export function mkimageScriptArgs(source: string, out: string, arch = 'arm64'): string[] {
  return ['-A', arch, '-O', 'linux', '-T', 'script', '-C', 'none', '-n', 'LamaDist A/B', '-d', source, out];
}

/** Compile a U-Boot script with the real mkimage (package u-boot-tools). */
export async function compileBootScript(source: string, out: string, arch = 'arm64'): Promise<void> {
  await run('mkimage', mkimageScriptArgs(source, out, arch), { userErrorCode: 'LAMA_E_UBOOT_SCRIPT' });
}

export interface UbootVmOptions {
  /** The environment flash image (UBOOT_ENV.flashSize bytes; see createEnvFlash). */
  flash: string;
  /** Raw disk images attached as virtio-blk, in order (virtio 0, 1, …). */
  disks: string[];
  bios?: string;
  memMiB?: number;
}

/**
 * The qemu-system-aarch64 command line (pure). `-no-reboot`: U-Boot's `reset` ends QEMU, so the
 * caller can complete the environment write before the next boot (see the module comment).
 */
export function planUbootQemu(o: UbootVmOptions): string[] {
  const argv = [
    '-machine', 'virt',
    '-cpu', 'cortex-a57',
    '-accel', 'tcg',
    '-m', String(o.memMiB ?? 512),
    '-nodefaults', '-no-user-config',
    '-display', 'none',
    '-monitor', 'none',
    '-serial', 'stdio',
    '-no-reboot',
    '-bios', o.bios ?? UBOOT_QEMU_ARM64,
    '-drive', `if=pflash,format=raw,unit=1,file=${o.flash}`,
  ];
  o.disks.forEach((d, i) => {
    argv.push('-drive', `file=${d},format=raw,if=none,id=disk${i}`, '-device', `virtio-blk-pci,drive=disk${i}`);
  });
  return argv;
}

/** An empty environment flash (reads as a bad CRC, so U-Boot starts from its default environment). */
export async function createEnvFlash(file: string): Promise<void> {
  await fs.writeFile(file, Buffer.alloc(0));
  await fs.truncate(file, UBOOT_ENV.flashSize);
}

/** The environment stored in `area` (CRC + NUL-separated `name=value`), or undefined when the CRC is wrong. */
export function parseUbootEnv(area: Buffer): Record<string, string> | undefined {
  if (area.length < 8 || crc32(area.subarray(4)) !== area.readUInt32LE(0)) return undefined;
  const env: Record<string, string> = {};
  let at = 4;
  while (at < area.length && area[at] !== 0) {
    const end = area.indexOf(0, at);
    const entry = area.subarray(at, end < 0 ? area.length : end).toString('latin1');
    const eq = entry.indexOf('=');
    if (eq > 0) env[entry.slice(0, eq)] = entry.slice(eq + 1);
    at = end < 0 ? area.length : end + 1;
  }
  return env;
}

async function readEnvArea(flash: string): Promise<Buffer> {
  const h = await fs.open(flash, 'r');
  try {
    const area = Buffer.alloc(UBOOT_ENV.size);
    await h.read(area, 0, area.length, UBOOT_ENV.offset);
    return area;
  } finally {
    await h.close();
  }
}

/** The environment U-Boot saved in a flash image, or undefined when none is valid. */
export async function readUbootEnv(flash: string): Promise<Record<string, string> | undefined> {
  return parseUbootEnv(await readEnvArea(flash));
}

/**
 * Finish a `saveenv` that QEMU 7.2's flash model cut short (see the module comment). Returns
 * 'intact' (the stored CRC already matches), 'completed' (zero padding restored, CRC matches now)
 * or 'blank' (nothing saved yet). Throws when U-Boot saved something the padding cannot explain,
 * e.g. an environment larger than the kept 4 KiB.
 */
export async function completeEnvWrite(flash: string): Promise<'intact' | 'completed' | 'blank'> {
  const area = await readEnvArea(flash);
  if (parseUbootEnv(area)) return 'intact';
  const head = area.subarray(0, 8);
  if (head.every((b) => b === 0) || head.every((b) => b === 0xff)) return 'blank';
  const fixed = Buffer.from(area);
  fixed.fill(0, PFLASH_KEPT_BYTES);
  if (!parseUbootEnv(fixed))
    throw new Error(
      `U-Boot's saved environment in ${flash} does not match its CRC even with the padding restored: is it larger than the ${PFLASH_KEPT_BYTES} bytes QEMU's flash model keeps?`,
    );
  const h = await fs.open(flash, 'r+');
  try {
    await h.write(fixed, 0, fixed.length, UBOOT_ENV.offset);
    await h.sync();
  } finally {
    await h.close();
  }
  return 'completed';
}

/** A running U-Boot VM and its serial console. */
export interface UbootSession {
  /** Everything the console printed so far. */
  serial(): string;
  /** Resolve with the first match of `re` in the console after offset `from` (default 0). */
  waitFor(re: RegExp, timeoutMs: number, from?: number): Promise<{ index: number; match: RegExpExecArray }>;
  /** Type on the console. */
  send(text: string): void;
  /** Run one command at the prompt; resolves with its output once the next prompt appears. */
  command(line: string, timeoutMs?: number): Promise<string>;
  /** Resolves with QEMU's exit code once it exits (with -no-reboot: at U-Boot's `reset`). */
  exited: Promise<number | null>;
  /** Kill QEMU (idempotent) and wait for it. */
  stop(): Promise<void>;
}

/** Start U-Boot in QEMU. The caller must `stop()` it (also after `exited`). */
export function startUboot(o: UbootVmOptions): UbootSession {
  const qemu: ChildProcess = spawn('qemu-system-aarch64', planUbootQemu(o), { stdio: ['pipe', 'pipe', 'pipe'] });
  const kill = (): void => {
    if (qemu.exitCode === null && qemu.signalCode === null) qemu.kill('SIGKILL');
  };
  const unregister = onCleanup(kill);
  let text = '';
  let stderr = '';
  const waiters = new Set<() => void>();
  qemu.stdout?.on('data', (c: Buffer) => {
    text += c.toString('latin1');
    for (const w of [...waiters]) w();
  });
  qemu.stderr?.on('data', (c: Buffer) => {
    stderr += c.toString('utf8');
  });
  qemu.stdin?.on('error', () => undefined);
  let done = false;
  const exited = new Promise<number | null>((resolve, reject) => {
    qemu.on('error', (e: NodeJS.ErrnoException) => reject(e.code === 'ENOENT' ? missingTool('qemu-system-aarch64') : e));
    qemu.on('close', (code) => {
      done = true;
      unregister();
      for (const w of [...waiters]) w();
      resolve(code);
    });
  });
  exited.catch(() => undefined);

  const waitFor = (re: RegExp, timeoutMs: number, from = 0): Promise<{ index: number; match: RegExpExecArray }> =>
    new Promise((resolve, reject) => {
      const g = new RegExp(re.source, re.flags.includes('g') ? re.flags : re.flags + 'g');
      const check = (): void => {
        g.lastIndex = from;
        const m = g.exec(text);
        if (m) {
          finish();
          resolve({ index: m.index, match: m });
        } else if (done) {
          finish();
          reject(new Error(`U-Boot VM exited before ${re} appeared; last output:\n${text.slice(-1500)}${stderr}`));
        }
      };
      const timer = setTimeout(() => {
        finish();
        reject(new Error(`timed out after ${timeoutMs} ms waiting for ${re}; last output:\n${text.slice(-1500)}`));
      }, timeoutMs);
      const finish = (): void => {
        clearTimeout(timer);
        waiters.delete(check);
      };
      waiters.add(check);
      check();
    });

  const send = (s: string): void => {
    qemu.stdin?.write(s);
  };

  return {
    serial: () => text,
    waitFor,
    send,
    async command(line, timeoutMs = 30_000) {
      const from = text.length;
      send(`${line}\r`);
      // U-Boot echoes the line; its output ends at the next prompt at the start of a line.
      const echo = await waitFor(new RegExp(escapeRegExp(line)), timeoutMs, from);
      const start = echo.index + echo.match[0].length;
      const prompt = await waitFor(new RegExp(`\\n${escapeRegExp(UBOOT_PROMPT)}`), timeoutMs, start);
      return text.slice(start, prompt.index).replace(/^\r?\n/, '');
    },
    exited,
    async stop() {
      kill();
      await exited.catch(() => undefined);
    },
  };
}

function escapeRegExp(s: string): string {
  return s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
}
