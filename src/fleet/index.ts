import { createReadStream, promises as fs } from 'node:fs';
import http from 'node:http';
import https from 'node:https';
import type { Readable } from 'node:stream';
import { UserError } from '../errors.js';
import type { ActionView, DeviceView, ReleaseView, RolloutView, TargetFilter, WaveSpec } from '../server/index.js';

/**
 * Client of the update server's management API, used by `lamadist fleet` and by tests and demos.
 *
 * Public API:
 * - `new FleetClient({ url, token, tenant?, ca? })`
 * - devices: `listDevices()`, `registerDevice(input)` → `{ device, token }`, `getDevice(id)`,
 *   `updateDevice(id, change)`, `rotateDeviceToken(id)`, `requestAttestation(id)`, `gatewayToken(tenant?)`
 * - releases: `uploadRelease(file, { filename? })` → `{ release, created }`, `listReleases()`, `getRelease(id)`
 * - rollouts: `createRollout(input)`, `listRollouts()`, `getRollout(id)`, `rolloutOp(id, op)`
 * - `audit(limit?)`, `overview()`, `metrics()` (Prometheus text)
 * Server-side refusals become UserErrors carrying the server's LAMA_E_* code and message.
 */

export interface FleetClientOptions {
  /** Server base URL, e.g. http://127.0.0.1:8080. */
  url: string;
  /** Admin token. */
  token: string;
  /** Tenant for device calls (server default when omitted). */
  tenant?: string;
  /** PEM CA to trust for an https server with a private CA. */
  ca?: string | Buffer;
}

export interface Overview {
  total: number;
  byVersion: Record<string, number>;
  byStatus: Record<string, number>;
  overdue: string[];
}

/** A device with its action history. */
export type DeviceDetail = DeviceView & { actions: ActionView[] };

/** The management API over HTTP(S); every method is one request. */
export class FleetClient {
  private readonly base: URL;
  private readonly opts: FleetClientOptions;

  /** Refuses a URL that is not http(s). */
  constructor(opts: FleetClientOptions) {
    try {
      this.base = new URL(opts.url);
    } catch {
      throw new UserError('LAMA_E_FLEET_URL', `server URL '${opts.url}' is not a URL`);
    }
    if (this.base.protocol !== 'http:' && this.base.protocol !== 'https:') throw new UserError('LAMA_E_FLEET_URL', `server URL '${opts.url}' must be http:// or https://`);
    this.opts = opts;
  }

  private request<T>(method: string, path: string, body?: { json: unknown } | { stream: Readable; length: number }, text = false): Promise<T> {
    const url = new URL(path, this.base);
    if (this.opts.tenant && !url.searchParams.has('tenant') && path.startsWith('/api/v1/devices')) url.searchParams.set('tenant', this.opts.tenant);
    const payload = body && 'json' in body ? Buffer.from(JSON.stringify(body.json)) : undefined;
    const headers: Record<string, string | number> = { Authorization: `Bearer ${this.opts.token}`, Accept: 'application/json' };
    if (payload) Object.assign(headers, { 'Content-Type': 'application/json', 'Content-Length': payload.length });
    if (body && 'stream' in body) Object.assign(headers, { 'Content-Type': 'application/octet-stream', 'Content-Length': body.length });
    const mod = url.protocol === 'https:' ? https : http;
    return new Promise<T>((resolve, reject) => {
      const req = mod.request(url, { method, headers, ...(this.opts.ca ? { ca: this.opts.ca } : {}) }, (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('error', reject);
        res.on('end', () => {
          const raw = Buffer.concat(chunks).toString('utf8');
          const status = res.statusCode ?? 0;
          if (status >= 200 && status < 300) {
            if (text) return resolve(raw as T);
            try {
              resolve((raw ? JSON.parse(raw) : {}) as T);
            } catch {
              reject(new UserError('LAMA_E_FLEET_RESPONSE', `${method} ${url.pathname}: server sent invalid JSON`));
            }
            return;
          }
          let code = `LAMA_E_HTTP_${status}`;
          let message = raw.trim().slice(0, 300) || res.statusMessage || 'request failed';
          try {
            const e = JSON.parse(raw) as { error?: string; message?: string };
            if (e.error?.startsWith('LAMA_E_')) code = e.error;
            if (e.message) message = e.message.replace(/ \[LAMA_E_[A-Z_0-9]+\]$/, '');
          } catch {
            // Not JSON (a proxy's error page): keep the raw text.
          }
          reject(new UserError(code as `LAMA_E_${string}`, `server refused ${method} ${url.pathname} (HTTP ${status}): ${message}`));
        });
      });
      req.on('error', (err) => reject(new UserError('LAMA_E_FLEET_CONNECT', `cannot reach ${this.base.origin}: ${err.message}`, { cause: err })));
      if (body && 'stream' in body) {
        body.stream.on('error', (err) => req.destroy(err));
        body.stream.pipe(req);
      } else {
        req.end(payload);
      }
    });
  }

