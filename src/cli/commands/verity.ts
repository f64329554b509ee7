import type { Command } from 'commander';
import { randomBytes } from 'node:crypto';
import path from 'node:path';
import { UserError } from '../../errors.js';
import { withAtomicFile } from '../../util/fsx.js';
import { formatVerity, verifyVerity, type VerityResult } from '../../verity/index.js';
import { act, intOption } from '../action.js';
import type { Context, Progress } from '../context.js';

export interface VerityCliOptions {
  hashOffset?: number;
  dataOffset?: number;
  dataBlocks?: number;
  dataBlockSize?: number;
  hashBlockSize?: number;
  hash?: string;
  salt?: string;
  uuid?: string;
  superblock?: boolean;
  force?: boolean;
}

/** Parse a hex option; `-` means empty (veritysetup's spelling for "no salt"). */
export function parseHex(value: string, what: string): Buffer {
  if (value === '-') return Buffer.alloc(0);
  if (!/^([0-9a-fA-F]{2})*$/.test(value))
    throw new UserError('LAMA_E_BAD_HEX', `${what} '${value}' is not an even number of hex digits`);
  return Buffer.from(value, 'hex');
}

function summary(r: VerityResult): Record<string, unknown> {
  return {
    rootHash: r.rootHash.toString('hex'),
    uuid: r.uuid,
    algorithm: r.algorithm,
    salt: r.salt.toString('hex'),
    dataBlocks: r.dataBlocks,
    dataBlockSize: r.dataBlockSize,
    hashBlockSize: r.hashBlockSize,
    hashOffset: r.hashOffset,
    hashTreeBytes: r.hashTreeBytes,
    superblock: r.superblock,
  };
}

function human(ctx: Context, s: Record<string, unknown>): string {
  const rows: [string, unknown][] = [
    ['Root hash', s.rootHash],
    ['UUID', s.uuid ?? '-'],
    ['Hash algorithm', s.algorithm],
    ['Salt', s.salt === '' ? '-' : s.salt],
    ['Data blocks', s.dataBlocks],
    ['Data block size', s.dataBlockSize],
    ['Hash block size', s.hashBlockSize],
    ['Hash offset', s.hashOffset],
    ['Hash area bytes', s.hashTreeBytes],
  ];
  return rows.map(([k, v]) => `${ctx.c.bold(k.padEnd(16))} ${String(v)}`).join('\n');
}

/** The tree geometry options format and verify share, with progress reported to `bar`. */
function geometry(dataPath: string, opts: VerityCliOptions, bar: Progress) {
  return {
    dataPath,
    dataOffset: opts.dataOffset,
    dataBlocks: opts.dataBlocks,
    hashOffset: opts.hashOffset,
    dataBlockSize: opts.dataBlockSize,
    hashBlockSize: opts.hashBlockSize,
    algorithm: opts.hash,
    superblock: opts.superblock,
    onProgress: (done: number, total: number) => bar.update(done, total),
  };
}

/**
 * `lamadist verity format DATA HASH`: write a veritysetup-compatible hash tree. A separate hash file
 * is written atomically; a hash area inside an existing file (same file as the data, or a non-zero
 * --hash-offset) is written in place.
 */
export async function verityFormat(
  ctx: Context,
  dataPath: string,
  hashPath: string,
  opts: VerityCliOptions,
): Promise<VerityResult> {
  const salt = opts.salt === undefined ? randomBytes(32) : parseHex(opts.salt, 'salt');
  const inPlace = path.resolve(dataPath) === path.resolve(hashPath) || (opts.hashOffset ?? 0) > 0;
  const bar = ctx.progress('hashing', 1);
  const common = { ...geometry(dataPath, opts, bar), salt, uuid: opts.uuid };
  const r = inPlace
    ? await formatVerity({ ...common, hashPath })
    : await withAtomicFile(hashPath, { force: opts.force }, (out) =>
        formatVerity({ ...common, hashPath: out.temp }),
      );
  bar.finish();
  const s = summary(r);
  ctx.result(s, () => human(ctx, s));
  return r;
}

/** `lamadist verity verify DATA HASH ROOT_HASH`: check every block; exit 2 naming the first bad one. */
export async function verityVerify(
  ctx: Context,
  dataPath: string,
  hashPath: string,
  rootHex: string,
  opts: VerityCliOptions,
): Promise<VerityResult> {
  const rootHash = parseHex(rootHex, 'root hash');
  const bar = ctx.progress('verifying', 1);
  const r = await verifyVerity({
    ...geometry(dataPath, opts, bar),
    hashPath,
    rootHash,
    salt: opts.salt === undefined ? undefined : parseHex(opts.salt, 'salt'),
  });
  bar.finish();
  const s = { ...summary(r), verified: true };
  ctx.result(
    s,
    () => `${human(ctx, s)}\n${ctx.c.green('verified')}: every data and hash block matches the root hash`,
  );
  return r;
}

function common(cmd: Command): Command {
  return cmd
    .option(
      '--hash-offset <bytes>',
      'byte offset of the hash area in HASH (default 0, or the data size when HASH is DATA)',
      intOption('--hash-offset'),
    )
    .option(
      '--data-offset <bytes>',
      'byte offset of the first data block in DATA',
      intOption('--data-offset'),
    )
    .option(
      '--data-blocks <n>',
      'number of data blocks (default: all whole blocks)',
      intOption('--data-blocks'),
    )
    .option('--data-block-size <bytes>', 'data block size', intOption('--data-block-size'))
    .option('--hash-block-size <bytes>', 'hash block size', intOption('--hash-block-size'))
    .option('--hash <algorithm>', 'hash algorithm: sha256, sha1 or sha512')
    .option('--no-superblock', 'no superblock in front of the tree (parameters must then be given)');
}

export function configure(cmd: Command): void {
  common(
    cmd
      .command('format')
      .description('write a dm-verity hash tree (veritysetup format 1) and print the root hash')
      .argument('<data>', 'data file')
      .argument('<hash>', 'hash file (may be DATA itself: the tree is appended)')
      .option('--salt <hex>', "salt in hex, '-' for none (default: 32 random bytes)")
      .option('--uuid <uuid>', 'superblock UUID (default: random)')
      .option('--force', 'replace an existing hash file'),
  ).action(
    act<VerityCliOptions>(
      async (ctx, args, opts) => void (await verityFormat(ctx, args[0] as string, args[1] as string, opts)),
    ),
  );
  common(
    cmd
      .command('verify')
      .description('verify data and hash tree against a root hash, naming the first bad block')
      .argument('<data>', 'data file')
      .argument('<hash>', 'hash file')
      .argument('<root-hash>', 'expected root hash in hex')
      .option('--salt <hex>', 'salt in hex (needed with --no-superblock)'),
  ).action(
    act<VerityCliOptions>(
      async (ctx, args, opts) =>
        void (await verityVerify(ctx, args[0] as string, args[1] as string, args[2] as string, opts)),
    ),
  );
}
