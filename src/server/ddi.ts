import { createHash } from 'node:crypto';
import type { IncomingMessage, ServerResponse } from 'node:http';
import type { Socket } from 'node:net';
import type { TLSSocket } from 'node:tls';
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import { sendArtifact, type ServedArtifact } from './artifact.js';
import { registerAttestationRoutes, type AttestationService } from './attestation.js';
import { parseAuthorization } from './auth.js';
import { formatSleep } from './rollout.js';
import { parseFeedback, type DeviceRow, type FleetService, type ReleaseRow } from './service.js';
import type { ArtifactStore } from './store.js';

/**
 * The hawkBit Direct Device Integration API under `/{tenant}/controller/v1/{controllerId}`, as
 * rauc-hawkbit-updater and other stock DDI clients speak it. Every success is HTTP 200 (the client
 * treats anything else as failure); unknown or foreign actions are 404; bad credentials are 401.
 */

interface DdiParams {
  tenant: string;
  controllerId: string;
  actionId?: string;
  moduleId?: string;
  fileName?: string;
}

declare module 'fastify' {
  interface FastifyRequest {
    device?: DeviceRow;
  }
}

function clientCertCn(socket: Socket): string | undefined {
  const sock = socket as TLSSocket;
  if (!sock.encrypted || !sock.authorized) return undefined;
  const cn = sock.getPeerCertificate()?.subject?.CN;
  return typeof cn === 'string' ? cn : Array.isArray(cn) ? cn[0] : undefined;
}

/**
 * Register the DDI routes and LamaDist's attestation extension under them. `publicUrl` overrides
 * the scheme://host used in `_links`.
 */
export function registerDdi(app: FastifyInstance, svc: FleetService, store: ArtifactStore, att: AttestationService, opts: { publicUrl?: string }): void {
  const base = (req: FastifyRequest): string => {
    const p = req.params as DdiParams;
    const origin = opts.publicUrl ?? `${req.protocol}://${req.host}`;
    return `${origin}/${encodeURIComponent(p.tenant)}/controller/v1/${encodeURIComponent(p.controllerId)}`;
  };

  const authenticate = async (req: FastifyRequest, reply: FastifyReply): Promise<void> => {
    const p = req.params as DdiParams;
    const device = await svc.authenticate(p.tenant, p.controllerId, parseAuthorization(req.headers.authorization), clientCertCn(req.raw.socket));
    if (!device) {
      svc.counters.authFailures++;
      await reply.code(401).header('WWW-Authenticate', 'TargetToken').send({ error: 'LAMA_E_DDI_UNAUTHORIZED', message: 'missing or invalid device credentials' });
      return;
    }
    svc.touch(device);
    req.device = device;
  };

  const actionOf = async (req: FastifyRequest, reply: FastifyReply) => {
    const id = Number((req.params as DdiParams).actionId);
    const found = Number.isSafeInteger(id) && id > 0 ? await svc.deviceAction(req.device as DeviceRow, id) : undefined;
    if (!found) await reply.code(404).send({ error: 'LAMA_E_DDI_NO_ACTION', message: 'no such action for this device' });
    return found;
  };

  const prefix = '/:tenant/controller/v1/:controllerId';
  app.register(async (ddi) => {
    ddi.addHook('preHandler', authenticate);
    registerAttestationRoutes(ddi, att);

    ddi.get(prefix, async (req) => {
      const answer = await svc.poll(req.device as DeviceRow);
      const links: Record<string, { href: string }> = {};
      const b = base(req);
      if (answer.deploy !== undefined) {
        const c = createHash('sha1').update(`${answer.deploy}`).digest('hex').slice(0, 8);
        links.deploymentBase = { href: `${b}/deploymentBase/${answer.deploy}?c=${c}` };
      }
      if (answer.cancel !== undefined) links.cancelAction = { href: `${b}/cancelAction/${answer.cancel}` };
      if (answer.configData) links.configData = { href: `${b}/configData` };
      // LamaDist extension: an operator asked for a fresh TPM quote (docs/attestation.md). Only
      // then is the link there; stock DDI clients skip links they do not know.
      if ((req.device as DeviceRow).attestation_requested_at !== null) links.lamadistAttestation = { href: `${b}/attestation/nonce` };
      return { config: { polling: { sleep: formatSleep(svc.opts.pollSeconds) } }, _links: links };
    });

    ddi.put(`${prefix}/configData`, async (req) => {
      await svc.putConfigData(req.device as DeviceRow, req.body);
      return {};
    });

    ddi.get(`${prefix}/deploymentBase/:actionId`, async (req, reply) => {
      const found = await actionOf(req, reply);
      if (!found) return reply;
      const { action, release } = found;
      const artifactUrl = `${base(req)}/softwaremodules/${release.id}/artifacts/${encodeURIComponent(release.filename)}`;
      return {
        id: String(action.id),
        deployment: {
          download: 'forced',
          update: 'forced',
          maintenanceWindow: 'available',
          chunks: [
            {
              part: 'os',
              version: release.version,
              name: release.compatible,
              artifacts: [
                {
                  filename: release.filename,
                  hashes: { sha1: release.sha1, md5: release.md5, sha256: release.sha256 },
                  size: release.size,
                  _links: {
                    download: { href: artifactUrl },
                    'download-http': { href: artifactUrl },
                    md5sum: { href: `${artifactUrl}.MD5SUM` },
                    'md5sum-http': { href: `${artifactUrl}.MD5SUM` },
                  },
                },
              ],
            },
          ],
        },
        actionHistory: { status: action.state, messages: [] },
      };
    });

    ddi.post(`${prefix}/deploymentBase/:actionId/feedback`, async (req, reply) => {
      const fb = parseFeedback(req.body);
      const ok = await svc.deploymentFeedback(req.device as DeviceRow, Number((req.params as DdiParams).actionId), fb);
      if (!ok) return reply.code(404).send({ error: 'LAMA_E_DDI_NO_ACTION', message: 'no such action for this device' });
      return {};
    });

    ddi.get(`${prefix}/cancelAction/:actionId`, async (req, reply) => {
      const found = await actionOf(req, reply);
      if (!found) return reply;
      return { id: String(found.action.id), cancelAction: { stopId: String(found.action.id) } };
    });

    ddi.post(`${prefix}/cancelAction/:actionId/feedback`, async (req, reply) => {
      const fb = parseFeedback(req.body);
      const ok = await svc.cancelFeedback(req.device as DeviceRow, Number((req.params as DdiParams).actionId), fb);
      if (!ok) return reply.code(404).send({ error: 'LAMA_E_DDI_NO_ACTION', message: 'no such action for this device' });
      return {};
    });

    const release = async (req: FastifyRequest, reply: FastifyReply) => {
      const id = Number((req.params as DdiParams).moduleId);
      const r = Number.isSafeInteger(id) && id > 0 ? await svc.downloadable(req.device as DeviceRow, id) : undefined;
      if (!r) await reply.code(404).send({ error: 'LAMA_E_DDI_NO_ARTIFACT', message: 'no such artifact for this device' });
      return r;
    };

    ddi.get(`${prefix}/softwaremodules/:moduleId/artifacts`, async (req, reply) => {
      const r = await release(req, reply);
      if (!r) return reply;
      return [{ filename: r.filename, hashes: { sha1: r.sha1, md5: r.md5, sha256: r.sha256 }, size: r.size }];
    });

    ddi.get(`${prefix}/softwaremodules/:moduleId/artifacts/:fileName`, async (req, reply) => {
      const r = await release(req, reply);
      if (!r) return reply;
      const name = (req.params as DdiParams).fileName ?? '';
      // Exact match against the stored name: no path is ever built from what the client sent.
      if (name === `${r.filename}.MD5SUM`) return reply.type('text/plain').send(`${r.md5}  ${r.filename}\n`);
      if (name !== r.filename) return reply.code(404).send({ error: 'LAMA_E_DDI_NO_ARTIFACT', message: 'no such artifact for this device' });
      svc.counters.artifactRequests++;
      reply.hijack();
      svc.counters.artifactBytes += await sendArtifact(req.raw, reply.raw, store, served(r), (err) => req.log.error(err));
      return reply;
    });
  });
}

