import { promises as fs } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startServer, type RunningServer } from '../../src/server/index.js';
import { makeBundle, makePki } from './fixtures.js';

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/**
 * One request over a real socket, its body written in `pieces` with `gapMs` between them (and an
 * extra `stallMs` before the second half), as a slow link would. Resolves with the status line's
 * code (0 when the server closed without answering) once the server closes or answers in full.
 */
async function slowRequest(
  port: number,
  head: string,
  body: Buffer,
  o: { pieces: number; gapMs: number; stallMs?: number },
): Promise<{ status: number; body: string; seconds: number }> {
  const started = Date.now();
  const sock = net.connect(port, '127.0.0.1');
  let answer = '';
  sock.on('data', (c: Buffer) => (answer += c.toString('latin1')));
  // The server may close while the body is still being written.
  sock.on('error', () => undefined);
  const closed = new Promise<void>((r) => sock.once('close', () => r()));
  await new Promise<void>((r) => sock.once('connect', () => r()));
  sock.write(`${head}Content-Length: ${body.length}\r\nConnection: close\r\n\r\n`);
  const step = Math.ceil(body.length / o.pieces);
  let writing = true;
  void closed.then(() => (writing = false));
  for (let i = 0; i < o.pieces && writing; i++) {
    if (o.stallMs && i === Math.floor(o.pieces / 2)) await sleep(o.stallMs);
    sock.write(body.subarray(i * step, (i + 1) * step));
    await sleep(o.gapMs);
  }
  await Promise.race([closed, sleep(30_000)]);
  sock.destroy();
  const status = Number(/^HTTP\/1\.1 (\d{3})/.exec(answer)?.[1] ?? 0);
  return { status, body: answer.split('\r\n\r\n').slice(1).join('\r\n\r\n'), seconds: (Date.now() - started) / 1000 };
}

describe('request timeouts: uploads run while data arrives, everything else has a limit', () => {
  let dir: string;
  let server: RunningServer;
  let auth: string;
  let bundle: Buffer;
  const limitMs = 1000;

  beforeAll(async () => {
    dir = await fs.mkdtemp(path.join(os.tmpdir(), 'lamadist-timeouts-'));
    const pki = await makePki(dir, 'fleet');
    bundle = await fs.readFile(await makeBundle(dir, { pki, compatible: 'lamadist-x86-64', version: '3.0.0' }));
    server = await startServer({
      db: 'sqlite::memory:',
      store: path.join(dir, 'store'),
      listen: '127.0.0.1:0',
      keyring: pki.caCert,
      requestTimeoutMs: limitMs,
      uploadIdleTimeoutMs: limitMs,
    });
    auth = `Authorization: Bearer ${(await fs.readFile(server.adminTokenFile as string, 'utf8')).trim()}\r\n`;
  });

  afterAll(async () => {
    await server?.close();
    await fs.rm(dir, { recursive: true, force: true });
  });

  it('accepts a bundle upload that takes three times the request limit while bytes keep coming', async () => {
    const r = await slowRequest(server.port, `POST /api/v1/releases HTTP/1.1\r\nHost: x\r\n${auth}Content-Type: application/octet-stream\r\n`, bundle, { pieces: 12, gapMs: 250 });
    expect(r.seconds).toBeGreaterThan((3 * limitMs) / 1000);
    expect(r.status, r.body).toBe(201);
    expect(JSON.parse(r.body)).toMatchObject({ created: true, release: { version: '3.0.0', size: bundle.length } });
  });

  it('cuts an upload off with 408 once no byte arrived for the idle limit, and keeps nothing of it', async () => {
    const other = Buffer.concat([bundle, Buffer.alloc(1)]);
    const r = await slowRequest(server.port, `POST /api/v1/releases HTTP/1.1\r\nHost: x\r\n${auth}Content-Type: application/octet-stream\r\n`, other, { pieces: 4, gapMs: 100, stallMs: 2.5 * limitMs });
    expect(r.status).toBe(408);
    expect(r.seconds).toBeLessThan((2.5 * limitMs) / 1000 + 1);
    const tmp = path.join(dir, 'store', 'tmp');
    for (let i = 0; i < 20 && (await fs.readdir(tmp)).length > 0; i++) await sleep(100);
    expect(await fs.readdir(tmp)).toEqual([]);
  });

  it('keeps the request limit for every other body', async () => {
    const json = Buffer.from(JSON.stringify({ controllerId: 'slow-1', name: 'x'.repeat(2000) }));
    const r = await slowRequest(server.port, `POST /api/v1/devices HTTP/1.1\r\nHost: x\r\n${auth}Content-Type: application/json\r\n`, json, { pieces: 10, gapMs: 300 });
    expect(r.status).toBe(408);
    expect(r.seconds).toBeLessThan(3 * (limitMs / 1000));
    const fast = await slowRequest(server.port, `POST /api/v1/devices HTTP/1.1\r\nHost: x\r\n${auth}Content-Type: application/json\r\n`, json, { pieces: 2, gapMs: 100 });
    expect(fast.status, fast.body).toBe(201);
  });
});
