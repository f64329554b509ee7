import { spawnSync } from 'node:child_process';
import { createCipheriv, randomBytes } from 'node:crypto';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createRandom } from '../../src/disk/random.js';
import { UserError } from '../../src/errors.js';
import {
  LUKS2_DATA_OFFSET,
  afMerge,
  afSplit,
  decryptSectors,
  encryptPayload,
  planLuks2,
  readLuks2,
  unlockLuks2,
} from '../../src/luks/index.js';
import { runCli } from '../helpers/cli.js';

let dir: string;
beforeAll(async () => {
  dir = await fs.mkdtemp(path.join(os.tmpdir(), 'lamadist-luks-'));
});
afterAll(async () => {
  await fs.rm(dir, { recursive: true, force: true });
});

function cryptsetup(args: string[]): { code: number; stdout: string; stderr: string } {
  const r = spawnSync('cryptsetup', args, { encoding: 'utf8' });
  return { code: r.status ?? 128, stdout: r.stdout, stderr: r.stderr };
}

async function container(
  name: string,
  keys: Buffer[],
  payload: Buffer,
  seed?: string,
): Promise<{ file: string; volumeKey: Buffer }> {
  const random = createRandom(seed);
  const volumeKey = random('volume', 64);
  const plan = planLuks2({ volumeKey, keys, label: name, random });
  const file = path.join(dir, `${name}.luks`);
  const src = path.join(dir, `${name}.plain`);
  await fs.writeFile(src, payload);
  const s = await fs.open(src, 'r');
  const h = await fs.open(file, 'w+');
  await h.write(plan.metadata, 0, plan.metadata.length, 0);
  await encryptPayload({
    source: s,
    length: payload.length,
    out: h,
    outOffset: LUKS2_DATA_OFFSET,
    volumeKey,
  });
  await h.close();
  await s.close();
  return { file, volumeKey };
}

describe('anti-forensic splitter', () => {
  it('merges what it split', () => {
    const key = randomBytes(64);
    const material = afSplit(key, 4000, 'sha256', randomBytes(64 * 3999));
    expect(material.length).toBe(256000);
    expect(afMerge(material, 64, 4000, 'sha256').equals(key)).toBe(true);
    material[1000] = (material[1000] as number) ^ 1;
    expect(afMerge(material, 64, 4000, 'sha256').equals(key)).toBe(false);
  });
});

