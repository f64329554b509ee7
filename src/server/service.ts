import type { CompiledQuery, Kysely, Transaction } from 'kysely';
import { BSPS } from '../bsp/index.js';
import { UserError, type ErrorCode } from '../errors.js';
import { UNATTESTED, attestationViews, savePcr11, type AttestationView, type Pcr11Prediction } from './attestation.js';
import { hashToken, newToken, tokenMatches } from './auth.js';
import { nowMs, sql, type Database, type OpenDb, type ReleaseFields } from './db.js';
import {
  DONE_STATES,
  assignWaves,
  checkFilter,
  decideWave,
  matchesFilter,
  planWaveSizes,
  type ActionState,
  type TargetFilter,
  type WaveCounts,
  type WaveSpec,
} from './rollout.js';

type Db = Kysely<Database> | Transaction<Database>;
type DeviceRow = Database['devices'] & { id: number };
type ReleaseRow = Database['releases'] & { id: number };
type ActionRow = Database['actions'] & { id: number };
type RolloutRow = Database['rollouts'] & { id: number };

export interface ServiceOptions {
  /** Seconds between device polls, sent as `config.polling.sleep`. */
  pollSeconds: number;
  /** configData attribute carrying the running version (verified-boot success). */
  versionAttribute: string;
  /** configData attribute carrying the kernel boot id, to tell a report from before the reboot. */
  bootIdAttribute: string;
}

export type DeviceStatus = 'registered' | 'online' | 'overdue';

/** A device as the management API shows it. */
export interface DeviceView {
  tenant: string;
  controllerId: string;
  name: string;
  bsp: string | null;
  tags: string[];
  attributes: Record<string, string>;
  version: string | null;
  lastSeen: string | null;
  status: DeviceStatus;
  hasToken: boolean;
  /**
   * Remote attestation (LamaDist extension): the verdict on the device's last TPM quote, and when an
   * operator asked for a fresh one that is not judged yet (null: none pending).
   */
  attestation: AttestationView & { requestedAt: string | null };
}

export interface ReleaseView extends ReleaseFields {
  id: number;
  createdAt: string;
}

export interface RolloutView {
  id: number;
  name: string;
  releaseId: number;
  releaseVersion: string;
  filter: TargetFilter;
  waves: WaveSpec[];
  successThreshold: number;
  errorThreshold: number;
  status: string;
  currentWave: number;
  /** Offered only to devices attested when their wave starts. */
  requireAttestation: boolean;
  /** Devices left out for not being attested: not offered the release, not counted as failures. */
  heldBack: string[];
  /** Per wave: device count and counts by action state. */
  progress: { wave: number; size: number; states: WaveCounts }[];
  createdAt: string;
}

export interface ActionView {
  id: number;
  releaseId: number;
  releaseVersion: string;
  rolloutId: number | null;
  wave: number;
  state: ActionState;
  updatedAt: string;
  history: { time: string; execution: string; finished: string; details: string[] }[];
}

/** What a device's base poll should be told. */
export interface PollAnswer {
  deploy?: number;
  cancel?: number;
  configData: boolean;
}

/** DDI feedback as the device sends it (both the old `{id,time,status}` and the newer `{status}` form). */
export interface Feedback {
  execution: string;
  finished: string;
  details: string[];
}

const EXECUTIONS = new Set(['closed', 'proceeding', 'canceled', 'scheduled', 'rejected', 'resumed', 'downloaded', 'download']);
const FINISHED = new Set(['success', 'failure', 'none']);

/**
 * A JSON scalar as the string hawkBit's DDI models hold (its JSON mapper turns numbers and booleans
 * into strings too); anything else is refused rather than turned into `[object Object]` or a throw.
 */
function ddiString(v: unknown, code: ErrorCode, what: string): string {
  if (typeof v === 'string') return v;
  if (typeof v === 'number' || typeof v === 'boolean') return String(v);
  throw new UserError(code, `${what} must be a string, not ${v === null ? 'null' : Array.isArray(v) ? 'an array' : typeof v}`);
}

/** Validate the `status` object of a DDI feedback body. */
export function parseFeedback(body: unknown): Feedback {
  const status = (body as { status?: unknown } | null)?.status as
    | { execution?: unknown; result?: { finished?: unknown }; details?: unknown }
    | undefined;
  const execution = typeof status?.execution === 'string' ? status.execution.toLowerCase() : '';
  const finished = typeof status?.result?.finished === 'string' ? status.result.finished.toLowerCase() : '';
  if (!EXECUTIONS.has(execution)) throw new UserError('LAMA_E_DDI_FEEDBACK', `status.execution '${execution}' is not a DDI execution state`);
  if (!FINISHED.has(finished)) throw new UserError('LAMA_E_DDI_FEEDBACK', `status.result.finished '${finished}' is not success, failure or none`);
  const raw = status?.details ?? [];
  if (!Array.isArray(raw)) throw new UserError('LAMA_E_DDI_FEEDBACK', 'status.details must be a list of strings');
  const details = raw.slice(0, 100).map((d, i) => ddiString(d, 'LAMA_E_DDI_FEEDBACK', `status.details[${i}]`));
  return { execution, finished, details };
}

/**
 * What one device may store as attributes, in total over every configData request and in the
 * management API. rauc-hawkbit-updater sends a handful of short ones (its `[device]` section);
 * hawkBit's own default quota is 100 entries per target.
 */
export const ATTRIBUTE_LIMITS = { keys: 100, keyChars: 128, valueChars: 1024, totalBytes: 16 * 1024 } as const;

