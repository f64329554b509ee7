import { randomBytes } from 'node:crypto';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { buildImage } from '../image/index.js';
import { run as runTool } from '../util/proc.js';
import { formatVerity } from '../verity/index.js';
import { MiB, scaled, writeCompressible } from './data.js';

/**
 * Disk engine benchmarks, each against the peer tools measured in the same run:
 * - dm-verity format of a 1 GiB file: formatVerity vs `veritysetup format` (goal: ratio ≤ 1.1);
 * - `image build` for a 512 MiB rootfs vs the sum of the equivalent tool steps (mkfs.erofs,
 *   veritysetup format, sgdisk, cryptsetup luksFormat, mkfs.ext4, mkfs.vfat + mcopy, copying the
 *   root image into both slots). The host has no device-mapper, so no peer can encrypt the payload
 *   here: the encrypted build's ratio includes work the peer sum leaves out; the --no-encrypt build
 *   compares like with like.
 * LAMADIST_BENCH_SCALE (e.g. 0.1) shrinks both sizes.
 */

/** At least 8 MiB so the image benchmark still has one whole 8 MiB file. */
function sized(bytes: number): number {
  return Math.max(8 * MiB, scaled(bytes));
}

async function timed(fn: () => Promise<unknown>): Promise<number> {
  const t = process.hrtime.bigint();
  await fn();
  return Number(process.hrtime.bigint() - t) / 1e9;
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)] as number;
}

function line(name: string, ours: number, peer: number, peerName: string): void {
  process.stdout.write(
    `disk: ${name}: lamadist ${ours.toFixed(2)} s, ${peerName} ${peer.toFixed(2)} s, ratio ${(ours / peer).toFixed(2)}\n`,
  );
}

async function verityBench(dir: string): Promise<void> {
  const size = sized(1024 * MiB);
  const data = path.join(dir, 'verity.data');
  await writeCompressible(data, size);
  const salt = randomBytes(32);
  const ours: number[] = [];
  const peer: number[] = [];
  // Alternate the two so page cache and machine load affect both alike.
  for (let i = 0; i < 3; i++) {
    peer.push(
      await timed(() =>
        runTool('veritysetup', [
          'format',
          `--salt=${salt.toString('hex')}`,
          data,
          path.join(dir, 'verity.peer'),
        ]),
      ),
    );
    ours.push(
      await timed(() => formatVerity({ dataPath: data, hashPath: path.join(dir, `verity.ours${i}`), salt })),
    );
  }
  line(`verity format ${size / MiB} MiB (median of 3)`, median(ours), median(peer), 'veritysetup format');
  await fs.rm(data);
}

async function imageBench(dir: string): Promise<void> {
  const size = sized(512 * MiB);
  const rootfs = path.join(dir, 'rootfs');
  await fs.mkdir(path.join(rootfs, 'usr/lib'), { recursive: true });
  await fs.mkdir(path.join(rootfs, 'etc'));
  await fs.writeFile(path.join(rootfs, 'etc/os-release'), 'ID=lamadist\n');
  for (let i = 0; i < size / (8 * MiB); i++)
    await writeCompressible(path.join(rootfs, 'usr/lib', `blob${i}`), 8 * MiB);
  const kernel = path.join(dir, 'vmlinuz');
  await fs.writeFile(kernel, randomBytes(8 * MiB));
  const slotMiB = Math.ceil(size / MiB) + 32;
  const sizes = { rootfs_a: slotMiB, rootfs_b: slotMiB, esp: 64, verity_a: 16, verity_b: 16, var: 64 };

  const build = (out: string, encrypt: boolean): Promise<unknown> =>
    buildImage({ out, bsp: 'x86_64', rootfs, kernel, sizes, encrypt, seed: 'bench', force: true });
  const ourPlain = await timed(() => build(path.join(dir, 'plain.img'), false));
  const ourLuks = await timed(() => build(path.join(dir, 'luks.img'), true));

  const peerDir = path.join(dir, 'peer');
  await fs.mkdir(peerDir);
  const erofs = path.join(peerDir, 'root.erofs');
  const disk = path.join(peerDir, 'disk.img');
  const key = path.join(peerDir, 'key');
  await fs.writeFile(key, randomBytes(32));
  const diskMiB = 1 + 64 + 2 * (slotMiB + 16) + 64 + 2;
  const steps = async (luks: boolean): Promise<void> => {
    await fs.rm(erofs, { force: true });
    await runTool('mkfs.erofs', ['--quiet', '-T0', '-zlz4hc', erofs, rootfs]);
    await runTool('veritysetup', ['format', erofs, path.join(peerDir, 'root.verity')]);
    await fs.rm(disk, { force: true });
    await runTool('truncate', ['-s', `${diskMiB}M`, disk]);
    await runTool('sgdisk', [
      '-n1:1M:+64M',
      '-n2:0:+' + slotMiB + 'M',
      '-n3:0:+16M',
      '-n4:0:+' + slotMiB + 'M',
      '-n5:0:+16M',
      '-n6:0:0',
      disk,
    ]);
    if (luks) {
      for (const p of ['a', 'b', 'var']) {
        const f = path.join(peerDir, `luks-${p}`);
        await runTool('truncate', ['-s', '32M', f]);
        await runTool('cryptsetup', [
          'luksFormat',
          '-q',
          '--type',
          'luks2',
          '--pbkdf',
          'pbkdf2',
          '--pbkdf-force-iterations',
          '1000',
          '--sector-size',
          '4096',
          '--key-file',
          key,
          f,
        ]);
      }
    }
    const ext4 = path.join(peerDir, 'var.ext4');
    await fs.rm(ext4, { force: true });
    await runTool('mkfs.ext4', ['-q', '-F', '-b', '4096', ext4, '48M']);
    await runTool('mkfs.vfat', ['-F', '16', '--offset=2048', disk, String(64 * 1024)]);
    const env = { ...process.env, MTOOLS_SKIP_CHECK: '1' };
    await runTool('mmd', ['-i', `${disk}@@1M`, '::/EFI', '::/EFI/Linux'], { env });
    for (const n of ['a', 'b'])
      await runTool('mcopy', ['-i', `${disk}@@1M`, kernel, `::/EFI/Linux/lamadist-${n}.efi`], { env });
    for (const atMiB of [65 + 16, 65 + 16 + slotMiB + 16]) {
      await runTool('dd', [
        `if=${erofs}`,
        `of=${disk}`,
        'bs=4M',
        `seek=${atMiB * MiB}`,
        'oflag=seek_bytes',
        'conv=notrunc,sparse',
        'status=none',
      ]);
    }
  };
  const peerPlain = await timed(() => steps(false));
  const peerLuks = await timed(() => steps(true));
  line(`image build ${size / MiB} MiB rootfs, --no-encrypt`, ourPlain, peerPlain, 'tool steps');
  line(
    `image build ${size / MiB} MiB rootfs, LUKS2 (ours also encrypts both slots and /var)`,
    ourLuks,
    peerLuks,
    'tool steps without payload encryption',
  );
}

/** Run the disk benchmarks and print one line each. */
export async function run(): Promise<void> {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'lamadist-bench-disk-'));
  try {
    await verityBench(dir);
    await imageBench(dir);
  } finally {
    await fs.rm(dir, { recursive: true, force: true });
  }
}
