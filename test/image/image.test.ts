import { execFileSync, spawnSync } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { getBsp } from '../../src/bsp/index.js';
import { createRandom } from '../../src/disk/random.js';
import { UserError } from '../../src/errors.js';
import { readEspFile } from '../../src/fat/index.js';
import {
  loadLayout,
  parseLayout,
  planImage,
  recoveryKeyText,
  withSizes,
  type ImagePlan,
  type SlotContent,
} from '../../src/image/index.js';
import { runCli } from '../helpers/cli.js';

const MiB = 1024 * 1024;
let dir: string;
let rootfs: string;
let kernel: string;
let initrd: string;

/** Small partition sizes so test images stay a few tens of MiB (sparse). */
const SMALL = ['--size', 'esp=16', '--size', 'verity_a=1', '--size', 'verity_b=1'];

beforeAll(async () => {
  dir = await fs.mkdtemp(path.join(os.tmpdir(), 'lamadist-image-'));
  rootfs = path.join(dir, 'rootfs');
  await fs.mkdir(path.join(rootfs, 'etc'), { recursive: true });
  await fs.mkdir(path.join(rootfs, 'usr/share/lamadist'), { recursive: true });
  await fs.writeFile(path.join(rootfs, 'etc/os-release'), 'ID=lamadist\nNAME=LamaDist\nVERSION_ID=1.0\n');
  await fs.writeFile(path.join(rootfs, 'usr/share/lamadist/payload'), randomBytes(1500 * 1024));
  kernel = path.join(dir, 'vmlinuz');
  await fs.writeFile(kernel, randomBytes(64 * 1024));
  initrd = path.join(dir, 'initrd');
  await fs.writeFile(initrd, 'initrd');
});
afterAll(async () => {
  await fs.rm(dir, { recursive: true, force: true });
});

function build(out: string, extra: string[]): ReturnType<typeof runCli> {
  return runCli(
    [
      '--json',
      'image',
      'build',
      '-o',
      out,
      '--rootfs',
      rootfs,
      '--kernel',
      kernel,
      '--initrd',
      initrd,
      '--source-date-epoch',
      '1700000000',
      ...SMALL,
      ...extra,
    ],
    { timeoutMs: 300_000 },
  );
}

async function extract(image: string, offset: number, size: number, out: string): Promise<string> {
  const h = await fs.open(image, 'r');
  const buf = Buffer.alloc(size);
  await h.read(buf, 0, size, offset);
  await h.close();
  await fs.writeFile(out, buf);
  return out;
}

const sha256 = async (f: string): Promise<string> =>
  createHash('sha256')
    .update(await fs.readFile(f))
    .digest('hex');

function part(plan: ImagePlan, label: string): ImagePlan['partitions'][number] {
  const p = plan.partitions.find((x) => x.label === label);
  if (!p) throw new Error(`no partition ${label}`);
  return p;
}

