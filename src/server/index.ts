import { promises as fs } from 'node:fs';
import { createServer as createHttpServer, type IncomingMessage, type ServerResponse } from 'node:http';
import { createServer as createHttpsServer } from 'node:https';
import path from 'node:path';
import type { AddressInfo } from 'node:net';
import Fastify, { type FastifyError, type FastifyInstance } from 'fastify';
import swagger from '@fastify/swagger';
import { BSPS } from '../bsp/index.js';
import { UserError, isErrno } from '../errors.js';
import { readUserFile } from '../util/fsx.js';
import { keyPath } from '../keys/index.js';
import { registerApi, type BundleVerifier } from './api.js';
import { loadEkTrust } from '../attestation/index.js';
import { AttestationService } from './attestation.js';
import { hashToken, newToken } from './auth.js';
import { registerDashboard } from './dashboard.js';
import { openDatabase } from './db.js';
import { artifactFastPath, registerDdi } from './ddi.js';
import { FleetService } from './service.js';
import { ArtifactStore } from './store.js';
import { raucBundleVerifier } from './verify.js';

/**
 * The LamaDist update server: hawkBit DDI device API, management API with OpenAPI document,
 * Prometheus metrics and the fleet dashboard in one process, over SQLite (WAL) or PostgreSQL and a
 * content-addressed artifact directory.
 *
 * Public API:
 * - `startServer(options)` → `{ url, port, adminTokenFile, service, app, cacheMiB, close() }`
 * - `parseListen(text)` → `{ host, port }`
 * - re-exports: `FleetService`, `openDatabase`, `dropPostgresSchema`, `randomSchemaName`,
 *   `planRange`, `parseWaves`, `planWaveSizes`, `decideWave`, `matchesFilter`, `hashToken`, `newToken`
 */

export interface ServerOptions {
  /** `sqlite:PATH` (default `sqlite:<store>/lamadist.db`) or `postgres://…[?schema=NAME]`. */
  db?: string;
  /** Artifact directory (content-addressed bundles, temp uploads, admin token). */
  store: string;
  /** `HOST:PORT`, `:PORT` or `PORT`; port 0 picks a free one. Default 127.0.0.1:8080. */
  listen?: string;
  /** PEM file with the CA certificate(s) bundles must be signed under. */
  keyring: string;
  /** Admin token for the management API; default: read or create `<store>/admin.token` (0600). */
  adminToken?: string;
  tlsCert?: string;
  tlsKey?: string;
  /** PEM CA for device client certificates (mutual TLS); a verified cert whose CN is the controller id authenticates it. */
  clientCa?: string;
  /** Device poll interval in seconds (default 300). */
  pollSeconds?: number;
  /**
   * Base URL (scheme, host, optional path prefix) of every link sent to devices. When set, the
   * request's Host header is never used; without it links take the Host the device sent.
   */
  publicUrl?: string;
  /** Tenant used by the management API when none is given (default DEFAULT). */
  tenant?: string;
  /** Largest accepted bundle upload (default 8 GiB). */
  maxBundleBytes?: number;
  /** Memory for the range-read block cache in MiB (default: an eighth of RAM, at most 1024; 0 reads the file for every request). */
  cacheMiB?: number;
  /** RAUC compatibles accepted (default: those of the BSP table). */
  compatibles?: string[];
  /** configData attribute with the running version (default `version`). */
  versionAttribute?: string;
  /** configData attribute with the kernel boot id (default `boot_id`). */
  bootIdAttribute?: string;
  /** Recipient key (and cert) of the server itself, to verify crypt bundles encrypted for it too. */
  bundleKey?: string;
  bundleCert?: string;
  /**
   * The fleet's key directory (`keys init`): its Secure Boot PK, KEK and db signature lists are what
   * an attested device's PCR 7 must show. Without it no device can be attested.
   */
  keys?: string;
  /** How long an attestation nonce or credential challenge is accepted (default 5 minutes). */
  nonceTtlMs?: number;
  /**
   * PEM bundle of trusted EK CA certificates: a device's attestation key is pinned only when its
   * EK certificate chains to one and credential activation binds the key to that EK. Without it,
   * keys are pinned on first use.
   */
  ekCa?: string;
  /** Replace bundle verification (the default runs the RAUC bundle inspector against `keyring`). */
  verifyBundle?: BundleVerifier;
  /** Request logging (pino JSON to stderr). */
  log?: boolean;
  /** Time allowed to receive a whole request, bundle uploads excepted (default 300 s, as Node's). */
  requestTimeoutMs?: number;
  /** A bundle upload fails when no byte arrived for this long (default 60 s); it has no overall limit. */
  uploadIdleTimeoutMs?: number;
}

