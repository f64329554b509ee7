import { execFileSync, spawnSync } from 'node:child_process';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  DPS_ARCHES,
  DPS_TYPES,
  GPT_ATTRIBUTES,
  attributeNames,
  dpsRoleOf,
  dpsTypeFor,
  encodeGpt,
  planGpt,
  readGpt,
  repairGpt,
  writeGpt,
  type GptTable,
} from '../../src/disk/index.js';
import { UserError } from '../../src/errors.js';
import { runCli } from '../helpers/cli.js';

let dir: string;
const MiB = 1024 * 1024;

beforeAll(async () => {
  dir = await fs.mkdtemp(path.join(os.tmpdir(), 'lamadist-gpt-'));
});
afterAll(async () => {
  await fs.rm(dir, { recursive: true, force: true });
});

interface SfdiskJson {
  partitiontable: {
    label: string;
    id: string;
    firstlba: number;
    lastlba: number;
    partitions: { start: number; size: number; type: string; uuid: string; name?: string; attrs?: string }[];
  };
}

function sfdisk(image: string): SfdiskJson {
  return JSON.parse(execFileSync('sfdisk', ['--json', image], { encoding: 'utf8' })) as SfdiskJson;
}

function sgdiskVerify(image: string): string {
  return execFileSync('sgdisk', ['-v', image], { encoding: 'utf8' });
}

async function writeImage(name: string, t: GptTable): Promise<string> {
  const file = path.join(dir, name);
  const h = await fs.open(file, 'w+');
  await h.truncate(Number(t.diskSectors) * t.sectorSize);
  await writeGpt(h, t);
  await h.close();
  return file;
}

function abLayout(diskSize?: number): GptTable {
  const x = (role: string): string => dpsTypeFor(role, 'x86-64');
  return planGpt({
    diskSize,
    diskGuid: '11111111-2222-4333-8444-555555555555',
    partitions: [
      { name: 'esp', typeGuid: x('esp'), size: 8 * MiB, uuid: 'aaaaaaaa-0000-4000-8000-000000000001' },
      { name: 'rootfs_a', typeGuid: x('root'), size: 12 * MiB + 5, attributes: 1n << 60n },
      { name: 'verity_a', typeGuid: x('root-verity'), size: 1 * MiB, attributes: (1n << 60n) | (1n << 63n) },
      { name: 'rootfs_b', typeGuid: x('root'), size: 12 * MiB, attributes: 1n << 63n },
      { name: 'verity_b', typeGuid: x('root-verity'), size: 1 * MiB },
      { name: 'var', typeGuid: x('var'), size: 4 * MiB, grow: true, attributes: 1n << 59n },
    ],
  });
}

describe('DPS type table', () => {
  it('matches every entry of systemd-id128 show', () => {
    const out = execFileSync('systemd-id128', ['show'], { encoding: 'utf8' });
    const theirs = new Map<string, string>();
    for (const line of out.trim().split('\n').slice(1)) {
      const [name, id] = line.trim().split(/\s+/) as [string, string];
      theirs.set(
        name,
        `${id.slice(0, 8)}-${id.slice(8, 12)}-${id.slice(12, 16)}-${id.slice(16, 20)}-${id.slice(20)}`,
      );
    }
    let compared = 0;
    for (const t of DPS_TYPES) {
      const name = t.arch ? `${t.role.replace(/^(root|usr)/, `$1-${t.arch}`)}` : t.role;
      expect(theirs.get(name), name).toBe(t.uuid);
      compared++;
    }
    expect(compared).toBe(DPS_ARCHES.length * 6 + 9);
    // and nothing systemd knows per architecture is missing from ours
    for (const name of theirs.keys()) {
      if (/^(root|usr)-secondary/.test(name) || /^(root|usr)(-verity(-sig)?)?$/.test(name)) continue;
      expect(
        DPS_TYPES.some((t) => (t.arch ? t.role.replace(/^(root|usr)/, `$1-${t.arch}`) : t.role) === name),
        name,
      ).toBe(true);
    }
  });

  it('maps both ways', () => {
    expect(dpsTypeFor('root', 'arm64')).toBe('b921b045-1df0-41c3-af44-4c6f280d3fae');
    expect(dpsTypeFor('esp')).toBe('c12a7328-f81f-11d2-ba4b-00a0c93ec93b');
    expect(dpsRoleOf('B921B045-1DF0-41C3-AF44-4C6F280D3FAE')).toEqual({
      uuid: 'b921b045-1df0-41c3-af44-4c6f280d3fae',
      role: 'root',
      arch: 'arm64',
    });
    expect(dpsRoleOf('4d21b016-b534-45c2-a9fb-5c16e091fd2d')?.role).toBe('var');
    expect(dpsRoleOf('00000000-0000-0000-0000-000000000001')).toBeUndefined();
    expect(() => dpsTypeFor('root')).toThrow(UserError);
    expect(() => dpsTypeFor('root', 'vax')).toThrow(/unknown DPS architecture 'vax'/);
    expect(() => dpsTypeFor('boot')).toThrow(/unknown partition role 'boot'/);
  });
});

