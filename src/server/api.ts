import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import type { Readable } from 'node:stream';
import { BSPS } from '../bsp/index.js';
import { UserError } from '../errors.js';
import { attestationCounts, type AttestationService, type Pcr11Prediction } from './attestation.js';
import { parseAuthorization, tokenMatches } from './auth.js';
import type { FleetService } from './service.js';
import { BLOCK_SIZE, type ArtifactStore } from './store.js';
import type { TargetFilter, WaveSpec } from './rollout.js';

/** What release verification reports about an uploaded bundle (see verify.ts). */
export interface VerifiedBundle {
  compatible: string;
  version: string;
  format: string;
  signer: string;
  /** PCR 11 values the release's UKIs leave, per host and slot (none for a bundle without UKIs). */
  pcr11?: Pcr11Prediction[];
}

/** Verifies an uploaded bundle against the server's keyring; throws a UserError to refuse it. */
export type BundleVerifier = (file: string) => Promise<VerifiedBundle>;

export interface ApiOptions {
  adminTokenHash: string;
  defaultTenant: string;
  maxBundleBytes: number;
  verifyBundle: BundleVerifier;
  /** RAUC compatibles accepted for releases (default: those of the BSP table). */
  compatibles: readonly string[];
}

const FILENAME = /^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$/;

/** Validate an artifact file name: one path component of safe characters, so devices' URLs stay plain. */
export function checkFilename(name: string): string {
  if (!FILENAME.test(name) || name.includes('..')) {
    throw new UserError('LAMA_E_SERVER_BAD_NAME', `artifact name '${name}' must be 1-128 of A-Z a-z 0-9 . _ + - without '..' or '/'`);
  }
  return name;
}

const str = { type: 'string' } as const;
const strArray = { type: 'array', items: str } as const;
const strMap = { type: 'object', additionalProperties: str } as const;
const idParam = { type: 'object', properties: { id: { type: 'integer', minimum: 1 } }, required: ['id'] } as const;
const cidParam = { type: 'object', properties: { controllerId: str }, required: ['controllerId'] } as const;
const tenantQuery = { type: 'object', properties: { tenant: str } } as const;
const filterSchema = {
  type: 'object',
  additionalProperties: false,
  properties: { tags: strArray, attributes: strMap, bsp: str, devices: strArray },
} as const;
const waveSchema = {
  type: 'object',
  additionalProperties: false,
  properties: { count: { type: 'integer', minimum: 1 }, percent: { type: 'number', exclusiveMinimum: 0, maximum: 100 } },
  minProperties: 1,
  maxProperties: 1,
} as const;

/**
 * The management API under /api/v1 (admin token as `Authorization: Bearer …`): devices, releases,
 * rollouts, audit log, overview; plus Prometheus metrics at /metrics behind the same token.
 */
