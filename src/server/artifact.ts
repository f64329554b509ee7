import { createReadStream } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { Readable } from 'node:stream';
import type { FastifyReply, FastifyRequest } from 'fastify';
import { contentRange, multipartPlan, planRange, type ByteRange } from './range.js';
import type { ArtifactStore, Lease } from './store.js';

/** What the artifact endpoint needs to know about the stored bundle. */
export interface ServedArtifact {
  sha256: string;
  size: number;
  createdAt: number;
}

/** HEAD answers with an empty stream: fastify then keeps the Content-Length the GET would have. */
const EMPTY = (): Readable => Readable.from([]);

/** Ranges up to this size come from the store's block cache; larger ones stream from the file. */
const INLINE_MAX = 4 * 1024 * 1024;

function body(store: ArtifactStore, a: ServedArtifact, r: ByteRange): Promise<Lease> | Readable {
  if (r.end - r.start + 1 <= INLINE_MAX) return store.read(a.sha256, a.size, r.start, r.end);
  return createReadStream(store.pathFor(a.sha256), { start: r.start, end: r.end });
}

/** Give leased cache memory back once the response is over (sent, or the connection dropped). */
function releaseOnClose(reply: FastifyReply, lease: Lease): void {
  reply.raw.once('close', () => lease.release());
}

async function sendBody(reply: FastifyReply, store: ArtifactStore, a: ServedArtifact, r: ByteRange): Promise<number> {
  const b = body(store, a, r);
  if (b instanceof Readable) {
    reply.send(b);
  } else {
    const lease = await b;
    releaseOnClose(reply, lease);
    reply.send(lease.data);
  }
  return r.end - r.start + 1;
}

/**
 * Serve a stored bundle with HTTP/1.1 range support (RFC 7233): single, multiple and suffix
 * ranges, If-Range, 416 with `bytes *\/len`, ETag and Last-Modified. Nothing here writes to the
 * database, so RAUC's many small reads during a streaming install cost only the read itself.
 * Returns the number of payload bytes sent.
 */
export async function sendArtifact(req: FastifyRequest, reply: FastifyReply, store: ArtifactStore, a: ServedArtifact): Promise<number> {
  const etag = `"${a.sha256}"`;
  const lastModified = new Date(Math.floor(a.createdAt / 1000) * 1000);
  reply.header('Accept-Ranges', 'bytes').header('ETag', etag).header('Last-Modified', lastModified.toUTCString());
  reply.header('Cache-Control', 'private, max-age=0');
  const inm = req.headers['if-none-match'];
  if (inm && inm.split(',').some((t) => t.trim() === etag || t.trim() === '*')) {
    reply.code(304).send();
    return 0;
  }
  const range = typeof req.headers.range === 'string' ? req.headers.range : undefined;
  const ifRange = typeof req.headers['if-range'] === 'string' ? req.headers['if-range'] : undefined;
  const plan = planRange(a.size, range, ifRange, { etag, lastModified });
  const head = req.method === 'HEAD';
  if (plan.status === 416) {
    reply.code(416).header('Content-Range', `bytes */${a.size}`).send();
    return 0;
  }
  if (plan.status === 200) {
    reply.code(200).header('Content-Type', 'application/octet-stream').header('Content-Length', a.size);
    if (head || a.size === 0) {
      reply.send(EMPTY());
      return 0;
    }
    return sendBody(reply, store, a, { start: 0, end: a.size - 1 });
  }
  const [only] = plan.ranges;
  if (plan.ranges.length === 1 && only) {
    const len = only.end - only.start + 1;
    reply.code(206).header('Content-Type', 'application/octet-stream').header('Content-Range', contentRange(only, a.size)).header('Content-Length', len);
    if (head) {
      reply.send(EMPTY());
      return 0;
    }
    return sendBody(reply, store, a, only);
  }
  const boundary = randomBytes(12).toString('hex');
  const mp = multipartPlan(plan.ranges, a.size, 'application/octet-stream', boundary);
  reply.code(206).header('Content-Type', `multipart/byteranges; boundary=${boundary}`).header('Content-Length', mp.length);
  if (head) {
    reply.send();
    return 0;
  }
  async function* parts(): AsyncGenerator<Buffer> {
    for (const p of mp.parts) {
      yield p.head;
      const b = body(store, a, p.range);
      if (b instanceof Readable) {
        for await (const c of b) yield c as Buffer;
      } else {
        const lease = await b;
        releaseOnClose(reply, lease);
        yield lease.data;
      }
    }
    yield mp.tail;
  }
  reply.send(Readable.from(parts()));
  return plan.ranges.reduce((n, r) => n + r.end - r.start + 1, 0);
}