describe('layouts and the pure plan', () => {
  const slot: SlotContent = {
    erofs: { uuid: '00000000-0000-4000-8000-000000000001', bytes: 5 * MiB },
    verity: {
      rootHash: 'ab'.repeat(32),
      salt: '00',
      uuid: '00000000-0000-4000-8000-000000000002',
      hashTreeBytes: 12288,
      dataBlocks: 1280,
    },
    uki: { cmdline: 'roothash=abab lamadist.slot=a', bytes: 200000, signed: false },
  };

  it('loads every shipped layout and places partitions in order with DPS types of the architecture', async () => {
    for (const name of ['x86-64', 'aarch64', 'rockchip']) {
      const l = await loadLayout(name);
      expect(l.partitions.map((p) => p.label)).toEqual([
        'esp',
        'rootfs_a',
        'verity_a',
        'rootfs_b',
        'verity_b',
        'var',
      ]);
    }
    const { plan, gpt } = planImage({
      bsp: getBsp('x86_64'),
      layout: await loadLayout('x86-64'),
      encrypt: true,
      timestamp: 0,
      random: createRandom('x'),
      slots: { a: slot, b: slot },
    });
    expect(plan.partitions.map((p) => p.offset % MiB)).toEqual([0, 0, 0, 0, 0, 0]);
    expect(part(plan, 'esp').offset).toBe(MiB);
    expect(part(plan, 'rootfs_a').size).toBe(2048 * MiB);
    expect(part(plan, 'rootfs_a').typeGuid).toBe('4f68bce3-e8cd-4db1-96e7-fbcaf984b709');
    expect(part(plan, 'verity_b').typeGuid).toBe('2c7357ed-ebd2-46d9-aec1-23d437ec2bf5');
    expect(part(plan, 'var').content).toBe('ext4');
    expect(part(plan, 'rootfs_b').luksUuid).toBeDefined();
    expect(gpt.partitions).toHaveLength(6);
    expect(plan.esp.files.map((f) => f.path)).toEqual([
      '/EFI/BOOT/BOOTX64.EFI',
      '/EFI/Linux/lamadist-a.efi',
      '/EFI/Linux/lamadist-b.efi',
      '/lamadist/provision.key',
    ]);
    const arm = planImage({
      bsp: getBsp('orin-nx'),
      layout: await loadLayout('aarch64'),
      encrypt: false,
      timestamp: 0,
      random: createRandom('x'),
      slots: { a: slot },
    });
    expect(part(arm.plan, 'rootfs_a').typeGuid).toBe('b921b045-1df0-41c3-af44-4c6f280d3fae');
    expect(part(arm.plan, 'rootfs_b').content).toBe('empty');
    expect(arm.plan.keys).toBeUndefined();
  });

  it('rejects a rootfs bigger than its slot, naming the slot and the fix', async () => {
    const layout = withSizes(await loadLayout('x86-64'), { rootfs_a: 20, rootfs_b: 20 });
    const e = (() => {
      try {
        planImage({
          bsp: getBsp('x86_64'),
          layout,
          encrypt: true,
          timestamp: 0,
          random: createRandom('x'),
          slots: { a: slot },
        });
      } catch (err) {
        return err;
      }
      return undefined;
    })();
    expect(e).toBeInstanceOf(UserError);
    expect((e as UserError).code).toBe('LAMA_E_ROOTFS_TOO_BIG');
    expect((e as UserError).message).toMatch(
      /rootfs image is 5 MiB but slot rootfs_a is 20 MiB \(4 MiB after the 16 MiB LUKS2 header\).*--size rootfs_a=/,
    );
    expect(() => withSizes(layout, { rootfs_c: 5 })).toThrow(/does not have/);
  });

  it('needs the Rockchip boot loader parts', async () => {
    const rk = await loadLayout('rockchip');
    expect(() =>
      planImage({
        bsp: getBsp('rk1'),
        layout: rk,
        encrypt: false,
        timestamp: 0,
        random: createRandom('x'),
        slots: { a: slot },
      }),
    ).toThrow(/--raw idbloader=<file>/);
    const { plan } = planImage({
      bsp: getBsp('rk1'),
      layout: rk,
      encrypt: false,
      timestamp: 0,
      random: createRandom('x'),
      slots: { a: slot },
      raw: [
        { name: 'idbloader', bytes: 1000 },
        { name: 'u-boot', bytes: 2000 },
      ],
    });
    expect(plan.raw).toEqual([
      { name: 'idbloader', offset: 32768, bytes: 1000 },
      { name: 'u-boot', offset: 8 * MiB, bytes: 2000 },
    ]);
    expect(part(plan, 'esp').offset).toBe(16 * MiB);
  });

  it('reports layout mistakes at file:line:col', () => {
    const text = 'arch: x86-64\npartitions:\n  - label: esp\n    role: espp\n    size-mib: 5\n';
    expect(() => parseLayout(text, 'bad.yaml')).toThrow(
      expect.objectContaining({ where: 'bad.yaml:4:11', code: 'LAMA_E_LAYOUT' }),
    );
    expect(() =>
      parseLayout('arch: x86-64\npartitions:\n  - label: esp\n    role: esp\n    size-mib: -1\n', 'b.yaml'),
    ).toThrow(expect.objectContaining({ where: 'b.yaml:5:15' }));
    expect(() => parseLayout('arch: [\n', 'c.yaml')).toThrow(
      expect.objectContaining({ code: 'LAMA_E_YAML' }),
    );
  });
});

