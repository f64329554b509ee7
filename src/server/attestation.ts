import { randomBytes } from 'node:crypto';
import type { FastifyInstance } from 'fastify';
import { appraise, parseAkPublic, type PcrCheck, type SecureBootKeys } from '../attestation/index.js';
import { UserError } from '../errors.js';
import { nowMs, type Database } from './db.js';
import type { DeviceRow, FleetService } from './service.js';
import type { Kysely } from 'kysely';

/**
 * Remote attestation as a LamaDist extension of the DDI API (docs/attestation.md): a device pins
 * its TPM attestation key once, asks for a nonce, and posts a quote over PCRs 7, 10 and 11 with the
 * logs that explain them. The server keeps, per device, one outstanding nonce and the verdict of the
 * last quote. Stock DDI clients never call these routes and see no difference.
 */

export type AttestationState = 'attested' | 'failed' | 'unknown';

/** A device's attestation as the management API shows it. */
export interface AttestationView {
  state: AttestationState;
  /** Why it failed (the PCRs that differ and why), empty otherwise. */
  reason: string;
  checkedAt: string | null;
  akName: string | null;
  checks: PcrCheck[];
}

export const UNATTESTED: AttestationView = { state: 'unknown', reason: '', checkedAt: null, akName: null, checks: [] };

export interface AttestationOptions {
  /** The fleet's PK, KEK and db signature lists; without them PCR 7 cannot be judged. */
  secureBoot?: SecureBootKeys;
  /** How long a nonce is accepted (default 5 minutes). */
  nonceTtlMs?: number;
}

/** PCR 11 predictions of one host's UKI in one slot of a release. */
export interface Pcr11Prediction {
  machineId: string;
  slot: 'a' | 'b';
  values: string[];
}

type Row = Database['attestations'];

const LIMITS = { key: 2048, quote: 2048, signature: 2048, eventLog: 1 << 20, imaLog: 6 << 20 } as const;
const MACHINE_ID = /^[0-9a-f]{32}$/;

function b64(text: unknown, field: keyof typeof LIMITS): Buffer {
  if (typeof text !== 'string' || !/^[A-Za-z0-9+/]*={0,2}$/.test(text)) throw new UserError('LAMA_E_ATTEST_REQUEST', `${field} must be base64`);
  const b = Buffer.from(text, 'base64');
  if (b.length > LIMITS[field]) throw new UserError('LAMA_E_ATTEST_REQUEST', `${field} is ${b.length} bytes; at most ${LIMITS[field]}`);
  return b;
}

function viewOf(r: Row): AttestationView {
  return {
    state: r.state as AttestationState,
    reason: r.reason,
    checkedAt: r.checked_at === null ? null : new Date(r.checked_at).toISOString(),
    akName: r.ak_name,
    checks: JSON.parse(r.checks) as PcrCheck[],
  };
}

/** Attestation of these devices, by device id (devices that never attested are absent). */
export async function attestationViews(db: Kysely<Database>, ids: readonly number[]): Promise<Map<number, AttestationView>> {
  const out = new Map<number, AttestationView>();
  for (let i = 0; i < ids.length; i += 500) {
    const rows = await db.selectFrom('attestations').selectAll().where('device_id', 'in', ids.slice(i, i + 500)).execute();
    for (const r of rows) out.set(r.device_id, viewOf(r as Row));
  }
  return out;
}

/** Devices by attestation state, for /metrics. */
export async function attestationCounts(db: Kysely<Database>): Promise<Record<AttestationState, number>> {
  const devices = await db.selectFrom('devices').select((eb) => eb.fn.countAll().as('n')).executeTakeFirstOrThrow();
  const rows = await db
    .selectFrom('attestations')
    .select(['state', (eb) => eb.fn.countAll().as('n')])
    .where('state', 'in', ['attested', 'failed'])
    .groupBy('state')
    .execute();
  const counts: Record<AttestationState, number> = { attested: 0, failed: 0, unknown: 0 };
  for (const r of rows) counts[r.state as AttestationState] = Number(r.n);
  counts.unknown = Number(devices.n) - counts.attested - counts.failed;
  return counts;
}

/** Store a release's PCR 11 predictions (at upload, with the release row). */
export async function savePcr11(db: Kysely<Database>, releaseId: number, predictions: readonly Pcr11Prediction[]): Promise<void> {
  for (const p of predictions) {
    await db.insertInto('release_pcr11').values({ release_id: releaseId, machine_id: p.machineId, slot: p.slot, pcr11: JSON.stringify(p.values) }).execute();
  }
}

/** The per-device state of the attestation extension over the fleet database. */
export class AttestationService {
  private readonly db: Kysely<Database>;
  private readonly ttl: number;

  constructor(
    private readonly svc: FleetService,
    private readonly opts: AttestationOptions,
  ) {
    this.db = svc.db;
    this.ttl = opts.nonceTtlMs ?? 5 * 60_000;
  }

