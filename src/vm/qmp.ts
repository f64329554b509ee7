import net from 'node:net';

/** One reply of QEMU's machine protocol: `return` on success, `error` otherwise. */
interface QmpReply {
  return?: unknown;
  error?: { class: string; desc: string };
  id?: number;
}

/**
 * Run commands on a QEMU's QMP socket, in order, and return their replies. The harness uses it
 * only when a guest has gone silent (to record where its CPUs are), so it
 * opens a connection per call instead of keeping one for the life of the VM.
 */
function qmpCommands(socket: string, commands: { execute: string; arguments?: Record<string, unknown> }[], timeoutMs = 10_000): Promise<QmpReply[]> {
  return new Promise((resolve, reject) => {
    const conn = net.connect(socket);
    const replies: QmpReply[] = [];
    let buf = '';
    let greeted = false;
    const timer = setTimeout(() => done(new Error(`QMP on ${socket}: no answer within ${timeoutMs} ms`)), timeoutMs);
    const done = (err?: Error): void => {
      clearTimeout(timer);
      conn.destroy();
      if (err) reject(err);
      else resolve(replies);
    };
    conn.on('error', (e) => done(e));
    conn.on('data', (chunk: Buffer) => {
      buf += chunk.toString('utf8');
      let nl: number;
      while ((nl = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, nl).trim();
        buf = buf.slice(nl + 1);
        if (!line) continue;
        let msg: QmpReply & { QMP?: unknown };
        try {
          msg = JSON.parse(line) as typeof msg;
        } catch {
          done(new Error(`QMP on ${socket}: not JSON: ${line.slice(0, 80)}`));
          return;
        }
        if (msg.QMP && !greeted) {
          // Capabilities negotiation first; the commands get ids so events in between are skipped.
          greeted = true;
          conn.write(`${JSON.stringify({ execute: 'qmp_capabilities' })}\n`);
          commands.forEach((c, i) => conn.write(`${JSON.stringify({ ...c, id: i })}\n`));
        } else if (typeof msg.id === 'number') {
          replies[msg.id] = msg;
          if (replies.filter(Boolean).length === commands.length) done();
        }
      }
    });
  });
}

/** An HMP command's text output through QMP (`info registers`, `info cpus`). */
export async function hmp(socket: string, commandLine: string, timeoutMs?: number): Promise<string> {
  const [r] = await qmpCommands(socket, [{ execute: 'human-monitor-command', arguments: { 'command-line': commandLine } }], timeoutMs);
  if (r?.error) throw new Error(`QMP ${commandLine}: ${r.error.desc}`);
  return String(r?.return ?? '');
}
