import { createWriteStream, existsSync, promises as fs } from 'node:fs';
import path from 'node:path';
import { UserError } from '../errors.js';
import { kasConfigArg, type KasSelection } from '../kas/index.js';
import { hasTool, run } from '../util/proc.js';

/**
 * The build workflow: kas runs inside the build container (container/Containerfile), with the
 * source, the sstate cache and the downloads directory bind-mounted and the caller's UID mapped to
 * the container's `builder` user, so files written into the checkout belong to the caller. The
 * container command line is planned as data (`planContainerRun`) and executed by `runInContainer`.
 */

/** Image of the build container (container/Containerfile); podman finds the short name locally first. */
export const BUILDER_IMAGE = 'lamadist-builder:latest';
/** The non-root user the build container runs as (container/Containerfile creates it). */
export const BUILDER_UID = 1000;
export const BUILDER_GID = 1000;
/** Where the source is mounted in the container (the Containerfile's WORKDIR). */
export const CONTAINER_WORKDIR = '/work';
/** Start of the host ID range rootful podman maps the container's other users to. */
const ROOTFUL_SUBID_BASE = 100000;

export type Engine = 'podman' | 'docker';

/** Everything that decides the container command line; resolved from flags, env and the host. */
export interface ContainerSettings {
  engine: Engine;
  /** Global engine options placed before `run` (e.g. podman --root/--storage-driver). */
  engineArgs: string[];
  image: string;
  /** OCI runtime (`--runtime runc`); the engine's default when undefined. */
  runtime?: string;
  /** `--ulimit` values such as `nofile=1024:1024`. */
  ulimits: string[];
  /** The caller's IDs, mapped to builder. */
  uid: number;
  gid: number;
  /** Host paths. */
  sourceDir: string;
  sstateDir: string;
  downloadsDir: string;
  /** Env files passed with --env-file (.kas.env, then .kas.env.local when present). */
  envFiles: string[];
  /** Extra environment for the container. */
  env: Record<string, string>;
}

/** A planned process invocation. */
export interface Invocation {
  cmd: string;
  args: string[];
}

/** In-container locations; kas forwards SSTATE_DIR and DL_DIR to BitBake. */
export const CONTAINER_PATHS = {
  source: CONTAINER_WORKDIR,
  build: `${CONTAINER_WORKDIR}/build`,
  sstate: `${CONTAINER_WORKDIR}/.cache/sstate`,
  downloads: `${CONTAINER_WORKDIR}/build/downloads`,
} as const;

/**
 * The ID-mapping options that make the caller appear as `builder` inside the container:
 * rootless podman has keep-id for exactly this; rootful podman needs an explicit map (the caller
 * to builder, everything else to a subordinate range); docker cannot remap per container, so the
 * process runs with the caller's IDs.
 */
export function idMappingArgs(s: Pick<ContainerSettings, 'engine' | 'uid' | 'gid'>): string[] {
  if (s.engine === 'docker') return ['--user', `${s.uid}:${s.gid}`];
  if (s.uid !== 0) return [`--userns=keep-id:uid=${BUILDER_UID},gid=${BUILDER_GID}`, '--user', `${BUILDER_UID}:${BUILDER_GID}`];
  const map = (flag: string, id: number, hostId: number): string[] => [
    flag, `0:${ROOTFUL_SUBID_BASE}:${id}`,
    flag, `${id}:${hostId}:1`,
    flag, `${id + 1}:${ROOTFUL_SUBID_BASE + id + 1}:${65536 - id - 1}`,
  ];
  return [...map('--uidmap', BUILDER_UID, s.uid), ...map('--gidmap', BUILDER_GID, s.gid), '--user', `${BUILDER_UID}:${BUILDER_GID}`];
}

/**
 * Plan `<engine> run` for a command inside the build container (pure). `interactive` adds a TTY
 * for shells; `name` lets the caller stop the container by name.
 */
