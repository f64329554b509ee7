import { cpSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DISK_DPS } from '../../src/check/index.js';
import { KAS_PROJECT_SCHEMA } from '../../src/kas/index.js';
import { REPO_ROOT, runCli } from '../helpers/cli.js';
import { sfdiskDps } from './sfdisk-dps.js';

let tmp: string;
beforeAll(() => {
  tmp = mkdtempSync(path.join(os.tmpdir(), 'lamadist-check-cli-'));
});
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

describe('lamadist check command', () => {
  it('passes on the repository as shipped', async () => {
    const r = await runCli(['check']);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    expect(r.stdout).toMatch(/^ok: \d+ kas files, \d+ compositions, 2 layers, 4 machines, 3 wks files, 2 system\.conf \(also loaded by rauc\)$/m);
  });

  it('reports every problem with file:line:col, as JSON for CI, and exits 2', async () => {
    const root = path.join(tmp, 'broken');
    cpSync(path.join(REPO_ROOT, 'test/fixtures/check/good'), root, { recursive: true });
    cpSync(path.join(REPO_ROOT, 'test/fixtures/check/broken/wrong-dps-uuid'), root, { recursive: true });
    writeFileSync(path.join(root, 'kas/extras/debug.kas.yml'), 'header:\n  version: 16\nlocal_conf_headr:\n  x: y\n');
    const human = await runCli(['check', '-C', root, '--kas-schema', KAS_PROJECT_SCHEMA]);
    expect(human.code).toBe(2);
    expect(human.stdout).toContain('meta-lamadist/wic/lamadist-ab-aarch64.wks.in:4:120: partition \'verity_a\' has type 2C7357ED-EBD2-46D9-AEC1-23D437EC2BF5 (DPS root-verity on x86-64), but DPS root-verity on arm64 is df3300ce-d69f-4c92-978c-9bfb0f38d820 [LAMA_E_WKS_DPS]');
    expect(human.stdout).toContain("kas/extras/debug.kas.yml:3:1: unknown kas key 'local_conf_headr' [LAMA_E_KAS_UNKNOWN_KEY]");
    expect(human.stderr.trim().split('\n')).toHaveLength(1);
    expect(human.stderr).toMatch(/2 problem\(s\) in the distribution definition \[LAMA_E_CHECK_FAILED\]/);

    const json = await runCli(['--json', 'check', '-C', root, '--kas-schema', KAS_PROJECT_SCHEMA]);
    expect(json.code).toBe(2);
    const report = JSON.parse(json.stdout) as { ok: boolean; problems: { check: string; where: string; code: string }[] };
    expect(report.ok).toBe(false);
    expect(report.problems.map((p) => [p.check, p.where, p.code])).toEqual([
      ['kas-schema', 'kas/extras/debug.kas.yml:3:1', 'LAMA_E_KAS_UNKNOWN_KEY'],
      ['wks', 'meta-lamadist/wic/lamadist-ab-aarch64.wks.in:4:120', 'LAMA_E_WKS_DPS'],
    ]);
  });

  it('without kas anywhere, validates with the schema shipped in the package (a fresh clone)', async () => {
    const r = await runCli(['-v', 'check'], {
      env: { HOME: path.join(tmp, 'home'), LAMADIST_BUILDER_IMAGE: 'localhost/lamadist-no-such-image:none', LAMADIST_KAS_SCHEMA: '' },
    });
    expect(r.code).toBe(0);
    expect(/kas schema: (.*)$/m.exec(r.stderr)?.[1]).toBe(path.join(REPO_ROOT, 'schema/kas-project.schema.json'));
  });

  it('fails in one line when the kas schema is missing', async () => {
    const r = await runCli(['check', '--kas-schema', path.join(tmp, 'nope.json')]);
    expect(r.code).toBe(2);
    expect(r.stderr.trim().split('\n')).toEqual([`lamadist: error: kas schema ${path.join(tmp, 'nope.json')} does not exist (give one with --kas-schema) [LAMA_E_NOT_FOUND]`]);
  });

  it("uses the disk engine's DPS table, which agrees with util-linux for every role the layouts use", async () => {
    const ref = await sfdiskDps();
    for (const arch of ['x86-64', 'arm64'] as const) {
      for (const role of ['esp', 'root', 'root-verity', 'var'] as const) {
        expect(DISK_DPS.typeFor(role, arch)?.toUpperCase()).toBe(ref.typeFor(role, arch));
      }
    }
  });
});
