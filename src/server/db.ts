import { randomBytes } from 'node:crypto';
import { mkdirSync } from 'node:fs';
import path from 'node:path';
import Sqlite from 'better-sqlite3';
import { Kysely, Migrator, PostgresDialect, SqliteDialect, sql, type Generated, type Migration } from 'kysely';
import pg from 'pg';
import { UserError } from '../errors.js';

/** What is known about a stored bundle (database row and API view share these). */
export interface ReleaseFields {
  version: string;
  compatible: string;
  filename: string;
  format: string;
  signer: string;
  sha256: string;
  sha1: string;
  md5: string;
  size: number;
}

/** Rows as stored. Times are Unix milliseconds; JSON columns are text so both databases agree. */
export interface Database {
  tenants: { name: string; gateway_token_hash: string | null; created_at: number };
  devices: {
    id: Generated<number>;
    tenant: string;
    controller_id: string;
    token_hash: string | null;
    name: string;
    bsp: string | null;
    tags: string;
    attributes: string;
    version: string | null;
    boot_id: string | null;
    last_seen: number | null;
    attributes_at: number | null;
    created_at: number;
    /**
     * When an operator last asked this device for a fresh TPM quote, until a quote with a nonce
     * issued at or after it is judged (0004). On the device row, which every DDI request reads anyway, so
     * the base poll can name the attestation link without a query of its own.
     */
    attestation_requested_at: number | null;
  };
  releases: ReleaseFields & { id: Generated<number>; created_at: number };
  rollouts: {
    id: Generated<number>;
    name: string;
    release_id: number;
    filter: string;
    waves: string;
    success_threshold: number;
    error_threshold: number;
    status: string;
    current_wave: number;
    created_at: number;
    updated_at: number;
    /** 1: offered only to devices attested when their wave starts (0002). */
    require_attestation: Generated<number>;
    /** JSON list of controller ids held back for not being attested (0002). */
    held_back: Generated<string>;
  };
  /** One row per device that ever spoke the attestation extension (0002). */
  attestations: {
    device_id: number;
    /** TPMT_PUBLIC of the pinned attestation key (hex), and its TPM name. */
    ak_public: string;
    ak_name: string;
    /** machine-id the device named with its key, pinned with it: selects its UKIs' PCR 11 values. */
    machine_id: string | null;
    registered_at: number;
    /** The one outstanding nonce (hex) and when it stops being accepted. */
    nonce: string | null;
    nonce_expires: number | null;
    state: string;
    reason: string;
    /** JSON list of per-PCR checks of the last quote. */
    checks: string;
    checked_at: number | null;
    /** The EK's TPM2B_PUBLIC (hex) and certificate (DER, hex) the device sent with its key, if any (0003). */
    ek_public: string | null;
    ek_certificate: string | null;
    /** JSON of what the certificate says (issuer, serial, TPM manufacturer…), for the views (0003). */
    ek_info: string | null;
    /** 1: the key was bound by credential activation to an EK whose certificate chains to --ek-ca (0003). */
    ek_bound: Generated<number>;
  };
  /**
   * A key registration under --ek-ca that is not finished (0003): at most one per device, holding the
   * outstanding credential-activation challenge, or the reason the last registration was refused.
   */
  attestation_pending: {
    device_id: number;
    ak_public: string | null;
    ak_name: string | null;
    machine_id: string | null;
    ek_public: string | null;
    ek_certificate: string | null;
    ek_info: string | null;
    /** SHA-256 (hex) of the secret the device must recover, and until when it is accepted. */
    secret_hash: string | null;
    expires: number | null;
    reason: string;
    updated_at: number;
  };
  /** PCR 11 values a release's UKI leaves, per host and slot (0002). */
  release_pcr11: {
    id: Generated<number>;
    release_id: number;
    machine_id: string;
    slot: string;
    /** JSON list of hex values: at hand-over from systemd-stub and after each boot phase. */
    pcr11: string;
  };
  actions: {
    id: Generated<number>;
    device_id: number;
    release_id: number;
    rollout_id: number | null;
    wave: number;
    state: string;
    from_version: string | null;
    from_boot_id: string | null;
    created_at: number;
    updated_at: number;
  };
  action_status: {
    id: Generated<number>;
    action_id: number;
    time: number;
    execution: string;
    finished: string;
    details: string;
  };
  audit: {
    id: Generated<number>;
    time: number;
    actor: string;
    action: string;
    target: string;
    details: string;
  };
}

