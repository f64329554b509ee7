import { attestationFlows } from './attestation-flows.js';
import { ekBindingFlows } from './attestation-ek-flows.js';

const sqlite = async (): Promise<{ url: string; drop: () => Promise<void> }> => ({ url: 'sqlite::memory:', drop: async () => undefined });
attestationFlows('SQLite', sqlite);
ekBindingFlows('SQLite', sqlite);
