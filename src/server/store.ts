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

/**
 * The content-addressed artifact directory: `artifacts/<sha256[0:2]>/<sha256>` for committed
 * bundles and `tmp/` (same file system, so rename is atomic) for uploads in flight. A crash leaves
 * at most files in tmp/, which `open` removes, or a committed file without a database row, which is
 * never served and is reused by the next upload of the same content.
 */
export class ArtifactStore {
  readonly root: string;
  private handles = new Map<string, Promise<FileHandle>>();

  private constructor(root: string) {
    this.root = root;
  }

  /** Create the directories and remove leftovers of uploads interrupted by a crash. */
  static async open(root: string): Promise<ArtifactStore> {
    const abs = path.resolve(root);
    await fs.mkdir(path.join(abs, 'artifacts'), { recursive: true });
    await fs.rm(path.join(abs, 'tmp'), { recursive: true, force: true });
    await fs.mkdir(path.join(abs, 'tmp'), { recursive: true });
    return new ArtifactStore(abs);
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

  /** Close every cached handle. */
  async close(): Promise<void> {
    const all = [...this.handles.values()];
    this.handles.clear();
    for (const h of all) await h.then((fh) => fh.close()).catch(() => undefined);
  }
}
