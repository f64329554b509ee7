import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { UserError, isErrno } from '../errors.js';
import { run } from '../util/proc.js';

/** A Debian kernel unpacked into the cache, ready for `-kernel` and for initramfs modules. */
export interface DebianKernel {
  /** Path of the bzImage. */
  vmlinuz: string;
  /** Kernel release (`uname -r`), e.g. 6.1.0-56-amd64. */
  version: string;
  /** Debian package version, e.g. 6.1.192-2. */
  debVersion: string;
  /** lib/modules/<version> of the unpacked package. */
  modulesDir: string;
}

/** ~/.cache/lamadist (or $XDG_CACHE_HOME/lamadist), where downloaded and built artefacts live. */
export function cacheRoot(): string {
  const base = process.env.XDG_CACHE_HOME || path.join(os.homedir(), '.cache');
  return path.join(base, 'lamadist');
}

/** Resolve which linux-image-<release>-amd64 the metapackage points at, and its version. */
async function resolveKernelPackage(meta: string): Promise<{ pkg: string; version: string }> {
  const depends = await run('apt-cache', ['depends', meta], { allowFailure: true });
  const pkg = /Depends: (linux-image-[^\s]+)/.exec(depends.stdout)?.[1];
  if (!pkg) throw new UserError('LAMA_E_KERNEL_PACKAGE', `apt-cache does not know ${meta} (run apt-get update)`);
  const show = await run('apt-cache', ['show', '--no-all-versions', pkg], { allowFailure: true });
  const version = /^Version: (.+)$/m.exec(show.stdout)?.[1];
  if (!version) throw new UserError('LAMA_E_KERNEL_PACKAGE', `apt-cache has no version for ${pkg}`);
  return { pkg, version: version.trim() };
}

async function cachedKernel(dir: string): Promise<DebianKernel | undefined> {
  try {
    const info = JSON.parse(await fs.readFile(path.join(dir, 'kernel.json'), 'utf8')) as Omit<DebianKernel, 'vmlinuz' | 'modulesDir'>;
    return {
      ...info,
      vmlinuz: path.join(dir, 'boot', `vmlinuz-${info.version}`),
      modulesDir: path.join(dir, 'lib', 'modules', info.version),
    };
  } catch (err) {
    if (isErrno(err, 'ENOENT')) return undefined;
    throw err;
  }
}

/** Newest kernel already in the cache, for hosts where apt cannot answer (offline). */
async function newestCached(root: string): Promise<DebianKernel | undefined> {
  const names = await fs.readdir(root).catch(() => [] as string[]);
  const found: { k: DebianKernel; mtime: number }[] = [];
  for (const n of names.filter((x) => !x.startsWith('.'))) {
    const k = await cachedKernel(path.join(root, n));
    if (k) found.push({ k, mtime: (await fs.stat(path.join(root, n))).mtimeMs });
  }
  found.sort((a, b) => b.mtime - a.mtime);
  return found[0]?.k;
}

/**
 * Debian bookworm's `linux-image-amd64` kernel, fetched with `apt-get download` (no host install)
 * and unpacked with `dpkg-deb -x` into ~/.cache/lamadist/kernel/<package>_<version>/. The cache is
 * keyed by the package version, so a new Debian kernel is fetched once and then reused; when apt
 * has no package lists, `apt-get update` runs once; when apt cannot answer at all, the newest
 * cached kernel is used.
 */
export async function debianKernel(options: { metaPackage?: string } = {}): Promise<DebianKernel> {
  const meta = options.metaPackage ?? 'linux-image-amd64';
  const root = path.join(cacheRoot(), 'kernel');
  let resolved: { pkg: string; version: string };
  try {
    resolved = await resolveKernelPackage(meta);
  } catch (first) {
    const update = await run('apt-get', ['update', '-qq'], { allowFailure: true });
    try {
      if (update.code !== 0) throw first;
      resolved = await resolveKernelPackage(meta);
    } catch (err) {
      const cached = await newestCached(root);
      if (cached) return cached;
      throw err;
    }
  }
  const key = `${resolved.pkg}_${resolved.version}`.replace(/[^A-Za-z0-9._+-]/g, '_');
  const dir = path.join(root, key);
  const hit = await cachedKernel(dir);
  if (hit) return hit;

  await fs.mkdir(root, { recursive: true });
  const tmp = await fs.mkdtemp(path.join(root, '.fetch-'));
  try {
    // apt drops privileges to _apt for downloads; a root-owned 0700 temp dir would make it warn.
    await fs.chmod(tmp, 0o755);
    await run('apt-get', ['download', '-q', `${resolved.pkg}=${resolved.version}`], {
      cwd: tmp,
      userErrorCode: 'LAMA_E_KERNEL_DOWNLOAD',
    });
    const deb = (await fs.readdir(tmp)).find((f) => f.endsWith('.deb'));
    if (!deb) throw new UserError('LAMA_E_KERNEL_DOWNLOAD', `apt-get download ${resolved.pkg} produced no .deb`);
    const tree = path.join(tmp, 'tree');
    await run('dpkg-deb', ['-x', path.join(tmp, deb), tree]);
    const release = resolved.pkg.replace(/^linux-image-/, '');
    await fs.access(path.join(tree, 'boot', `vmlinuz-${release}`)).catch(() => {
      throw new UserError('LAMA_E_KERNEL_PACKAGE', `${deb} contains no boot/vmlinuz-${release}`);
    });
    const info = { version: release, debVersion: resolved.version };
    await fs.writeFile(path.join(tree, 'kernel.json'), JSON.stringify(info, null, 2) + '\n');
    try {
      await fs.rename(tree, dir);
    } catch (err) {
      // Another process unpacked the same kernel first; theirs is as good as ours.
      if (!isErrno(err, 'ENOTEMPTY') && !isErrno(err, 'EEXIST')) throw err;
    }
  } finally {
    await fs.rm(tmp, { recursive: true, force: true });
  }
  const done = await cachedKernel(dir);
  if (!done) throw new Error(`kernel cache ${dir} is incomplete`);
  return done;
}
