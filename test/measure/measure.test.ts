import { randomBytes } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { measuredSections, predictPcr11 } from '../../src/measure/index.js';
import { buildUki } from '../../src/uki/index.js';
import { runCli } from '../helpers/cli.js';
import { STUB, tempDir, tool } from '../uki/helpers.js';

const MEASURE = '/usr/lib/systemd/systemd-measure';
const t = tempDir('lamadist-measure-');
afterAll(() => t.remove());

function peer(files: Record<string, string>, bank = 'sha256'): { phase: string; hash: string }[] {
  const args = ['calculate', `--bank=${bank}`, '--json=short', ...Object.entries(files).map(([k, v]) => `--${k}=${v}`)];
  const r = tool(MEASURE, args);
  expect(r.code, r.out).toBe(0);
  return (JSON.parse(r.out) as Record<string, { phase: string; hash: string }[]>)[bank] ?? [];
}

describe('PCR 11 prediction', () => {
  it('systemd 252 measures .linux .osrel .cmdline .initrd .splash .dtb .pcrpkey, in that order', () => {
    expect(measuredSections('252.39-1~deb12u2')).toEqual(['.linux', '.osrel', '.cmdline', '.initrd', '.splash', '.dtb', '.pcrpkey']);
    expect(measuredSections('254.1')).toContain('.uname');
  });

  for (const bank of ['sha256', 'sha1', 'sha384'] as const) {
    it(`equals systemd-measure calculate for every boot phase (${bank})`, async () => {
      const parts = { linux: randomBytes(150_000), initrd: randomBytes(20_000), cmdline: Buffer.from('console=ttyS0 quiet'), osrel: Buffer.from('ID=lamadist\n'), splash: randomBytes(3000) };
      const files: Record<string, string> = {};
      for (const [k, v] of Object.entries(parts)) {
        files[k] = path.join(t.dir, `${bank}.${k}`);
        writeFileSync(files[k], v);
      }
      const uki = await buildUki({ stub: STUB, kernel: parts.linux, initrd: parts.initrd, cmdline: parts.cmdline.toString(), osrel: parts.osrel, splash: parts.splash, uname: '6.1.0-1-amd64' });
      const ours = predictPcr11(uki, { bank });
      const theirs = peer(files, bank);
      expect(ours.phases.map((p) => ({ phase: p.phase, hash: p.value }))).toEqual(theirs.map((p) => ({ phase: p.phase, hash: p.hash })));
    });
  }

  it('uki measure prints the same values through the CLI', async () => {
    const f = { linux: path.join(t.dir, 'k'), cmdline: path.join(t.dir, 'c') };
    writeFileSync(f.linux, randomBytes(50_000));
    writeFileSync(f.cmdline, 'quiet');
    const uki = await buildUki({ stub: STUB, kernel: f.linux, cmdline: 'quiet' });
    writeFileSync(path.join(t.dir, 'u.efi'), uki);
    const r = await runCli(['--json', 'uki', 'measure', path.join(t.dir, 'u.efi')]);
    expect(r.code).toBe(0);
    const got = JSON.parse(r.stdout) as { phases: { value: string }[] };
    expect(got.phases.map((p) => p.value)).toEqual(peer(f).map((p) => p.hash));
  });
});
