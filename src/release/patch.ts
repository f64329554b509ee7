/**
 * A host's UKI as a patch of its release's template UKI. The two differ in the fixed command-line
 * area (src/uki CMDLINE_AREA), a few PE header fields (.cmdline's VirtualSize, the checksum, the
 * certificate-table directory entry) and the appended Authenticode signature, so the patch is a
 * short list of writes. The device applies it with dd (meta-lamadist's bundle hook); the format is
 * text plus a data file so that a POSIX shell can read it.
 *
 * Map file (`uki-<slot>.map`), one record a line, fields separated by one space:
 *   lamadist-uki-patch 1
 *   template <sha256 hex> <bytes>
 *   result <sha256 hex> <bytes>
 *   write <file offset> <length>      (one or more; their data follows each other in `uki-<slot>.bin`)
 */
import { createHash } from 'node:crypto';
import { UserError } from '../errors.js';

/** One write of a patch: `data` goes to `offset` of the file being rebuilt. */
export interface PatchWrite {
  offset: number;
  data: Buffer;
}

/** A template → result patch, with both ends identified by SHA-256 and size. */
export interface UkiPatch {
  template: { sha256: string; size: number };
  result: { sha256: string; size: number };
  writes: PatchWrite[];
}

const MAGIC = 'lamadist-uki-patch 1';
/** Runs of equal bytes shorter than this between two differences are written anyway: fewer dd calls. */
const MERGE_GAP = 64;
/** A patch larger than this is not a host patch but a different UKI (bounds what a device reads). */
export const MAX_PATCH_BYTES = 1 << 20;

const sha256 = (b: Buffer): string => createHash('sha256').update(b).digest('hex');

/** The writes that turn `template` into `result` (which must not be shorter). Pure. */
export function diffUki(template: Buffer, result: Buffer): UkiPatch {
  if (result.length < template.length) throw new Error(`patch result (${result.length} bytes) is shorter than its template (${template.length})`);
  const writes: PatchWrite[] = [];
  let i = 0;
  while (i < template.length) {
    if (template[i] === result[i]) {
      i++;
      continue;
    }
    const start = i;
    let end = i + 1;
    // Extend while the next difference is within MERGE_GAP.
    for (let j = end; j < template.length && j < end + MERGE_GAP; j++) if (template[j] !== result[j]) end = j + 1;
    writes.push({ offset: start, data: Buffer.from(result.subarray(start, end)) });
    i = end;
  }
  if (result.length > template.length) writes.push({ offset: template.length, data: Buffer.from(result.subarray(template.length)) });
  const patch = { template: { sha256: sha256(template), size: template.length }, result: { sha256: sha256(result), size: result.length }, writes };
  const bytes = writes.reduce((n, w) => n + w.data.length, 0);
  if (bytes > MAX_PATCH_BYTES) throw new UserError('LAMA_E_RELEASE_PATCH', `a host's UKI differs from the release's in ${bytes} bytes; only the command line and signature may differ`);
  return patch;
}

/** Apply a patch to its template, checking both ends' hashes. Pure. */
export function applyUkiPatch(template: Buffer, patch: UkiPatch, where?: string): Buffer {
  if (template.length !== patch.template.size || sha256(template) !== patch.template.sha256) {
    throw new UserError('LAMA_E_RELEASE_PATCH', "the template UKI is not the one this host's patch was made from", where ? { where } : undefined);
  }
  const out = Buffer.alloc(patch.result.size);
  template.copy(out);
  for (const w of patch.writes) w.data.copy(out, w.offset);
  if (sha256(out) !== patch.result.sha256) throw new UserError('LAMA_E_RELEASE_PATCH', "the rebuilt UKI does not have the hash this host's patch promises", where ? { where } : undefined);
  return out;
}

/** The map text and data file of a patch. Pure. */
export function renderPatch(patch: UkiPatch): { map: string; data: Buffer } {
  const lines = [MAGIC, `template ${patch.template.sha256} ${patch.template.size}`, `result ${patch.result.sha256} ${patch.result.size}`, ...patch.writes.map((w) => `write ${w.offset} ${w.data.length}`)];
  return { map: `${lines.join('\n')}\n`, data: Buffer.concat(patch.writes.map((w) => w.data)) };
}

/**
 * Read a patch from its map text and data file (both come from a bundle, so every field is
 * checked: numbers, order, bounds, and that the data file holds exactly what the writes take).
 * Errors name the file and line.
 */
export function parsePatch(map: string, data: Buffer, where = 'patch map'): UkiPatch {
  const lines = map.split('\n');
  if (lines.at(-1) === '') lines.pop();
  const at = (n: number, message: string): never => {
    throw new UserError('LAMA_E_RELEASE_PATCH', message, { where: `${where}:${n + 1}:1` });
  };
  if (lines[0] !== MAGIC) at(0, `not a LamaDist UKI patch (expected '${MAGIC}')`);
  const end = (n: number, kind: string): { sha256: string; size: number } => {
    const m = new RegExp(`^${kind} ([0-9a-f]{64}) (0|[1-9][0-9]{0,9})$`).exec(lines[n] ?? '');
    if (!m) return at(n, `expected '${kind} <sha256> <bytes>'`);
    return { sha256: m[1] as string, size: Number(m[2]) };
  };
  const template = end(1, 'template');
  const result = end(2, 'result');
  if (result.size < template.size) at(2, 'the result is shorter than the template');
  const writes: PatchWrite[] = [];
  let used = 0;
  let last = -1;
  for (let n = 3; n < lines.length; n++) {
    const m = /^write (0|[1-9][0-9]{0,9}) ([1-9][0-9]{0,9})$/.exec(lines[n] ?? '');
    if (!m) return at(n, "expected 'write <offset> <length>'");
    const offset = Number(m[1]);
    const length = Number(m[2]);
    if (offset <= last) at(n, 'writes must be in increasing offset order without overlap');
    if (offset + length > result.size) at(n, `write ends at ${offset + length}, past the ${result.size}-byte result`);
    if (used + length > data.length) at(n, `the data file holds ${data.length} bytes; the writes need more`);
    writes.push({ offset, data: data.subarray(used, used + length) });
    used += length;
    last = offset + length - 1;
  }
  if (used !== data.length) throw new UserError('LAMA_E_RELEASE_PATCH', `the data file holds ${data.length} bytes, the writes take ${used}`, { where });
  if (used > MAX_PATCH_BYTES) throw new UserError('LAMA_E_RELEASE_PATCH', `patch of ${used} bytes is larger than a host patch can be (${MAX_PATCH_BYTES})`, { where });
  // Bytes past the template's end exist only where a write puts them.
  const covered = writes.filter((w) => w.offset + w.data.length > template.size).reduce((n, w) => n + w.offset + w.data.length - Math.max(w.offset, template.size), 0);
  if (covered !== result.size - template.size) throw new UserError('LAMA_E_RELEASE_PATCH', 'the writes do not fill the bytes past the template', { where });
  return { template, result, writes };
}
