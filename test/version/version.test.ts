import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { run } from '../../src/util/proc.js';
import { computeVersion, gitVersion } from '../../src/version/index.js';
import { runCli } from '../helpers/cli.js';

let root: string;
const env = {
  ...process.env,
  GIT_AUTHOR_NAME: 't',
  GIT_AUTHOR_EMAIL: 't@example.org',
  GIT_COMMITTER_NAME: 't',
  GIT_COMMITTER_EMAIL: 't@example.org',
  GIT_CONFIG_GLOBAL: '/dev/null',
};

async function git(dir: string, ...args: string[]): Promise<string> {
  return (await run('git', ['-C', dir, ...args], { env })).stdout.trim();
}

async function repo(name: string, commits: number): Promise<string> {
  const dir = path.join(root, name);
  await run('git', ['init', '-q', '-b', 'main', dir], { env });
  for (let i = 0; i < commits; i++) await commit(dir, `c${i}`);
  return dir;
}

async function commit(dir: string, msg: string): Promise<void> {
  writeFileSync(path.join(dir, 'file.txt'), `${msg}\n`);
  await git(dir, 'add', 'file.txt');
  await git(dir, 'commit', '-q', '-m', msg);
}

beforeAll(() => {
  root = mkdtempSync(path.join(os.tmpdir(), 'lamadist-version-'));
});
afterAll(() => rmSync(root, { recursive: true, force: true }));

describe('version from real git repositories', () => {
  it('is exactly the tag on a clean tagged commit', async () => {
    const dir = await repo('tagged', 2);
    await git(dir, 'tag', '-a', 'v1.2.3', '-m', 'release');
    const v = await gitVersion(dir);
    expect(v.FullSemVer).toBe('1.2.3');
    expect(v.CommitsSinceVersionSource).toBe(0);
    expect(v.BranchName).toBe('main');
    expect(v.Sha).toBe(await git(dir, 'rev-parse', 'HEAD'));
    expect(v.VersionSourceSha).toBe(v.Sha);
  });

  it('counts commits since the tag on main and on a feature branch', async () => {
    const dir = await repo('since', 1);
    await git(dir, 'tag', 'v0.4.1');
    await commit(dir, 'a');
    await commit(dir, 'b');
    const main = await gitVersion(dir);
    expect(main.FullSemVer).toBe('0.4.2+2');
    expect(main.SemVer).toBe('0.4.2');
    expect(main.ShortSha).toBe(await git(dir, 'rev-parse', '--short=7', 'HEAD'));
    await git(dir, 'checkout', '-q', '-b', 'feature/Login_form');
    await commit(dir, 'c');
    const feat = await gitVersion(dir);
    expect(feat.FullSemVer).toBe('0.4.2-Login-form.3');
    expect(feat.InformationalVersion).toBe(`0.4.2-Login-form.3+3.Branch.feature-Login-form.Sha.${feat.Sha}`);
  });

  it('starts from 0.1.0 without any tag', async () => {
    const dir = await repo('untagged', 3);
    const v = await gitVersion(dir);
    expect(v.FullSemVer).toBe('0.1.0+3');
    expect(v.VersionSourceSha).toBeNull();
  });

  it('marks uncommitted changes in the informational version only', async () => {
    const dir = await repo('dirty', 1);
    await git(dir, 'tag', 'v2.0.0');
    writeFileSync(path.join(dir, 'file.txt'), 'changed\n');
    const v = await gitVersion(dir);
    expect(v.UncommittedChanges).toBe(1);
    expect(v.FullSemVer).toBe('2.0.0');
    expect(v.InformationalVersion).toMatch(/\.dirty$/);
  });

  it('labels a detached HEAD and still finds the tag', async () => {
    const dir = await repo('detached', 1);
    await git(dir, 'tag', 'v3.1.0');
    await commit(dir, 'x');
    await commit(dir, 'y');
    await git(dir, 'checkout', '-q', '--detach', 'HEAD~1');
    const v = await gitVersion(dir);
    expect(v.BranchName).toBe('(detached)');
    expect(v.FullSemVer).toBe('3.1.1-detached.1');
  });

  it('prints FullSemVer, --json with GitVersion variables, and fails in one line outside git', async () => {
    const dir = await repo('cli', 1);
    await git(dir, 'tag', 'v5.6.7');
    const plain = await runCli(['version', '-C', dir]);
    expect(plain.code).toBe(0);
    expect(plain.stdout).toBe('5.6.7\n');
    const json = await runCli(['--json', 'version', '-C', dir]);
    expect(JSON.parse(json.stdout)).toMatchObject({ Major: 5, Minor: 6, Patch: 7, FullSemVer: '5.6.7', BranchName: 'main' });
    const none = await runCli(['version', '-C', os.tmpdir()]);
    expect(none.code).toBe(2);
    expect(none.stderr.trim().split('\n')).toHaveLength(1);
    expect(none.stderr).toMatch(/not a git checkout.*LAMA_E_NOT_GIT/);
  });
});

describe('computeVersion rules', () => {
  const facts = { commitsSince: 4, sha: 'f'.repeat(40), shortSha: 'fffffff', uncommitted: 0 };
  const tag = { major: 1, minor: 2, patch: 3, sha: 'a'.repeat(40) };
  it('develop bumps the minor with an alpha label', () => {
    expect(computeVersion({ ...facts, tag, branch: 'develop' }).FullSemVer).toBe('1.3.0-alpha.4');
  });
  it('release branches take their version with a beta label', () => {
    expect(computeVersion({ ...facts, tag, branch: 'release/2.0' }).FullSemVer).toBe('2.0.0-beta.4');
  });
});