/** Refuse attributes beyond ATTRIBUTE_LIMITS; the total is the size of the stored JSON. */
function checkAttributes(attrs: ReadonlyMap<string, string>, code: ErrorCode): string {
  const { keys, keyChars, valueChars, totalBytes } = ATTRIBUTE_LIMITS;
  for (const [k, v] of attrs) {
    if (k.length === 0 || k.length > keyChars) throw new UserError(code, `attribute name '${k.slice(0, 40)}${k.length > 40 ? '…' : ''}' must be 1-${keyChars} characters`);
    if (v.length > valueChars) throw new UserError(code, `attribute '${k}' is ${v.length} characters; at most ${valueChars}`);
  }
  if (attrs.size > keys) throw new UserError(code, `a device stores at most ${keys} attributes; this would make ${attrs.size}`);
  const json = JSON.stringify(Object.fromEntries(attrs));
  const bytes = Buffer.byteLength(json);
  if (bytes > totalBytes) throw new UserError(code, `a device stores at most ${totalBytes} bytes of attributes; this would make ${bytes}`);
  return json;
}

const iso = (ms: number | null): string | null => (ms === null ? null : new Date(ms).toISOString());
const parseJson = <T>(s: string): T => JSON.parse(s) as T;
const CONTROLLER_ID = /^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$/;
const TENANT = /^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$/;
/** How long a device record or a download entitlement is trusted from memory; changes through this process drop it at once. */
const LOOKUP_CACHE_MS = 60_000;

/** Validate a controller id (also keeps path tricks out of URLs built from it). */
export function checkControllerId(id: string): string {
  if (!CONTROLLER_ID.test(id)) throw new UserError('LAMA_E_SERVER_BAD_ID', `controller id '${id}' must be 1-128 of A-Z a-z 0-9 . _ : -`);
  return id;
}

/** Validate a tenant name. */
export function checkTenant(t: string): string {
  if (!TENANT.test(t)) throw new UserError('LAMA_E_SERVER_BAD_ID', `tenant '${t}' must be 1-64 of A-Z a-z 0-9 _ -`);
  return t;
}

function compatibleOf(bsp: string | null): string | undefined {
  return bsp ? BSPS.find((b) => b.name === bsp)?.compatible : undefined;
}

/**
 * The fleet's state machine over the database: devices, releases, rollouts, actions and the audit
 * log. The HTTP layers (DDI and management) are thin adapters over this class.
 */
export class FleetService {
  readonly db: Kysely<Database>;
  readonly dialect: OpenDb['dialect'];
  readonly opts: ServiceOptions;
  /** Poll times not yet written; flushed in one transaction per second instead of one write per poll. */
  private seen = new Map<number, number>();
  private flushTimer: NodeJS.Timeout;
  private authCache = new Map<string, { row: DeviceRow; at: number }>();
  private downloadCache = new Map<string, { release: ReleaseRow; at: number }>();
  /** Serialises rollout decisions within this process (the conditional UPDATE guards across processes). */
  private rolloutLock: Promise<unknown> = Promise.resolve();
  readonly counters = { polls: 0, feedback: 0, artifactRequests: 0, artifactBytes: 0, uploadsAccepted: 0, uploadsRefused: 0, authFailures: 0, quotesAttested: 0, quotesFailed: 0 };

  private readonly pollQuery: CompiledQuery;

  constructor(open: OpenDb, opts: ServiceOptions) {
    this.db = open.db;
    this.pollQuery = this.db
      .selectFrom('actions')
      .select(['id', 'state'])
      .where('device_id', '=', 0)
      .where('state', 'in', [sql.lit('pending'), sql.lit('running'), sql.lit('canceling'), sql.lit('installed')])
      .orderBy('id')
      .compile();
    this.dialect = open.dialect;
    this.opts = opts;
    this.flushTimer = setInterval(() => void this.flushSeen().catch(() => undefined), 1000);
    this.flushTimer.unref();
  }

  /** Write pending poll times and stop the timer. */
  async close(): Promise<void> {
    clearInterval(this.flushTimer);
    await this.flushSeen();
  }

  /** Persist batched last-seen times. */
  async flushSeen(): Promise<void> {
    if (this.seen.size === 0) return;
    const batch = [...this.seen];
    this.seen.clear();
    // One UPDATE per few hundred devices (a CASE over ids), so thousands of polls per second cost a
    // handful of statements instead of one each.
    await this.db.transaction().execute(async (trx) => {
      for (let i = 0; i < batch.length; i += 300) {
        const chunk = batch.slice(i, i + 300);
        const cases = sql.join(chunk.map(([id, at]) => sql`when ${id} then cast(${at} as bigint)`), sql` `);
        await trx
          .updateTable('devices')
          .set({ last_seen: sql<number>`case id ${cases} end` })
          .where('id', 'in', chunk.map(([id]) => id))
          .execute();
      }
    });
  }

  private async audit(trx: Db, actor: string, action: string, target: string, details: unknown): Promise<void> {
    await trx
      .insertInto('audit')
      .values({ time: nowMs(), actor, action, target, details: JSON.stringify(details ?? {}) })
      .execute();
  }

  /** Drop the cached records of a device whose row changed, so its next request reads the new one. */
  forgetDevice(tenant: string, controllerId: string): void {
    this.authCache.delete(`${tenant}/${controllerId}`);
    for (const k of this.downloadCache.keys()) if (k.startsWith(`${tenant}/${controllerId}/`)) this.downloadCache.delete(k);
  }

  // ---- tenants ----

  private async ensureTenant(trx: Db, tenant: string): Promise<void> {
    const t = await trx.selectFrom('tenants').select('name').where('name', '=', tenant).executeTakeFirst();
    if (!t) await trx.insertInto('tenants').values({ name: tenant, gateway_token_hash: null, created_at: nowMs() }).execute();
  }

  /** Create or replace the tenant's gateway token; returns the token (shown once, stored hashed). */
  async rotateGatewayToken(tenant: string, actor: string): Promise<string> {
    checkTenant(tenant);
    const token = newToken();
    await this.db.transaction().execute(async (trx) => {
      await this.ensureTenant(trx, tenant);
      await trx.updateTable('tenants').set({ gateway_token_hash: hashToken(token) }).where('name', '=', tenant).execute();
      await this.audit(trx, actor, 'tenant.gateway-token', tenant, {});
    });
    return token;
  }

  // ---- devices ----

