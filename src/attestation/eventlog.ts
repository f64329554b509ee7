/**
 * The UEFI firmware's TCG event log (TCG PC Client Platform Firmware Profile, crypto-agile format:
 * `/sys/kernel/security/tpm0/binary_bios_measurements`), replayed per PCR and read for the Secure
 * Boot configuration that PCR 7 measures. The log is untrusted: only what replays to the quoted
 * PCR counts, and an event whose content is read must hash to the digest that was extended.
 */
import { createHash } from 'node:crypto';
import { UserError } from '../errors.js';
import { GUID, guidString, parseEsl } from '../secureboot/efivars.js';
import { Reader } from './reader.js';
import { ALG } from './tpm.js';

export const EV_NO_ACTION = 0x3;
export const EV_SEPARATOR = 0x4;
export const EV_EFI_VARIABLE_DRIVER_CONFIG = 0x80000001;
export const EV_EFI_VARIABLE_AUTHORITY = 0x800000e0;

export interface TcgEvent {
  /** Byte offset in the log, for messages. */
  offset: number;
  pcr: number;
  type: number;
  /** Digest per TPM_ALG_ID. */
  digests: Map<number, Buffer>;
  data: Buffer;
}

export interface EventLog {
  /** Digest sizes per algorithm, from the Spec ID event. */
  algorithms: Map<number, number>;
  events: TcgEvent[];
}

const SPEC_ID_SIGNATURE = 'Spec ID Event03\0';

/** Parse a crypto-agile event log; a SHA-1-only (TPM 1.2 format) log has no SHA-256 digests to replay. */
export function parseEventLog(buf: Buffer): EventLog {
  const r: Reader = new Reader(buf, 'event log', true);
  // The first event is in the TPM 1.2 format and carries the Spec ID event naming the digests that follow.
  r.u32('first event PCR index');
  const firstType = r.u32('first event type');
  r.bytes(20, 'first event digest');
  const spec: Reader = new Reader(r.bytes(r.u32('first event size'), 'first event data'), 'event log Spec ID event', true);
  if (firstType !== EV_NO_ACTION || spec.buf.subarray(0, 16).toString('latin1') !== SPEC_ID_SIGNATURE) {
    r.fail('LAMA_E_ATTEST_EVENTLOG', 'log does not start with a "Spec ID Event03" event: not a crypto-agile (TPM 2.0) event log', 0);
  }
  spec.bytes(16, 'signature');
  spec.u32('platformClass');
  spec.bytes(4, 'spec version and uintnSize');
  const n = spec.u32('numberOfAlgorithms');
  if (n === 0 || n > 16) spec.fail('LAMA_E_ATTEST_EVENTLOG', `numberOfAlgorithms is ${n}`, spec.off - 4);
  const algorithms = new Map<number, number>();
  for (let i = 0; i < n; i++) {
    const alg = spec.u16(`algorithm ${i} id`);
    const size = spec.u16(`algorithm ${i} digest size`);
    if (size === 0 || size > 64) spec.fail('LAMA_E_ATTEST_EVENTLOG', `digest size ${size} of algorithm 0x${alg.toString(16)} is out of range`, spec.off - 2);
    algorithms.set(alg, size);
  }
  if (algorithms.get(ALG.SHA256) !== 32) r.fail('LAMA_E_ATTEST_EVENTLOG', 'log carries no SHA-256 digests', 0);
  const events: TcgEvent[] = [];
  while (r.left > 0) {
    const offset = r.off;
    const pcr = r.u32('PCR index');
    const type = r.u32('event type');
    const count = r.u32('digest count');
    if (count > algorithms.size) r.fail('LAMA_E_ATTEST_EVENTLOG', `event has ${count} digests, the log declares ${algorithms.size} algorithms`, r.off - 4);
    const digests = new Map<number, Buffer>();
    for (let i = 0; i < count; i++) {
      const at = r.off;
      const alg = r.u16('digest algorithm');
      const size = algorithms.get(alg);
      if (size === undefined) r.fail('LAMA_E_ATTEST_EVENTLOG', `digest algorithm 0x${alg.toString(16)} is not declared in the Spec ID event`, at);
      digests.set(alg, r.bytes(size, 'digest'));
    }
    const data = r.bytes(r.u32('event size'), 'event data');
    events.push({ offset, pcr, type, digests, data });
  }
  return { algorithms, events };
}

/** The SHA-256 value of `pcr` after the events of the log (EV_NO_ACTION extends nothing). */
export function replayPcr(log: EventLog, pcr: number): Buffer {
  let value = Buffer.alloc(32);
  for (const e of log.events) {
    if (e.pcr !== pcr || e.type === EV_NO_ACTION) continue;
    const d = e.digests.get(ALG.SHA256);
    if (!d) throw new UserError('LAMA_E_ATTEST_EVENTLOG', `event for PCR ${pcr} has no SHA-256 digest`, { where: `event log at byte ${e.offset}` });
    value = createHash('sha256').update(value).update(d).digest();
  }
  return value;
}

