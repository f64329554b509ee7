/**
 * Validation of the LUKS2 JSON metadata against the on-disk format, with the rules cryptsetup applies
 * when it loads a header (so what it refuses is refused here too): required keys and their JSON
 * types, object ids and offsets/sizes as decimal strings, references between keyslots, segments,
 * digests and tokens, and the keyslot areas inside the binary keyslots area.
 */

/** A JSON number written with a fraction or exponent: json-c, cryptsetup's parser, types it double, not int. */
class JsonDouble {
  constructor(readonly value: number) {}
}

const DOUBLE_MARK = '\u0000luks2-double:';

/**
 * Parse JSON text keeping integers (JS numbers) apart from doubles (`JsonDouble`), since LUKS2 fields
 * such as `iterations` must be JSON integers and `1000.0` is not one for cryptsetup. Other liberties
 * of json-c's non-strict parser (single quotes, NaN literals, trailing commas) are refused here, and
 * cryptsetup never writes them.
 */
export function parseLuks2JsonText(text: string): unknown {
  let out = '';
  let i = 0;
  while (i < text.length) {
    const ch = text[i] as string;
    if (ch === '"') {
      let j = i + 1;
      while (j < text.length && text[j] !== '"') j += text[j] === '\\' ? 2 : 1;
      out += text.slice(i, j + 1);
      i = j + 1;
    } else if (ch === '-' || (ch >= '0' && ch <= '9')) {
      const m = /^-?\d+(\.\d+)?([eE][+-]?\d+)?/.exec(text.slice(i, i + 400));
      const tok = m?.[0] ?? ch;
      // json-c reads integers with leading zeros ("000" is 0), which JSON.parse refuses
      out +=
        m?.[1] !== undefined || m?.[2] !== undefined
          ? JSON.stringify(DOUBLE_MARK + tok)
          : tok.replace(/^(-?)0+(?=\d)/, '$1');
      i += tok.length;
    } else {
      out += ch;
      i++;
    }
  }
  return JSON.parse(out, (_k, v: unknown) =>
    typeof v === 'string' && v.startsWith(DOUBLE_MARK)
      ? new JsonDouble(Number(v.slice(DOUBLE_MARK.length)))
      : v,
  );
}

type Obj = Record<string, unknown>;

function isObj(v: unknown): v is Obj {
  return typeof v === 'object' && v !== null && Object.getPrototypeOf(v) === Object.prototype;
}

/** Thrown inside validation with the JSON path of the offending value. */
class Invalid extends Error {
  constructor(
    readonly path: string,
    message: string,
  ) {
    super(message);
  }
}

const UINT64_MAX = (1n << 64n) - 1n;
/** Metadata (binary header + JSON area) sizes the format allows. */
const METADATA_SIZES = new Set([16384, 32768, 65536, 131072, 262144, 524288, 1048576, 2097152, 4194304]);
/** cryptsetup's upper bound for the binary keyslots area. */
const MAX_KEYSLOTS_SIZE = 128n * 1024n * 1024n;

function need(o: Obj, key: string, at: string): unknown {
  if (!Object.hasOwn(o, key)) throw new Invalid(`${at}.${key}`, 'missing');
  return o[key];
}

function str(o: Obj, key: string, at: string): string {
  const v = need(o, key, at);
  if (typeof v !== 'string') throw new Invalid(`${at}.${key}`, `must be a string, not ${describe(v)}`);
  return v;
}

function int(o: Obj, key: string, at: string): number {
  const v = need(o, key, at);
  if (typeof v !== 'number') throw new Invalid(`${at}.${key}`, `must be an integer, not ${describe(v)}`);
  return v;
}

function uint32(o: Obj, key: string, at: string): number {
  const v = int(o, key, at);
  if (v < 0 || v > 0xffffffff) throw new Invalid(`${at}.${key}`, `${v} is outside 0..4294967295`);
  return v;
}

function obj(o: Obj, key: string, at: string): Obj {
  const v = need(o, key, at);
  if (!isObj(v)) throw new Invalid(`${at}.${key}`, `must be an object, not ${describe(v)}`);
  return v;
}

function arr(o: Obj, key: string, at: string): unknown[] {
  const v = need(o, key, at);
  if (!Array.isArray(v)) throw new Invalid(`${at}.${key}`, `must be an array, not ${describe(v)}`);
  return v;
}

/** A size or offset: the format stores 64-bit values as decimal strings. */
function u64(o: Obj, key: string, at: string): bigint {
  const v = str(o, key, at);
  if (!/^[0-9]+$/.test(v) || BigInt(v) > UINT64_MAX)
    throw new Invalid(`${at}.${key}`, `${JSON.stringify(v)} is not a decimal 64-bit unsigned number`);
  return BigInt(v);
}