export function registerApi(app: FastifyInstance, svc: FleetService, store: ArtifactStore, att: AttestationService, opts: ApiOptions): void {
  const admin = async (req: FastifyRequest, reply: FastifyReply): Promise<void> => {
    const auth = parseAuthorization(req.headers.authorization);
    if (!auth || auth.scheme !== 'bearer' || !tokenMatches(auth.token, opts.adminTokenHash)) {
      svc.counters.authFailures++;
      await reply.code(401).header('WWW-Authenticate', 'Bearer').send({ error: 'LAMA_E_SERVER_UNAUTHORIZED', message: 'missing or invalid admin token' });
    }
  };
  const actor = (req: FastifyRequest): string => `admin@${req.ip}`;
  const tenantOf = (req: FastifyRequest): string => (req.query as { tenant?: string }).tenant ?? opts.defaultTenant;

  app.register(async (api) => {
    api.addHook('onRequest', admin);
    // Uploads stream straight to the store; the size limit is enforced while streaming.
    api.addContentTypeParser('application/octet-stream', (_req, payload, done) => done(null, payload));

    api.get('/api/v1/devices', { schema: { tags: ['devices'], summary: 'list devices', querystring: tenantQuery } }, async (req) =>
      svc.listDevices(tenantOf(req)),
    );
    api.post(
      '/api/v1/devices',
      {
        schema: {
          tags: ['devices'],
          summary: 'pre-register a device and create its TargetToken (returned once)',
          querystring: tenantQuery,
          body: {
            type: 'object',
            additionalProperties: false,
            required: ['controllerId'],
            properties: { controllerId: str, name: str, bsp: { type: 'string', enum: BSPS.map((b) => b.name) }, tags: strArray, attributes: strMap },
          },
        },
      },
      async (req, reply) => {
        const b = req.body as { controllerId: string; name?: string; bsp?: string; tags?: string[]; attributes?: Record<string, string> };
        reply.code(201);
        return svc.registerDevice({ tenant: tenantOf(req), ...b }, actor(req));
      },
    );
    api.get('/api/v1/devices/:controllerId', { schema: { tags: ['devices'], summary: 'device with action history', params: cidParam, querystring: tenantQuery } }, async (req) =>
      svc.getDevice(tenantOf(req), (req.params as { controllerId: string }).controllerId),
    );
    api.patch(
      '/api/v1/devices/:controllerId',
      {
        schema: {
          tags: ['devices'],
          summary: 'rename, set BSP, add or remove tags',
          params: cidParam,
          querystring: tenantQuery,
          body: {
            type: 'object',
            additionalProperties: false,
            properties: { name: str, bsp: { type: 'string', enum: BSPS.map((b) => b.name) }, addTags: strArray, removeTags: strArray },
          },
        },
      },
      async (req) => svc.updateDevice(tenantOf(req), (req.params as { controllerId: string }).controllerId, req.body as object, actor(req)),
    );
    api.post('/api/v1/devices/:controllerId/token', { schema: { tags: ['devices'], summary: 'replace the TargetToken', params: cidParam, querystring: tenantQuery } }, async (req) => ({
      token: await svc.rotateDeviceToken(tenantOf(req), (req.params as { controllerId: string }).controllerId, actor(req)),
    }));
    api.delete(
      '/api/v1/devices/:controllerId/attestation-key',
      { schema: { tags: ['devices'], summary: 'release the pinned attestation key (a replaced TPM); the device registers its new one', params: cidParam, querystring: tenantQuery } },
      async (req, reply) => {
        await att.releaseKey(tenantOf(req), (req.params as { controllerId: string }).controllerId, actor(req));
        return reply.code(204).send();
      },
    );
    api.post(
      '/api/v1/devices/:controllerId/attestation/request',
      {
        schema: {
          tags: ['devices'],
          summary: 'ask the device for a fresh TPM quote: its base poll names the attestation link until a quote with a later nonce is judged',
          params: cidParam,
          querystring: tenantQuery,
        },
      },
      async (req, reply) => reply.code(202).send(await att.requestQuote(tenantOf(req), (req.params as { controllerId: string }).controllerId, actor(req))),
    );
    api.post(
      '/api/v1/tenants/:tenant/gateway-token',
      { schema: { tags: ['devices'], summary: 'create or replace the tenant GatewayToken', params: { type: 'object', properties: { tenant: str }, required: ['tenant'] } } },
      async (req) => ({ token: await svc.rotateGatewayToken((req.params as { tenant: string }).tenant, actor(req)) }),
    );

    api.get('/api/v1/releases', { schema: { tags: ['releases'], summary: 'list releases' } }, async () => svc.listReleases());
    api.get('/api/v1/releases/:id', { schema: { tags: ['releases'], summary: 'one release', params: idParam } }, async (req) => svc.getRelease((req.params as { id: number }).id));
    api.post(
      '/api/v1/releases',
      {
        schema: {
          tags: ['releases'],
          summary: 'upload a RAUC bundle (application/octet-stream); verified before it is stored',
          querystring: { type: 'object', properties: { filename: str } },
        },
      },
      async (req, reply) => {
        // A refusal before the whole body has arrived must not leave the rest on a reused connection.
        const closeIfUnread = (): void => {
          if (!req.raw.readableEnded) reply.header('Connection', 'close');
        };
        const declared = Number(req.headers['content-length'] ?? 0);
        if (declared > opts.maxBundleBytes) {
          closeIfUnread();
          throw new UserError('LAMA_E_SERVER_TOO_LARGE', `upload of ${declared} bytes exceeds the limit of ${opts.maxBundleBytes}`);
        }
        if (!req.body || typeof (req.body as Readable).pipe !== 'function') {
          throw new UserError('LAMA_E_SERVER_UPLOAD', 'send the bundle as Content-Type: application/octet-stream');
        }
        const wanted = (req.query as { filename?: string }).filename;
        if (wanted !== undefined) checkFilename(wanted);
        const pending = await store.receive(req.body as Readable, opts.maxBundleBytes).catch((err: unknown) => {
          closeIfUnread();
          throw err;
        });
        try {
          const known = await svc.releaseBySha256(pending.sha256);
          if (known) {
            await store.discard(pending);
            return { release: known, created: false };
          }
          const meta = await opts.verifyBundle(pending.tempPath);
          if (!opts.compatibles.includes(meta.compatible)) {
            throw new UserError('LAMA_E_BUNDLE_COMPATIBLE', `bundle compatible '${meta.compatible}' is not one this server accepts (${opts.compatibles.join(', ')})`);
          }
          const filename = checkFilename(wanted ?? `${meta.compatible}-${meta.version}.raucb`);
          await store.commit(pending);
          const { pcr11, ...fields } = meta;
          const result = await svc.addRelease(
            { ...fields, filename, sha256: pending.sha256, sha1: pending.sha1, md5: pending.md5, size: pending.size },
            actor(req),
            pcr11,
          );
          svc.counters.uploadsAccepted++;
          reply.code(result.created ? 201 : 200);
          return result;
        } catch (err) {
          svc.counters.uploadsRefused++;
          await store.discard(pending);
          throw err;
        }
      },
    );

    api.get('/api/v1/rollouts', { schema: { tags: ['rollouts'], summary: 'list rollouts with wave progress' } }, async () => svc.listRollouts());
    api.get('/api/v1/rollouts/:id', { schema: { tags: ['rollouts'], summary: 'one rollout with wave progress', params: idParam } }, async (req) =>
      svc.getRollout((req.params as { id: number }).id),
    );
    api.post(
      '/api/v1/rollouts',
      {
        schema: {
          tags: ['rollouts'],
          summary: 'create a rollout (and start it unless start=false)',
          querystring: tenantQuery,
          body: {
            type: 'object',
            additionalProperties: false,
            required: ['releaseId'],
            properties: {
              name: str,
              releaseId: { type: 'integer', minimum: 1 },
              filter: filterSchema,
              waves: { type: 'array', items: waveSchema, maxItems: 100 },
              successThreshold: { type: 'number', minimum: 0, maximum: 100 },
              errorThreshold: { type: 'number', minimum: 0, maximum: 100 },
              start: { type: 'boolean' },
              requireAttestation: { type: 'boolean' },
            },
          },
        },
      },
      async (req, reply) => {
        const b = req.body as {
          name?: string;
          releaseId: number;
          filter?: TargetFilter;
          waves?: WaveSpec[];
          successThreshold?: number;
          errorThreshold?: number;
          start?: boolean;
          requireAttestation?: boolean;
        };
        reply.code(201);
        return svc.createRollout(
          {
            tenant: tenantOf(req),
            name: b.name ?? `release ${b.releaseId}`,
            releaseId: b.releaseId,
            filter: b.filter ?? {},
            waves: b.waves ?? [],
            successThreshold: b.successThreshold ?? 100,
            errorThreshold: b.errorThreshold ?? 0,
            start: b.start ?? true,
            requireAttestation: b.requireAttestation ?? false,
          },
          actor(req),
        );
      },
    );
    for (const op of ['start', 'pause', 'resume', 'cancel'] as const) {
      api.post(`/api/v1/rollouts/:id/${op}`, { schema: { tags: ['rollouts'], summary: `${op} a rollout`, params: idParam } }, async (req) =>
        svc.setRolloutStatus((req.params as { id: number }).id, op, actor(req)),
      );
    }

    api.get(
      '/api/v1/audit',
      { schema: { tags: ['audit'], summary: 'audit log, newest first', querystring: { type: 'object', properties: { limit: { type: 'integer', minimum: 1, maximum: 10000 } } } } },
      async (req) => svc.auditLog((req.query as { limit?: number }).limit),
    );

    api.get('/api/v1/overview', { schema: { tags: ['devices'], summary: 'devices by version and status, overdue devices', querystring: tenantQuery } }, async (req) => {
      const devices = await svc.listDevices(tenantOf(req));
      const byVersion: Record<string, number> = {};
      const byStatus: Record<string, number> = {};
      for (const d of devices) {
        const v = d.version ?? 'unknown';
        byVersion[v] = (byVersion[v] ?? 0) + 1;
        byStatus[d.status] = (byStatus[d.status] ?? 0) + 1;
      }
      return { total: devices.length, byVersion, byStatus, overdue: devices.filter((d) => d.status === 'overdue').map((d) => d.controllerId) };
    });

    api.get('/metrics', { schema: { tags: ['metrics'], summary: 'Prometheus metrics' } }, async (_req, reply) => {
      const g = await svc.gauges();
      const attestation = await attestationCounts(svc.db);
      const c = svc.counters;
      const metric = (name: string, type: 'gauge' | 'counter', help: string, samples: [string, number][]): string[] => [
        `# HELP ${name} ${help}`,
        `# TYPE ${name} ${type}`,
        ...samples.map(([labels, v]) => `${name}${labels} ${v}`),
      ];
      const by = (label: string, m: Record<string, number>): [string, number][] => Object.entries(m).map(([k, v]) => [`{${label}="${k}"}`, v]);
      const lines = [
        ...metric('lamadist_devices', 'gauge', 'Registered devices by connection status.', by('status', g.devices)),
        ...metric('lamadist_actions', 'gauge', 'Update actions by state.', by('state', g.actions)),
        ...metric('lamadist_rollouts', 'gauge', 'Rollouts by status.', by('status', g.rollouts)),
        ...metric('lamadist_releases', 'gauge', 'Stored releases.', [['', g.releases]]),
        ...metric('lamadist_devices_attestation', 'gauge', 'Devices by the verdict on their last TPM quote.', by('state', attestation)),
        ...metric('lamadist_quotes_total', 'counter', 'TPM quotes judged, by verdict.', by('result', { attested: c.quotesAttested, failed: c.quotesFailed })),
        ...metric('lamadist_polls_total', 'counter', 'Device base polls served.', [['', c.polls]]),
        ...metric('lamadist_feedback_total', 'counter', 'Device feedback messages received.', [['', c.feedback]]),
        ...metric('lamadist_artifact_requests_total', 'counter', 'Artifact GET/HEAD requests (including ranges).', [['', c.artifactRequests]]),
        ...metric('lamadist_artifact_bytes_total', 'counter', 'Artifact payload bytes sent.', [['', c.artifactBytes]]),
        ...metric('lamadist_uploads_total', 'counter', 'Bundle uploads by result.', by('result', { accepted: c.uploadsAccepted, refused: c.uploadsRefused })),
        ...metric('lamadist_auth_failures_total', 'counter', 'Requests refused with 401.', [['', c.authFailures]]),
        ...metric('lamadist_artifact_cache_bytes', 'gauge', 'Memory held by the range-read block cache.', [['', store.cacheStats().slabs * BLOCK_SIZE]]),
      ];
      return reply.type('text/plain; version=0.0.4').send(lines.join('\n') + '\n');
    });
  });
}
