import { existsSync, readdirSync, promises as fs } from 'node:fs';
import path from 'node:path';
import { Option, type Command } from 'commander';
import {
  buildContainerImage,
  formatSize,
  imageExists,
  parseBitbakeProgress,
  planContainerRun,
  planKasCommand,
  resolveSettings,
  runLogged,
  scanArtifacts,
  type BuildRequest,
  type BuildSummary,
  type Engine,
  type Invocation,
  type SettingsOverrides,
} from '../../build/index.js';
import { DEFAULT_BSP, getBsp } from '../../bsp/index.js';
import { cannotBuildReason } from '../../doctor/index.js';
import { UserError } from '../../errors.js';
import type { KasSelection } from '../../kas/index.js';
import { gitVersion } from '../../version/index.js';
import { act } from '../action.js';
import type { Context } from '../context.js';

/** The flags that choose what to build, shared by build, shell and dump. */
export interface SelectionFlags {
  bsp: string;
  extra: string[];
  scanner: string[];
  installer?: boolean;
}

/** The kas selection the flags describe. */
export function selectionFrom(f: SelectionFlags): KasSelection {
  return { bsp: f.bsp, extras: f.extra, scanners: f.scanner, installer: Boolean(f.installer) };
}

/** Container flags shared by build, shell and container. */
export interface ContainerFlags {
  engine?: Engine;
  image?: string;
  runtime?: string;
  ulimit: string[];
}

function collectList(value: string, prev: string[]): string[] {
  return [...prev, ...value.split(',').map((s) => s.trim()).filter(Boolean)];
}

/** Add --bsp, --extra and --installer to a command. */
export function selectionOptions(cmd: Command): Command {
  return cmd
    .option('--bsp <name>', 'board support package (lamadist bsp list)', DEFAULT_BSP)
    .option('--extra <names>', 'extra kas overlays from kas/extras/ (comma-separated, repeatable)', collectList, [])
    .option('--scanner <names>', 'scanner overlays from kas/scanners/, e.g. cve (comma-separated, repeatable)', collectList, [])
    .option('--installer', 'add the USB installer overlay (kas/installer.kas.yml)');
}

/** Add the container engine flags to a command. */
export function containerOptions(cmd: Command): Command {
  return cmd
    .addOption(new Option('--engine <engine>', 'container engine (default: podman, else docker; env LAMADIST_CONTAINER_ENGINE)').choices(['podman', 'docker']))
    .option('--image <ref>', 'build container image (env LAMADIST_BUILDER_IMAGE)')
    .option('--runtime <name>', 'OCI runtime, e.g. runc (env LAMADIST_CONTAINER_RUNTIME)')
    .option('--ulimit <limit>', 'container ulimit such as nofile=1024:1024 (repeatable; env LAMADIST_CONTAINER_ULIMITS)', (v: string, p: string[]) => [...p, v], []);
}

/** Settings overrides from container flags. */
export function overridesFrom(f: ContainerFlags): SettingsOverrides {
  return {
    ...(f.engine ? { engine: f.engine } : {}),
    ...(f.image ? { image: f.image } : {}),
    ...(f.runtime ? { runtime: f.runtime } : {}),
    ...(f.ulimit.length > 0 ? { ulimits: f.ulimit } : {}),
  };
}

/** Check a selection against the repository: known BSP, existing extras and scanners. */
export function validateSelection(root: string, sel: KasSelection): void {
  getBsp(sel.bsp);
  if (!existsSync(path.join(root, 'kas', 'main.kas.yml'))) {
    throw new UserError('LAMA_E_NOT_FOUND', `${path.resolve(root)} is not a LamaDist checkout (no kas/main.kas.yml); run from the repository root or pass -C DIR`);
  }
  if (!existsSync(path.join(root, 'kas', 'bsp', `${sel.bsp}.kas.yml`))) {
    throw new UserError('LAMA_E_NOT_FOUND', `this checkout has no kas/bsp/${sel.bsp}.kas.yml`);
  }
  for (const [kind, dirName, names] of [['extra', 'extras', sel.extras ?? []], ['scanner', 'scanners', sel.scanners ?? []]] as const) {
    const dir = path.join(root, 'kas', dirName);
    for (const x of names) {
      if (existsSync(path.join(dir, `${x}.kas.yml`))) continue;
      const known = existsSync(dir) ? readdirSync(dir).filter((f) => f.endsWith('.kas.yml')).map((f) => f.replace(/\.kas\.yml$/, '')) : [];
      throw new UserError(kind === 'extra' ? 'LAMA_E_UNKNOWN_EXTRA' : 'LAMA_E_UNKNOWN_SCANNER', `unknown ${kind} '${x}' (known: ${known.join(', ') || 'none'})`);
    }
  }
  if (sel.installer && !existsSync(path.join(root, 'kas', 'installer.kas.yml'))) {
    throw new UserError('LAMA_E_NOT_FOUND', 'this repository has no kas/installer.kas.yml');
  }
}

