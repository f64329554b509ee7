import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { casyncKind, parseCasyncIndex } from '../../src/rauc/casync.js';

// casync indexes made by Debian's casync (what `rauc convert` runs), and the same mutations fed to
// `casync extract` (the peer) and to our parser.

let dir: string;
let index: Buffer;
const SIZE = 3 * 1024 * 1024 + 4096;

function casync(args: string[]): { code: number; out: string } {
  const r = spawnSync('casync', args, { encoding: 'utf8', cwd: dir });
  return { code: r.status ?? 128, out: `${r.stdout}${r.stderr}` };
}

beforeAll(() => {
  dir = mkdtempSync(path.join(os.tmpdir(), 'lamadist-casync-'));
  const img = Buffer.alloc(SIZE);
  let s = 7;
  for (let i = 0; i < img.length; i += 4) img.writeUInt32LE((s = (Math.imul(s, 1103515245) + 12345) >>> 0), i);
  writeFileSync(path.join(dir, 'rootfs.img'), img);
  const r = casync(['make', '--store=store.castr', 'rootfs.img.caibx', 'rootfs.img']);
  expect(r.code, r.out).toBe(0);
  index = readFileSync(path.join(dir, 'rootfs.img.caibx'));
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe('casync index', () => {
  it('names the index kind from the file name as RAUC does', () => {
    expect([casyncKind('rootfs.img.caibx'), casyncKind('app.tar.caidx'), casyncKind('rootfs.img')]).toEqual(['caibx', 'caidx', undefined]);
  });

  it('reads casync make output: image size, chunk count and chunk digest', () => {
    const i = parseCasyncIndex(index, 'caibx', 'rootfs.img.caibx');
    expect(i).toMatchObject({ kind: 'caibx', size: SIZE, chunkDigest: 'sha512-256' });
    expect(i.chunks).toBe((index.length - 48 - 16 - 40) / 40);
    expect(i.chunks).toBeGreaterThan(1);
  });

  const mutations: [string, (b: Buffer) => Buffer, RegExp, number | ((b: Buffer) => number)][] = [
    ['index header type', (b) => (b.writeUInt8(0, 8), b), /no index header/, 0],
    ['table header type', (b) => (b.writeUInt8(0, 56), b), /no chunk table header/, 48],
    ['tail marker', (b) => (b.writeUInt8(0, b.length - 1), b), /no table tail marker/, (b) => b.length - 8],
    ['chunk offsets out of order', (b) => (b.writeBigUInt64LE(1n, 48 + 16 + 40), b), /chunk 1 ends at 1, not after the previous chunk/, 48 + 16 + 40],
    ['cut in the chunk table', (b) => Buffer.concat([b.subarray(0, 48 + 16 + 20), b.subarray(b.length - 40)]), /not a whole number of 40-byte entries/, 64],
    ['only a header', (b) => b.subarray(0, 60), /only 60 bytes/, 0],
  ];
  for (const [name, mutate, message, at] of mutations) {
    it(`${name}: casync extract refuses it, and so do we with the byte offset`, () => {
      const bad = mutate(Buffer.from(index));
      const f = path.join(dir, `bad-${name.replaceAll(' ', '-')}.caibx`);
      writeFileSync(f, bad);
      expect(casync(['extract', '--store=store.castr', f, path.join(dir, 'out.img')]).code, name).not.toBe(0);
      const offset = typeof at === 'number' ? at : at(bad);
      expect(() => parseCasyncIndex(bad, 'caibx', 'i')).toThrow(expect.objectContaining({ code: 'LAMA_E_BUNDLE_CASYNC_INDEX', message: expect.stringMatching(message), where: `i@${offset}` }) as Error);
    });
  }
});
