import { chmodSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { cannotBuildReason, layerRepos, missingCheckouts } from '../../src/doctor/index.js';
import { runCli } from '../helpers/cli.js';

/**
 * doctor against this host. The real layer hosts are never probed here; the reachability logic is
 * exercised against a TCP listener on 127.0.0.1 named as a layer repository.
 */

let tmp: string;
let root: string;
let bin: string;
let server: net.Server;
let port: number;

function writeRepo(url: string): void {
  mkdirSync(path.join(root, 'kas/bsp'), { recursive: true });
  writeFileSync(
    path.join(root, 'kas/main.kas.yml'),
    `header:\n  version: 14\ndistro: lamadist\nrepos:\n  poky:\n    url: ${url}\n    commit: 0123456789abcdef0123456789abcdef01234567\n`,
  );
  writeFileSync(path.join(root, 'kas/bsp/x86_64.kas.yml'), 'header:\n  version: 14\nmachine: lamadist-x86-64\n');
}

beforeAll(async () => {
  tmp = mkdtempSync(path.join(os.tmpdir(), 'lamadist-doctor-'));
  root = path.join(tmp, 'repo');
  bin = path.join(tmp, 'bin');
  mkdirSync(bin);
  writeFileSync(path.join(bin, 'podman'), '#!/bin/sh\nexit 1\n');
  chmodSync(path.join(bin, 'podman'), 0o755);
  server = net.createServer((s) => s.end());
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  port = (server.address() as net.AddressInfo).port;
});
afterAll(async () => {
  await new Promise<void>((resolve) => server.close(() => resolve()));
  rmSync(tmp, { recursive: true, force: true });
});

describe('doctor', () => {
  it('lists every prerequisite with a fix for each problem, as JSON', async () => {
    const r = await runCli(['--json', 'doctor', '--no-network']);
    const findings = JSON.parse(r.stdout) as { id: string; severity: string; detail: string; fix: string }[];
    const ids = findings.map((f) => f.id);
    for (const id of ['node', 'container-engine', 'builder-image', 'user-namespaces', 'disk-space', 'locale', 'tool:veritysetup', 'tool:rauc']) {
      expect(ids).toContain(id);
    }
    for (const f of findings) if (f.severity !== 'ok') expect(f.fix).not.toBe('');
    expect(findings.find((f) => f.id === 'container-engine')?.severity).toBe('ok');
    expect(r.code).toBe(findings.some((f) => f.severity === 'error') ? 2 : 0);
  });

  it('names the Debian package for a missing tool', async () => {
    const r = await runCli(['--json', 'doctor', '--no-network'], { env: { PATH: bin } });
    const findings = JSON.parse(r.stdout) as { id: string; severity: string; fix: string }[];
    expect(findings.find((f) => f.id === 'tool:sgdisk')).toMatchObject({ severity: 'warn', fix: 'apt-get install gdisk (or scripts/setup)' });
  });

  it('reads the layer hosts from the kas files and probes only repositories not yet checked out', async () => {
    writeRepo(`https://127.0.0.1:${port}/poky`);
    const repos = await layerRepos(root);
    expect(repos).toEqual([{ key: 'poky', url: `https://127.0.0.1:${port}/poky`, host: '127.0.0.1', port }]);
    expect(missingCheckouts(root, repos)).toHaveLength(1);
    mkdirSync(path.join(root, 'build/poky/.git'), { recursive: true });
    expect(missingCheckouts(root, repos)).toHaveLength(0);
    rmSync(path.join(root, 'build'), { recursive: true });
  });

  it('can build when the engine exists and the layer host answers', async () => {
    writeRepo(`https://127.0.0.1:${port}/poky`);
    const prev = process.env.PATH;
    process.env.PATH = `${bin}:${prev ?? ''}`;
    try {
      expect(await cannotBuildReason({ root })).toBeUndefined();
      const closed = net.createServer();
      await new Promise<void>((resolve) => closed.listen(0, '127.0.0.1', resolve));
      const deadPort = (closed.address() as net.AddressInfo).port;
      await new Promise<void>((resolve) => closed.close(() => resolve()));
      writeRepo(`https://127.0.0.1:${deadPort}/poky`);
      const reason = await cannotBuildReason({ root });
      expect(reason).toMatch(/^this host cannot build: the layer repositories cannot be fetched \(cannot connect to 127\.0\.0\.1:\d+ .*\); run `lamadist vm demo` to try LamaDist without a build$/);
    } finally {
      process.env.PATH = prev;
    }
  });

  it('--can-build exits 0 with an engine and reachable layers, 2 with one line otherwise', async () => {
    writeRepo(`https://127.0.0.1:${port}/poky`);
    const ok = await runCli(['doctor', '--can-build', '-C', root], { env: { PATH: `${bin}:${process.env.PATH ?? ''}` } });
    expect(ok.code).toBe(0);
    expect(ok.stdout).toBe('this host can build LamaDist\n');
    const empty = path.join(tmp, 'empty');
    mkdirSync(empty, { recursive: true });
    const no = await runCli(['doctor', '--can-build', '-C', root], { env: { PATH: empty } });
    expect(no.code).toBe(2);
    expect(no.stderr.trim().split('\n')).toHaveLength(1);
    expect(no.stderr).toContain('lamadist vm demo');
  });
});