describe('lamadist image build (encrypted)', () => {
  let image: string;
  let plan: ImagePlan;
  beforeAll(async () => {
    image = path.join(dir, 'disk.img');
    const r = await build(image, ['--slot-size', '24', '--size', 'var=24', '--seed', 'test-seed']);
    if (r.code !== 0) throw new Error(r.stderr);
    plan = JSON.parse(r.stdout) as ImagePlan;
  });

  it('writes a GPT that sgdisk -v and sfdisk read with our types, offsets and names', () => {
    expect(execFileSync('sgdisk', ['-v', image], { encoding: 'utf8' })).toMatch(/No problems found/);
    const j = JSON.parse(execFileSync('sfdisk', ['--json', image], { encoding: 'utf8' })) as {
      partitiontable: { partitions: { start: number; type: string; name: string; uuid: string }[] };
    };
    expect(
      j.partitiontable.partitions.map((p) => [
        p.name,
        p.type.toLowerCase(),
        p.start * 512,
        p.uuid.toLowerCase(),
      ]),
    ).toEqual(plan.partitions.map((p) => [p.label, p.typeGuid, p.offset, p.uuid]));
  });

  it('holds LUKS2 containers cryptsetup reads and opens with the recovery key (0600) and the ESP provisioning key', async () => {
    const keyFile = `${image}.recovery-key`;
    expect((await fs.stat(keyFile)).mode & 0o777).toBe(0o600);
    expect(await fs.readFile(keyFile, 'utf8')).toMatch(/^([cbdefghijklnrtuv]{8}-){7}[cbdefghijklnrtuv]{8}$/);
    const esp = part(plan, 'esp');
    const provision = path.join(dir, 'provision.key');
    await fs.writeFile(provision, await readEspFile(image, esp.offset, '/lamadist/provision.key'));
    for (const label of ['rootfs_a', 'rootfs_b', 'var']) {
      const p = part(plan, label);
      const file = await extract(image, p.offset, p.size, path.join(dir, `${label}.part`));
      const dump = spawnSync('cryptsetup', ['luksDump', file], { encoding: 'utf8' });
      expect(dump.status, dump.stderr).toBe(0);
      expect(dump.stdout).toContain(`UUID:          \t${p.luksUuid}`);
      expect(dump.stdout).toMatch(new RegExp(`Label:\\s+${label}`));
      expect(
        spawnSync('cryptsetup', ['open', '--test-passphrase', '--key-slot', '0', '--key-file', keyFile, file])
          .status,
      ).toBe(0);
      expect(
        spawnSync('cryptsetup', [
          'open',
          '--test-passphrase',
          '--key-slot',
          '1',
          '--key-file',
          provision,
          file,
        ]).status,
      ).toBe(0);
      await fs.rm(file);
    }
  });

  it('is byte-identical when built again with the same inputs and seed', async () => {
    const again = path.join(dir, 'again.img');
    const r = await build(again, ['--slot-size', '24', '--size', 'var=24', '--seed', 'test-seed']);
    expect(r.code, r.stderr).toBe(0);
    expect(await sha256(again)).toBe(await sha256(image));
    await Promise.all([fs.rm(again), fs.rm(`${again}.recovery-key`)]);
    // Every key and salt comes from the seed, so another seed changes them all.
    expect(recoveryKeyText(createRandom('other-seed'))).not.toBe(
      await fs.readFile(`${image}.recovery-key`, 'utf8'),
    );
    expect(recoveryKeyText(createRandom('test-seed'))).toBe(
      await fs.readFile(`${image}.recovery-key`, 'utf8'),
    );
  });

  it('inspect unlocks with the key, verifies both slots and shows the UKI command lines', async () => {
    const r = await runCli(['--json', 'image', 'inspect', image, '--key', `${image}.recovery-key`]);
    expect(r.code, r.stderr).toBe(0);
    const j = JSON.parse(r.stdout) as {
      slots: { slot: string; rootHash: string; verified: boolean }[];
      esp: { files: string[]; ukis: { path: string; cmdline: string }[] };
      partitions: { label: string; erofs?: { uuid: string }; ext4?: { label: string } }[];
    };
    const rootHash = plan.slots[0]?.verity?.rootHash as string;
    expect(j.slots).toEqual([
      { slot: 'a', rootHash, uki: '/EFI/Linux/lamadist-a.efi', verified: true },
      { slot: 'b', rootHash, uki: '/EFI/Linux/lamadist-b.efi', verified: true },
    ]);
    expect(j.esp.ukis.find((u) => u.path === '/EFI/BOOT/BOOTX64.EFI')?.cmdline).toBe(
      `roothash=${rootHash} lamadist.slot=a rauc.slot=A console=ttyS0,115200 rw`,
    );
    expect(j.partitions.find((p) => p.label === 'rootfs_a')?.erofs?.uuid).toBe(plan.slots[0]?.erofs?.uuid);
    expect(j.partitions.find((p) => p.label === 'var')?.ext4?.label).toBe('var');

    const human = await runCli(['image', 'inspect', image]);
    expect(human.code, human.stderr).toBe(0);
    expect(human.stdout).toMatch(/slot a: root hash [0-9a-f]{64}, not verified \(encrypted: pass --key\)/);
  });

  it('rejects a wrong key in one line', async () => {
    const wrong = path.join(dir, 'wrong.key');
    await fs.writeFile(wrong, 'not-the-key');
    const r = await runCli(['image', 'inspect', image, '--key', wrong]);
    expect(r.code).toBe(2);
    expect(r.stderr.trim().split('\n')).toHaveLength(1);
    expect(r.stderr).toMatch(/partition rootfs_a: the key opens no keyslot .*LAMA_E_LUKS_WRONG_KEY/);
  });
});