  private view(row: DeviceRow, attestation: AttestationView = UNATTESTED, now = nowMs()): DeviceView {
    const lastSeen = this.seen.get(row.id) ?? row.last_seen;
    const status: DeviceStatus = lastSeen === null ? 'registered' : now - lastSeen > 2 * this.opts.pollSeconds * 1000 ? 'overdue' : 'online';
    return {
      tenant: row.tenant,
      controllerId: row.controller_id,
      name: row.name,
      bsp: row.bsp,
      tags: parseJson<string[]>(row.tags),
      attributes: parseJson<Record<string, string>>(row.attributes),
      version: row.version,
      lastSeen: iso(lastSeen),
      status,
      hasToken: row.token_hash !== null,
      attestation: { ...attestation, requestedAt: iso(row.attestation_requested_at) },
    };
  }

  private async viewOne(row: DeviceRow): Promise<DeviceView> {
    return this.view(row, (await attestationViews(this.db, [row.id])).get(row.id));
  }

  private async insertDevice(
    db: Db,
    tenant: string,
    controllerId: string,
    fields: Partial<Pick<DeviceRow, 'token_hash' | 'name' | 'bsp' | 'tags' | 'attributes'>>,
  ): Promise<void> {
    await db
      .insertInto('devices')
      .values({
        tenant,
        controller_id: controllerId,
        token_hash: null,
        name: controllerId,
        bsp: null,
        tags: '[]',
        attributes: '{}',
        ...fields,
        version: null,
        boot_id: null,
        last_seen: null,
        attributes_at: null,
        created_at: nowMs(),
      })
      .execute();
  }

  private async deviceRow(db: Db, tenant: string, controllerId: string): Promise<DeviceRow> {
    const row = await db.selectFrom('devices').selectAll().where('tenant', '=', tenant).where('controller_id', '=', controllerId).executeTakeFirst();
    if (!row) throw new UserError('LAMA_E_SERVER_NOT_FOUND', `device ${tenant}/${controllerId} is not registered`);
    return row as DeviceRow;
  }

  /**
   * Pre-register a device and create its TargetToken (returned once; only the hash is stored).
   * Registering an existing controller id is refused.
   */
  async registerDevice(
    input: { tenant: string; controllerId: string; name?: string; bsp?: string; tags?: string[]; attributes?: Record<string, string> },
    actor: string,
  ): Promise<{ device: DeviceView; token: string }> {
    checkTenant(input.tenant);
    checkControllerId(input.controllerId);
    if (input.bsp && !BSPS.some((b) => b.name === input.bsp)) {
      throw new UserError('LAMA_E_UNKNOWN_BSP', `unknown BSP '${input.bsp}' (known: ${BSPS.map((b) => b.name).join(', ')})`);
    }
    const token = newToken();
    const row = await this.db.transaction().execute(async (trx) => {
      await this.ensureTenant(trx, input.tenant);
      const exists = await trx
        .selectFrom('devices')
        .select('id')
        .where('tenant', '=', input.tenant)
        .where('controller_id', '=', input.controllerId)
        .executeTakeFirst();
      if (exists) throw new UserError('LAMA_E_SERVER_EXISTS', `device ${input.tenant}/${input.controllerId} is already registered`);
      await this.insertDevice(trx, input.tenant, input.controllerId, {
        token_hash: hashToken(token),
        name: input.name ?? input.controllerId,
        bsp: input.bsp ?? null,
        tags: JSON.stringify([...new Set(input.tags ?? [])].sort()),
        attributes: checkAttributes(new Map(Object.entries(input.attributes ?? {})), 'LAMA_E_SERVER_ATTRIBUTES'),
      });
      await this.audit(trx, actor, 'device.register', `${input.tenant}/${input.controllerId}`, { bsp: input.bsp, tags: input.tags });
      return this.deviceRow(trx, input.tenant, input.controllerId);
    });
    return { device: this.view(row), token };
  }

  /** Replace a device's TargetToken; the old one stops working at once in this process. */
  async rotateDeviceToken(tenant: string, controllerId: string, actor: string): Promise<string> {
    const token = newToken();
    await this.db.transaction().execute(async (trx) => {
      const row = await this.deviceRow(trx, tenant, controllerId);
      await trx.updateTable('devices').set({ token_hash: hashToken(token) }).where('id', '=', row.id).execute();
      await this.audit(trx, actor, 'device.token', `${tenant}/${controllerId}`, {});
    });
    this.forgetDevice(tenant, controllerId);
    return token;
  }

  /** Change a device's name, BSP or tags (add/remove). */
  async updateDevice(
    tenant: string,
    controllerId: string,
    change: { name?: string; bsp?: string; addTags?: string[]; removeTags?: string[] },
    actor: string,
  ): Promise<DeviceView> {
    if (change.bsp && !BSPS.some((b) => b.name === change.bsp)) throw new UserError('LAMA_E_UNKNOWN_BSP', `unknown BSP '${change.bsp}'`);
    const row = await this.db.transaction().execute(async (trx) => {
      const row = await this.deviceRow(trx, tenant, controllerId);
      const tags = new Set(parseJson<string[]>(row.tags));
      for (const t of change.addTags ?? []) tags.add(t);
      for (const t of change.removeTags ?? []) tags.delete(t);
      await trx
        .updateTable('devices')
        .set({ name: change.name ?? row.name, bsp: change.bsp ?? row.bsp, tags: JSON.stringify([...tags].sort()) })
        .where('id', '=', row.id)
        .execute();
      await this.audit(trx, actor, 'device.update', `${tenant}/${controllerId}`, change);
      return this.deviceRow(trx, tenant, controllerId);
    });
    this.forgetDevice(tenant, controllerId);
    return this.viewOne(row);
  }

  /** All devices of a tenant, by controller id. */
  async listDevices(tenant: string): Promise<DeviceView[]> {
    const rows = await this.db.selectFrom('devices').selectAll().where('tenant', '=', tenant).orderBy('controller_id').execute();
    const now = nowMs();
    const att = await attestationViews(this.db, rows.map((r) => r.id as number));
    return rows.map((r) => this.view(r as DeviceRow, att.get(r.id as number), now));
  }

