import { existsSync, promises as fs } from 'node:fs';
import { lookup } from 'node:dns/promises';
import net from 'node:net';
import path from 'node:path';
import { BUILDER_IMAGE, detectEngine, noEngine, type Engine } from '../build/index.js';
import { BSPS } from '../bsp/index.js';
import { composeKas, kasFilesFor, type KasSelection } from '../kas/index.js';
import { TOOL_PACKAGES, hasTool, run } from '../util/proc.js';

/**
 * `lamadist doctor`: host prerequisites for building LamaDist and for the toolkit's own commands,
 * each with the fix. `canBuild` is the subset that decides whether `lamadist build` can run here.
 */

export type Severity = 'ok' | 'warn' | 'error';

/** One prerequisite and its state. */
export interface Finding {
  id: string;
  severity: Severity;
  /** What was found. */
  detail: string;
  /** What to do about it (empty when ok). */
  fix: string;
}

/** Options for the probes; tests turn the network probe off. */
export interface DoctorOptions {
  root: string;
  /** Probe DNS and TCP reachability of the layer hosts (default true). */
  probeNetwork?: boolean;
  /** Timeout per network probe. */
  probeTimeoutMs?: number;
  /** Only the layers of this build (default: every BSP's). */
  selection?: KasSelection;
}

/** A remote layer repository of the kas configuration. */
export interface LayerRepo {
  key: string;
  url: string;
  host: string;
  port: number;
}

/** Free space Yocto needs for one BSP build with its sstate and downloads. */
export const MIN_FREE_GIB = 100;

/** The remote repositories of one selection's kas composition, or of every BSP's (deduplicated by key). */
export async function layerRepos(root: string, selection?: KasSelection): Promise<LayerRepo[]> {
  const out = new Map<string, LayerRepo>();
  for (const sel of selection ? [selection] : BSPS.map((b) => ({ bsp: b.name }))) {
    const files = kasFilesFor(sel);
    if (!files.every((f) => existsSync(path.join(root, f)))) continue;
    const comp = await composeKas(files, { repoRoot: root });
    for (const [key, spec] of Object.entries((comp.config.repos ?? {}) as Record<string, { url?: unknown } | null>)) {
      const url = spec?.url;
      if (typeof url !== 'string' || out.has(key)) continue;
      out.set(key, { key, url, ...hostOf(url) });
    }
  }
  return [...out.values()];
}

function hostOf(url: string): { host: string; port: number } {
  const scp = /^(?:[^@]+@)?([^:/]+):(?!\/\/)/.exec(url);
  if (scp?.[1] && !url.includes('://')) return { host: scp[1], port: 22 };
  const u = new URL(url);
  const defaults: Record<string, number> = { 'https:': 443, 'http:': 80, 'git:': 9418, 'ssh:': 22 };
  return { host: u.hostname, port: u.port ? Number(u.port) : (defaults[u.protocol] ?? 443) };
}

/** Whether kas would need the network: some remote repository is not checked out in build/. */
export function missingCheckouts(root: string, repos: LayerRepo[]): LayerRepo[] {
  return repos.filter((r) => !existsSync(path.join(root, 'build', r.key, '.git')));
}

async function reachable(host: string, port: number, timeoutMs: number): Promise<string | undefined> {
  const timeout = <T>(p: Promise<T>): Promise<T> =>
    Promise.race([p, new Promise<T>((_, reject) => setTimeout(() => reject(new Error('timed out')), timeoutMs).unref())]);
  try {
    await timeout(lookup(host));
  } catch {
    return `cannot resolve ${host}`;
  }
  return new Promise((resolve) => {
    const sock = net.connect({ host, port });
    const done = (why?: string): void => {
      sock.destroy();
      resolve(why);
    };
    sock.setTimeout(timeoutMs, () => done(`no answer from ${host}:${port}`));
    sock.once('connect', () => done());
    sock.once('error', (e) => done(`cannot connect to ${host}:${port} (${e.message})`));
  });
}

/** Why this host cannot build, or undefined when it can. One line, with what to do instead. */
export async function cannotBuildReason(options: DoctorOptions): Promise<string | undefined> {
  const engine = await detectEngine();
  if (!engine) return noEngine().message;
  if (options.probeNetwork === false) return undefined;
  const repos = missingCheckouts(options.root, await layerRepos(options.root, options.selection));
  const hosts = [...new Map(repos.map((r) => [`${r.host}:${r.port}`, r])).values()];
  const failures = (await Promise.all(hosts.map((r) => reachable(r.host, r.port, options.probeTimeoutMs ?? 3000)))).filter(
    (x): x is string => x !== undefined,
  );
  if (failures.length > 0) {
    return `this host cannot build: the layer repositories cannot be fetched (${failures[0]}${failures.length > 1 ? `, and ${failures.length - 1} more` : ''}); run \`lamadist vm demo\` to try LamaDist without a build`;
  }
  return undefined;
}

async function engineFindings(engine: Engine | undefined): Promise<Finding[]> {
  if (!engine) {
    return [{ id: 'container-engine', severity: 'error', detail: 'neither podman nor docker is installed', fix: 'apt-get install podman runc uidmap' }];
  }
  const out: Finding[] = [{ id: 'container-engine', severity: 'ok', detail: `${engine} found`, fix: '' }];
  const image = await run(engine, ['image', 'inspect', '--format', '{{.Id}}', BUILDER_IMAGE], { allowFailure: true, timeoutMs: 30_000 }).catch(() => undefined);
  out.push(
    image && image.code === 0
      ? { id: 'builder-image', severity: 'ok', detail: `${BUILDER_IMAGE} is present`, fix: '' }
      : { id: 'builder-image', severity: 'warn', detail: `${BUILDER_IMAGE} is not built yet`, fix: 'lamadist container build' },
  );
  return out;
}

