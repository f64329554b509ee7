import { execFileSync } from 'node:child_process';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import type { ImagePlan } from '../../src/image/index.js';
import { LUKS2_DATA_OFFSET } from '../../src/luks/index.js';
import { GUID, addStoreVariables } from '../../src/secureboot/index.js';
import {
  OVMF,
  cutPower,
  readBootVariables,
  repoRoot,
  setBootNext,
  slotByteOffset,
  tamperSlot,
  type QemuResult,
  type RunHooks,
} from '../../src/vm/index.js';

const EFI_GLOBAL = '8be4df61-93ca-11d2-aa0d-00e098032b8c';
const INIT_FILE = 'meta-lamadist/recipes-core/lamadist-boot/files/lamadist-init';

/** An EFI_LOAD_OPTION (active) with an empty device path: enough for what reads descriptions. */
function loadOption(description: string): Buffer {
  const end = Buffer.from([0x7f, 0xff, 0x04, 0x00]);
  const head = Buffer.alloc(6);
  head.writeUInt32LE(1, 0);
  head.writeUInt16LE(end.length, 4);
  return Buffer.concat([head, Buffer.from(`${description}\0`, 'utf16le'), end]);
}

let dir: string;
let efivars: string;
let esp: string;
let script: string;

beforeAll(async () => {
  dir = await fs.mkdtemp(path.join(os.tmpdir(), 'vm-faults-fast-'));
  // lamadist-init without its last line (`main "$@"`), so its functions can be called one by one.
  const init = await fs.readFile(path.join(repoRoot(), INIT_FILE), 'utf8');
  const body = init.replace(/\nmain "\$@"\n*$/, '\n');
  expect(body).not.toBe(init);
  script = path.join(dir, 'init-functions.sh');
  await fs.writeFile(script, body);
});
afterAll(async () => {
  await fs.rm(dir, { recursive: true, force: true });
});
beforeEach(async () => {
  efivars = await fs.mkdtemp(path.join(dir, 'efivars-'));
  esp = await fs.mkdtemp(path.join(dir, 'esp-'));
});

/** An efivarfs file: 4 bytes of attributes (NV|BS|RT), then the variable's data. */
async function efivar(name: string, data: Buffer): Promise<void> {
  await fs.writeFile(path.join(efivars, `${name}-${EFI_GLOBAL}`), Buffer.concat([Buffer.from([7, 0, 0, 0]), data]));
}
const u16s = (...n: number[]): Buffer => Buffer.concat(n.map((x) => Buffer.from([x & 0xff, x >> 8])));

/** The entries a device has after lamadist-boot-entries: a firmware entry, "A" and "B". */
async function entries(): Promise<void> {
  await efivar('Boot0001', loadOption('UEFI QEMU HARDDISK'));
  await efivar('Boot0002', loadOption('A'));
  await efivar('Boot0003', loadOption('B'));
  await efivar('Boot0004', loadOption('BX'));
}

/**
 * Run lamadist-init's functions under busybox sh (the initramfs's shell) with efivarfs and the ESP
 * replaced by directories, and reboot/sleep/release stubbed so the failure policy can be watched.
 */
function sh(code: string, env: Record<string, string> = {}): { out: string; status: number } {
  const prelude = [
    `. '${script}'`,
    `EFIVARS='${efivars}'; ESP_MNT='${esp}'; RUN_DIR='${dir}'`,
    'log() { echo "lamadist-init: $*"; }',
    'reboot() { echo REBOOT; exit 0; }',
    'sleep() { echo SLEEP "$@"; [ "$1" -lt 60 ] || exit 3; }',
    'release() { echo RELEASED; }',
    'esp_quietly() { return 0; }',
    'umount() { :; }',
    'sync() { :; }',
  ].join('\n');
  try {
    const out = execFileSync('busybox', ['sh', '-c', `${prelude}\n${code}`], { env: { ...process.env, ...env }, encoding: 'utf8' });
    return { out, status: 0 };
  } catch (e) {
    const err = e as { stdout: string; status: number };
    return { out: err.stdout, status: err.status };
  }
}

