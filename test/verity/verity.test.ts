import { execFileSync, spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { UserError } from '../../src/errors.js';
import { formatVerity, planVerity, readVeritySuperblock, verifyVerity } from '../../src/verity/index.js';
import { runCli } from '../helpers/cli.js';

let dir: string;
const UUID = '0b3c8f2e-6d1a-4f5e-9a7b-1c2d3e4f5a6b';

beforeAll(async () => {
  dir = await fs.mkdtemp(path.join(os.tmpdir(), 'lamadist-verity-'));
});
afterAll(async () => {
  await fs.rm(dir, { recursive: true, force: true });
});

async function dataFile(name: string, bytes: number): Promise<string> {
  const p = path.join(dir, name);
  await fs.writeFile(p, randomBytes(bytes));
  return p;
}

/** Run veritysetup and return the root hash it prints. */
function veritysetup(args: string[]): string {
  const out = execFileSync('veritysetup', args, { encoding: 'utf8' });
  const m = /Root hash:\s+([0-9a-f]+)/.exec(out);
  if (!m) throw new Error(`no root hash in veritysetup output:\n${out}`);
  return m[1] as string;
}

function veritysetupVerify(args: string[]): { code: number; stderr: string } {
  const r = spawnSync('veritysetup', ['verify', ...args], { encoding: 'utf8' });
  return { code: r.status ?? 128, stderr: r.stderr };
}

async function expectUserError(p: Promise<unknown>, code: string, pattern: RegExp): Promise<UserError> {
  const err = await p.then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(err).toBeInstanceOf(UserError);
  const ue = err as UserError;
  expect(ue.code).toBe(code);
  expect(ue.line()).toMatch(pattern);
  expect(ue.line()).not.toContain('\n');
  return ue;
}

describe('geometry', () => {
  it('lays levels out top-first like veritysetup', () => {
    const g = planVerity({
      dataBlocks: 128 * 128 + 1,
      dataBlockSize: 4096,
      hashBlockSize: 4096,
      algorithm: 'sha256',
      salt: Buffer.alloc(32),
      hashOffset: 0,
      superblock: true,
    });
    expect(g.hashesPerBlock).toBe(128);
    expect(g.levels.map((l) => l.blocks)).toEqual([129, 2, 1]);
    expect(g.treeOffset).toBe(4096);
    // top level first on disk, then level 1, then level 0
    expect(g.levels[2]?.offset).toBe(4096);
    expect(g.levels[1]?.offset).toBe(8192);
    expect(g.levels[0]?.offset).toBe(16384);
    expect(g.hashTreeBytes).toBe(4096 * (1 + 1 + 2 + 129));
  });

  it('rounds digest slots up to a power of two (sha1 in 32 bytes)', () => {
    const g = planVerity({
      dataBlocks: 1000,
      dataBlockSize: 4096,
      hashBlockSize: 4096,
      algorithm: 'sha1',
      salt: Buffer.alloc(0),
      hashOffset: 0,
      superblock: false,
    });
    expect(g.digestSlot).toBe(32);
    expect(g.hashesPerBlock).toBe(128);
  });

  it('rejects parameters the kernel refuses', () => {
    expect(() =>
      planVerity({
        dataBlocks: 8,
        dataBlockSize: 3000,
        hashBlockSize: 4096,
        algorithm: 'sha256',
        salt: Buffer.alloc(0),
        hashOffset: 0,
        superblock: true,
      }),
    ).toThrow(/power of two/);
    expect(() =>
      planVerity({
        dataBlocks: 8,
        dataBlockSize: 4096,
        hashBlockSize: 4096,
        algorithm: 'md5',
        salt: Buffer.alloc(0),
        hashOffset: 0,
        superblock: true,
      }),
    ).toThrow(/unsupported hash/);
    expect(() =>
      planVerity({
        dataBlocks: 8,
        dataBlockSize: 4096,
        hashBlockSize: 4096,
        algorithm: 'sha256',
        salt: Buffer.alloc(300),
        hashOffset: 0,
        superblock: true,
      }),
    ).toThrow(/at most 256/);
  });
});

describe('byte-identical to veritysetup format', () => {
  const cases: { name: string; bytes: number; extra: string[]; opts: Record<string, unknown> }[] = [
    { name: 'one block', bytes: 4096, extra: [], opts: {} },
    { name: 'two levels', bytes: 4096 * 300, extra: [], opts: {} },
    { name: 'partial last block ignored', bytes: 4096 * 5 + 100, extra: [], opts: {} },
    {
      name: 'three levels with 512-byte hash blocks',
      bytes: 4096 * 300,
      extra: ['--hash-block-size=512'],
      opts: { hashBlockSize: 512 },
    },
    { name: 'sha1', bytes: 4096 * 200, extra: ['--hash=sha1'], opts: { algorithm: 'sha1' } },
    {
      name: 'sha512, 1 KiB data blocks',
      bytes: 1024 * 700,
      extra: ['--hash=sha512', '--data-block-size=1024'],
      opts: { algorithm: 'sha512', dataBlockSize: 1024 },
    },
    {
      name: 'explicit data block count',
      bytes: 4096 * 50,
      extra: ['--data-blocks=33'],
      opts: { dataBlocks: 33 },
    },
  ];
  for (const c of cases) {
    it(c.name, async () => {
      const data = await dataFile(`d-${c.name}`, c.bytes);
      const salt = randomBytes(32);
      const theirs = `${data}.theirs`;
      const ours = `${data}.ours`;
      const root = veritysetup([
        'format',
        `--salt=${salt.toString('hex')}`,
        `--uuid=${UUID}`,
        ...c.extra,
        data,
        theirs,
      ]);
      const r = await formatVerity({ dataPath: data, hashPath: ours, salt, uuid: UUID, ...c.opts });
      expect(r.rootHash.toString('hex')).toBe(root);
      expect((await fs.readFile(ours)).equals(await fs.readFile(theirs))).toBe(true);
      expect(r.hashTreeBytes).toBe((await fs.stat(theirs)).size);
      expect(
        veritysetupVerify([...c.extra.filter((a) => a.startsWith('--data-blocks')), data, ours, root]).code,
      ).toBe(0);
    });
  }

  it('empty salt and no superblock', async () => {
    const data = await dataFile('nosb', 4096 * 130);
    const theirs = `${data}.theirs`;
    const ours = `${data}.ours`;
    const root = veritysetup(['format', '--salt=-', '--no-superblock', data, theirs]);
    const r = await formatVerity({
      dataPath: data,
      hashPath: ours,
      salt: Buffer.alloc(0),
      superblock: false,
    });
    expect(r.rootHash.toString('hex')).toBe(root);
    expect(r.uuid).toBeUndefined();
    expect((await fs.readFile(ours)).equals(await fs.readFile(theirs))).toBe(true);
    expect(veritysetupVerify(['--no-superblock', '--salt=-', data, ours, root]).code).toBe(0);
  });

  it('tree appended to the data file (RAUC layout) and a superblock at a hash offset', async () => {
    const size = 4096 * 257;
    const a = await dataFile('append-a', size);
    const b = path.join(dir, 'append-b');
    await fs.copyFile(a, b);
    const salt = randomBytes(32);
    const root = veritysetup([
      'format',
      '--no-superblock',
      `--salt=${salt.toString('hex')}`,
      `--hash-offset=${size}`,
      `--data-blocks=257`,
      b,
      b,
    ]);
    const r = await formatVerity({ dataPath: a, hashPath: a, salt, superblock: false });
    expect(r.hashOffset).toBe(size);
    expect(r.rootHash.toString('hex')).toBe(root);
    expect((await fs.readFile(a)).equals(await fs.readFile(b))).toBe(true);
    await verifyVerity({
      dataPath: a,
      hashPath: a,
      hashOffset: size,
      dataBlocks: 257,
      salt,
      superblock: false,
      rootHash: r.rootHash,
    });

    const c = await dataFile('sb-offset', 4096 * 64);
    const d = path.join(dir, 'sb-offset-theirs');
    await fs.copyFile(c, d);
    const root2 = veritysetup([
      'format',
      `--salt=${salt.toString('hex')}`,
      `--uuid=${UUID}`,
      '--hash-offset=131072',
      '--data-blocks=32',
      d,
      d,
    ]);
    const r2 = await formatVerity({
      dataPath: c,
      hashPath: c,
      hashOffset: 131072,
      dataBlocks: 32,
      salt,
      uuid: UUID,
    });
    expect(r2.rootHash.toString('hex')).toBe(root2);
    expect((await fs.readFile(c)).equals(await fs.readFile(d))).toBe(true);
    const sb = await readVeritySuperblock(c, 131072);
    expect(sb).toMatchObject({
      uuid: UUID,
      algorithm: 'sha256',
      dataBlocks: 32,
      dataBlockSize: 4096,
      hashBlockSize: 4096,
    });
  });

  it('uses worker threads on large inputs and still matches (96 MiB)', async () => {
    const data = await dataFile('large', 96 * 1024 * 1024 + 4096 * 3);
    const salt = randomBytes(32);
    const root = veritysetup([
      'format',
      `--salt=${salt.toString('hex')}`,
      `--uuid=${UUID}`,
      data,
      `${data}.theirs`,
    ]);
    const r = await formatVerity({ dataPath: data, hashPath: `${data}.ours`, salt, uuid: UUID });
    expect(r.rootHash.toString('hex')).toBe(root);
    expect((await fs.readFile(`${data}.ours`)).equals(await fs.readFile(`${data}.theirs`))).toBe(true);
    await verifyVerity({ dataPath: data, hashPath: `${data}.ours`, rootHash: r.rootHash });
    await fs.rm(data);
  });
});

describe('verification', () => {
  let data: string;
  let hash: string;
  let root: Buffer;
  beforeAll(async () => {
    data = await dataFile('v', 4096 * 1000);
    hash = `${data}.hash`;
    const r = await formatVerity({ dataPath: data, hashPath: hash, salt: randomBytes(32) });
    root = r.rootHash;
  });

  it('accepts an intact tree', async () => {
    const r = await verifyVerity({ dataPath: data, hashPath: hash, rootHash: root });
    expect(r.dataBlocks).toBe(1000);
  });

  it('names the data block after a one-byte change (and veritysetup rejects it too)', async () => {
    const copy = `${data}.tampered`;
    await fs.copyFile(data, copy);
    const h = await fs.open(copy, 'r+');
    const offset = 4096 * 617 + 123;
    const b = Buffer.alloc(1);
    await h.read(b, 0, 1, offset);
    b[0] = (b[0] as number) ^ 0x01;
    await h.write(b, 0, 1, offset);
    await h.close();
    await expectUserError(
      verifyVerity({ dataPath: copy, hashPath: hash, rootHash: root }),
      'LAMA_E_VERITY_MISMATCH',
      /data block 617 at byte offset 2527232 /,
    );
    expect(veritysetupVerify([copy, hash, root.toString('hex')]).code).not.toBe(0);
  });

  it('blames a changed hash block on the tree, not the data', async () => {
    const copy = `${hash}.tampered`;
    await fs.copyFile(hash, copy);
    const g = planVerity({
      dataBlocks: 1000,
      dataBlockSize: 4096,
      hashBlockSize: 4096,
      algorithm: 'sha256',
      salt: Buffer.alloc(32),
      hashOffset: 0,
      superblock: true,
    });
    const level0 = g.levels[0]?.offset as number;
    const h = await fs.open(copy, 'r+');
    await h.write(Buffer.from([0xff]), 0, 1, level0 + 4096 * 3 + 7);
    await h.close();
    await expectUserError(
      verifyVerity({ dataPath: data, hashPath: copy, rootHash: root }),
      'LAMA_E_VERITY_MISMATCH',
      new RegExp(`level 0 block 3 at byte offset ${level0 + 4096 * 3} `),
    );
    expect(veritysetupVerify([data, copy, root.toString('hex')]).code).not.toBe(0);
  });

  it('rejects a wrong root hash', async () => {
    const wrong = Buffer.from(root);
    wrong[0] = (wrong[0] as number) ^ 0x80;
    await expectUserError(
      verifyVerity({ dataPath: data, hashPath: hash, rootHash: wrong }),
      'LAMA_E_VERITY_MISMATCH',
      /root hash mismatch/,
    );
  });

  it('reports truncated data and hash files', async () => {
    const short = `${data}.short`;
    await fs.copyFile(data, short);
    await fs.truncate(short, 4096 * 999);
    await expectUserError(
      verifyVerity({ dataPath: short, hashPath: hash, rootHash: root }),
      'LAMA_E_VERITY_TRUNCATED',
      /999 blocks .* 1000 are needed/,
    );
    const shortHash = `${hash}.short`;
    await fs.copyFile(hash, shortHash);
    await fs.truncate(shortHash, 8192);
    await expectUserError(
      verifyVerity({ dataPath: data, hashPath: shortHash, rootHash: root }),
      'LAMA_E_VERITY_TRUNCATED',
      /hash area needs/,
    );
    await fs.writeFile(shortHash, Buffer.alloc(4096));
    await expectUserError(
      verifyVerity({ dataPath: data, hashPath: shortHash, rootHash: root }),
      'LAMA_E_VERITY_NO_SUPERBLOCK',
      /no verity superblock/,
    );
  });
});

describe('lamadist verity (CLI)', () => {
  it('formats, verifies with veritysetup, and rejects tampering with exit 2 and one line', async () => {
    const data = await dataFile('cli', 4096 * 64);
    const hash = path.join(dir, 'cli.hash');
    const fmt = await runCli([
      '--json',
      'verity',
      'format',
      '--salt',
      '00'.repeat(32),
      '--uuid',
      UUID,
      data,
      hash,
    ]);
    expect(fmt.code, fmt.stderr).toBe(0);
    const out = JSON.parse(fmt.stdout) as { rootHash: string; uuid: string };
    expect(out.uuid).toBe(UUID);
    expect(veritysetupVerify([data, hash, out.rootHash]).code).toBe(0);

    const again = await runCli(['verity', 'format', data, hash]);
    expect(again.code).toBe(2);
    expect(again.stderr).toMatch(/already exists .*--force/);

    const ok = await runCli(['verity', 'verify', data, hash, out.rootHash]);
    expect(ok.code, ok.stderr).toBe(0);
    expect(ok.stdout).toMatch(/verified/);

    const h = await fs.open(data, 'r+');
    await h.write(Buffer.from('X'), 0, 1, 4096 * 10);
    await h.close();
    const bad = await runCli(['verity', 'verify', data, hash, out.rootHash]);
    expect(bad.code).toBe(2);
    expect(bad.stderr.trim().split('\n')).toHaveLength(1);
    expect(bad.stderr).toMatch(/data block 10 at byte offset 40960 .*LAMA_E_VERITY_MISMATCH/);
  });

  it('leaves no hash file behind when the data file is missing', async () => {
    const hash = path.join(dir, 'missing.hash');
    const r = await runCli(['verity', 'format', path.join(dir, 'nope'), hash]);
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/does not exist/);
    expect((await fs.readdir(dir)).filter((f) => f.includes('missing.hash'))).toEqual([]);
  });
});
