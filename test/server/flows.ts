import { createHash } from 'node:crypto';
import { promises as fs } from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { FleetClient } from '../../src/fleet/index.js';
import type { AddressInfo } from 'node:net';
import { artifactFastPath } from '../../src/server/ddi.js';
import { startServer, type RunningServer } from '../../src/server/index.js';
import { ArtifactStore } from '../../src/server/store.js';
import { run } from '../../src/util/proc.js';
import { SimDevice } from './ddi-sim.js';
import { makeBundle, makePki } from './fixtures.js';

/** Files under a directory, recursively (to prove what the store holds). */
export async function listFiles(dir: string): Promise<string[]> {
  const out: string[] = [];
  for (const e of await fs.readdir(dir, { withFileTypes: true }).catch(() => [])) {
    const p = path.join(dir, e.name);
    if (e.isDirectory()) out.push(...(await listFiles(p)));
    else out.push(p);
  }
  return out;
}

/**
 * The device and management flows the issue lists, run against one database. The same function
 * is used for SQLite (fast suite) and PostgreSQL (slow suite).
 */
export function serverFlows(label: string, database: () => Promise<{ url: string; drop: () => Promise<void> }>): void {
  describe(`update server flows on ${label}`, () => {
    let dir: string;
    let server: RunningServer;
    let fleet: FleetClient;
    let drop: () => Promise<void>;
    const bundles: Record<string, string> = {};
    const tokens: Record<string, string> = {};
    const dev = (id: string): SimDevice => new SimDevice(server.url, 'DEFAULT', id, { scheme: 'TargetToken', token: tokens[id] ?? '' });

    beforeAll(async () => {
      dir = await fs.mkdtemp(path.join(os.tmpdir(), 'lamadist-server-'));
      const pki = await makePki(dir, 'fleet');
      const rogue = await makePki(dir, 'rogue');
      bundles.v1 = await makeBundle(dir, { pki, compatible: 'lamadist-x86-64', version: '1.0.0' });
      bundles.v2 = await makeBundle(dir, { pki, compatible: 'lamadist-x86-64', version: '2.0.0', imageBytes: 1024 * 1024 + 123 });
      bundles.rogue = await makeBundle(dir, { pki: rogue, compatible: 'lamadist-x86-64', version: '9.9.9' });
      bundles.incompatible = await makeBundle(dir, { pki, compatible: 'acme-toaster', version: '1.0.0' });
      const v2 = await fs.readFile(bundles.v2);
      bundles.truncated = path.join(dir, 'truncated.raucb');
      await fs.writeFile(bundles.truncated, v2.subarray(0, v2.length - 5000));
      // The same squashfs `rauc bundle` builds, without the CMS signature RAUC appends.
      bundles.unsigned = path.join(dir, 'unsigned.raucb');
      await run('mksquashfs', [path.join(dir, 'lamadist-x86-64-1.0.0.content'), bundles.unsigned, '-noappend', '-no-progress', '-quiet']);
      const db = await database();
      drop = db.drop;
      server = await startServer({ db: db.url, store: path.join(dir, 'store'), listen: '127.0.0.1:0', keyring: pki.caCert, pollSeconds: 60, maxBundleBytes: 4 * 1024 * 1024 });
      fleet = new FleetClient({ url: server.url, token: (await fs.readFile(server.adminTokenFile as string, 'utf8')).trim() });
    });

    afterAll(async () => {
      await server?.close();
      await drop?.();
      await fs.rm(dir, { recursive: true, force: true });
    });

    it('pre-registers devices and takes their attributes on first contact', async () => {
      for (const id of ['node-a', 'node-b', 'node-c']) {
        const r = await fleet.registerDevice({ controllerId: id, bsp: 'x86_64', tags: ['lab'] });
        expect(r.device.status).toBe('registered');
        tokens[id] = r.token;
      }
      await expect(fleet.registerDevice({ controllerId: 'node-a' })).rejects.toMatchObject({ code: 'LAMA_E_SERVER_EXISTS' });
      for (const id of ['node-a', 'node-b', 'node-c']) {
        const d = dev(id);
        const p = await d.poll();
        expect(p.sleep).toBe('00:01:00');
        expect(p.links.deploymentBase).toBeUndefined();
        expect(p.links.configData?.href).toMatch(new RegExp(`/DEFAULT/controller/v1/${id}/configData$`));
        await d.putConfig(p.links.configData?.href ?? '', { version: '1.0.0', boot_id: `${id}-boot-1`, hw: 'qemu' });
        expect((await d.poll()).links.configData).toBeUndefined();
      }
      // Contact times are batched in memory; after a flush they are in the database.
      await server.service.flushSeen();
      const rows = await server.service.db.selectFrom('devices').select(['controller_id', 'last_seen']).orderBy('controller_id').execute();
      for (const r of rows) expect(Date.now() - Number(r.last_seen), r.controller_id).toBeLessThan(60_000);
      const list = await fleet.listDevices();
      expect(list.map((d) => [d.controllerId, d.version, d.status])).toEqual([
        ['node-a', '1.0.0', 'online'],
        ['node-b', '1.0.0', 'online'],
        ['node-c', '1.0.0', 'online'],
      ]);
    });

    it('accepts a signed compatible bundle once and refuses bad ones with a reason, storing nothing', async () => {
      const first = await fleet.uploadRelease(bundles.v2 as string);
      expect(first.created).toBe(true);
      expect(first.release).toMatchObject({ version: '2.0.0', compatible: 'lamadist-x86-64', format: 'verity', filename: 'lamadist-x86-64-2.0.0.raucb' });
      expect(first.release.sha256).toBe(createHash('sha256').update(await fs.readFile(bundles.v2 as string)).digest('hex'));
      const again = await fleet.uploadRelease(bundles.v2 as string);
      expect(again).toMatchObject({ created: false, release: { id: first.release.id } });
      const refusals: [string, RegExp][] = [
        ['unsigned', /LAMA_E_BUNDLE_/],
        ['truncated', /LAMA_E_BUNDLE_/],
        ['rogue', /LAMA_E_BUNDLE_(UNTRUSTED_SIGNER|BAD_SIGNATURE)/],
        ['incompatible', /LAMA_E_BUNDLE_COMPATIBLE/],
      ];
      for (const [name, code] of refusals) {
        const err = await fleet.uploadRelease(bundles[name] as string).then(
          () => undefined,
          (e: { code: string; message: string }) => e,
        );
        expect(err, name).toBeDefined();
        expect(err?.code, `${name}: ${err?.message}`).toMatch(code);
        expect(err?.message).toMatch(/HTTP (422|400)/);
      }
      // Over the size limit: refused from the declared length, and while streaming when none is declared.
      const adminToken = (await fs.readFile(server.adminTokenFile as string, 'utf8')).trim();
      const headers = { Authorization: `Bearer ${adminToken}`, 'Content-Type': 'application/octet-stream' };
      const declared = await fetch(`${server.url}/api/v1/releases`, { method: 'POST', headers, body: Buffer.alloc(5 * 1024 * 1024) });
      expect(declared.status).toBe(413);
      const chunk = Buffer.alloc(1024 * 1024);
      let sent = 0;
      const chunked = await fetch(`${server.url}/api/v1/releases`, {
        method: 'POST',
        headers,
        duplex: 'half',
        body: new ReadableStream({
          pull(controller) {
            if (sent++ < 6) controller.enqueue(chunk);
            else controller.close();
          },
        }),
      } as RequestInit);
      expect(chunked.status).toBe(413);
      expect(((await chunked.json()) as { error: string }).error).toBe('LAMA_E_SERVER_TOO_LARGE');
      const stored = await listFiles(path.join(dir, 'store', 'artifacts'));
      expect(stored).toEqual([path.join(dir, 'store', 'artifacts', first.release.sha256.slice(0, 2), first.release.sha256)]);
      expect(await listFiles(path.join(dir, 'store', 'tmp'))).toEqual([]);
      expect((await fleet.listReleases()).length).toBe(1);
      const v1 = await fleet.uploadRelease(bundles.v1 as string, { filename: 'v1.raucb' });
      expect(v1.release.filename).toBe('v1.raucb');
    });

    it('rolls out in waves with verified-boot success, rollback counting as failure, and pause/resume', async () => {
      const release = (await fleet.listReleases()).find((r) => r.version === '2.0.0');
      expect(release).toBeDefined();
      const rollout = await fleet.createRollout({ releaseId: release?.id ?? 0, name: 'v2', filter: { tags: ['lab'] }, waves: [{ count: 1 }], errorThreshold: 0 });
      expect(rollout.status).toBe('running');
      expect(rollout.progress.map((w) => w.size)).toEqual([1, 2]);
      expect(rollout.progress[0]?.states).toEqual({ pending: 1 });

      // Wave 1: node-a only. The others see nothing yet.
      expect((await dev('node-b').poll()).links.deploymentBase).toBeUndefined();
      const a = dev('node-a');
      const pa = await a.poll();
      expect(pa.links.deploymentBase?.href).toBeDefined();
      const dep = await a.deployment(pa.links.deploymentBase?.href ?? '');
      expect(dep.deployment).toMatchObject({ download: 'forced', update: 'forced', maintenanceWindow: 'available' });
      expect(dep.deployment.chunks).toHaveLength(1);
      expect(dep.deployment.chunks[0]?.artifacts).toHaveLength(1);
      const art = dep.deployment.chunks[0]?.artifacts[0];
      if (!art) throw new Error('no artifact');
      expect(art).toMatchObject({ size: release?.size, hashes: { sha1: release?.sha1, md5: release?.md5, sha256: release?.sha256 } });
      expect(art._links['download-http']?.href).toBeDefined();
      await a.feedback(dep.id, 'proceeding', 'none', ['downloading']);
      await a.downloadVerified(art);
      await a.feedback(dep.id, 'closed', 'success', ['installed to slot B']);
      // Written, not yet booted: the action is "installed", the wave does not advance.
      let r = await fleet.getRollout(rollout.id);
      expect(r.progress[0]?.states).toEqual({ installed: 1 });
      expect(r.currentWave).toBe(0);
      const after = await a.poll();
      expect(after.links.deploymentBase).toBeUndefined();
      expect(after.links.configData).toBeDefined();
      // A report from the same boot on the old version is not yet a verdict.
      await a.putConfig(after.links.configData?.href ?? '', { version: '1.0.0', boot_id: 'node-a-boot-1' });
      expect((await fleet.getRollout(rollout.id)).progress[0]?.states).toEqual({ installed: 1 });
      // Attributes without a version (a client with a static attribute list) decide nothing either.
      await a.putConfig(after.links.configData?.href ?? '', { hw: 'qemu' }, 'replace');
      expect((await fleet.getRollout(rollout.id)).progress[0]?.states).toEqual({ installed: 1 });
      await a.putConfig(after.links.configData?.href ?? '', { version: '2.0.0', boot_id: 'node-a-boot-2' });
      r = await fleet.getRollout(rollout.id);
      expect(r.progress[0]?.states).toEqual({ success: 1 });
      expect(r.currentWave).toBe(1);
      expect(r.progress[1]?.states).toEqual({ pending: 2 });

      // Wave 2: node-b streams like `rauc install` and comes back on the old version (rolled back).
      const b = dev('node-b');
      const pb = await b.poll();
      const depB = await b.deployment(pb.links.deploymentBase?.href ?? '');
      const artB = depB.deployment.chunks[0]?.artifacts[0];
      if (!artB) throw new Error('no artifact');
      const statusRowsBefore = (await fleet.getDevice('node-b')).actions.flatMap((x) => x.history).length;
      const streamed = await b.streamLikeRauc(artB);
      expect(streamed.requests).toBeGreaterThan(8);
      expect(createHash('sha256').update(streamed.data).digest('hex')).toBe(artB.hashes.sha256);
      expect((await fleet.getDevice('node-b')).actions.flatMap((x) => x.history).length).toBe(statusRowsBefore);
      await b.feedback(depB.id, 'closed', 'success');
      await b.putConfig(`${b.base}/configData`, { version: '1.0.0', boot_id: 'node-b-boot-2' });
      r = await fleet.getRollout(rollout.id);
      expect(r.status).toBe('paused');
      expect(r.progress[1]?.states).toMatchObject({ rolled_back: 1, pending: 1 });
      const hist = await fleet.getDevice('node-b');
      expect(hist.actions[0]?.state).toBe('rolled_back');
      expect(hist.actions[0]?.history.at(-1)?.details[0]).toMatch(/came back running 1\.0\.0/);

      // Paused rollouts keep already-offered actions; node-c finishes, then resume finishes the rollout.
      const c = dev('node-c');
      const pc = await c.poll();
      const depC = await c.deployment(pc.links.deploymentBase?.href ?? '');
      await c.feedback(depC.id, 'closed', 'success');
      await c.putConfig(`${c.base}/configData`, { version: '2.0.0', boot_id: 'node-c-boot-2' });
      expect((await fleet.getRollout(rollout.id)).status).toBe('paused');
      expect((await fleet.rolloutOp(rollout.id, 'resume')).status).toBe('finished');
      // Failed feedback on a finished action changes nothing (retries are harmless).
      await c.feedback(depC.id, 'closed', 'failure');
      expect((await fleet.getDevice('node-c')).actions[0]?.state).toBe('success');
      const ov = await fleet.overview();
      expect(ov.byVersion).toEqual({ '2.0.0': 2, '1.0.0': 1 });
    });

    it('cancels an offered update through cancelAction', async () => {
      const v1 = (await fleet.listReleases()).find((x) => x.version === '1.0.0');
      const r = await fleet.createRollout({ releaseId: v1?.id ?? 0, filter: { devices: ['node-c'] } });
      const c = dev('node-c');
      const p = await c.poll();
      const actionId = /deploymentBase\/(\d+)/.exec(p.links.deploymentBase?.href ?? '')?.[1] ?? '';
      await c.feedback(actionId, 'proceeding', 'none');
      expect((await fleet.rolloutOp(r.id, 'cancel')).progress[0]?.states).toEqual({ canceling: 1 });
      const p2 = await c.poll();
      expect(p2.links.deploymentBase).toBeUndefined();
      expect(await c.cancelAction(p2.links.cancelAction?.href ?? '')).toBe(actionId);
      await c.cancelFeedback(actionId, 'closed', 'success');
      expect((await fleet.getRollout(r.id)).progress[0]?.states).toEqual({ canceled: 1 });
      expect((await c.poll()).links).toEqual({});
    });

    it('answers 401 to missing or wrong credentials on every device path and isolates devices', async () => {
      const a = dev('node-a');
      const detail = await fleet.getDevice('node-a');
      const actionId = detail.actions[0]?.id;
      const release = (await fleet.listReleases()).find((x) => x.version === '2.0.0');
      const artifact = `${a.base}/softwaremodules/${release?.id}/artifacts/${release?.filename}`;
      const paths: [string, string][] = [
        ['GET', a.base],
        ['PUT', `${a.base}/configData`],
        ['GET', `${a.base}/deploymentBase/${actionId}`],
        ['POST', `${a.base}/deploymentBase/${actionId}/feedback`],
        ['GET', `${a.base}/cancelAction/${actionId}`],
        ['POST', `${a.base}/cancelAction/${actionId}/feedback`],
        ['GET', artifact],
        ['HEAD', artifact],
      ];
      for (const [method, url] of paths) {
        for (const auth of [undefined, `TargetToken ${tokens['node-b']}`, 'TargetToken nope', `GatewayToken ${tokens['node-a']}`, `Bearer ${tokens['node-a']}`]) {
          const res = await fetch(url, { method, headers: auth ? { Authorization: auth } : {} });
          expect(res.status, `${method} ${url} with ${auth?.split(' ')[0] ?? 'nothing'}`).toBe(401);
        }
      }
      // node-b's own credentials do not reach node-a's action or an artifact it was never offered.
      const b = dev('node-b');
      expect((await b.get(`${b.base}/deploymentBase/${actionId}`)).status).toBe(404);
      const v1 = (await fleet.listReleases()).find((x) => x.version === '1.0.0');
      expect((await b.get(`${b.base}/softwaremodules/${v1?.id}/artifacts/${v1?.filename}`)).status).toBe(404);
      // Path tricks in artifact names never reach the file system.
      for (const name of ['..%2F..%2Fetc%2Fpasswd', '%2E%2E', `${release?.filename}%00`, 'lamadist.db']) {
        expect((await a.get(`${a.base}/softwaremodules/${release?.id}/artifacts/${name}`)).status, name).toBe(404);
      }
      await expect(fleet.uploadRelease(bundles.v1 as string, { filename: '../evil.raucb' })).rejects.toMatchObject({ code: 'LAMA_E_SERVER_BAD_NAME' });
      // Oversized bodies are refused before they are parsed.
      const big = await fetch(`${a.base}/configData`, {
        method: 'PUT',
        headers: { Authorization: `TargetToken ${tokens['node-a']}`, 'Content-Type': 'application/json' },
        body: JSON.stringify({ data: { x: 'y'.repeat(200_000) } }),
      });
      expect(big.status).toBe(413);
      // A gateway token registers unknown controllers of its tenant.
      const gw = await fleet.gatewayToken();
      const g = new SimDevice(server.url, 'DEFAULT', 'auto-1', { scheme: 'GatewayToken', token: gw });
      expect((await g.poll()).links.configData).toBeDefined();
      expect((await fleet.listDevices()).map((d) => d.controllerId)).toContain('auto-1');
    });

    it('refuses a rotated token on the keep-alive connection that already streamed with it', async () => {
      const release = (await fleet.listReleases()).find((x) => x.version === '2.0.0');
      const url = new URL(`${dev('node-a').base}/softwaremodules/${release?.id}/artifacts/${release?.filename}`);
      const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
      const sockets = new Set<unknown>();
      const get = (token: string): Promise<number> =>
        new Promise((resolve, reject) => {
          const req = http.get(url, { agent, headers: { Authorization: `TargetToken ${token}`, Range: 'bytes=0-3' } }, (res) => {
            sockets.add(res.socket);
            res.resume().on('end', () => resolve(res.statusCode ?? 0));
          });
          req.on('error', reject);
        });
      try {
        const old = tokens['node-a'] as string;
        expect(await get(old)).toBe(206);
        expect(await get(old)).toBe(206);
        tokens['node-a'] = await fleet.rotateDeviceToken('node-a');
        expect(await get(old)).toBe(401);
        expect(await get(tokens['node-a'])).toBe(206);
        expect(await get(tokens['node-b'] as string)).toBe(401);
        // All of it over one connection: what was verified there is not trusted past a rotation.
        expect(sockets.size).toBe(1);
      } finally {
        agent.destroy();
      }
    });

    it('answers on the fast path only what it can answer in full, and hands the rest to the routes', async () => {
      const release = (await fleet.listReleases()).find((x) => x.version === '2.0.0');
      if (!release) throw new Error('no release');
      const store = await ArtifactStore.open(path.join(dir, 'store'), { cacheBytes: 0 });
      const fast = artifactFastPath(server.service, store, (err) => {
        throw err;
      });
      // 599 marks a request the fast path passed on to fastify.
      const probe = http.createServer((req, res) => fast(req, res, () => res.writeHead(599).end()));
      await new Promise<void>((r) => probe.listen(0, '127.0.0.1', r));
      const origin = `http://127.0.0.1:${(probe.address() as AddressInfo).port}`;
      const a = (id: string): string => `${origin}/DEFAULT/controller/v1/${id}/softwaremodules/${release.id}/artifacts`;
      const as = (id: string): Record<string, string> => ({ Authorization: `TargetToken ${tokens[id]}` });
      try {
        const ok = await fetch(`${a('node-a')}/${release.filename}?x=1`, { headers: { ...as('node-a'), Range: 'bytes=10-19' } });
        expect(ok.status).toBe(206);
        const whole = await fs.readFile(bundles.v2 as string);
        expect(Buffer.from(await ok.arrayBuffer()).equals(whole.subarray(10, 20))).toBe(true);
        expect((await fetch(`${a('node-a')}/${encodeURIComponent(release.filename)}`, { method: 'HEAD', headers: as('node-a') })).status).toBe(200);
        const passed: [string, RequestInit][] = [
          [`${a('node-a')}/${release.filename}`, {}],
          [`${a('node-a')}/${release.filename}`, { headers: { Authorization: 'TargetToken nope' } }],
          [`${a('node-a')}/${release.filename}`, { method: 'POST', headers: as('node-a') }],
          [`${a('node-a')}/${release.filename}.MD5SUM`, { headers: as('node-a') }],
          [`${a('node-a')}/%E0%A4%A`, { headers: as('node-a') }],
          [`${a('node-b')}/${release.filename}`, { headers: as('node-a') }],
          [`${origin}/DEFAULT/controller/v1/node-a/softwaremodules/999/artifacts/${release.filename}`, { headers: as('node-a') }],
          [`${origin}/DEFAULT/controller/v1/node-a`, { headers: as('node-a') }],
        ];
        for (const [url, init] of passed) expect((await fetch(url, init)).status, `${init.method ?? 'GET'} ${url}`).toBe(599);
      } finally {
        await new Promise((r) => probe.close(r));
        await store.close();
      }
    });

    it('serves the OpenAPI document, an audit log of every change and Prometheus metrics', async () => {
      const doc = (await (await fetch(`${server.url}/api/openapi.json`)).json()) as { openapi: string; paths: Record<string, unknown> };
      expect(doc.openapi).toMatch(/^3\./);
      expect(Object.keys(doc.paths)).toEqual(expect.arrayContaining(['/api/v1/devices', '/api/v1/releases', '/api/v1/rollouts', '/api/v1/rollouts/{id}/pause']));
      const audit = await fleet.audit();
      const actions = audit.map((e) => e.action);
      for (const a of ['device.register', 'release.upload', 'rollout.create', 'rollout.start', 'rollout.wave', 'rollout.paused', 'rollout.resume', 'rollout.finished', 'rollout.cancel', 'tenant.gateway-token']) {
        expect(actions, a).toContain(a);
      }
      expect(audit.find((e) => e.action === 'device.register')?.actor).toMatch(/^admin@/);
      const m = await fleet.metrics();
      expect(m).toMatch(/^lamadist_devices\{status="online"\} [1-9]/m);
      expect(m).toMatch(/^lamadist_actions\{state="rolled_back"\} 1$/m);
      expect(m).toMatch(/^lamadist_uploads_total\{result="refused"\} [1-9]/m);
      // Devices streamed artifacts above: the block cache holds memory, and says how much.
      expect(m).toMatch(/^lamadist_artifact_cache_bytes [1-9][0-9]*$/m);
      expect((await fetch(`${server.url}/metrics`)).status).toBe(401);
      expect((await fetch(`${server.url}/api/v1/devices`, { headers: { Authorization: 'Bearer wrong' } })).status).toBe(401);
    });

    it('re-evaluates running rollouts at start-up (a wave decision lost in a crash is taken then)', async () => {
      const v1 = (await fleet.listReleases()).find((x) => x.version === '1.0.0');
      const r = await fleet.createRollout({ releaseId: v1?.id ?? 0, filter: { devices: ['node-a', 'node-b'] }, waves: [{ count: 1 }] });
      expect(r.progress.map((w) => w.states)).toEqual([{ pending: 1 }, { scheduled: 1 }]);
      // As if the device's success was committed and the server died before deciding the wave.
      await server.service.db.updateTable('actions').set({ state: 'success' }).where('rollout_id', '=', r.id).where('wave', '=', 0).execute();
      expect((await fleet.getRollout(r.id)).currentWave).toBe(0);
      await server.service.recoverRollouts();
      const after = await fleet.getRollout(r.id);
      expect(after.currentWave).toBe(1);
      expect(after.progress[1]?.states).toEqual({ pending: 1 });
      await fleet.rolloutOp(r.id, 'cancel');
    });
  });
}
