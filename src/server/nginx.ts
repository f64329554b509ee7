import { spawn } from 'node:child_process';
import { promises as fs } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { missingTool } from '../util/proc.js';
import { onCleanup } from '../util/cleanup.js';

/**
 * Debian's nginx serving one directory on a loopback port: the peer the artifact endpoint's range
 * handling and throughput are measured against (benchmark and conformance test).
 */
export interface Nginx {
  url: string;
  stop(): Promise<void>;
}

async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const port = (s.address() as net.AddressInfo).port;
      s.close(() => resolve(port));
    });
  });
}

/** Start nginx in the foreground with a config in a temp dir; `stop()` kills it and removes the dir. */
export async function startNginx(root: string): Promise<Nginx> {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'lamadist-nginx-'));
  const port = await freePort();
  const conf = [
    'daemon off;',
    // As root, nginx workers would drop to nobody and could not read a 0700 temp dir.
    process.getuid?.() === 0 ? 'user root root;' : '',
    'worker_processes 1;',
    `pid ${dir}/nginx.pid;`,
    `error_log ${dir}/error.log warn;`,
    'events { worker_connections 1024; }',
    'http {',
    '  access_log off;',
    '  sendfile on;',
    '  keepalive_requests 1000000;',
    '  default_type application/octet-stream;',
    `  client_body_temp_path ${dir}/body;`,
    `  proxy_temp_path ${dir}/proxy;`,
    `  fastcgi_temp_path ${dir}/fastcgi;`,
    `  uwsgi_temp_path ${dir}/uwsgi;`,
    `  scgi_temp_path ${dir}/scgi;`,
    `  server { listen 127.0.0.1:${port}; root ${path.resolve(root)}; }`,
    '}',
  ].join('\n');
  await fs.writeFile(path.join(dir, 'nginx.conf'), conf);
  const child = spawn('nginx', ['-c', path.join(dir, 'nginx.conf'), '-p', dir, '-e', path.join(dir, 'error.log')], { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr.on('data', (c: Buffer) => (stderr += c.toString()));
  const stop = async (): Promise<void> => {
    unregister();
    if (child.exitCode === null && child.signalCode === null) {
      child.kill('SIGTERM');
      await new Promise((r) => child.once('close', r));
    }
    await fs.rm(dir, { recursive: true, force: true });
  };
  const unregister = onCleanup(stop);
  const started = await new Promise<boolean | Error>((resolve) => {
    child.once('error', (e: NodeJS.ErrnoException) => resolve(e.code === 'ENOENT' ? missingTool('nginx') : e));
    child.once('close', () => resolve(new Error(`nginx exited: ${stderr.trim()}`)));
    const poll = (): void => {
      const sock = net.connect(port, '127.0.0.1', () => {
        sock.destroy();
        resolve(true);
      });
      sock.once('error', () => setTimeout(poll, 50));
    };
    poll();
  });
  if (started !== true) {
    await stop();
    throw started;
  }
  return { url: `http://127.0.0.1:${port}`, stop };
}
