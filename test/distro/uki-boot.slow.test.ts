import { spawnSync } from 'node:child_process';
import { existsSync, promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { OVMF, buildInitramfs, debianKernel, runQemu } from '../../src/vm/index.js';
import { REPO_ROOT } from '../helpers/cli.js';
import { skipBecause } from '../helpers/skip.js';

// The UKI that meta-lamadist's class builds (lib/lamadist/uki.py on systemd-boot's EFI stub) must
// boot: OVMF loads it from the ESP's removable-media path, the stub starts the kernel with the
// embedded initramfs and command line. The guest prints its /proc/cmdline and powers off.
const STUB = '/usr/lib/systemd/boot/efi/linuxx64.efi.stub';
const ROOTHASH = 'a3'.repeat(32);

function must(cmd: string, args: string[], env: NodeJS.ProcessEnv = {}): void {
  const r = spawnSync(cmd, args, { encoding: 'utf8', env: { ...process.env, ...env }, timeout: 120_000 });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')}: ${r.stderr || r.stdout}`);
}

let tmp: string;
beforeAll(async () => {
  tmp = await fs.mkdtemp(path.join(os.tmpdir(), 'lamadist-uki-boot-'));
});
afterAll(async () => {
  await fs.rm(tmp, { recursive: true, force: true });
});

describe.skipIf(skipBecause(!existsSync(STUB) || !existsSync(OVMF.code), 'UKI boot in OVMF', `needs ${STUB} (systemd-boot-efi) and ${OVMF.code} (ovmf)`))('UKI from meta-lamadist boots in OVMF', () => {
  it('starts the kernel with the embedded initramfs and the slot command line', async () => {
    const kernel = await debianKernel();
    const initrd = await buildInitramfs({
      init: '#!/bin/sh\nmount -t proc proc /proc\necho "LAMADIST-CMDLINE: $(cat /proc/cmdline)"\npoweroff -f\n',
      out: path.join(tmp, 'initrd.img'),
    });
    const osrel = path.join(tmp, 'os-release');
    await fs.writeFile(osrel, 'ID=lamadist\nNAME="LamaDist"\nVERSION_ID=1.0\n');
    const uki = path.join(tmp, 'lamadist-b.efi');
    const cmdline = `roothash=${ROOTHASH} lamadist.slot=b console=ttyS0,115200 panic=-1`;
    must('python3', ['-m', 'lamadist.uki', '--stub', STUB, '--linux', kernel.vmlinuz, '--initrd', initrd, '--osrel', osrel, '--uname', kernel.version, '--cmdline', cmdline, '--out', uki], {
      PYTHONPATH: path.join(REPO_ROOT, 'meta-lamadist/lib'),
    });

    // GPT disk with one ESP; FAT written at the partition's offset, the UKI as the removable path.
    const disk = path.join(tmp, 'disk.img');
    await fs.writeFile(disk, Buffer.alloc(0));
    await fs.truncate(disk, 96 * 1024 * 1024);
    must('sgdisk', ['-n', '1:2048:+80M', '-t', '1:ef00', '-c', '1:esp', disk]);
    must('mkfs.vfat', ['-F', '32', '--offset', '2048', disk, String(80 * 1024)]);
    const img = `${disk}@@1M`;
    must('mmd', ['-i', img, '::/EFI', '::/EFI/BOOT']);
    must('mcopy', ['-i', img, uki, '::/EFI/BOOT/BOOTX64.EFI']);

    const r = await runQemu({
      firmware: { code: OVMF.code, vars: OVMF.vars },
      disks: [{ path: disk }],
      memMiB: 1024,
      network: false,
      noReboot: true,
      timeoutMs: 600_000,
      // Serial lines end in \r\n, and JavaScript's `.` matches neither.
      until: /LAMADIST-CMDLINE: [^\r\n]*\r?\n/,
    });
    expect(r.matched, r.serial.slice(-2000)).toBe(true);
    const line = /LAMADIST-CMDLINE: ([^\r\n]*)/.exec(r.serial)?.[1]?.trim();
    expect(line).toBe(cmdline);
  }, 900_000);
});
