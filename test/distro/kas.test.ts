import { existsSync, promises as fs } from 'node:fs';
import path from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { BSPS } from '../../src/bsp/index.js';
import { composeKas, KAS_PROJECT_SCHEMA, kasFilesFor, loadKasFile, loadKasSchema, validateKasFile, type KasSchema } from '../../src/kas/index.js';
import { REPO_ROOT } from '../helpers/cli.js';
import { localConfPolicyViolations } from './policy.js';

async function kasFiles(): Promise<string[]> {
  const out: string[] = [];
  const walk = async (dir: string): Promise<void> => {
    for (const e of await fs.readdir(dir, { withFileTypes: true })) {
      const p = path.join(dir, e.name);
      if (e.isDirectory()) await walk(p);
      else if (e.name.endsWith('.kas.yml')) out.push(path.relative(REPO_ROOT, p));
    }
  };
  await walk(path.join(REPO_ROOT, 'kas'));
  return out.sort();
}

/** Every combination the issue promises: main:bsp/X, main:bsp/X:extras/debug, plus the overlays. */
function combinations(): { name: string; files: string[]; bsp: string }[] {
  const out: { name: string; files: string[]; bsp: string }[] = [];
  for (const b of BSPS) {
    out.push({ name: `main:bsp/${b.name}`, files: kasFilesFor({ bsp: b.name }), bsp: b.name });
    out.push({ name: `main:bsp/${b.name}:extras/debug`, files: kasFilesFor({ bsp: b.name, extras: ['debug'] }), bsp: b.name });
    out.push({ name: `main:bsp/${b.name}:installer`, files: kasFilesFor({ bsp: b.name, installer: true }), bsp: b.name });
    for (const s of ['cve', 'sbom']) {
      out.push({ name: `main:bsp/${b.name}:scanners/${s}`, files: [...kasFilesFor({ bsp: b.name }), `kas/scanners/${s}.kas.yml`], bsp: b.name });
    }
  }
  return out;
}

describe('kas files against the schema of the kas format (the versions kas 5.4 accepts)', () => {
  let schema: KasSchema;
  beforeAll(async () => {
    schema = await loadKasSchema(KAS_PROJECT_SCHEMA);
  });

  it('finds the kas files the issue names', async () => {
    const files = await kasFiles();
    for (const f of ['kas/main.kas.yml', 'kas/extras/debug.kas.yml', 'kas/installer.kas.yml', ...BSPS.map((b) => `kas/bsp/${b.name}.kas.yml`)]) {
      expect(files).toContain(f);
    }
    expect(files.some((f) => f.startsWith('kas/scanners/'))).toBe(true);
  });

  it('validates every kas file on its own', async () => {
    const problems: string[] = [];
    for (const f of await kasFiles()) {
      const kf = await loadKasFile(path.join(REPO_ROOT, f), REPO_ROOT);
      for (const p of validateKasFile(kf, schema)) problems.push(`${p.where}: ${p.message}`);
    }
    expect(problems).toEqual([]);
  });

  it('rejects a kas file the schema forbids (the validation can fail)', async () => {
    const dir = await fs.mkdtemp(path.join(REPO_ROOT, 'test/distro/.tmp-'));
    try {
      const bad = path.join(dir, 'bad.kas.yml');
      await fs.writeFile(bad, 'header:\n  version: 14\nrepos:\n  poky:\n    url: https://example.invalid/poky\n    refspec_typo: scarthgap\n');
      const problems = validateKasFile(await loadKasFile(bad, REPO_ROOT), schema);
      expect(problems.map((p) => p.message).join('\n')).toMatch(/refspec_typo/);
      expect(problems[0]?.where).toMatch(/bad\.kas\.yml:6:5$/);
    } finally {
      await fs.rm(dir, { recursive: true, force: true });
    }
  });

  for (const c of combinations()) {
    it(`composes and validates ${c.name}`, async () => {
      const comp = await composeKas(c.files, { repoRoot: REPO_ROOT });
      const merged = { ...comp.config, header: { version: 14 } };
      expect(schema.validate(merged), JSON.stringify(schema.validate.errors)).toBe(true);
      const bsp = BSPS.find((b) => b.name === c.bsp);
      expect(comp.config.machine).toBe(bsp?.machine);
      expect(comp.config.distro).toBe(c.name.endsWith('extras/debug') ? 'lamadist-debug' : 'lamadist');
      expect(existsSync(path.join(REPO_ROOT, 'meta-lamadist-bsp/conf/machine', `${String(comp.config.machine)}.conf`))).toBe(true);
      expect(existsSync(path.join(REPO_ROOT, 'meta-lamadist/conf/distro', `${String(comp.config.distro)}.conf`))).toBe(true);
    });
  }
});