describe('lamadist image build --no-encrypt', () => {
  let image: string;
  let plan: ImagePlan;
  beforeAll(async () => {
    image = path.join(dir, 'plain.img');
    const r = await build(image, ['--no-encrypt', '--slot-size', '8', '--size', 'var=16', '--empty-b']);
    if (r.code !== 0) throw new Error(r.stderr);
    plan = JSON.parse(r.stdout) as ImagePlan;
  });

  it('is recognized by systemd-dissect: ESP, root, root-verity and var', () => {
    const r = spawnSync('systemd-dissect', ['--json=short', image], { encoding: 'utf8' });
    expect(r.status, r.stderr).toBe(0);
    const j = JSON.parse(r.stdout) as {
      mounts: { designator: string; partition_label: string; fstype: string; architecture: string | null }[];
    };
    const by = Object.fromEntries(j.mounts.map((m) => [m.designator, m]));
    expect(by.esp?.fstype).toBe('vfat');
    expect(by.root).toMatchObject({ partition_label: 'rootfs_a', fstype: 'erofs', architecture: 'x86-64' });
    expect(by['root-verity']).toMatchObject({ partition_label: 'verity_a', fstype: 'DM_verity_hash' });
    expect(by.var?.fstype).toBe('ext4');
  });

  it('holds an EROFS root fsck.erofs accepts and a tree veritysetup verify accepts with the UKI root hash', async () => {
    const root = part(plan, 'rootfs_a');
    const verity = part(plan, 'verity_a');
    const erofsFile = await extract(image, root.offset, root.payloadBytes, path.join(dir, 'root.erofs'));
    expect(spawnSync('fsck.erofs', [erofsFile]).status).toBe(0);
    const hashFile = await extract(image, verity.offset, verity.size, path.join(dir, 'root.verity'));
    const rootHash = plan.slots[0]?.verity?.rootHash as string;
    const v = spawnSync('veritysetup', ['verify', erofsFile, hashFile, rootHash], { encoding: 'utf8' });
    expect(v.status, v.stderr).toBe(0);
    expect(plan.slots[1]).toEqual({ slot: 'b', populated: false });
    const attrs = JSON.parse(execFileSync('sfdisk', ['--json', image], { encoding: 'utf8' })) as {
      partitiontable: { partitions: { name: string; attrs?: string }[] };
    };
    expect(attrs.partitiontable.partitions.filter((p) => p.attrs === 'GUID:63').map((p) => p.name)).toEqual([
      'rootfs_b',
      'verity_b',
    ]);
    const e2 = await extract(image, part(plan, 'var').offset, plan.var.bytes, path.join(dir, 'var.ext4'));
    expect(spawnSync('e2fsck', ['-fn', e2]).status).toBe(0);
    expect(
      execFileSync('debugfs', ['-R', 'ls -p /overlay/etc', e2], {
        encoding: 'utf8',
        stdio: ['ignore', 'pipe', 'ignore'],
      }),
    ).toMatch(/upper[\s\S]*work/);
  });

  it('inspect names the changed block after a one-byte change in slot A', async () => {
    const copy = path.join(dir, 'tampered.img');
    await fs.copyFile(image, copy);
    const root = part(plan, 'rootfs_a');
    const h = await fs.open(copy, 'r+');
    const at = root.offset + 4096 * 100 + 5;
    const b = Buffer.alloc(1);
    await h.read(b, 0, 1, at);
    b[0] = (b[0] as number) ^ 0xff;
    await h.write(b, 0, 1, at);
    await h.close();
    const r = await runCli(['image', 'inspect', copy]);
    expect(r.code).toBe(2);
    expect(r.stdout).toMatch(/slot a: root hash [0-9a-f]+, FAILED/);
    expect(r.stderr.trim().split('\n')).toHaveLength(1);
    expect(r.stderr).toMatch(
      new RegExp(`slot a: data block 100 at byte offset ${root.offset + 409600} .*LAMA_E_VERITY_MISMATCH`),
    );
    await fs.rm(copy);
  });

  it('rejects a corrupt primary GPT and a truncated image in one line', async () => {
    const corrupt = path.join(dir, 'corrupt.img');
    await fs.copyFile(image, corrupt);
    const h = await fs.open(corrupt, 'r+');
    await h.write(Buffer.from([0xff]), 0, 1, 512 + 8);
    await h.close();
    const r = await runCli(['image', 'inspect', corrupt]);
    expect(r.code).toBe(2);
    expect(r.stderr.trim().split('\n')).toHaveLength(1);
    expect(r.stderr).toMatch(/primary GPT header at LBA 1: header CRC32 .*LAMA_E_GPT_CORRUPT/);
    await fs.copyFile(image, corrupt);
    await fs.truncate(corrupt, plan.disk.size - 4 * MiB);
    const t = await runCli(['image', 'inspect', corrupt]);
    expect(t.code).toBe(2);
    expect(t.stderr).toMatch(
      /image is truncated: the GPT describes \d+ bytes but the file has \d+ .*LAMA_E_IMAGE_TRUNCATED/,
    );
    await fs.rm(corrupt);
  });
});

