import { UserError } from '../errors.js';
import { run } from '../util/proc.js';

/**
 * Build versions from git in the style of GitVersion (the tool the architecture names): the last
 * `vX.Y.Z` tag is the version source, the branch decides the increment and pre-release label, and
 * commits since the tag, branch and short SHA go into the metadata. Computed from plain git so no
 * .NET tool is needed.
 */

/** What git says about the checkout; the input of `computeVersion`. */
export interface GitFacts {
  /** The nearest reachable tag vX.Y.Z (without the v), or undefined when there is none. */
  tag?: { major: number; minor: number; patch: number; sha: string };
  /** Commits since the tag (or since the first commit when untagged). */
  commitsSince: number;
  /** Current branch, or undefined when HEAD is detached. */
  branch?: string;
  sha: string;
  shortSha: string;
  /** Number of changed tracked files. */
  uncommitted: number;
}

/** The version variables, named as GitVersion's JSON output names them. */
export interface GitVersion {
  Major: number;
  Minor: number;
  Patch: number;
  PreReleaseLabel: string;
  PreReleaseNumber: number | null;
  PreReleaseTag: string;
  BuildMetaData: number | null;
  MajorMinorPatch: string;
  SemVer: string;
  FullSemVer: string;
  InformationalVersion: string;
  BranchName: string;
  Sha: string;
  ShortSha: string;
  VersionSourceSha: string | null;
  CommitsSinceVersionSource: number;
  UncommittedChanges: number;
}

/** A branch name reduced to what SemVer allows in a pre-release identifier. */
function label(name: string): string {
  const last = name.split('/').pop() ?? name;
  return last.replace(/[^0-9A-Za-z-]+/g, '-').replace(/^-+|-+$/g, '') || 'branch';
}

/**
 * Compute the version from git facts (pure). Rules, after GitVersion's defaults:
 * - HEAD exactly on a clean `vX.Y.Z` tag: `X.Y.Z`.
 * - main/master: next patch, commits as build metadata (`1.2.4+5`).
 * - develop: next minor, `alpha` pre-release (`1.3.0-alpha.5`).
 * - release/X.Y.Z or release-X.Y.Z: that version, `beta` pre-release.
 * - any other branch: next patch, the branch name as pre-release label (`1.2.4-login.5`).
 * - detached HEAD: next patch, `detached` label.
 * - no tag at all: counts from 0.1.0, as GitVersion does.
 * Uncommitted changes add `.dirty` to the informational version, never to SemVer.
 */
export function computeVersion(f: GitFacts): GitVersion {
  const base = f.tag ?? { major: 0, minor: 1, patch: 0, sha: '' };
  const onTag = f.tag !== undefined && f.commitsSince === 0;
  let [major, minor, patch] = [base.major, base.minor, base.patch];
  let pre = '';
  let metaOnly = false;
  const branch = f.branch ?? '(detached)';
  const release = f.branch ? /^release[/-]v?(\d+)\.(\d+)(?:\.(\d+))?$/.exec(f.branch) : null;
  if (!onTag && release) {
    [major, minor, patch] = [Number(release[1]), Number(release[2]), Number(release[3] ?? 0)];
    pre = 'beta';
  } else if (!onTag && f.branch === 'develop') {
    if (f.tag) [minor, patch] = [minor + 1, 0];
    pre = 'alpha';
  } else if (!onTag) {
    if (f.tag) patch += 1;
    if (f.branch === 'main' || f.branch === 'master') metaOnly = true;
    else pre = f.branch ? label(f.branch) : 'detached';
  }
  const mmp = `${major}.${minor}.${patch}`;
  const preNumber = pre ? f.commitsSince : null;
  const preTag = pre ? `${pre}.${f.commitsSince}` : '';
  const semVer = preTag ? `${mmp}-${preTag}` : mmp;
  const buildMeta = onTag ? null : f.commitsSince;
  const fullSemVer = metaOnly && buildMeta !== null ? `${semVer}+${buildMeta}` : semVer;
  const info = [`${buildMeta ?? 0}`, `Branch.${branch.replace(/[^0-9A-Za-z-]+/g, '-')}`, `Sha.${f.sha}`];
  if (f.uncommitted > 0) info.push('dirty');
  return {
    Major: major,
    Minor: minor,
    Patch: patch,
    PreReleaseLabel: pre,
    PreReleaseNumber: preNumber,
    PreReleaseTag: preTag,
    BuildMetaData: buildMeta,
    MajorMinorPatch: mmp,
    SemVer: semVer,
    FullSemVer: fullSemVer,
    InformationalVersion: `${semVer}+${info.join('.')}`,
    BranchName: branch,
    Sha: f.sha,
    ShortSha: f.shortSha,
    VersionSourceSha: f.tag?.sha ?? null,
    CommitsSinceVersionSource: f.commitsSince,
    UncommittedChanges: f.uncommitted,
  };
}

async function git(cwd: string, args: string[]): Promise<{ code: number; out: string }> {
  const r = await run('git', ['-C', cwd, ...args], { allowFailure: true, env: { ...process.env, LC_ALL: 'C' } });
  return { code: r.code, out: r.stdout.trim() };
}

/** Read the facts `computeVersion` needs from the git checkout at `dir`. */
export async function gitFacts(dir: string): Promise<GitFacts> {
  const head = await git(dir, ['rev-parse', '--verify', '-q', 'HEAD']);
  if (head.code !== 0) {
    const inside = await git(dir, ['rev-parse', '--git-dir']);
    throw new UserError(
      'LAMA_E_NOT_GIT',
      inside.code === 0 ? `${dir} has no commits yet, so there is no version` : `${dir} is not a git checkout, so there is no version`,
    );
  }
  const sha = head.out;
  const shortSha = (await git(dir, ['rev-parse', '--short=7', 'HEAD'])).out;
  const branchR = await git(dir, ['symbolic-ref', '--short', '-q', 'HEAD']);
  const branch = branchR.code === 0 && branchR.out ? branchR.out : undefined;
  const desc = await git(dir, ['describe', '--tags', '--long', '--abbrev=40', '--match', 'v[0-9]*.[0-9]*.[0-9]*', 'HEAD']);
  let tag: GitFacts['tag'];
  let commitsSince: number;
  const m = /^v(\d+)\.(\d+)\.(\d+)-(\d+)-g[0-9a-f]+$/.exec(desc.out);
  if (desc.code === 0 && m) {
    const tagSha = (await git(dir, ['rev-list', '-n', '1', `v${m[1]}.${m[2]}.${m[3]}`])).out;
    tag = { major: Number(m[1]), minor: Number(m[2]), patch: Number(m[3]), sha: tagSha };
    commitsSince = Number(m[4]);
  } else {
    commitsSince = Number((await git(dir, ['rev-list', '--count', 'HEAD'])).out);
  }
  const status = await git(dir, ['status', '--porcelain', '--untracked-files=no']);
  const uncommitted = status.out ? status.out.split('\n').length : 0;
  return { tag, commitsSince, branch, sha, shortSha, uncommitted };
}

/** The version of the checkout at `dir`. */
export async function gitVersion(dir: string): Promise<GitVersion> {
  return computeVersion(await gitFacts(dir));
}