  /** One device with its action history, newest first. */
  async getDevice(tenant: string, controllerId: string): Promise<DeviceView & { actions: ActionView[] }> {
    const row = await this.deviceRow(this.db, tenant, controllerId);
    const actions = await this.db
      .selectFrom('actions')
      .innerJoin('releases', 'releases.id', 'actions.release_id')
      .select(['actions.id', 'actions.release_id', 'releases.version', 'actions.rollout_id', 'actions.wave', 'actions.state', 'actions.updated_at'])
      .where('actions.device_id', '=', row.id)
      .where('actions.state', '!=', 'scheduled')
      .orderBy('actions.id', 'desc')
      .execute();
    const ids = actions.map((a) => a.id);
    const statuses = ids.length
      ? await this.db.selectFrom('action_status').selectAll().where('action_id', 'in', ids).orderBy('id').execute()
      : [];
    return {
      ...(await this.viewOne(row)),
      actions: actions.map((a) => ({
        id: a.id,
        releaseId: a.release_id,
        releaseVersion: a.version,
        rolloutId: a.rollout_id,
        wave: a.wave,
        state: a.state as ActionState,
        updatedAt: new Date(a.updated_at).toISOString(),
        history: statuses
          .filter((s) => s.action_id === a.id)
          .map((s) => ({ time: new Date(s.time).toISOString(), execution: s.execution, finished: s.finished, details: parseJson<string[]>(s.details) })),
      })),
    };
  }

  // ---- device API (DDI) ----

  /**
   * Identify the device behind a DDI request. `TargetToken` must be that device's token;
   * `GatewayToken` must be the tenant's and registers unknown controller ids on first contact; a
   * client certificate already verified against --client-ca whose CN is the controller id counts as
   * the device's credential. Returns undefined for anything else (the caller answers 401).
   * Device rows are cached for a minute so a large fleet's polls do not each read them: a token
   * rotated through this process takes effect at once, through another server process within a minute.
   */
  async authenticate(
    tenant: string,
    controllerId: string,
    auth: { scheme: string; token: string } | undefined,
    certCn?: string,
  ): Promise<DeviceRow | undefined> {
    if (!TENANT.test(tenant) || !CONTROLLER_ID.test(controllerId)) return undefined;
    const key = `${tenant}/${controllerId}`;
    const cached = this.authCache.get(key);
    let row = cached && nowMs() - cached.at < LOOKUP_CACHE_MS ? cached.row : undefined;
    if (!row) {
      row = (await this.db
        .selectFrom('devices')
        .selectAll()
        .where('tenant', '=', tenant)
        .where('controller_id', '=', controllerId)
        .executeTakeFirst()) as DeviceRow | undefined;
      if (row) this.authCache.set(key, { row, at: nowMs() });
    }
    if (certCn !== undefined && certCn === controllerId && row) return row;
    if (!auth) return undefined;
    if (auth.scheme === 'targettoken') return row && tokenMatches(auth.token, row.token_hash) ? row : undefined;
    if (auth.scheme === 'gatewaytoken') {
      const t = await this.db.selectFrom('tenants').select('gateway_token_hash').where('name', '=', tenant).executeTakeFirst();
      if (!tokenMatches(auth.token, t?.gateway_token_hash)) return undefined;
      if (row) return row;
      await this.insertDevice(this.db, tenant, controllerId, {});
      return this.deviceRow(this.db, tenant, controllerId);
    }
    return undefined;
  }

  /**
   * Whether `row` is still this device's cached record: not rotated, removed or past the cache's
   * lifetime. A caller that verified a token against it may then skip hashing the same token again.
   */
  isCurrent(row: DeviceRow): boolean {
    const c = this.authCache.get(`${row.tenant}/${row.controller_id}`);
    return c !== undefined && c.row === row && nowMs() - c.at < LOOKUP_CACHE_MS;
  }

  /** Remember a device's contact; written with the next batch, never one write per request. */
  touch(device: DeviceRow): void {
    this.seen.set(device.id, nowMs());
  }

  /** Base poll: say what the device should do next. */
  async poll(device: DeviceRow): Promise<PollAnswer> {
    this.counters.polls++;
    // The hot query of the server: compiled once, run with this device's id as its only parameter.
    const open = (await this.db.executeQuery<{ id: number; state: string }>({ ...this.pollQuery, parameters: [device.id] })).rows;
    const installed = open.some((a) => a.state === 'installed');
    const first = open.find((a) => a.state !== 'installed');
    const answer: PollAnswer = { configData: installed || device.attributes_at === null };
    if (first?.state === 'canceling') answer.cancel = first.id;
    else if (first) answer.deploy = first.id;
    return answer;
  }