describe('GPT writing', () => {
  it('plans 1 MiB-aligned partitions and lets the last one grow', () => {
    const t = abLayout(64 * MiB);
    expect(t.partitions.map((p) => Number(p.firstLba) % 2048)).toEqual([0, 0, 0, 0, 0, 0]);
    expect(t.partitions[1]?.firstLba).toBe(BigInt((1 + 8) * 2048));
    // 12 MiB + 5 bytes rounds up to 13 MiB
    expect(Number((t.partitions[1]?.lastLba as bigint) - (t.partitions[1]?.firstLba as bigint) + 1n)).toBe(
      13 * 2048,
    );
    expect(Number((t.partitions[5]?.lastLba as bigint) + 1n) % 2048).toBe(0);
    expect(t.partitions[5]?.lastLba).toBeLessThanOrEqual(t.lastUsableLba);
    expect(() => abLayout(32 * MiB)).toThrow(/partitions need \d+ bytes but the disk has 33554432/);
  });

  it('is read by sfdisk with identical types, offsets, names and attributes, and sgdisk -v finds no problems', async () => {
    const t = abLayout(64 * MiB);
    const img = await writeImage('ab.img', t);
    const verify = sgdiskVerify(img);
    expect(verify).toMatch(/No problems found/);
    const j = sfdisk(img).partitiontable;
    expect(j.label).toBe('gpt');
    expect(j.id.toLowerCase()).toBe(t.diskGuid);
    expect(j.firstlba).toBe(34);
    expect(j.lastlba).toBe(Number(t.lastUsableLba));
    expect(j.partitions).toHaveLength(6);
    j.partitions.forEach((p, i) => {
      const ours = t.partitions[i];
      expect(p.type.toLowerCase()).toBe(ours?.typeGuid);
      expect(p.uuid.toLowerCase()).toBe(ours?.uuid);
      expect(p.start).toBe(Number(ours?.firstLba));
      expect(p.size).toBe(Number((ours?.lastLba as bigint) - (ours?.firstLba as bigint) + 1n));
      expect(p.name).toBe(ours?.name);
    });
    expect(j.partitions[1]?.attrs).toBe('GUID:60');
    expect(j.partitions[2]?.attrs).toBe('GUID:60,63');
    expect(j.partitions[5]?.attrs).toBe('GUID:59');
    // sgdisk reads the names and types back too
    const info = execFileSync('sgdisk', ['-i', '3', img], { encoding: 'utf8' });
    expect(info).toMatch(/Partition name: 'verity_a'/);
    expect(info).toMatch(/2C7357ED-EBD2-46D9-AEC1-23D437EC2BF5/);
  });

  it('round-trips through our reader and encodes deterministically', async () => {
    const t = abLayout(64 * MiB);
    const img = await writeImage('rt.img', t);
    const r = await readGpt(img);
    expect(r.source).toBe('primary');
    expect(r.problems).toEqual([]);
    expect(r.table).toEqual(t);
    const a = encodeGpt(t);
    const b = encodeGpt(r.table);
    expect(a.head.equals(b.head) && a.tail.equals(b.tail)).toBe(true);
    expect(attributeNames((1n << 60n) | (1n << 63n) | (1n << 48n))).toEqual([
      'bit:48',
      'read-only',
      'no-auto',
    ]);
    expect(GPT_ATTRIBUTES['grow-fs']).toBe(59);
  });

  it('supports 4096-byte sectors', async () => {
    const t = planGpt({
      sectorSize: 4096,
      diskSize: 16 * MiB,
      partitions: [{ name: 'data', typeGuid: dpsTypeFor('linux-generic'), size: 4 * MiB }],
    });
    expect(t.firstUsableLba).toBe(6n);
    const img = await writeImage('4k.img', t);
    const r = await readGpt(img);
    expect(r.table.sectorSize).toBe(4096);
    expect(r.table.partitions[0]?.firstLba).toBe(256n);
  });
});

