import { promises as fs } from 'node:fs';
import path from 'node:path';
import { UserError } from '../errors.js';
import { makeTempDir } from '../util/fsx.js';
import { run } from '../util/proc.js';

/**
 * The EFI system partition, written straight into a disk image without mounting anything (the build
 * host may have no vfat driver): mkfs.vfat --offset formats the partition in place and mtools
 * (`-i image@@offset`) creates directories and copies files. --invariant, a fixed volume id and
 * SOURCE_DATE_EPOCH make the result byte-reproducible.
 *
 * Public API:
 * - `mkfsArgs(options)` → mkfs.vfat argv (pure); `buildEsp(options)` formats and fills the partition.
 * - `listEsp(image, offset)` → file paths; `readEspFile(image, offset, path)` → Buffer.
 */

export interface EspOptions {
  image: string;
  /** Byte offset of the partition in the image (a multiple of 512). */
  offset: number;
  /** Partition size in bytes. */
  size: number;
  /** 32-bit FAT volume id as 8 hex digits. */
  volumeId: string;
  label?: string;
  /** Absolute ESP paths (`/EFI/BOOT/BOOTX64.EFI`) to host files or contents. */
  files: Record<string, string | Buffer>;
  /** Empty directories to create as well (`/EFI/RAUC/`). */
  dirs?: string[];
  /** Time stamped on every directory and file. */
  timestamp: number;
}

/** The mkfs.vfat command line for the partition. Pure. */
export function mkfsArgs(o: Pick<EspOptions, 'image' | 'offset' | 'size' | 'volumeId' | 'label'>): string[] {
  if (o.offset % 512 !== 0)
    throw new UserError('LAMA_E_FAT', `ESP offset ${o.offset} is not a multiple of 512`);
  if (!/^[0-9a-fA-F]{8}$/.test(o.volumeId))
    throw new UserError('LAMA_E_FAT', `FAT volume id '${o.volumeId}' must be 8 hex digits`);
  // mkfs.vfat would pick the FAT type from the size of the whole image file, not of the partition:
  // choose it here. FAT32 needs at least 65525 clusters; smaller (test) partitions get FAT16, which
  // UEFI reads too.
  const fatType = o.size >= 260 * 1024 * 1024 ? '32' : '16';
  return [
    '--invariant',
    '-F',
    fatType,
    '-i',
    o.volumeId,
    '-n',
    o.label ?? 'ESP',
    `--offset=${o.offset / 512}`,
    o.image,
    String(Math.floor(o.size / 1024)),
  ];
}

function mtoolsEnv(timestamp: number): NodeJS.ProcessEnv {
  return { ...process.env, MTOOLS_SKIP_CHECK: '1', SOURCE_DATE_EPOCH: String(timestamp), TZ: 'UTC' };
}

function target(image: string, offset: number): string {
  return `${image}@@${offset}`;
}

/** Every directory a set of file paths needs, parents first. */
export function espDirectories(paths: string[]): string[] {
  const dirs = new Set<string>();
  for (const p of paths) {
    const parts = p.split('/').filter(Boolean);
    for (let i = 1; i < parts.length; i++) dirs.add('/' + parts.slice(0, i).join('/'));
  }
  return [...dirs].sort((a, b) => a.split('/').length - b.split('/').length || a.localeCompare(b));
}

/** Format the ESP inside the image and copy `files` onto it, in sorted order. */
export async function buildEsp(o: EspOptions): Promise<void> {
  const env = mtoolsEnv(o.timestamp);
  await run('mkfs.vfat', mkfsArgs(o), { userErrorCode: 'LAMA_E_FAT', env });
  const paths = Object.keys(o.files).sort();
  const img = target(o.image, o.offset);
  const extra = (o.dirs ?? []).map((d) => d.replace(/\/+$/, ''));
  const dirs = espDirectories([...paths, ...extra.map((d) => `${d}/.`)]);
  if (dirs.length > 0)
    await run('mmd', ['-i', img, ...dirs.map((d) => `::${d}`)], { env, userErrorCode: 'LAMA_E_FAT' });
  const tmp = await makeTempDir('lamadist-esp-');
  try {
    for (const [i, p] of paths.entries()) {
      const content = o.files[p] as string | Buffer;
      let src = content as string;
      if (Buffer.isBuffer(content)) {
        src = path.join(tmp.dir, String(i));
        await fs.writeFile(src, content);
      }
      await run('mcopy', ['-i', img, '-D', 'o', src, `::${p}`], { env, userErrorCode: 'LAMA_E_FAT' });
    }
  } finally {
    await tmp.remove();
  }
}

/** All file paths on the ESP (directories omitted), e.g. `/EFI/Linux/lamadist-a.efi`. */
export async function listEsp(image: string, offset: number): Promise<string[]> {
  const r = await run('mdir', ['-i', target(image, offset), '-/', '-b', '::/'], {
    env: mtoolsEnv(0),
    userErrorCode: 'LAMA_E_FAT',
  });
  return r.stdout
    .split('\n')
    .map((l) => l.trim())
    .filter((l) => l.startsWith('::/') && !l.endsWith('/'))
    .map((l) => l.slice(2));
}

/** Read one file from the ESP. */
export async function readEspFile(image: string, offset: number, file: string): Promise<Buffer> {
  const r = await run('mcopy', ['-n', '-i', target(image, offset), `::${file}`, '-'], {
    env: mtoolsEnv(0),
    allowFailure: true,
  });
  if (r.code !== 0)
    throw new UserError(
      'LAMA_E_FAT',
      `cannot read ${file} from the ESP: ${r.stderr.trim().split('\n').pop() ?? ''}`,
      { where: image },
    );
  return r.stdoutBuffer;
}