  private async row(deviceId: number): Promise<Row | undefined> {
    return (await this.db.selectFrom('attestations').selectAll().where('device_id', '=', deviceId).executeTakeFirst()) as Row | undefined;
  }

  private async audit(device: DeviceRow, action: string, details: unknown): Promise<void> {
    await this.db
      .insertInto('audit')
      .values({ time: nowMs(), actor: `device:${device.controller_id}`, action, target: `${device.tenant}/${device.controller_id}`, details: JSON.stringify(details) })
      .execute();
  }

  /**
   * Pin the device's attestation key on first use. The same key again is fine; another one is
   * refused until an operator releases the pin (a replaced TPM, a re-provisioned device).
   */
  async registerKey(device: DeviceRow, body: { akPublic?: unknown; machineId?: unknown }): Promise<{ akName: string; created: boolean }> {
    const ak = parseAkPublic(b64(body.akPublic, 'key'));
    const machineId = body.machineId === undefined ? null : String(body.machineId);
    if (machineId !== null && !MACHINE_ID.test(machineId)) throw new UserError('LAMA_E_ATTEST_REQUEST', 'machineId must be 32 lower-case hex digits');
    const hex = ak.tpmt.toString('hex');
    // Insert-if-absent, then compare: of two first registrations racing, one pins and the other is
    // judged against what was pinned.
    const inserted = await this.db
      .insertInto('attestations')
      .values({
        device_id: device.id,
        ak_public: hex,
        ak_name: ak.name,
        machine_id: machineId,
        registered_at: nowMs(),
        nonce: null,
        nonce_expires: null,
        state: 'unknown',
        reason: '',
        checks: '[]',
        checked_at: null,
      })
      .onConflict((oc) => oc.column('device_id').doNothing())
      .executeTakeFirst();
    if (Number(inserted.numInsertedOrUpdatedRows ?? 0) !== 1) {
      const pinned = (await this.row(device.id)) as Row;
      if (pinned.ak_public !== hex || pinned.machine_id !== machineId) {
        throw new UserError('LAMA_E_ATTEST_AK_PINNED', `device already pinned attestation key ${pinned.ak_name}${pinned.machine_id ? ` for machine-id ${pinned.machine_id}` : ''}; an operator must release it first`);
      }
      return { akName: pinned.ak_name, created: false };
    }
    await this.audit(device, 'attestation.key', { akName: ak.name, machineId });
    return { akName: ak.name, created: true };
  }

  /** Forget a device's pinned key and verdict (management API). */
  async releaseKey(tenant: string, controllerId: string, actor: string): Promise<void> {
    const d = await this.db.selectFrom('devices').select('id').where('tenant', '=', tenant).where('controller_id', '=', controllerId).executeTakeFirst();
    if (!d) throw new UserError('LAMA_E_SERVER_NOT_FOUND', `device ${tenant}/${controllerId} is not registered`);
    await this.db.deleteFrom('attestations').where('device_id', '=', d.id).execute();
    await this.db.insertInto('audit').values({ time: nowMs(), actor, action: 'attestation.release-key', target: `${tenant}/${controllerId}`, details: '{}' }).execute();
  }

  /** A fresh nonce; it replaces any earlier one, so a device has at most one outstanding. */
  async issueNonce(device: DeviceRow): Promise<{ nonce: string; expiresAt: string }> {
    const row = await this.row(device.id);
    if (!row) throw new UserError('LAMA_E_ATTEST_NO_KEY', 'register an attestation key before asking for a nonce');
    const nonce = randomBytes(32);
    const expires = nowMs() + this.ttl;
    await this.db.updateTable('attestations').set({ nonce: nonce.toString('hex'), nonce_expires: expires }).where('device_id', '=', device.id).execute();
    return { nonce: nonce.toString('base64'), expiresAt: new Date(expires).toISOString() };
  }

  /** The PCR 11 values the device may show: those of the release it says it runs, for its machine-id. */
  private async expectedPcr11(deviceId: number, machineId: string | null): Promise<{ values: string[]; unknown?: string }> {
    const d = await this.db.selectFrom('devices').select('version').where('id', '=', deviceId).executeTakeFirstOrThrow();
    if (d.version === null) return { values: [], unknown: 'the device reports no running version (configData)' };
    let q = this.db
      .selectFrom('release_pcr11')
      .innerJoin('releases', 'releases.id', 'release_pcr11.release_id')
      .select(['release_pcr11.pcr11'])
      .where('releases.version', '=', d.version);
    if (machineId !== null) q = q.where('release_pcr11.machine_id', '=', machineId);
    const rows = await q.execute();
    if (rows.length === 0) {
      return { values: [], unknown: `no release ${d.version} with UKIs${machineId ? ` for machine-id ${machineId}` : ''} was uploaded to this server` };
    }
    return { values: [...new Set(rows.flatMap((r) => JSON.parse(r.pcr11) as string[]))] };
  }

