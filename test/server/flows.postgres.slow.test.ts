import { afterAll, beforeAll } from 'vitest';
import { dropPostgresSchema, randomSchemaName } from '../../src/server/index.js';
import { startTestPostgres, type TestPostgres } from '../helpers/postgres.js';
import { serverFlows } from './flows.js';

// A throwaway cluster for this file (or $LAMADIST_TEST_PG); one fresh schema per run so parallel
// runs against a shared server and earlier leftovers never collide.
let pg: TestPostgres;
beforeAll(async () => {
  pg = await startTestPostgres();
}, 120_000);
afterAll(async () => {
  await pg.stop();
});

serverFlows('PostgreSQL', async () => {
  const url = `${pg.url}${pg.url.includes('?') ? '&' : '?'}schema=${randomSchemaName('lamadist_test')}`;
  return { url, drop: () => dropPostgresSchema(url) };
});