/** UEFI_VARIABLE_DATA, the content of EFI variable events. */
export function variableData(e: TcgEvent): { guid: string; name: string; data: Buffer } {
  const r: Reader = new Reader(e.data, `event log at byte ${e.offset} (UEFI_VARIABLE_DATA)`, true);
  const guid = guidString(r.bytes(16, 'VariableName'));
  const nameChars = r.u64('UnicodeNameLength');
  const dataLen = r.u64('VariableDataLength');
  if (nameChars > BigInt(r.left) || dataLen > BigInt(r.left)) r.fail('LAMA_E_ATTEST_TRUNCATED', 'variable name and data lengths exceed the event');
  const name = r.bytes(Number(nameChars) * 2, 'UnicodeName').toString('utf16le');
  const data = r.bytes(Number(dataLen), 'VariableData');
  r.end('variable data');
  return { guid, name, data };
}

/** The fleet's Secure Boot keys as EFI signature lists (the key directory's `secureboot-*-esl` files). */
export interface SecureBootKeys {
  pk: Buffer;
  kek: Buffer;
  db: Buffer;
}

const KEY_VARIABLES = [
  { name: 'PK', guid: GUID.globalVariable, key: 'pk' },
  { name: 'KEK', guid: GUID.globalVariable, key: 'kek' },
  { name: 'db', guid: GUID.imageSecurityDatabase, key: 'db' },
] as const;

/** Entries of a signature list, owner GUIDs left out: the firmware may have been enrolled with another owner. */
function eslEntries(esl: Buffer, where: string): string[] {
  return parseEsl(esl, where)
    .map((e) => `${e.type}:${e.data.toString('hex')}`)
    .sort();
}

/**
 * Check PCR 7 against the event log: the log's PCR 7 events must replay to `quoted`, the Secure
 * Boot configuration events (EV_EFI_VARIABLE_DRIVER_CONFIG) before the separator must hash to their
 * digests, SecureBoot must be 1, and PK, KEK and db must hold exactly the fleet's certificates.
 * Returns the reasons it is not so; an empty list means PCR 7 is what the fleet expects.
 */
export function checkPcr7(log: EventLog, quoted: Buffer, keys: SecureBootKeys): string[] {
  const replayed = replayPcr(log, 7);
  if (!replayed.equals(quoted)) return [`event log replays PCR 7 to ${replayed.toString('hex')}, the TPM quoted ${quoted.toString('hex')}`];
  const seen = new Map<string, Buffer>();
  const problems: string[] = [];
  for (const e of log.events) {
    if (e.pcr !== 7) continue;
    if (e.type === EV_SEPARATOR) break;
    if (e.type !== EV_EFI_VARIABLE_DRIVER_CONFIG) continue;
    if (!createHash('sha256').update(e.data).digest().equals(e.digests.get(ALG.SHA256) as Buffer)) {
      problems.push(`event at byte ${e.offset} does not hash to the digest extended into PCR 7`);
      continue;
    }
    const v = variableData(e);
    const id = `${v.guid}/${v.name}`;
    if (seen.has(id)) problems.push(`variable ${v.name} is measured twice before the separator`);
    seen.set(id, v.data);
  }
  const secureBoot = seen.get(`${GUID.globalVariable}/SecureBoot`);
  if (!secureBoot) problems.push('SecureBoot variable is not measured');
  else if (!(secureBoot.length === 1 && secureBoot[0] === 1)) problems.push(`SecureBoot is ${secureBoot.toString('hex') || 'empty'}, not 01: Secure Boot is not enforcing`);
  for (const k of KEY_VARIABLES) {
    const data = seen.get(`${k.guid}/${k.name}`);
    if (!data || data.length === 0) {
      problems.push(`${k.name} is empty: the firmware is in setup mode`);
      continue;
    }
    let enrolled: string[];
    try {
      enrolled = eslEntries(data, `measured ${k.name}`);
    } catch (err) {
      problems.push(err instanceof UserError ? err.line() : String(err));
      continue;
    }
    const fleet = eslEntries(keys[k.key], `fleet ${k.name} list`);
    if (enrolled.length !== fleet.length || enrolled.some((x, i) => x !== fleet[i])) {
      problems.push(`${k.name} holds ${enrolled.length} entr${enrolled.length === 1 ? 'y' : 'ies'} that differ from the fleet's ${k.name} certificates`);
    }
  }
  return problems;
}