function strings(o: Obj, key: string, at: string, optional = false): string[] {
  if (optional && !Object.hasOwn(o, key)) return [];
  const a = arr(o, key, at);
  a.forEach((e, i) => {
    if (typeof e !== 'string')
      throw new Invalid(`${at}.${key}[${i}]`, `must be a string, not ${describe(e)}`);
  });
  return a as string[];
}

function describe(v: unknown): string {
  if (v instanceof JsonDouble) return `the non-integer number ${v.value}`;
  if (Array.isArray(v)) return 'an array';
  if (v === null) return 'null';
  return typeof v === 'object' ? 'an object' : `${typeof v} ${JSON.stringify(v)}`;
}

/**
 * Object ids (keyslots "0".."31", segments, digests, tokens) are decimal numbers; like cryptsetup,
 * which checks only that no character is something else, the empty id is let through.
 */
function ids(section: Obj, at: string): [string, Obj][] {
  return Object.entries(section).map(([id, v]) => {
    if (!/^[0-9]*$/.test(id)) throw new Invalid(`${at}.${id}`, 'id is not a decimal number');
    if (!isObj(v)) throw new Invalid(`${at}.${id}`, `must be an object, not ${describe(v)}`);
    return [id, v];
  });
}

function references(list: string[], target: Obj, at: string, what: string): void {
  list.forEach((id, i) => {
    if (!isObj(target[id])) throw new Invalid(`${at}[${i}]`, `names ${what} ${id}, which does not exist`);
  });
}

function validateKeyslot(id: string, k: Obj, at: string, digests: [string, Obj][]): void {
  str(k, 'type', at);
  uint32(k, 'key_size', at);
  if (k.type !== 'luks2') return; // other types (reencrypt, ...) have their own, unchecked, fields
  const owners = digests.filter(([, d]) => (d.keyslots as string[]).includes(id)).length;
  if (owners !== 1) throw new Invalid(at, `keyslot ${id} belongs to ${owners} digests instead of exactly 1`);
  const kdf = obj(k, 'kdf', at);
  const af = obj(k, 'af', at);
  const area = obj(k, 'area', at);
  // Keys a kdf does not take are dropped by cryptsetup's in-memory repair before it validates, so
  // they are ignored here too.
  const kdfType = str(kdf, 'type', `${at}.kdf`);
  if (kdfType === 'pbkdf2') {
    str(kdf, 'hash', `${at}.kdf`);
    int(kdf, 'iterations', `${at}.kdf`);
    str(kdf, 'salt', `${at}.kdf`);
  } else if (kdfType === 'argon2i' || kdfType === 'argon2id') {
    for (const f of ['time', 'memory', 'cpus']) int(kdf, f, `${at}.kdf`);
    str(kdf, 'salt', `${at}.kdf`);
  }
  if (need(af, 'type', `${at}.af`) !== 'luks1')
    throw new Invalid(`${at}.af.type`, 'only the luks1 anti-forensic splitter exists');
  str(af, 'hash', `${at}.af`);
  int(af, 'stripes', `${at}.af`);
  if (need(area, 'type', `${at}.area`) !== 'raw')
    throw new Invalid(`${at}.area.type`, `keyslot ${id} area type must be raw`);
  str(area, 'encryption', `${at}.area`);
  int(area, 'key_size', `${at}.area`);
}

function validateSegment(id: string, s: Obj, at: string, digests: [string, Obj][]): bigint {
  str(s, 'type', at);
  const offset = u64(s, 'offset', at);
  const size = str(s, 'size', at) === 'dynamic' ? 0n : u64(s, 'size', at);
  if (s.size !== 'dynamic' && size === 0n) throw new Invalid(`${at}.size`, 'is zero');
  if (offset % 512n !== 0n) throw new Invalid(`${at}.offset`, `${offset} is not a multiple of 512`);
  if (size % 512n !== 0n) throw new Invalid(`${at}.size`, `${size} is not a multiple of 512`);
  strings(s, 'flags', at, true);
  if (s.type !== 'crypt') return offset;
  str(s, 'encryption', at);
  const sectorSize = uint32(s, 'sector_size', at);
  if (sectorSize === 0 || sectorSize % 512 !== 0)
    throw new Invalid(`${at}.sector_size`, `${sectorSize} is not a multiple of 512`);
  u64(s, 'iv_tweak', at);
  if (Object.hasOwn(s, 'integrity')) {
    const integrity = obj(s, 'integrity', at);
    for (const f of ['type', 'journal_encryption', 'journal_integrity']) str(integrity, f, `${at}.integrity`);
  }
  if (size % BigInt(sectorSize) !== 0n)
    throw new Invalid(`${at}.size`, `${size} is not a multiple of the sector size`);
  if (!digests.some(([, d]) => Array.isArray(d.segments) && d.segments.includes(id)))
    throw new Invalid(at, `crypt segment ${id} has no digest`);
  return offset;
}