  /**
   * Verify a quote against the outstanding nonce (used up whatever the outcome) and store the
   * verdict. A quote that proves nothing (bad signature, stale nonce, malformed) fails the device
   * and is answered with its LAMA_E_ATTEST_* error.
   */
  async submit(device: DeviceRow, body: Record<string, unknown>): Promise<{ state: AttestationState; checks: PcrCheck[] }> {
    const row = await this.row(device.id);
    if (!row) throw new UserError('LAMA_E_ATTEST_NO_KEY', 'register an attestation key before sending a quote');
    const pcrs = Object.fromEntries(Object.entries(body.pcrs as Record<string, string>).map(([k, v]) => [Number(k), Buffer.from(v, 'hex')]));
    const evidence = {
      quote: b64(body.quote, 'quote'),
      signature: b64(body.signature, 'signature'),
      akPublic: Buffer.from(row.ak_public, 'hex'),
      pcrs,
      ...(body.imaLog !== undefined && { imaLog: b64(body.imaLog, 'imaLog') }),
      ...(body.eventLog !== undefined && { eventLog: b64(body.eventLog, 'eventLog') }),
    };
    // Used up before it is checked, in one conditional update: two requests racing with one
    // nonce cannot both pass.
    const live = row.nonce !== null && row.nonce_expires !== null && row.nonce_expires > nowMs() ? row.nonce : null;
    let nonce = Buffer.alloc(0);
    if (live !== null) {
      const taken = await this.db
        .updateTable('attestations')
        .set({ nonce: null, nonce_expires: null })
        .where('device_id', '=', device.id)
        .where('nonce', '=', live)
        .executeTakeFirst();
      if (Number(taken.numUpdatedRows) === 1) nonce = Buffer.from(live, 'hex');
    }
    const expected = await this.expectedPcr11(device.id, row.machine_id);
    let state: AttestationState;
    let checks: PcrCheck[];
    let failure: UserError | undefined;
    try {
      const verdict = appraise(
        { ...evidence, nonce },
        { pcr11: expected.values, ...(expected.unknown && { pcr11Unknown: expected.unknown }), ...(this.opts.secureBoot && { secureBoot: this.opts.secureBoot }) },
      );
      state = verdict.state;
      checks = verdict.checks;
    } catch (err) {
      if (!(err instanceof UserError)) throw err;
      failure = err;
      state = 'failed';
      checks = [];
    }
    const reason = failure ? `quote refused: ${failure.line()}` : checks.filter((c) => !c.ok).map((c) => `PCR ${c.pcr}: ${c.reason}`).join('; ');
    await this.db
      .updateTable('attestations')
      .set({ state, reason, checks: JSON.stringify(checks), checked_at: nowMs() })
      .where('device_id', '=', device.id)
      .execute();
    if (state !== row.state || reason !== row.reason) await this.audit(device, `attestation.${state}`, { reason });
    this.svc.counters[state === 'attested' ? 'quotesAttested' : 'quotesFailed']++;
    if (failure) throw failure;
    return { state, checks };
  }
}

const b64Field = { type: 'string', maxLength: 9 << 20 } as const;
const hex32 = { type: 'string', pattern: '^[0-9a-fA-F]{64}$' } as const;

/**
 * The extension's routes under the DDI prefix. Registered inside the DDI plugin, so they are
 * authenticated like every DDI request (TargetToken, GatewayToken or client certificate).
 */
export function registerAttestationRoutes(r: FastifyInstance, att: AttestationService): void {
  const base = '/:tenant/controller/v1/:controllerId/attestation';
  const keyBody = { type: 'object', additionalProperties: false, required: ['akPublic'], properties: { akPublic: b64Field, machineId: { type: 'string' } } };
  r.post(`${base}/key`, { schema: { hide: true, body: keyBody } }, async (req, reply) => {
    const out = await att.registerKey(req.device as DeviceRow, req.body as { akPublic: string; machineId?: string });
    return reply.code(out.created ? 201 : 200).send(out);
  });
  r.post(`${base}/nonce`, { schema: { hide: true } }, async (req) => att.issueNonce(req.device as DeviceRow));
  const quoteBody = {
    type: 'object',
    additionalProperties: false,
    required: ['quote', 'signature', 'pcrs'],
    properties: {
      quote: b64Field,
      signature: b64Field,
      imaLog: b64Field,
      eventLog: b64Field,
      pcrs: { type: 'object', additionalProperties: false, required: ['7', '10', '11'], properties: { 7: hex32, 10: hex32, 11: hex32 } },
    },
  };
  // IMA lists of a running system reach megabytes; every other DDI body stays under 64 KiB.
  r.post(`${base}/quote`, { bodyLimit: 10 << 20, schema: { hide: true, body: quoteBody } }, async (req) =>
    att.submit(req.device as DeviceRow, req.body as Record<string, unknown>),
  );
}
