import { createHash } from 'node:crypto';
import { availableParallelism } from 'node:os';
import { promises as fs, readSync } from 'node:fs';
import { Worker } from 'node:worker_threads';

/**
 * Salted per-block hashing, the hot loop of dm-verity. Large inputs are split into chunks that worker
 * threads read and hash themselves (positional reads on the caller's file descriptor, which every
 * thread of the process shares), so both reading and hashing run on all cores while the caller
 * consumes digests strictly in order. Small inputs stay on the calling thread: starting workers
 * costs more than hashing a few megabytes.
 */

/** A run of consecutive blocks and their digests, packed back to back (no slot padding). */
export interface DigestChunk {
  firstBlock: number;
  blocks: number;
  digests: Buffer;
}

export interface HashJob {
  fd: number;
  /** Byte offset of block 0. */
  offset: number;
  blocks: number;
  blockSize: number;
  algorithm: string;
  salt: Buffer;
  digestSize: number;
  /** Blocks per chunk; a multiple of hashes-per-block keeps each chunk's hashes block-aligned. */
  chunkBlocks: number;
}

// Runs as a CommonJS worker from source text so the same code works from dist/ and under vitest.
const WORKER_SOURCE = `
const { parentPort } = require('node:worker_threads');
const { createHash } = require('node:crypto');
const { readSync } = require('node:fs');
let buf = Buffer.alloc(0);
parentPort.on('message', (job) => {
  try {
    const len = job.blocks * job.blockSize;
    if (buf.length < len) buf = Buffer.allocUnsafeSlow(len);
    let got = 0;
    while (got < len) {
      const n = readSync(job.fd, buf, got, len - got, job.offset + got);
      if (n === 0) throw new Error('unexpected end of file at byte ' + (job.offset + got));
      got += n;
    }
    const salted = createHash(job.algorithm).update(Buffer.from(job.salt));
    const out = new Uint8Array(job.blocks * job.digestSize);
    for (let i = 0; i < job.blocks; i++) {
      const d = salted.copy().update(buf.subarray(i * job.blockSize, (i + 1) * job.blockSize)).digest();
      out.set(d, i * job.digestSize);
    }
    parentPort.postMessage({ id: job.id, out: out.buffer }, [out.buffer]);
  } catch (e) {
    parentPort.postMessage({ id: job.id, error: String(e && e.message || e) });
  }
});
`;

interface Pending {
  resolve: (b: Buffer) => void;
  reject: (e: Error) => void;
}

class HashPool {
  private readonly workers: Worker[] = [];
  private readonly pending = new Map<number, Pending>();
  private nextId = 0;
  private turn = 0;

  constructor(size: number) {
    for (let i = 0; i < size; i++) {
      const w = new Worker(WORKER_SOURCE, { eval: true });
      w.on('message', (m: { id: number; out?: ArrayBuffer; error?: string }) => {
        const p = this.pending.get(m.id);
        if (!p) return;
        this.pending.delete(m.id);
        if (m.error !== undefined || !m.out) p.reject(new Error(m.error ?? 'hash worker returned nothing'));
        else p.resolve(Buffer.from(m.out));
      });
      w.on('error', (e) => this.failAll(e));
      this.workers.push(w);
    }
  }

  private failAll(e: Error): void {
    for (const p of this.pending.values()) p.reject(e);
    this.pending.clear();
  }

  submit(job: Omit<HashJob, 'chunkBlocks'>): Promise<Buffer> {
    const id = this.nextId++;
    const worker = this.workers[this.turn++ % this.workers.length] as Worker;
    return new Promise<Buffer>((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      worker.postMessage({ ...job, id, salt: new Uint8Array(job.salt) });
    });
  }

  async close(): Promise<void> {
    await Promise.all(this.workers.map((w) => w.terminate()));
  }
}

/** Inputs below this size are hashed on the calling thread. */
const PARALLEL_THRESHOLD = 64 * 1024 * 1024;

/** How many hashing threads to use: LAMADIST_THREADS, or one per core. */
function threadCount(): number {
  const env = Number.parseInt(process.env.LAMADIST_THREADS ?? '', 10);
  return Number.isInteger(env) && env > 0 ? env : availableParallelism();
}

function hashInline(job: HashJob, firstBlock: number, blocks: number, buf: Buffer): Buffer {
  const len = blocks * job.blockSize;
  const start = job.offset + firstBlock * job.blockSize;
  let got = 0;
  while (got < len) {
    // Synchronous positional reads: the hashing below blocks this thread anyway, and skipping the
    // thread-pool round trip per chunk matters on a busy machine.
    const bytesRead = readSync(job.fd, buf, got, len - got, start + got);
    if (bytesRead === 0) throw new Error(`unexpected end of file at byte ${start + got}`);
    got += bytesRead;
  }
  const salted = createHash(job.algorithm).update(job.salt);
  const out = Buffer.allocUnsafe(blocks * job.digestSize);
  for (let i = 0; i < blocks; i++) {
    salted
      .copy()
      .update(buf.subarray(i * job.blockSize, (i + 1) * job.blockSize))
      .digest()
      .copy(out, i * job.digestSize);
  }
  return out;
}

/**
 * Hash `job.blocks` blocks of `job.fd` as `H(salt || block)` (verity format 1), yielding chunks in
 * block order. Memory stays bounded by a few chunks per thread whatever the input size.
 */
export async function* hashBlocks(job: HashJob): AsyncGenerator<DigestChunk> {
  const total = job.blocks;
  const bytes = total * job.blockSize;
  const threads = threadCount();
  if (bytes < PARALLEL_THRESHOLD || threads < 2) {
    const buf = Buffer.allocUnsafeSlow(Math.min(total, job.chunkBlocks) * job.blockSize);
    for (let first = 0; first < total; first += job.chunkBlocks) {
      const blocks = Math.min(job.chunkBlocks, total - first);
      yield { firstBlock: first, blocks, digests: hashInline(job, first, blocks, buf) };
    }
    return;
  }
  const pool = new HashPool(threads);
  // Two jobs queued per worker keep each thread busy while the consumer writes results.
  const depth = threads * 2;
  const queue: { firstBlock: number; blocks: number; result: Promise<Buffer> }[] = [];
  let next = 0;
  const fill = (): void => {
    while (queue.length < depth && next < total) {
      const blocks = Math.min(job.chunkBlocks, total - next);
      const result = pool.submit({ ...job, offset: job.offset + next * job.blockSize, blocks });
      // A rejection is observed when the consumer reaches this chunk; do not let it go unhandled.
      result.catch(() => undefined);
      queue.push({ firstBlock: next, blocks, result });
      next += blocks;
    }
  };
  try {
    fill();
    while (queue.length > 0) {
      const head = queue.shift() as (typeof queue)[number];
      const digests = await head.result;
      fill();
      yield { firstBlock: head.firstBlock, blocks: head.blocks, digests };
    }
  } finally {
    await pool.close();
  }
}

/** Open a file for reading and writing, creating it when missing (never truncating it). */
export async function openReadWrite(file: string): Promise<fs.FileHandle> {
  try {
    return await fs.open(file, 'r+');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return fs.open(file, 'w+', 0o644);
    throw err;
  }
}
