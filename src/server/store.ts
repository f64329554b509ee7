import { createHash, randomBytes } from 'node:crypto';
import { promises as fs } from 'node:fs';
import type { FileHandle } from 'node:fs/promises';
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

interface CachedBlock {
  data: Promise<Buffer>;
  len: number;
}

/** Block size of the range-read cache: 32 RAUC-sized (128 KiB) reads per block. */
export const BLOCK_SIZE = 4 * 1024 * 1024;
/** Default budget of the range-read cache. */
export const DEFAULT_CACHE_BYTES = 64 * 1024 * 1024;

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
  private cachedBytes = 0;
  private readonly cacheBytes: number;

  private constructor(root: string, cacheBytes: number) {
    this.root = root;
    this.cacheBytes = cacheBytes;
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
   * Bytes `start`..`end` (inclusive) of a committed artifact of `size` bytes. Reads go through a
   * bounded LRU of BLOCK_SIZE-aligned blocks: RAUC streams a bundle in small ranges, and every device
   * of a rollout wave reads the same ones, so one positional read serves many requests and the
   * thread-pool round trip of a file read is paid once per block, not once per request. A range
   * inside one block is a view of the cached block (no copy).
   */
  async read(sha256: string, size: number, start: number, end: number): Promise<Buffer> {
    if (this.cacheBytes < BLOCK_SIZE) return this.readAt(sha256, start, end - start + 1);
    const first = Math.floor(start / BLOCK_SIZE);
    const last = Math.floor(end / BLOCK_SIZE);
    const pieces: Buffer[] = [];
    for (let i = first; i <= last; i++) {
      const block = await this.block(sha256, size, i);
      const base = i * BLOCK_SIZE;
      pieces.push(block.subarray(Math.max(start, base) - base, Math.min(end + 1, base + block.length) - base));
    }
    return pieces.length === 1 ? (pieces[0] as Buffer) : Buffer.concat(pieces);
  }

  private block(sha256: string, size: number, index: number): Promise<Buffer> {
    const key = `${sha256}:${index}`;
    const hit = this.blocks.get(key);
    if (hit) {
      this.blocks.delete(key);
      this.blocks.set(key, hit);
      return hit.data;
    }
    const len = Math.min(BLOCK_SIZE, size - index * BLOCK_SIZE);
    const entry = { data: this.readAt(sha256, index * BLOCK_SIZE, len), len };
    // A failed read is not cached: the next request tries the file again.
    entry.data.catch(() => this.drop(key, entry));
    this.blocks.set(key, entry);
    this.cachedBytes += len;
    for (const [k, old] of this.blocks) {
      if (this.cachedBytes <= this.cacheBytes || k === key) break;
      this.drop(k, old);
    }
    return entry.data;
  }

  private drop(key: string, entry: CachedBlock): void {
    if (this.blocks.get(key) !== entry) return;
    this.blocks.delete(key);
    this.cachedBytes -= entry.len;
  }

  private async readAt(sha256: string, position: number, length: number): Promise<Buffer> {
    const fh = await this.handle(sha256);
    const buf = Buffer.allocUnsafe(length);
    let off = 0;
    while (off < length) {
      const { bytesRead } = await fh.read(buf, off, length - off, position + off);
      if (bytesRead === 0) throw new Error(`artifact ${sha256} is shorter than its recorded size`);
      off += bytesRead;
    }
    return buf;
  }

  /** Close every cached handle and drop the block cache. */
  async close(): Promise<void> {
    this.blocks.clear();
    this.cachedBytes = 0;
    const all = [...this.handles.values()];
    this.handles.clear();
    for (const h of all) await h.then((fh) => fh.close()).catch(() => undefined);
  }
}