describe('our containers, read by cryptsetup', () => {
  const recovery = randomBytes(32);
  const provision = randomBytes(32);
  let file: string;
  let volumeKey: Buffer;
  beforeAll(async () => {
    ({ file, volumeKey } = await container('rootfs_a', [recovery, provision], randomBytes(3 * 4096 + 100)));
    await fs.writeFile(path.join(dir, 'recovery.key'), recovery);
    await fs.writeFile(path.join(dir, 'provision.key'), provision);
    await fs.writeFile(path.join(dir, 'wrong.key'), randomBytes(32));
  });

  it('cryptsetup luksDump shows our segment, keyslots and digest', () => {
    const r = cryptsetup(['luksDump', file]);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/Version:\s+2/);
    expect(r.stdout).toMatch(/Label:\s+rootfs_a/);
    expect(r.stdout).toMatch(/offset: 16777216 \[bytes\]/);
    expect(r.stdout).toMatch(/cipher: aes-xts-plain64/);
    expect(r.stdout).toMatch(/sector: 4096 \[bytes\]/);
    expect(r.stdout).toMatch(/\n {2}0: luks2[\s\S]*\n {2}1: luks2/);
    expect(r.stdout).toMatch(/PBKDF:\s+pbkdf2/);
    const json = JSON.parse(cryptsetup(['luksDump', '--dump-json-metadata', file]).stdout) as {
      segments: Record<string, unknown>;
    };
    expect(json.segments['0']).toMatchObject({
      type: 'crypt',
      offset: '16777216',
      size: 'dynamic',
      sector_size: 4096,
    });
  });

  it('cryptsetup opens both keyslots with their keys, refuses a wrong key, and reveals our volume key', () => {
    expect(
      cryptsetup([
        'open',
        '--test-passphrase',
        '--key-slot',
        '0',
        '--key-file',
        path.join(dir, 'recovery.key'),
        file,
      ]).code,
    ).toBe(0);
    expect(
      cryptsetup([
        'open',
        '--test-passphrase',
        '--key-slot',
        '1',
        '--key-file',
        path.join(dir, 'provision.key'),
        file,
      ]).code,
    ).toBe(0);
    expect(
      cryptsetup(['open', '--test-passphrase', '--key-file', path.join(dir, 'wrong.key'), file]).code,
    ).not.toBe(0);
    const dump = cryptsetup([
      'luksDump',
      '--dump-volume-key',
      '-q',
      '--key-file',
      path.join(dir, 'recovery.key'),
      file,
    ]);
    expect(dump.code, dump.stderr).toBe(0);
    const hex = /MK dump:\s+([\s\S]+?)\n\S/.exec(dump.stdout + '\nX')?.[1]?.replace(/\s+/g, '');
    expect(hex).toBe(volumeKey.toString('hex'));
  });

  it('survives cryptsetup adding and killing keyslots (the first-boot TPM2 enrolment path)', async () => {
    const copy = path.join(dir, 'enrol.luks');
    await fs.copyFile(file, copy);
    const extra = path.join(dir, 'extra.key');
    await fs.writeFile(extra, randomBytes(32));
    const add = cryptsetup([
      'luksAddKey',
      '-q',
      '--pbkdf',
      'pbkdf2',
      '--pbkdf-force-iterations',
      '1000',
      '--key-file',
      path.join(dir, 'provision.key'),
      copy,
      extra,
    ]);
    expect(add.code, add.stderr).toBe(0);
    expect(cryptsetup(['luksKillSlot', '-q', copy, '1']).code).toBe(0);
    const { header } = await readLuks2(copy);
    expect(Object.keys(header.json.keyslots).sort()).toEqual(['0', '2']);
    expect(header.seqid).toBeGreaterThan(1n);
    expect((await unlockLuks2(copy, await fs.readFile(extra))).volumeKey.equals(volumeKey)).toBe(true);
    await expect(unlockLuks2(copy, provision)).rejects.toThrow(/opens no keyslot/);
  });

  it('decrypts its payload with the volume key it unlocks', async () => {
    const plain = await fs.readFile(path.join(dir, 'rootfs_a.plain'));
    const { volumeKey: vk, keyslot } = await unlockLuks2(file, provision);
    expect(keyslot).toBe('1');
    const h = await fs.open(file, 'r');
    const out = await decryptSectors(h, LUKS2_DATA_OFFSET, vk, 0, 4);
    await h.close();
    expect(out.subarray(0, plain.length).equals(plain)).toBe(true);
    expect(out.subarray(plain.length).every((b) => b === 0)).toBe(true);
  });

  it('uses dm-crypt plain64 IVs in 512-byte units for 4096-byte sectors', async () => {
    // Sector 2 of the payload must be AES-XTS of the plaintext with tweak 2*8 = 16 (not 2).
    const plain = await fs.readFile(path.join(dir, 'rootfs_a.plain'));
    const enc = (await fs.readFile(file)).subarray(
      LUKS2_DATA_OFFSET + 2 * 4096,
      LUKS2_DATA_OFFSET + 3 * 4096,
    );
    const iv = Buffer.alloc(16);
    iv.writeBigUInt64LE(16n);
    const c = createCipheriv('aes-256-xts', volumeKey, iv);
    expect(Buffer.concat([c.update(plain.subarray(2 * 4096, 3 * 4096)), c.final()]).equals(enc)).toBe(true);
  });

  it('names a wrong key in one line', async () => {
    const e = await unlockLuks2(file, randomBytes(32)).catch((x: unknown) => x);
    expect(e).toBeInstanceOf(UserError);
    expect((e as UserError).code).toBe('LAMA_E_LUKS_WRONG_KEY');
  });

  it('is byte-identical for the same seed and differs for another', () => {
    const k = Buffer.alloc(32, 1);
    const plan = (seed: string): Buffer =>
      planLuks2({ volumeKey: Buffer.alloc(64, 7), keys: [k], label: 'x', random: createRandom(seed) })
        .metadata;
    expect(plan('s').equals(plan('s'))).toBe(true);
    expect(plan('s').equals(plan('t'))).toBe(false);
  });
});

describe('containers made by cryptsetup, read by us', () => {
  it('reads the header and unlocks to the same volume key cryptsetup reports', async () => {
    const file = path.join(dir, 'theirs.luks');
    await fs.writeFile(file, '');
    await fs.truncate(file, 20 * 1024 * 1024);
    const key = path.join(dir, 'theirs.key');
    await fs.writeFile(key, randomBytes(48));
    const fmt = cryptsetup([
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
      '--label',
      'theirs',
      '--key-file',
      key,
      file,
    ]);
    expect(fmt.code, fmt.stderr).toBe(0);
    const { header, problems } = await readLuks2(file);
    expect(problems).toEqual([]);
    expect(header.label).toBe('theirs');
    const uuid = cryptsetup(['luksUUID', file]).stdout.trim();
    expect(header.uuid).toBe(uuid);
    const dump = cryptsetup(['luksDump', '--dump-volume-key', '-q', '--key-file', key, file]).stdout;
    const hex = /MK dump:\s+([\s\S]+?)\n\S/.exec(dump + '\nX')?.[1]?.replace(/\s+/g, '');
    const { volumeKey } = await unlockLuks2(file, await fs.readFile(key));
    expect(volumeKey.toString('hex')).toBe(hex);
  });

  it('falls back to the secondary header when the primary is damaged, and rejects non-LUKS files', async () => {
    const { file } = await container('damaged', [Buffer.alloc(32, 3)], Buffer.alloc(4096));
    const h = await fs.open(file, 'r+');
    await h.write(Buffer.from('garbage'), 0, 7, 4200);
    await h.close();
    const r = await readLuks2(file);
    expect(r.source).toBe('secondary');
    expect(r.problems[0]).toMatch(/LUKS2 header at byte 0: checksum mismatch/);
    expect(cryptsetup(['luksDump', file]).code).toBe(0);

    const junk = path.join(dir, 'junk');
    await fs.writeFile(junk, randomBytes(65536));
    await expect(readLuks2(junk)).rejects.toThrow(/not a LUKS2 container/);
  });
});