  /**
   * PUT configData: store attributes (merge, replace or remove) and settle an update awaiting boot —
   * success when the reported version is the release's, "rolled back" when the device runs another
   * version after a new boot (or reports no boot id at all). Attributes without a version decide nothing.
   */
  async putConfigData(device: DeviceRow, body: unknown): Promise<void> {
    const data = (body as { data?: unknown } | null)?.data;
    if (!data || typeof data !== 'object' || Array.isArray(data)) throw new UserError('LAMA_E_DDI_CONFIG', 'configData needs an object "data"');
    const mode = ddiString((body as { mode?: unknown }).mode ?? 'merge', 'LAMA_E_DDI_CONFIG', 'configData mode').toLowerCase();
    if (!['merge', 'replace', 'remove'].includes(mode)) throw new UserError('LAMA_E_DDI_CONFIG', `configData mode '${mode}' is not merge, replace or remove`);
    const given = Object.entries(data as Record<string, unknown>);
    // Checked before the transaction too, so an oversized request costs no database work.
    if (given.length > ATTRIBUTE_LIMITS.keys) throw new UserError('LAMA_E_DDI_CONFIG', `configData has ${given.length} attributes; a device stores at most ${ATTRIBUTE_LIMITS.keys}`);
    const entries = mode === 'remove' ? [] : given.map(([k, v]) => [k, ddiString(v, 'LAMA_E_DDI_CONFIG', `configData attribute '${k.slice(0, 40)}'`)] as const);
    const decided: number[] = [];
    await this.db.transaction().execute(async (trx) => {
      const row = (await trx.selectFrom('devices').selectAll().where('id', '=', device.id).executeTakeFirstOrThrow()) as DeviceRow;
      // A Map, so names such as `__proto__` or `toString` are attributes like any other.
      const attrs = new Map(mode === 'replace' ? [] : Object.entries(parseJson<Record<string, string>>(row.attributes)));
      if (mode === 'remove') for (const [k] of given) attrs.delete(k);
      for (const [k, v] of entries) attrs.set(k, v);
      const stored = checkAttributes(attrs, 'LAMA_E_DDI_CONFIG');
      const version = attrs.get(this.opts.versionAttribute) ?? null;
      const bootId = attrs.get(this.opts.bootIdAttribute) ?? null;
      await trx
        .updateTable('devices')
        .set({ attributes: stored, version, boot_id: bootId, attributes_at: nowMs() })
        .where('id', '=', device.id)
        .execute();
      const waiting = await trx
        .selectFrom('actions')
        .innerJoin('releases', 'releases.id', 'actions.release_id')
        .select(['actions.id', 'actions.rollout_id', 'actions.from_boot_id', 'releases.version'])
        .where('actions.device_id', '=', device.id)
        .where('actions.state', '=', 'installed')
        .execute();
      for (const a of waiting) {
        let next: ActionState | undefined;
        if (version !== null && version === a.version) next = 'success';
        else if (version !== null && (bootId === null || bootId !== a.from_boot_id)) next = 'rolled_back';
        if (!next) continue;
        await trx.updateTable('actions').set({ state: next, updated_at: nowMs() }).where('id', '=', a.id).execute();
        await trx
          .insertInto('action_status')
          .values({
            action_id: a.id,
            time: nowMs(),
            execution: 'closed',
            finished: next === 'success' ? 'success' : 'failure',
            details: JSON.stringify([next === 'success' ? `booted ${version}` : `device came back running ${version ?? 'an unknown version'}`]),
          })
          .execute();
        if (a.rollout_id !== null) decided.push(a.rollout_id);
      }
    });
    this.forgetDevice(device.tenant, device.controller_id);
    for (const r of new Set(decided)) await this.advanceRollout(r, true);
  }

  /** The device's own action with its release, or undefined (another device's action is invisible). */
  async deviceAction(device: DeviceRow, actionId: number): Promise<{ action: ActionRow; release: ReleaseRow } | undefined> {
    const action = (await this.db
      .selectFrom('actions')
      .selectAll()
      .where('id', '=', actionId)
      .where('device_id', '=', device.id)
      .where('state', '!=', 'scheduled')
      .executeTakeFirst()) as ActionRow | undefined;
    if (!action) return undefined;
    const release = (await this.db.selectFrom('releases').selectAll().where('id', '=', action.release_id).executeTakeFirstOrThrow()) as ReleaseRow;
    return { action, release };
  }

  /**
   * Deployment feedback. Intermediate states mark the action running; closed+success means "installed,
   * awaiting boot" (the device has only written the slot); closed+failure fails it; canceled confirms a
   * cancellation. Feedback for a finished action is recorded but changes nothing, so retries are safe.
   */
  async deploymentFeedback(device: DeviceRow, actionId: number, fb: Feedback): Promise<boolean> {
    return this.feedback(device, actionId, fb, (state) => {
      if (state === 'installed' || DONE_STATES.includes(state)) return undefined;
      if (fb.execution === 'canceled') return state === 'canceling' ? 'canceled' : undefined;
      if (fb.execution === 'closed') {
        if (fb.finished === 'success') return 'installed';
        if (fb.finished === 'failure') return 'failed';
        return undefined;
      }
      return state === 'pending' ? 'running' : undefined;
    });
  }

  /** Feedback on a cancelAction: confirmed (closed/success or canceled) or refused (rejected, failure). */
  async cancelFeedback(device: DeviceRow, actionId: number, fb: Feedback): Promise<boolean> {
    return this.feedback(device, actionId, fb, (state) => {
      if (state !== 'canceling') return undefined;
      if (fb.execution === 'canceled' || (fb.execution === 'closed' && fb.finished === 'success')) return 'canceled';
      if (fb.execution === 'rejected' || fb.finished === 'failure') return 'running';
      return undefined;
    });
  }

  private async feedback(device: DeviceRow, actionId: number, fb: Feedback, next: (s: ActionState) => ActionState | undefined): Promise<boolean> {
    this.counters.feedback++;
    const result = await this.db.transaction().execute(async (trx) => {
      const action = await trx
        .selectFrom('actions')
        .select(['id', 'state', 'rollout_id'])
        .where('id', '=', actionId)
        .where('device_id', '=', device.id)
        .where('state', '!=', 'scheduled')
        .executeTakeFirst();
      if (!action) return undefined;
      const state = next(action.state as ActionState);
      await trx
        .insertInto('action_status')
        .values({ action_id: action.id, time: nowMs(), execution: fb.execution, finished: fb.finished, details: JSON.stringify(fb.details) })
        .execute();
      if (state) {
        const row = await trx.selectFrom('devices').select(['version', 'boot_id']).where('id', '=', device.id).executeTakeFirstOrThrow();
        await trx
          .updateTable('actions')
          .set({
            state,
            updated_at: nowMs(),
            ...(state === 'installed' ? { from_version: row.version, from_boot_id: row.boot_id } : {}),
          })
          .where('id', '=', action.id)
          .execute();
      }
      return { state, rollout: action.rollout_id };
    });
    if (!result) return false;
    if (result.state && result.rollout !== null) await this.advanceRollout(result.rollout, result.state === 'failed');
    return true;
  }

