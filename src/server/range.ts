/**
 * HTTP range requests (RFC 7233) as pure data: which bytes of a representation to send and with
 * which status. RAUC's streaming and adaptive installs issue thousands of these per update, so the
 * plan is computed without touching the database or the disk.
 */

export interface ByteRange {
  /** First byte, inclusive. */
  start: number;
  /** Last byte, inclusive. */
  end: number;
}

export type RangePlan =
  | { status: 200 }
  | { status: 206; ranges: ByteRange[] }
  | { status: 416 };

/** More ranges than this in one request is treated as abuse and answered with the whole entity. */
export const MAX_RANGES = 256;

/** Validators of the stored representation, for If-Range. */
export interface Validators {
  etag: string;
  lastModified: Date;
}

function ifRangeMatches(ifRange: string, v: Validators): boolean {
  const value = ifRange.trim();
  if (value.startsWith('"') || value.startsWith('W/')) {
    // If-Range needs a strong comparison: a weak tag never matches.
    return !value.startsWith('W/') && value === v.etag;
  }
  const when = Date.parse(value);
  // HTTP dates have one-second resolution; the stored date must match exactly.
  return !Number.isNaN(when) && Math.floor(when / 1000) === Math.floor(v.lastModified.getTime() / 1000);
}

/**
 * Decide the response to a GET with optional `Range` and `If-Range` headers for an entity of `size`
 * bytes. Unknown range units and syntactically invalid headers are ignored (200), as the RFC says;
 * a valid header none of whose ranges overlap the entity is 416.
 */
export function planRange(size: number, rangeHeader: string | undefined, ifRange: string | undefined, v: Validators): RangePlan {
  if (rangeHeader === undefined) return { status: 200 };
  if (ifRange !== undefined && !ifRangeMatches(ifRange, v)) return { status: 200 };
  const m = /^\s*bytes\s*=\s*(.+)$/i.exec(rangeHeader);
  if (!m || m[1] === undefined) return { status: 200 };
  const specs = m[1].split(',');
  if (specs.length > MAX_RANGES) return { status: 200 };
  const ranges: ByteRange[] = [];
  for (const raw of specs) {
    const spec = raw.trim();
    if (spec === '') continue;
    const r = /^(\d*)\s*-\s*(\d*)$/.exec(spec);
    if (!r) return { status: 200 };
    const [, a = '', b = ''] = r;
    if (a === '' && b === '') return { status: 200 };
    if (a === '') {
      const suffix = Number(b);
      if (suffix === 0) continue;
      ranges.push({ start: Math.max(0, size - suffix), end: size - 1 });
      continue;
    }
    const start = Number(a);
    const end = b === '' ? size - 1 : Number(b);
    if (b !== '' && end < start) return { status: 200 };
    if (start >= size) continue;
    ranges.push({ start, end: Math.min(end, size - 1) });
  }
  if (ranges.length === 0 || size === 0) return { status: 416 };
  // As nginx does: ranges that add up to more than the entity are answered with the entity, once.
  // Otherwise `bytes=0-,0-,…` would send it once per range (RFC 7233 §6.1).
  if (ranges.reduce((n, r) => n + r.end - r.start + 1, 0) > size) return { status: 200 };
  return { status: 206, ranges: coalesce(ranges) };
}

/**
 * Merge overlapping and adjacent ranges (RFC 7233 §4.1 allows it), so no byte is sent twice. Each
 * merged range takes the place of its earliest member; disjoint ranges keep the requested order.
 */
function coalesce(ranges: readonly ByteRange[]): ByteRange[] {
  const merged: (ByteRange & { first: number })[] = [];
  const byStart = ranges.map((r, first) => ({ ...r, first })).sort((a, b) => a.start - b.start);
  for (const r of byStart) {
    const last = merged.at(-1);
    if (last && r.start <= last.end + 1) {
      last.end = Math.max(last.end, r.end);
      last.first = Math.min(last.first, r.first);
    } else {
      merged.push(r);
    }
  }
  return merged.sort((a, b) => a.first - b.first).map(({ start, end }) => ({ start, end }));
}

/** `Content-Range` value for one range of an entity of `size` bytes. */
export function contentRange(r: ByteRange, size: number): string {
  return `bytes ${r.start}-${r.end}/${size}`;
}

/** The multipart/byteranges framing around each part, so the body can be streamed part by part. */
export function multipartPlan(
  ranges: readonly ByteRange[],
  size: number,
  contentType: string,
  boundary: string,
): { parts: { head: Buffer; range: ByteRange }[]; tail: Buffer; length: number } {
  const parts = ranges.map((range, i) => ({
    head: Buffer.from(`${i === 0 ? '' : '\r\n'}--${boundary}\r\nContent-Type: ${contentType}\r\nContent-Range: ${contentRange(range, size)}\r\n\r\n`),
    range,
  }));
  const tail = Buffer.from(`\r\n--${boundary}--\r\n`);
  const length = parts.reduce((n, p) => n + p.head.length + (p.range.end - p.range.start + 1), 0) + tail.length;
  return { parts, tail, length };
}
