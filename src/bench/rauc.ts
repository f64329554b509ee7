import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { createBundle, adaptiveFetchBytes, digestImage } from '../rauc/index.js';
import { run as runTool } from '../util/proc.js';
import { MiB, scaled, writeCompressible } from './data.js';

/**
 * RAUC bundle benchmarks, each against the peer measured in the same run:
 * - creating a verity bundle for a 512 MiB image: `lamadist` (createBundle) vs `rauc bundle`;
 * - bytes an adaptive update fetches when one 4 KiB-aligned file changes in a 512 MiB EROFS image,
 *   from the block-hash indexes of the two images.
 * LAMADIST_BENCH_SCALE (e.g. 0.1) shrinks both sizes.
 */

async function pki(dir: string): Promise<{ cert: string; key: string; conf: string }> {
  const cert = path.join(dir, 'signer.pem');
  const key = path.join(dir, 'signer.key');
  await runTool('openssl', ['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', key, '-out', cert, '-days', '30', '-subj', '/CN=bench', '-addext', 'extendedKeyUsage=codeSigning']);
  const conf = path.join(dir, 'system.conf');
  await fs.writeFile(conf, `[system]\ncompatible=bench\nbootloader=noop\n[keyring]\npath=${cert}\ncheck-purpose=codesign\n[slot.rootfs.0]\ndevice=/dev/null\n`);
  return { cert, key, conf };
}

async function timed(fn: () => Promise<unknown>): Promise<number> {
  const t = process.hrtime.bigint();
  await fn();
  return Number(process.hrtime.bigint() - t) / 1e9;
}

async function bundleCreate(dir: string): Promise<void> {
  const size = scaled(512 * MiB);
  const keys = await pki(dir);
  const content = path.join(dir, 'content');
  await fs.mkdir(content, { mode: 0o755 });
  const image = path.join(content, 'rootfs.img');
  await writeCompressible(image, size);
  const manifest = '[update]\ncompatible=bench\nversion=1\n\n[bundle]\nformat=verity\n\n[image.rootfs]\nfilename=rootfs.img\nadaptive=block-hash-index\n';
  await fs.writeFile(path.join(content, 'manifest.raucm'), manifest);
  const signer = { certPem: await fs.readFile(keys.cert, 'utf8'), keyPem: await fs.readFile(keys.key, 'utf8') };
  await digestImage(image);
  const ourRun = async (): Promise<number> => {
    const out = path.join(dir, 'ours.raucb');
    await fs.rm(out, { force: true });
    return timed(() => createBundle({ out, compatible: 'bench', version: '1', images: [{ slotClass: 'rootfs', path: image, adaptive: true }], signer }));
  };
  const raucRun = async (): Promise<number> => {
    const out = path.join(dir, 'rauc.raucb');
    await fs.rm(out, { force: true });
    await fs.rm(path.join(content, 'rootfs.img.block-hash-index'), { force: true });
    await fs.writeFile(path.join(content, 'manifest.raucm'), manifest);
    return timed(() => runTool('rauc', ['bundle', '--conf', keys.conf, '--cert', keys.cert, '--key', keys.key, content, out]));
  };
  // The image is read once beforehand and the tools alternate, so neither gains from a warmer page
  // cache; the best of two runs each damps the noise of a shared machine.
  const theirsRuns: number[] = [];
  const oursRuns: number[] = [];
  for (let i = 0; i < 2; i++) {
    theirsRuns.push(await raucRun());
    oursRuns.push(await ourRun());
  }
  const ours = Math.min(...oursRuns);
  const theirs = Math.min(...theirsRuns);
  const mib = size / MiB;
  console.log(`rauc: verity bundle of a ${mib} MiB image: lamadist ${ours.toFixed(2)} s, rauc bundle ${theirs.toFixed(2)} s, ratio ${(ours / theirs).toFixed(2)}x (goal <= 1.0x)`);
}

async function erofsTree(root: string, files: number, fileSize: number, changed?: number): Promise<void> {
  await fs.mkdir(root, { recursive: true });
  for (let i = 0; i < files; i++) {
    const seed = Buffer.alloc(fileSize);
    // Deterministic content per file so the second tree differs only in the changed file.
    for (let b = 0; b < fileSize; b += 32) seed.writeUInt32LE((i * 0x9e3779b1 + b * 2654435761) >>> 0, b);
    if (i === changed) seed.fill(0xa5, 0, 4096);
    await fs.writeFile(path.join(root, `f${String(i).padStart(4, '0')}.bin`), seed);
  }
  const small = path.join(root, 'etc');
  await fs.mkdir(small, { recursive: true });
  await fs.writeFile(path.join(small, 'os-release'), 'VERSION=1\n');
}

async function mkErofs(tree: string, out: string): Promise<void> {
  // Fixed UUID and timestamps: two builds differ only where the content differs.
  await runTool('mkfs.erofs', ['-T', '0', '-U', '6a1e8f3c-2b8d-4f39-9f4e-1f3a5c7d9b21', '--all-root', out, tree]);
}

async function adaptive(dir: string): Promise<void> {
  const size = scaled(512 * MiB);
  const fileSize = 4 * MiB;
  const files = Math.max(1, Math.floor(size / fileSize));
  const changedFile = Math.floor(files / 2);
  await erofsTree(path.join(dir, 'old'), files, fileSize);
  await erofsTree(path.join(dir, 'new'), files, fileSize, changedFile);
  await mkErofs(path.join(dir, 'old'), path.join(dir, 'old.erofs'));
  await mkErofs(path.join(dir, 'new'), path.join(dir, 'new.erofs'));
  const a = await digestImage(path.join(dir, 'old.erofs'), { blockIndex: true });
  const b = await digestImage(path.join(dir, 'new.erofs'), { blockIndex: true });
  const r = adaptiveFetchBytes(a.blockHashIndex as Buffer, b.blockHashIndex as Buffer);
  const pct = (100 * r.bytes) / b.size;
  console.log(`rauc: adaptive update, one 4 KiB-aligned file changed in a ${(b.size / MiB).toFixed(0)} MiB EROFS image: fetch ${r.bytes} bytes (${r.changed} of ${r.blocks} blocks), ${pct.toFixed(3)}% of the image (goal <= 5%); a full download is ${b.size} bytes`);
}

/** Run the RAUC benchmarks and print one line each. */
export async function run(): Promise<void> {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'lamadist-bench-rauc-'));
  try {
    await fs.mkdir(path.join(dir, 'create'));
    await bundleCreate(path.join(dir, 'create'));
    await fs.rm(path.join(dir, 'create'), { recursive: true, force: true });
    await fs.mkdir(path.join(dir, 'adaptive'));
    await adaptive(path.join(dir, 'adaptive'));
  } finally {
    await fs.rm(dir, { recursive: true, force: true });
  }
}
