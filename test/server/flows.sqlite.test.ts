import { serverFlows } from './flows.js';

serverFlows('SQLite', async () => ({ url: 'sqlite::memory:', drop: async () => undefined }));
