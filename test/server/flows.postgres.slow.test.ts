import { dropPostgresSchema, randomSchemaName } from '../../src/server/index.js';
import { serverFlows } from './flows.js';

// PostgreSQL from scripts/ci-services (Debian's cluster); one fresh schema per run so parallel
// runs and earlier leftovers never collide.
const base = process.env.LAMADIST_TEST_PG ?? 'postgres://lamadist:lamadist@127.0.0.1:5432/lamadist_test';

serverFlows('PostgreSQL', async () => {
  const url = `${base}${base.includes('?') ? '&' : '?'}schema=${randomSchemaName('lamadist_test')}`;
  return { url, drop: () => dropPostgresSchema(url) };
});
