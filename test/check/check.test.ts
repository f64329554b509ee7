import { cpSync, existsSync, mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runChecks, type DpsLookup } from '../../src/check/index.js';
import { KAS_PROJECT_SCHEMA } from '../../src/kas/index.js';
import { REPO_ROOT } from '../helpers/cli.js';
import { sfdiskDps } from './sfdisk-dps.js';

const FIXTURES = path.join(REPO_ROOT, 'test/fixtures/check');

interface FixtureSpec {
  remove?: string[];
  expect: { where: string; code: string }[];
}

let dps: DpsLookup;
let tmp: string;

beforeAll(async () => {
  dps = await sfdiskDps();
  tmp = mkdtempSync(path.join(os.tmpdir(), 'lamadist-check-'));
});
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

/** A copy of the good repository with a broken fixture laid over it. */
function materialise(name: string): { root: string; spec: FixtureSpec } {
  const root = path.join(tmp, name);
  cpSync(path.join(FIXTURES, 'good'), root, { recursive: true });
  const overlay = path.join(FIXTURES, 'broken', name);
  cpSync(overlay, root, { recursive: true, filter: (src) => path.basename(src) !== 'fixture.json' });
  const spec = JSON.parse(readFileSync(path.join(overlay, 'fixture.json'), 'utf8')) as FixtureSpec;
  for (const r of spec.remove ?? []) rmSync(path.join(root, r));
  return { root, spec };
}

describe('lamadist check on fixtures', () => {
  it('passes the good repository with every BSP × extras × installer composed', async () => {
    const report = await runChecks({ root: path.join(FIXTURES, 'good'), kasSchema: KAS_PROJECT_SCHEMA, dps });
    expect(report.problems).toEqual([]);
    expect(report.ok).toBe(true);
    // 4 BSPs × {no extras, debug} × {with, without installer} × {no scanner, cve}
    expect(report.checked).toEqual({ kasFiles: 8, compositions: 32, layers: 2, machines: 4, wks: 3, systemConfs: 2 });
    // rauc itself loaded both system.conf files and accepted them
    expect(report.peers).toEqual(['rauc']);
  });

  const broken = readdirSync(path.join(FIXTURES, 'broken')).sort();
  it('has at least ten broken fixtures', () => {
    expect(broken.length).toBeGreaterThanOrEqual(10);
  });

  for (const name of broken) {
    it(`fails on ${name} at the right file:line:col`, async () => {
      const { root, spec } = materialise(name);
      expect(existsSync(root)).toBe(true);
      const report = await runChecks({ root, kasSchema: KAS_PROJECT_SCHEMA, dps });
      expect(report.ok).toBe(false);
      // exactly the expected problems: the right place, and no noise elsewhere
      const key = (p: { where: string; code: string }): string => `${p.where} ${p.code}`;
      expect(report.problems.map(key).sort()).toEqual(spec.expect.map(key).sort());
    });
  }
});
