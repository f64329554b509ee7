import { spawn, type ChildProcess } from 'node:child_process';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { BIN, runCli } from '../helpers/cli.js';
import { SimDevice } from './ddi-sim.js';
import { makeBundle, makePki } from './fixtures.js';

describe('lamadist server and lamadist fleet', () => {
  let dir: string;
  let child: ChildProcess;
  let url: string;
  let env: NodeJS.ProcessEnv;
  let bundle: string;

  beforeAll(async () => {
    dir = await fs.mkdtemp(path.join(os.tmpdir(), 'lamadist-cli-'));
    const pki = await makePki(dir);
    bundle = await makeBundle(dir, { pki, compatible: 'lamadist-x86-64', version: '4.2.0' });
    child = spawn(process.execPath, [BIN, '--json', 'server', '--store', path.join(dir, 'store'), '--keyring', pki.caCert, '--listen', '127.0.0.1:0', '--poll-interval', '30', '--cache-mib', '22'], {
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let out = '';
    const started = await new Promise<{ url: string; cacheMiB: number }>((resolve, reject) => {
      child.stdout?.on('data', (c: Buffer) => {
        out += c.toString();
        try {
          resolve(JSON.parse(out) as { url: string; cacheMiB: number });
        } catch {
          // Not complete yet.
        }
      });
      child.once('close', (code) => reject(new Error(`server exited ${code}`)));
    });
    url = started.url;
    // The cache is whole 4 MiB blocks: 22 MiB holds five.
    expect(started.cacheMiB).toBe(20);
    env = { LAMADIST_SERVER: url, LAMADIST_ADMIN_TOKEN: '' };
  });

  afterAll(async () => {
    child?.kill('SIGTERM');
    await fs.rm(dir, { recursive: true, force: true });
  });

  const fleet = (args: string[]) => runCli(['fleet', '--token-file', path.join(dir, 'store', 'admin.token'), ...args], { env });

  it('writes the admin token 0600 and pre-registers a device with its token file 0600', async () => {
    expect((await fs.stat(path.join(dir, 'store', 'admin.token'))).mode & 0o777).toBe(0o600);
    const r = await fleet(['--json', 'device', 'add', 'edge-1', '--bsp', 'x86_64', '--tag', 'home', '--token-out', path.join(dir, 'edge-1.token')]);
    expect(r.code, r.stderr).toBe(0);
    expect(JSON.parse(r.stdout)).toMatchObject({ device: { controllerId: 'edge-1', tags: ['home'] } });
    expect(r.stdout).not.toMatch(/"token"/);
    expect((await fs.stat(path.join(dir, 'edge-1.token'))).mode & 0o777).toBe(0o600);
    const again = await fleet(['device', 'add', 'edge-1']);
    expect(again.code).toBe(2);
    expect(again.stderr.trim().split('\n')).toHaveLength(1);
    expect(again.stderr).toMatch(/already registered \[LAMA_E_SERVER_EXISTS\]/);
  });

  it('uploads a release, starts a rollout and shows its progress', async () => {
    const up = await fleet(['release', 'upload', bundle]);
    expect(up.code, up.stderr).toBe(0);
    expect(up.stdout).toMatch(/^accepted: release 1 lamadist-x86-64 4\.2\.0/);
    const ro = await fleet(['--json', 'rollout', 'create', '--release', '1', '--tag', 'home', '--waves', '50%']);
    expect(ro.code, ro.stderr).toBe(0);
    expect(JSON.parse(ro.stdout)).toMatchObject({ status: 'running', progress: [{ size: 1, states: { pending: 1 } }] });
    const token = (await fs.readFile(path.join(dir, 'edge-1.token'), 'utf8')).trim();
    const d = new SimDevice(url, 'DEFAULT', 'edge-1', { scheme: 'TargetToken', token });
    expect((await d.poll()).links.deploymentBase).toBeDefined();
    const show = await fleet(['rollout', 'show', '1']);
    expect(show.stdout).toMatch(/running, wave 1\/1/);
    expect(show.stdout).toMatch(/wave 1: pending 1/);
    // The bundle file in place of its id: found as already stored, rolled out by a second rollout.
    const byFile = await fleet(['--json', 'rollout', 'create', '--release', bundle, '--device', 'edge-1', '--no-start']);
    expect(byFile.code, byFile.stderr).toBe(0);
    expect(JSON.parse(byFile.stdout)).toMatchObject({ releaseVersion: '4.2.0', status: 'ready' });
    const missing = await fleet(['rollout', 'create', '--release', path.join(dir, 'nope.raucb'), '--tag', 'home']);
    expect(missing.code).toBe(2);
    expect(missing.stderr.trim().split('\n')).toHaveLength(1);
    const bad = await fleet(['rollout', 'resume', '1']);
    expect(bad.code).toBe(2);
    expect(bad.stderr).toMatch(/cannot resume rollout 1: it is running \[LAMA_E_ROLLOUT_STATE\]/);
  });

  it('shows a device\'s attestation and holds back devices that are not attested', async () => {
    const show = await fleet(['device', 'show', 'edge-1']);
    expect(show.code, show.stderr).toBe(0);
    expect(show.stdout).toMatch(/^ {2}attestation: unknown$/m);
    const ro = await fleet(['rollout', 'create', '--release', '1', '--device', 'edge-1', '--require-attestation', '--no-start']);
    expect(ro.code, ro.stderr).toBe(0);
    expect(ro.stdout).toMatch(/: ready, wave 1\/0 \[\]; held back \(not attested\): edge-1$/m);
  });

  it('fleet device attest asks a device for a fresh quote: its base poll names the link, device show the time', async () => {
    const r = await fleet(['--json', 'device', 'attest', 'edge-1']);
    expect(r.code, r.stderr).toBe(0);
    const asked = JSON.parse(r.stdout) as { tenant: string; controllerId: string; requestedAt: string };
    expect(asked).toEqual({ tenant: 'DEFAULT', controllerId: 'edge-1', requestedAt: expect.stringMatching(/^\d{4}-\d\d-\d\dT[\d:.]+Z$/) as unknown });
    const text = await fleet(['device', 'attest', 'edge-1']);
    expect(text.code, text.stderr).toBe(0);
    expect(text.stdout).toMatch(/^asked edge-1 for a fresh quote at \S+Z; its verdict shows in `fleet device show edge-1` once judged\n$/);
    const token = (await fs.readFile(path.join(dir, 'edge-1.token'), 'utf8')).trim();
    const links = (await new SimDevice(url, 'DEFAULT', 'edge-1', { scheme: 'TargetToken', token }).poll()).links as Record<string, { href: string }>;
    expect(links.lamadistAttestation?.href).toBe(`${url}/DEFAULT/controller/v1/edge-1/attestation/nonce`);
    const show = await fleet(['device', 'show', 'edge-1']);
    expect(show.stdout).toMatch(/^ {2}attestation: unknown\n {2}fresh quote requested \S+Z, not judged yet$/m);
    const missing = await fleet(['device', 'attest', 'nope']);
    expect(missing.code).toBe(2);
    expect(missing.stdout).toBe('');
    expect(missing.stderr).toMatch(/^[^\n]*device DEFAULT\/nope is not registered \[LAMA_E_SERVER_NOT_FOUND\]\n$/);
  });

  it('refuses a wrong admin token, a bad wave list and bad server flags with one line and exit 2', async () => {
    await fs.writeFile(path.join(dir, 'wrong.token'), 'wrong\n');
    const r = await runCli(['fleet', '--token-file', path.join(dir, 'wrong.token'), 'devices'], { env });
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/HTTP 401.*\[LAMA_E_SERVER_UNAUTHORIZED\]/);
    const w = await fleet(['rollout', 'create', '--release', '1', '--waves', '0%']);
    expect(w.code).toBe(2);
    expect(w.stderr).toMatch(/LAMA_E_ROLLOUT_WAVES/);
    const l = await runCli(['server', '--store', path.join(dir, 's2'), '--keyring', path.join(dir, 'pki', 'ca.pem'), '--listen', 'nope:x']);
    expect(l.code).toBe(2);
    expect(l.stderr).toMatch(/--listen 'nope:x' must be HOST:PORT/);
    const k = await runCli(['server', '--store', path.join(dir, 's3'), '--listen', '127.0.0.1:0']);
    expect(k.code).toBe(2);
    expect(k.stderr).toMatch(/keyring .*keyring\.pem does not exist \[LAMA_E_NOT_FOUND\]/);
  });
});
