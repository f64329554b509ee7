import { promises as fs } from 'node:fs';
import path from 'node:path';
import { promisify } from 'node:util';
import { gzip } from 'node:zlib';
import { UserError } from '../errors.js';
import { writeFileAtomic } from '../util/fsx.js';
import { hasTool, missingTool, run } from '../util/proc.js';
import { encodeNewc, type CpioEntry } from './cpio.js';
import { debianKernel } from './kernel.js';
import { modulesAliasText, modulesDepText, resolveModules, type ResolvedModule } from './modules.js';

/** Content of an extra initramfs file: text or bytes (mode 0755 when it starts with "#!"), or explicit. */
export type InitramfsFile = string | Buffer | { data: string | Buffer; mode: number };

export interface InitramfsSpec {
  /** The /init script, run by busybox sh (`#!/bin/sh` is added when missing). */
  init: string;
  /** Host programs or shared objects (name on PATH or absolute path), copied with their ldd-resolved libraries. */
  binaries?: string[];
  /** Kernel module names; dependencies are resolved and a modules.dep for busybox modprobe is written. */
  modules?: string[];
  /** lib/modules/<version> the modules come from (default: the Debian kernel from debianKernel()). */
  modulesDir?: string;
  /** Extra files by guest path. */
  files?: Record<string, InitramfsFile>;
  /** Where the gzip-compressed newc archive is written (replaced atomically if it exists). */
  out: string;
}

/** The host pieces an initramfs is made of, gathered before any bytes are laid out. */
export interface InitramfsInputs {
  init: string;
  busyboxApplets: string[];
  /** Guest path → host file whose content is copied (executables and libraries). */
  hostFiles: Map<string, { source: string; mode: number }>;
  modules: { version: string; dir: string; list: ResolvedModule[] };
  files: Record<string, InitramfsFile>;
}

const BUSYBOX = '/usr/bin/busybox';

/** Merged-/usr layout: /bin, /sbin, /lib, /lib64 are symlinks into /usr, as on Debian 12 hosts. */
const MERGED = ['bin', 'sbin', 'lib', 'lib64'];

/** Map a host path to its place under /usr in the merged layout (so /lib64/ld-linux… resolves). */
export function mergedPath(p: string): string {
  const norm = path.posix.normalize(p);
  const top = norm.split('/')[1] ?? '';
  return MERGED.includes(top) ? `/usr${norm}` : norm;
}

/** Libraries named by `ldd` output (including the dynamic loader); throws when one is missing. */
export function parseLdd(output: string, binary: string): string[] {
  const libs: string[] = [];
  for (const raw of output.split('\n')) {
    const line = raw.trim();
    if (!line || line.startsWith('linux-vdso') || line.includes('not a dynamic executable') || line.startsWith('statically linked')) continue;
    const missing = /^(\S+) => not found/.exec(line);
    if (missing) throw new UserError('LAMA_E_INITRAMFS', `${binary} needs ${missing[1]}, which is not installed`);
    const arrow = /=> (\/\S+)/.exec(line);
    const direct = /^(\/\S+)\s/.exec(line);
    const lib = arrow?.[1] ?? direct?.[1];
    if (lib) libs.push(lib);
  }
  return libs;
}

async function locate(binary: string): Promise<string> {
  if (binary.includes('/')) {
    await fs.access(binary).catch(() => {
      throw new UserError('LAMA_E_INITRAMFS', `${binary} does not exist on this host`);
    });
    return binary;
  }
  for (const dir of ['/usr/local/sbin', '/usr/local/bin', '/usr/sbin', '/usr/bin', '/sbin', '/bin']) {
    const p = path.join(dir, binary);
    if (await hasTool(p)) return p;
  }
  throw missingTool(binary);
}

/** Gather everything the initramfs needs from the host: busybox applets, binaries + libraries, modules. */
export async function gatherInitramfs(spec: Omit<InitramfsSpec, 'out'>): Promise<InitramfsInputs> {
  if (!(await hasTool(BUSYBOX))) throw missingTool('busybox');
  const list = await run(BUSYBOX, ['--list-full']);
  const busyboxApplets = list.stdout.split('\n').filter(Boolean).map((a) => mergedPath(`/${a}`));

  const hostFiles = new Map<string, { source: string; mode: number }>();
  for (const b of spec.binaries ?? []) {
    const bin = await locate(b);
    hostFiles.set(mergedPath(bin), { source: bin, mode: 0o755 });
    const ldd = await run('ldd', [bin], { allowFailure: true });
    for (const lib of parseLdd(ldd.stdout, bin)) hostFiles.set(mergedPath(lib), { source: lib, mode: 0o755 });
  }

  let modules: InitramfsInputs['modules'] = { version: '', dir: '', list: [] };
  if (spec.modules && spec.modules.length > 0) {
    const dir = spec.modulesDir ?? (await debianKernel()).modulesDir;
    modules = { version: path.basename(dir), dir, list: await resolveModules(dir, spec.modules) };
  }
  return { init: spec.init, busyboxApplets, hostFiles, modules, files: spec.files ?? {} };
}