function served(r: ReleaseRow): ServedArtifact {
  return { sha256: r.sha256, size: r.size, createdAt: r.created_at };
}

const ARTIFACT_PATH = /^\/([^/]+)\/controller\/v1\/([^/]+)\/softwaremodules\/(\d{1,15})\/artifacts\/([^/]+)$/;

/**
 * The artifact download route once more, ahead of fastify on the bare Node server. A streaming
 * RAUC install is thousands of small range reads, and fastify's routing, hooks and reply pipeline
 * cost more CPU per read than the bytes themselves. This path takes only requests it can answer in
 * full — GET or HEAD of the exact stored file name by an authenticated device entitled to it — with
 * the same checks and the same `sendArtifact` as the route. Everything else (bad token, unknown
 * module, `.MD5SUM`, odd encodings, a database error) goes to `next`, so fastify gives the answer,
 * the status code and the counters exactly as before. `fastify.inject` never comes through here.
 */
export function artifactFastPath(
  svc: FleetService,
  store: ArtifactStore,
  onError: (err: unknown) => void,
): (req: IncomingMessage, res: ServerResponse, next: () => void) => void {
  // A device streams one install over one keep-alive connection: once its TargetToken checked out
  // on a socket, the same header for the same device there is not hashed again, for as long as the
  // service still holds that device record (rotation or removal drops it).
  const verified = new WeakMap<Socket, { header: string; key: string; device: DeviceRow }>();
  const serve = async (req: IncomingMessage, res: ServerResponse, m: RegExpExecArray): Promise<boolean> => {
    let tenant: string, controllerId: string, fileName: string;
    try {
      [tenant, controllerId, fileName] = [m[1], m[2], m[4]].map((x = '') => (x.includes('%') ? decodeURIComponent(x) : x)) as [string, string, string];
    } catch {
      return false;
    }
    const header = req.headers.authorization;
    const key = `${tenant}/${controllerId}`;
    const memo = verified.get(req.socket);
    let device = memo && memo.header === header && memo.key === key && svc.isCurrent(memo.device) ? memo.device : undefined;
    if (!device) {
      const auth = parseAuthorization(header);
      device = await svc.authenticate(tenant, controllerId, auth, clientCertCn(req.socket));
      if (!device) return false;
      if (header && auth?.scheme === 'targettoken') verified.set(req.socket, { header, key, device });
    }
    const r = await svc.downloadable(device, Number(m[3]));
    if (!r || r.filename !== fileName) return false;
    svc.touch(device);
    svc.counters.artifactRequests++;
    svc.counters.artifactBytes += await sendArtifact(req, res, store, served(r), onError);
    return true;
  };
  return (req, res, next) => {
    if (req.method !== 'GET' && req.method !== 'HEAD') return next();
    const url = req.url ?? '';
    const q = url.indexOf('?');
    const m = ARTIFACT_PATH.exec(q < 0 ? url : url.slice(0, q));
    if (!m) return next();
    serve(req, res, m).then(
      (done) => {
        if (!done) next();
      },
      // Lookups failed before anything was written (sendArtifact itself never throws).
      () => next(),
    );
  };
}