  /** All devices of the tenant. */
  listDevices(): Promise<DeviceView[]> {
    return this.request('GET', '/api/v1/devices');
  }

  /** Pre-register a device; the returned token is shown once. */
  registerDevice(input: { controllerId: string; name?: string; bsp?: string; tags?: string[]; attributes?: Record<string, string> }): Promise<{ device: DeviceView; token: string }> {
    return this.request('POST', '/api/v1/devices', { json: input });
  }

  /** One device with its action history. */
  getDevice(controllerId: string): Promise<DeviceDetail> {
    return this.request('GET', `/api/v1/devices/${encodeURIComponent(controllerId)}`);
  }

  /** Rename, set the BSP, add or remove tags. */
  updateDevice(controllerId: string, change: { name?: string; bsp?: string; addTags?: string[]; removeTags?: string[] }): Promise<DeviceView> {
    return this.request('PATCH', `/api/v1/devices/${encodeURIComponent(controllerId)}`, { json: change });
  }

  /** Replace a device's TargetToken. */
  async rotateDeviceToken(controllerId: string): Promise<string> {
    return (await this.request<{ token: string }>('POST', `/api/v1/devices/${encodeURIComponent(controllerId)}/token`)).token;
  }

  /** Ask a device for a fresh TPM quote; its lamadist-attest sees the request at its next check. */
  requestAttestation(controllerId: string): Promise<{ tenant: string; controllerId: string; requestedAt: string }> {
    return this.request('POST', `/api/v1/devices/${encodeURIComponent(controllerId)}/attestation/request`);
  }

  /** Create or replace the tenant's GatewayToken. */
  async gatewayToken(tenant = this.opts.tenant ?? 'DEFAULT'): Promise<string> {
    return (await this.request<{ token: string }>('POST', `/api/v1/tenants/${encodeURIComponent(tenant)}/gateway-token`)).token;
  }

  /** Upload a bundle; the server verifies signature and compatible before storing it. */
  async uploadRelease(file: string, o: { filename?: string } = {}): Promise<{ release: ReleaseView; created: boolean }> {
    const st = await fs.stat(file).catch(() => undefined);
    if (!st?.isFile()) throw new UserError('LAMA_E_NOT_FOUND', `bundle ${file} does not exist`);
    const q = o.filename ? `?filename=${encodeURIComponent(o.filename)}` : '';
    return this.request('POST', `/api/v1/releases${q}`, { stream: createReadStream(file), length: st.size });
  }

  /** All releases, newest first. */
  listReleases(): Promise<ReleaseView[]> {
    return this.request('GET', '/api/v1/releases');
  }

  /** One release by id. */
  getRelease(id: number): Promise<ReleaseView> {
    return this.request('GET', `/api/v1/releases/${id}`);
  }

  /** Create (and by default start) a rollout. */
  createRollout(input: {
    releaseId: number;
    name?: string;
    filter?: TargetFilter;
    waves?: WaveSpec[];
    successThreshold?: number;
    errorThreshold?: number;
    start?: boolean;
    /** Offer the release only to attested devices; the others are held back. */
    requireAttestation?: boolean;
  }): Promise<RolloutView> {
    const q = this.opts.tenant ? `?tenant=${encodeURIComponent(this.opts.tenant)}` : '';
    return this.request('POST', `/api/v1/rollouts${q}`, { json: input });
  }

  /** All rollouts with per-wave progress, newest first. */
  listRollouts(): Promise<RolloutView[]> {
    return this.request('GET', '/api/v1/rollouts');
  }

  /** One rollout with per-wave progress. */
  getRollout(id: number): Promise<RolloutView> {
    return this.request('GET', `/api/v1/rollouts/${id}`);
  }

  /** start, pause, resume or cancel a rollout. */
  rolloutOp(id: number, op: 'start' | 'pause' | 'resume' | 'cancel'): Promise<RolloutView> {
    return this.request('POST', `/api/v1/rollouts/${id}/${op}`);
  }

  /** The audit log of management changes, newest first. */
  audit(limit?: number): Promise<{ id: number; time: string; actor: string; action: string; target: string; details: unknown }[]> {
    return this.request('GET', `/api/v1/audit${limit ? `?limit=${limit}` : ''}`);
  }

  /** Devices by version and status, and the overdue ones. */
  overview(): Promise<Overview> {
    const q = this.opts.tenant ? `?tenant=${encodeURIComponent(this.opts.tenant)}` : '';
    return this.request('GET', `/api/v1/overview${q}`);
  }

  /** Prometheus exposition text. */
  metrics(): Promise<string> {
    return this.request('GET', '/metrics', undefined, true);
  }
}
