import { postgresSchemas } from '../helpers/postgres.js';
import { attestationFlows } from './attestation-flows.js';
import { ekBindingFlows } from './attestation-ek-flows.js';

const schemas = postgresSchemas('lamadist_attest');
attestationFlows('PostgreSQL', schemas);
ekBindingFlows('PostgreSQL', schemas);
