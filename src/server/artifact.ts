import { createReadStream } from 'node:fs';
import { randomBytes } from 'node:crypto';
import type { IncomingMessage, OutgoingHttpHeaders, ServerResponse } from 'node:http';
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { contentRange, multipartPlan, planRange, type ByteRange } from './range.js';
import type { ArtifactStore, Lease } from './store.js';

/** What the artifact endpoint needs to know about the stored bundle. */
export interface ServedArtifact {
  sha256: string;
  size: number;
  createdAt: number;
}

/** Ranges up to this size come from the store's block cache; larger ones stream from the file. */
const INLINE_MAX = 4 * 1024 * 1024;

function inline(r: ByteRange): boolean {
  return r.end - r.start + 1 <= INLINE_MAX;
}

function fileStream(store: ArtifactStore, a: ServedArtifact, r: ByteRange): Readable {
  return createReadStream(store.pathFor(a.sha256), { start: r.start, end: r.end });
}

/**
 * Give leased cache memory back once the response is over: sent, or the connection dropped. The
 * client may already have gone while the read was pending, and then 'close' will not come again.
 */
function releaseOnClose(res: ServerResponse, lease: Lease): void {
  if (res.closed) lease.release();
  else res.once('close', () => lease.release());
}

/** Headers are written only once the bytes are in hand, so a failed read can still become a 500. */
async function sendRange(res: ServerResponse, status: number, headers: OutgoingHttpHeaders, store: ArtifactStore, a: ServedArtifact, r: ByteRange): Promise<void> {
  if (!inline(r)) {
    res.writeHead(status, headers);
    await pipeline(fileStream(store, a, r), res);
    return;
  }
  const lease = await store.read(a.sha256, a.size, r.start, r.end);
  releaseOnClose(res, lease);
  res.writeHead(status, headers);
  res.end(lease.data);
}

function multipartBody(res: ServerResponse, store: ArtifactStore, a: ServedArtifact, mp: ReturnType<typeof multipartPlan>): Readable {
  async function* parts(): AsyncGenerator<Buffer> {
    for (const p of mp.parts) {
      yield p.head;
      if (!inline(p.range)) {
        for await (const c of fileStream(store, a, p.range)) yield c as Buffer;
      } else {
        const lease = await store.read(a.sha256, a.size, p.range.start, p.range.end);
        releaseOnClose(res, lease);
        yield lease.data;
      }
    }
    yield mp.tail;
  }
  return Readable.from(parts());
}

function plan(req: IncomingMessage, a: ServedArtifact, etag: string, lastModified: Date): ReturnType<typeof planRange> {
  const range = typeof req.headers.range === 'string' ? req.headers.range : undefined;
  const ifRange = typeof req.headers['if-range'] === 'string' ? req.headers['if-range'] : undefined;
  return planRange(a.size, range, ifRange, { etag, lastModified });
}

async function respond(req: IncomingMessage, res: ServerResponse, store: ArtifactStore, a: ServedArtifact): Promise<number> {
  const etag = `"${a.sha256}"`;
  const lastModified = new Date(Math.floor(a.createdAt / 1000) * 1000);
  const headers: OutgoingHttpHeaders = {
    'Accept-Ranges': 'bytes',
    ETag: etag,
    'Last-Modified': lastModified.toUTCString(),
    'Cache-Control': 'private, max-age=0',
  };
  const inm = req.headers['if-none-match'];
  if (inm && inm.split(',').some((t) => t.trim() === etag || t.trim() === '*')) {
    res.writeHead(304, headers).end();
    return 0;
  }
  const p = plan(req, a, etag, lastModified);
  const head = req.method === 'HEAD';
  if (p.status === 416) {
    res.writeHead(416, { ...headers, 'Content-Range': `bytes */${a.size}`, 'Content-Length': 0 }).end();
    return 0;
  }
  if (p.status === 200) {
    Object.assign(headers, { 'Content-Type': 'application/octet-stream', 'Content-Length': a.size });
    if (head || a.size === 0) {
      res.writeHead(200, headers).end();
      return 0;
    }
    await sendRange(res, 200, headers, store, a, { start: 0, end: a.size - 1 });
    return a.size;
  }
  const [only] = p.ranges;
  if (p.ranges.length === 1 && only) {
    const len = only.end - only.start + 1;
    Object.assign(headers, { 'Content-Type': 'application/octet-stream', 'Content-Range': contentRange(only, a.size), 'Content-Length': len });
    if (head) {
      res.writeHead(206, headers).end();
      return 0;
    }
    await sendRange(res, 206, headers, store, a, only);
    return len;
  }
  const boundary = randomBytes(12).toString('hex');
  const mp = multipartPlan(p.ranges, a.size, 'application/octet-stream', boundary);
  res.writeHead(206, { ...headers, 'Content-Type': `multipart/byteranges; boundary=${boundary}`, 'Content-Length': mp.length });
  if (head) {
    res.end();
    return 0;
  }
  await pipeline(multipartBody(res, store, a, mp), res);
  return p.ranges.reduce((n, r) => n + r.end - r.start + 1, 0);
}

/**
 * Serve a stored bundle with HTTP/1.1 range support (RFC 7233): single, multiple and suffix
 * ranges, If-Range, 416 with `bytes *\/len`, ETag and Last-Modified. It works on the bare Node
 * request and response, so the same code answers behind fastify and on the server's fast path.
 * Nothing here writes to the database: RAUC's many small reads during a streaming install cost only
 * the read itself. Never throws: a failed read before the headers is a 500, after them the
 * connection is cut (the client sees a short body, never wrong bytes). `onError` hears of it.
 * Returns the number of payload bytes sent.
 */
export async function sendArtifact(
  req: IncomingMessage,
  res: ServerResponse,
  store: ArtifactStore,
  a: ServedArtifact,
  onError: (err: unknown) => void = () => undefined,
): Promise<number> {
  try {
    return await respond(req, res, store, a);
  } catch (err) {
    // A client that hangs up mid-body is routine for range readers, not a server fault.
    if ((err as NodeJS.ErrnoException).code !== 'ERR_STREAM_PREMATURE_CLOSE') onError(err);
    if (!res.headersSent) {
      res.writeHead(500, { 'Content-Type': 'application/json; charset=utf-8' }).end(JSON.stringify({ error: 'LAMA_E_SERVER_INTERNAL', message: 'internal server error' }));
    } else {
      res.destroy();
    }
    return 0;
  }
}