describe('GPT reading', () => {
  it('reads a table written by sgdisk', async () => {
    const img = path.join(dir, 'sg.img');
    await fs.writeFile(img, '');
    await fs.truncate(img, 48 * MiB);
    execFileSync('sgdisk', [
      '-n1:1M:+8M',
      '-t1:C12A7328-F81F-11D2-BA4B-00A0C93EC93B',
      '-c1:efi system',
      '-A1:set:0',
      '-n2:0:+16M',
      `-t2:${dpsTypeFor('root', 'arm64')}`,
      '-c2:rootfs_a',
      '-n3:0:0',
      `-t3:${dpsTypeFor('var')}`,
      '-c3:var',
      img,
    ]);
    const r = await readGpt(img);
    const j = sfdisk(img).partitiontable;
    expect(r.problems).toEqual([]);
    expect(
      r.table.partitions.map((p) => [
        p.name,
        dpsRoleOf(p.typeGuid)?.role,
        dpsRoleOf(p.typeGuid)?.arch ?? null,
      ]),
    ).toEqual([
      ['efi system', 'esp', null],
      ['rootfs_a', 'root', 'arm64'],
      ['var', 'var', null],
    ]);
    expect(r.table.partitions.map((p) => Number(p.firstLba))).toEqual(j.partitions.map((p) => p.start));
    expect(r.table.partitions.map((p) => p.uuid.toUpperCase())).toEqual(j.partitions.map((p) => p.uuid));
    expect(attributeNames(r.table.partitions[0]?.attributes as bigint)).toEqual(['required']);
  });

  it('reads a table written by systemd-repart', async () => {
    const defs = path.join(dir, 'repart.d');
    await fs.mkdir(defs, { recursive: true });
    await fs.writeFile(
      path.join(defs, '10-esp.conf'),
      '[Partition]\nType=esp\nSizeMinBytes=8M\nSizeMaxBytes=8M\n',
    );
    await fs.writeFile(
      path.join(defs, '20-root.conf'),
      '[Partition]\nType=root-x86-64\nLabel=rootfs_a\nSizeMinBytes=16M\nSizeMaxBytes=16M\n',
    );
    await fs.writeFile(path.join(defs, '30-var.conf'), '[Partition]\nType=var\nLabel=var\n');
    const img = path.join(dir, 'repart.img');
    execFileSync(
      'systemd-repart',
      [
        '--empty=create',
        '--size=64M',
        `--definitions=${defs}`,
        '--dry-run=no',
        '--seed=f00dfeed-0000-4000-8000-000000000000',
        img,
      ],
      { stdio: 'pipe' },
    );
    const r = await readGpt(img);
    expect(r.problems).toEqual([]);
    expect(r.table.partitions.map((p) => dpsRoleOf(p.typeGuid)?.role)).toEqual(['esp', 'root', 'var']);
    expect(r.table.partitions[1]?.name).toBe('rootfs_a');
    const j = sfdisk(img).partitiontable;
    expect(r.table.partitions.map((p) => [Number(p.firstLba), Number(p.lastLba - p.firstLba + 1n)])).toEqual(
      j.partitions.map((p) => [p.start, p.size]),
    );
  });

  it('detects a corrupt primary header, recovers from the backup, and repairs it (sgdisk agrees)', async () => {
    const t = abLayout(64 * MiB);
    const img = await writeImage('corrupt.img', t);
    const h = await fs.open(img, 'r+');
    await h.write(Buffer.from([0x5a]), 0, 1, 512 + 40);
    await h.close();
    expect(spawnSync('sgdisk', ['-v', img], { encoding: 'utf8' }).stdout).toMatch(/CRC|problem/i);

    const err = await readGpt(img).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(UserError);
    expect((err as UserError).code).toBe('LAMA_E_GPT_CORRUPT');
    expect((err as UserError).line()).toMatch(/primary GPT header at LBA 1: header CRC32 .* gpt repair/);

    const loose = await readGpt(img, { strict: false });
    expect(loose.source).toBe('backup');
    expect(loose.table.partitions).toEqual(t.partitions);

    const shown = await runCli(['gpt', 'show', img]);
    expect(shown.code).toBe(2);
    expect(shown.stdout).toMatch(/table from backup GPT/);
    expect(shown.stdout).toMatch(/rootfs_a\s+root \(x86-64\)/);
    expect(shown.stderr.trim().split('\n')).toHaveLength(1);
    expect(shown.stderr).toMatch(/LAMA_E_GPT_CORRUPT/);

    const fixed = await repairGpt(img);
    expect(fixed.before[0]).toMatch(/primary GPT header/);
    expect(sgdiskVerify(img)).toMatch(/No problems found/);
    expect((await readGpt(img)).problems).toEqual([]);
  });

  it('detects a damaged entry array and a truncated image', async () => {
    const t = abLayout(64 * MiB);
    const img = await writeImage('entries.img', t);
    const h = await fs.open(img, 'r+');
    await h.write(Buffer.from('X'), 0, 1, 1024 + 128 + 60);
    await h.close();
    await expect(readGpt(img)).rejects.toThrow(/primary GPT entry array at LBA 2: CRC32/);

    const cut = await writeImage('cut.img', t);
    await fs.truncate(cut, 40 * MiB);
    const e = await readGpt(cut).catch((x: unknown) => x);
    expect((e as UserError).code).toBe('LAMA_E_IMAGE_TRUNCATED');
    expect((e as UserError).line()).toMatch(/describes 67108864 bytes but the file has 41943040/);

    const junk = path.join(dir, 'junk.img');
    await fs.writeFile(junk, Buffer.alloc(1 * MiB, 0x41));
    const cli = await runCli(['gpt', 'show', junk]);
    expect(cli.code).toBe(2);
    expect(cli.stderr).toMatch(/no valid GPT/);
  });

  it('prints JSON with roles', async () => {
    const img = await writeImage('json.img', abLayout(64 * MiB));
    const r = await runCli(['--json', 'gpt', 'show', img]);
    expect(r.code, r.stderr).toBe(0);
    const j = JSON.parse(r.stdout) as {
      partitions: { name: string; role: string; arch: string | null; offset: number; attributes: string[] }[];
    };
    expect(j.partitions.map((p) => `${p.name}:${p.role}:${p.arch}`)).toEqual([
      'esp:esp:null',
      'rootfs_a:root:x86-64',
      'verity_a:root-verity:x86-64',
      'rootfs_b:root:x86-64',
      'verity_b:root-verity:x86-64',
      'var:var:null',
    ]);
    expect(j.partitions[0]?.offset).toBe(MiB);
    expect(j.partitions[2]?.attributes).toEqual(['read-only', 'no-auto']);
  });
});