export interface RunningServer {
  url: string;
  port: number;
  /** Where the admin token lives when it was not given explicitly. */
  adminTokenFile?: string;
  service: FleetService;
  app: FastifyInstance;
  /** Budget of the range-read block cache in MiB (taken as devices read, freed when idle). */
  cacheMiB: number;
  close(): Promise<void>;
}

/** Parse `HOST:PORT`, `[V6]:PORT`, `:PORT` or `PORT`. */
export function parseListen(text: string): { host: string; port: number } {
  const m = /^(?:\[([^\]]+)\]|([^:]*))?:?(\d{1,5})$/.exec(text.trim());
  const port = m ? Number(m[3]) : NaN;
  if (!m || !(port >= 0 && port <= 65535)) throw new UserError('LAMA_E_SERVER_LISTEN', `--listen '${text}' must be HOST:PORT, :PORT or PORT`);
  return { host: m[1] ?? (m[2] || '127.0.0.1'), port };
}

async function adminToken(store: string, given: string | undefined): Promise<{ token: string; file?: string }> {
  if (given) return { token: given };
  const file = path.join(store, 'admin.token');
  try {
    const token = (await fs.readFile(file, 'utf8')).trim();
    if (token) return { token, file };
  } catch (err) {
    if (!isErrno(err, 'ENOENT')) throw err;
  }
  const token = newToken();
  await fs.writeFile(file, token + '\n', { mode: 0o600, flag: 'wx' }).catch(async (err: unknown) => {
    if (!isErrno(err, 'EEXIST')) throw err;
  });
  await fs.chmod(file, 0o600);
  return { token: (await fs.readFile(file, 'utf8')).trim(), file };
}

/** `--public-url` as the origin (and path prefix) links are built from: http(s), no query. */
function publicOrigin(text: string): string {
  let u: URL | undefined;
  try {
    u = new URL(text);
  } catch {
    u = undefined;
  }
  if (!u || !['http:', 'https:'].includes(u.protocol) || u.search || u.hash || u.username || u.password) {
    throw new UserError('LAMA_E_SERVER_PUBLIC_URL', `--public-url '${text}' must be an http:// or https:// URL without query, fragment or credentials`);
  }
  return u.origin + u.pathname.replace(/\/+$/, '');
}

/**
 * Deepest JSON nesting a request body may have. DDI and management bodies are two or three levels
 * deep; a 64 KiB body can nest 32,000 levels, which recursive code (serialisers, validators) must
 * never see.
 */
const MAX_JSON_DEPTH = 32;

/** Nesting depth of a JSON text, counted without parsing it (brackets inside strings do not count). */
function jsonDepth(text: string): number {
  let depth = 0;
  let max = 0;
  let inString = false;
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    if (inString) {
      if (c === 0x5c) i++;
      else if (c === 0x22) inString = false;
    } else if (c === 0x22) {
      inString = true;
    } else if (c === 0x5b || c === 0x7b) {
      max = Math.max(max, ++depth);
    } else if (c === 0x5d || c === 0x7d) {
      depth--;
    }
  }
  return max;
}

const UPLOAD_PATH = '/api/v1/releases';

/**
 * Time limits on receiving a request body, in place of Node's requestTimeout (which cut a bundle
 * upload at 60 KB/s off after 300 s). A bundle upload runs as long as bytes keep arriving: it fails
 * only after `uploadIdleMs` without one. Every other body must have arrived within `requestMs` of
 * the request's start. A request without a body is complete with its headers, which Node's
 * headersTimeout bounds, so the many small GETs of a streaming install set no timer at all.
 */
function limitBody(req: IncomingMessage, res: ServerResponse, limits: { requestMs: number; uploadIdleMs: number }): void {
  if (req.headers['transfer-encoding'] === undefined && !(Number(req.headers['content-length']) > 0)) return;
  const expire = (): void => {
    if (req.complete) return;
    // Node does not abort a request whose response is finished, so the handler still reading the
    // body would wait forever: destroying it ends that read (an upload's temporary file is removed).
    const abort = (): void => void req.destroy();
    if (res.headersSent) return abort();
    res
      .writeHead(408, { Connection: 'close', 'Content-Type': 'application/json; charset=utf-8' })
      .end(JSON.stringify({ error: 'LAMA_E_HTTP_408', message: 'request body not received in time' }), abort);
  };
  const url = req.url ?? '';
  const q = url.indexOf('?');
  if (req.method === 'POST' && (q < 0 ? url : url.slice(0, q)) === UPLOAD_PATH) {
    req.setTimeout(limits.uploadIdleMs, expire);
    // Verifying a large bundle after its last byte can take longer than the idle limit.
    req.once('end', () => req.socket.setTimeout(0));
    return;
  }
  const timer = setTimeout(expire, limits.requestMs);
  timer.unref();
  req.once('close', () => clearTimeout(timer));
}

