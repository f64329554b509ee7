import { promises as fs } from 'node:fs';
import https from 'node:https';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { FleetClient } from '../../src/fleet/index.js';
import { startServer, type RunningServer } from '../../src/server/index.js';
import { run } from '../../src/util/proc.js';
import { makePki } from './fixtures.js';

async function leaf(dir: string, name: string, cn: string, ca: { cert: string; key: string }, ext: string): Promise<{ cert: string; key: string }> {
  const o = (args: string[]) => run('openssl', args, { cwd: dir });
  await o(['req', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', `${name}.key`, '-out', `${name}.csr`, '-subj', `/CN=${cn}`]);
  await fs.writeFile(path.join(dir, `${name}.ext`), ext);
  await o(['x509', '-req', '-in', `${name}.csr`, '-CA', ca.cert, '-CAkey', ca.key, '-CAcreateserial', '-out', `${name}.pem`, '-days', '2', '-extfile', `${name}.ext`]);
  return { cert: path.join(dir, `${name}.pem`), key: path.join(dir, `${name}.key`) };
}

describe('HTTPS with device client certificates (mutual TLS)', () => {
  let dir: string;
  let server: RunningServer;
  let ca: { cert: string; key: string };
  let devCa: { cert: string; key: string };
  let rogueCa: { cert: string; key: string };
  const certs: Record<string, { cert: string; key: string }> = {};
  let token: string;

  beforeAll(async () => {
    dir = await fs.mkdtemp(path.join(os.tmpdir(), 'lamadist-mtls-'));
    const pki = await makePki(dir, 'bundles');
    const mkCa = async (name: string) => {
      const p = await makePki(dir, name);
      return { cert: p.caCert, key: path.join(path.dirname(p.caCert), 'ca.key') };
    };
    ca = await mkCa('tls');
    devCa = await mkCa('devices');
    rogueCa = await mkCa('rogue');
    const srv = await leaf(dir, 'server', 'localhost', ca, 'subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n');
    certs.good = await leaf(dir, 'good', 'tls-node', devCa, 'extendedKeyUsage=clientAuth\n');
    certs.other = await leaf(dir, 'other', 'another-node', devCa, 'extendedKeyUsage=clientAuth\n');
    certs.rogue = await leaf(dir, 'rogue', 'tls-node', rogueCa, 'extendedKeyUsage=clientAuth\n');
    server = await startServer({ store: path.join(dir, 'store'), listen: '127.0.0.1:0', keyring: pki.caCert, tlsCert: srv.cert, tlsKey: srv.key, clientCa: devCa.cert });
    const fleet = new FleetClient({ url: server.url, token: (await fs.readFile(server.adminTokenFile as string, 'utf8')).trim(), ca: await fs.readFile(ca.cert) });
    token = (await fleet.registerDevice({ controllerId: 'tls-node' })).token;
  });

  afterAll(async () => {
    await server?.close();
    await fs.rm(dir, { recursive: true, force: true });
  });

  const poll = async (o: { cert?: { cert: string; key: string }; token?: string }): Promise<number> => {
    const tlsCa = await fs.readFile(ca.cert);
    const client = o.cert ? { cert: await fs.readFile(o.cert.cert), key: await fs.readFile(o.cert.key) } : {};
    return new Promise((resolve, reject) => {
      const req = https.get(
        `${server.url}/DEFAULT/controller/v1/tls-node`,
        { ca: tlsCa, ...client, agent: false, headers: o.token ? { Authorization: `TargetToken ${o.token}` } : {} },
        (res) => {
          res.resume();
          res.on('end', () => resolve(res.statusCode ?? 0));
        },
      );
      req.on('error', reject);
    });
  };

  it('lets a device in by its certificate alone when the CN is its controller id', async () => {
    expect(server.url).toMatch(/^https:/);
    expect(await poll({ cert: certs.good })).toBe(200);
  });

  it('refuses a certificate for another controller id or from another CA, and no credentials at all', async () => {
    expect(await poll({ cert: certs.other })).toBe(401);
    expect(await poll({ cert: certs.rogue })).toBe(401);
    expect(await poll({})).toBe(401);
  });

  it('still accepts the TargetToken without a client certificate', async () => {
    expect(await poll({ token })).toBe(200);
    expect(await poll({ token: 'wrong' })).toBe(401);
  });
});