export function planContainerRun(s: ContainerSettings, command: string[], opts: { interactive?: boolean; name?: string } = {}): Invocation {
  const args = [...s.engineArgs, 'run', '--rm'];
  if (opts.interactive) args.push('-it');
  if (opts.name) args.push('--name', opts.name);
  if (s.runtime) args.push('--runtime', s.runtime);
  for (const u of s.ulimits) args.push('--ulimit', u);
  args.push(...idMappingArgs(s));
  args.push('-v', `${s.sourceDir}:${CONTAINER_PATHS.source}`);
  args.push('-v', `${s.sstateDir}:${CONTAINER_PATHS.sstate}`);
  args.push('-v', `${s.downloadsDir}:${CONTAINER_PATHS.downloads}`);
  args.push('-w', CONTAINER_WORKDIR);
  for (const f of s.envFiles) args.push('--env-file', f);
  const env: Record<string, string> = {
    KAS_WORK_DIR: CONTAINER_PATHS.build,
    KAS_BUILD_DIR: CONTAINER_PATHS.build,
    SSTATE_DIR: CONTAINER_PATHS.sstate,
    DL_DIR: CONTAINER_PATHS.downloads,
    ...s.env,
  };
  for (const [k, v] of Object.entries(env)) args.push('-e', `${k}=${v}`);
  args.push(s.image, ...command);
  return { cmd: s.engine, args };
}

/** What `lamadist build` builds. */
export interface BuildRequest extends KasSelection {
  /** CI mode: kas --update --force-checkout, so pinned refs are fetched and local edits discarded. */
  ci?: boolean;
  /** Passed to BitBake after `--`. */
  bitbakeArgs?: string[];
}

/** The kas command line run inside the container (pure). */
export function planKasCommand(verb: 'build' | 'shell', req: BuildRequest): string[] {
  const args = ['kas', verb];
  if (req.ci) args.push('--update', '--force-checkout');
  args.push(kasConfigArg(req));
  if (verb === 'build' && req.bitbakeArgs && req.bitbakeArgs.length > 0) args.push('--', ...req.bitbakeArgs);
  return args;
}

function splitWords(v: string | undefined): string[] {
  return (v ?? '').split(/\s+/).filter(Boolean);
}

/** Options a user can give on the command line to override the environment and defaults. */
export interface SettingsOverrides {
  engine?: Engine;
  image?: string;
  runtime?: string;
  ulimits?: string[];
  /** Engine to assume when none is installed (dry runs plan for podman). */
  fallbackEngine?: Engine;
}

/**
 * Resolve container settings for the checkout at `root`: flags first, then LAMADIST_CONTAINER_ENGINE,
 * LAMADIST_CONTAINER_ENGINE_ARGS, LAMADIST_BUILDER_IMAGE, LAMADIST_CONTAINER_RUNTIME,
 * LAMADIST_CONTAINER_ULIMITS, LAMADIST_SSTATE_DIR and LAMADIST_DL_DIR; podman is preferred and
 * docker used when podman is absent.
 */
export async function resolveSettings(root: string, o: SettingsOverrides = {}, env: NodeJS.ProcessEnv = process.env): Promise<ContainerSettings> {
  const engine = o.engine ?? (env.LAMADIST_CONTAINER_ENGINE as Engine | undefined) ?? (await detectEngine()) ?? o.fallbackEngine;
  if (!engine) throw noEngine();
  if (engine !== 'podman' && engine !== 'docker') {
    throw new UserError('LAMA_E_ENGINE', `container engine '${String(engine)}' is not supported (use podman or docker)`);
  }
  const src = path.resolve(root);
  const envFiles = ['.kas.env', '.kas.env.local'].map((f) => path.join(src, f)).filter((f) => existsSync(f));
  const runtime = o.runtime ?? (env.LAMADIST_CONTAINER_RUNTIME || undefined);
  return {
    engine,
    engineArgs: splitWords(env.LAMADIST_CONTAINER_ENGINE_ARGS),
    image: o.image ?? (env.LAMADIST_BUILDER_IMAGE || BUILDER_IMAGE),
    ...(runtime ? { runtime } : {}),
    ulimits: o.ulimits && o.ulimits.length > 0 ? o.ulimits : splitWords(env.LAMADIST_CONTAINER_ULIMITS),
    uid: process.getuid?.() ?? 0,
    gid: process.getgid?.() ?? 0,
    sourceDir: src,
    sstateDir: path.resolve(src, env.LAMADIST_SSTATE_DIR || '.cache/sstate'),
    downloadsDir: path.resolve(src, env.LAMADIST_DL_DIR || 'build/downloads'),
    envFiles,
    env: {},
  };
}