describe('lamadist-init: UEFI boot state', () => {
  it('reads BootCurrent and the first BootOrder entry as Boot#### numbers', async () => {
    await efivar('BootCurrent', u16s(0x10a));
    await efivar('BootOrder', u16s(3, 2, 1));
    expect(sh('read_boot_state; echo "$BOOT_CURRENT $BOOT_FIRST"').out.trim()).toBe('010A 0003');
  });

  it('finds the slot entries by their exact description (RAUC bootname)', async () => {
    await entries();
    expect(sh('slot_entry a; slot_entry b; slot_entry c; echo end').out.trim().split('\n')).toEqual(['0002', '0003', 'end']);
  });

  it('a BootNext into the slot is a trial boot; the first of BootOrder or a firmware entry is not', async () => {
    await entries();
    const trial = async (current: number, order: number[], slot: string): Promise<string> => {
      await efivar('BootCurrent', u16s(current));
      await efivar('BootOrder', u16s(...order));
      return sh(`SLOT=${slot}; read_boot_state; detect_trial; echo "trial=$TRIAL"`).out.trim().split('\n').pop() ?? '';
    };
    expect(await trial(3, [2, 1], 'b')).toBe('trial=1');
    expect(await trial(3, [3, 2], 'b')).toBe('trial=');
    expect(await trial(1, [2, 3], 'a')).toBe('trial=');
    await fs.rm(path.join(efivars, `BootCurrent-${EFI_GLOBAL}`));
    expect(sh('SLOT=b; read_boot_state; detect_trial; echo "trial=$TRIAL current=$BOOT_CURRENT"').out.trim()).toBe('trial= current=');
  });

  it('writes BootNext as efivarfs wants it: attributes and the little-endian number in one file', async () => {
    expect(sh('efi_set_u16 BootNext 010A').status).toBe(0);
    const bytes = await fs.readFile(path.join(efivars, `BootNext-${EFI_GLOBAL}`));
    expect([...bytes]).toEqual([7, 0, 0, 0, 0x0a, 0x01]);
  });
});

describe('lamadist-init: what a failed boot does', () => {
  const failing = (slot: 'a' | 'b'): string => `SLOT=${slot}; OTHER=${slot === 'a' ? 'b' : 'a'}; read_boot_state; detect_trial; fail "dm-verity: rootfs_${slot} does not match"`;

  it('a failed trial boot reboots into BootOrder without touching BootNext or the ESP', async () => {
    await entries();
    await efivar('BootCurrent', u16s(3));
    await efivar('BootOrder', u16s(2, 3));
    const r = sh(failing('b'));
    expect(r.out).toContain("slot b failed its trial boot; rebooting into the firmware's BootOrder (Boot0002)");
    expect(r.out.trim().endsWith('REBOOT')).toBe(true);
    await expect(fs.access(path.join(efivars, `BootNext-${EFI_GLOBAL}`))).rejects.toThrow();
    expect(await fs.readdir(esp)).toEqual([]);
  });

  it("the firmware's first choice failing gives the other slot one try, then stops in an emergency", async () => {
    await entries();
    await efivar('BootCurrent', u16s(3));
    await efivar('BootOrder', u16s(3, 2));
    const first = sh(failing('b'));
    expect(first.out).toContain('slot b cannot boot; trying slot a once (BootNext=Boot0002)');
    expect(first.out.trim().endsWith('REBOOT')).toBe(true);
    expect([...(await fs.readFile(path.join(efivars, `BootNext-${EFI_GLOBAL}`)))]).toEqual([7, 0, 0, 0, 2, 0]);
    expect(await fs.readFile(path.join(esp, 'lamadist/fallback'), 'utf8')).toBe('b\n');

    // Slot a fails its try (a trial: BootNext), the firmware boots b again, which fails again.
    await fs.rm(path.join(efivars, `BootNext-${EFI_GLOBAL}`));
    await efivar('BootCurrent', u16s(2));
    expect(sh(failing('a')).out).toContain('slot a failed its trial boot');
    await efivar('BootCurrent', u16s(3));
    const again = sh(failing('b'));
    expect(again.out).toContain('EMERGENCY: no bootable slot: dm-verity: rootfs_b does not match (slot a was tried after slot b failed before and did not boot either)');
    expect(again.out).not.toContain('REBOOT');
    expect(again.status).toBe(3);
  });

  it('stops in an emergency when there is no other slot entry to fall back to', async () => {
    await efivar('Boot0001', loadOption('UEFI QEMU HARDDISK'));
    await efivar('BootCurrent', u16s(1));
    await efivar('BootOrder', u16s(1));
    const r = sh(failing('a'));
    expect(r.out).toContain('EMERGENCY: no bootable slot: dm-verity: rootfs_a does not match (no UEFI Boot entry for slot b to fall back to)');
    expect(r.out).not.toContain('REBOOT');
  });

  it('without UEFI boot variables (U-Boot counts attempts) it reboots after a delay', () => {
    const r = sh(failing('a'));
    expect(r.out).toContain('rebooting in 10 s so the bootloader can count this attempt');
    expect(r.out.trim().endsWith('REBOOT')).toBe(true);
  });

  it('a slot that boots clears the fallback note', async () => {
    await fs.mkdir(path.join(esp, 'lamadist'), { recursive: true });
    const root = await fs.mkdtemp(path.join(dir, 'root-'));
    await fs.mkdir(path.join(root, 'boot/lamadist'), { recursive: true });
    await fs.writeFile(path.join(root, 'boot/lamadist/fallback'), 'b\n');
    const r = sh(`SLOT=a; ROOT_MNT='${root}'; clear_fallback`);
    expect(r.out).toContain('slot a boots after slot b failed; the fallback is over');
    await expect(fs.access(path.join(root, 'boot/lamadist/fallback'))).rejects.toThrow();
  });
});

