import { spawn } from 'node:child_process';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { UserError } from '../errors.js';
import { Rng, mutateBytes } from './mutate.js';
import {
  TARGETS,
  makePki,
  quietContext,
  type Case,
  type FuzzTarget,
  type Pki,
  type Prepared,
  type Shared,
} from './targets.js';

/**
 * Seeded, bounded mutation fuzzing of every parser of untrusted input.
 *
 * Public API:
 * - `fuzz(options)` → `FuzzReport`: for each target, seeds made at fuzz time by the real tools
 *   (sgdisk, cryptsetup, rauc, veritysetup, mkfs.erofs, sbsign) or the project's own writers, then
 *   `cases` mutants run through the function the CLI command calls. A case passes when it is
 *   accepted or refused with a one-line UserError, within the target's time bound, leaving its
 *   input unchanged and no file behind. A sample also goes to the peer tool (verdict agreement) and
 *   through the real CLI binary (exit 0 or 2, one stderr line, no output after a refusal).
 * - `TARGETS`, `formatTotal(report)`; `log` receives one line per target and per failure. Case `n` of target `t` under seed `s` is reproduced alone
 *   with `npm run fuzz -- --seed s --target t --case n`; failing inputs are saved under `results`.
 */

export { TARGETS } from './targets.js';
export type { FuzzTarget } from './targets.js';

export interface FuzzOptions {
  seed: number;
  /** Mutants per target. */
  cases: number;
  /** Only these targets (default: all). */
  targets?: readonly string[];
  /** Run only this case number (reproduce a failure). */
  only?: number;
  /** Ask the peer tool about every k-th case (0: never). */
  peerEvery: number;
  /** Mutants per target run through the CLI binary. */
  cliCases: number;
  /** Directory for failing inputs and their descriptions. */
  results: string;
  /** Progress lines (one per target). */
  log?: (line: string) => void;
}

export interface Failure {
  target: string;
  n: number;
  seed: string;
  steps: string[];
  problem: string;
  /** The saved input, when it could be written. */
  reproducer?: string;
}

export interface PeerTally {
  tool: string;
  sampled: number;
  bothAccept: number;
  bothRefuse: number;
  weAcceptTheyRefuse: number;
  weRefuseTheyAccept: number;
  /** First case numbers of each disagreement, to look at with --case. */
  disagreements: { weAccept: number[]; weRefuse: number[] };
}

export interface TargetReport {
  name: string;
  parser: string;
  seeds: string[];
  cases: number;
  accepted: number;
  refused: number;
  failures: Failure[];
  peer?: PeerTally;
  cli: { cases: number; exit0: number; exit2: number };
  seconds: number;
}

export interface FuzzReport {
  seed: number;
  targets: TargetReport[];
  failures: number;
  seconds: number;
}

const BIN = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../bin/lamadist.js');

class Timeout extends Error {}

function withTimeout<T>(p: Promise<T>, ms: number): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const t = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Timeout(`no answer within ${ms} ms`)), ms);
  });
  return Promise.race([p, t]).finally(() => clearTimeout(timer));
}

/** Size and mtime: enough to see that a refusing command did not write to its input. */
async function stamp(file: string): Promise<string> {
  const s = await fs.stat(file).catch(() => undefined);
  return s ? `${s.size}/${s.mtimeMs}` : 'absent';
}

/** Files a command left behind next to its input: temp files always, anything new after a refusal. */
async function leftovers(dir: string, refused: boolean, expected: ReadonlySet<string>): Promise<string[]> {
  const names = await fs.readdir(dir);
  return names.filter((n) => /^\..*\.tmp$/.test(n) || (refused && !expected.has(n)));
}

function mutant(
  p: Prepared,
  seed: number,
  target: string,
  n: number,
): { seedIndex: number; data: Buffer; steps: string[] } {
  const rng = Rng.forCase(seed, target, n);
  const seedIndex = rng.int(p.seeds.length);
  const s = p.seeds[seedIndex] as Prepared['seeds'][number];
  const m = p.mutate ? p.mutate(rng, s) : mutateBytes(rng, s.data, p.regions?.(s.data) ?? []);
  return { seedIndex, ...m };
}

function describe(err: unknown): string {
  if (err instanceof Timeout) return `hang: ${err.message}`;
  if (err instanceof UserError) return `UserError spanning lines: ${JSON.stringify(err.line())}`;
  const e = err instanceof Error ? err : new Error(String(err));
  return `internal error (exit 1): ${e.stack ?? e.message}`;
}

async function save(o: FuzzOptions, f: Failure, data: Buffer): Promise<Failure> {
  await fs.mkdir(o.results, { recursive: true });
  const base = path.join(o.results, `${f.target}-seed${o.seed}-case${f.n}`);
  await fs.writeFile(`${base}.bin`, data);
  await fs.writeFile(
    `${base}.txt`,
    `target ${f.target}, seed input "${f.seed}", mutations: ${f.steps.join('; ')}\nreproduce: npm run fuzz -- --seed ${o.seed} --target ${f.target} --case ${f.n}\n\n${f.problem}\n`,
  );
  return { ...f, reproducer: `${base}.bin` };
}

