import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parse } from 'yaml';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { composeKas, kasConfigArg, kasFilesFor, mergeKas } from '../../src/kas/index.js';
import { UserError } from '../../src/errors.js';
import { REPO_ROOT, runCli } from '../helpers/cli.js';

let root: string;
function write(rel: string, text: string): void {
  mkdirSync(path.dirname(path.join(root, rel)), { recursive: true });
  writeFileSync(path.join(root, rel), text);
}

beforeAll(() => {
  root = mkdtempSync(path.join(os.tmpdir(), 'lamadist-kas-'));
  write('kas/base.yml', 'header:\n  version: 14\nmachine: base\nlocal_conf_header:\n  a: A1\n  b: B1\nrepos:\n  poky:\n    url: https://example.org/poky\n    commit: abc\n    layers:\n      meta:\n      meta-poky:\n');
  write('kas/common.yml', 'header:\n  version: 14\n  includes:\n    - kas/base.yml\nlocal_conf_header:\n  b: B2\n');
  write('kas/top.yml', 'header:\n  version: 15\n  includes:\n    - kas/common.yml\n    - kas/base.yml\nmachine: top\nrepos:\n  poky:\n    commit: def\n    layers:\n      meta-poky: disabled\n');
  write('kas/sub/legacy.yml', 'header:\n  version: 14\n  includes:\n    - sibling.yml\n');
  write('kas/sub/sibling.yml', 'header:\n  version: 14\ndistro: legacy\n');
  write('kas/remote.yml', 'header:\n  version: 14\n  includes:\n    - repo: meta-ext\n      file: kas/ext.yml\nrepos:\n  meta-ext:\n    url: https://example.org/ext\n');
  write('kas/override.yml', 'header:\n  version: 14\nlocal_conf_header:\n  a: A3\ntarget: [img-a, img-b]\n');
});
afterAll(() => rmSync(root, { recursive: true, force: true }));

describe('kas merge semantics', () => {
  it('merges mappings key by key and replaces everything else', () => {
    expect(mergeKas({ a: { x: 1, y: [1, 2] }, s: 's' }, { a: { y: [3] }, s: null })).toEqual({ a: { x: 1, y: [3] }, s: null });
  });

  it('merges includes depth-first before the including file, each file once', async () => {
    const c = await composeKas(['kas/top.yml'], { repoRoot: root });
    expect(c.files.map((f) => f.rel)).toEqual(['kas/base.yml', 'kas/common.yml', 'kas/top.yml']);
    expect(c.config.machine).toBe('top');
    expect(c.config.local_conf_header).toEqual({ a: 'A1', b: 'B2' });
    expect(c.config.repos).toEqual({ poky: { url: 'https://example.org/poky', commit: 'def', layers: { meta: null, 'meta-poky': 'disabled' } } });
    expect(c.config.header).toEqual({ version: 15 });
    expect(c.origin(['machine'])).toBe('kas/top.yml:6:1');
    expect(c.origin(['local_conf_header', 'b'])).toBe('kas/common.yml:6:3');
    expect(c.origin(['repos', 'poky', 'url'])).toBe('kas/base.yml:9:5');
  });

  it('lets later files on the command line override earlier ones', async () => {
    const c = await composeKas(['kas/top.yml', 'kas/override.yml'], { repoRoot: root });
    expect(c.config.local_conf_header).toEqual({ a: 'A3', b: 'B2' });
    expect(c.config.target).toEqual(['img-a', 'img-b']);
  });

  it('still resolves includes relative to the including file (older kas form)', async () => {
    const c = await composeKas(['kas/sub/legacy.yml'], { repoRoot: root });
    expect(c.config.distro).toBe('legacy');
  });

  it('refuses includes from remote repositories offline, at the include', async () => {
    const err = await composeKas(['kas/remote.yml'], { repoRoot: root }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(UserError);
    expect((err as UserError).where).toBe('kas/remote.yml:4:7');
    expect((err as UserError).code).toBe('LAMA_E_KAS_REMOTE_INCLUDE');
  });

  it('names the kas files of a selection in merge order', () => {
    expect(kasFilesFor({ bsp: 'rk1', extras: ['debug'], scanners: ['cve'], installer: true })).toEqual([
      'kas/main.kas.yml',
      'kas/bsp/rk1.kas.yml',
      'kas/extras/debug.kas.yml',
      'kas/scanners/cve.kas.yml',
      'kas/installer.kas.yml',
    ]);
    expect(kasConfigArg({ bsp: 'x86_64' })).toBe('kas/main.kas.yml:kas/bsp/x86_64.kas.yml');
  });
});

describe('lamadist dump', () => {
  it('prints the composed configuration of the repository for each BSP, offline', async () => {
    for (const [bsp, machine] of [['x86_64', 'lamadist-x86-64'], ['rk1', 'lamadist-rk1']]) {
      const r = await runCli(['dump', '--bsp', bsp ?? '']);
      expect(r.code).toBe(0);
      const cfg = parse(r.stdout) as { machine: string; distro: string; header: { version: number; includes?: unknown }; repos: Record<string, unknown> };
      expect(cfg.machine).toBe(machine);
      expect(cfg.distro).toBe('lamadist');
      expect(cfg.header.includes).toBeUndefined();
      expect(Object.keys(cfg.repos)).toContain('poky');
    }
  });

  it('adds extras and scanners and writes JSON with --json', async () => {
    const base = await runCli(['--json', 'dump', '--bsp', 'orin-nx'], { cwd: REPO_ROOT });
    const r = await runCli(['--json', 'dump', '--bsp', 'orin-nx', '--extra', 'debug', '--scanner', 'cve'], { cwd: REPO_ROOT });
    expect(r.code).toBe(0);
    const plain = JSON.parse(base.stdout) as { local_conf_header: Record<string, string> };
    const cfg = JSON.parse(r.stdout) as { machine: string; distro: string; local_conf_header: Record<string, string> };
    expect(cfg.machine).toBe('lamadist-orin-nx');
    const added = Object.keys(cfg.local_conf_header).filter((k) => !(k in plain.local_conf_header));
    expect(added).toContain('scanner-cve');
    expect(cfg.local_conf_header['scanner-cve']).toContain('INHERIT += "cve-check"');
  });

  it('rejects an unknown scanner with the known ones', async () => {
    const r = await runCli(['dump', '--scanner', 'nope'], { cwd: REPO_ROOT });
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/unknown scanner 'nope' \(known: cve, sbom\) \[LAMA_E_UNKNOWN_SCANNER\]/);
  });

  it('names file:line:col when a kas file is malformed', async () => {
    write('kas/main.kas.yml', 'header:\n  version: 14\nmachine: [x\n');
    write('kas/bsp/x86_64.kas.yml', 'header:\n  version: 14\n');
    const r = await runCli(['dump', '-C', root]);
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/^lamadist: error: kas\/main\.kas\.yml:\d+:\d+: .* \[LAMA_E_YAML\]\n$/);
  });
});
