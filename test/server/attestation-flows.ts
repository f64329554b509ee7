import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { predictPcr11Values } from '../../src/attestation/index.js';
import { createAk, quote, startSwtpm, type Swtpm } from '../../src/fuzz/swtpm.js';
import { keyPath, signingPair } from '../../src/keys/index.js';
import { signPe, stripSignature } from '../../src/secureboot/index.js';
import { startServer, type RunningServer } from '../../src/server/index.js';
import { setUkiCmdline } from '../../src/uki/index.js';
import { attestationRelease, bootSwtpm, MID, type SecureBootLists } from '../attestation/boot.js';

/**
 * The attestation extension end to end against one database: a real release, a software TPM that
 * boots what the test says, quotes made by tpm2_quote, everything through fastify.inject.
 */
export function attestationFlows(label: string, db: () => Promise<{ url: string; drop: () => Promise<void> }>): void {
  let drop: (() => Promise<void>) | undefined;
  let dir: string;
  let keys: string;
  let server: RunningServer;
  let tpm: Swtpm;
  let admin: string;
  let bundle: string;
  let uki: Buffer;
  let esl: SecureBootLists;
  const tokens: Record<string, string> = {};
  let ak: { context: string; public: Buffer };

  const inject = (method: 'GET' | 'POST' | 'PUT' | 'DELETE', url: string, o: { token?: string; device?: string; json?: unknown; body?: Buffer } = {}) =>
    server.app.inject({
      method,
      url,
      headers: {
        ...(o.token ? { authorization: `Bearer ${o.token}` } : {}),
        ...(o.device ? { authorization: `TargetToken ${tokens[o.device]}` } : {}),
        ...(o.body ? { 'content-type': 'application/octet-stream' } : {}),
      },
      ...(o.json !== undefined ? { payload: o.json as object } : {}),
      ...(o.body ? { payload: o.body } : {}),
    });
  const ddi = (device: string, rest = ''): string => `/DEFAULT/controller/v1/${device}${rest}`;

  /** Boot `image` on the software TPM (Secure Boot as given), ask for `device`'s nonce and quote. */
  async function bootAndQuote(o: { image: Buffer; secureBoot?: number }, device = 'dev1'): Promise<{ quote: string; signature: string; pcrs: Record<string, string>; imaLog: string; eventLog: string }> {
    const logs = await bootSwtpm(tpm, { esl, ...o });
    const n = await inject('POST', ddi(device, '/attestation/nonce'), { device });
    expect(n.statusCode, n.body).toBe(200);
    const q = await quote(tpm, dir, ak.context, Buffer.from(n.json<{ nonce: string }>().nonce, 'base64'), [7, 10, 11]);
    return {
      quote: q.quote.toString('base64'),
      signature: q.signature.toString('base64'),
      pcrs: Object.fromEntries(Object.entries(q.pcrs).map(([k, b]) => [k, b.toString('hex')])),
      imaLog: logs.imaLog.toString('base64'),
      eventLog: logs.eventLog.toString('base64'),
    };
  }

  beforeAll(async () => {
    dir = await fs.mkdtemp(path.join(os.tmpdir(), 'lamadist-attest-server-'));
    // A small but real release: EROFS root with its dm-verity tree, one host, both slots' UKIs.
    ({ keys, esl, bundle, uki } = await attestationRelease(dir));
    const database = await db();
    drop = database.drop;
    server = await startServer({ db: database.url, store: path.join(dir, 'store'), listen: '127.0.0.1:0', keyring: await keyPath(keys, 'rauc-ca-cert'), keys, adminToken: 'admin-token' });
    admin = 'admin-token';
    tpm = await startSwtpm(path.join(dir, 'tpm'));
    ak = await createAk(tpm, path.join(dir, 'tpm'), 'ecdsa', 0x81010030);
  }, 240_000);

  afterAll(async () => {
    await tpm?.close();
    await server?.close();
    await drop?.();
    await fs.rm(dir, { recursive: true, force: true });
  });

  describe(`attestation on the update server (DDI extension, ${label})`, () => {
    it('release upload stores the PCR 11 values of every host UKI per slot', async () => {
      const r = await inject('POST', '/api/v1/releases', { token: admin, body: await fs.readFile(bundle) });
      expect(r.statusCode, r.body).toBe(201);
      const rows = await server.service.db.selectFrom('release_pcr11').selectAll().orderBy('slot').execute();
      expect(rows.map((x) => [x.machine_id, x.slot])).toEqual([
        [MID, 'a'],
        [MID, 'b'],
      ]);
      expect(JSON.parse(rows[0]?.pcr11 as string)).toEqual(predictPcr11Values(uki));
      for (const id of ['dev1', 'dev2']) {
        const d = await inject('POST', '/api/v1/devices', { token: admin, json: { controllerId: id, bsp: 'x86_64' } });
        tokens[id] = d.json<{ token: string }>().token;
        expect(d.json<{ device: { attestation: { state: string } } }>().device.attestation.state).toBe('unknown');
        const c = await inject('PUT', ddi(id, '/configData'), { device: id, json: { mode: 'merge', data: { version: '2.0' } } });
        expect(c.statusCode).toBe(200);
      }
    });

    it('pins the attestation key on first use and refuses another one', async () => {
      const before = await inject('POST', ddi('dev1', '/attestation/nonce'), { device: 'dev1' });
      expect([before.statusCode, before.json<{ error: string }>().error]).toEqual([409, 'LAMA_E_ATTEST_NO_KEY']);
      const body = { akPublic: ak.public.toString('base64'), machineId: MID };
      const first = await inject('POST', ddi('dev1', '/attestation/key'), { device: 'dev1', json: body });
      expect(first.statusCode, first.body).toBe(201);
      expect((await inject('POST', ddi('dev1', '/attestation/key'), { device: 'dev1', json: body })).statusCode).toBe(200);
      const other = await createAk(tpm, path.join(dir, 'tpm'), 'rsassa', 0x81010031);
      const swap = await inject('POST', ddi('dev1', '/attestation/key'), { device: 'dev1', json: { ...body, akPublic: other.public.toString('base64') } });
      expect([swap.statusCode, swap.json<{ error: string }>().error]).toEqual([409, 'LAMA_E_ATTEST_AK_PINNED']);
      const noAuth = await server.app.inject({ method: 'POST', url: ddi('dev1', '/attestation/key'), payload: body });
      expect(noAuth.statusCode).toBe(401);
      // Another device's token does not reach dev1's attestation.
      const foreign = await server.app.inject({ method: 'POST', url: ddi('dev1', '/attestation/nonce'), headers: { authorization: `TargetToken ${tokens.dev2}` } });
      expect(foreign.statusCode).toBe(401);
    });

    it('a device booted from the release UKI with Secure Boot under the fleet keys is attested, in the API and /metrics', async () => {
      const evidence = await bootAndQuote({ image: uki });
      const r = await inject('POST', ddi('dev1', '/attestation/quote'), { device: 'dev1', json: evidence });
      expect(r.statusCode, r.body).toBe(200);
      expect(r.json<{ state: string }>().state).toBe('attested');
      const d = await inject('GET', '/api/v1/devices/dev1', { token: admin });
      const att = d.json<{ attestation: { state: string; reason: string; checkedAt: string; akName: string } }>().attestation;
      expect(att.state).toBe('attested');
      expect(att.reason).toBe('');
      expect(att.akName).toMatch(/^000b[0-9a-f]{64}$/);
      const m = await inject('GET', '/metrics', { token: admin });
      expect(m.body).toContain('lamadist_devices_attestation{state="attested"} 1');
      expect(m.body).toContain('lamadist_devices_attestation{state="unknown"} 1');
      // The same quote again: its nonce is used up.
      const replay = await inject('POST', ddi('dev1', '/attestation/quote'), { device: 'dev1', json: evidence });
      expect([replay.statusCode, replay.json<{ error: string }>().error]).toEqual([422, 'LAMA_E_ATTEST_NONCE']);
      const after = (await inject('GET', '/api/v1/devices/dev1', { token: admin })).json<{ attestation: { state: string; reason: string } }>().attestation;
      expect(after.state).toBe('failed');
      expect(after.reason).toMatch(/^quote refused: .*\[LAMA_E_ATTEST_NONCE\]$/);
    });

    it('a UKI signed with the fleet db key but another command line fails on PCR 11; Secure Boot off fails on PCR 7', async () => {
      const signed = signPe(setUkiCmdline(stripSignature(uki), 'console=ttyS0 init=/bin/sh'), await signingPair(keys, 'secureboot-db'));
      const wrong = await inject('POST', ddi('dev1', '/attestation/quote'), { device: 'dev1', json: await bootAndQuote({ image: signed }) });
      expect(wrong.statusCode, wrong.body).toBe(200);
      const v = wrong.json<{ state: string; checks: { pcr: number; ok: boolean; reason: string }[] }>();
      expect(v.state).toBe('failed');
      expect(v.checks.filter((c) => !c.ok).map((c) => c.pcr)).toEqual([11]);
      const reason = (await inject('GET', '/api/v1/devices/dev1', { token: admin })).json<{ attestation: { reason: string } }>().attestation.reason;
      expect(reason).toMatch(/^PCR 11: PCR 11 is [0-9a-f]{64}, which no UKI of the release the device runs leaves/);
      const off = await inject('POST', ddi('dev1', '/attestation/quote'), { device: 'dev1', json: await bootAndQuote({ image: uki, secureBoot: 0 }) });
      expect(off.json<{ checks: { pcr: number; ok: boolean; reason: string }[] }>().checks.filter((c) => !c.ok)).toEqual([
        { pcr: 7, ok: false, reason: 'SecureBoot is 00, not 01: Secure Boot is not enforcing' },
      ]);
    });

    it('--require-attestation offers the release only to attested devices; the others are held back, not failed', async () => {
      const good = await inject('POST', ddi('dev1', '/attestation/quote'), { device: 'dev1', json: await bootAndQuote({ image: uki }) });
      expect(good.json<{ state: string }>().state).toBe('attested');
      const r = await inject('POST', '/api/v1/rollouts', { token: admin, json: { releaseId: 1, requireAttestation: true } });
      expect(r.statusCode, r.body).toBe(201);
      const rollout = r.json<{ id: number; heldBack: string[]; requireAttestation: boolean; progress: { size: number; states: Record<string, number> }[] }>();
      expect(rollout.requireAttestation).toBe(true);
      expect(rollout.heldBack).toEqual(['dev2']);
      expect(rollout.progress).toEqual([{ wave: 0, size: 1, states: { pending: 1 } }]);
      const poll1 = (await inject('GET', ddi('dev1'), { device: 'dev1' })).json<{ _links: Record<string, unknown> }>();
      expect(Object.keys(poll1._links)).toContain('deploymentBase');
      const poll2 = (await inject('GET', ddi('dev2'), { device: 'dev2' })).json<{ _links: Record<string, unknown> }>();
      expect(Object.keys(poll2._links)).not.toContain('deploymentBase');
      await inject('POST', `/api/v1/rollouts/${rollout.id}/cancel`, { token: admin });
    });

    it('a device that fails attestation after the rollout was made is held back when its wave starts', async () => {
      const r = await inject('POST', '/api/v1/rollouts', { token: admin, json: { releaseId: 1, requireAttestation: true, start: false, filter: { devices: ['dev1'] } } });
      expect(r.json<{ heldBack: string[] }>().heldBack).toEqual([]);
      const id = r.json<{ id: number }>().id;
      const off = await inject('POST', ddi('dev1', '/attestation/quote'), { device: 'dev1', json: await bootAndQuote({ image: uki, secureBoot: 0 }) });
      expect(off.json<{ state: string }>().state).toBe('failed');
      const started = (await inject('POST', `/api/v1/rollouts/${id}/start`, { token: admin })).json<{ status: string; heldBack: string[]; progress: unknown[] }>();
      expect(started.heldBack).toEqual(['dev1']);
      expect(started.progress).toEqual([]);
      expect(started.status).toBe('finished');
      const poll = (await inject('GET', ddi('dev1'), { device: 'dev1' })).json<{ _links: Record<string, unknown> }>();
      expect(Object.keys(poll._links)).not.toContain('deploymentBase');
    });

    describe('an operator asks a device for a fresh quote', () => {
      type Poll = { config: unknown; _links: Record<string, { href: string }> };
      const poll = async (device: string): Promise<Poll> => {
        const r = await inject('GET', ddi(device), { device });
        expect(r.statusCode).toBe(200);
        return r.json<Poll>();
      };
      const requestedAt = async (device: string): Promise<string | null> =>
        (await inject('GET', `/api/v1/devices/${device}`, { token: admin })).json<{ attestation: { requestedAt: string | null } }>().attestation.requestedAt;
      const ask = async (device: string): Promise<string> => {
        const r = await inject('POST', `/api/v1/devices/${device}/attestation/request`, { token: admin });
        expect(r.statusCode, r.body).toBe(202);
        const body = r.json<{ tenant: string; controllerId: string; requestedAt: string }>();
        expect(body).toEqual({ tenant: 'DEFAULT', controllerId: device, requestedAt: expect.stringMatching(/^\d{4}-\d\d-\d\dT/) as unknown });
        return body.requestedAt;
      };
      /** A quote that proves nothing, sent with the nonce the device holds: judged failed. */
      const junk = { quote: Buffer.from('junk').toString('base64'), signature: '', pcrs: { 7: '0'.repeat(64), 10: '0'.repeat(64), 11: '0'.repeat(64) } };
      let unasked: Poll;

      it('the base poll names the link only while asked, and a quote with a later nonce answers the request', async () => {
        unasked = await poll('dev2');
        // Nothing asked: the answer a stock DDI client gets, with no LamaDist link.
        expect(unasked).toEqual({ config: { polling: { sleep: expect.stringMatching(/^\d\d:\d\d:\d\d$/) as unknown } }, _links: {} });
        expect(await requestedAt('dev2')).toBeNull();
        const key = await inject('POST', ddi('dev2', '/attestation/key'), { device: 'dev2', json: { akPublic: ak.public.toString('base64'), machineId: MID } });
        expect(key.statusCode, key.body).toBe(201);
        // A nonce taken before the request: a quote made with it does not answer the request.
        expect((await inject('POST', ddi('dev2', '/attestation/nonce'), { device: 'dev2' })).statusCode).toBe(200);
        // Times are milliseconds and a nonce of the request's millisecond counts as after it.
        await sleep(2);
        const at = await ask('dev2');
        expect(await requestedAt('dev2')).toBe(at);
        expect(await poll('dev2')).toEqual({ ...unasked, _links: { lamadistAttestation: { href: 'http://localhost:80/DEFAULT/controller/v1/dev2/attestation/nonce' } } });
        expect((await poll('dev1'))._links).not.toHaveProperty('lamadistAttestation');
        const stale = await inject('POST', ddi('dev2', '/attestation/quote'), { device: 'dev2', json: junk });
        expect(stale.statusCode).toBe(422);
        expect(await requestedAt('dev2')).toBe(at);
        expect((await poll('dev2'))._links).toHaveProperty('lamadistAttestation');
        const fresh = await inject('POST', ddi('dev2', '/attestation/quote'), { device: 'dev2', json: await bootAndQuote({ image: uki }, 'dev2') });
        expect(fresh.json<{ state: string }>().state).toBe('attested');
        expect(await requestedAt('dev2')).toBeNull();
        expect(await poll('dev2')).toEqual(unasked);
        const audit = (await inject('GET', '/api/v1/audit', { token: admin })).json<{ actor: string; action: string; target: string }[]>();
        expect(audit.find((e) => e.action === 'attestation.request')).toMatchObject({ actor: expect.stringMatching(/^admin@/) as unknown, target: 'DEFAULT/dev2' });
      });

      it('a failed verdict answers it too; asking again moves the time forward; only the admin token asks, and only a registered device', async () => {
        const first = await ask('dev2');
        const again = await ask('dev2');
        expect(again >= first).toBe(true);
        expect(await requestedAt('dev2')).toBe(again);
        expect((await inject('POST', ddi('dev2', '/attestation/nonce'), { device: 'dev2' })).statusCode).toBe(200);
        const refused = await inject('POST', ddi('dev2', '/attestation/quote'), { device: 'dev2', json: junk });
        expect(refused.statusCode).toBe(422);
        expect((await inject('GET', '/api/v1/devices/dev2', { token: admin })).json<{ attestation: { state: string; requestedAt: string | null } }>().attestation).toMatchObject({ state: 'failed', requestedAt: null });
        expect(await poll('dev2')).toEqual(unasked);
        for (const auth of [{}, { device: 'dev2' }, { token: 'not-the-admin-token' }]) {
          const r = await inject('POST', '/api/v1/devices/dev2/attestation/request', auth);
          expect([r.statusCode, r.json<{ error: string }>().error]).toEqual([401, 'LAMA_E_SERVER_UNAUTHORIZED']);
        }
        expect(await requestedAt('dev2')).toBeNull();
        for (const url of ['/api/v1/devices/nope/attestation/request', '/api/v1/devices/dev2/attestation/request?tenant=other']) {
          const r = await inject('POST', url, { token: admin });
          expect([r.statusCode, r.json<{ error: string }>().error]).toEqual([404, 'LAMA_E_SERVER_NOT_FOUND']);
        }
      });
    });

    it('an operator releases a pinned key; the device then registers its new one', async () => {
      const del = await inject('DELETE', '/api/v1/devices/dev1/attestation-key', { token: admin });
      expect(del.statusCode).toBe(204);
      expect((await inject('GET', '/api/v1/devices/dev1', { token: admin })).json<{ attestation: { state: string } }>().attestation.state).toBe('unknown');
      const other = await createAk(tpm, path.join(dir, 'tpm'), 'rsapss', 0x81010032);
      const r = await inject('POST', ddi('dev1', '/attestation/key'), { device: 'dev1', json: { akPublic: other.public.toString('base64'), machineId: MID } });
      expect(r.statusCode).toBe(201);
    });
  });
}
