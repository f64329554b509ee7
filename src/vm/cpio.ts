/**
 * The newc ("070701") cpio format the kernel unpacks as initramfs: a 110-byte ASCII header per
 * entry, the NUL-terminated name and the data each padded to 4 bytes, ending with TRAILER!!!.
 */

/** One entry of an initramfs tree. Paths are absolute guest paths without a trailing slash. */
export type CpioEntry =
  | { type: 'dir'; path: string; mode?: number }
  | { type: 'file'; path: string; mode?: number; data: Buffer }
  | { type: 'symlink'; path: string; target: string }
  | { type: 'char'; path: string; mode?: number; major: number; minor: number };

const S_IFDIR = 0o040000;
const S_IFREG = 0o100000;
const S_IFLNK = 0o120000;
const S_IFCHR = 0o020000;

function hex8(n: number): string {
  return n.toString(16).padStart(8, '0');
}

function pad4(n: number): Buffer {
  return Buffer.alloc((4 - (n % 4)) % 4);
}

function header(name: string, fields: { ino: number; mode: number; nlink: number; size: number; rmajor?: number; rminor?: number }): Buffer[] {
  const nameBuf = Buffer.from(name + '\0', 'utf8');
  const h =
    '070701' +
    [fields.ino, fields.mode, 0, 0, fields.nlink, 0, fields.size, 0, 0, fields.rmajor ?? 0, fields.rminor ?? 0, nameBuf.length, 0]
      .map(hex8)
      .join('');
  return [Buffer.from(h, 'ascii'), nameBuf, pad4(110 + nameBuf.length)];
}

/**
 * Encode entries as a newc archive (uncompressed). Entries are written in the given order, so
 * parents must come before children; owners are root and mtimes zero, which makes the archive
 * reproducible.
 */
export function encodeNewc(entries: readonly CpioEntry[]): Buffer {
  const parts: Buffer[] = [];
  let ino = 1;
  for (const e of entries) {
    const name = e.path.replace(/^\/+/, '');
    switch (e.type) {
      case 'dir':
        parts.push(...header(name, { ino: ino++, mode: S_IFDIR | (e.mode ?? 0o755), nlink: 2, size: 0 }));
        break;
      case 'file':
        parts.push(...header(name, { ino: ino++, mode: S_IFREG | (e.mode ?? 0o644), nlink: 1, size: e.data.length }));
        parts.push(e.data, pad4(e.data.length));
        break;
      case 'symlink': {
        const t = Buffer.from(e.target, 'utf8');
        parts.push(...header(name, { ino: ino++, mode: S_IFLNK | 0o777, nlink: 1, size: t.length }));
        parts.push(t, pad4(t.length));
        break;
      }
      case 'char':
        parts.push(...header(name, { ino: ino++, mode: S_IFCHR | (e.mode ?? 0o600), nlink: 1, size: 0, rmajor: e.major, rminor: e.minor }));
        break;
    }
  }
  parts.push(...header('TRAILER!!!', { ino: 0, mode: 0, nlink: 1, size: 0 }));
  return Buffer.concat(parts);
}
