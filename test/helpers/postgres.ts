import { existsSync, promises as fs } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll } from 'vitest';
import { dropPostgresSchema, randomSchemaName } from '../../src/server/index.js';
import { run } from '../../src/util/proc.js';

/** A PostgreSQL server for one test file. */
export interface TestPostgres {
  /** Connection URL of a database the tests may create schemas in. */
  url: string;
  /** Stops the server and removes its files (nothing for a server given by $LAMADIST_TEST_PG). */
  stop: () => Promise<void>;
}

/** Debian installs the server binaries per major version, outside PATH. */
async function serverBinDir(): Promise<string> {
  const root = '/usr/lib/postgresql';
  const versions = (await fs.readdir(root).catch(() => [] as string[])).filter((v) => existsSync(path.join(root, v, 'bin', 'initdb')));
  const newest = versions.sort((a, b) => Number(b) - Number(a))[0];
  if (!newest) throw new Error(`no PostgreSQL server under ${root} (Debian package postgresql; scripts/setup installs it)`);
  return path.join(root, newest, 'bin');
}

async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.once('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address() as net.AddressInfo;
      srv.close(() => resolve(port));
    });
  });
}

/**
 * Starts a throwaway PostgreSQL cluster: initdb and pg_ctl in a temporary directory, on a free port
 * of 127.0.0.1 with the socket in that directory, so it never meets a system cluster. PostgreSQL
 * refuses to run as root, so as root the cluster runs as the `postgres` user (else `nobody`). With
 * $LAMADIST_TEST_PG set, that server is used instead and nothing is started.
 */
export async function startTestPostgres(): Promise<TestPostgres> {
  const given = process.env.LAMADIST_TEST_PG;
  if (given) return { url: given, stop: async () => {} };
  const bin = await serverBinDir();
  const root = process.getuid?.() === 0;
  const user = root ? ((await run('id', ['-u', 'postgres'], { allowFailure: true })).code === 0 ? 'postgres' : 'nobody') : undefined;
  const as = (tool: string, args: string[]): [string, string[]] => (user ? ['runuser', ['-u', user, '--', path.join(bin, tool), ...args]] : [path.join(bin, tool), args]);
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'lamadist-pg-'));
  const data = path.join(dir, 'data');
  const log = path.join(dir, 'server.log');
  try {
    if (user) {
      const ids = (flag: string): Promise<number> => run('id', [flag, user]).then((r) => Number(r.stdout.trim()));
      await fs.chown(dir, await ids('-u'), await ids('-g'));
    }
    // trust on a loopback-only server that lives as long as one test file; -N: nothing to keep
    await run(...as('initdb', ['-D', data, '-U', 'lamadist', '--auth=trust', '-E', 'UTF8', '--locale=C', '-N']));
    // A port can be taken between freePort() and the server's bind: try another one.
    for (let attempt = 1; ; attempt++) {
      const port = await freePort();
      const opts = `-p ${port} -k ${dir} -c listen_addresses=127.0.0.1 -F`;
      const r = await run(...as('pg_ctl', ['start', '-D', data, '-l', log, '-w', '-t', '60', '-o', opts]), { allowFailure: true });
      if (r.code === 0) {
        return {
          url: `postgres://lamadist@127.0.0.1:${port}/postgres`,
          stop: async () => {
            await run(...as('pg_ctl', ['stop', '-D', data, '-m', 'fast', '-w']), { allowFailure: true });
            await fs.rm(dir, { recursive: true, force: true });
          },
        };
      }
      if (attempt === 3) {
        const tail = (await fs.readFile(log, 'utf8').catch(() => '')).split('\n').slice(-10).join('\n');
        throw new Error(`PostgreSQL did not start: ${r.stderr.trim()}\n${tail}`);
      }
    }
  } catch (err) {
    await fs.rm(dir, { recursive: true, force: true });
    throw err;
  }
}

/**
 * A throwaway cluster for the calling test file (or $LAMADIST_TEST_PG), started before its tests
 * and stopped after them, and a function giving one fresh schema per call, so parallel runs
 * against a shared server and earlier leftovers never collide.
 */
export function postgresSchemas(prefix: string): () => Promise<{ url: string; drop: () => Promise<void> }> {
  let pg: TestPostgres | undefined;
  beforeAll(async () => {
    pg = await startTestPostgres();
  }, 120_000);
  afterAll(async () => {
    await pg?.stop();
  });
  return async () => {
    const base = (pg as TestPostgres).url;
    const url = `${base}${base.includes('?') ? '&' : '?'}schema=${randomSchemaName(prefix)}`;
    return { url, drop: () => dropPostgresSchema(url) };
  };
}
