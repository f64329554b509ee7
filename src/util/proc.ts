import { spawn, type SpawnOptions } from 'node:child_process';
import { UserError } from '../errors.js';
import { onCleanup } from './cleanup.js';

/** Which Debian package provides each external tool, so "missing tool" errors say how to fix them. */
export const TOOL_PACKAGES: Record<string, string> = {
  veritysetup: 'cryptsetup-bin',
  cryptsetup: 'cryptsetup-bin',
  sgdisk: 'gdisk',
  sfdisk: 'fdisk',
  'mkfs.erofs': 'erofs-utils',
  'fsck.erofs': 'erofs-utils',
  'dump.erofs': 'erofs-utils',
  setfattr: 'attr',
  mksquashfs: 'squashfs-tools',
  unsquashfs: 'squashfs-tools',
  'mkfs.vfat': 'dosfstools',
  mcopy: 'mtools',
  mmd: 'mtools',
  mdir: 'mtools',
  'mkfs.ext4': 'e2fsprogs',
  debugfs: 'e2fsprogs',
  tar: 'tar',
  'systemd-dissect': 'systemd-container',
  rauc: 'rauc',
  casync: 'casync',
  sbverify: 'sbsigntool',
  sbsign: 'sbsigntool',
  objcopy: 'binutils',
  objdump: 'binutils',
  openssl: 'openssl',
  gpg: 'gnupg',
  'qemu-system-x86_64': 'qemu-system-x86',
  'qemu-system-aarch64': 'qemu-system-arm',
  mkimage: 'u-boot-tools',
  'qemu-img': 'qemu-utils',
  swtpm: 'swtpm',
  swtpm_setup: 'swtpm-tools',
  debootstrap: 'debootstrap',
  busybox: 'busybox-static',
  podman: 'podman',
  git: 'git',
  cpio: 'cpio',
  zstd: 'zstd',
  'apt-get': 'apt',
  'apt-cache': 'apt',
  'dpkg-deb': 'dpkg',
  ldd: 'libc-bin',
  chromium: 'chromium',
  nginx: 'nginx-light',
};

export interface RunOptions {
  cwd?: string;
  env?: NodeJS.ProcessEnv;
  /** Bytes to write to stdin. */
  input?: string | Uint8Array;
  /** Throw a UserError with this code when the tool exits non-zero (default: internal error). */
  userErrorCode?: `LAMA_E_${string}`;
  /** Do not throw on a non-zero exit; the caller inspects `code`. */
  allowFailure?: boolean;
  /** Kill the process after this many milliseconds. */
  timeoutMs?: number;
  /** Stream stdout/stderr lines to these callbacks as they arrive (output is still collected). */
  onStdoutLine?: (line: string) => void;
  onStderrLine?: (line: string) => void;
  /** Pass the terminal through (interactive shells); nothing is collected. */
  inherit?: boolean;
}

export interface RunResult {
  code: number;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
  stdoutBuffer: Buffer;
}

/** Raised (internally) when a tool is not installed; converted to a UserError naming the package. */
export function missingTool(cmd: string): UserError {
  const pkg = TOOL_PACKAGES[cmd];
  const fix = pkg ? `install it with: apt-get install ${pkg} (or run scripts/setup)` : 'install it and retry';
  return new UserError('LAMA_E_TOOL_MISSING', `required tool '${cmd}' is not installed; ${fix}`);
}

function splitLines(cb: (line: string) => void): (chunk: Buffer) => void {
  let rest = '';
  return (chunk) => {
    rest += chunk.toString('utf8');
    const parts = rest.split(/\r?\n|\r/);
    rest = parts.pop() ?? '';
    for (const p of parts) cb(p);
  };
}

/**
 * Run an external tool without a shell (argv only, so no quoting bugs or injection). The child is
 * killed if lamadist exits or is interrupted while it runs.
 */
export function run(cmd: string, args: readonly string[], options: RunOptions = {}): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const spawnOptions: SpawnOptions = {
      cwd: options.cwd,
      env: options.env ?? process.env,
      stdio: options.inherit ? 'inherit' : ['pipe', 'pipe', 'pipe'],
      detached: false,
    };
    const child = spawn(cmd, args, spawnOptions);
    const unregister = onCleanup(() => {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGTERM');
    });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    const outLine = options.onStdoutLine ? splitLines(options.onStdoutLine) : undefined;
    const errLine = options.onStderrLine ? splitLines(options.onStderrLine) : undefined;
    child.stdout?.on('data', (c: Buffer) => {
      out.push(c);
      outLine?.(c);
    });
    child.stderr?.on('data', (c: Buffer) => {
      err.push(c);
      errLine?.(c);
    });
    let timer: NodeJS.Timeout | undefined;
    let timedOut = false;
    if (options.timeoutMs) {
      timer = setTimeout(() => {
        timedOut = true;
        child.kill('SIGKILL');
      }, options.timeoutMs);
    }
    child.on('error', (e: NodeJS.ErrnoException) => {
      unregister();
      if (timer) clearTimeout(timer);
      if (e.code === 'ENOENT') reject(missingTool(cmd));
      else reject(e);
    });
    if (child.stdin) {
      child.stdin.on('error', () => undefined);
      if (options.input !== undefined) child.stdin.end(options.input);
      else child.stdin.end();
    }
    child.on('close', (code, signal) => {
      unregister();
      if (timer) clearTimeout(timer);
      const stdoutBuffer = Buffer.concat(out);
      const result: RunResult = {
        code: code ?? 128,
        signal,
        stdout: stdoutBuffer.toString('utf8'),
        stderr: Buffer.concat(err).toString('utf8'),
        stdoutBuffer,
      };
      if (timedOut) {
        reject(new Error(`${cmd} timed out after ${options.timeoutMs} ms`));
        return;
      }
      if (result.code !== 0 && !options.allowFailure) {
        const last = result.stderr.trim().split('\n').pop() ?? '';
        const msg = `${cmd} ${args.join(' ')} failed with exit ${result.code}${last ? `: ${last}` : ''}`;
        reject(options.userErrorCode ? new UserError(options.userErrorCode, msg) : new Error(msg));
        return;
      }
      resolve(result);
    });
  });
}

/** True when `cmd` is found on PATH (or is an existing path). */
export async function hasTool(cmd: string): Promise<boolean> {
  const { access, constants } = await import('node:fs/promises');
  const path = await import('node:path');
  if (cmd.includes('/')) {
    return access(cmd, constants.X_OK).then(
      () => true,
      () => false,
    );
  }
  for (const dir of (process.env.PATH ?? '').split(':')) {
    if (!dir) continue;
    const ok = await access(path.join(dir, cmd), constants.X_OK).then(
      () => true,
      () => false,
    );
    if (ok) return true;
  }
  return false;
}