function statusFor(err: UserError): number {
  if (err.code.endsWith('_NOT_FOUND')) return 404;
  if (err.code.endsWith('_EXISTS')) return 409;
  if (err.code === 'LAMA_E_SERVER_TOO_LARGE') return 413;
  if (err.code.startsWith('LAMA_E_BUNDLE_')) return 422;
  if (err.code === 'LAMA_E_ROLLOUT_STATE') return 409;
  if (err.code === 'LAMA_E_ATTEST_AK_PINNED' || err.code === 'LAMA_E_ATTEST_NO_KEY') return 409;
  if (err.code.startsWith('LAMA_E_ATTEST_') && err.code !== 'LAMA_E_ATTEST_REQUEST') return 422;
  return 400;
}

/**
 * Start the update server. Resolves once it listens; `close()` stops accepting, flushes batched
 * poll times and closes the database.
 */
export async function startServer(options: ServerOptions): Promise<RunningServer> {
  const publicUrl = options.publicUrl === undefined ? undefined : publicOrigin(options.publicUrl);
  const storeDir = path.resolve(options.store);
  await fs.mkdir(storeDir, { recursive: true });
  const keyring = path.resolve(options.keyring);
  await readUserFile(keyring, 'keyring');
  const store = await ArtifactStore.open(storeDir, options.cacheMiB !== undefined ? { cacheBytes: options.cacheMiB * 1024 * 1024 } : {});
  const open = await openDatabase(options.db ?? `sqlite:${path.join(storeDir, 'lamadist.db')}`);
  const pollSeconds = options.pollSeconds ?? 300;
  const service = new FleetService(open, {
    pollSeconds,
    versionAttribute: options.versionAttribute ?? 'version',
    bootIdAttribute: options.bootIdAttribute ?? 'boot_id',
  });
  await service.recoverRollouts();
  const admin = await adminToken(storeDir, options.adminToken);
  const esl = async (p: 'secureboot-pk-esl' | 'secureboot-kek-esl' | 'secureboot-db-esl'): Promise<Buffer> => readUserFile(await keyPath(options.keys as string, p), 'Secure Boot signature list');
  const attestation = new AttestationService(service, {
    ...(options.keys && { secureBoot: { pk: await esl('secureboot-pk-esl'), kek: await esl('secureboot-kek-esl'), db: await esl('secureboot-db-esl') } }),
    ...(options.nonceTtlMs !== undefined && { nonceTtlMs: options.nonceTtlMs }),
    ...(options.ekCa && { ekTrust: loadEkTrust((await readUserFile(options.ekCa, 'EK CA bundle')).toString('utf8'), options.ekCa) }),
  });

  let https: { cert: Buffer; key: Buffer; ca?: Buffer; requestCert?: boolean; rejectUnauthorized?: boolean } | undefined;
  if (options.tlsCert || options.tlsKey) {
    if (!options.tlsCert || !options.tlsKey) throw new UserError('LAMA_E_SERVER_TLS', '--tls-cert and --tls-key go together');
    https = { cert: await readUserFile(options.tlsCert, 'TLS certificate'), key: await readUserFile(options.tlsKey, 'TLS key') };
    if (options.clientCa) {
      // Request but do not require a client certificate: the dashboard and management API use tokens.
      Object.assign(https, { ca: await readUserFile(options.clientCa, 'client CA'), requestCert: true, rejectUnauthorized: false });
    }
  } else if (options.clientCa) {
    throw new UserError('LAMA_E_SERVER_TLS', '--client-ca needs --tls-cert and --tls-key');
  }

  const limits = { requestMs: options.requestTimeoutMs ?? 300_000, uploadIdleMs: options.uploadIdleTimeoutMs ?? 60_000 };
  const fastPath = artifactFastPath(service, store, (err) => app.log.error(err));
  const app = Fastify({
    logger: options.log ? { level: 'info', stream: process.stderr } : false,
    bodyLimit: 64 * 1024,
    // Path parameters up to the longest valid controller id or artifact name (128 characters) with
    // every character percent-encoded; fastify's default of 100 answered 414 to valid ids.
    routerOptions: { maxParamLength: 3 * 128 },
    // Devices keep connections open between range reads; shutdown must not wait for them.
    forceCloseConnections: true,
    ...(https ? { https } : {}),
    // Our own server, so artifact reads can be answered before fastify routes them (ddi.ts).
    serverFactory: (handler: (req: IncomingMessage, res: ServerResponse) => void) => {
      const listener = (req: IncomingMessage, res: ServerResponse): void => {
        limitBody(req, res, limits);
        fastPath(req, res, () => handler(req, res));
      };
      // Node's requestTimeout is one limit for every request; limitBody takes its place.
      const server = https ? createHttpsServer({ ...https, requestTimeout: 0 }, listener) : createHttpServer({ requestTimeout: 0 }, listener);
      server.keepAliveTimeout = 65_000;
      return server;
    },
  }) as unknown as FastifyInstance;

  const defaultJson = app.getDefaultJsonParser('error', 'error');
  app.removeContentTypeParser('application/json');
  app.addContentTypeParser('application/json', { parseAs: 'string' }, (req, body, done) => {
    if (jsonDepth(body as string) > MAX_JSON_DEPTH) {
      done(new UserError('LAMA_E_SERVER_BAD_JSON', `JSON body nested deeper than ${MAX_JSON_DEPTH} levels`), undefined);
      return;
    }
    defaultJson(req, body as string, done);
  });

  app.setErrorHandler((err: FastifyError | UserError, _req, reply) => {
    if (err instanceof UserError) return reply.code(statusFor(err)).send({ error: err.code, message: err.line() });
    const status = err.statusCode ?? 500;
    if (status >= 500) {
      app.log.error(err);
      return reply.code(500).send({ error: 'LAMA_E_SERVER_INTERNAL', message: 'internal server error' });
    }
    return reply.code(status).send({ error: `LAMA_E_HTTP_${status}`, message: err.message });
  });

  await app.register(swagger, {
    openapi: {
      openapi: '3.0.3',
      info: { title: 'LamaDist update server management API', version: '1' },
      components: { securitySchemes: { admin: { type: 'http', scheme: 'bearer' } } },
      security: [{ admin: [] }],
    },
  });
  app.get('/api/openapi.json', { schema: { hide: true } }, async () => app.swagger());
  app.get('/healthz', { schema: { hide: true } }, async () => ({ ok: true }));

  const verifyBundle = options.verifyBundle ?? raucBundleVerifier(
      keyring,
      options.bundleKey ? { key: options.bundleKey, ...(options.bundleCert ? { cert: options.bundleCert } : {}) } : undefined,
    );
  registerApi(app, service, store, attestation, {
    adminTokenHash: hashToken(admin.token),
    defaultTenant: options.tenant ?? 'DEFAULT',
    maxBundleBytes: options.maxBundleBytes ?? 8 * 1024 ** 3,
    verifyBundle,
    compatibles: options.compatibles ?? BSPS.map((b) => b.compatible),
  });
  registerDdi(app, service, store, attestation, publicUrl !== undefined ? { publicUrl } : {});
  registerDashboard(app);

  const { host, port } = parseListen(options.listen ?? '127.0.0.1:8080');
  try {
    await app.listen({ host, port });
  } catch (err) {
    await service.close();
    await open.close();
    await store.close();
    if (isErrno(err, 'EADDRINUSE')) throw new UserError('LAMA_E_SERVER_LISTEN', `${host}:${port} is already in use`);
    throw err;
  }
  const addr = app.server.address() as AddressInfo;
  const shownHost = addr.family === 'IPv6' ? `[${addr.address}]` : addr.address;
  const url = `${https ? 'https' : 'http'}://${shownHost === '0.0.0.0' ? '127.0.0.1' : shownHost}:${addr.port}`;
  let closed = false;
  return {
    url,
    port: addr.port,
    ...(admin.file ? { adminTokenFile: admin.file } : {}),
    service,
    app,
    cacheMiB: store.cacheBudget / 1024 / 1024,
    async close() {
      if (closed) return;
      closed = true;
      await app.close();
      await service.close();
      await open.close();
      await store.close();
    },
  };
}

export { FleetService } from './service.js';
export { openDatabase, dropPostgresSchema, randomSchemaName } from './db.js';
export { planRange } from './range.js';
export { parseWaves, planWaveSizes, decideWave, matchesFilter } from './rollout.js';
export { hashToken, newToken } from './auth.js';
export type { BundleVerifier, VerifiedBundle } from './api.js';
export type { DeviceView, ReleaseView, RolloutView, ActionView } from './service.js';
export type { AttestationState, AttestationView, Pcr11Prediction } from './attestation.js';
export type { TargetFilter, WaveSpec } from './rollout.js';