async function userNamespaceFinding(): Promise<Finding> {
  const max = await fs.readFile('/proc/sys/user/max_user_namespaces', 'utf8').catch(() => '');
  if (max.trim() === '0') {
    return { id: 'user-namespaces', severity: 'error', detail: 'user namespaces are disabled', fix: 'sysctl -w user.max_user_namespaces=15000' };
  }
  const uid = process.getuid?.() ?? 0;
  if (uid === 0) return { id: 'user-namespaces', severity: 'ok', detail: 'running as root; rootful podman maps IDs itself', fix: '' };
  const user = process.env.USER ?? String(uid);
  const subuid = await fs.readFile('/etc/subuid', 'utf8').catch(() => '');
  const has = subuid.split('\n').some((l) => l.startsWith(`${user}:`) || l.startsWith(`${uid}:`));
  return has
    ? { id: 'user-namespaces', severity: 'ok', detail: `subordinate IDs configured for ${user}`, fix: '' }
    : { id: 'user-namespaces', severity: 'error', detail: `no /etc/subuid entry for ${user}, so rootless podman cannot map builder`, fix: `usermod --add-subuids 100000-165535 --add-subgids 100000-165535 ${user}` };
}

async function diskFinding(root: string): Promise<Finding> {
  const st = await fs.statfs(root);
  const freeGiB = (st.bavail * st.bsize) / 2 ** 30;
  return freeGiB >= MIN_FREE_GIB
    ? { id: 'disk-space', severity: 'ok', detail: `${freeGiB.toFixed(0)} GiB free under ${root}`, fix: '' }
    : {
        id: 'disk-space',
        severity: 'warn',
        detail: `${freeGiB.toFixed(1)} GiB free under ${root}; a Yocto build needs about ${MIN_FREE_GIB} GiB`,
        fix: 'free space, or point LAMADIST_SSTATE_DIR and LAMADIST_DL_DIR at a larger disk',
      };
}

async function localeFinding(): Promise<Finding> {
  const r = await run('locale', ['-a'], { allowFailure: true }).catch(() => undefined);
  const ok = r !== undefined && /^en_US\.utf-?8$/im.test(r.stdout);
  return ok
    ? { id: 'locale', severity: 'ok', detail: 'en_US.UTF-8 is available', fix: '' }
    : {
        id: 'locale',
        severity: 'warn',
        detail: 'en_US.UTF-8 is missing (the build container has it; BitBake on the host needs it)',
        fix: 'scripts/setup --yocto (or: apt-get install locales && locale-gen en_US.UTF-8)',
      };
}

async function toolFindings(): Promise<Finding[]> {
  const out: Finding[] = [];
  for (const [tool, pkg] of Object.entries(TOOL_PACKAGES)) {
    if (tool === 'podman') continue;
    out.push(
      (await hasTool(tool))
        ? { id: `tool:${tool}`, severity: 'ok', detail: `${tool} found`, fix: '' }
        : { id: `tool:${tool}`, severity: 'warn', detail: `${tool} is missing (some lamadist commands call it)`, fix: `apt-get install ${pkg} (or scripts/setup)` },
    );
  }
  return out;
}

async function networkFindings(options: DoctorOptions): Promise<Finding[]> {
  const repos = missingCheckouts(options.root, await layerRepos(options.root).catch(() => []));
  if (repos.length === 0) return [{ id: 'layer-network', severity: 'ok', detail: 'every layer repository is checked out', fix: '' }];
  const hosts = [...new Map(repos.map((r) => [`${r.host}:${r.port}`, r])).values()];
  return Promise.all(
    hosts.map(async (r): Promise<Finding> => {
      const why = await reachable(r.host, r.port, options.probeTimeoutMs ?? 3000);
      return why
        ? { id: `network:${r.host}`, severity: 'error', detail: why, fix: 'allow outbound access to the layer hosts, or run `lamadist vm demo` instead of a build' }
        : { id: `network:${r.host}`, severity: 'ok', detail: `${r.host}:${r.port} reachable`, fix: '' };
    }),
  );
}

/** Every finding about this host, errors first. */
export async function diagnose(options: DoctorOptions): Promise<Finding[]> {
  const node = Number(process.versions.node.split('.')[0]);
  const findings: Finding[] = [
    node >= 20
      ? { id: 'node', severity: 'ok', detail: `Node.js ${process.versions.node}`, fix: '' }
      : { id: 'node', severity: 'error', detail: `Node.js ${process.versions.node} is too old`, fix: 'install Node.js 20 or newer' },
    ...(await engineFindings(await detectEngine())),
    await userNamespaceFinding(),
    await diskFinding(options.root),
    await localeFinding(),
    ...(await toolFindings()),
    ...(options.probeNetwork === false ? [] : await networkFindings(options)),
  ];
  const rank: Record<Severity, number> = { error: 0, warn: 1, ok: 2 };
  return findings.sort((a, b) => rank[a.severity] - rank[b.severity]);
}
