import { existsSync, promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { dpsTypeFor, partitionExtent, planGpt, writeGpt } from '../../src/disk/index.js';
import { buildEsp } from '../../src/fat/index.js';
import { loadLayout } from '../../src/image/index.js';
import {
  UBOOT_QEMU_ARM64,
  compileBootScript,
  completeEnvWrite,
  readUbootEnv,
  startUboot,
  type UbootSession,
} from '../../src/vm/index.js';
import { parsePe } from '../../src/pe/index.js';
import { REPO_ROOT } from '../helpers/cli.js';
import { skipBecause } from '../helpers/skip.js';
import { arm64EfiApp } from './efi-app.js';

// meta-lamadist's U-Boot A/B script (boot.scr of lamadist-boot-script) on real U-Boot: Debian's
// qemu_arm64 build under qemu-system-aarch64 -M virt (TCG). The disk has the rockchip layout's GPT
// (ESP = partition 1) written by our disk code, the ESP by our FAT code; U-Boot's default bootcmd
// (distro boot) finds /boot.scr on virtio 0:1 and sources it. The slots' "UKIs" are plain text files,
// not arm64 PE images: U-Boot's `load` reads them (the byte count names the file) and `bootefi`
// refuses them, which is the "slot did not start" path the script handles with a reset.
// Each `reset` ends QEMU (-no-reboot); completeEnvWrite then finishes the `saveenv` that Debian 12's
// QEMU flash model cuts short (see src/vm/uboot.ts), checked against U-Boot's own CRC.
// The tests share one device (disk and environment flash) and run in order, each continuing from
// the counters the previous one left.
const BOOT_CMD = path.join(REPO_ROOT, 'meta-lamadist/recipes-bsp/lamadist-boot-script/files/boot.cmd');
const MiB = 1024 * 1024;
const UKI = {
  a: Buffer.from('LamaDist test: slot a stand-in, not an arm64 PE image\n'),
  b: Buffer.from('LamaDist test: slot b stand-in, not an arm64 PE image either\n'),
};
const KERNEL_ADDR_R = '0x40400000';

let tmp: string;
let disk: string;
let flash: string;
let espExtent: { offset: number; size: number };

async function buildDisk(): Promise<void> {
  const layout = await loadLayout('rockchip');
  const table = planGpt({
    alignment: layout.alignmentMiB * MiB,
    firstOffset: layout.firstPartitionMiB * MiB,
    partitions: layout.partitions.map((p) => ({
      name: p.label,
      typeGuid: dpsTypeFor(p.role, layout.arch),
      size: p.sizeMiB * MiB,
      grow: p.grow,
    })),
  });
  await fs.writeFile(disk, Buffer.alloc(0));
  await fs.truncate(disk, Number(table.diskSectors) * table.sectorSize);
  const h = await fs.open(disk, 'r+');
  try {
    await writeGpt(h, table);
  } finally {
    await h.close();
  }
  const esp = table.partitions[0];
  if (!esp || esp.name !== 'esp') throw new Error('rockchip layout: partition 1 is not the ESP');
  espExtent = partitionExtent(table, esp);
  await writeEsp(UKI.b);
}

async function writeEsp(slotB: Buffer): Promise<void> {
  const scr = path.join(tmp, 'boot.scr');
  await compileBootScript(BOOT_CMD, scr, 'arm64');
  await buildEsp({
    image: disk,
    ...espExtent,
    volumeId: '4c414d41',
    label: 'ESP',
    timestamp: 1_700_000_000,
    files: { '/boot.scr': scr, '/EFI/Linux/lamadist-a.efi': UKI.a, '/EFI/Linux/lamadist-b.efi': slotB },
  });
}

interface Boot {
  serial: string;
  env: Record<string, string>;
  /** Where `until` matched. */
  markerAt?: number;
}

/**
 * One power-on until U-Boot resets, or with `until` until the console shows it (then power off).
 * `atPrompt` stops autoboot and runs commands first, then `boot` (the default bootcmd: distro boot).
 */
async function bootOnce(atPrompt?: (s: UbootSession) => Promise<void>, until?: RegExp): Promise<Boot> {
  const s = startUboot({ flash, disks: [disk] });
  try {
    if (atPrompt) {
      await s.waitFor(/Hit any key to stop autoboot/, 120_000);
      s.send(' ');
      await s.waitFor(/\n=> /, 30_000);
      await atPrompt(s);
      s.send('boot\r');
    }
    if (until) {
      const seen = await s.waitFor(until, 180_000);
      // Whatever the script would print if bootefi returned comes right after; give it a moment.
      await new Promise((r) => setTimeout(r, 2000));
      return await finish(s, seen.index);
    }
    let timer: NodeJS.Timeout | undefined;
    const code = await Promise.race([
      s.exited,
      new Promise<'timeout'>((resolve) => (timer = setTimeout(() => resolve('timeout'), 180_000))),
    ]).finally(() => clearTimeout(timer));
    // -no-reboot: QEMU exits with 0 when U-Boot resets the machine.
    expect(code, `U-Boot did not reset:\n${s.serial().slice(-2000)}`).toBe(0);
  } finally {
    await s.stop();
  }
  return await finish(s);
}

async function finish(s: UbootSession, markerAt?: number): Promise<Boot> {
  await s.stop();
  expect(['completed', 'intact']).toContain(await completeEnvWrite(flash));
  const env = await readUbootEnv(flash);
  if (!env) throw new Error('no valid U-Boot environment in the flash after the boot');
  return { serial: s.serial(), env, markerAt };
}

function counters(env: Record<string, string>): [string | undefined, string | undefined, string | undefined] {
  return [env.BOOT_ORDER, env.BOOT_A_LEFT, env.BOOT_B_LEFT];
}

/** The boot tried `slot`: loaded its file from partition 1 to kernel_addr_r, bootefi refused it, reset. */
function expectSlotAttempt(serial: string, slot: 'a' | 'b'): void {
  const from = serial.indexOf(`LamaDist: booting slot ${slot}`);
  expect(from, serial.slice(-2000)).toBeGreaterThan(0);
  const after = serial.slice(from);
  expect(after).toMatch(new RegExp(`^LamaDist: booting slot ${slot}\\r?\\n${UKI[slot].length} bytes read`));
  expect(after).toContain(`No UEFI binary known at ${KERNEL_ADDR_R}`);
  expect(after).toContain(`LamaDist: slot ${slot} did not start; rebooting`);
  expect(after).toContain('resetting ...');
  expect(serial).not.toContain(`booting slot ${slot === 'a' ? 'b' : 'a'}`);
}

beforeAll(async () => {
  tmp = await fs.mkdtemp(path.join(os.tmpdir(), 'lamadist-uboot-'));
  disk = path.join(tmp, 'disk.img');
  flash = path.join(tmp, 'env-flash.img');
  await buildDisk();
  await fs.writeFile(flash, Buffer.alloc(0));
  await fs.truncate(flash, 64 * MiB);
});
afterAll(async () => {
  await fs.rm(tmp, { recursive: true, force: true });
});

describe.skipIf(skipBecause(!existsSync(UBOOT_QEMU_ARM64), 'boot.cmd on U-Boot', `no ${UBOOT_QEMU_ARM64} (u-boot-qemu)`))('boot.cmd on Debian U-Boot (qemu_arm64)', () => {
  it('fresh environment: defaults, slot a, one attempt spent, UKI loaded from partition 1', async () => {
    const b = await bootOnce(async (s) => {
      const info = await s.command('printenv kernel_addr_r BOOT_ORDER BOOT_A_LEFT BOOT_B_LEFT');
      expect(info).toContain(`kernel_addr_r=${KERNEL_ADDR_R}`);
      expect(info).toMatch(/## Error: "BOOT_ORDER" not defined/);
      // Only the virtio disk is scanned, and the environment shrinks below the 4 KiB that QEMU 7.2's
      // flash model keeps of a saveenv (the other boot targets' scripts are the bulk of it).
      const drop = ['bootcmd_dhcp', 'bootcmd_qfw', 'bootcmd_usb0', 'bootcmd_scsi0', 'bootcmd_nvme0', 'usb_boot', 'scsi_boot', 'scsi_init', 'nvme_boot', 'nvme_init', 'nvme_need_init', 'boot_net_usb_start', 'boot_script_dhcp'];
      await s.command(drop.map((v) => `setenv ${v}`).join('; '));
      await s.command('setenv boot_targets virtio0; setenv bootdelay 1');
      const size = /Environment size: (\d+)\//.exec(await s.command('printenv'));
      expect(Number(size?.[1])).toBeLessThan(4000);
    });
    expect(b.serial).toMatch(/Loading Environment from Flash\.\.\. \*\*\* Warning - bad CRC, using default environment/);
    expect(b.serial).toMatch(/Scanning virtio 0:1\.\.\.\r?\nFound U-Boot script \/boot\.scr/);
    expect(b.serial).toContain('## Executing script at 40200000');
    expectSlotAttempt(b.serial, 'a');
    expect(counters(b.env)).toEqual(['A B', '2', '3']);
  }, 300_000);

  it('a slot that does not start: A until its attempts are spent, then B, then both counters reset', async () => {
    const expected: ['a' | 'b' | null, string, string][] = [
      ['a', '1', '3'],
      ['a', '0', '3'],
      ['b', '0', '2'],
      ['b', '0', '1'],
      ['b', '0', '0'],
      [null, '3', '3'],
      ['a', '2', '3'],
    ];
    for (const [slot, aLeft, bLeft] of expected) {
      const b = await bootOnce();
      expect(b.serial).toMatch(/Loading Environment from Flash\.\.\. OK/);
      if (slot) expectSlotAttempt(b.serial, slot);
      else {
        expect(b.serial).toContain('LamaDist: no slot has boot attempts left; resetting the counters and rebooting');
        expect(b.serial).not.toContain('LamaDist: booting slot');
      }
      expect(counters(b.env)).toEqual(['A B', aLeft, bLeft]);
    }
  }, 900_000);

  it('BOOT_ORDER "B A" boots b first; B without attempts falls back to a; a refilled counter is honoured', async () => {
    // What RAUC's uboot backend writes after installing into B.
    let b = await bootOnce(async (s) => {
      await s.command('setenv BOOT_ORDER "B A"; setenv BOOT_B_LEFT 3');
    });
    expectSlotAttempt(b.serial, 'b');
    expect(counters(b.env)).toEqual(['B A', '2', '2']);

    b = await bootOnce(async (s) => {
      await s.command('setenv BOOT_B_LEFT 0');
    });
    expectSlotAttempt(b.serial, 'a');
    expect(counters(b.env)).toEqual(['B A', '1', '0']);

    // `rauc status mark-good` on B refills its counter.
    b = await bootOnce(async (s) => {
      await s.command('setenv BOOT_B_LEFT 3');
    });
    expectSlotAttempt(b.serial, 'b');
    expect(counters(b.env)).toEqual(['B A', '1', '2']);
  }, 600_000);

  it('a valid arm64 EFI binary in the slot is started by bootefi and does not return', async () => {
    const marker = 'LamaDist test EFI application started from slot b';
    const app = arm64EfiApp(`${marker}\r\n`);
    expect(parsePe(app)).toMatchObject({ machine: 0xaa64, pe32plus: true, subsystem: 10 });
    await writeEsp(app);
    const b = await bootOnce(undefined, new RegExp(marker));
    const from = b.serial.indexOf('LamaDist: booting slot b');
    expect(from, b.serial.slice(-2000)).toBeGreaterThan(0);
    expect(b.serial.slice(from)).toMatch(new RegExp(`^LamaDist: booting slot b\\r?\\n${app.length} bytes read`));
    expect(b.serial.slice(from)).not.toContain('No UEFI binary known');
    expect(b.serial.slice(b.markerAt)).not.toContain('did not start');
    expect(counters(b.env)).toEqual(['B A', '1', '1']);
  }, 300_000);
});
