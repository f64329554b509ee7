import { spawnSync } from 'node:child_process';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { REPO_ROOT } from '../helpers/cli.js';
import { skipBecause } from '../helpers/skip.js';

// scripts/parse-check runs BitBake for real; without the layer checkouts it must say "skipped"
// (exit 77), never pass. These tests cover that and the checks it makes before BitBake starts.
// parse-check.slow.test.ts runs the real parse when LAMADIST_LAYERS_DIR names the checkouts.

const SCRIPT = path.join(REPO_ROOT, 'scripts/parse-check');

function run(args: string[], env: NodeJS.ProcessEnv = {}): { code: number; stdout: string; stderr: string } {
  const r = spawnSync(SCRIPT, args, { env: { ...process.env, PARSE_CHECK_USER: '', ...env }, encoding: 'utf8', timeout: 60_000 });
  return { code: r.status ?? 128, stdout: r.stdout, stderr: r.stderr };
}

let tmp: string;
beforeAll(async () => {
  tmp = await fs.mkdtemp(path.join(os.tmpdir(), 'lamadist-parse-check-'));
});
afterAll(async () => {
  await fs.rm(tmp, { recursive: true, force: true });
});

describe('scripts/parse-check', () => {
  it('is skipped, not passed, when the layer checkouts are absent', () => {
    const r = run([path.join(tmp, 'no-layers-here')]);
    expect(r.code).toBe(77);
    expect(r.stdout).toMatch(/^parse-check: SKIP: layer checkouts not found at .*no-layers-here$/m);
    expect(r.stdout).not.toMatch(/PASS/);
  });

  it('refuses an unknown BSP', async () => {
    const layers = path.join(tmp, 'layers-bsp');
    await fs.mkdir(layers, { recursive: true });
    const r = run([layers, 'pc-98'], { PARSE_CHECK_USER: 'nobody' });
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/unknown BSP pc-98 \(known: x86_64, orin-nx, rk1, soquartz\)/);
  });

  it.skipIf(skipBecause(process.getuid?.() !== 0, 'parse-check as root', 'needs root (the refusal is of root)'))('refuses to run BitBake as root without a build user', async () => {
    const layers = path.join(tmp, 'layers-root');
    await fs.mkdir(layers, { recursive: true });
    const r = run([layers, 'x86_64']);
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/BitBake refuses root; give --user NAME/);
  });

  it('names the repo whose checkout is missing or at another commit than kas pins', async () => {
    const layers = path.join(tmp, 'layers-pins');
    await fs.mkdir(path.join(layers, 'poky'), { recursive: true });
    await fs.writeFile(path.join(layers, 'poky', '.commit'), '0000000000000000000000000000000000000000\n');
    const user = process.getuid?.() === 0 ? ['--user', 'nobody'] : [];
    const r = run([...user, '--build-root', path.join(tmp, 'build'), layers, 'x86_64']);
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/poky: .*poky is at 0{40}, kas pins [0-9a-f]{40}/);
    expect(r.stderr).toMatch(/meta-openembedded: no checkout at /);
    expect(r.stdout).not.toMatch(/PASS/);
  });
});
