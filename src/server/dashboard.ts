import { existsSync, promises as fs } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import type { FastifyInstance } from 'fastify';

const here = path.dirname(fileURLToPath(import.meta.url));
// Run from src/ (tests) the assets sit beside this file; from dist/ they are read from the source tree.
const ASSET_DIR = [path.join(here, 'dashboard'), path.join(here, '../../src/server/dashboard')].find((d) => existsSync(path.join(d, 'index.html')));

// A Map, not an object literal: `/ui/__proto__` or `/ui/constructor` must not find a "type".
const TYPES = new Map([
  ['index.html', 'text/html; charset=utf-8'],
  ['app.js', 'text/javascript; charset=utf-8'],
  ['style.css', 'text/css; charset=utf-8'],
]);

/**
 * Serve the dashboard (plain HTML, CSS and JavaScript; nothing is loaded from elsewhere) under /ui/.
 * Only the three known files are served: the name is a key of a fixed table, never a path.
 */
export function registerDashboard(app: FastifyInstance): void {
  app.get('/', { schema: { hide: true } }, async (_req, reply) => reply.redirect('/ui/'));
  app.get('/ui/', { schema: { hide: true } }, async (_req, reply) => send(reply, 'index.html'));
  app.get('/ui/:file', { schema: { hide: true } }, async (req, reply) => send(reply, (req.params as { file: string }).file));
  async function send(reply: import('fastify').FastifyReply, file: string) {
    const type = TYPES.get(file);
    if (!type || !ASSET_DIR) return reply.code(404).send({ error: 'LAMA_E_HTTP_404', message: 'not found' });
    const body = await fs.readFile(path.join(ASSET_DIR, file));
    return reply
      .type(type)
      // No framing by any page (clickjacking of the release upload and rollout buttons); the header
      // for browsers that predate CSP's frame-ancestors.
      .header('Content-Security-Policy', "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; connect-src 'self'; frame-ancestors 'none'")
      .header('X-Frame-Options', 'DENY')
      .header('X-Content-Type-Options', 'nosniff')
      .send(body);
  }
}
