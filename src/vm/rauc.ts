import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { UserError, isErrno } from '../errors.js';
import { run } from '../util/proc.js';
import { cacheRoot } from './kernel.js';

/**
 * RAUC for the test fixture, built from Debian's own source package with HTTP streaming turned on.
 * Debian builds rauc 1.8 without `--enable-streaming`, so its `rauc install URL` downloads the whole
 * bundle to /tmp first and has no `--http-header`. A LamaDist device streams: RAUC reads the bundle
 * through an NBD device straight from the update server, fetching only the chunks an adaptive
 * update needs. Same upstream release, same Debian patches; only the configure flags differ.
 */

/** Debian's configure flags (debian/rules: --enable-gpt) plus streaming and the network (URL) support. */
export const RAUC_CONFIGURE_FLAGS = [
  '--prefix=/usr',
  '--sysconfdir=/etc',
  '--localstatedir=/var',
  '--enable-gpt',
  '--enable-network',
  '--enable-streaming',
] as const;

/** What Debian's binary prints for `rauc install URL` when it was built without streaming. */
const NO_STREAMING_MARK = 'configured without --enable-streaming';

/**
 * The host's apt sources turned into source-package entries: deb822 `Types: deb` stanzas become
 * `Types: deb-src`, one-line `deb` entries become `deb-src`. Mirror, suites, components and
 * `Signed-By` stay, so apt checks the Sources indices against the same archive keys.
 */
export function debSrcSources(text: string, format: 'deb822' | 'one-line'): string {
  if (format === 'deb822') {
    return text
      .split(/\n\s*\n/)
      .filter((stanza) => /^Types:.*\bdeb\b/m.test(stanza) && !/^Enabled:\s*no\b/im.test(stanza))
      .map((stanza) => stanza.replace(/^Types:.*$/m, 'Types: deb-src').trim())
      .join('\n\n')
      .concat('\n');
  }
  return text
    .split('\n')
    .filter((l) => /^deb\s/.test(l))
    .map((l) => l.replace(/^deb\s/, 'deb-src '))
    .join('\n')
    .concat('\n');
}

async function readOr(p: string): Promise<string> {
  try {
    return await fs.readFile(p, 'utf8');
  } catch (err) {
    if (isErrno(err, 'ENOENT')) return '';
    throw err;
  }
}

/** Write an apt configuration that knows only the host archives' source packages, isolated from the host's apt state. */
async function sourceOnlyApt(dir: string): Promise<string[]> {
  const parts = path.join(dir, 'sources.list.d');
  await fs.mkdir(path.join(dir, 'lists', 'partial'), { recursive: true });
  await fs.mkdir(path.join(dir, 'cache', 'archives', 'partial'), { recursive: true });
  await fs.mkdir(parts, { recursive: true });
  await fs.writeFile(path.join(dir, 'sources.list'), debSrcSources(await readOr('/etc/apt/sources.list'), 'one-line'));
  const hostParts = '/etc/apt/sources.list.d';
  for (const name of await fs.readdir(hostParts).catch(() => [] as string[])) {
    const text = await readOr(path.join(hostParts, name));
    if (name.endsWith('.sources')) await fs.writeFile(path.join(parts, name), debSrcSources(text, 'deb822'));
    else if (name.endsWith('.list')) await fs.writeFile(path.join(parts, name), debSrcSources(text, 'one-line'));
  }
  return [
    '-o', `Dir::Etc::SourceList=${path.join(dir, 'sources.list')}`,
    '-o', `Dir::Etc::SourceParts=${parts}`,
    '-o', `Dir::State::Lists=${path.join(dir, 'lists')}`,
    '-o', `Dir::Cache=${path.join(dir, 'cache')}`,
  ];
}

/** A streaming-capable `rauc` binary in the cache. */
export interface StreamingRauc {
  /** Path of the built binary (runs on Debian bookworm with libnl-genl-3-200 installed). */
  binary: string;
  /** Debian source version it was built from, e.g. 1.8-2. */
  version: string;
}

async function cached(dir: string): Promise<StreamingRauc | undefined> {
  try {
    const info = JSON.parse(await fs.readFile(path.join(dir, 'rauc.json'), 'utf8')) as { version: string };
    return { binary: path.join(dir, 'rauc'), version: info.version };
  } catch (err) {
    if (isErrno(err, 'ENOENT')) return undefined;
    throw err;
  }
}

