import { spawn, type ChildProcess } from 'node:child_process';
import { promises as fs } from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { FleetClient } from '../../src/fleet/index.js';
import { BIN } from '../helpers/cli.js';
import { SimDevice } from './ddi-sim.js';
import { makeBundle, makePki, type Pki } from './fixtures.js';
import { listFiles } from './flows.js';

/** `lamadist server` as a child process, so it can be killed with SIGKILL. */
async function spawnServer(store: string, keyring: string, listen: string): Promise<{ child: ChildProcess; url: string }> {
  const child = spawn(process.execPath, [BIN, '--json', 'server', '--store', store, '--keyring', keyring, '--listen', listen, '--poll-interval', '5'], {
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { ...process.env, NO_COLOR: '1' },
  });
  let out = '';
  let err = '';
  child.stderr?.on('data', (c: Buffer) => (err += c.toString()));
  const url = await new Promise<string>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`server did not start: ${err}`)), 60_000);
    child.stdout?.on('data', (c: Buffer) => {
      out += c.toString();
      try {
        const r = JSON.parse(out) as { url: string };
        clearTimeout(timer);
        resolve(r.url);
      } catch {
        // Not the whole JSON document yet.
      }
    });
    child.once('close', (code) => reject(new Error(`server exited ${code}: ${err}`)));
  });
  return { child, url };
}

async function kill9(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const closed = new Promise((r) => child.once('close', r));
  child.kill('SIGKILL');
  await closed;
}

describe('kill -9 of the update server', () => {
  let dir: string;
  let pki: Pki;
  let bundle: string;
  let store: string;
  let current: ChildProcess | undefined;
  const listen = `127.0.0.1:${20000 + Math.floor(Math.random() * 20000)}`;

  beforeAll(async () => {
    dir = await fs.mkdtemp(path.join(os.tmpdir(), 'lamadist-crash-'));
    pki = await makePki(dir);
    bundle = await makeBundle(dir, { pki, compatible: 'lamadist-x86-64', version: '3.0.0', imageBytes: 8 * 1024 * 1024 });
    store = path.join(dir, 'store');
  });

  afterAll(async () => {
    if (current) await kill9(current);
    await fs.rm(dir, { recursive: true, force: true });
  });

  const admin = async (url: string): Promise<FleetClient> =>
    new FleetClient({ url, token: (await fs.readFile(path.join(store, 'admin.token'), 'utf8')).trim() });

  it('during an upload leaves no partial artifact visible, and the upload succeeds afterwards', async () => {
    const s1 = await spawnServer(store, pki.caCert, listen);
    current = s1.child;
    const data = await fs.readFile(bundle);
    const token = (await fs.readFile(path.join(store, 'admin.token'), 'utf8')).trim();
    const req = http.request(`${s1.url}/api/v1/releases`, {
      method: 'POST',
      headers: { Authorization: `Bearer ${token}`, 'Content-Type': 'application/octet-stream', 'Content-Length': data.length },
    });
    req.on('error', () => undefined);
    req.write(data.subarray(0, data.length >> 1));
    // Wait until the server has part of the upload on disk, then kill it mid-stream.
    for (let i = 0; i < 200; i++) {
      const tmp = await listFiles(path.join(store, 'tmp'));
      if (tmp.length === 1 && (await fs.stat(tmp[0] as string)).size > 0) break;
      await new Promise((r) => setTimeout(r, 50));
    }
    expect((await listFiles(path.join(store, 'tmp'))).length).toBe(1);
    await kill9(s1.child);
    req.destroy();

    const s2 = await spawnServer(store, pki.caCert, listen);
    current = s2.child;
    const fleet = await admin(s2.url);
    expect(await listFiles(path.join(store, 'tmp'))).toEqual([]);
    expect(await listFiles(path.join(store, 'artifacts'))).toEqual([]);
    expect(await fleet.listReleases()).toEqual([]);
    const up = await fleet.uploadRelease(bundle);
    expect(up.created).toBe(true);
    expect((await listFiles(path.join(store, 'artifacts'))).length).toBe(1);
  });

  it('during a rollout loses and duplicates no action', async () => {
    let fleet = await admin(`http://${listen}`);
    const n = 30;
    const tokens = new Map<string, string>();
    for (let i = 0; i < n; i++) {
      const id = `crash-${String(i).padStart(2, '0')}`;
      tokens.set(id, (await fleet.registerDevice({ controllerId: id, bsp: 'x86_64', tags: ['crash'] })).token);
    }
    const release = (await fleet.listReleases())[0];
    const rollout = await fleet.createRollout({ releaseId: release?.id ?? 0, filter: { tags: ['crash'] }, waves: [{ count: 10 }, { count: 10 }], successThreshold: 50 });
    expect(rollout.progress.map((w) => w.size)).toEqual([10, 10, 10]);

    const offered = new Map<string, string>();
    const done = new Set<string>();
    // One simulated device round: poll, and if offered an update, install it and report the new boot.
    const round = async (url: string, id: string): Promise<void> => {
      const d = new SimDevice(url, 'DEFAULT', id, { scheme: 'TargetToken', token: tokens.get(id) ?? '' });
      const p = await d.poll();
      const href = p.links.deploymentBase?.href;
      if (href) {
        const dep = await d.deployment(href);
        const prev = offered.get(id);
        if (prev !== undefined && prev !== dep.id) throw new Error(`${id} was offered action ${dep.id} after ${prev}`);
        offered.set(id, dep.id);
        await d.feedback(dep.id, 'proceeding', 'none');
        await d.feedback(dep.id, 'closed', 'success');
      }
      if (href || p.links.configData) {
        await d.putConfig(`${d.base}/configData`, { version: '3.0.0', boot_id: `${id}-after` });
        if (offered.has(id)) done.add(id);
      }
    };
    const drive = async (url: string, stopAfter?: number): Promise<void> => {
      for (let pass = 0; pass < 20 && done.size < n; pass++) {
        await Promise.all(
          [...tokens.keys()].map((id) =>
            round(url, id).catch((e: Error) => {
              if (stopAfter === undefined) throw e;
            }),
          ),
        );
        if (stopAfter !== undefined && done.size >= stopAfter) return;
      }
    };

    // Kill while devices of the second wave are in the middle of reporting.
    const killer = (async () => {
      while (done.size < 13) await new Promise((r) => setTimeout(r, 5));
      await kill9(current as ChildProcess);
    })();
    await drive(`http://${listen}`, 13);
    await killer;

    const s3 = await spawnServer(store, pki.caCert, listen);
    current = s3.child;
    fleet = await admin(s3.url);
    await drive(s3.url);
    const r = await fleet.getRollout(rollout.id);
    expect(r.status).toBe('finished');
    expect(r.progress.map((w) => w.states)).toEqual([{ success: 10 }, { success: 10 }, { success: 10 }]);
    for (const id of tokens.keys()) {
      const detail = await fleet.getDevice(id);
      const mine = detail.actions.filter((a) => a.rolloutId === rollout.id);
      expect(mine.length, id).toBe(1);
      expect(String(mine[0]?.id)).toBe(offered.get(id));
      expect(detail.version).toBe('3.0.0');
    }
    await kill9(s3.child);
    current = undefined;
  });
});
