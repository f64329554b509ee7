import { randomBytes } from 'node:crypto';
import { constants, promises as fs } from 'node:fs';
import type { FileHandle } from 'node:fs/promises';
import path from 'node:path';
import { UserError, isErrno } from '../errors.js';
import { onCleanup } from './cleanup.js';

/** Refuse to replace an existing output unless the user said --force. */
export async function assertWritable(file: string, force: boolean): Promise<void> {
  if (force) return;
  try {
    await fs.access(file, constants.F_OK);
  } catch {
    return;
  }
  throw new UserError('LAMA_E_EXISTS', `${file} already exists (use --force to replace it)`);
}

/**
 * An output file written under a temporary name in the same directory and renamed into place only
 * after fsync, so a crash, an error or Ctrl-C never leaves a partial output under the final name.
 */
export class AtomicFile {
  readonly final: string;
  readonly temp: string;
  private handle: FileHandle | undefined;
  private unregister: () => void;
  private done = false;

  private constructor(final: string, temp: string, handle: FileHandle) {
    this.final = final;
    this.temp = temp;
    this.handle = handle;
    this.unregister = onCleanup(() => this.abort());
  }

  /** Create the temp file (mode 0600 for secrets, 0644 otherwise). */
  static async open(final: string, options: { force?: boolean; mode?: number } = {}): Promise<AtomicFile> {
    await assertWritable(final, options.force ?? false);
    const dir = path.dirname(path.resolve(final));
    const temp = path.join(dir, `.${path.basename(final)}.${randomBytes(6).toString('hex')}.tmp`);
    const mode = options.mode ?? 0o644;
    let handle: FileHandle;
    try {
      handle = await fs.open(temp, 'wx+', mode);
    } catch (err) {
      if (isErrno(err, 'ENOENT')) {
        throw new UserError('LAMA_E_NO_DIR', `cannot write ${final}: directory ${dir} does not exist`);
      }
      throw err;
    }
    // open() honours the umask; an explicit chmod makes 0600 hold regardless.
    await handle.chmod(mode);
    return new AtomicFile(path.resolve(final), temp, handle);
  }

  /** The open handle for positional or streaming writes. */
  get fd(): FileHandle {
    if (!this.handle) throw new Error('AtomicFile already closed');
    return this.handle;
  }

  /** fsync, close and rename into place; fsync the directory so the rename itself is durable. */
  async commit(): Promise<void> {
    const h = this.fd;
    await h.sync();
    await h.close();
    this.handle = undefined;
    await fs.rename(this.temp, this.final);
    this.done = true;
    this.unregister();
    const dir = await fs.open(path.dirname(this.final), 'r');
    try {
      await dir.sync();
    } finally {
      await dir.close();
    }
  }

  /** Close and delete the temp file; safe to call more than once. */
  async abort(): Promise<void> {
    if (this.done) return;
    this.done = true;
    this.unregister();
    if (this.handle) {
      await this.handle.close().catch(() => undefined);
      this.handle = undefined;
    }
    await fs.rm(this.temp, { force: true });
  }
}

/** Write a whole buffer or string atomically (temp + fsync + rename). */
export async function writeFileAtomic(
  file: string,
  data: string | Uint8Array,
  options: { force?: boolean; mode?: number } = {},
): Promise<void> {
  const out = await AtomicFile.open(file, options);
  try {
    await out.fd.writeFile(data);
    await out.commit();
  } catch (err) {
    await out.abort();
    throw err;
  }
}

/** Run `fn` with an AtomicFile, committing on success and removing the temp file on any failure. */
export async function withAtomicFile<T>(
  file: string,
  options: { force?: boolean; mode?: number },
  fn: (out: AtomicFile) => Promise<T>,
): Promise<T> {
  const out = await AtomicFile.open(file, options);
  try {
    const result = await fn(out);
    await out.commit();
    return result;
  } catch (err) {
    await out.abort();
    throw err;
  }
}

/** A temporary directory removed at cleanup (or by calling the returned `remove`). */
export async function makeTempDir(prefix = 'lamadist-'): Promise<{ dir: string; remove: () => Promise<void> }> {
  const os = await import('node:os');
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), prefix));
  const remove = async (): Promise<void> => {
    unregister();
    await fs.rm(dir, { recursive: true, force: true });
  };
  const unregister = onCleanup(remove);
  return { dir, remove };
}

/** Read a file the user named, turning "not found" into a one-line UserError. */
export async function readUserFile(file: string, what = 'file'): Promise<Buffer> {
  try {
    return await fs.readFile(file);
  } catch (err) {
    if (isErrno(err, 'ENOENT')) throw new UserError('LAMA_E_NOT_FOUND', `${what} ${file} does not exist`);
    if (isErrno(err, 'EISDIR')) throw new UserError('LAMA_E_NOT_FOUND', `${what} ${file} is a directory`);
    throw err;
  }
}