export type Dialect = 'sqlite' | 'postgres';

export interface OpenDb {
  db: Kysely<Database>;
  dialect: Dialect;
  /** PostgreSQL schema in use (from `?schema=` in the URL), if any. */
  schema?: string;
  close(): Promise<void>;
}

function migrations(dialect: Dialect): Record<string, Migration> {
  // One schema for both databases; only the auto-increment key type differs.
  const idType = dialect === 'postgres' ? 'bigserial' : 'integer';
  type Db = Kysely<unknown>;
  const id = (db: Db, table: string) =>
    db.schema.createTable(table).addColumn('id', idType as 'integer', (c) => (dialect === 'postgres' ? c.primaryKey() : c.primaryKey().autoIncrement()));
  return {
    '0001_initial': {
      async up(db: Db) {
        await db.schema
          .createTable('tenants')
          .addColumn('name', 'text', (c) => c.primaryKey())
          .addColumn('gateway_token_hash', 'text')
          .addColumn('created_at', 'bigint', (c) => c.notNull())
          .execute();
        await id(db, 'devices')
          .addColumn('tenant', 'text', (c) => c.notNull())
          .addColumn('controller_id', 'text', (c) => c.notNull())
          .addColumn('token_hash', 'text')
          .addColumn('name', 'text', (c) => c.notNull())
          .addColumn('bsp', 'text')
          .addColumn('tags', 'text', (c) => c.notNull())
          .addColumn('attributes', 'text', (c) => c.notNull())
          .addColumn('version', 'text')
          .addColumn('boot_id', 'text')
          .addColumn('last_seen', 'bigint')
          .addColumn('attributes_at', 'bigint')
          .addColumn('created_at', 'bigint', (c) => c.notNull())
          .addUniqueConstraint('devices_tenant_controller', ['tenant', 'controller_id'])
          .execute();
        await id(db, 'releases')
          .addColumn('version', 'text', (c) => c.notNull())
          .addColumn('compatible', 'text', (c) => c.notNull())
          .addColumn('filename', 'text', (c) => c.notNull())
          .addColumn('format', 'text', (c) => c.notNull())
          .addColumn('signer', 'text', (c) => c.notNull())
          .addColumn('sha256', 'text', (c) => c.notNull().unique())
          .addColumn('sha1', 'text', (c) => c.notNull())
          .addColumn('md5', 'text', (c) => c.notNull())
          .addColumn('size', 'bigint', (c) => c.notNull())
          .addColumn('created_at', 'bigint', (c) => c.notNull())
          .execute();
        await id(db, 'rollouts')
          .addColumn('name', 'text', (c) => c.notNull())
          .addColumn('release_id', 'bigint', (c) => c.notNull().references('releases.id'))
          .addColumn('filter', 'text', (c) => c.notNull())
          .addColumn('waves', 'text', (c) => c.notNull())
          .addColumn('success_threshold', 'integer', (c) => c.notNull())
          .addColumn('error_threshold', 'integer', (c) => c.notNull())
          .addColumn('status', 'text', (c) => c.notNull())
          .addColumn('current_wave', 'integer', (c) => c.notNull())
          .addColumn('created_at', 'bigint', (c) => c.notNull())
          .addColumn('updated_at', 'bigint', (c) => c.notNull())
          .execute();
        await id(db, 'actions')
          .addColumn('device_id', 'bigint', (c) => c.notNull().references('devices.id'))
          .addColumn('release_id', 'bigint', (c) => c.notNull().references('releases.id'))
          .addColumn('rollout_id', 'bigint', (c) => c.references('rollouts.id'))
          .addColumn('wave', 'integer', (c) => c.notNull())
          .addColumn('state', 'text', (c) => c.notNull())
          .addColumn('from_version', 'text')
          .addColumn('from_boot_id', 'text')
          .addColumn('created_at', 'bigint', (c) => c.notNull())
          .addColumn('updated_at', 'bigint', (c) => c.notNull())
          // A device appears at most once per rollout: a crash while starting a wave cannot duplicate it.
          .addUniqueConstraint('actions_rollout_device', ['rollout_id', 'device_id'])
          .execute();
        await db.schema.createIndex('actions_device_state').on('actions').columns(['device_id', 'state']).execute();
        await db.schema.createIndex('actions_rollout_wave').on('actions').columns(['rollout_id', 'wave', 'state']).execute();
        await id(db, 'action_status')
          .addColumn('action_id', 'bigint', (c) => c.notNull().references('actions.id'))
          .addColumn('time', 'bigint', (c) => c.notNull())
          .addColumn('execution', 'text', (c) => c.notNull())
          .addColumn('finished', 'text', (c) => c.notNull())
          .addColumn('details', 'text', (c) => c.notNull())
          .execute();
        await db.schema.createIndex('action_status_action').on('action_status').column('action_id').execute();
        await id(db, 'audit')
          .addColumn('time', 'bigint', (c) => c.notNull())
          .addColumn('actor', 'text', (c) => c.notNull())
          .addColumn('action', 'text', (c) => c.notNull())
          .addColumn('target', 'text', (c) => c.notNull())
          .addColumn('details', 'text', (c) => c.notNull())
          .execute();
      },
    },
    '0002_attestation': {
      async up(db: Db) {
        await db.schema.alterTable('rollouts').addColumn('require_attestation', 'integer', (c) => c.notNull().defaultTo(0)).execute();
        await db.schema.alterTable('rollouts').addColumn('held_back', 'text', (c) => c.notNull().defaultTo('[]')).execute();
        await db.schema
          .createTable('attestations')
          .addColumn('device_id', 'bigint', (c) => c.primaryKey().references('devices.id'))
          .addColumn('ak_public', 'text', (c) => c.notNull())
          .addColumn('ak_name', 'text', (c) => c.notNull())
          .addColumn('machine_id', 'text')
          .addColumn('registered_at', 'bigint', (c) => c.notNull())
          .addColumn('nonce', 'text')
          .addColumn('nonce_expires', 'bigint')
          .addColumn('state', 'text', (c) => c.notNull())
          .addColumn('reason', 'text', (c) => c.notNull())
          .addColumn('checks', 'text', (c) => c.notNull())
          .addColumn('checked_at', 'bigint')
          .execute();
        await id(db, 'release_pcr11')
          .addColumn('release_id', 'bigint', (c) => c.notNull().references('releases.id'))
          .addColumn('machine_id', 'text', (c) => c.notNull())
          .addColumn('slot', 'text', (c) => c.notNull())
          .addColumn('pcr11', 'text', (c) => c.notNull())
          .addUniqueConstraint('release_pcr11_host_slot', ['release_id', 'machine_id', 'slot'])
          .execute();
      },
    },
    '0003_ek_binding': {
      async up(db: Db) {
        for (const c of ['ek_public', 'ek_certificate', 'ek_info']) await db.schema.alterTable('attestations').addColumn(c, 'text').execute();
        await db.schema.alterTable('attestations').addColumn('ek_bound', 'integer', (c) => c.notNull().defaultTo(0)).execute();
        await db.schema
          .createTable('attestation_pending')
          .addColumn('device_id', 'bigint', (c) => c.primaryKey().references('devices.id'))
          .addColumn('ak_public', 'text')
          .addColumn('ak_name', 'text')
          .addColumn('machine_id', 'text')
          .addColumn('ek_public', 'text')
          .addColumn('ek_certificate', 'text')
          .addColumn('ek_info', 'text')
          .addColumn('secret_hash', 'text')
          .addColumn('expires', 'bigint')
          .addColumn('reason', 'text', (c) => c.notNull())
          .addColumn('updated_at', 'bigint', (c) => c.notNull())
          .execute();
      },
    },
    '0004_attestation_request': {
      async up(db: Db) {
        await db.schema.alterTable('devices').addColumn('attestation_requested_at', 'bigint').execute();
      },
    },
  };
}

