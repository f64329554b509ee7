import { existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeEach, describe, expect, it } from 'vitest';
import { runCli } from '../helpers/cli.js';

const tmp = mkdtempSync(path.join(os.tmpdir(), 'lamadist-clean-'));
const root = path.join(tmp, 'repo');
const paths = ['build/tmp/deploy/x.wic', 'build/tmp-glibc/work/y', 'build/downloads/z.tar', 'build/conf/local.conf', 'build/poky/README', '.cache/sstate/aa/bb.tar.zst', 'kas/main.kas.yml'];

beforeEach(() => {
  rmSync(root, { recursive: true, force: true });
  for (const p of paths) {
    mkdirSync(path.dirname(path.join(root, p)), { recursive: true });
    writeFileSync(path.join(root, p), 'x');
  }
});
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

const left = (): string[] => paths.filter((p) => existsSync(path.join(root, p)));

describe('lamadist clean', () => {
  it('removes only build output by default', async () => {
    const r = await runCli(['--json', 'clean', '-C', root]);
    expect(r.code).toBe(0);
    expect(JSON.parse(r.stdout)).toEqual({ removed: [path.join(root, 'build/tmp'), path.join(root, 'build/tmp-glibc')] });
    expect(left()).toEqual(['build/downloads/z.tar', 'build/conf/local.conf', 'build/poky/README', '.cache/sstate/aa/bb.tar.zst', 'kas/main.kas.yml']);
  });

  it('refuses --all without confirmation when it cannot ask, and deletes nothing', async () => {
    const r = await runCli(['clean', '--all', '-C', root]);
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/not removing .*build \(confirm interactively or pass --yes\) \[LAMA_E_CONFIRM\]/);
    expect(left()).toEqual(paths);
  });

  it('removes the build directory with --all --yes and the sstate cache with --sstate', async () => {
    const r = await runCli(['clean', '--all', '--yes', '--sstate', '-C', root]);
    expect(r.code).toBe(0);
    expect(left()).toEqual(['kas/main.kas.yml']);
    expect(r.stdout).toBe('removed build\nremoved .cache/sstate\n');
  });
});
