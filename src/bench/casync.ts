import { createHash } from 'node:crypto';
import { createReadStream, promises as fs } from 'node:fs';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import path from 'node:path';
import { readInto } from '../disk/io.js';
import { parseCasyncIndex } from '../rauc/casync.js';
import { run } from '../util/proc.js';

/**
 * The peer figure for OTA benchmarks: the bytes RAUC's casync mode makes a device download for a new
 * image when the device holds the old one as its seed, measured with the real casync over HTTP.
 * Also the block-level floor against which both are judged.
 *
 * Public API:
 * - `casyncFetch({ seed, image, workDir, chunkSize? })` → bytes, chunks and index size a device fetches;
 * - `changedBlocks(oldFile, newFile, blockSize?)` → how many blocks (and bytes) of the new image differ;
 * - `casyncMakeArgs(...)`, `casyncExtractArgs(...)`: the two command lines, as RAUC 1.8 runs them.
 */

export interface CasyncFetchOptions {
  /** The image the device already has (its other slot): casync's seed. */
  seed: string;
  /** The new image the device installs. */
  image: string;
  /** Directory for a temporary index, chunk store and extracted image; removed again afterwards. */
  workDir: string;
  /**
   * Average chunk size in bytes, as `rauc convert --casync-args=--chunk-size=N` would pass it (casync
   * takes N/4 and 4N as minimum and maximum). Default: none, i.e. casync's own 64 KiB average.
   */
  chunkSize?: number;
}

export interface CasyncFetchResult {
  /** Response body bytes the device fetched: the index plus every chunk casync could not take from the seed. */
  fetchedBytes: number;
  /** Chunks listed in the index. */
  chunks: number;
  /** Chunk requests the store answered. */
  fetchedChunks: number;
  /** Size of the index (`.caibx`), part of `fetchedBytes`. */
  indexBytes: number;
  /** Size of the new image: what a full download would move uncompressed. */
  imageBytes: number;
}

/**
 * `casync make` as `rauc convert` (RAUC 1.8, bundle.c casync_make_blob) runs it for an image that is
 * not an archive: `casync make <image>.caibx <image> --store <bundle>.castr`, followed by whatever
 * `--casync-args` holds (nothing by default). Pure.
 */
export function casyncMakeArgs(index: string, image: string, store: string, chunkSize?: number): string[] {
  const args = ['make', index, image, '--store', store];
  if (chunkSize !== undefined) args.push(`--chunk-size=${chunkSize}`);
  return args;
}

/**
 * `casync extract` as RAUC 1.8's installer (update_handler.c casync_extract) runs it for a blob
 * image with the inactive slot as seed: `--seed-output=no` because the target is a slot device whose
 * stale content must not count as a seed. The index is a URL too, since a streaming device also pays
 * for the index it reads. Pure.
 */
export function casyncExtractArgs(seed: string, storeUrl: string, indexUrl: string, out: string): string[] {
  return ['extract', '--seed', seed, '--store', storeUrl, '--seed-output=no', indexUrl, out];
}

/** A chunk as casync-http asks for it: `<store>/<first four hex digits>/<id>.cacnk`. */
const CHUNK_PATH = /^\/store\/([0-9a-f]{4})\/(\1[0-9a-f]{60})\.cacnk$/;
const INDEX_PATH = '/image.caibx';

interface Counter {
  bytes: number;
  indexBytes: number;
  chunks: number;
}

/** Serve the index and chunk store read-only on 127.0.0.1, counting every response body byte. */
async function serveStore(
  index: string,
  store: string,
  counter: Counter,
): Promise<{ url: string; close: () => Promise<void> }> {
  const server = http.createServer((req, res) => {
    const send = (status: number, body?: Buffer): void => {
      res.writeHead(status, { 'content-length': body?.length ?? 0 });
      res.end(body);
    };
    if (req.method !== 'GET') return send(405);
    const url = req.url ?? '';
    const chunk = CHUNK_PATH.exec(url);
    const file =
      url === INDEX_PATH
        ? index
        : chunk
          ? path.join(store, chunk[1] as string, `${chunk[2] as string}.cacnk`)
          : undefined;
    if (!file) return send(404);
    fs.readFile(file).then(
      (body) => {
        counter.bytes += body.length;
        if (chunk) counter.chunks++;
        else counter.indexBytes += body.length;
        send(200, body);
      },
      () => send(404),
    );
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', resolve);
  });
  const { port } = server.address() as AddressInfo;
  return {
    url: `http://127.0.0.1:${port}`,
    close: () =>
      new Promise<void>((resolve) => {
        // casync-http keeps its connection alive; drop it so close() need not wait for a timeout.
        server.closeAllConnections();
        server.close(() => resolve());
      }),
  };
}