/** podman when installed, else docker, else undefined. */
export async function detectEngine(): Promise<Engine | undefined> {
  if (await hasTool('podman')) return 'podman';
  if (await hasTool('docker')) return 'docker';
  return undefined;
}

/** The one-line error for a host without a container engine. */
export function noEngine(): UserError {
  return new UserError(
    'LAMA_E_CANNOT_BUILD',
    'this host cannot build: neither podman nor docker is installed (apt-get install podman); run `lamadist vm demo` to try LamaDist without a build',
  );
}

/** One BitBake progress line: which phase, how far. */
export interface BitbakeProgress {
  phase: 'setscene' | 'tasks';
  done: number;
  total: number;
}

/**
 * Parse BitBake's "NOTE: Running task N of M (...)" and "NOTE: Running setscene task N of M (...)"
 * lines (pure); anything else gives undefined.
 */
export function parseBitbakeProgress(line: string): BitbakeProgress | undefined {
  const m = /^(?:NOTE: )?Running (setscene )?task (\d+) of (\d+)\b/.exec(line.trim());
  if (!m) return undefined;
  return { phase: m[1] ? 'setscene' : 'tasks', done: Number(m[2]), total: Number(m[3]) };
}

/** An artifact the build produced. */
export interface Artifact {
  kind: 'image' | 'bundle' | 'sbom' | 'rpm';
  path: string;
  size: number;
  /** Written by this build (false: left by an earlier one, e.g. restored from sstate unchanged). */
  fresh: boolean;
}

const IMAGE_SUFFIXES = ['.wic', '.wic.zst', '.wic.xz', '.wic.gz', '.wic.bz2', '.wic.bmap', '.erofs', '.efi', '.uki', '.img', '.ext4', '.tar.zst'];

/** Classify a deploy file by name (pure); undefined for files that are not summarised. */
export function classifyArtifact(name: string): Artifact['kind'] | undefined {
  if (name.endsWith('.raucb')) return 'bundle';
  if (name.endsWith('.spdx.json') || name.endsWith('.spdx.tar.zst')) return 'sbom';
  if (name.endsWith('.rpm')) return 'rpm';
  if (IMAGE_SUFFIXES.some((s) => name.endsWith(s)) && !name.endsWith('.wic.bmap')) return 'image';
  return undefined;
}

/**
 * Find the artifacts under the build directory's deploy trees (tmp/deploy and tmp-<libc>/deploy):
 * with `machine`, images only from deploy/images/<machine>/ (the tree is shared by every BSP).
 * Symlinks (Yocto's "latest" names) are skipped so each file is listed once; files older than
 * `since` are kept but marked as not fresh.
 */
export async function scanArtifacts(buildDir: string, options: { since?: number; machine?: string } = {}): Promise<Artifact[]> {
  const out: Artifact[] = [];
  const tmps = (await fs.readdir(buildDir).catch(() => [] as string[])).filter((d) => /^tmp(-.+)?$/.test(d));
  const walk = async (dir: string): Promise<void> => {
    for (const e of await fs.readdir(dir, { withFileTypes: true }).catch(() => [])) {
      const p = path.join(dir, e.name);
      if (e.isDirectory()) await walk(p);
      else if (e.isFile()) {
        const kind = classifyArtifact(e.name);
        if (!kind) continue;
        const images = `${path.sep}deploy${path.sep}images${path.sep}`;
        if (options.machine && p.includes(images) && !p.includes(`${images}${options.machine}${path.sep}`)) continue;
        const st = await fs.stat(p);
        out.push({ kind, path: p, size: st.size, fresh: options.since === undefined || st.mtimeMs >= options.since });
      }
    }
  };
  for (const t of tmps) await walk(path.join(buildDir, t, 'deploy'));
  return out.sort((a, b) => a.kind.localeCompare(b.kind) || a.path.localeCompare(b.path));
}

