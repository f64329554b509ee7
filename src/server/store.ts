import { createHash, randomBytes } from 'node:crypto';
import { promises as fs } from 'node:fs';
import type { FileHandle } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import type { Readable } from 'node:stream';
import { UserError, isErrno } from '../errors.js';

/** Digests and size of a received upload, computed while it streams to disk. */
export interface UploadDigest {
  size: number;
  sha256: string;
  sha1: string;
  md5: string;
}

/** An upload in the store's temp directory, not visible to devices until `commit`. */
export interface PendingUpload extends UploadDigest {
  tempPath: string;
}

/** Bytes of an artifact held in memory for a caller; `release()` once they have been written out. */
export interface Lease {
  data: Buffer;
  release(): void;
}

interface CachedBlock {
  slab: Buffer;
  len: number;
  /** Leases currently holding views of the slab. */
  refs: number;
  settled: boolean;
  failed?: boolean;
  loaded: Promise<void>;
  /** Date.now() of the last read, for idle trimming. */
  used: number;
}

/** Block size of the range-read cache: 32 RAUC-sized (128 KiB) reads per block. */
export const BLOCK_SIZE = 4 * 1024 * 1024;
/**
 * Default budget of the range-read cache: an eighth of the machine's memory, at most 1 GiB, so one
 * release bundle usually fits and a whole rollout wave is served without touching the file again.
 * Slabs are allocated as blocks are first read and given back after IDLE_MS without a reader.
 */
export const DEFAULT_CACHE_BYTES = Math.min(1024 ** 3, Math.floor(os.totalmem() / 8 / BLOCK_SIZE) * BLOCK_SIZE);
/** Blocks nobody has read for this long are dropped and their memory freed. */
export const IDLE_MS = 5 * 60_000;

/**
 * The content-addressed artifact directory: `artifacts/<sha256[0:2]>/<sha256>` for committed
 * bundles and `tmp/` (same file system, so rename is atomic) for uploads in flight. A crash leaves
 * at most files in tmp/, which `open` removes, or a committed file without a database row, which is
 * never served and is reused by the next upload of the same content.
 */
export class ArtifactStore {
  readonly root: string;
  private handles = new Map<string, Promise<FileHandle>>();
  /** Aligned blocks of committed artifacts, least recently used first (Map keeps insertion order). */
  private blocks = new Map<string, CachedBlock>();
  private freeSlabs: Buffer[] = [];
  private slabCount = 0;
  private readonly maxSlabs: number;
  private readonly sweeper: NodeJS.Timeout;

  private constructor(root: string, cacheBytes: number) {
    this.root = root;
    this.maxSlabs = Math.floor(cacheBytes / BLOCK_SIZE);
    // A rollout fills the cache; between rollouts the server should not sit on that memory.
    this.sweeper = setInterval(() => this.trimIdle(IDLE_MS), Math.min(IDLE_MS, 60_000)).unref();
  }

  /**
   * Create the directories and remove leftovers of uploads interrupted by a crash. `cacheBytes`
   * bounds the in-memory block cache that range reads are served from (0 turns it off).
   */
  static async open(root: string, opts: { cacheBytes?: number } = {}): Promise<ArtifactStore> {
    const abs = path.resolve(root);
    await fs.mkdir(path.join(abs, 'artifacts'), { recursive: true });
    await fs.rm(path.join(abs, 'tmp'), { recursive: true, force: true });
    await fs.mkdir(path.join(abs, 'tmp'), { recursive: true });
    return new ArtifactStore(abs, Math.max(0, opts.cacheBytes ?? DEFAULT_CACHE_BYTES));
  }

  /** Where the bundle with this SHA-256 lives once committed. */
  pathFor(sha256: string): string {
    if (!/^[0-9a-f]{64}$/.test(sha256)) throw new Error(`not a sha256: ${sha256}`);
    return path.join(this.root, 'artifacts', sha256.slice(0, 2), sha256);
  }

