import { chmodSync, cpSync, mkdirSync, mkdtempSync, readFileSync, rmSync, statSync, symlinkSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { KAS_PROJECT_SCHEMA } from '../../src/kas/index.js';
import { run } from '../../src/util/proc.js';
import { REPO_ROOT, runCli } from '../helpers/cli.js';

/**
 * `lamadist build` through a real `podman run --runtime runc` of a minimal image imported from a
 * busybox-static tarball (nothing is pulled). The image's `kas` is a probe script that reports what
 * a real kas would see: its user, the mounts and the environment from the env files.
 */

let tmp: string;
let src: string;
let engineArgs: string;
const IMAGE = 'localhost/lamadist-test-builder:probe';

const PROBE = `#!/bin/sh
set -e
out=/work/build/probe.txt
mkdir -p /work/build
{
  echo "id=$(id -u):$(id -g):$(id -un)"
  echo "argv=$*"
  echo "pwd=$(pwd)"
  echo "BB_NUMBER_THREADS=$BB_NUMBER_THREADS"
  echo "LOCAL_ONLY=$LOCAL_ONLY"
  echo "dirs=$KAS_BUILD_DIR $SSTATE_DIR $DL_DIR"
  echo "source-owner=$(stat -c %u:%g /work/kas/main.kas.yml)"
  echo "source-head=$(head -n 1 /work/kas/main.kas.yml)"
  echo "uid_map=$(cat /proc/self/uid_map | tr -s ' ' | tr '\\n' ';')"
} > "$out"
echo sstate > "$SSTATE_DIR/from-container"
echo downloads > "$DL_DIR/from-container"
echo "NOTE: Running task 1 of 1 (probe.bb:do_image)"
mkdir -p /work/build/tmp/deploy/images/lamadist-rk1
echo image > /work/build/tmp/deploy/images/lamadist-rk1/probe.wic
`;

/** A kas schema, marked so the test can tell which copy `check` used. */
function containerSchema(): string {
  const schema = JSON.parse(readFileSync(KAS_PROJECT_SCHEMA, 'utf8')) as Record<string, unknown>;
  return JSON.stringify({ ...schema, title: 'kas schema from the build container' });
}

beforeAll(async () => {
  tmp = mkdtempSync(path.join(os.tmpdir(), 'lamadist-podman-'));
  // A private vfs store: overlay with ID-mapped layers is not available on every host (nor here).
  engineArgs = `--root ${tmp}/store/root --runroot ${tmp}/store/run --storage-driver vfs`;
  const rootfs = path.join(tmp, 'rootfs');
  for (const d of ['bin', 'etc', 'usr/bin', 'tmp', 'proc', 'sys', 'dev', 'work']) mkdirSync(path.join(rootfs, d), { recursive: true });
  cpSync('/bin/busybox', path.join(rootfs, 'bin/busybox'));
  for (const a of ['sh', 'id', 'cat', 'echo', 'mkdir', 'stat', 'head', 'tr']) symlinkSync('busybox', path.join(rootfs, 'bin', a));
  writeFileSync(path.join(rootfs, 'etc/passwd'), 'root:x:0:0:root:/root:/bin/sh\nbuilder:x:1000:1000:builder:/work:/bin/sh\n');
  writeFileSync(path.join(rootfs, 'etc/group'), 'root:x:0:\nbuilder:x:1000:\n');
  writeFileSync(path.join(rootfs, 'usr/bin/kas'), PROBE);
  chmodSync(path.join(rootfs, 'usr/bin/kas'), 0o755);
  // Stands in for the container's Python with kas installed: prints "its" schema.
  writeFileSync(path.join(rootfs, 'usr/bin/python3'), '#!/bin/sh\ncat /kas-schema.json\n');
  chmodSync(path.join(rootfs, 'usr/bin/python3'), 0o755);
  writeFileSync(path.join(rootfs, 'kas-schema.json'), containerSchema());
  await run('tar', ['-C', rootfs, '-cf', path.join(tmp, 'rootfs.tar'), '.']);
  await run('podman', [...engineArgs.split(' '), 'import', '--change', 'ENV PATH=/usr/bin:/bin', path.join(tmp, 'rootfs.tar'), IMAGE]);

  src = path.join(tmp, 'src');
  cpSync(path.join(REPO_ROOT, 'test/fixtures/check/good'), src, { recursive: true });
  writeFileSync(path.join(src, '.kas.env'), 'BB_NUMBER_THREADS=2\n');
  writeFileSync(path.join(src, '.kas.env.local'), 'LOCAL_ONLY=yes\n');
}, 120_000);

afterAll(async () => {
  await run('podman', [...engineArgs.split(' '), 'rmi', '-f', IMAGE], { allowFailure: true });
  rmSync(tmp, { recursive: true, force: true });
});

describe('lamadist build with real podman', () => {
  it('mounts source, sstate and downloads, maps the caller to builder and passes both env files', async () => {
    const sstate = path.join(tmp, 'sstate-host');
    const downloads = path.join(tmp, 'downloads-host');
    const r = await runCli(['--json', 'build', '-C', src, '--bsp', 'rk1', '--no-network-check'], {
      env: {
        LAMADIST_CONTAINER_ENGINE: 'podman',
        LAMADIST_CONTAINER_ENGINE_ARGS: engineArgs,
        LAMADIST_CONTAINER_RUNTIME: 'runc',
        LAMADIST_CONTAINER_ULIMITS: 'nofile=1024:1024 nproc=4096:4096',
        LAMADIST_BUILDER_IMAGE: IMAGE,
        LAMADIST_SSTATE_DIR: sstate,
        LAMADIST_DL_DIR: downloads,
      },
      timeoutMs: 180_000,
    });
    expect(r.stderr).toContain('NOTE: Running task 1 of 1');
    expect(r.code).toBe(0);
    const probe = Object.fromEntries(
      readFileSync(path.join(src, 'build/probe.txt'), 'utf8')
        .trimEnd()
        .split('\n')
        .map((l) => [l.slice(0, l.indexOf('=')), l.slice(l.indexOf('=') + 1)]),
    );
    expect(probe.id).toBe('1000:1000:builder');
    expect(probe.argv).toBe('build kas/main.kas.yml:kas/bsp/rk1.kas.yml');
    expect(probe.pwd).toBe('/work');
    expect(probe.BB_NUMBER_THREADS).toBe('2');
    expect(probe.LOCAL_ONLY).toBe('yes');
    expect(probe.dirs).toBe('/work/build /work/.cache/sstate /work/build/downloads');
    expect(probe['source-head']).toBe(readFileSync(path.join(src, 'kas/main.kas.yml'), 'utf8').split('\n')[0]);

    // The caller's files appear as builder's inside, and builder's files are the caller's outside.
    const uid = process.getuid?.() ?? 0;
    const gid = process.getgid?.() ?? 0;
    expect(statSync(path.join(src, 'kas/main.kas.yml')).uid).toBe(uid);
    expect(probe['source-owner']).toBe('1000:1000');
    expect(probe.uid_map).toContain(` 1000 ${uid} 1;`);
    for (const f of [path.join(src, 'build/probe.txt'), path.join(sstate, 'from-container'), path.join(downloads, 'from-container')]) {
      const st = statSync(f);
      expect([st.uid, st.gid]).toEqual([uid, gid]);
    }
    expect(readFileSync(path.join(sstate, 'from-container'), 'utf8')).toBe('sstate\n');
    expect(readFileSync(path.join(downloads, 'from-container'), 'utf8')).toBe('downloads\n');

    const summary = JSON.parse(r.stdout) as { artifacts: { kind: string; path: string; size: number }[] };
    expect(summary.artifacts).toEqual([{ kind: 'image', path: path.join(src, 'build/tmp/deploy/images/lamadist-rk1/probe.wic'), size: 6, fresh: true }]);
  });

  it('lets check read the kas schema from the kas installed in the build container image', async () => {
    const home = path.join(tmp, 'home');
    const r = await runCli(['-v', 'check', '-C', src], {
      env: {
        HOME: home,
        LAMADIST_CONTAINER_ENGINE: 'podman',
        LAMADIST_CONTAINER_ENGINE_ARGS: engineArgs,
        LAMADIST_CONTAINER_RUNTIME: 'runc',
        LAMADIST_CONTAINER_ULIMITS: 'nofile=1024:1024 nproc=4096:4096',
        LAMADIST_BUILDER_IMAGE: IMAGE,
      },
      timeoutMs: 180_000,
    });
    expect(r.code).toBe(0);
    const used = /kas schema: (.*)$/m.exec(r.stderr)?.[1] ?? '';
    expect(path.dirname(used)).toBe(path.join(home, '.cache/lamadist/kas-schema'));
    expect((JSON.parse(readFileSync(used, 'utf8')) as { title: string }).title).toBe('kas schema from the build container');
  });
});
