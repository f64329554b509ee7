import { createHash, randomBytes, timingSafeEqual } from 'node:crypto';
import type { FastifyInstance } from 'fastify';
import {
  appraise,
  makeCredential,
  parseAkPublic,
  parseEkCertificate,
  parseEkPublic,
  verifyEkCertificate,
  type EkCertificateInfo,
  type EkTrust,
  type PcrCheck,
  type SecureBootKeys,
} from '../attestation/index.js';
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
  /** The EK certificate the device sent with its key; `bound`: the key was bound to it under --ek-ca. */
  ek: (EkCertificateInfo & { bound: boolean }) | null;
}

export const UNATTESTED: AttestationView = { state: 'unknown', reason: '', checkedAt: null, akName: null, checks: [], ek: null };

export interface AttestationOptions {
  /** The fleet's PK, KEK and db signature lists; without them PCR 7 cannot be judged. */
  secureBoot?: SecureBootKeys;
  /** How long a nonce, or a credential-activation challenge, is accepted (default 5 minutes). */
  nonceTtlMs?: number;
  /**
   * The trusted EK CAs (`--ek-ca`). With them a key is pinned only when it comes with an EK
   * certificate chaining to one of them and the device proves, by credential activation, that the
   * key lives in the TPM of that EK. Without them keys are pinned on first use.
   */
  ekTrust?: EkTrust;
}

/** PCR 11 predictions of one host's UKI in one slot of a release. */
export interface Pcr11Prediction {
  machineId: string;
  slot: 'a' | 'b';
  values: string[];
}

type Row = Omit<Database['attestations'], 'ek_bound'> & { ek_bound: number };

/** What a device sends to register its key. */
interface KeyBody {
  akPublic?: unknown;
  machineId?: unknown;
  ekPublic?: unknown;
  ekCertificate?: unknown;
}

/** The key endpoint's answer; under --ek-ca, a challenge until the device answers it. */
interface KeyAnswer {
  akName: string;
  created: boolean;
  challenge?: { credentialBlob: string; encryptedSecret: string; expiresAt: string };
}

function pinConflict(pinned: { ak_name: string; machine_id: string | null }): UserError {
  return new UserError('LAMA_E_ATTEST_AK_PINNED', `device already pinned attestation key ${pinned.ak_name}${pinned.machine_id ? ` for machine-id ${pinned.machine_id}` : ''}; an operator must release it first`);
}

const LIMITS = { key: 2048, ekPublic: 2048, ekCertificate: 8192, secret: 64, quote: 2048, signature: 2048, eventLog: 1 << 20, imaLog: 6 << 20 } as const;
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
    ek: r.ek_info === null ? null : { ...(JSON.parse(r.ek_info) as EkCertificateInfo), bound: r.ek_bound === 1 },
  };
}

/**
 * Attestation of these devices, by device id (devices that never attested are absent). A device
 * with no pinned key whose last registration was refused is unknown, with that reason.
 */