/** Split `postgres://…?schema=NAME` into the connection string pg understands and the schema name. */
export function parsePostgresUrl(url: string): { connectionString: string; schema?: string } {
  const u = new URL(url);
  const schema = u.searchParams.get('schema') ?? undefined;
  u.searchParams.delete('schema');
  if (schema !== undefined && !/^[a-z_][a-z0-9_]{0,62}$/.test(schema)) {
    throw new UserError('LAMA_E_SERVER_DB', `schema '${schema}' must be a lower-case SQL identifier`);
  }
  return { connectionString: u.toString(), ...(schema ? { schema } : {}) };
}

const INT8_OID = 20;

async function openPostgres(url: string): Promise<OpenDb> {
  const { connectionString, schema } = parsePostgresUrl(url);
  if (schema) {
    const admin = new pg.Client({ connectionString });
    try {
      await admin.connect();
      await admin.query(`CREATE SCHEMA IF NOT EXISTS "${schema}"`);
    } catch (err) {
      throw new UserError('LAMA_E_SERVER_DB', `cannot connect to PostgreSQL: ${(err as Error).message}`, { cause: err });
    } finally {
      await admin.end().catch(() => undefined);
    }
  }
  const pool = new pg.Pool({
    connectionString,
    max: 10,
    ...(schema ? { options: `-c search_path=${schema}` } : {}),
    // Row ids and byte sizes are int8; they fit a JS number, so read them as numbers.
    types: {
      getTypeParser: ((oid: number, format?: 'text' | 'binary') =>
        oid === INT8_OID ? (v: string) => Number(v) : pg.types.getTypeParser(oid, format ?? 'text')) as typeof pg.types.getTypeParser,
    },
  });
  const db = new Kysely<Database>({ dialect: new PostgresDialect({ pool }) });
  return { db, dialect: 'postgres', ...(schema ? { schema } : {}), close: () => db.destroy() };
}

