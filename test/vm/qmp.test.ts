import { promises as fs } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { hmp } from '../../src/vm/qmp.js';

// The QMP client's edges that a healthy QEMU never shows (the slow kit test reads real registers):
// events between replies, garbage on the socket, a QEMU whose main loop no longer answers.
describe('QMP client', () => {
  let dir: string | undefined;
  let server: net.Server | undefined;
  afterEach(async () => {
    server?.close();
    if (dir) await fs.rm(dir, { recursive: true, force: true });
  });

  async function peer(onLine: (line: string, sock: net.Socket) => void): Promise<string> {
    dir = await fs.mkdtemp(path.join(os.tmpdir(), 'qmp-'));
    const socket = path.join(dir, 'qmp.sock');
    server = net.createServer((sock) => {
      sock.write('{"QMP": {"version": {}, "capabilities": []}}\r\n');
      let buf = '';
      sock.on('data', (d) => {
        buf += d.toString();
        for (let nl = buf.indexOf('\n'); nl >= 0; nl = buf.indexOf('\n')) {
          onLine(buf.slice(0, nl), sock);
          buf = buf.slice(nl + 1);
        }
      });
    });
    await new Promise<void>((r) => server!.listen(socket, r));
    return socket;
  }

  it('negotiates, skips events and returns the command output', async () => {
    const seen: unknown[] = [];
    const socket = await peer((line, sock) => {
      const msg = JSON.parse(line) as { execute: string; id?: number; arguments?: unknown };
      seen.push(msg);
      if (msg.execute === 'qmp_capabilities') sock.write('{"return": {}}\r\n');
      else sock.write(`{"event": "RESET", "data": {}}\r\n{"return": "RIP=fff0\\r\\n", "id": ${msg.id}}\r\n`);
    });
    expect(await hmp(socket, 'info registers -a')).toBe('RIP=fff0\r\n');
    expect(seen).toEqual([{ execute: 'qmp_capabilities' }, { execute: 'human-monitor-command', arguments: { 'command-line': 'info registers -a' }, id: 0 }]);
  });

  it('names a QMP error, garbage on the socket, and a peer that never answers', async () => {
    let mode = 'error';
    const socket = await peer((line, sock) => {
      const msg = JSON.parse(line) as { execute: string; id?: number };
      if (msg.execute === 'qmp_capabilities') return;
      if (mode === 'error') sock.write(`{"error": {"class": "GenericError", "desc": "no such command"}, "id": ${msg.id}}\n`);
      if (mode === 'garbage') sock.write('<html>\n');
    });
    await expect(hmp(socket, 'info nothing')).rejects.toThrow('QMP info nothing: no such command');
    mode = 'garbage';
    await expect(hmp(socket, 'info cpus')).rejects.toThrow(/not JSON: <html>/);
    mode = 'silent';
    await expect(hmp(socket, 'info cpus', 300)).rejects.toThrow(/no answer within 300 ms/);
  });
});
