import { promises as fs } from 'node:fs';
import { UserError, isErrno } from '../errors.js';
import { GPT_ATTRIBUTES, readGptFrom, writeGpt, type GptReadResult, type GptTable } from './gpt.js';

/**
 * Disk engine, partition level: GPT encoding/decoding and the Discoverable Partitions Specification
 * type table.
 *
 * Public API:
 * - `DPS_TYPES`, `DPS_ARCHES`, `dpsTypeFor(role, arch?)` → type UUID, `dpsRoleOf(uuid)` → `{ role, arch? }`.
 * - `planGpt(options)` → `GptTable` (pure placement with 1 MiB alignment), `encodeGpt(table)` → bytes of
 *   both ends, `writeGpt(handle, table)`.
 * - `readGpt(path, { strict })` → `{ table, source, problems }`: checks both copies, recovers from the
 *   backup when the primary is damaged (strict mode turns any problem into LAMA_E_GPT_CORRUPT /
 *   LAMA_E_IMAGE_TRUNCATED); `repairGpt(path)` rewrites both copies from the intact one.
 * - `partitionExtent(table, partition)` → `{ offset, size }` in bytes; `GPT_ATTRIBUTES` names bits.
 */

export * from './dps.js';
export { readAt, readInto } from './io.js';
export {
  DEFAULT_ENTRY_COUNT,
  ENTRY_SIZE,
  GPT_ATTRIBUTES,
  decodeGuid,
  encodeGpt,
  encodeGuid,
  partitionExtent,
  planGpt,
  readGptFrom,
  writeGpt,
} from './gpt.js';
export type {
  EncodedGpt,
  GptPartition,
  GptPlanOptions,
  GptReadResult,
  GptTable,
  PartitionRequest,
} from './gpt.js';

async function openImage(file: string, flags: 'r' | 'r+'): Promise<fs.FileHandle> {
  try {
    return await fs.open(file, flags);
  } catch (err) {
    if (isErrno(err, 'ENOENT')) throw new UserError('LAMA_E_NOT_FOUND', `image ${file} does not exist`);
    throw err;
  }
}

/** Read the GPT of `file` (see readGptFrom). */
export async function readGpt(file: string, options: { strict?: boolean } = {}): Promise<GptReadResult> {
  const h = await openImage(file, 'r');
  try {
    return await readGptFrom(h, { ...options, where: file });
  } finally {
    await h.close();
  }
}

/** Names of the attribute bits set in `attributes`, unnamed ones as `bit:N`. */
export function attributeNames(attributes: bigint): string[] {
  const names: string[] = [];
  const known = new Map(Object.entries(GPT_ATTRIBUTES).map(([name, bit]) => [bit, name]));
  for (let bit = 0; bit < 64; bit++) {
    if ((attributes >> BigInt(bit)) & 1n) names.push(known.get(bit) ?? `bit:${bit}`);
  }
  return names;
}

/**
 * Rewrite both GPT copies from whichever one is intact (normally: restore a damaged primary from the
 * backup). Returns what was wrong before. Refuses when neither copy is valid.
 */
export async function repairGpt(file: string): Promise<{ before: string[]; table: GptTable }> {
  const h = await openImage(file, 'r+');
  try {
    const r = await readGptFrom(h, { strict: false, where: file });
    await writeGpt(h, r.table);
    await h.sync();
    return { before: r.problems, table: r.table };
  } finally {
    await h.close();
  }
}