  /**
   * The release a device may download, when it has (or had) an action for it. Cached for a minute so
   * the thousands of range reads of one install cost no database round trip and write nothing.
   */
  async downloadable(device: DeviceRow, releaseId: number): Promise<ReleaseRow | undefined> {
    const key = `${device.tenant}/${device.controller_id}/${releaseId}`;
    const hit = this.downloadCache.get(key);
    if (hit && nowMs() - hit.at < LOOKUP_CACHE_MS) return hit.release;
    const release = (await this.db
      .selectFrom('releases')
      .selectAll()
      .where('id', '=', releaseId)
      .where((eb) =>
        eb.exists(
          eb
            .selectFrom('actions')
            .select('actions.id')
            .whereRef('actions.release_id', '=', 'releases.id')
            .where('actions.device_id', '=', device.id)
            .where('actions.state', 'not in', ['scheduled', 'canceled']),
        ),
      )
      .executeTakeFirst()) as ReleaseRow | undefined;
    if (release) this.downloadCache.set(key, { release, at: nowMs() });
    return release;
  }

  // ---- releases ----

  private releaseView(r: ReleaseRow): ReleaseView {
    return {
      id: r.id,
      version: r.version,
      compatible: r.compatible,
      filename: r.filename,
      format: r.format,
      signer: r.signer,
      sha256: r.sha256,
      sha1: r.sha1,
      md5: r.md5,
      size: r.size,
      createdAt: new Date(r.created_at).toISOString(),
    };
  }

  /** The release with this content, if already stored. */
  async releaseBySha256(sha256: string): Promise<ReleaseView | undefined> {
    const r = await this.db.selectFrom('releases').selectAll().where('sha256', '=', sha256).executeTakeFirst();
    return r ? this.releaseView(r as ReleaseRow) : undefined;
  }

  /** Record a verified, committed bundle. Content already known returns the existing release. */
  async addRelease(
    meta: Omit<ReleaseView, 'id' | 'createdAt'>,
    actor: string,
    pcr11: readonly Pcr11Prediction[] = [],
  ): Promise<{ release: ReleaseView; created: boolean }> {
    return this.db.transaction().execute(async (trx) => {
      const existing = await trx.selectFrom('releases').selectAll().where('sha256', '=', meta.sha256).executeTakeFirst();
      if (existing) return { release: this.releaseView(existing as ReleaseRow), created: false };
      await trx.insertInto('releases').values({ ...meta, created_at: nowMs() }).execute();
      const row = (await trx.selectFrom('releases').selectAll().where('sha256', '=', meta.sha256).executeTakeFirstOrThrow()) as ReleaseRow;
      await savePcr11(trx, row.id, pcr11);
      await this.audit(trx, actor, 'release.upload', `release/${row.id}`, { version: meta.version, compatible: meta.compatible, sha256: meta.sha256 });
      return { release: this.releaseView(row), created: true };
    });
  }

  /** All releases, newest first. */
  async listReleases(): Promise<ReleaseView[]> {
    const rows = await this.db.selectFrom('releases').selectAll().orderBy('id', 'desc').execute();
    return rows.map((r) => this.releaseView(r as ReleaseRow));
  }

  /** One release by id. */
  async getRelease(id: number): Promise<ReleaseView> {
    const r = await this.db.selectFrom('releases').selectAll().where('id', '=', id).executeTakeFirst();
    if (!r) throw new UserError('LAMA_E_SERVER_NOT_FOUND', `release ${id} does not exist`);
    return this.releaseView(r as ReleaseRow);
  }

  // ---- rollouts ----

  /**
   * Create a rollout of a release to the tenant's devices matching `filter` (and, for devices with a
   * known BSP, only those whose RAUC compatible is the release's). Targets are split into waves now,
   * so the groups are fixed and a restart cannot reshuffle them; `start` starts wave 1 at once.
   */
  async createRollout(
    input: {
      tenant: string;
      name: string;
      releaseId: number;
      filter: TargetFilter;
      waves: WaveSpec[];
      successThreshold: number;
      errorThreshold: number;
      start: boolean;
      requireAttestation?: boolean;
    },
    actor: string,
  ): Promise<RolloutView> {
    checkFilter(input.filter);
    for (const [n, v] of [['success threshold', input.successThreshold], ['error threshold', input.errorThreshold]] as const) {
      if (!(v >= 0 && v <= 100)) throw new UserError('LAMA_E_ROLLOUT_THRESHOLD', `${n} must be a percentage 0-100, got ${v}`);
    }
    const id = await this.db.transaction().execute(async (trx) => {
      const release = await trx.selectFrom('releases').selectAll().where('id', '=', input.releaseId).executeTakeFirst();
      if (!release) throw new UserError('LAMA_E_SERVER_NOT_FOUND', `release ${input.releaseId} does not exist`);
      const devices = (await trx.selectFrom('devices').selectAll().where('tenant', '=', input.tenant).execute()) as DeviceRow[];
      const targets = devices
        .map((d) => ({ row: d, controllerId: d.controller_id, tags: parseJson<string[]>(d.tags), attributes: parseJson<Record<string, string>>(d.attributes), bsp: d.bsp }))
        .filter((d) => matchesFilter(d, input.filter))
        .filter((d) => {
          const c = compatibleOf(d.bsp);
          return c === undefined || c === release.compatible;
        });
      if (targets.length === 0) throw new UserError('LAMA_E_ROLLOUT_NO_TARGETS', 'no registered device matches the filter and the release compatible');
      const attested = input.requireAttestation ? await this.attestedIds(trx, targets.map((t) => t.row.id)) : undefined;
      const offered = attested ? targets.filter((t) => attested.has(t.row.id)) : targets;
      const heldBack = targets.filter((t) => !offered.includes(t)).map((t) => t.controllerId).sort();
      const groups = assignWaves(offered, planWaveSizes(offered.length, input.waves));
      const now = nowMs();
      const rollout = await trx
        .insertInto('rollouts')
        .values({
          name: input.name,
          release_id: release.id,
          filter: JSON.stringify(input.filter),
          waves: JSON.stringify(input.waves),
          success_threshold: input.successThreshold,
          error_threshold: input.errorThreshold,
          status: 'ready',
          current_wave: 0,
          created_at: now,
          updated_at: now,
          require_attestation: input.requireAttestation ? 1 : 0,
          held_back: JSON.stringify(heldBack),
        })
        .returning('id')
        .executeTakeFirstOrThrow();
      const rows = groups.flatMap((g, wave) =>
        g.map((d) => ({
          device_id: d.row.id,
          release_id: release.id,
          rollout_id: rollout.id,
          wave,
          state: 'scheduled',
          from_version: null,
          from_boot_id: null,
          created_at: now,
          updated_at: now,
        })),
      );
      for (let i = 0; i < rows.length; i += 500) await trx.insertInto('actions').values(rows.slice(i, i + 500)).execute();
      await this.audit(trx, actor, 'rollout.create', `rollout/${rollout.id}`, {
        name: input.name,
        release: release.id,
        filter: input.filter,
        waves: groups.map((g) => g.length),
        ...(input.requireAttestation && { heldBack }),
      });
      return rollout.id;
    });
    if (input.start) return this.setRolloutStatus(id, 'start', actor);
    return this.getRollout(id);
  }