export async function attestationViews(db: Kysely<Database>, ids: readonly number[]): Promise<Map<number, AttestationView>> {
  const out = new Map<number, AttestationView>();
  for (let i = 0; i < ids.length; i += 500) {
    const slice = ids.slice(i, i + 500);
    const rows = await db.selectFrom('attestations').selectAll().where('device_id', 'in', slice).execute();
    for (const r of rows) out.set(r.device_id, viewOf(r as Row));
    const refused = await db.selectFrom('attestation_pending').select(['device_id', 'reason']).where('device_id', 'in', slice).where('reason', '!=', '').execute();
    for (const r of refused) if (!out.has(r.device_id)) out.set(r.device_id, { ...UNATTESTED, reason: r.reason });
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
   * Register the device's attestation key. Without --ek-ca it is pinned on first use: the same key
   * again is fine, another one is refused until an operator releases the pin, and an EK certificate
   * sent with it is kept for information. With --ek-ca the key must come with an EK certificate
   * chaining to a trusted CA for the EK sent; the answer is then a credential-activation challenge
   * (`activateKey` pins the key).
   */
  async registerKey(device: DeviceRow, body: KeyBody): Promise<KeyAnswer> {
    const ak = parseAkPublic(b64(body.akPublic, 'key'));
    const machineId = body.machineId === undefined ? null : String(body.machineId);
    if (machineId !== null && !MACHINE_ID.test(machineId)) throw new UserError('LAMA_E_ATTEST_REQUEST', 'machineId must be 32 lower-case hex digits');
    if (body.ekCertificate !== undefined && body.ekPublic === undefined) throw new UserError('LAMA_E_ATTEST_REQUEST', 'ekCertificate needs the ekPublic it certifies');
    const hex = ak.tpmt.toString('hex');
    const pinned = await this.row(device.id);
    if (pinned && (pinned.ak_public !== hex || pinned.machine_id !== machineId)) throw pinConflict(pinned);
    if (this.opts.ekTrust) return this.challenge(device, ak, machineId, body, this.opts.ekTrust, pinned);
    const ekPublic = body.ekPublic === undefined ? null : parseEkPublic(b64(body.ekPublic, 'ekPublic')).tpmt.toString('hex');
    const cert = body.ekCertificate === undefined ? undefined : parseEkCertificate(b64(body.ekCertificate, 'ekCertificate'));
    const ek = { ek_public: ekPublic, ek_certificate: cert?.der.toString('hex') ?? null, ek_info: cert ? JSON.stringify(cert.info) : null };
    if (pinned) {
      // Another EK or certificate than the one the key was bound to (under --ek-ca) is not bound.
      if (pinned.ek_public !== ek.ek_public || pinned.ek_certificate !== ek.ek_certificate) {
        await this.db.updateTable('attestations').set({ ...ek, ek_bound: 0 }).where('device_id', '=', device.id).execute();
      }
      return { akName: pinned.ak_name, created: false };
    }
    return this.pin(device, ak, machineId, { ...ek, ek_bound: 0 });
  }

  /**
   * Pin a key: insert-if-absent, then compare, so of two first registrations racing one pins and
   * the other is judged against what was pinned.
   */
  private async pin(
    device: DeviceRow,
    ak: { tpmt: Buffer; name: string },
    machineId: string | null,
    ek: { ek_public: string | null; ek_certificate: string | null; ek_info: string | null; ek_bound: number },
  ): Promise<KeyAnswer> {
    const hex = ak.tpmt.toString('hex');
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
        ...ek,
      })
      .onConflict((oc) => oc.column('device_id').doNothing())
      .executeTakeFirst();
    if (Number(inserted.numInsertedOrUpdatedRows ?? 0) !== 1) {
      const pinned = (await this.row(device.id)) as Row;
      if (pinned.ak_public !== hex || pinned.machine_id !== machineId) throw pinConflict(pinned);
      if (ek.ek_bound === 1) await this.db.updateTable('attestations').set(ek).where('device_id', '=', device.id).execute();
      return { akName: pinned.ak_name, created: false };
    }
    await this.audit(device, 'attestation.key', { akName: ak.name, machineId, ...(ek.ek_info && { ek: JSON.parse(ek.ek_info) as unknown, bound: ek.ek_bound === 1 }) });
    return { akName: ak.name, created: true };
  }

  /**
   * Record why a key registration or activation was refused: a device with a pinned key is failed
   * with that reason, one without stays unknown and shows it.
   */
  private async refuseKey(device: DeviceRow, err: UserError, pinned: Row | undefined): Promise<never> {
    const reason = `attestation key refused: ${err.line()}`;
    if (pinned) {
      await this.db.updateTable('attestations').set({ state: 'failed', reason, checks: '[]', checked_at: nowMs() }).where('device_id', '=', device.id).execute();
    } else {
      const row = { ak_public: null, ak_name: null, machine_id: null, ek_public: null, ek_certificate: null, ek_info: null, secret_hash: null, expires: null, reason, updated_at: nowMs() };
      await this.db
        .insertInto('attestation_pending')
        .values({ device_id: device.id, ...row })
        .onConflict((oc) => oc.column('device_id').doUpdateSet(row))
        .execute();
    }
    await this.audit(device, 'attestation.key-refused', { reason });
    throw err;
  }

  /**
   * Under --ek-ca: check the EK certificate, then answer with TPM2_MakeCredential of a fresh secret
   * for the AK's name under the EK. The device has one outstanding challenge: a new registration
   * replaces it.
   */
  private async challenge(device: DeviceRow, ak: { tpmt: Buffer; name: string }, machineId: string | null, body: KeyBody, trust: EkTrust, pinned: Row | undefined): Promise<KeyAnswer> {
    if (pinned?.ek_bound === 1) return { akName: pinned.ak_name, created: false };
    let made: { ekPublic: Buffer; der: Buffer; info: EkCertificateInfo; credential: { credentialBlob: Buffer; encryptedSecret: Buffer }; secret: Buffer };
    try {
      if (body.ekCertificate === undefined || body.ekPublic === undefined) {
        throw new UserError('LAMA_E_ATTEST_EK_CERT', 'this server requires an EK certificate (--ek-ca) and the device sent none');
      }
      const ek = parseEkPublic(b64(body.ekPublic, 'ekPublic'));
      const cert = parseEkCertificate(b64(body.ekCertificate, 'ekCertificate'));
      verifyEkCertificate(cert, trust, ek);
      const secret = randomBytes(32);
      made = { ekPublic: ek.tpmt, der: cert.der, info: cert.info, credential: makeCredential(ek, Buffer.from(ak.name, 'hex'), secret), secret };
    } catch (err) {
      if (!(err instanceof UserError)) throw err;
      return this.refuseKey(device, err, pinned);
    }
    const expires = nowMs() + this.ttl;
    const row = {
      ak_public: ak.tpmt.toString('hex'),
      ak_name: ak.name,
      machine_id: machineId,
      ek_public: made.ekPublic.toString('hex'),
      ek_certificate: made.der.toString('hex'),
      ek_info: JSON.stringify(made.info),
      secret_hash: createHash('sha256').update(made.secret).digest('hex'),
      expires,
      reason: '',
      updated_at: nowMs(),
    };
    await this.db
      .insertInto('attestation_pending')
      .values({ device_id: device.id, ...row })
      .onConflict((oc) => oc.column('device_id').doUpdateSet(row))
      .execute();
    return {
      akName: ak.name,
      created: false,
      challenge: {
        credentialBlob: made.credential.credentialBlob.toString('base64'),
        encryptedSecret: made.credential.encryptedSecret.toString('base64'),
        expiresAt: new Date(expires).toISOString(),
      },
    };
  }

  /**
   * The device's answer to its challenge: the secret TPM2_ActivateCredential recovered. The
   * challenge is used up whatever the answer (a replayed or wrong one is refused and the device
   * registers again); the right one pins the key, bound to the certified EK.
   */
  async activateKey(device: DeviceRow, body: { secret?: unknown }): Promise<KeyAnswer> {
    if (!this.opts.ekTrust) throw new UserError('LAMA_E_ATTEST_REQUEST', 'this server pins keys on first use (no --ek-ca): there is nothing to activate');
    const secret = b64(body.secret, 'secret');
    const pending = await this.db.selectFrom('attestation_pending').selectAll().where('device_id', '=', device.id).executeTakeFirst();
    const pinned = await this.row(device.id);
    const fail = (message: string): Promise<never> => this.refuseKey(device, new UserError('LAMA_E_ATTEST_ACTIVATION', message), pinned);
    if (!pending?.secret_hash) return fail('no outstanding credential challenge (answered already, or never asked): register the key again');
    // Used up before it is compared, in one conditional update: two answers racing cannot both pass.
    const taken = await this.db
      .updateTable('attestation_pending')
      .set({ secret_hash: null, expires: null })
      .where('device_id', '=', device.id)
      .where('secret_hash', '=', pending.secret_hash)
      .executeTakeFirst();
    if (Number(taken.numUpdatedRows) !== 1) return fail('no outstanding credential challenge (answered already, or never asked): register the key again');
    if ((pending.expires ?? 0) <= nowMs()) return fail('the credential challenge expired: register the key again');
    const answer = createHash('sha256').update(secret).digest();
    if (!timingSafeEqual(answer, Buffer.from(pending.secret_hash, 'hex'))) {
      return fail('the secret is not the one the credential protected: the key is not in the TPM of the certified EK');
    }
    const ak = { tpmt: Buffer.from(pending.ak_public as string, 'hex'), name: pending.ak_name as string };
    const out = await this.pin(device, ak, pending.machine_id, { ek_public: pending.ek_public, ek_certificate: pending.ek_certificate, ek_info: pending.ek_info, ek_bound: 1 });
    await this.db.deleteFrom('attestation_pending').where('device_id', '=', device.id).execute();
    return out;
  }

  /** Forget a device's pinned key and verdict (management API). */
  async releaseKey(tenant: string, controllerId: string, actor: string): Promise<void> {
    const d = await this.db.selectFrom('devices').select('id').where('tenant', '=', tenant).where('controller_id', '=', controllerId).executeTakeFirst();
    if (!d) throw new UserError('LAMA_E_SERVER_NOT_FOUND', `device ${tenant}/${controllerId} is not registered`);
    await this.db.deleteFrom('attestations').where('device_id', '=', d.id).execute();
    await this.db.deleteFrom('attestation_pending').where('device_id', '=', d.id).execute();
    await this.db.insertInto('audit').values({ time: nowMs(), actor, action: 'attestation.release-key', target: `${tenant}/${controllerId}`, details: '{}' }).execute();
  }

  /**
   * An operator asks a device for a fresh quote: one time on its device row (asking again moves it
   * forward), which the base poll names to the device as a link until a quote made with a nonce
   * issued at or after that time is judged.
   */
  async requestQuote(tenant: string, controllerId: string, actor: string): Promise<{ tenant: string; controllerId: string; requestedAt: string }> {
    const at = nowMs();
    const set = await this.db
      .updateTable('devices')
      .set({ attestation_requested_at: at })
      .where('tenant', '=', tenant)
      .where('controller_id', '=', controllerId)
      .executeTakeFirst();
    if (Number(set.numUpdatedRows) !== 1) throw new UserError('LAMA_E_SERVER_NOT_FOUND', `device ${tenant}/${controllerId} is not registered`);
    await this.db.insertInto('audit').values({ time: at, actor, action: 'attestation.request', target: `${tenant}/${controllerId}`, details: '{}' }).execute();
    this.svc.forgetDevice(tenant, controllerId);
    return { tenant, controllerId, requestedAt: new Date(at).toISOString() };
  }

  /** A fresh nonce; it replaces any earlier one, so a device has at most one outstanding. */
  async issueNonce(device: DeviceRow): Promise<{ nonce: string; expiresAt: string }> {
    const row = await this.row(device.id);
    if (!row) throw new UserError('LAMA_E_ATTEST_NO_KEY', 'register an attestation key before asking for a nonce');
    if (this.opts.ekTrust && row.ek_bound !== 1) {
      throw new UserError('LAMA_E_ATTEST_NO_KEY', `attestation key ${row.ak_name} is not bound to a certified EK, which this server requires (--ek-ca): register it again`);
    }
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
    let issuedAt: number | undefined;
    if (live !== null) {
      const taken = await this.db
        .updateTable('attestations')
        .set({ nonce: null, nonce_expires: null })
        .where('device_id', '=', device.id)
        .where('nonce', '=', live)
        .executeTakeFirst();
      if (Number(taken.numUpdatedRows) === 1) {
        nonce = Buffer.from(live, 'hex');
        // Issued one lifetime before it expires (issueNonce).
        issuedAt = (row.nonce_expires as number) - this.ttl;
      }
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
    // An operator's request is answered by a quote whose nonce was issued at or after it, whatever
    // the verdict. One made while an older nonce was out stays, so the device is asked again.
    if (issuedAt !== undefined) {
      const answered = await this.db
        .updateTable('devices')
        .set({ attestation_requested_at: null })
        .where('id', '=', device.id)
        .where('attestation_requested_at', '<=', issuedAt)
        .executeTakeFirst();
      if (Number(answered.numUpdatedRows) === 1) this.svc.forgetDevice(device.tenant, device.controller_id);
    }
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
  const keyBody = {
    type: 'object',
    additionalProperties: false,
    required: ['akPublic'],
    properties: { akPublic: b64Field, machineId: { type: 'string' }, ekPublic: b64Field, ekCertificate: b64Field },
  };
  r.post(`${base}/key`, { schema: { hide: true, body: keyBody } }, async (req, reply) => {
    const out = await att.registerKey(req.device as DeviceRow, req.body as KeyBody);
    return reply.code(out.challenge ? 202 : out.created ? 201 : 200).send(out);
  });
  const activateBody = { type: 'object', additionalProperties: false, required: ['secret'], properties: { secret: b64Field } };
  r.post(`${base}/key/activate`, { schema: { hide: true, body: activateBody } }, async (req, reply) => {
    const out = await att.activateKey(req.device as DeviceRow, req.body as { secret: string });
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
