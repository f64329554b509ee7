import { mkdirSync, mkdtempSync, rmSync, symlinkSync, utimesSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import {
  classifyArtifact,
  formatSize,
  idMappingArgs,
  parseBitbakeProgress,
  planContainerBuild,
  planContainerRun,
  planKasCommand,
  scanArtifacts,
  type ContainerSettings,
} from '../../src/build/index.js';
import { planClean } from '../../src/cli/commands/clean.js';

const base: ContainerSettings = {
  engine: 'podman',
  engineArgs: [],
  image: 'lamadist-builder:latest',
  ulimits: [],
  uid: 1234,
  gid: 999,
  sourceDir: '/src',
  sstateDir: '/src/.cache/sstate',
  downloadsDir: '/src/build/downloads',
  envFiles: ['/src/.kas.env'],
  env: {},
};

describe('container command line', () => {
  it('maps a rootless caller to builder with keep-id', () => {
    expect(idMappingArgs(base)).toEqual(['--userns=keep-id:uid=1000,gid=1000', '--user', '1000:1000']);
  });

  it('maps root to builder with explicit ID maps for rootful podman', () => {
    expect(idMappingArgs({ engine: 'podman', uid: 0, gid: 0 })).toEqual([
      '--uidmap', '0:100000:1000', '--uidmap', '1000:0:1', '--uidmap', '1001:101001:64535',
      '--gidmap', '0:100000:1000', '--gidmap', '1000:0:1', '--gidmap', '1001:101001:64535',
      '--user', '1000:1000',
    ]);
  });

  it('runs docker with the caller IDs', () => {
    expect(idMappingArgs({ engine: 'docker', uid: 1234, gid: 999 })).toEqual(['--user', '1234:999']);
  });

  it('plans the whole podman run for a CI build with extras and BitBake args', () => {
    const kas = planKasCommand('build', { bsp: 'rk1', extras: ['debug'], installer: true, ci: true, bitbakeArgs: ['-k', 'lama-image-base'] });
    expect(kas).toEqual([
      'kas', 'build', '--update', '--force-checkout',
      'kas/main.kas.yml:kas/bsp/rk1.kas.yml:kas/extras/debug.kas.yml:kas/installer.kas.yml',
      '--', '-k', 'lama-image-base',
    ]);
    const inv = planContainerRun(
      { ...base, runtime: 'runc', ulimits: ['nofile=1024:1024'], envFiles: ['/src/.kas.env', '/src/.kas.env.local'], env: { LAMADIST_VERSION: '1.2.3' } },
      kas,
    );
    expect(inv.cmd).toBe('podman');
    expect(inv.args).toEqual([
      'run', '--rm', '--runtime', 'runc', '--ulimit', 'nofile=1024:1024',
      '--userns=keep-id:uid=1000,gid=1000', '--user', '1000:1000',
      '-v', '/src:/work', '-v', '/src/.cache/sstate:/work/.cache/sstate', '-v', '/src/build/downloads:/work/build/downloads',
      '-w', '/work', '--env-file', '/src/.kas.env', '--env-file', '/src/.kas.env.local',
      '-e', 'KAS_WORK_DIR=/work/build', '-e', 'KAS_BUILD_DIR=/work/build', '-e', 'SSTATE_DIR=/work/.cache/sstate',
      '-e', 'DL_DIR=/work/build/downloads', '-e', 'LAMADIST_VERSION=1.2.3',
      'lamadist-builder:latest', ...kas,
    ]);
  });

  it('passes no BitBake arguments to kas shell and adds a TTY for interactive runs', () => {
    expect(planKasCommand('shell', { bsp: 'x86_64', bitbakeArgs: ['-k'] })).toEqual(['kas', 'shell', 'kas/main.kas.yml:kas/bsp/x86_64.kas.yml']);
    const inv = planContainerRun({ ...base, engineArgs: ['--root', '/r'] }, ['bash'], { interactive: true });
    expect(inv.args.slice(0, 5)).toEqual(['--root', '/r', 'run', '--rm', '-it']);
  });

  it('builds the container image from container/Containerfile', () => {
    expect(planContainerBuild(base, { noCache: true })).toEqual({
      cmd: 'podman',
      args: ['build', '-t', 'lamadist-builder:latest', '-f', '/src/container/Containerfile', '--no-cache', '/src/container'],
    });
  });
});

describe('BitBake progress lines', () => {
  it('parses task and setscene progress', () => {
    expect(parseBitbakeProgress('NOTE: Running task 1234 of 5678 (/work/build/poky/meta/recipes-core/busybox/busybox_1.36.1.bb:do_compile)')).toEqual({ phase: 'tasks', done: 1234, total: 5678 });
    expect(parseBitbakeProgress('NOTE: Running setscene task 12 of 3456 (virtual:native:/x.bb:do_populate_sysroot_setscene)')).toEqual({ phase: 'setscene', done: 12, total: 3456 });
  });
  it('ignores everything else', () => {
    expect(parseBitbakeProgress('NOTE: Executing Tasks')).toBeUndefined();
    expect(parseBitbakeProgress('NOTE: Tasks Summary: Attempted 10 tasks of which 0 didn\'t need to be rerun and all succeeded.')).toBeUndefined();
    expect(parseBitbakeProgress('Running task of many')).toBeUndefined();
  });
});

describe('artifact summary', () => {
  it('classifies deploy files', () => {
    expect(classifyArtifact('lama-image-base-lamadist-x86-64.rootfs.wic.zst')).toBe('image');
    expect(classifyArtifact('lama-bundle-lamadist-x86-64.raucb')).toBe('bundle');
    expect(classifyArtifact('lama-image-base.spdx.json')).toBe('sbom');
    expect(classifyArtifact('busybox-1.36.1-r0.core2_64.rpm')).toBe('rpm');
    expect(classifyArtifact('lama-image-base.wic.bmap')).toBeUndefined();
    expect(classifyArtifact('README_-_DO_NOT_DELETE_FILES_IN_THIS_DIRECTORY.txt')).toBeUndefined();
  });
  it('keeps artifacts an earlier build left, marked as not fresh, and skips symlinks', async () => {
    const dir = mkdtempSync(path.join(os.tmpdir(), 'lamadist-artifacts-'));
    try {
      const images = path.join(dir, 'tmp/deploy/images/m1');
      mkdirSync(images, { recursive: true });
      writeFileSync(path.join(images, 'a.wic.zst'), 'abc');
      symlinkSync('a.wic.zst', path.join(images, 'latest.wic.zst'));
      const old = new Date(Date.now() - 3_600_000);
      utimesSync(path.join(images, 'a.wic.zst'), old, old);
      const found = await scanArtifacts(dir, { since: Date.now() - 1000, machine: 'm1' });
      expect(found).toEqual([{ kind: 'image', path: path.join(images, 'a.wic.zst'), size: 3, fresh: false }]);
      expect(await scanArtifacts(dir, { machine: 'm2' })).toEqual([]);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('formats sizes with binary units', () => {
    expect(formatSize(512)).toBe('512 B');
    expect(formatSize(3 * 1024 * 1024 + 512 * 1024)).toBe('3.5 MiB');
  });
});

describe('clean plan', () => {
  it('removes only build output by default, everything with --all, sstate with --sstate', () => {
    const entries = ['tmp', 'tmp-glibc', 'downloads', 'conf', 'poky', 'logs'];
    expect(planClean('/s', entries, '/s/.cache/sstate', {})).toEqual(['/s/build/tmp', '/s/build/tmp-glibc']);
    expect(planClean('/s', entries, '/s/.cache/sstate', { all: true, sstate: true })).toEqual(['/s/build', '/s/.cache/sstate']);
    expect(planClean('/s', entries, '/s/.cache/sstate', { sstate: true })).toEqual(['/s/.cache/sstate']);
    expect(planClean('/s', entries, '/s/.cache/sstate', { container: true })).toEqual([]);
  });
});
