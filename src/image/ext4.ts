import { promises as fs } from 'node:fs';
import path from 'node:path';
import { makeTempDir } from '../util/fsx.js';
import { run } from '../util/proc.js';

/**
 * The /var file system: ext4 pre-populated with the directories the initramfs expects (the /etc
 * overlay's upper and work directories). mke2fs 1.47.0 stamps populated inodes with the wall clock,
 * so every inode's times are reset with debugfs afterwards; with a fixed UUID and hash seed the
 * result is byte-reproducible.
 */

/** Directories created on the fresh /var, parents first. */
export const VAR_DIRS = ['overlay', 'overlay/etc', 'overlay/etc/upper', 'overlay/etc/work'];

/** mkfs.ext4 argv for the var file system image. Pure. */
export function mkfsExt4Args(o: {
  file: string;
  bytes: number;
  uuid: string;
  label: string;
  source: string;
}): string[] {
  return [
    '-q',
    '-F',
    '-t',
    'ext4',
    // 4 KiB blocks always: mke2fs picks 1 KiB for small sizes, which a dm-crypt device with 4096-byte
    // sectors refuses to mount.
    '-b',
    '4096',
    '-L',
    o.label,
    '-U',
    o.uuid,
    // Lazy init leaves unwritten inode tables and journal blocks alone: mke2fs only writes what it
    // must, which keeps the image small and sparse before encryption.
    '-E',
    `hash_seed=${o.uuid},lazy_itable_init=1,lazy_journal_init=1`,
    '-d',
    o.source,
    o.file,
    `${Math.floor(o.bytes / 1024)}k`,
  ];
}

/** debugfs commands giving every created inode the same times. Pure. */
export function debugfsTimeCommands(paths: string[], timestamp: number): string {
  const lines: string[] = [];
  for (const p of paths) {
    for (const f of ['atime', 'ctime', 'mtime', 'crtime']) lines.push(`sif ${p} ${f} @${timestamp}`);
    for (const f of ['atime_extra', 'ctime_extra', 'mtime_extra', 'crtime_extra'])
      lines.push(`sif ${p} ${f} 0`);
  }
  return lines.join('\n') + '\n';
}

/** Build the var ext4 image at `file` (`bytes` long). */
export async function buildVarExt4(o: {
  file: string;
  bytes: number;
  uuid: string;
  timestamp: number;
  label?: string;
}): Promise<void> {
  const tmp = await makeTempDir('lamadist-var-');
  try {
    const src = path.join(tmp.dir, 'var');
    for (const d of ['', ...VAR_DIRS]) await fs.mkdir(path.join(src, d), { recursive: true, mode: 0o755 });
    const env = { ...process.env, E2FSPROGS_FAKE_TIME: String(o.timestamp) };
    await fs.rm(o.file, { force: true });
    await run(
      'mkfs.ext4',
      mkfsExt4Args({ file: o.file, bytes: o.bytes, uuid: o.uuid, label: o.label ?? 'var', source: src }),
      { env, userErrorCode: 'LAMA_E_EXT4' },
    );
    const cmds = path.join(tmp.dir, 'debugfs.cmds');
    await fs.writeFile(
      cmds,
      debugfsTimeCommands(['/', '/lost+found', ...VAR_DIRS.map((d) => `/${d}`)], o.timestamp),
    );
    await run('debugfs', ['-w', '-f', cmds, o.file], { env, userErrorCode: 'LAMA_E_EXT4' });
  } finally {
    await tmp.remove();
  }
}