/** Human size with binary units. */
export function formatSize(bytes: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let v = bytes;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return i === 0 ? `${v} B` : `${v.toFixed(1)} ${units[i]}`;
}

/** Result of a containerised kas run. */
export interface BuildSummary {
  exitCode: number;
  logFile: string;
  elapsedMs: number;
  artifacts: Artifact[];
}

/**
 * Run a planned container command, streaming its output into `logFile` (kept after failures,
 * which is when it is needed) and each line to `onLine`. Resolves with the exit code.
 */
export async function runLogged(inv: Invocation, logFile: string, onLine: (line: string) => void): Promise<number> {
  await fs.mkdir(path.dirname(logFile), { recursive: true });
  const log = createWriteStream(logFile, { flags: 'w', mode: 0o644 });
  log.write(`# ${inv.cmd} ${inv.args.join(' ')}\n`);
  const line = (l: string): void => {
    log.write(l + '\n');
    onLine(l);
  };
  try {
    const r = await run(inv.cmd, inv.args, { allowFailure: true, onStdoutLine: line, onStderrLine: line });
    return r.code;
  } finally {
    await new Promise<void>((resolve) => log.end(resolve));
  }
}

/** `<engine> build` of the build container from container/Containerfile (pure). */
export function planContainerBuild(s: Pick<ContainerSettings, 'engine' | 'engineArgs' | 'image' | 'sourceDir'>, opts: { noCache?: boolean } = {}): Invocation {
  const dir = path.join(s.sourceDir, 'container');
  const args = [...s.engineArgs, 'build', '-t', s.image, '-f', path.join(dir, 'Containerfile')];
  if (opts.noCache) args.push('--no-cache');
  args.push(dir);
  return { cmd: s.engine, args };
}

/** `<engine> rmi` of the build container image (pure). */
export function planImageRemove(s: Pick<ContainerSettings, 'engine' | 'engineArgs' | 'image'>): Invocation {
  return { cmd: s.engine, args: [...s.engineArgs, 'rmi', s.image] };
}

/**
 * Build the container image from container/Containerfile, logging to build/logs/container-<time>.log.
 * Fails with a UserError naming the log when the engine fails.
 */
export async function buildContainerImage(
  s: ContainerSettings,
  opts: { noCache?: boolean; onLine?: (line: string) => void; onStart?: (log: string, inv: Invocation) => void } = {},
): Promise<string> {
  const containerfile = path.join(s.sourceDir, 'container', 'Containerfile');
  if (!existsSync(containerfile)) throw new UserError('LAMA_E_NOT_FOUND', `${containerfile} does not exist`);
  const inv = planContainerBuild(s, opts);
  const log = path.join(s.sourceDir, 'build', 'logs', `container-${new Date().toISOString().replace(/[:.]/g, '-')}.log`);
  opts.onStart?.(log, inv);
  const code = await runLogged(inv, log, opts.onLine ?? (() => undefined));
  if (code !== 0) throw new UserError('LAMA_E_CONTAINER_BUILD', `${s.engine} build of ${s.image} exited with ${code}; full log: ${log}`);
  return log;
}

/** Whether the engine has the image locally. */
export async function imageExists(s: Pick<ContainerSettings, 'engine' | 'engineArgs' | 'image'>): Promise<boolean> {
  const r = await run(s.engine, [...s.engineArgs, 'image', 'inspect', '--format', '{{.Id}}', s.image], { allowFailure: true });
  return r.code === 0;
}