  /** start (ready→running), pause (running→paused), resume (paused→running) or cancel. */
  async setRolloutStatus(id: number, op: 'start' | 'pause' | 'resume' | 'cancel', actor: string): Promise<RolloutView> {
    const allowed: Record<typeof op, { from: string[]; to: string }> = {
      start: { from: ['ready'], to: 'running' },
      pause: { from: ['running'], to: 'paused' },
      resume: { from: ['paused'], to: 'running' },
      cancel: { from: ['ready', 'running', 'paused'], to: 'canceled' },
    };
    const rule = allowed[op];
    await this.withRolloutLock(() =>
      this.db.transaction().execute(async (trx) => {
        const r = await trx.selectFrom('rollouts').select(['status', 'current_wave']).where('id', '=', id).executeTakeFirst();
        if (!r) throw new UserError('LAMA_E_SERVER_NOT_FOUND', `rollout ${id} does not exist`);
        if (!rule.from.includes(r.status)) throw new UserError('LAMA_E_ROLLOUT_STATE', `cannot ${op} rollout ${id}: it is ${r.status}`);
        await trx.updateTable('rollouts').set({ status: rule.to, updated_at: nowMs() }).where('id', '=', id).execute();
        if (op === 'start') await this.startWave(trx, id, 0);
        if (op === 'cancel') {
          await trx.updateTable('actions').set({ state: 'canceled', updated_at: nowMs() }).where('rollout_id', '=', id).where('state', '=', 'scheduled').execute();
          await trx.updateTable('actions').set({ state: 'canceling', updated_at: nowMs() }).where('rollout_id', '=', id).where('state', 'in', ['pending', 'running']).execute();
        }
        await this.audit(trx, actor, `rollout.${op}`, `rollout/${id}`, {});
      }),
    );
    if (op === 'start' || op === 'resume') await this.advanceRollout(id, false);
    return this.getRollout(id);
  }

  /** Devices among `ids` whose last quote attested them. */
  private async attestedIds(db: Db, ids: readonly number[]): Promise<Set<number>> {
    const out = new Set<number>();
    for (let i = 0; i < ids.length; i += 500) {
      const rows = await db.selectFrom('attestations').select('device_id').where('device_id', 'in', ids.slice(i, i + 500)).where('state', '=', 'attested').execute();
      for (const r of rows) out.add(r.device_id);
    }
    return out;
  }

  /**
   * Offer a wave: its scheduled actions become pending. A rollout that requires attestation first
   * holds back the wave's devices that are not attested now (their actions go, their ids join the
   * held-back list), so a device that failed attestation after the rollout was made is not offered.
   */
  private async startWave(trx: Db, rolloutId: number, wave: number): Promise<void> {
    const r = await trx.selectFrom('rollouts').select(['require_attestation', 'held_back']).where('id', '=', rolloutId).executeTakeFirstOrThrow();
    if (r.require_attestation) {
      const members = await trx
        .selectFrom('actions')
        .innerJoin('devices', 'devices.id', 'actions.device_id')
        .select(['actions.id', 'actions.device_id', 'devices.controller_id'])
        .where('actions.rollout_id', '=', rolloutId)
        .where('actions.wave', '=', wave)
        .where('actions.state', '=', 'scheduled')
        .execute();
      const attested = await this.attestedIds(trx, members.map((m) => m.device_id));
      const hold = members.filter((m) => !attested.has(m.device_id));
      if (hold.length) {
        await trx.deleteFrom('actions').where('id', 'in', hold.map((m) => m.id)).execute();
        const held = [...new Set([...parseJson<string[]>(r.held_back), ...hold.map((m) => m.controller_id)])].sort();
        await trx.updateTable('rollouts').set({ held_back: JSON.stringify(held) }).where('id', '=', rolloutId).execute();
        await this.audit(trx, 'server', 'rollout.held-back', `rollout/${rolloutId}`, { wave, devices: hold.map((m) => m.controller_id) });
      }
    }
    await trx.updateTable('actions').set({ state: 'pending', updated_at: nowMs() }).where('rollout_id', '=', rolloutId).where('wave', '=', wave).where('state', '=', 'scheduled').execute();
  }

