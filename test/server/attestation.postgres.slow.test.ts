import { afterAll, beforeAll } from 'vitest';
import { dropPostgresSchema, randomSchemaName } from '../../src/server/index.js';
import { startTestPostgres, type TestPostgres } from '../helpers/postgres.js';
import { attestationFlows } from './attestation-flows.js';

let pg: TestPostgres;
beforeAll(async () => {
  pg = await startTestPostgres();
}, 120_000);
afterAll(async () => {
  await pg.stop();
});

attestationFlows('PostgreSQL', async () => {
  const url = `${pg.url}${pg.url.includes('?') ? '&' : '?'}schema=${randomSchemaName('lamadist_attest')}`;
  return { url, drop: () => dropPostgresSchema(url) };
});
