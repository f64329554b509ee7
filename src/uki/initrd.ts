import { promises as fs } from 'node:fs';
import { gunzipSync } from 'node:zlib';
import { isErrno } from '../errors.js';
import { run } from '../util/proc.js';

/**
 * The os-release a UKI's `.osrel` defaults to, as ukify chooses it: the initrd's own (the system the
 * UKI boots into describes itself there), else the running system's. Initrds are read the way the
 * kernel unpacks them: newc cpio archives one after another, each possibly compressed, later files
 * replacing earlier ones.
 */

/** Where an os-release lives, in the order systemd reads them. */
const OS_RELEASE_PATHS = ['etc/os-release', 'usr/lib/os-release'];
const HOST_OS_RELEASE = ['/etc/os-release', '/usr/lib/os-release'];

const S_IFMT = 0o170000;
const S_IFLNK = 0o120000;

type Tree = Map<string, { link: boolean; data: Buffer }>;

/** Parse one newc archive at `at` into `tree`; returns the offset after its trailer, or why it cannot. */
function readNewc(buf: Buffer, at: number, tree: Tree): number | string {
  for (;;) {
    if (at + 110 > buf.length) return `cpio archive cut off at byte ${at}`;
    const magic = buf.toString('latin1', at, at + 6);
    if (magic !== '070701' && magic !== '070702') return `no cpio header at byte ${at}`;
    const field = (i: number): number =>
      Number.parseInt(buf.toString('latin1', at + 6 + i * 8, at + 14 + i * 8), 16);
    const mode = field(1);
    const size = field(6);
    const nameSize = field(11);
    if (![mode, size, nameSize].every(Number.isFinite) || nameSize < 1)
      return `bad cpio header at byte ${at}`;
    const nameEnd = at + 110 + nameSize;
    const dataStart = Math.ceil(nameEnd / 4) * 4;
    const next = Math.ceil((dataStart + size) / 4) * 4;
    if (dataStart + size > buf.length) return `cpio entry at byte ${at} cut off`;
    const name = buf.toString('utf8', at + 110, nameEnd - 1);
    if (name === 'TRAILER!!!') return next;
    tree.set(name.replace(/^(\.?\/)+/, ''), {
      link: (mode & S_IFMT) === S_IFLNK,
      data: buf.subarray(dataStart, dataStart + size),
    });
    at = next;
  }
}

/** Compression the kernel's initramfs unpacker accepts, by magic; only some are readable here. */
function compressionAt(buf: Buffer, at: number): string | undefined {
  const m = (bytes: number[]): boolean => bytes.every((b, i) => buf[at + i] === b);
  if (m([0x1f, 0x8b])) return 'gzip';
  if (m([0x28, 0xb5, 0x2f, 0xfd])) return 'zstd';
  if (m([0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00])) return 'xz';
  if (m([0x42, 0x5a, 0x68])) return 'bzip2';
  if (m([0x02, 0x21, 0x4c, 0x18])) return 'lz4';
  if (m([0x89, 0x4c, 0x5a, 0x4f])) return 'lzo';
  if (m([0x5d, 0x00, 0x00])) return 'lzma';
  return undefined;
}

async function decompress(kind: string, data: Buffer): Promise<Buffer | undefined> {
  // Node 20's zlib has no zstd or xz; the Debian tools do, and the kernel's unpacker stops at the
  // end of the compressed stream just as they do.
  if (kind === 'gzip') return gunzipSync(data);
  if (kind !== 'zstd' && kind !== 'xz') return undefined;
  const r = await run(kind, ['-dc', '-q'], { input: data, allowFailure: true });
  return r.stdoutBuffer.length > 0 ? r.stdoutBuffer : undefined;
}

/** Every file of a (possibly concatenated, possibly compressed) initramfs, or why it cannot be read. */
async function readInitramfs(initrd: Buffer): Promise<Tree | string> {
  const tree: Tree = new Map();
  let buf = initrd;
  let at = 0;
  while (at < buf.length) {
    if (buf[at] === 0) {
      at++;
      continue;
    }
    const magic = buf.toString('latin1', at, at + 6);
    if (magic === '070701' || magic === '070702') {
      const next = readNewc(buf, at, tree);
      if (typeof next === 'string') return next;
      at = next;
      continue;
    }
    const kind = compressionAt(buf, at);
    if (!kind) return `not a cpio archive (byte ${at})`;
    let plain: Buffer | undefined;
    try {
      plain = await decompress(kind, buf.subarray(at));
    } catch (e) {
      return `${kind} data at byte ${at} does not decompress (${(e as Error).message})`;
    }
    if (!plain) return `${kind}-compressed part at byte ${at} cannot be read here`;
    // A compressed archive ends the initramfs (whatever follows it is padding), so go on inside it.
    buf = plain;
    at = 0;
  }
  return tree;
}

/** Follow symlinks inside the initramfs tree (os-release is usually a link to initrd-release). */
function lookup(tree: Tree, name: string): { path: string; data: Buffer } | undefined {
  let p = name;
  for (let hops = 0; hops < 16; hops++) {
    const e = tree.get(p);
    if (!e) return undefined;
    if (!e.link) return { path: p, data: e.data };
    const target = e.data.toString('utf8');
    const parts = target.startsWith('/') ? [] : p.split('/').slice(0, -1);
    for (const seg of target.split('/')) {
      if (seg === '..') parts.pop();
      else if (seg !== '' && seg !== '.') parts.push(seg);
    }
    p = parts.join('/');
  }
  return undefined;
}

export type OsReleaseSource =
  { from: 'initrd'; path: string; data: Buffer } | { from: 'host'; path: string; data: Buffer; why: string };

/**
 * The os-release for a UKI built without one: the initrds' (concatenated in the given order, as the
 * boot loader hands them to the kernel), else the running system's, with the reason the initrd's
 * was not used. Undefined when neither exists.
 */
export async function defaultOsRelease(initrds: readonly Buffer[]): Promise<OsReleaseSource | undefined> {
  let why = 'no --initrd given';
  if (initrds.length > 0) {
    const tree = await readInitramfs(Buffer.concat(initrds));
    if (typeof tree === 'string') why = `the initrd cannot be read: ${tree}`;
    else {
      for (const p of OS_RELEASE_PATHS) {
        const found = lookup(tree, p);
        if (found)
          return { from: 'initrd', path: p === found.path ? p : `${p} -> ${found.path}`, data: found.data };
      }
      why = 'the initrd has no etc/os-release or usr/lib/os-release';
    }
  }
  for (const p of HOST_OS_RELEASE) {
    try {
      return { from: 'host', path: p, data: await fs.readFile(p), why };
    } catch (err) {
      if (!isErrno(err, 'ENOENT')) throw err;
    }
  }
  return undefined;
}
