import { randomBytes } from 'node:crypto';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { predictPcr11 } from '../measure/index.js';
import { signPe, verifyPe } from '../secureboot/index.js';
import { EFI_STUBS, buildUki } from '../uki/index.js';
import { writeFileAtomic } from '../util/fsx.js';
import { run as runTool } from '../util/proc.js';

/**
 * Boot chain benchmarks on a 96 MiB UKI (16 MiB kernel, 80 MiB initrd), each against the peer tool
 * measured in the same run: assembling (`objcopy --add-section`, the pre-ukify recipe), signing
 * (`sbsign`), verifying (`sbverify`) and predicting PCR 11 (`systemd-measure calculate`).
 * LAMADIST_BENCH_SCALE (e.g. 0.1) shrinks the sizes.
 */

const MiB = 1024 * 1024;
const STUB = EFI_STUBS['x86-64'] as string;

function scaled(bytes: number): number {
  const s = Number(process.env.LAMADIST_BENCH_SCALE ?? '1');
  const f = Number.isFinite(s) && s > 0 ? s : 1;
  return Math.max(MiB, Math.floor((bytes * f) / MiB) * MiB);
}

async function timed(fn: () => Promise<unknown>): Promise<number> {
  const t = process.hrtime.bigint();
  await fn();
  return Number(process.hrtime.bigint() - t) / 1e9;
}

/** Best of two alternating runs each, so neither side profits from a warmer cache or a quieter moment. */
async function compare(label: string, peer: string, ours: () => Promise<unknown>, theirs: () => Promise<unknown>): Promise<void> {
  const o: number[] = [];
  const p: number[] = [];
  for (let i = 0; i < 2; i++) {
    p.push(await timed(theirs));
    o.push(await timed(ours));
  }
  const a = Math.min(...o);
  const b = Math.min(...p);
  console.log(`boot: ${label}: lamadist ${a.toFixed(3)} s, ${peer} ${b.toFixed(3)} s, ratio ${(a / b).toFixed(2)}x (goal <= 1.0x)`);
}

/** Run the boot chain benchmarks and print one line each. */
export async function run(): Promise<void> {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'lamadist-bench-boot-'));
  const f = (n: string): string => path.join(dir, n);
  try {
    const kernelSize = scaled(16 * MiB);
    const initrdSize = scaled(80 * MiB);
    await fs.writeFile(f('vmlinuz'), randomBytes(kernelSize));
    await fs.writeFile(f('initrd'), randomBytes(initrdSize));
    await fs.writeFile(f('cmdline'), 'console=ttyS0,115200 quiet');
    await fs.writeFile(f('osrel'), 'ID=lamadist\n');
    await runTool('openssl', ['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', f('db.key'), '-out', f('db.crt'), '-days', '30', '-subj', '/CN=bench db']);
    const signer = { certPem: await fs.readFile(f('db.crt')), keyPem: await fs.readFile(f('db.key')) };
    const size = `${((kernelSize + initrdSize) / MiB).toFixed(0)} MiB UKI`;

    await compare(
      `assemble a ${size}`,
      'objcopy',
      async () => writeFileAtomic(f('ours.efi'), await buildUki({ stub: STUB, kernel: f('vmlinuz'), initrd: f('initrd'), cmdline: 'console=ttyS0,115200 quiet', osrel: f('osrel') }), { force: true }),
      async () => {
        await fs.rm(f('objcopy.efi'), { force: true });
        await runTool('objcopy', [
          '--add-section', `.osrel=${f('osrel')}`, '--change-section-vma', '.osrel=0x20000',
          '--add-section', `.cmdline=${f('cmdline')}`, '--change-section-vma', '.cmdline=0x30000',
          '--add-section', `.linux=${f('vmlinuz')}`, '--change-section-vma', '.linux=0x2000000',
          '--add-section', `.initrd=${f('initrd')}`, '--change-section-vma', '.initrd=0x3000000',
          STUB, f('objcopy.efi'),
        ]);
      },
    );
    await compare(
      `sign a ${size}`,
      'sbsign',
      async () => writeFileAtomic(f('signed.efi'), signPe(await fs.readFile(f('ours.efi')), signer), { force: true }),
      async () => runTool('sbsign', ['--key', f('db.key'), '--cert', f('db.crt'), '--output', f('sbsign.efi'), f('ours.efi')]),
    );
    await compare(
      `verify a ${size}`,
      'sbverify',
      async () => verifyPe(await fs.readFile(f('signed.efi')), signer.certPem),
      async () => runTool('sbverify', ['--cert', f('db.crt'), f('signed.efi')]),
    );
    await compare(
      `predict PCR 11 of a ${size}`,
      'systemd-measure',
      async () => predictPcr11(await fs.readFile(f('ours.efi'))),
      async () =>
        runTool('/usr/lib/systemd/systemd-measure', ['calculate', `--linux=${f('vmlinuz')}`, `--initrd=${f('initrd')}`, `--cmdline=${f('cmdline')}`, `--osrel=${f('osrel')}`, '--bank=sha256']),
    );
  } finally {
    await fs.rm(dir, { recursive: true, force: true });
  }
}
