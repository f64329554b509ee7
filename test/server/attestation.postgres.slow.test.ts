import { postgresSchemas } from '../helpers/postgres.js';
import { attestationFlows } from './attestation-flows.js';

attestationFlows('PostgreSQL', postgresSchemas('lamadist_attest'));