  /**
   * Stream `body` into a temp file, hashing as it goes; refuse more than `maxBytes` (the temp file is
   * removed). The file is fsynced before this resolves.
   */
  async receive(body: Readable, maxBytes: number): Promise<PendingUpload> {
    const tempPath = path.join(this.root, 'tmp', `upload-${randomBytes(8).toString('hex')}`);
    const fh = await fs.open(tempPath, 'wx', 0o644);
    const h256 = createHash('sha256');
    const h1 = createHash('sha1');
    const h5 = createHash('md5');
    let size = 0;
    try {
      for await (const chunk of body as AsyncIterable<Buffer>) {
        size += chunk.length;
        if (size > maxBytes) {
          throw new UserError('LAMA_E_SERVER_TOO_LARGE', `upload exceeds the limit of ${maxBytes} bytes`);
        }
        h256.update(chunk);
        h1.update(chunk);
        h5.update(chunk);
        let off = 0;
        while (off < chunk.length) off += (await fh.write(chunk, off, chunk.length - off)).bytesWritten;
      }
      await fh.sync();
      await fh.close();
    } catch (err) {
      await fh.close().catch(() => undefined);
      await fs.rm(tempPath, { force: true });
      throw err;
    }
    return { tempPath, size, sha256: h256.digest('hex'), sha1: h1.digest('hex'), md5: h5.digest('hex') };
  }

  /** Move a verified upload to its content address (or drop it if that content is already there). */
  async commit(upload: PendingUpload): Promise<string> {
    const final = this.pathFor(upload.sha256);
    await fs.mkdir(path.dirname(final), { recursive: true });
    await fs.rename(upload.tempPath, final);
    const dir = await fs.open(path.dirname(final), 'r');
    try {
      await dir.sync();
    } finally {
      await dir.close();
    }
    return final;
  }

  /** Remove an upload that failed verification. */
  async discard(upload: PendingUpload): Promise<void> {
    await fs.rm(upload.tempPath, { force: true });
  }

  /**
   * A shared read-only handle for positional reads; artifacts are immutable, so one handle per file
   * serves every range request without an open/close per read.
   */
  handle(sha256: string): Promise<FileHandle> {
    let h = this.handles.get(sha256);
    if (!h) {
      h = fs.open(this.pathFor(sha256), 'r').catch((err: unknown) => {
        this.handles.delete(sha256);
        if (isErrno(err, 'ENOENT')) throw new UserError('LAMA_E_SERVER_ARTIFACT_MISSING', `artifact ${sha256} is missing from the store`);
        throw err;
      });
      this.handles.set(sha256, h);
    }
    return h;
  }

  /**
   * Bytes `start`..`end` (inclusive) of a committed artifact of `size` bytes, as a lease: `data` stays
   * valid until `release()`, which the caller calls once the bytes are written out. Reads go
   * through an LRU of BLOCK_SIZE-aligned blocks held in a fixed pool of slabs: RAUC streams a bundle
   * in small ranges and every device of a rollout wave reads the same ones, so one positional read
   * serves many requests, the next block is read ahead, and the slabs are reused instead of
   * allocated, which keeps page faults and garbage collection off the hot path. A range inside
   * one block is a view of the slab (no copy); a slab is reused only when no lease holds it.
   */
  async read(sha256: string, size: number, start: number, end: number): Promise<Lease> {
    const len = end - start + 1;
    const first = Math.floor(start / BLOCK_SIZE);
    const last = Math.floor(end / BLOCK_SIZE);
    const held: CachedBlock[] = [];
    for (let i = first; i <= last; i++) {
      const b = this.block(sha256, size, i, true);
      if (!b) break;
      held.push(b);
    }
    const releaseAll = (): void => {
      for (const b of held.splice(0)) this.unref(b);
    };
    if (held.length !== last - first + 1) {
      // Cache off, or every slab is leased right now: read this range on its own.
      releaseAll();
      const buf = Buffer.allocUnsafe(len);
      await this.readInto(sha256, start, buf);
      return { data: buf, release: () => undefined };
    }
    // Streaming readers go forward: start reading the next block now so it is in memory when asked for.
    if ((last + 1) * BLOCK_SIZE < size) this.block(sha256, size, last + 1, false)?.loaded.catch(() => undefined);
    try {
      await Promise.all(held.map((b) => b.loaded));
    } catch (err) {
      releaseAll();
      throw err;
    }
    const pieces = held.map((b, k) => {
      const base = (first + k) * BLOCK_SIZE;
      return b.slab.subarray(Math.max(start, base) - base, Math.min(end + 1, base + b.len) - base);
    });
    if (pieces.length === 1) return { data: pieces[0] as Buffer, release: releaseAll };
    const data = Buffer.concat(pieces, len);
    releaseAll();
    return { data, release: () => undefined };
  }

