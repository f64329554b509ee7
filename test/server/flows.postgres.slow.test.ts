import { postgresSchemas } from '../helpers/postgres.js';
import { serverFlows } from './flows.js';

serverFlows('PostgreSQL', postgresSchemas('lamadist_test'));
