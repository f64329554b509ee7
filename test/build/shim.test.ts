import { spawn } from 'node:child_process';
import { chmodSync, cpSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { idMappingArgs } from '../../src/build/index.js';
import { run } from '../../src/util/proc.js';
import { BIN, REPO_ROOT, runCli } from '../helpers/cli.js';

/**
 * `lamadist build` against a recording `podman` placed first on PATH: the exact command line, the
 * env files, the log, the progress parsing and the artifact summary, without a container.
 */

/** A string as a literal regular-expression source. */
const escape = (s: string): string => s.replace(/[\\^$.*+?()[\]{}|]/g, '\\$&');

/** The recorded invocations of the shim, each as its argv. */
function invocations(log: string): string[][] {
  const out: string[][] = [];
  let cur: string[] = [];
  for (const line of readFileSync(log, 'utf8').split('\n')) {
    if (line === '--end--') {
      out.push(cur);
      cur = [];
    } else if (line !== '' || cur.length > 0) cur.push(line);
  }
  return out;
}

let tmp: string;
let src: string;
let bin: string;
const SHIM = `#!/bin/sh
# Records each invocation's argv (one per line, then a line "--end--"). \`image inspect\` succeeds
# once $SHIM_IMAGE exists, \`build\` creates it; \`run\` behaves like a short BitBake run inside kas.
printf '%s\\n' "$@" "--end--" >> "$SHIM_LOG"
case "$1" in
  image) [ -e "$SHIM_IMAGE" ] || exit 1; echo sha256:0123456789abcdef; exit 0 ;;
  build) echo "STEP 1/1: FROM ubuntu:22.04"; touch "$SHIM_IMAGE"; exit 0 ;;
esac
src=""
prev=""
for a in "$@"; do
  if [ "$prev" = "-v" ]; then case "$a" in *:/work) src="\${a%:/work}" ;; esac; fi
  prev="$a"
done
echo "NOTE: Running setscene task 1 of 2 (x.bb:do_populate_sysroot_setscene)"
echo "NOTE: Running setscene task 2 of 2 (y.bb:do_populate_sysroot_setscene)"
echo "NOTE: Running task 1 of 2 (lama-image-base.bb:do_rootfs)"
echo "WARNING: shim warning" >&2
echo "NOTE: Running task 2 of 2 (lama-image-base.bb:do_image_wic)"
d="$src/build/tmp-glibc/deploy"
mkdir -p "$d/images/lamadist-orin-nx" "$d/rpm/cortexa78ae" "$d/spdx"
head -c 2048 /dev/zero > "$d/images/lamadist-orin-nx/lama-image-base-lamadist-orin-nx.rootfs.wic.zst"
ln -sf lama-image-base-lamadist-orin-nx.rootfs.wic.zst "$d/images/lamadist-orin-nx/lama-image-base-lamadist-orin-nx.wic.zst"
head -c 4096 /dev/zero > "$d/images/lamadist-orin-nx/lama-bundle-lamadist-orin-nx.raucb"
echo '{}' > "$d/images/lamadist-orin-nx/lama-image-base-lamadist-orin-nx.rootfs.spdx.json"
head -c 100 /dev/zero > "$d/rpm/cortexa78ae/busybox-1.36.1-r0.cortexa78ae.rpm"
if [ -n "$SHIM_SLEEP" ]; then echo $$ > "$SHIM_SLEEP"; exec sleep 60; fi
exit "\${SHIM_EXIT:-0}"
`;

const env = {
  GIT_AUTHOR_NAME: 't',
  GIT_AUTHOR_EMAIL: 't@example.org',
  GIT_COMMITTER_NAME: 't',
  GIT_COMMITTER_EMAIL: 't@example.org',
  GIT_CONFIG_GLOBAL: '/dev/null',
};

beforeAll(async () => {
  tmp = mkdtempSync(path.join(os.tmpdir(), 'lamadist-shim-'));
  src = path.join(tmp, 'src');
  bin = path.join(tmp, 'bin');
  cpSync(path.join(REPO_ROOT, 'test/fixtures/check/good'), src, { recursive: true });
  writeFileSync(path.join(src, '.kas.env'), 'BB_NUMBER_THREADS=2\n');
  writeFileSync(path.join(src, '.kas.env.local'), 'SSTATE_MIRRORS=file://.* http://sstate.lan/PATH\n');
  const e = { ...process.env, ...env };
  await run('git', ['init', '-q', '-b', 'main', src], { env: e });
  await run('git', ['-C', src, 'add', '-A'], { env: e });
  await run('git', ['-C', src, 'commit', '-q', '-m', 'fixture'], { env: e });
  await run('git', ['-C', src, 'tag', 'v1.4.0'], { env: e });
  mkdirSync(bin);
  // the image "exists" unless a test removes this file
  process.env.SHIM_IMAGE = path.join(tmp, 'image-present');
  writeFileSync(process.env.SHIM_IMAGE, '');
  writeFileSync(path.join(bin, 'podman'), SHIM);
  chmodSync(path.join(bin, 'podman'), 0o755);
});
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

describe('lamadist build with a recording podman', () => {
  it('runs exactly the planned podman command and summarises the artifacts', async () => {
    const log = path.join(tmp, 'argv.txt');
    const r = await runCli(
      ['--json', 'build', '-C', src, '--bsp', 'orin-nx', '--extra', 'debug', '--ci', '--no-network-check', '--runtime', 'runc', '--ulimit', 'nofile=1024:1024', '--', '-k'],
      { env: { PATH: `${bin}:${process.env.PATH ?? ''}`, SHIM_LOG: log, LAMADIST_CONTAINER_ULIMITS: '' } },
    );
    expect(r.stderr).toContain('WARNING: shim warning');
    expect(r.code).toBe(0);
    const calls = invocations(log);
    expect(calls.map((c) => c[0])).toEqual(['image', 'run']);
    const argv = calls[1] ?? [];
    const uid = process.getuid?.() ?? 0;
    const gid = process.getgid?.() ?? 0;
    expect(argv).toEqual([
      'run', '--rm', '--runtime', 'runc', '--ulimit', 'nofile=1024:1024',
      ...idMappingArgs({ engine: 'podman', uid, gid }),
      '-v', `${src}:/work`, '-v', `${src}/.cache/sstate:/work/.cache/sstate`, '-v', `${src}/build/downloads:/work/build/downloads`,
      '-w', '/work', '--env-file', `${src}/.kas.env`, '--env-file', `${src}/.kas.env.local`,
      '-e', 'KAS_WORK_DIR=/work/build', '-e', 'KAS_BUILD_DIR=/work/build', '-e', 'SSTATE_DIR=/work/.cache/sstate',
      '-e', 'DL_DIR=/work/build/downloads', '-e', 'LAMADIST_VERSION=1.4.0',
      'lamadist-builder:latest',
      'kas', 'build', '--update', '--force-checkout', 'kas/main.kas.yml:kas/bsp/orin-nx.kas.yml:kas/extras/debug.kas.yml', '--', '-k',
    ]);
    // bind-mount sources must exist before the engine runs
    expect(statSync(path.join(src, '.cache/sstate')).isDirectory()).toBe(true);
    expect(statSync(path.join(src, 'build/downloads')).isDirectory()).toBe(true);

    const summary = JSON.parse(r.stdout) as { exitCode: number; logFile: string; elapsedMs: number; artifacts: { kind: string; path: string; size: number }[] };
    expect(summary.exitCode).toBe(0);
    expect(summary.elapsedMs).toBeGreaterThan(0);
    const rel = summary.artifacts.map((a) => ({ ...a, path: path.relative(src, a.path) }));
    const d = 'build/tmp-glibc/deploy';
    expect(rel).toEqual([
      { kind: 'bundle', path: `${d}/images/lamadist-orin-nx/lama-bundle-lamadist-orin-nx.raucb`, size: 4096, fresh: true },
      { kind: 'image', path: `${d}/images/lamadist-orin-nx/lama-image-base-lamadist-orin-nx.rootfs.wic.zst`, size: 2048, fresh: true },
      { kind: 'rpm', path: `${d}/rpm/cortexa78ae/busybox-1.36.1-r0.cortexa78ae.rpm`, size: 100, fresh: true },
      { kind: 'sbom', path: `${d}/images/lamadist-orin-nx/lama-image-base-lamadist-orin-nx.rootfs.spdx.json`, size: 3, fresh: true },
    ]);
    expect(path.dirname(summary.logFile)).toBe(path.join(src, 'build/logs'));
    const logText = readFileSync(summary.logFile, 'utf8');
    expect(logText).toContain('NOTE: Running task 2 of 2');
    expect(logText).toContain('WARNING: shim warning');
  });

  it('prints a human summary with sizes and elapsed time, for the BSP built', async () => {
    // images of another machine in the shared deploy tree are not this build's
    const other = path.join(src, 'build/tmp-glibc/deploy/images/lamadist-rk1');
    mkdirSync(other, { recursive: true });
    writeFileSync(path.join(other, 'lama-image-base-lamadist-rk1.rootfs.wic.zst'), 'x');
    const r = await runCli(['build', '-C', src, '--bsp', 'orin-nx', '--no-network-check'], {
      env: { PATH: `${bin}:${process.env.PATH ?? ''}`, SHIM_LOG: path.join(tmp, 'argv2.txt') },
    });
    expect(r.code).toBe(0);
    expect(r.stdout).toMatch(/^bundle\s+4\.0 KiB\s+build\/tmp-glibc\/deploy\/images\/lamadist-orin-nx\/lama-bundle-lamadist-orin-nx\.raucb$/m);
    expect(r.stdout).toMatch(/^rpm\s+100 B\s+1 package\(s\), 1 new, under deploy\/rpm$/m);
    expect(r.stdout).toMatch(/^4 artifact\(s\) in \d+ s; log: build\/logs\/build-orin-nx-.*\.log$/m);
    expect(r.stdout).not.toContain('lamadist-rk1');
    // not a terminal: BitBake's output passes through, no progress bar
    expect(r.stderr).toContain('NOTE: Running task 2 of 2');
    expect(r.stderr).not.toContain('\x1b[2K');
  });

  it('draws a progress bar on a terminal instead of the BitBake lines', async () => {
    const r = await run('script', ['-qec', `${process.execPath} ${BIN} build -C ${src} --bsp orin-nx --no-network-check`, '/dev/null'], {
      env: { ...process.env, PATH: `${bin}:${process.env.PATH ?? ''}`, SHIM_LOG: path.join(tmp, 'argv-tty.txt'), NO_COLOR: '1', TERM: 'xterm' },
      allowFailure: true,
      timeoutMs: 60_000,
    });
    expect(r.code).toBe(0);
    const clear = '\r\x1b[2K';
    expect(r.stdout).toMatch(new RegExp(`${escape(clear)}setscene █+ 100% \\(2/2\\)`));
    expect(r.stdout).toMatch(new RegExp(`${escape(clear)}tasks █+ 100% \\(2/2\\)`));
    expect(r.stdout).not.toContain('NOTE: Running task');
    expect(r.stdout).toContain('WARNING: shim warning');
    expect(r.stdout).toMatch(/4 artifact\(s\) in \d+ s/);
  });

  it('fails in one line naming the log when kas fails', async () => {
    const r = await runCli(['build', '-C', src, '--no-network-check'], {
      env: { PATH: `${bin}:${process.env.PATH ?? ''}`, SHIM_LOG: path.join(tmp, 'argv3.txt'), SHIM_EXIT: '1' },
    });
    expect(r.code).toBe(2);
    const last = r.stderr.trim().split('\n').pop() ?? '';
    expect(last).toMatch(/^lamadist: error: kas build exited with 1 after \d+ s; full log: (.*\.log) \[LAMA_E_BUILD_FAILED\]$/);
    const logFile = /full log: (.*\.log)/.exec(last)?.[1] ?? '';
    expect(existsSync(logFile)).toBe(true);
  });

  it('builds the container image first when the engine does not have it', async () => {
    rmSync(process.env.SHIM_IMAGE ?? '', { force: true });
    const log = path.join(tmp, 'argv-image.txt');
    const r = await runCli(['build', '-C', src, '--bsp', 'orin-nx', '--no-network-check'], {
      env: { PATH: `${bin}:${process.env.PATH ?? ''}`, SHIM_LOG: log },
    });
    expect(r.code).toBe(0);
    const calls = invocations(log);
    expect(calls.map((c) => c[0])).toEqual(['image', 'build', 'run']);
    expect(calls[1]).toEqual(['build', '-t', 'lamadist-builder:latest', '-f', `${src}/container/Containerfile`, `${src}/container`]);
    expect(r.stderr).toMatch(/the build container lamadist-builder:latest is not built yet; building it first/);
    expect(r.stderr).toMatch(/building lamadist-builder:latest; log: .*build\/logs\/container-.*\.log/);
  });

  it('stops the container engine and exits 130 on Ctrl-C', async () => {
    const pidFile = path.join(tmp, 'shim.pid');
    const child = spawn(process.execPath, [BIN, 'build', '-C', src, '--no-network-check'], {
      env: { ...process.env, NO_COLOR: '1', PATH: `${bin}:${process.env.PATH ?? ''}`, SHIM_LOG: path.join(tmp, 'argv-int.txt'), SHIM_SLEEP: pidFile },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stderr = '';
    child.stderr.on('data', (c: Buffer) => (stderr += c.toString()));
    const exited = new Promise<number | null>((resolve) => child.on('close', (code) => resolve(code)));
    const deadline = Date.now() + 30_000;
    while (!existsSync(pidFile) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
    const enginePid = Number(readFileSync(pidFile, 'utf8'));
    child.kill('SIGINT');
    expect(await exited).toBe(130);
    expect(stderr).toContain('interrupted, cleaning up');
    const alive = (): boolean => {
      try {
        process.kill(enginePid, 0);
        return true;
      } catch {
        return false;
      }
    };
    const until = Date.now() + 5_000;
    while (alive() && Date.now() < until) await new Promise((r) => setTimeout(r, 50));
    expect(alive()).toBe(false);
  });

  it('says in one line that a host without podman or docker cannot build, and what to do instead', async () => {
    const empty = path.join(tmp, 'empty-bin');
    mkdirSync(empty, { recursive: true });
    const r = await runCli(['build', '-C', src], { env: { PATH: empty } });
    expect(r.code).toBe(2);
    expect(r.stdout).toBe('');
    expect(r.stderr.trim().split('\n')).toEqual([
      'lamadist: error: this host cannot build: neither podman nor docker is installed (apt-get install podman); run `lamadist vm demo` to try LamaDist without a build [LAMA_E_CANNOT_BUILD]',
    ]);
    const d = await runCli(['doctor', '--can-build', '-C', src], { env: { PATH: empty } });
    expect(d.code).toBe(2);
    expect(d.stderr.trim().split('\n')).toHaveLength(1);
  });

  it('rejects an unknown BSP or extra before touching the engine', async () => {
    const a = await runCli(['build', '-C', src, '--bsp', 'pi5'], { env: { PATH: `${bin}:${process.env.PATH ?? ''}` } });
    expect(a.code).toBe(2);
    expect(a.stderr).toMatch(/unknown BSP 'pi5'.*LAMA_E_UNKNOWN_BSP/);
    const b = await runCli(['build', '-C', src, '--extra', 'nope'], { env: { PATH: `${bin}:${process.env.PATH ?? ''}` } });
    expect(b.stderr).toMatch(/unknown extra 'nope' \(known: debug\)/);
    const c = await runCli(['build', '-C', tmp], { env: { PATH: `${bin}:${process.env.PATH ?? ''}` } });
    expect(c.code).toBe(2);
    expect(c.stderr).toMatch(/is not a LamaDist checkout \(no kas\/main\.kas\.yml\); run from the repository root or pass -C DIR/);
  });
});