/**
 * Check the JSON metadata of one header copy whose binary header says the copy is `hdrSize` bytes.
 * Returns the JSON path and the problem, or undefined when cryptsetup would accept it.
 */
export function validateLuks2Json(
  json: unknown,
  hdrSize: number,
): { path: string; message: string } | undefined {
  try {
    if (!isObj(json)) throw new Invalid('$', 'the metadata is not a JSON object');
    const keyslots = obj(json, 'keyslots', '');
    const tokens = obj(json, 'tokens', '');
    const segments = obj(json, 'segments', '');
    const digests = obj(json, 'digests', '');
    const config = obj(json, 'config', '');

    for (const [id, t] of ids(tokens, 'tokens')) {
      str(t, 'type', `tokens.${id}`);
      references(strings(t, 'keyslots', `tokens.${id}`), keyslots, `tokens.${id}.keyslots`, 'keyslot');
    }
    const digestList = ids(digests, 'digests');
    for (const [id, d] of digestList) {
      str(d, 'type', `digests.${id}`);
      references(strings(d, 'keyslots', `digests.${id}`), keyslots, `digests.${id}.keyslots`, 'keyslot');
      references(strings(d, 'segments', `digests.${id}`), segments, `digests.${id}.segments`, 'segment');
    }
    const segmentList = ids(segments, 'segments');
    if (segmentList.length === 0) throw new Invalid('segments', 'there is no segment');
    const cryptOffsets = segmentList.flatMap(([id, s]) => {
      const offset = validateSegment(id, s, `segments.${id}`, digestList);
      return s.type === 'crypt' ? [offset] : [];
    });
    const keyslotList = ids(keyslots, 'keyslots');
    for (const [id, k] of keyslotList) validateKeyslot(id, k, `keyslots.${id}`, digestList);

    const jsonSize = u64(config, 'json_size', 'config');
    const keyslotsSize = u64(config, 'keyslots_size', 'config');
    const metadataSize = jsonSize + 4096n;
    if (!METADATA_SIZES.has(Number(metadataSize)))
      throw new Invalid('config.json_size', `${jsonSize} + 4096 is not a LUKS2 metadata size`);
    if (keyslotsSize % 4096n !== 0n || keyslotsSize > MAX_KEYSLOTS_SIZE)
      throw new Invalid('config.keyslots_size', `${keyslotsSize} is not a multiple of 4096 up to 128 MiB`);
    const firstData = cryptOffsets.reduce<bigint | undefined>(
      (m, o) => (m === undefined || o < m ? o : m),
      undefined,
    );
    if (firstData !== undefined && firstData !== 0n && firstData < 2n * metadataSize + keyslotsSize)
      throw new Invalid(
        'config.keyslots_size',
        `the keyslots area ends after the data segment at byte ${firstData}`,
      );
    strings(config, 'flags', 'config', true);
    if (Object.hasOwn(config, 'requirements'))
      strings(obj(config, 'requirements', 'config'), 'mandatory', 'config.requirements', true);

    const areaEnd = 2n * metadataSize + keyslotsSize;
    const areas = keyslotList.map(([id, k]) => {
      const area = obj(k, 'area', `keyslots.${id}`);
      const at = `keyslots.${id}.area`;
      // the area's type is checked for every keyslot, the rest of it only for luks2 ones
      str(area, 'type', at);
      const a = { at, offset: u64(area, 'offset', at), size: u64(area, 'size', at) };
      if (a.offset < 2n * metadataSize)
        throw new Invalid(`${at}.offset`, `${a.offset} is inside the metadata`);
      if (a.size === 0n) throw new Invalid(`${at}.size`, 'is zero');
      if (a.offset + a.size > areaEnd)
        throw new Invalid(at, `ends after the keyslots area (byte ${areaEnd})`);
      return a;
    });
    for (const a of areas) {
      const other = areas.find((b) => b !== a && a.offset >= b.offset && a.offset < b.offset + b.size);
      if (other) throw new Invalid(a.at, `overlaps ${other.at}`);
    }
    if (jsonSize !== BigInt(hdrSize - 4096))
      throw new Invalid(
        'config.json_size',
        `${jsonSize} does not match the binary header's ${hdrSize - 4096}`,
      );
    return undefined;
  } catch (e) {
    if (e instanceof Invalid) return { path: e.path.replace(/^\./, ''), message: e.message };
    throw e;
  }
}
