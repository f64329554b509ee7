/**
 * Remote attestation, checked on the update server in pure TypeScript: a TPM 2.0 quote over PCRs
 * 7, 10 and 11, the logs that explain them, and what the fleet expects them to hold.
 *
 * Public API:
 * - `parseQuote(buf)`, `parseSignature(buf)`, `parseAkPublic(buf)` → decoded TPM structures
 *   (LAMA_E_ATTEST_TRUNCATED / _FORMAT / _KEY with the byte offset on bad input)
 * - `verifyQuote({ quote, signature, akPublic, nonce, pcrs, require? })` → QuoteInfo, or throws
 *   LAMA_E_ATTEST_SIGNATURE / _NONCE / _SELECTION / _PCR_DIGEST
 * - `parseImaLog(buf)` (binary or ASCII list), `replayIma(entries, pcr?)` → PCR 10 value
 * - `parseEventLog(buf)`, `replayPcr(log, pcr)`, `checkPcr7(log, quoted, fleetEsls)` → reasons
 * - `predictPcr11Values(uki)` → the PCR 11 values a UKI leaves (stub hand-over and boot phases)
 * - `appraise(evidence, expected)` → { state: attested | failed, checks per PCR, quote }
 * - `parseEkPublic(buf)`, `parseEkCertificate(der)`, `loadEkTrust(pem, file)`,
 *   `verifyEkCertificate(cert, trust, ekPublic, at?)` → the chain's subjects, or throws
 *   LAMA_E_ATTEST_EK / _EK_CERT / _EK_CHAIN / _EK_MISMATCH / _EK_CA
 * - `makeCredential(ekPublic, akName, secret)` → TPM2_MakeCredential's credential blob and encrypted seed
 */
import { UserError } from '../errors.js';
import { predictPcr11 } from '../measure/index.js';
import { checkPcr7, parseEventLog, type SecureBootKeys } from './eventlog.js';
import { parseImaLog, replayIma } from './ima.js';
import { verifyQuote, type AkPublic, type QuoteInfo } from './tpm.js';

export { ALG, parseAkPublic, parseQuote, parseSignature, verifyQuote, type AkPublic, type PcrSelection, type QuoteInfo, type QuoteSignature, type VerifyQuoteInput } from './tpm.js';
export {
  loadEkTrust,
  makeCredential,
  parseEkCertificate,
  parseEkPublic,
  verifyEkCertificate,
  type Credential,
  type EkCertificate,
  type EkCertificateInfo,
  type EkPublic,
  type EkTrust,
} from './ek.js';
export { parseImaAscii, parseImaBinary, parseImaLog, replayIma, type ImaEntry } from './ima.js';
export {
  EV_EFI_VARIABLE_AUTHORITY,
  EV_EFI_VARIABLE_DRIVER_CONFIG,
  EV_NO_ACTION,
  EV_SEPARATOR,
  checkPcr7,
  parseEventLog,
  replayPcr,
  variableData,
  type EventLog,
  type SecureBootKeys,
  type TcgEvent,
} from './eventlog.js';

/** The PCRs a LamaDist quote covers: Secure Boot policy, IMA, the UKI. */
export const ATTESTED_PCRS = [7, 10, 11] as const;

/**
 * The PCR 11 values a device booted from `uki` can quote: the one systemd-stub leaves at hand-over
 * and, on a systemd system, each value after systemd-pcrphase's words, with a systemd initramfs
 * and without one (LamaDist's lamadist-init measures no initrd phase) (hex, SHA-256 bank).
 */
export function predictPcr11Values(uki: Buffer): string[] {
  const p = predictPcr11(uki, { bank: 'sha256' });
  return [p.value, ...p.phases.map((x) => x.value), ...p.phasesWithoutInitrd.map((x) => x.value)];
}

/** What a device sends for one attestation. */
export interface Evidence {
  quote: Buffer;
  signature: Buffer;
  akPublic: Buffer | AkPublic;
  nonce: Buffer;
  /** SHA-256 values of PCRs 7, 10 and 11. */
  pcrs: Readonly<Record<number, Buffer>>;
  /** `binary_runtime_measurements` or `ascii_runtime_measurements`. */
  imaLog?: Buffer;
  /** `binary_bios_measurements`. */
  eventLog?: Buffer;
}

/** What the fleet expects. */
export interface Expected {
  /** Acceptable PCR 11 values (from `predictPcr11Values` of the UKIs of the release the device runs). */
  pcr11: readonly string[];
  /** Why `pcr11` is empty, when it is (no release known for the device's version, …). */
  pcr11Unknown?: string;
  /** The fleet's PK, KEK and db signature lists; without them PCR 7 fails. */
  secureBoot?: SecureBootKeys;
}

export interface PcrCheck {
  pcr: number;
  ok: boolean;
  /** Why it failed, or what it matched. */
  reason: string;
}

export interface Appraisal {
  state: 'attested' | 'failed';
  checks: PcrCheck[];
  quote: QuoteInfo;
}

function check(pcr: number, fn: () => string | string[]): PcrCheck {
  try {
    const r = fn();
    if (typeof r === 'string') return { pcr, ok: true, reason: r };
    return r.length ? { pcr, ok: false, reason: r.join('; ') } : { pcr, ok: true, reason: 'Secure Boot enforcing under the fleet PK, KEK and db' };
  } catch (err) {
    if (err instanceof UserError) return { pcr, ok: false, reason: err.line() };
    throw err;
  }
}

/**
 * Verify the quote (throws its LAMA_E_ATTEST_* error when it proves nothing), then judge each PCR:
 * 10 replayed from the IMA list, 7 from the event log and the fleet's Secure Boot keys, 11 against
 * the predicted values. The device is attested only when every check passes.
 */
export function appraise(ev: Evidence, expected: Expected): Appraisal {
  const quote = verifyQuote({ quote: ev.quote, signature: ev.signature, akPublic: ev.akPublic, nonce: ev.nonce, pcrs: ev.pcrs, require: ATTESTED_PCRS });
  const pcr = (i: number): Buffer => ev.pcrs[i] as Buffer;
  const checks = [
    check(7, () => {
      if (!ev.eventLog) return ['no UEFI event log was sent'];
      if (!expected.secureBoot) return ["the server was started without the fleet's Secure Boot keys"];
      return checkPcr7(parseEventLog(ev.eventLog), pcr(7), expected.secureBoot);
    }),
    check(10, () => {
      if (!ev.imaLog) return ['no IMA measurement list was sent'];
      const entries = parseImaLog(ev.imaLog);
      const replayed = replayIma(entries);
      if (!replayed.equals(pcr(10))) return [`IMA list (${entries.length} entries) replays to ${replayed.toString('hex')}, the TPM quoted ${pcr(10).toString('hex')}`];
      return `IMA list of ${entries.length} entries replays to the quoted value`;
    }),
    check(11, () => {
      const v = pcr(11).toString('hex');
      if (expected.pcr11.length === 0) return [`no predicted value to compare with: ${expected.pcr11Unknown ?? 'no release prediction'}`];
      if (!expected.pcr11.includes(v)) return [`PCR 11 is ${v}, which no UKI of the release the device runs leaves: it booted another UKI or command line`];
      return 'matches the UKI of the release the device runs';
    }),
  ];
  return { state: checks.every((c) => c.ok) ? 'attested' : 'failed', checks, quote };
}