function openSqlite(file: string): OpenDb {
  mkdirSync(path.dirname(path.resolve(file)), { recursive: true });
  let handle: Sqlite.Database;
  try {
    handle = new Sqlite(file);
  } catch (err) {
    throw new UserError('LAMA_E_SERVER_DB', `cannot open SQLite database ${file}: ${(err as Error).message}`, { cause: err });
  }
  handle.pragma('journal_mode = WAL');
  // better-sqlite3 runs on the event loop, so an fsync per commit would stall every request behind
  // it. WAL with NORMAL never corrupts and loses nothing on a process crash (kill -9); only a power
  // cut or kernel crash can drop the last commits, which then vanish whole (transactions stay atomic).
  handle.pragma('synchronous = NORMAL');
  handle.pragma('foreign_keys = ON');
  handle.pragma('busy_timeout = 5000');
  // Kysely prepares every query anew; the poll path runs the same few statements thousands of times
  // a second, so keep their prepared forms (statements are only ever run to completion here).
  const statements = new Map<string, Sqlite.Statement>();
  const database = {
    prepare(text: string): Sqlite.Statement {
      let st = statements.get(text);
      if (!st) {
        if (statements.size >= 512) statements.clear();
        st = handle.prepare(text);
        statements.set(text, st);
      }
      return st;
    },
    close(): void {
      handle.close();
    },
  };
  const db = new Kysely<Database>({ dialect: new SqliteDialect({ database }) });
  return { db, dialect: 'sqlite', close: () => db.destroy() };
}

/**
 * Open the server database from `sqlite:PATH` or `postgres://…[?schema=NAME]` and bring its schema
 * up to date. Migrations are the same list for both databases.
 */
export async function openDatabase(url: string): Promise<OpenDb> {
  let open: OpenDb;
  if (url.startsWith('sqlite:')) open = openSqlite(url.slice('sqlite:'.length));
  else if (url.startsWith('postgres://') || url.startsWith('postgresql://')) open = await openPostgres(url);
  else throw new UserError('LAMA_E_SERVER_DB', `database URL must start with sqlite: or postgres:// (got '${url}')`);
  const migrator = new Migrator({
    db: open.db,
    provider: { getMigrations: async () => migrations(open.dialect) },
    ...(open.schema ? { migrationTableSchema: open.schema } : {}),
  });
  const { error, results } = await migrator.migrateToLatest();
  if (error) {
    await open.close();
    const failed = results?.find((r) => r.status === 'Error')?.migrationName ?? 'connection';
    throw new UserError('LAMA_E_SERVER_DB', `database migration ${failed} failed: ${(error as Error).message}`, { cause: error });
  }
  return open;
}

/** Drop a PostgreSQL schema created with `?schema=` (tests use one random schema per run). */
export async function dropPostgresSchema(url: string): Promise<void> {
  const { connectionString, schema } = parsePostgresUrl(url);
  if (!schema) return;
  const client = new pg.Client({ connectionString });
  await client.connect();
  try {
    await client.query(`DROP SCHEMA IF EXISTS "${schema}" CASCADE`);
  } finally {
    await client.end();
  }
}

/** A fresh random schema name for isolating one test run or benchmark. */
export function randomSchemaName(prefix = 'lamadist'): string {
  return `${prefix}_${randomBytes(6).toString('hex')}`;
}

/** Now in Unix milliseconds (one place, so tests reading rows know the unit). */
export function nowMs(): number {
  return Date.now();
}

export { sql };