function runBinary(args: string[], timeoutMs: number): Promise<{ code: number; stderr: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [BIN, ...args], {
      env: { ...process.env, NO_COLOR: '1' },
      stdio: ['ignore', 'ignore', 'pipe'],
    });
    let stderr = '';
    child.stderr.on('data', (c: Buffer) => (stderr += c.toString()));
    const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
    child.on('error', reject);
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      resolve({ code: code ?? (signal ? 128 : 1), stderr });
    });
  });
}

async function fuzzTarget(
  o: FuzzOptions,
  t: FuzzTarget,
  work: string,
  shared: Shared,
): Promise<TargetReport> {
  const started = performance.now();
  const dir = path.join(work, t.name);
  await fs.mkdir(dir, { recursive: true });
  const p = await t.prepare(dir, shared);
  const report: TargetReport = {
    name: t.name,
    parser: t.parser,
    seeds: p.seeds.map((s) => s.name),
    cases: 0,
    accepted: 0,
    refused: 0,
    failures: [],
    cli: { cases: 0, exit0: 0, exit2: 0 },
    seconds: 0,
  };
  if (p.peer)
    report.peer = {
      tool: p.peer.name,
      sampled: 0,
      bothAccept: 0,
      bothRefuse: 0,
      weAcceptTheyRefuse: 0,
      weRefuseTheyAccept: 0,
      disagreements: { weAccept: [], weRefuse: [] },
    };
  const caseDir = path.join(dir, 'case');
  const numbers = o.only !== undefined ? [o.only] : Array.from({ length: o.cases }, (_, i) => i);
  try {
    for (const n of numbers) {
      const m = mutant(p, o.seed, t.name, n);
      await fs.rm(caseDir, { recursive: true, force: true });
      await fs.mkdir(caseDir);
      const file = path.join(caseDir, 'input');
      await (p.materialize ?? ((d: Buffer, f: string) => fs.writeFile(f, d)))(m.data, file);
      const before = await stamp(file);
      const c: Case = { n, seed: m.seedIndex, data: m.data, file };
      const t0 = performance.now();
      let problem: string | undefined;
      let accepted = false;
      try {
        await withTimeout(p.run(quietContext(n % 2 === 1), c), t.timeoutMs);
        accepted = true;
      } catch (err) {
        if (!(err instanceof UserError) || err.line().includes('\n')) problem = describe(err);
      }
      const ms = performance.now() - t0;
      if (!problem && ms > t.timeoutMs) problem = `hang: took ${Math.round(ms)} ms (bound ${t.timeoutMs} ms)`;
      if (!problem) {
        const left = await leftovers(caseDir, !accepted, new Set(['input']));
        if (left.length > 0)
          problem = `left behind after ${accepted ? 'success' : 'refusal'}: ${left.join(', ')}`;
        else if (!accepted && (await stamp(file)) !== before) problem = 'refused, but changed its input file';
      }
      report.cases++;
      if (problem) {
        const f = await save(
          o,
          { target: t.name, n, seed: p.seeds[m.seedIndex]?.name ?? '?', steps: m.steps, problem },
          m.data,
        );
        report.failures.push(f);
        o.log?.(
          `FAIL ${t.name} case ${n} (${f.seed}; ${f.steps.join('; ')}): ${problem.split('\n').slice(0, 4).join(' | ')}\n  saved ${f.reproducer ?? ''}`,
        );
        continue;
      }
      if (accepted) report.accepted++;
      else report.refused++;
      if (p.peer && report.peer && o.peerEvery > 0 && n % o.peerEvery === 0) {
        const they = await p.peer.accepts(file, c);
        report.peer.sampled++;
        if (accepted && they) report.peer.bothAccept++;
        else if (!accepted && !they) report.peer.bothRefuse++;
        else {
          if (accepted) report.peer.weAcceptTheyRefuse++;
          else report.peer.weRefuseTheyAccept++;
          const list = accepted ? report.peer.disagreements.weAccept : report.peer.disagreements.weRefuse;
          if (list.length < 3) list.push(n);
        }
      }
    }
    if (p.cli && o.only === undefined) await cliCases(o, t, p, dir, report);
  } finally {
    await p.close?.();
  }
  report.seconds = (performance.now() - started) / 1000;
  return report;
}

