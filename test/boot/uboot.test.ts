import { spawnSync } from 'node:child_process';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { crc32 } from 'node:zlib';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  PFLASH_KEPT_BYTES,
  UBOOT_ENV,
  compileBootScript,
  completeEnvWrite,
  createEnvFlash,
  mkimageScriptArgs,
  parseUbootEnv,
  planUbootQemu,
  readUbootEnv,
} from '../../src/vm/index.js';
import { REPO_ROOT } from '../helpers/cli.js';

const RECIPE_DIR = path.join(REPO_ROOT, 'meta-lamadist/recipes-bsp/lamadist-boot-script');

/** An environment area as U-Boot's saveenv writes it: CRC32, `name=value\0`…, zero padding. */
function envArea(vars: Record<string, string>): Buffer {
  const area = Buffer.alloc(UBOOT_ENV.size);
  Buffer.from(Object.entries(vars).map(([k, v]) => `${k}=${v}\0`).join(''), 'latin1').copy(area, 4);
  area.writeUInt32LE(crc32(area.subarray(4)), 0);
  return area;
}

/** What QEMU 7.2's flash model leaves of that write: the first write buffer of each 128 KiB sector. */
function cutShort(area: Buffer): Buffer {
  const cut = Buffer.from(area);
  for (let sector = 0; sector < cut.length; sector += 0x20000) cut.fill(0xff, sector + PFLASH_KEPT_BYTES, sector + 0x20000);
  return cut;
}

let tmp: string;
beforeAll(async () => {
  tmp = await fs.mkdtemp(path.join(os.tmpdir(), 'lamadist-uboot-unit-'));
});
afterAll(async () => {
  await fs.rm(tmp, { recursive: true, force: true });
});

async function flashWith(area: Buffer): Promise<string> {
  const f = path.join(tmp, `flash-${Math.random().toString(16).slice(2)}.img`);
  await createEnvFlash(f);
  const h = await fs.open(f, 'r+');
  await h.write(area, 0, area.length, UBOOT_ENV.offset);
  await h.close();
  return f;
}

describe('boot.scr compilation', () => {
  it('uses the argv of the recipe do_compile', async () => {
    const bb = await fs.readFile(path.join(RECIPE_DIR, 'lamadist-boot-script_1.0.bb'), 'utf8');
    const line = /^\s*uboot-mkimage (.*)$/m.exec(bb)?.[1];
    expect(line).toBeDefined();
    const words = (line ?? '').match(/"[^"]*"|\S+/g)?.map((w) => w.replace(/^"(.*)"$/, '$1')) ?? [];
    const recipe = words.map((w) =>
      w.replace('${UBOOT_ARCH}', 'arm64').replace('${S}/boot.cmd', 'SRC').replace('${B}/boot.scr', 'OUT'),
    );
    expect(mkimageScriptArgs('SRC', 'OUT', 'arm64')).toEqual(recipe);
  });

  it('mkimage makes an arm64 script image of boot.cmd', async () => {
    const out = path.join(tmp, 'boot.scr');
    await compileBootScript(path.join(RECIPE_DIR, 'files/boot.cmd'), out);
    const r = spawnSync('mkimage', ['-l', out], { encoding: 'utf8' });
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toContain('Image Name:   LamaDist A/B');
    expect(r.stdout).toContain('AArch64 Linux Script (uncompressed)');
  });
});

describe('U-Boot environment in flash', () => {
  it('parses a saved environment and rejects a wrong CRC', () => {
    const area = envArea({ BOOT_ORDER: 'A B', BOOT_A_LEFT: '2', bootdelay: '1' });
    expect(parseUbootEnv(area)).toEqual({ BOOT_ORDER: 'A B', BOOT_A_LEFT: '2', bootdelay: '1' });
    area.writeUInt8(area.readUInt8(5) ^ 1, 5);
    expect(parseUbootEnv(area)).toBeUndefined();
  });

  it('completes a write that QEMU cut short, only when U-Boot\'s CRC then matches', async () => {
    const vars = { BOOT_ORDER: 'B A', BOOT_A_LEFT: '3', BOOT_B_LEFT: '1', text: 'x'.repeat(3000) };
    const f = await flashWith(cutShort(envArea(vars)));
    expect(await readUbootEnv(f)).toBeUndefined();
    expect(await completeEnvWrite(f)).toBe('completed');
    expect(await readUbootEnv(f)).toEqual(vars);
    expect(await completeEnvWrite(f)).toBe('intact');
  });

  it('refuses to complete an environment larger than QEMU kept', async () => {
    const f = await flashWith(cutShort(envArea({ BOOT_ORDER: 'A B', text: 'x'.repeat(5000) })));
    await expect(completeEnvWrite(f)).rejects.toThrow(/does not match its CRC/);
  });

  it('leaves a never-written flash alone', async () => {
    const f = path.join(tmp, 'blank.img');
    await createEnvFlash(f);
    expect(await completeEnvWrite(f)).toBe('blank');
    expect((await fs.stat(f)).size).toBe(UBOOT_ENV.flashSize);
  });
});

describe('planUbootQemu', () => {
  it('boots Debian U-Boot with the environment flash and virtio disks, exiting at reset', () => {
    const argv = planUbootQemu({ flash: '/f.img', disks: ['/d0.img', '/d1.img'] });
    expect(argv).toEqual(expect.arrayContaining(['-no-reboot', '-bios', '/usr/lib/u-boot/qemu_arm64/u-boot.bin']));
    expect(argv.join(' ')).toContain('-machine virt -cpu cortex-a57');
    expect(argv).toContain('if=pflash,format=raw,unit=1,file=/f.img');
    expect(argv).toContain('file=/d1.img,format=raw,if=none,id=disk1');
    expect(argv).toContain('virtio-blk-pci,drive=disk0');
  });
});
