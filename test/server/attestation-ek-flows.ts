import { randomBytes } from 'node:crypto';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createAk, manufactureSwtpm, quote, startSwtpm, type Swtpm } from '../../src/fuzz/swtpm.js';
import { keyPath } from '../../src/keys/index.js';
import { startServer, type RunningServer } from '../../src/server/index.js';
import { attestationRelease, bootSwtpm, MID, type AttestationRelease } from '../attestation/boot.js';
import { activateOnTpm, credentialFile, readEkCert } from '../attestation/ek-tpm.js';

type Db = () => Promise<{ url: string; drop: () => Promise<void> }>;
interface Challenge {
  akName: string;
  challenge: { credentialBlob: string; encryptedSecret: string; expiresAt: string };
}
interface View {
  state: string;
  reason: string;
  ek: { issuer: string; serial: string; tpm: Record<string, string>; bound: boolean } | null;
}

/**
 * Attestation keys bound to a certified EK (`--ek-ca`): a software TPM manufactured by swtpm_setup
 * with EK certificates from a local CA, credential activation by tpm2_activatecredential, one
 * database per server.
 */
export function ekBindingFlows(label: string, db: Db): void {
  let dir: string;
  let release: AttestationRelease;
  let tpm: Swtpm;
  let caBundle: string;
  let ekCert: Buffer;
  /** EK public and certificate of a TPM whose CA the server does not trust. */
  let foreign: { ekPublic: Buffer; ekCert: Buffer };
  const drops: (() => Promise<void>)[] = [];
  const servers: RunningServer[] = [];

  async function server(ekCa: boolean): Promise<{ app: RunningServer['app']; tokens: Record<string, string> }> {
    const database = await db();
    drops.push(database.drop);
    const s = await startServer({
      db: database.url,
      store: path.join(dir, `store-${servers.length}`),
      listen: '127.0.0.1:0',
      keyring: await keyPath(release.keys, 'rauc-ca-cert'),
      keys: release.keys,
      adminToken: 'admin-token',
      ...(ekCa && { ekCa: caBundle }),
    });
    servers.push(s);
    const admin = { authorization: 'Bearer admin-token' };
    const up = await s.app.inject({ method: 'POST', url: '/api/v1/releases', headers: { ...admin, 'content-type': 'application/octet-stream' }, payload: await fs.readFile(release.bundle) });
    expect(up.statusCode, up.body).toBe(201);
    const tokens: Record<string, string> = {};
    for (const id of ['dev1', 'dev2', 'dev3']) {
      tokens[id] = (await s.app.inject({ method: 'POST', url: '/api/v1/devices', headers: admin, payload: { controllerId: id, bsp: 'x86_64' } })).json<{ token: string }>().token;
      await s.app.inject({ method: 'PUT', url: `/DEFAULT/controller/v1/${id}/configData`, headers: { authorization: `TargetToken ${tokens[id]}` }, payload: { mode: 'merge', data: { version: '2.0' } } });
    }
    return { app: s.app, tokens };
  }

  beforeAll(async () => {
    dir = await fs.mkdtemp(path.join(os.tmpdir(), 'lamadist-attest-ek-'));
    release = await attestationRelease(dir);
    ({ caBundle } = await manufactureSwtpm(path.join(dir, 'tpm'), path.join(dir, 'ca')));
    await manufactureSwtpm(path.join(dir, 'foreign-tpm'), path.join(dir, 'foreign-ca'));
    const other = await startSwtpm(path.join(dir, 'foreign-tpm'));
    try {
      await other.tool('tpm2_createek', ['-c', path.join(dir, 'foreign-ek.ctx'), '-G', 'rsa', '-u', path.join(dir, 'foreign-ek.pub')]);
      foreign = { ekPublic: await fs.readFile(path.join(dir, 'foreign-ek.pub')), ekCert: await readEkCert(other, 'rsa', dir) };
    } finally {
      await other.close();
    }
    tpm = await startSwtpm(path.join(dir, 'tpm'));
    ekCert = await readEkCert(tpm, 'rsa', dir);
  }, 240_000);

  afterAll(async () => {
    await tpm?.close();
    for (const s of servers) await s.close();
    for (const d of drops) await d();
    await fs.rm(dir, { recursive: true, force: true });
  });

  describe(`attestation keys bound to a certified EK (--ek-ca, ${label})`, () => {
    let s: Awaited<ReturnType<typeof server>>;
    const post = (device: string, rest: string, json?: object) =>
      s.app.inject({ method: 'POST', url: `/DEFAULT/controller/v1/${device}/attestation${rest}`, headers: { authorization: `TargetToken ${s.tokens[device]}` }, ...(json && { payload: json }) });
    const view = async (device: string): Promise<View> =>
      (await s.app.inject({ method: 'GET', url: `/api/v1/devices/${device}`, headers: { authorization: 'Bearer admin-token' } })).json<{ attestation: View }>().attestation;
    const keyBody = (ak: { public: Buffer; ekPublic: Buffer }, cert: Buffer = ekCert) => ({
      akPublic: ak.public.toString('base64'),
      machineId: MID,
      ekPublic: ak.ekPublic.toString('base64'),
      ekCertificate: cert.toString('base64'),
    });
    /** What the device's TPM recovers from a challenge. */
    const recover = (c: Challenge, ak: string): Promise<Buffer> =>
      activateOnTpm(tpm, dir, 'rsa', ak, credentialFile({ credentialBlob: Buffer.from(c.challenge.credentialBlob, 'base64'), encryptedSecret: Buffer.from(c.challenge.encryptedSecret, 'base64') }));

    beforeAll(async () => {
      s = await server(true);
    }, 120_000);

    it('a certified EK gets a challenge; the TPM\'s answer pins the key, bound to the EK, and the device is attested', async () => {
      const ak = await createAk(tpm, dir, 'ecdsa', 0x81010060, 'rsa');
      const r = await post('dev1', '/key', keyBody(ak));
      expect(r.statusCode, r.body).toBe(202);
      const c = r.json<Challenge>();
      expect(c.akName).toBe(`000b${ak.name.subarray(2).toString('hex')}`);
      const early = await post('dev1', '/nonce');
      expect([early.statusCode, early.json<{ error: string }>().error]).toEqual([409, 'LAMA_E_ATTEST_NO_KEY']);
      const secret = await recover(c, ak.context);
      const done = await post('dev1', '/key/activate', { secret: secret.toString('base64') });
      expect([done.statusCode, done.json()]).toEqual([201, { akName: c.akName, created: true }]);
      // The answer is used up: the same answer again is refused (and recorded).
      const replay = await post('dev1', '/key/activate', { secret: secret.toString('base64') });
      expect([replay.statusCode, replay.json<{ error: string }>().error]).toEqual([422, 'LAMA_E_ATTEST_ACTIVATION']);
      // Registering the bound key again needs no new challenge.
      const again = await post('dev1', '/key', keyBody(ak));
      expect([again.statusCode, again.json()]).toEqual([200, { akName: c.akName, created: false }]);

      const logs = await bootSwtpm(tpm, { esl: release.esl, image: release.uki });
      const n = await post('dev1', '/nonce');
      const q = await quote(tpm, dir, ak.context, Buffer.from(n.json<{ nonce: string }>().nonce, 'base64'), [7, 10, 11]);
      const verdict = await post('dev1', '/quote', {
        quote: q.quote.toString('base64'),
        signature: q.signature.toString('base64'),
        pcrs: Object.fromEntries(Object.entries(q.pcrs).map(([k, b]) => [k, b.toString('hex')])),
        imaLog: logs.imaLog.toString('base64'),
        eventLog: logs.eventLog.toString('base64'),
      });
      expect(verdict.json<{ state: string }>().state).toBe('attested');
      const v = await view('dev1');
      expect(v.state).toBe('attested');
      expect(v.ek).toMatchObject({ issuer: 'CN=swtpm-localca', tpm: { manufacturer: 'id:00001014', model: 'swtpm' }, bound: true });
    });

    it('a wrong answer, an answer to a replaced challenge and a replayed one are refused; the device stays unknown with the reason', async () => {
      const ak = await createAk(tpm, dir, 'ecdsa', 0x81010061, 'rsa');
      const first = (await post('dev2', '/key', keyBody(ak))).json<Challenge>();
      const wrong = await post('dev2', '/key/activate', { secret: randomBytes(32).toString('base64') });
      expect([wrong.statusCode, wrong.json<{ error: string }>().error]).toEqual([422, 'LAMA_E_ATTEST_ACTIVATION']);
      const v = await view('dev2');
      expect([v.state, v.reason]).toEqual(['unknown', 'attestation key refused: the secret is not the one the credential protected: the key is not in the TPM of the certified EK [LAMA_E_ATTEST_ACTIVATION]']);
      // The wrong answer used the challenge up: the right secret for it comes too late.
      const late = await post('dev2', '/key/activate', { secret: (await recover(first, ak.context)).toString('base64') });
      expect(late.json<{ message: string }>().message).toMatch(/^no outstanding credential challenge/);
      // One challenge per device: a new registration replaces the previous one.
      const second = (await post('dev2', '/key', keyBody(ak))).json<Challenge>();
      const third = (await post('dev2', '/key', keyBody(ak))).json<Challenge>();
      const stale = await post('dev2', '/key/activate', { secret: (await recover(second, ak.context)).toString('base64') });
      expect([stale.statusCode, stale.json<{ error: string }>().error]).toEqual([422, 'LAMA_E_ATTEST_ACTIVATION']);
      expect(await s.app.inject({ method: 'GET', url: '/metrics', headers: { authorization: 'Bearer admin-token' } }).then((m) => m.body)).toContain('lamadist_devices_attestation{state="unknown"} 2');
      const fourth = (await post('dev2', '/key', keyBody(ak))).json<Challenge>();
      expect(third.challenge.credentialBlob).not.toBe(fourth.challenge.credentialBlob);
      const ok = await post('dev2', '/key/activate', { secret: (await recover(fourth, ak.context)).toString('base64') });
      expect(ok.statusCode, ok.body).toBe(201);
      expect((await view('dev2')).reason).toBe('');
    });

    it('an EK certificate of another CA, one for another EK, or none at all is refused with its code', async () => {
      const ak = await createAk(tpm, dir, 'ecdsa', 0x81010062, 'rsa');
      const cases: [object, string][] = [
        [keyBody({ public: ak.public, ekPublic: foreign.ekPublic }, foreign.ekCert), 'LAMA_E_ATTEST_EK_CHAIN'],
        [keyBody({ public: ak.public, ekPublic: foreign.ekPublic }, ekCert), 'LAMA_E_ATTEST_EK_MISMATCH'],
        [{ akPublic: ak.public.toString('base64'), machineId: MID }, 'LAMA_E_ATTEST_EK_CERT'],
        [{ ...keyBody(ak), ekPublic: ak.public.toString('base64') }, 'LAMA_E_ATTEST_EK'],
      ];
      for (const [body, code] of cases) {
        const r = await post('dev3', '/key', body);
        expect([r.statusCode, r.json<{ error: string }>().error]).toEqual([422, code]);
        const v = await view('dev3');
        expect(v.state).toBe('unknown');
        expect(v.reason).toMatch(new RegExp(`^attestation key refused: .*\\[${code}\\]$`));
      }
      expect((await post('dev3', '/nonce')).statusCode).toBe(409);
    });
  });

  describe(`without --ek-ca (${label})`, () => {
    it('keys are pinned on first use as before; the EK certificate sent is kept for information', async () => {
      const s = await server(false);
      const ak = await createAk(tpm, dir, 'ecdsa', 0x81010063, 'rsa');
      const headers = { authorization: `TargetToken ${s.tokens.dev1}` };
      const r = await s.app.inject({
        method: 'POST',
        url: '/DEFAULT/controller/v1/dev1/attestation/key',
        headers,
        payload: { akPublic: ak.public.toString('base64'), machineId: MID, ekPublic: ak.ekPublic.toString('base64'), ekCertificate: foreign.ekCert.toString('base64') },
      });
      expect(r.statusCode, r.body).toBe(201);
      const v = (await s.app.inject({ method: 'GET', url: '/api/v1/devices/dev1', headers: { authorization: 'Bearer admin-token' } })).json<{ attestation: View }>().attestation;
      expect(v.ek).toMatchObject({ issuer: 'CN=swtpm-localca', bound: false });
      const nonce = await s.app.inject({ method: 'POST', url: '/DEFAULT/controller/v1/dev1/attestation/nonce', headers });
      expect(nonce.statusCode).toBe(200);
      const activate = await s.app.inject({ method: 'POST', url: '/DEFAULT/controller/v1/dev1/attestation/key/activate', headers, payload: { secret: randomBytes(32).toString('base64') } });
      expect(activate.json<{ error: string }>().error).toBe('LAMA_E_ATTEST_REQUEST');
    });
  });
}