async function sha256File(file: string): Promise<string> {
  const h = createHash('sha256');
  for await (const c of createReadStream(file)) h.update(c as Buffer);
  return h.digest('hex');
}

/**
 * What RAUC's casync mode makes a device download for `image` when it holds `seed`: the image is
 * chunked as `rauc convert` does it (`casync make` with RAUC's arguments, since `rauc convert`
 * itself wants a signed bundle and only adds the same call), the store is served over HTTP from
 * this process, and the real `casync extract` rebuilds the image from the seed and the store. The
 * rebuilt image must match `image` byte for byte, or this throws.
 */
export async function casyncFetch(o: CasyncFetchOptions): Promise<CasyncFetchResult> {
  if (o.chunkSize !== undefined && (!Number.isInteger(o.chunkSize) || o.chunkSize < 64)) {
    throw new RangeError(`casync chunk size ${o.chunkSize} is not an integer of at least 64 bytes`);
  }
  const dir = await fs.mkdtemp(path.join(o.workDir, 'casync-'));
  try {
    const index = path.join(dir, 'image.caibx');
    const store = path.join(dir, 'image.castr');
    await run('casync', casyncMakeArgs(index, o.image, store, o.chunkSize));
    const indexBuf = await fs.readFile(index);
    const { chunks, size: imageBytes } = parseCasyncIndex(indexBuf, 'caibx', index);
    const counter: Counter = { bytes: 0, indexBytes: 0, chunks: 0 };
    const server = await serveStore(index, store, counter);
    const out = path.join(dir, 'extracted.img');
    try {
      // A proxy from the environment would sit between casync and the counting server.
      const env = { ...process.env, no_proxy: '127.0.0.1', NO_PROXY: '127.0.0.1' };
      await run(
        'casync',
        casyncExtractArgs(o.seed, `${server.url}/store/`, `${server.url}${INDEX_PATH}`, out),
        { env },
      );
    } finally {
      await server.close();
    }
    const [want, got] = await Promise.all([sha256File(o.image), sha256File(out)]);
    if (want !== got) throw new Error(`casync extract rebuilt ${o.image} with sha256 ${got}, not ${want}`);
    if (counter.indexBytes !== indexBuf.length) {
      throw new Error(`casync fetched ${counter.indexBytes} bytes of a ${indexBuf.length}-byte index`);
    }
    return {
      fetchedBytes: counter.bytes,
      chunks,
      fetchedChunks: counter.chunks,
      indexBytes: indexBuf.length,
      imageBytes,
    };
  } finally {
    await fs.rm(dir, { recursive: true, force: true });
  }
}

export interface ChangedBlocks {
  /** Blocks in the new image (the last one may be short). */
  blocks: number;
  /** Blocks of the new image whose bytes differ from the old image's at the same offset, or lie past its end. */
  changed: number;
  /** Bytes of those blocks. */
  bytes: number;
}

/**
 * The blocks of `newFile` that differ from `oldFile` at the same offset: what a device holding the
 * old image must receive at the least, block by block. Reads both files in step, a window at a time.
 */
export async function changedBlocks(
  oldFile: string,
  newFile: string,
  blockSize = 4096,
): Promise<ChangedBlocks> {
  if (!Number.isInteger(blockSize) || blockSize < 1) {
    throw new RangeError(`block size ${blockSize} is not a positive integer`);
  }
  const window = blockSize * Math.max(1, Math.floor((1 << 20) / blockSize));
  const a = Buffer.alloc(window);
  const b = Buffer.alloc(window);
  const oldH = await fs.open(oldFile, 'r');
  try {
    const newH = await fs.open(newFile, 'r');
    try {
      const r: ChangedBlocks = { blocks: 0, changed: 0, bytes: 0 };
      for (let pos = 0; ; pos += window) {
        const nb = await readInto(newH, b, 0, b.length, pos);
        if (nb === 0) return r;
        const na = await readInto(oldH, a, 0, a.length, pos);
        for (let off = 0; off < nb; off += blockSize) {
          const len = Math.min(blockSize, nb - off);
          r.blocks++;
          if (off + len > na || a.compare(b, off, off + len, off, off + len) !== 0) {
            r.changed++;
            r.bytes += len;
          }
        }
        if (nb < window) return r;
      }
    } finally {
      await newH.close();
    }
  } finally {
    await oldH.close();
  }
}