describe('device boot variables in the OVMF store', () => {
  async function store(): Promise<string> {
    const file = path.join(dir, `vars-${Math.random().toString(16).slice(2)}.fd`);
    const add = (name: string, data: Buffer) => ({ name, guid: GUID.globalVariable, attributes: 7, data });
    const template = await fs.readFile(OVMF.vars);
    await fs.writeFile(
      file,
      addStoreVariables(template, [add('Boot0001', loadOption('UEFI QEMU HARDDISK')), add('Boot0003', loadOption('A')), add('Boot0004', loadOption('B')), add('BootOrder', u16s(3, 4, 1))]),
    );
    return file;
  }

  it('reads BootOrder and the entries, and sets BootNext to a slot as RAUC does', async () => {
    const file = await store();
    const before = await readBootVariables(file);
    expect(before).toEqual({ order: ['0003', '0004', '0001'], entries: { '0001': 'UEFI QEMU HARDDISK', '0003': 'A', '0004': 'B' } });
    expect(await setBootNext(file, 'b')).toBe('0004');
    expect((await readBootVariables(file)).next).toBe('0004');
    expect(await setBootNext(file, 'a')).toBe('0003');
    const after = await readBootVariables(file);
    expect(after.next).toBe('0003');
    expect(after.order).toEqual(before.order);
  });

  it('refuses a store without the slot entries', async () => {
    const file = path.join(dir, 'empty-vars.fd');
    await fs.copyFile(OVMF.vars, file);
    await expect(setBootNext(file, 'b')).rejects.toThrow(/has no Boot entry for slot B/);
  });
});

describe('tamperSlot', () => {
  const plan = (encrypted: boolean): ImagePlan =>
    ({
      encrypt: encrypted,
      partitions: [
        { label: 'rootfs_a', offset: 1 << 20, size: 20 << 20, ...(encrypted ? { luksUuid: 'x' } : {}) },
        { label: 'rootfs_b', offset: 21 << 20, size: 20 << 20, ...(encrypted ? { luksUuid: 'y' } : {}) },
      ],
    }) as unknown as ImagePlan;

  it('places image offsets after the LUKS2 header on encrypted slots', () => {
    expect(slotByteOffset(plan(true), 'b', 1024)).toBe((21 << 20) + LUKS2_DATA_OFFSET + 1024);
    expect(slotByteOffset(plan(false), 'b', 1024)).toBe((21 << 20) + 1024);
    expect(() => slotByteOffset(plan(true), 'a', 4 << 20)).toThrow(/outside the root image of slot a/);
  });

  it('flips one byte of the disk and nothing else', async () => {
    const disk = path.join(dir, 'disk.img');
    const bytes = Buffer.alloc(41 << 20, 0x5a);
    await fs.writeFile(disk, bytes);
    const t = await tamperSlot({ disk, plan: plan(true) }, 'b');
    expect(t).toEqual({ slot: 'b', imageOffset: 1024, diskOffset: (21 << 20) + LUKS2_DATA_OFFSET + 1024, before: 0x5a, after: 0x5b });
    const now = await fs.readFile(disk);
    expect(now[t.diskOffset]).toBe(0x5b);
    now[t.diskOffset] = 0x5a;
    expect(now.equals(bytes)).toBe(true);
  });
});

describe('cutPower', () => {
  /** A run that prints lines every 20 ms and, like runQemu, stops (aborted) when its signal fires. */
  const fakeRun =
    (lines: string[]) =>
    ({ signal, onLine }: RunHooks): Promise<QemuResult> =>
      new Promise((resolve) => {
        const started = Date.now();
        let i = 0;
        const done = (aborted: boolean): void => {
          clearInterval(t);
          resolve({ serial: lines.slice(0, i).join('\n'), matched: false, exitCode: aborted ? null : 0, timedOut: false, aborted, stalled: false, resets: 0, durationMs: Date.now() - started, argv: [] });
        };
        const t = setInterval(() => {
          if (i < lines.length) onLine(lines[i++] ?? '');
          else done(false);
        }, 20);
        signal.addEventListener('abort', () => done(true));
      });

  it('kills the run the given delay after the marker', async () => {
    const lines = ['boot', 'lamadist-ddi: installing', ...Array.from({ length: 20 }, (_, i) => `line ${i}`)];
    const r = await cutPower(fakeRun(lines), { name: 'install', after: /installing/, delayMs: 100 });
    expect(r.aborted).toBe(true);
    expect(r.cut.point).toBe('install');
    expect(r.cut.line).toBe('lamadist-ddi: installing');
    expect(r.serial).toContain('line 0');
    expect(r.serial).not.toContain('line 19');
  });

  it('fails when the marker never comes or the run ends first', async () => {
    await expect(cutPower(fakeRun(['a', 'b']), { name: 'never', after: /installing/ })).rejects.toThrow(/power cut "never" did not happen: no serial line matched/);
    await expect(cutPower(fakeRun(['installing', 'b']), { name: 'late', after: /installing/, delayMs: 2000 })).rejects.toThrow(/stopped 2000 ms too early/);
  });
});
