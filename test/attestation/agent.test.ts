import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createAk, manufactureSwtpm, startSwtpm, type Swtpm } from '../../src/fuzz/swtpm.js';
import { keyPath } from '../../src/keys/index.js';
import { hawkbitConf, type DdiProvisioning } from '../../src/provision/index.js';
import { startServer, type RunningServer } from '../../src/server/index.js';
import { run, type RunResult } from '../../src/util/proc.js';
import { REPO_ROOT } from '../helpers/cli.js';
import { attestationRelease, bootSwtpm, MID, type AttestationRelease } from './boot.js';

const AGENT = path.join(REPO_ROOT, 'meta-lamadist/recipes-core/lamadist-attest/files/lamadist-attest');

/**
 * The device's attestation agent (meta-lamadist's lamadist-attest, a POSIX shell script) run on
 * this host as the device runs it: against a software TPM booted the way a release's UKI leaves
 * it, and a real update server over HTTP, under the shells a device may have.
 */
describe('lamadist-attest, the device side of attestation', () => {
  let dir: string;
  let release: AttestationRelease;
  let server: RunningServer;
  let tpm: Swtpm;
  /** A TPM with an EK certificate (swtpm_setup, swtpm_localca), and a server trusting its CA. */
  let certified: Swtpm;
  let ekServer: RunningServer;
  const tokens: Record<string, string> = {};

  const admin = (method: 'GET' | 'POST' | 'PUT', url: string, json?: object, auth = 'Bearer admin-token', on: RunningServer = server) =>
    on.app.inject({ method, url, headers: { authorization: auth }, ...(json && { payload: json }) });
  const attestation = async (id: string, on: RunningServer = server) =>
    (await admin('GET', `/api/v1/devices/${id}`, undefined, undefined, on)).json<{
      attestation: { state: string; reason: string; akName: string | null; checkedAt: string | null; requestedAt: string | null; ek: { bound: boolean } | null };
    }>().attestation;

  /** Boot the software TPM (`on`, default the one without EK certificates) into `secureBoot` state and write the logs where the agent reads them. */
  async function boot(secureBoot = 1, on: Swtpm = tpm): Promise<void> {
    const logs = await bootSwtpm(on, { esl: release.esl, image: release.uki, secureBoot });
    await fs.writeFile(path.join(dir, 'binary_bios_measurements'), logs.eventLog);
    await fs.writeFile(path.join(dir, 'binary_runtime_measurements'), logs.imaLog);
  }

  /** Run the agent under `shell` for `device` with `flags`, its configuration as provisioning writes it (on `on`'s server and TPM). */
  async function agent(
    shell: readonly string[],
    device: string,
    ddi: Partial<DdiProvisioning> = {},
    on: { server: RunningServer; tpm: Swtpm } = { server, tpm },
    flags: readonly string[] = [],
  ): Promise<RunResult> {
    const conf = path.join(dir, `${device}.conf`);
    await fs.writeFile(conf, hawkbitConf({ server: `127.0.0.1:${on.server.port}`, tenant: 'DEFAULT', controllerId: device, token: tokens[device] as string, ...ddi }), { mode: 0o600 });
    const [cmd, ...args] = shell;
    return run(cmd as string, [...args, AGENT, ...flags], {
      allowFailure: true,
      timeoutMs: 60_000,
      env: {
        ...process.env,
        TPM2TOOLS_TCTI: on.tpm.tcti,
        LAMADIST_ATTEST_CONF: conf,
        LAMADIST_ATTEST_STATE: path.join(dir, `state-${device}`),
        LAMADIST_ATTEST_MACHINE_ID: path.join(dir, 'machine-id'),
        LAMADIST_ATTEST_IMA: path.join(dir, 'binary_runtime_measurements'),
        LAMADIST_ATTEST_EVENTLOG: path.join(dir, 'binary_bios_measurements'),
      },
    });
  }

  beforeAll(async () => {
    dir = await fs.mkdtemp(path.join(os.tmpdir(), 'lamadist-attest-agent-'));
    release = await attestationRelease(dir);
    const { caBundle } = await manufactureSwtpm(path.join(dir, 'certified-tpm'), path.join(dir, 'ek-ca'));
    const start = async (o: { store: string; ekCa?: string }, devices: string[]): Promise<RunningServer> => {
      const s = await startServer({ db: 'sqlite::memory:', listen: '127.0.0.1:0', keyring: await keyPath(release.keys, 'rauc-ca-cert'), keys: release.keys, adminToken: 'admin-token', ...o });
      const up = await s.app.inject({ method: 'POST', url: '/api/v1/releases', headers: { authorization: 'Bearer admin-token', 'content-type': 'application/octet-stream' }, payload: await fs.readFile(release.bundle) });
      expect(up.statusCode, up.body).toBe(201);
      for (const id of devices) {
        tokens[id] = (await admin('POST', '/api/v1/devices', { controllerId: id, bsp: 'x86_64' }, undefined, s)).json<{ token: string }>().token;
        // What the update client reports at boot: the release the device runs.
        const c = await admin('PUT', `/DEFAULT/controller/v1/${id}/configData`, { mode: 'merge', data: { version: '2.0' } }, `TargetToken ${tokens[id]}`, s);
        expect(c.statusCode).toBe(200);
      }
      return s;
    };
    server = await start({ store: path.join(dir, 'store') }, ['dev1', 'dev2']);
    ekServer = await start({ store: path.join(dir, 'store-ek'), ekCa: caBundle }, ['dev3', 'dev4']);
    await fs.writeFile(path.join(dir, 'machine-id'), `${MID}\n`);
    tpm = await startSwtpm(path.join(dir, 'tpm'));
    certified = await startSwtpm(path.join(dir, 'certified-tpm'));
  }, 240_000);

  afterAll(async () => {
    await tpm?.close();
    await certified?.close();
    await server?.close();
    await ekServer?.close();
    await fs.rm(dir, { recursive: true, force: true });
  });

  it('first run (dash): creates the key, the server pins it, and the device is attested', async () => {
    await boot();
    const r = await agent(['dash'], 'dev1');
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    const att = await attestation('dev1');
    expect(att.state).toBe('attested');
    expect(r.stdout).toBe(
      [`lamadist-attest: created an attestation key in ${path.join(dir, 'state-dev1')}`, `lamadist-attest: attestation key ${att.akName} pinned for dev1`, 'lamadist-attest: attested (PCRs 7, 10, 11)', ''].join('\n'),
    );
    const state = path.join(dir, 'state-dev1');
    expect((await fs.stat(state)).mode & 0o777).toBe(0o700);
    expect((await fs.readdir(state)).sort()).toEqual(['ak.priv', 'ak.pub', 'ek.alg']);
    // This TPM has no EK certificate: the agent keeps the default ECC EK.
    expect(await fs.readFile(path.join(state, 'ek.alg'), 'utf8')).toBe('ecc\n');
    for (const f of ['ak.priv', 'ak.pub', 'ek.alg']) expect((await fs.stat(path.join(state, f))).mode & 0o777).toBe(0o600);
  });

  it('a later run (busybox sh, after a reboot) loads the same key and attests again', async () => {
    const state = path.join(dir, 'state-dev1');
    const before = { pub: await fs.readFile(path.join(state, 'ak.pub')), priv: await fs.readFile(path.join(state, 'ak.priv')), att: await attestation('dev1') };
    await boot();
    const r = await agent(['busybox', 'sh'], 'dev1');
    expect([r.code, r.stdout, r.stderr]).toEqual([0, 'lamadist-attest: attested (PCRs 7, 10, 11)\n', '']);
    expect(await fs.readFile(path.join(state, 'ak.pub'))).toEqual(before.pub);
    expect(await fs.readFile(path.join(state, 'ak.priv'))).toEqual(before.priv);
    const att = await attestation('dev1');
    expect([att.state, att.akName]).toEqual(['attested', before.att.akName]);
    expect(att.checkedAt).not.toBe(before.att.checkedAt);
  });

  it('a quote the server judges failed (Secure Boot off, bash --posix) exits 3 with the PCR and why on one line', async () => {
    await boot(0);
    const r = await agent(['bash', '--posix'], 'dev1');
    expect([r.code, r.stdout]).toEqual([3, '']);
    expect(r.stderr).toBe('lamadist-attest: the server judged this device failed: PCR 7: SecureBoot is 00, not 01: Secure Boot is not enforcing\n');
    expect((await attestation('dev1')).state).toBe('failed');
  });

  it('another key already pinned (409), reached with a GatewayToken: one line, the device stays as it was', async () => {
    const other = await createAk(tpm, path.join(dir, 'tpm'), 'ecdsa', 0x81010040);
    const pin = await admin('POST', '/DEFAULT/controller/v1/dev2/attestation/key', { akPublic: other.public.toString('base64'), machineId: MID }, `TargetToken ${tokens.dev2}`);
    expect(pin.statusCode).toBe(201);
    const gateway = (await admin('POST', '/api/v1/tenants/DEFAULT/gateway-token')).json<{ token: string }>().token;
    await boot();
    const r = await agent(['dash'], 'dev2', { token: gateway, tokenKind: 'gateway' });
    expect(r.code).toBe(1);
    expect(r.stdout).toBe(`lamadist-attest: created an attestation key in ${path.join(dir, 'state-dev2')}\n`);
    expect(r.stderr).toMatch(/^lamadist-attest: attestation key refused by the server: HTTP 409: device already pinned attestation key 000b[0-9a-f]{64} for machine-id c0ffee0{26}; an operator must release it first \[LAMA_E_ATTEST_AK_PINNED\]\n$/);
    expect(r.stderr).not.toContain(gateway);
    expect((await attestation('dev2')).state).toBe('unknown');
  });

  it('a wrong token and an unreachable server: one line each, the token never printed', async () => {
    const bad = await agent(['dash'], 'dev1', { token: 'not-the-token-0123456789' });
    expect(bad.code).toBe(1);
    expect(bad.stderr).toBe('lamadist-attest: attestation key refused by the server: HTTP 401: missing or invalid device credentials\n');
    expect(`${bad.stdout}${bad.stderr}`).not.toContain('not-the-token-0123456789');
    const down = await agent(['dash'], 'dev1', { server: '127.0.0.1:1' });
    expect(down.code).toBe(1);
    expect(down.stderr).toMatch(/^lamadist-attest: cannot reach http:\/\/127\.0\.0\.1:1\/DEFAULT\/controller\/v1\/dev1\/attestation\/key: curl: \(7\) [^\n]*\n$/);
    expect(`${down.stdout}${down.stderr}`).not.toContain(tokens.dev1);
  });

  describe('--if-asked: the every-minute check for an operator\'s request', () => {
    const ifAsked = (shell: readonly string[], ddi: Partial<DdiProvisioning> = {}): Promise<RunResult> => agent(shell, 'dev1', ddi, undefined, ['--if-asked']);
    const quotes = (): number => server.service.counters.quotesAttested + server.service.counters.quotesFailed;

    for (const shell of [['dash'], ['busybox', 'sh'], ['bash', '--posix']]) {
      it(`${shell.join(' ')}: quotes nothing when not asked, attests when asked, and then is quiet again`, async () => {
        await boot();
        const before = { quotes: quotes(), checkedAt: (await attestation('dev1')).checkedAt };
        const idle = await ifAsked(shell);
        expect([idle.code, idle.stdout, idle.stderr]).toEqual([0, '', '']);
        expect(quotes()).toBe(before.quotes);
        expect((await attestation('dev1')).checkedAt).toBe(before.checkedAt);
        const ask = await admin('POST', '/api/v1/devices/dev1/attestation/request');
        expect(ask.statusCode, ask.body).toBe(202);
        expect((await attestation('dev1')).requestedAt).toBe(ask.json<{ requestedAt: string }>().requestedAt);
        const asked = await ifAsked(shell);
        expect([asked.code, asked.stdout, asked.stderr]).toEqual([0, 'lamadist-attest: the server asks for a fresh quote\nlamadist-attest: attested (PCRs 7, 10, 11)\n', '']);
        expect(quotes()).toBe(before.quotes + 1);
        const att = await attestation('dev1');
        expect([att.state, att.requestedAt]).toEqual(['attested', null]);
        expect(att.checkedAt).not.toBe(before.checkedAt);
        const again = await ifAsked(shell);
        expect([again.code, again.stdout, again.stderr]).toEqual([0, '', '']);
        expect(quotes()).toBe(before.quotes + 1);
      });
    }

    it('one run at a time: a run that finds the state directory locked leaves the quote to the other', async () => {
      await admin('POST', '/api/v1/devices/dev1/attestation/request');
      const before = quotes();
      // flock holds the lock a run in progress would hold, for as long as the agent it starts runs.
      for (const flags of [['--if-asked'], []]) {
        const r = await agent(['flock', path.join(dir, 'state-dev1'), 'dash'], 'dev1', {}, undefined, flags);
        expect([r.code, r.stdout, r.stderr]).toEqual([0, 'lamadist-attest: the server asks for a fresh quote\n'.repeat(flags.length) + 'lamadist-attest: another run is quoting; leaving it to that one\n', '']);
      }
      expect(quotes()).toBe(before);
      const r = await ifAsked(['dash']);
      expect([r.code, r.stderr]).toEqual([0, '']);
      expect(quotes()).toBe(before + 1);
    });

    it('a wrong token: one line, the token never printed; an unknown flag is refused', async () => {
      const bad = await ifAsked(['dash'], { token: 'not-the-token-0123456789' });
      expect([bad.code, bad.stdout, bad.stderr]).toEqual([1, '', 'lamadist-attest: poll refused by the server: HTTP 401: missing or invalid device credentials\n']);
      const flag = await agent(['dash'], 'dev1', {}, undefined, ['--if-askd']);
      expect([flag.code, flag.stdout, flag.stderr]).toEqual([1, '', 'lamadist-attest: usage: lamadist-attest [--if-asked]\n']);
    });
  });

  describe('with a server that trusts EK CAs (--ek-ca)', () => {
    const on = (): { server: RunningServer; tpm: Swtpm } => ({ server: ekServer, tpm: certified });

    it('first run (dash): the key is made under the certified RSA EK, bound by credential activation, and the device is attested', async () => {
      await boot(1, certified);
      const r = await agent(['dash'], 'dev3', {}, on());
      expect(r.stderr).toBe('');
      expect(r.code).toBe(0);
      const att = await attestation('dev3', ekServer);
      expect([att.state, att.ek?.bound]).toEqual(['attested', true]);
      expect(r.stdout).toBe(
        [
          `lamadist-attest: created an attestation key in ${path.join(dir, 'state-dev3')}`,
          `lamadist-attest: attestation key ${att.akName} pinned for dev3, bound to the certified EK`,
          'lamadist-attest: attested (PCRs 7, 10, 11)',
          '',
        ].join('\n'),
      );
      // swtpm certifies its RSA EK only (its ECC certificate is for a P-384 EK): the agent chose RSA.
      expect(await fs.readFile(path.join(dir, 'state-dev3', 'ek.alg'), 'utf8')).toBe('rsa\n');
    });

    it('a later run (busybox sh, after a reboot) needs no new challenge and attests again', async () => {
      await boot(1, certified);
      const r = await agent(['busybox', 'sh'], 'dev3', {}, on());
      expect([r.code, r.stdout, r.stderr]).toEqual([0, 'lamadist-attest: attested (PCRs 7, 10, 11)\n', '']);
    });

    it('a TPM without an EK certificate (bash --posix) is refused in one line and stays unknown with the reason', async () => {
      await boot();
      const r = await agent(['bash', '--posix'], 'dev4', {}, { server: ekServer, tpm });
      expect(r.code).toBe(1);
      expect(r.stderr).toBe('lamadist-attest: attestation key refused by the server: HTTP 422: this server requires an EK certificate (--ek-ca) and the device sent none [LAMA_E_ATTEST_EK_CERT]\n');
      const att = await attestation('dev4', ekServer);
      expect([att.state, att.reason]).toEqual(['unknown', 'attestation key refused: this server requires an EK certificate (--ek-ca) and the device sent none [LAMA_E_ATTEST_EK_CERT]']);
    });
  });
});