/** A few mutants through the real binary: exit 0 or 2, one stderr line, nothing left after a refusal. */
async function cliCases(
  o: FuzzOptions,
  t: FuzzTarget,
  p: Prepared,
  dir: string,
  report: TargetReport,
): Promise<void> {
  const cliDir = path.join(dir, 'cli');
  for (let i = 0; i < o.cliCases; i++) {
    const n = o.cases + i;
    const m = mutant(p, o.seed, t.name, n);
    await fs.rm(cliDir, { recursive: true, force: true });
    await fs.mkdir(cliDir);
    const file = path.join(cliDir, 'input');
    await (p.materialize ?? ((d: Buffer, f: string) => fs.writeFile(f, d)))(m.data, file);
    const before = await stamp(file);
    const { args, output } = (p.cli as NonNullable<Prepared['cli']>)(file, cliDir);
    const r = await runBinary(args, Math.max(60_000, t.timeoutMs * 4));
    const lines = r.stderr.split('\n').filter((l) => l !== '');
    let problem: string | undefined;
    if (r.code !== 0 && r.code !== 2) problem = `lamadist ${args.join(' ')} exited ${r.code}: ${r.stderr}`;
    else if (r.code === 2 && (lines.length !== 1 || !lines[0]?.startsWith('lamadist: error: ')))
      problem = `exit 2 without exactly one error line: ${JSON.stringify(r.stderr)}`;
    else if (/\n\s+at /.test(r.stderr)) problem = `stack trace on stderr: ${r.stderr}`;
    else if (r.code === 2 && output && (await stamp(output)) !== 'absent')
      problem = `refused, but left ${output}`;
    else if (r.code === 2 && (await stamp(file)) !== before) problem = 'refused, but changed its input file';
    else {
      const left = await leftovers(cliDir, r.code === 2, new Set(['input']));
      if (left.length > 0) problem = `left behind: ${left.join(', ')}`;
    }
    report.cli.cases++;
    if (r.code === 0) report.cli.exit0++;
    if (r.code === 2) report.cli.exit2++;
    if (problem) {
      const f = await save(
        o,
        {
          target: t.name,
          n,
          seed: p.seeds[m.seedIndex]?.name ?? '?',
          steps: [...m.steps, `cli: lamadist ${args.join(' ')}`],
          problem,
        },
        m.data,
      );
      report.failures.push(f);
      o.log?.(
        `FAIL ${t.name} cli case ${n}: ${problem.split('\n').slice(0, 4).join(' | ')}\n  saved ${f.reproducer ?? ''}`,
      );
    }
  }
}

/** Run the fuzzer. Work files live in a temporary directory removed at the end. */
export async function fuzz(o: FuzzOptions): Promise<FuzzReport> {
  const started = performance.now();
  const unknown = (o.targets ?? []).filter((n) => !TARGETS.some((t) => t.name === n));
  if (unknown.length > 0)
    throw new UserError(
      'LAMA_E_USAGE',
      `unknown fuzz target(s): ${unknown.join(', ')} (known: ${TARGETS.map((t) => t.name).join(', ')})`,
    );
  const chosen = TARGETS.filter((t) => !o.targets || o.targets.length === 0 || o.targets.includes(t.name));
  const work = await fs.mkdtemp(path.join(os.tmpdir(), 'lamadist-fuzz-'));
  let pki: Promise<Pki> | undefined;
  const shared: Shared = { pki: () => (pki ??= makePki(work)) };
  const targets: TargetReport[] = [];
  try {
    for (const t of chosen) {
      const r = await fuzzTarget(o, t, work, shared);
      targets.push(r);
      o.log?.(formatRow(r));
    }
  } finally {
    await fs.rm(work, { recursive: true, force: true });
  }
  return {
    seed: o.seed,
    targets,
    failures: targets.reduce((n, t) => n + t.failures.length, 0),
    seconds: (performance.now() - started) / 1000,
  };
}

function cases(ns: number[]): string {
  return ns.length > 0 ? ` (case ${ns.join(', ')})` : '';
}

function formatRow(r: TargetReport): string {
  const peer = r.peer
    ? `${r.peer.tool}: ${r.peer.sampled} sampled, both accept ${r.peer.bothAccept}, both refuse ${r.peer.bothRefuse}, we accept/they refuse ${r.peer.weAcceptTheyRefuse}${cases(r.peer.disagreements.weAccept)}, we refuse/they accept ${r.peer.weRefuseTheyAccept}${cases(r.peer.disagreements.weRefuse)}`
    : 'no peer';
  const cli = r.cli.cases > 0 ? `; CLI ${r.cli.cases} (exit 0: ${r.cli.exit0}, exit 2: ${r.cli.exit2})` : '';
  return `${r.name.padEnd(14)} ${String(r.cases).padStart(5)} cases (${r.accepted} accepted, ${r.refused} refused), ${r.failures.length} failures, ${r.seconds.toFixed(1)} s${cli}; ${peer}`;
}

/** The one-line total of a run. */
export function formatTotal(r: FuzzReport): string {
  const total = r.targets.reduce((n, t) => n + t.cases + t.cli.cases, 0);
  return `seed ${r.seed}: ${r.targets.length} targets, ${total} cases, ${r.failures} failures, ${r.seconds.toFixed(1)} s`;
}