function fileEntry(p: string, f: InitramfsFile): { path: string; data: Buffer; mode: number } {
  if (typeof f === 'object' && !Buffer.isBuffer(f)) return { path: p, data: Buffer.from(f.data), mode: f.mode };
  const data = Buffer.from(f);
  return { path: p, data, mode: data.subarray(0, 2).toString() === '#!' ? 0o755 : 0o644 };
}

/**
 * Lay out the initramfs tree (pure apart from reading the gathered host files): merged-/usr
 * skeleton, /dev/console and /dev/null nodes (the kernel opens the console before /init runs),
 * busybox and its applet links, binaries and libraries, modules with a modules.dep, extra files
 * and /init. Later sources win over earlier ones for the same path, so a host binary replaces a
 * busybox applet of the same name.
 */
export async function planInitramfs(inputs: InitramfsInputs): Promise<CpioEntry[]> {
  const byPath = new Map<string, CpioEntry>();
  const put = (e: CpioEntry): void => {
    byPath.set(mergedPath(e.path), { ...e, path: mergedPath(e.path) } as CpioEntry);
  };
  for (const d of ['/dev', '/proc', '/sys', '/run', '/tmp', '/etc', '/root', '/mnt', '/newroot', '/usr/bin', '/usr/sbin', '/usr/lib', '/usr/lib64', '/var']) {
    put({ type: 'dir', path: d, mode: d === '/tmp' ? 0o1777 : 0o755 });
  }
  for (const m of MERGED) byPath.set(`/${m}`, { type: 'symlink', path: `/${m}`, target: `usr/${m}` });
  put({ type: 'char', path: '/dev/console', major: 5, minor: 1, mode: 0o600 });
  put({ type: 'char', path: '/dev/null', major: 1, minor: 3, mode: 0o666 });
  put({ type: 'file', path: BUSYBOX, mode: 0o755, data: await fs.readFile(BUSYBOX) });
  for (const a of inputs.busyboxApplets) {
    if (a === BUSYBOX) continue;
    put({ type: 'symlink', path: a, target: path.posix.relative(path.posix.dirname(a), BUSYBOX) });
  }
  for (const [guest, f] of inputs.hostFiles) put({ type: 'file', path: guest, mode: f.mode, data: await fs.readFile(f.source) });
  if (inputs.modules.list.length > 0) {
    const base = `/usr/lib/modules/${inputs.modules.version}`;
    for (const m of inputs.modules.list) {
      put({ type: 'file', path: `${base}/${m.rel}`, mode: 0o644, data: await fs.readFile(path.join(inputs.modules.dir, m.rel)) });
    }
    put({ type: 'file', path: `${base}/modules.dep`, mode: 0o644, data: Buffer.from(modulesDepText(inputs.modules.list)) });
    put({ type: 'file', path: `${base}/modules.alias`, mode: 0o644, data: Buffer.from(modulesAliasText(inputs.modules.list)) });
    // Dependencies first: `for m in $(cat …/modules.load); do insmod …; done` works without modprobe.
    put({ type: 'file', path: `${base}/modules.load`, mode: 0o644, data: Buffer.from(inputs.modules.list.map((m) => `${m.rel}\n`).join('')) });
  }
  for (const [p, f] of Object.entries(inputs.files)) put({ type: 'file', ...fileEntry(p, f) });
  const init = inputs.init.startsWith('#!') ? inputs.init : `#!/bin/sh\n${inputs.init}`;
  put({ type: 'file', path: '/init', mode: 0o755, data: Buffer.from(init) });
  return withParents([...byPath.values()]);
}

/** Add missing parent directories and sort so every parent precedes its children. */
function withParents(entries: CpioEntry[]): CpioEntry[] {
  const have = new Set(entries.map((e) => e.path));
  const all = [...entries];
  for (const e of entries) {
    for (let d = path.posix.dirname(e.path); d !== '/'; d = path.posix.dirname(d)) {
      if (have.has(d)) continue;
      have.add(d);
      all.push({ type: 'dir', path: d, mode: 0o755 });
    }
  }
  const depth = (p: string): number => p.split('/').length;
  return all.sort((a, b) => depth(a.path) - depth(b.path) || (a.path < b.path ? -1 : a.path > b.path ? 1 : 0));
}

/**
 * Build a gzip-compressed newc initramfs for a Debian kernel: busybox-static provides /bin/sh and
 * the applets, `binaries` come with their shared libraries and the dynamic loader, `modules` with
 * their dependencies (a modules.dep for `modprobe` and a dependency-ordered modules.load for plain
 * insmod). Returns `out`.
 */
export async function buildInitramfs(spec: InitramfsSpec): Promise<string> {
  const entries = await planInitramfs(await gatherInitramfs(spec));
  const data = await promisify(gzip)(encodeNewc(entries), { level: 6 });
  await writeFileAtomic(spec.out, data, { force: true });
  return spec.out;
}