/**
 * Build (once) and return RAUC with streaming from Debian's `rauc` source package: `apt-get
 * source` through a throw-away apt configuration holding the host archives' deb-src entries,
 * `dpkg-source -x` (checksums verified), autoreconf, configure with RAUC_CONFIGURE_FLAGS, make.
 * Cached in ~/.cache/lamadist/rauc/<source version>-streaming/ and moved into place only when
 * the binary works and reports streaming support. Needs the build dependencies `scripts/setup`
 * installs (autoconf, libtool, the -dev packages of glib, curl, json-glib, fdisk, libnl-genl).
 */
export async function streamingRauc(opts: { log?: (m: string) => void } = {}): Promise<StreamingRauc> {
  const log = opts.log ?? (() => undefined);
  const root = path.join(cacheRoot(), 'rauc');
  await fs.mkdir(root, { recursive: true });
  const tmp = await fs.mkdtemp(path.join(root, '.build-'));
  try {
    // apt drops privileges to _apt for downloads; it must be able to enter the directory.
    await fs.chmod(tmp, 0o755);
    const apt = await sourceOnlyApt(path.join(tmp, 'apt'));
    await run('apt-get', [...apt, 'update', '-qq'], { userErrorCode: 'LAMA_E_RAUC_SOURCE' });
    const policy = await run('apt-cache', [...apt, 'showsrc', 'rauc'], { userErrorCode: 'LAMA_E_RAUC_SOURCE' });
    const version = /^Version: (\S+)$/m.exec(policy.stdout)?.[1];
    if (!version) throw new UserError('LAMA_E_RAUC_SOURCE', 'the host archives have no rauc source package');
    const dir = path.join(root, `${version.replace(/[^A-Za-z0-9.+~-]/g, '_')}-streaming`);
    const hit = await cached(dir);
    if (hit) return hit;

    log(`building rauc ${version} from Debian's source package with streaming`);
    const dl = path.join(tmp, 'dl');
    await fs.mkdir(dl);
    await fs.chmod(dl, 0o755);
    await run('apt-get', [...apt, 'source', '--download-only', '-q', `rauc=${version}`], { cwd: dl, userErrorCode: 'LAMA_E_RAUC_SOURCE' });
    const dsc = (await fs.readdir(dl)).find((f) => f.endsWith('.dsc'));
    if (!dsc) throw new UserError('LAMA_E_RAUC_SOURCE', `apt-get source rauc=${version} produced no .dsc`);
    const src = path.join(tmp, 'src');
    await run('dpkg-source', ['-x', path.join(dl, dsc), src], { cwd: dl, userErrorCode: 'LAMA_E_RAUC_SOURCE' });
    await run('autoreconf', ['-fi'], { cwd: src, userErrorCode: 'LAMA_E_RAUC_BUILD' });
    await run('./configure', [...RAUC_CONFIGURE_FLAGS], { cwd: src, userErrorCode: 'LAMA_E_RAUC_BUILD' });
    await run('make', [`-j${Math.max(1, os.availableParallelism())}`, 'rauc'], { cwd: src, userErrorCode: 'LAMA_E_RAUC_BUILD' });
    const binary = await fs.readFile(path.join(src, 'rauc'));
    if (binary.includes(NO_STREAMING_MARK)) throw new UserError('LAMA_E_RAUC_BUILD', 'the rauc build has no streaming support (check configure output)');
    const out = path.join(tmp, 'out');
    await fs.mkdir(out);
    await fs.writeFile(path.join(out, 'rauc'), binary, { mode: 0o755 });
    await run(path.join(out, 'rauc'), ['--version'], { userErrorCode: 'LAMA_E_RAUC_BUILD' });
    await fs.writeFile(path.join(out, 'rauc.json'), JSON.stringify({ version, configure: RAUC_CONFIGURE_FLAGS }, null, 2) + '\n');
    try {
      await fs.rename(out, dir);
    } catch (err) {
      // A concurrent build finished first; its binary is the same.
      if (!isErrno(err, 'ENOTEMPTY') && !isErrno(err, 'EEXIST')) throw err;
    }
    const done = await cached(dir);
    if (!done) throw new Error(`rauc cache ${dir} is incomplete`);
    return done;
  } finally {
    await fs.rm(tmp, { recursive: true, force: true });
  }
}
