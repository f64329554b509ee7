import { attestationFlows } from './attestation-flows.js';

attestationFlows('SQLite', async () => ({ url: 'sqlite::memory:', drop: async () => undefined }));