describe('bad input leaves nothing behind', () => {
  it('rootfs bigger than its slot: one line, exit 2, no image and no key file', async () => {
    const out = path.join(dir, 'toobig.img');
    const r = await build(out, ['--slot-size', '17']);
    expect(r.code).toBe(2);
    expect(r.stderr.trim().split('\n')).toHaveLength(1);
    expect(r.stderr).toMatch(/rootfs image is .* but slot rootfs_a is 17 MiB .*LAMA_E_ROOTFS_TOO_BIG/);
    expect((await fs.readdir(dir)).filter((f) => f.startsWith('toobig') || f.startsWith('.toobig'))).toEqual(
      [],
    );
  });

  it('a prebuilt UKI whose roothash does not match the rootfs is refused', async () => {
    const ukiFile = path.join(dir, 'stale.efi');
    const { buildUki } = await import('../../src/uki/index.js');
    await fs.writeFile(
      ukiFile,
      await buildUki({
        stub: '/usr/lib/systemd/boot/efi/linuxx64.efi.stub',
        kernel,
        cmdline: `roothash=${'0'.repeat(64)} lamadist.slot=a`,
      }),
    );
    const out = path.join(dir, 'stale.img');
    const r = await runCli([
      'image',
      'build',
      '-o',
      out,
      '--rootfs',
      rootfs,
      '--uki',
      ukiFile,
      '--no-encrypt',
      '--slot-size',
      '8',
      ...SMALL,
      '--size',
      'var=16',
    ]);
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(
      /UKI command line has roothash=0{64} but slot a's root image hashes to [0-9a-f]{64} .*LAMA_E_UKI_ROOTHASH/,
    );
    expect((await fs.readdir(dir)).filter((f) => f.includes('stale.img'))).toEqual([]);
  });

  it('refuses to overwrite without --force', async () => {
    const out = path.join(dir, 'exists.img');
    await fs.writeFile(out, 'keep me');
    const r = await build(out, ['--no-encrypt', '--slot-size', '8', '--size', 'var=16']);
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/already exists/);
    expect(await fs.readFile(out, 'utf8')).toBe('keep me');
  });
});