  private withRolloutLock<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.rolloutLock.then(fn, fn);
    this.rolloutLock = run.catch(() => undefined);
    return run;
  }

  /**
   * Re-evaluate a running rollout after one of its actions changed: pause, start the next wave,
   * or finish. Each wave step is one transaction guarded by `current_wave`, so a crash between steps
   * resumes where it stopped and no device is offered the update twice.
   */
  async advanceRollout(id: number, checkErrors: boolean): Promise<void> {
    await this.withRolloutLock(async () => {
      for (;;) {
        const moved = await this.db.transaction().execute(async (trx) => {
          const r = (await trx.selectFrom('rollouts').selectAll().where('id', '=', id).executeTakeFirst()) as RolloutRow | undefined;
          if (!r || r.status !== 'running') return false;
          const lastWave = await trx
            .selectFrom('actions')
            .select((eb) => eb.fn.max('wave').as('w'))
            .where('rollout_id', '=', id)
            .executeTakeFirst();
          const counts = await this.waveCounts(trx, id, r.current_wave);
          const decision = decideWave(counts, {
            successThreshold: r.success_threshold,
            errorThreshold: r.error_threshold,
            isLastWave: r.current_wave >= Number(lastWave?.w ?? 0),
            checkErrors,
          });
          if (decision === 'wait') return false;
          if (decision === 'pause' || decision === 'finish') {
            const status = decision === 'pause' ? 'paused' : 'finished';
            await trx.updateTable('rollouts').set({ status, updated_at: nowMs() }).where('id', '=', id).execute();
            await this.audit(trx, 'server', `rollout.${status}`, `rollout/${id}`, { wave: r.current_wave, counts });
            return false;
          }
          const next = r.current_wave + 1;
          const res = await trx
            .updateTable('rollouts')
            .set({ current_wave: next, updated_at: nowMs() })
            .where('id', '=', id)
            .where('current_wave', '=', r.current_wave)
            .executeTakeFirst();
          if (Number(res.numUpdatedRows) !== 1) return false;
          await this.startWave(trx, id, next);
          await this.audit(trx, 'server', 'rollout.wave', `rollout/${id}`, { wave: next });
          return true;
        });
        if (!moved) return;
        checkErrors = false;
      }
    });
  }

  /**
   * Re-evaluate every running rollout. Called at start-up: a crash between a device's feedback
   * commit and the wave decision it should trigger must not leave a rollout waiting forever.
   */
  async recoverRollouts(): Promise<void> {
    const running = await this.db.selectFrom('rollouts').select('id').where('status', '=', 'running').execute();
    for (const r of running) await this.advanceRollout(r.id as number, false);
  }

  private async waveCounts(db: Db, rolloutId: number, wave: number): Promise<WaveCounts> {
    const rows = await db
      .selectFrom('actions')
      .select(['state', (eb) => eb.fn.countAll().as('n')])
      .where('rollout_id', '=', rolloutId)
      .where('wave', '=', wave)
      .groupBy('state')
      .execute();
    return Object.fromEntries(rows.map((r) => [r.state, Number(r.n)]));
  }

  /** One rollout with per-wave progress. */
  async getRollout(id: number): Promise<RolloutView> {
    const r = await this.db
      .selectFrom('rollouts')
      .innerJoin('releases', 'releases.id', 'rollouts.release_id')
      .selectAll('rollouts')
      .select('releases.version as release_version')
      .where('rollouts.id', '=', id)
      .executeTakeFirst();
    if (!r) throw new UserError('LAMA_E_SERVER_NOT_FOUND', `rollout ${id} does not exist`);
    const rows = await this.db
      .selectFrom('actions')
      .select(['wave', 'state', (eb) => eb.fn.countAll().as('n')])
      .where('rollout_id', '=', id)
      .groupBy(['wave', 'state'])
      .execute();
    const progress: RolloutView['progress'] = [];
    for (const row of rows) {
      let w = progress.find((p) => p.wave === row.wave);
      if (!w) progress.push((w = { wave: row.wave, size: 0, states: {} }));
      w.size += Number(row.n);
      w.states[row.state as ActionState] = Number(row.n);
    }
    progress.sort((a, b) => a.wave - b.wave);
    return {
      id: r.id as number,
      name: r.name,
      releaseId: r.release_id,
      releaseVersion: r.release_version,
      filter: parseJson<TargetFilter>(r.filter),
      waves: parseJson<WaveSpec[]>(r.waves),
      successThreshold: r.success_threshold,
      errorThreshold: r.error_threshold,
      status: r.status,
      currentWave: r.current_wave,
      requireAttestation: r.require_attestation === 1,
      heldBack: parseJson<string[]>(r.held_back),
      progress,
      createdAt: new Date(r.created_at).toISOString(),
    };
  }

  /** All rollouts, newest first. */
  async listRollouts(): Promise<RolloutView[]> {
    const ids = await this.db.selectFrom('rollouts').select('id').orderBy('id', 'desc').execute();
    const out: RolloutView[] = [];
    for (const { id } of ids) out.push(await this.getRollout(id as number));
    return out;
  }

  /** The audit log, newest first. */
  async auditLog(limit = 200): Promise<{ id: number; time: string; actor: string; action: string; target: string; details: unknown }[]> {
    const rows = await this.db.selectFrom('audit').selectAll().orderBy('id', 'desc').limit(Math.min(Math.max(1, limit), 10_000)).execute();
    return rows.map((r) => ({ id: r.id as number, time: new Date(r.time).toISOString(), actor: r.actor, action: r.action, target: r.target, details: parseJson(r.details) }));
  }

  /** Gauges for /metrics, read from the database at scrape time. */
  async gauges(): Promise<{ devices: Record<DeviceStatus, number>; actions: Record<string, number>; rollouts: Record<string, number>; releases: number }> {
    const devices: Record<DeviceStatus, number> = { registered: 0, online: 0, overdue: 0 };
    const rows = await this.db.selectFrom('devices').select(['id', 'last_seen']).execute();
    const now = nowMs();
    for (const r of rows) {
      const seen = this.seen.get(r.id as number) ?? r.last_seen;
      devices[seen === null ? 'registered' : now - seen > 2 * this.opts.pollSeconds * 1000 ? 'overdue' : 'online']++;
    }
    const count = async (table: 'actions' | 'rollouts', col: 'state' | 'status'): Promise<Record<string, number>> => {
      const rs = (await this.db
        .selectFrom(table)
        .select([col, (eb) => eb.fn.countAll().as('n')])
        .groupBy(col)
        .execute()) as unknown as { n: number | string; state?: string; status?: string }[];
      return Object.fromEntries(rs.map((r) => [r[col] ?? '', Number(r.n)]));
    };
    const releases = await this.db.selectFrom('releases').select((eb) => eb.fn.countAll().as('n')).executeTakeFirstOrThrow();
    return { devices, actions: await count('actions', 'state'), rollouts: await count('rollouts', 'status'), releases: Number(releases.n) };
  }
}

export type { DeviceRow, ReleaseRow };
