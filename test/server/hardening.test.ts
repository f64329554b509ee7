import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { LightMyRequestResponse } from 'fastify';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startServer, type RunningServer } from '../../src/server/index.js';
import { ATTRIBUTE_LIMITS } from '../../src/server/service.js';
import { makeBundle, makePki } from './fixtures.js';

/**
 * Bad input found in a review (issue 14 C): each answer must be a 4xx with the project's error
 * body, never a 500 and never unbounded growth.
 */
describe('update server refuses bad input with 4xx', () => {
  let dir: string;
  let server: RunningServer;
  let admin: string;
  let releaseId: number;
  const tokens: Record<string, string> = {};

  const api = (method: 'GET' | 'POST' | 'PUT' | 'PATCH', url: string, payload?: unknown): Promise<LightMyRequestResponse> =>
    server.app.inject({ method, url, headers: { authorization: `Bearer ${admin}` }, ...(payload !== undefined ? { payload: payload as object } : {}) });
  const ddi = (id: string, method: 'GET' | 'POST' | 'PUT', rest: string, payload?: unknown): Promise<LightMyRequestResponse> =>
    server.app.inject({
      method,
      url: `/DEFAULT/controller/v1/${id}${rest}`,
      headers: { authorization: `TargetToken ${tokens[id] ?? ''}`, ...(typeof payload === 'string' ? { 'content-type': 'application/json' } : {}) },
      ...(payload !== undefined ? { payload: payload as string } : {}),
    });
  const register = async (controllerId: string, extra: object = {}): Promise<void> => {
    const res = await api('POST', '/api/v1/devices', { controllerId, bsp: 'x86_64', ...extra });
    expect(res.statusCode, res.body).toBe(201);
    tokens[controllerId] = (res.json() as { token: string }).token;
  };
  const attributesOf = async (id: string): Promise<Record<string, string>> =>
    ((await api('GET', `/api/v1/devices/${encodeURIComponent(id)}`)).json() as { attributes: Record<string, string> }).attributes;

  beforeAll(async () => {
    dir = await fs.mkdtemp(path.join(os.tmpdir(), 'lamadist-hardening-'));
    const pki = await makePki(dir, 'fleet');
    const bundle = await makeBundle(dir, { pki, compatible: 'lamadist-x86-64', version: '2.0.0' });
    server = await startServer({ db: 'sqlite::memory:', store: path.join(dir, 'store'), listen: '127.0.0.1:0', keyring: pki.caCert, publicUrl: 'https://updates.example/' });
    admin = (await fs.readFile(server.adminTokenFile as string, 'utf8')).trim();
    const up = await server.app.inject({
      method: 'POST',
      url: '/api/v1/releases',
      headers: { authorization: `Bearer ${admin}`, 'content-type': 'application/octet-stream' },
      payload: await fs.readFile(bundle),
    });
    expect(up.statusCode, up.body).toBe(201);
    releaseId = (up.json() as { release: { id: number } }).release.id;
    await register('node-1');
  });

  afterAll(async () => {
    await server?.close();
    await fs.rm(dir, { recursive: true, force: true });
  });

  it('limits the attributes a device stores in total, in every configData mode', async () => {
    const { keys, keyChars, valueChars, totalBytes } = ATTRIBUTE_LIMITS;
    const put = (mode: string, data: unknown): Promise<LightMyRequestResponse> => ddi('node-1', 'PUT', '/configData', JSON.stringify({ mode, data }));
    // What rauc-hawkbit-updater sends: a handful of short attributes.
    expect((await put('merge', { version: '1.0.0', boot_id: 'b1', hw_revision: '3', mac: '52:54:00:12:34:56' })).statusCode).toBe(200);
    const many = (n: number, from = 0): Record<string, string> => Object.fromEntries(Array.from({ length: n }, (_, i) => [`k${from + i}`, 'v']));
    expect((await put('merge', many(keys - 4))).statusCode).toBe(200);
    // Merging never grows a device past the limit, however the keys are spread over requests.
    const over = await put('merge', many(1, keys));
    expect(over.statusCode).toBe(400);
    expect(over.json()).toMatchObject({ error: 'LAMA_E_DDI_CONFIG', message: expect.stringContaining(`at most ${keys} attributes`) });
    expect(Object.keys(await attributesOf('node-1'))).toHaveLength(keys);
    // Changing a stored key is fine at the limit; removing makes room.
    expect((await put('merge', { version: '1.0.1' })).statusCode).toBe(200);
    expect((await put('remove', { k0: '' })).statusCode).toBe(200);
    expect((await put('merge', { fresh: 'x' })).statusCode).toBe(200);
    expect((await put('merge', { ['k'.repeat(keyChars + 1)]: 'x' })).json()).toMatchObject({ error: 'LAMA_E_DDI_CONFIG', message: expect.stringContaining(`${keyChars}`) });
    expect((await put('merge', { big: 'x'.repeat(valueChars + 1) })).statusCode).toBe(400);
    // Values at the per-value limit still cannot add up past the total.
    const fat = Object.fromEntries(Array.from({ length: Math.ceil(totalBytes / valueChars) + 1 }, (_, i) => [`f${i}`, 'x'.repeat(valueChars)]));
    const tooBig = await put('replace', fat);
    expect(tooBig.statusCode).toBe(400);
    expect(tooBig.json().message).toContain(`${totalBytes} bytes`);
    expect(await attributesOf('node-1')).toMatchObject({ version: '1.0.1', fresh: 'x' });
    // replace shrinks; the management API is held to the same limits.
    expect((await put('replace', { version: '1.0.1', boot_id: 'b1' })).statusCode).toBe(200);
    expect(await attributesOf('node-1')).toEqual({ version: '1.0.1', boot_id: 'b1' });
    const reg = await api('POST', '/api/v1/devices', { controllerId: 'node-fat', attributes: many(keys + 1) });
    expect(reg.statusCode).toBe(400);
  });

  it('treats prototype names as plain attribute names', async () => {
    const put = (mode: string, data: string): Promise<LightMyRequestResponse> => ddi('node-1', 'PUT', '/configData', `{"mode":"${mode}","data":${data}}`);
    expect((await put('replace', '{"version":"1"}')).statusCode).toBe(200);
    expect((await put('merge', '{"toString":"a","constructor":"b"}')).statusCode).toBe(200);
    // `remove` of an empty object removes nothing, not the attributes every object inherits.
    expect((await put('remove', '{}')).statusCode).toBe(200);
    expect(await attributesOf('node-1')).toMatchObject({ toString: 'a', constructor: 'b' });
    expect((await put('remove', '{"toString":""}')).statusCode).toBe(200);
    expect(Object.keys(await attributesOf('node-1'))).not.toContain('toString');
  });

  it('answers 400, not 500, to values and details that are not strings', async () => {
    const cases: [string, string][] = [
      ['/configData', '{"mode":"merge","data":{"version":{"toString":1}}}'],
      ['/configData', '{"data":{"a":null}}'],
      ['/deploymentBase/1/feedback', '{"status":{"execution":"proceeding","result":{"finished":"none"},"details":[{"toString":1}]}}'],
      ['/cancelAction/1/feedback', '{"status":{"execution":"closed","result":{"finished":"success"},"details":[{"toString":1}]}}'],
      ['/deploymentBase/1/feedback', '{"status":{"execution":"proceeding","result":{"finished":"none"},"details":"x"}}'],
    ];
    for (const [rest, body] of cases) {
      const res = await ddi('node-1', rest === '/configData' ? 'PUT' : 'POST', rest, body);
      expect(res.statusCode, `${rest} ${body}: ${res.body}`).toBe(400);
      expect(res.json().error).toMatch(/^LAMA_E_DDI_(CONFIG|FEEDBACK)$/);
    }
  });

  it('answers 400, not 500, to JSON nested 5000 deep', async () => {
    const deep = (n: number): string => '['.repeat(n) + ']'.repeat(n);
    const bodies: [string, 'PUT' | 'POST', string][] = [
      ['/configData', 'PUT', `{"data":{"a":${deep(5000)}}}`],
      ['/deploymentBase/1/feedback', 'POST', `{"status":{"execution":"closed","result":{"finished":"none"},"details":[${deep(5000)}]}}`],
      ['/cancelAction/1/feedback', 'POST', `{"x":${deep(5000)}}`],
    ];
    for (const [rest, method, body] of bodies) {
      const res = await ddi('node-1', method, rest, body);
      expect(res.statusCode, `${rest}: ${res.body}`).toBe(400);
      // Refused by the body parser, before any handler or validator walks it.
      expect(res.json()).toMatchObject({ error: 'LAMA_E_SERVER_BAD_JSON', message: expect.stringContaining('nested deeper than 32 levels') });
    }
    const mgmt = await server.app.inject({
      method: 'POST',
      url: '/api/v1/rollouts',
      headers: { authorization: `Bearer ${admin}`, 'content-type': 'application/json' },
      payload: `{"releaseId":${releaseId},"filter":{"attributes":${'{"a":'.repeat(5000)}"x"${'}'.repeat(5000)}}}`,
    });
    expect(mgmt.statusCode, mgmt.body).toBe(400);
    expect(mgmt.json().error).toBe('LAMA_E_SERVER_BAD_JSON');
    // Brackets inside strings are text, not nesting.
    expect((await ddi('node-1', 'PUT', '/configData', JSON.stringify({ data: { a: '['.repeat(1000) } }))).statusCode).toBe(200);
    expect((await ddi('node-1', 'PUT', '/configData', JSON.stringify({ data: { a: '["\\'.repeat(200) } }))).statusCode).toBe(200);
  });

  it('answers 404 to /ui/ names that are properties of every object', async () => {
    for (const name of ['__proto__', 'constructor', 'toString', 'hasOwnProperty', 'valueOf']) {
      const res = await server.app.inject({ url: `/ui/${name}` });
      expect(res.statusCode, name).toBe(404);
    }
    expect((await server.app.inject({ url: '/ui/app.js' })).statusCode).toBe(200);
  });

  it('serves the dashboard with frame-ancestors none and X-Frame-Options DENY', async () => {
    for (const url of ['/ui/', '/ui/app.js', '/ui/style.css']) {
      const res = await server.app.inject({ url });
      expect(res.statusCode).toBe(200);
      expect(res.headers['content-security-policy']).toMatch(/(^|;)\s*frame-ancestors 'none'\s*(;|$)/);
      expect(res.headers['x-frame-options']).toBe('DENY');
    }
  });

  it('lets a device with the longest registrable controller id use every URL', async () => {
    const id = `${'n'.repeat(120)}:${'7'.repeat(7)}`;
    expect(id).toHaveLength(128);
    await register(id);
    for (const shown of [id, encodeURIComponent(id)]) {
      const poll = await server.app.inject({ url: `/DEFAULT/controller/v1/${shown}`, headers: { authorization: `TargetToken ${tokens[id]}` } });
      expect(poll.statusCode, poll.body).toBe(200);
    }
    expect((await ddi(id, 'PUT', '/configData', JSON.stringify({ data: { version: '1' } }))).statusCode).toBe(200);
    // One character more is refused at registration, not by a 414 later.
    const tooLong = await api('POST', '/api/v1/devices', { controllerId: `${id}x` });
    expect(tooLong.statusCode).toBe(400);
    expect(tooLong.json().error).toBe('LAMA_E_SERVER_BAD_ID');
  });

  it('refuses a rollout filter whose device or tag list is empty instead of targeting the tenant', async () => {
    for (const filter of [{ devices: [] }, { tags: [] }, { bsp: '' }, { devices: [], tags: ['lab'] }]) {
      const res = await api('POST', '/api/v1/rollouts', { releaseId, filter, start: false });
      expect(res.statusCode, `${JSON.stringify(filter)}: ${res.body}`).toBe(400);
      expect(res.json()).toMatchObject({ error: 'LAMA_E_ROLLOUT_FILTER', message: expect.stringMatching(/empty/) });
    }
    expect((await api('GET', '/api/v1/rollouts')).json()).toEqual([]);
    const ok = await api('POST', '/api/v1/rollouts', { releaseId, filter: { devices: ['node-1'] }, start: false });
    expect(ok.statusCode, ok.body).toBe(201);
  });

  it('puts --public-url into device links and never the Host header', async () => {
    await register('node-links');
    const poll = await server.app.inject({ url: '/DEFAULT/controller/v1/node-links', headers: { authorization: `TargetToken ${tokens['node-links']}`, host: 'evil.example' } });
    const links = Object.values((poll.json() as { _links: Record<string, { href: string }> })._links);
    expect(links.length).toBeGreaterThan(0);
    for (const l of links) expect(l.href).toMatch(/^https:\/\/updates\.example\/DEFAULT\/controller\/v1\/node-links\//);
  });
});