describe('lamadist luks (CLI)', () => {
  it('formats a container cryptsetup opens and dumps it as JSON', async () => {
    const payload = path.join(dir, 'cli.plain');
    await fs.writeFile(payload, randomBytes(10000));
    const key = path.join(dir, 'cli.key');
    await fs.writeFile(key, randomBytes(32));
    const out = path.join(dir, 'cli.luks');
    const f = await runCli(['luks', 'format', '--key-file', key, '--label', 'var', '--iter-time', '200', payload, out]);
    expect(f.code, f.stderr).toBe(0);
    expect(f.stderr).toMatch(/iterations \(200 ms on this machine\)/);
    expect(cryptsetup(['open', '--test-passphrase', '--key-file', key, out]).code).toBe(0);
    const d = await runCli(['--json', 'luks', 'dump', out]);
    expect(d.code, d.stderr).toBe(0);
    const j = JSON.parse(d.stdout) as {
      label: string;
      keyslots: unknown[];
      segments: { sectorSize: number }[];
    };
    expect(j.label).toBe('var');
    expect(j.keyslots).toHaveLength(1);
    expect(j.segments[0]?.sectorSize).toBe(4096);
    const again = await runCli(['luks', 'format', '--key-file', key, payload, out]);
    expect(again.code).toBe(2);
    const bad = await runCli(['luks', 'dump', payload]);
    expect(bad.code).toBe(2);
    expect(bad.stderr).toMatch(/not a LUKS2 container .*LAMA_E_LUKS_HEADER/);
  });

  it('stretches a key file like cryptsetup (benchmarked iterations), and warns about a low forced count', async () => {
    const payload = path.join(dir, 'pbkdf.plain');
    await fs.writeFile(payload, randomBytes(4096));
    const key = path.join(dir, 'pbkdf.pass');
    await fs.writeFile(key, 'correct horse battery staple');
    const iterationsOf = (file: string): number => {
      const m = /Iterations:\s+(\d+)/.exec(cryptsetup(['luksDump', file]).stdout);
      return Number(m?.[1]);
    };
    // cryptsetup's own choice for a 1 s keyslot on this machine is the yardstick
    const ref = path.join(dir, 'pbkdf.ref');
    await fs.writeFile(ref, Buffer.alloc(32 << 20));
    const fmt = cryptsetup(['luksFormat', '-q', '--type', 'luks2', '--pbkdf', 'pbkdf2', '--iter-time', '1000', '--key-file', key, ref]);
    expect(fmt.code, fmt.stderr).toBe(0);
    const theirs = iterationsOf(ref);

    const out = path.join(dir, 'pbkdf.luks');
    const f = await runCli(['luks', 'format', '--key-file', key, '--iter-time', '1000', payload, out]);
    expect(f.code, f.stderr).toBe(0);
    expect(f.stderr).not.toMatch(/warning/);
    const ours = iterationsOf(out);
    // Node's PBKDF2 and cryptsetup's differ in speed and the machine is shared: same order of magnitude.
    expect(ours).toBeGreaterThan(theirs / 4);
    expect(ours).toBeLessThan(theirs * 4);
    expect(cryptsetup(['open', '--test-passphrase', '--key-file', key, out]).code).toBe(0);

    const low = path.join(dir, 'pbkdf-low.luks');
    const l = await runCli(['luks', 'format', '--key-file', key, '--pbkdf-force-iterations', '1000', payload, low]);
    expect(l.code, l.stderr).toBe(0);
    expect(l.stderr).toMatch(/warning: 1000 PBKDF2 iterations unlock in under a second here/);
    expect(iterationsOf(low)).toBe(1000);
    const tooLow = await runCli(['luks', 'format', '--key-file', key, '--pbkdf-force-iterations', '999', payload, path.join(dir, 'x.luks')]);
    expect(tooLow.code).toBe(2);
    expect(tooLow.stderr.trim().split('\n')).toHaveLength(1);
  });
});