describe('kas repos are pinned to scarthgap', () => {
  it('gives every remote repo a full commit id and the scarthgap branch', async () => {
    const unpinned: string[] = [];
    for (const b of BSPS) {
      const comp = await composeKas(kasFilesFor({ bsp: b.name }), { repoRoot: REPO_ROOT });
      const defaults = comp.config.defaults as { repos?: { branch?: string } } | undefined;
      for (const [key, repo] of Object.entries(comp.config.repos as Record<string, Record<string, unknown> | null>)) {
        if (!repo || repo.url === undefined) continue;
        const branch = repo.branch ?? defaults?.repos?.branch;
        if (typeof repo.commit !== 'string' || !/^[0-9a-f]{40}$/.test(repo.commit) || branch !== 'scarthgap') unpinned.push(`${b.name}: ${key}`);
      }
    }
    expect(unpinned).toEqual([]);
  });

  it('carries the layer repos the issue lists, with the BSP layer of each board', async () => {
    const want = ['poky', 'meta-openembedded', 'meta-clang', 'meta-secure-core', 'meta-selinux', 'meta-security', 'meta-virtualization', 'meta-rauc'];
    const bspLayer: Record<string, string[]> = { x86_64: ['meta-intel'], 'orin-nx': ['meta-tegra'], rk1: ['meta-rockchip', 'meta-arm'], soquartz: ['meta-rockchip', 'meta-arm'] };
    for (const b of BSPS) {
      const comp = await composeKas(kasFilesFor({ bsp: b.name }), { repoRoot: REPO_ROOT });
      expect(Object.keys(comp.config.repos as object)).toEqual(expect.arrayContaining([...want, ...(bspLayer[b.name] ?? [])]));
    }
  });
});

describe('no distribution policy in kas local_conf_header', () => {
  it('keeps local_conf_header to build-host and report settings in every file', async () => {
    const problems: string[] = [];
    for (const f of await kasFiles()) {
      const kf = await loadKasFile(path.join(REPO_ROOT, f), REPO_ROOT);
      const header = (kf.yaml.value.local_conf_header ?? {}) as Record<string, string>;
      for (const [name, text] of Object.entries(header)) {
        for (const v of localConfPolicyViolations(text)) problems.push(`${f} local_conf_header.${name}: ${v}`);
      }
    }
    expect(problems).toEqual([]);
  });

  it('flags policy a kas file could sneak in (the check can fail)', () => {
    expect(localConfPolicyViolations('DISTRO_FEATURES:append = " x11"\nDL_DIR ?= "/dl"')).toEqual(["DISTRO_FEATURES:append: 'DISTRO_FEATURES' is policy"]);
    expect(localConfPolicyViolations('INHERIT += "sign_rpm"')).toEqual(["INHERIT: class 'sign_rpm' is policy"]);
    expect(localConfPolicyViolations('PREFERRED_PROVIDER_virtual/kernel = "linux-foo"')).toHaveLength(1);
    expect(localConfPolicyViolations('INHERIT += "rm_work"\nBB_NUMBER_THREADS = "4"')).toEqual([]);
  });

  it('keeps secrets out of kas: signing variables are forwarded from the environment only', async () => {
    const comp = await composeKas(kasFilesFor({ bsp: 'x86_64' }), { repoRoot: REPO_ROOT });
    const env = comp.config.env as Record<string, string | null>;
    for (const k of ['LAMADIST_RPM_GPG_NAME', 'LAMADIST_RPM_GPG_PASSPHRASE', 'LAMADIST_SIGNING_DIR']) {
      expect(env).toHaveProperty(k);
      expect(env[k]).toBeNull();
    }
  });
});