/** Shell-quoted rendering of an invocation, for --dry-run and logs. */
export function shellLine(inv: Invocation): string {
  const q = (s: string): string => (/^[\w@%+=:,./-]+$/.test(s) ? s : `'${s.replace(/'/g, `'\\''`)}'`);
  return [inv.cmd, ...inv.args].map(q).join(' ');
}

/** Progress callbacks for an image build: where the log is, the engine's output with -v. */
export function imageBuildOutput(ctx: Context, image: string): { onStart: (log: string, inv: Invocation) => void; onLine: (line: string) => void } {
  return {
    onStart: (log, inv) => {
      ctx.info(`building ${image}; log: ${log}`);
      ctx.detail(shellLine(inv));
    },
    onLine: (l) => ctx.detail(l),
  };
}

async function versionEnv(root: string): Promise<Record<string, string>> {
  try {
    return { LAMADIST_VERSION: (await gitVersion(root)).FullSemVer };
  } catch {
    return {};
  }
}

export interface BuildOptions {
  overrides?: SettingsOverrides;
  /** Probe the layer hosts before building (default true). */
  networkCheck?: boolean;
  /** Only print the container command line. */
  dryRun?: boolean;
}

/**
 * `lamadist build`: run `kas build` in the build container, with a progress bar from BitBake's task
 * lines on a TTY, the full log under build/logs/, and a summary of the artifacts at the end. On a
 * host that cannot build it fails with one line pointing at `lamadist vm demo`.
 */
export async function build(ctx: Context, root: string, req: BuildRequest, opts: BuildOptions = {}): Promise<BuildSummary | Invocation> {
  const src = path.resolve(root);
  validateSelection(src, req);
  if (opts.dryRun) {
    const settings = await resolveSettings(src, { ...opts.overrides, fallbackEngine: 'podman' });
    const inv = planContainerRun({ ...settings, env: await versionEnv(src) }, planKasCommand('build', req));
    ctx.result(inv, shellLine(inv));
    return inv;
  }
  const reason = await cannotBuildReason({ root: src, probeNetwork: opts.networkCheck ?? true, selection: req });
  if (reason) throw new UserError('LAMA_E_CANNOT_BUILD', reason);
  const settings = await resolveSettings(src, opts.overrides);
  settings.env = await versionEnv(src);
  if (!(await imageExists(settings))) {
    ctx.info(`the build container ${settings.image} is not built yet; building it first (lamadist container build)`);
    await buildContainerImage(settings, imageBuildOutput(ctx, settings.image));
  }
  await fs.mkdir(settings.sstateDir, { recursive: true });
  await fs.mkdir(settings.downloadsDir, { recursive: true });
  const inv = planContainerRun(settings, planKasCommand('build', req));
  const stamp = new Date().toISOString().replace(/[:.]/g, '-');
  const logFile = path.join(src, 'build', 'logs', `build-${req.bsp}-${stamp}.log`);
  ctx.detail(shellLine(inv));
  const overlays = [...(req.extras ?? []), ...(req.scanners ?? []), ...(req.installer ? ['installer'] : [])];
  ctx.info(`building ${req.bsp}${overlays.length ? ` + ${overlays.join(', ')}` : ''}; log: ${path.relative(process.cwd(), logFile) || logFile}`);

  const started = Date.now();
  const bar = ctx.progress('bitbake', 0);
  const code = await runLogged(inv, logFile, (line) => {
    const p = parseBitbakeProgress(line);
    if (p) bar.update(p.done, p.total, p.phase === 'setscene' ? 'setscene' : 'tasks');
    if (!ctx.tty || ctx.verbose) ctx.stderr.write(line + '\n');
    else if (/^(ERROR|WARNING):/.test(line)) ctx.info(line);
  });
  bar.finish();
  const elapsedMs = Date.now() - started;
  if (code !== 0) {
    throw new UserError('LAMA_E_BUILD_FAILED', `kas build exited with ${code} after ${(elapsedMs / 1000).toFixed(0)} s; full log: ${logFile}`);
  }
  const artifacts = await scanArtifacts(path.join(src, 'build'), { since: started - 1000, machine: getBsp(req.bsp).machine });
  const summary: BuildSummary = { exitCode: code, logFile, elapsedMs, artifacts };
  ctx.result(summary, () => {
    const lines = artifacts
      .filter((a) => a.kind !== 'rpm')
      .map((a) => `${a.kind.padEnd(6)} ${formatSize(a.size).padStart(10)}  ${path.relative(src, a.path)}${a.fresh ? '' : ' (unchanged)'}`);
    const rpms = artifacts.filter((a) => a.kind === 'rpm');
    if (rpms.length > 0) {
      const total = rpms.reduce((n, a) => n + a.size, 0);
      lines.push(`${'rpm'.padEnd(6)} ${formatSize(total).padStart(10)}  ${rpms.length} package(s), ${rpms.filter((a) => a.fresh).length} new, under deploy/rpm`);
    }
    const mins = Math.floor(elapsedMs / 60000);
    const secs = Math.round((elapsedMs % 60000) / 1000);
    lines.push(`${artifacts.length} artifact(s) in ${mins > 0 ? `${mins} min ` : ''}${secs} s; log: ${path.relative(src, logFile)}`);
    return lines.join('\n');
  });
  return summary;
}

export function configure(cmd: Command): void {
  containerOptions(selectionOptions(cmd))
    .description('build LamaDist images with kas inside the build container')
    .argument('[bitbake-args...]', 'arguments for BitBake, after --')
    .option('--ci', 'CI build: kas --update --force-checkout')
    .option('-C, --dir <path>', 'repository root', '.')
    .option('--no-network-check', 'do not probe the layer hosts first (e.g. mirrors set with KAS_PREMIRRORS in .kas.env)')
    .option('--dry-run', 'print the container command line and exit')
    .action(
      act<SelectionFlags & ContainerFlags & { ci?: boolean; dir: string; networkCheck: boolean; dryRun?: boolean }>(async (ctx, args, opts) => {
        await build(
          ctx,
          opts.dir,
          { ...selectionFrom(opts), ci: Boolean(opts.ci), bitbakeArgs: args },
          { overrides: overridesFrom(opts), networkCheck: opts.networkCheck, dryRun: Boolean(opts.dryRun) },
        );
      }),
    );
}