  /**
   * Drop cached blocks no lease holds and nobody has read for `idleMs`, and free their slabs along
   * with the unused ones; the cache grows again from the next read. Returns the slabs freed.
   */
  trimIdle(idleMs: number): number {
    const before = this.slabCount;
    const now = Date.now();
    for (const [key, b] of this.blocks) {
      if (b.refs === 0 && b.settled && now - b.used >= idleMs) {
        this.blocks.delete(key);
        this.slabCount--;
      }
    }
    this.slabCount -= this.freeSlabs.length;
    this.freeSlabs = [];
    return before - this.slabCount;
  }

  /** The most memory the block cache may hold, in bytes. */
  get cacheBudget(): number {
    return this.maxSlabs * BLOCK_SIZE;
  }

  /** Slab usage, for tests and metrics: allocated, free (not holding a block) and leased. */
  cacheStats(): { slabs: number; free: number; leased: number; blocks: number } {
    let leased = 0;
    for (const b of this.blocks.values()) if (b.refs > 0) leased++;
    return { slabs: this.slabCount, free: this.freeSlabs.length, leased, blocks: this.blocks.size };
  }

  /** The cached block `index` of an artifact (loading it into a slab if needed), or undefined when no slab is free. */
  private block(sha256: string, size: number, index: number, lease: boolean): CachedBlock | undefined {
    const key = `${sha256}:${index}`;
    const hit = this.blocks.get(key);
    if (hit) {
      this.blocks.delete(key);
      this.blocks.set(key, hit);
      if (lease) hit.refs++;
      hit.used = Date.now();
      return hit;
    }
    const slab = this.takeSlab();
    if (!slab) return undefined;
    const len = Math.min(BLOCK_SIZE, size - index * BLOCK_SIZE);
    const entry: CachedBlock = { slab, len, refs: lease ? 1 : 0, settled: false, loaded: Promise.resolve(), used: Date.now() };
    entry.loaded = this.readInto(sha256, index * BLOCK_SIZE, slab.subarray(0, len)).then(
      () => {
        entry.settled = true;
      },
      (err: unknown) => {
        // A failed read is not cached: the next request tries the file again.
        if (this.blocks.get(key) === entry) this.blocks.delete(key);
        entry.failed = true;
        if (entry.refs === 0) this.freeSlabs.push(slab);
        throw err;
      },
    );
    this.blocks.set(key, entry);
    return entry;
  }

  private unref(b: CachedBlock): void {
    b.refs--;
    // A failed block left the map when its read failed; its slab is free once nobody holds it.
    if (b.failed && b.refs === 0) this.freeSlabs.push(b.slab);
  }

  /** A free slab: from the free list, a new one within the budget, or the least recently used unleased block's. */
  private takeSlab(): Buffer | undefined {
    const free = this.freeSlabs.pop();
    if (free) return free;
    if (this.slabCount < this.maxSlabs) {
      this.slabCount++;
      return Buffer.allocUnsafeSlow(BLOCK_SIZE);
    }
    for (const [key, b] of this.blocks) {
      if (b.refs === 0 && b.settled) {
        this.blocks.delete(key);
        return b.slab;
      }
    }
    return undefined;
  }

  private async readInto(sha256: string, position: number, target: Buffer): Promise<void> {
    const fh = await this.handle(sha256);
    let off = 0;
    while (off < target.length) {
      const { bytesRead } = await fh.read(target, off, target.length - off, position + off);
      if (bytesRead === 0) throw new Error(`artifact ${sha256} is shorter than its recorded size`);
      off += bytesRead;
    }
  }

  /** Close every cached handle and drop the block cache. */
  async close(): Promise<void> {
    clearInterval(this.sweeper);
    this.blocks.clear();
    const all = [...this.handles.values()];
    this.handles.clear();
    for (const h of all) await h.then((fh) => fh.close()).catch(() => undefined);
  }
}
