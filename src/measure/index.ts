/**
 * PCR 11 prediction for a UKI, as `systemd-measure calculate` computes it: systemd-stub extends PCR
 * 11 (starting from zeros) with, for each UKI section it knows and that is present, in its fixed
 * order, first the digest of the section name including its NUL byte, then the digest of the
 * section's loaded contents. A TPM2 policy bound to this value unseals only under this exact UKI.
 *
 * Public API:
 * - `measuredSections(stubVersion?)` → section names the stub measures, in order
 * - `predictPcr11(uki, { bank? })` → { bank, value (hex), phases, steps }: `value` is PCR 11 when
 *   the stub hands over to the kernel; `phases` adds the words systemd-pcrphase extends later
 *   (the same list `systemd-measure calculate` prints), `phasesWithoutInitrd` those of a boot
 *   whose initramfs does not run systemd (LamaDist's)
 */
import { createHash } from 'node:crypto';
import { parsePe, sectionData } from '../pe/index.js';
import { stubVersion } from '../uki/index.js';

export type Bank = 'sha1' | 'sha256' | 'sha384' | 'sha512';

/**
 * The sections systemd-stub measures, in its order. systemd 252 knows .linux .osrel .cmdline
 * .initrd .splash .dtb .pcrpkey (.pcrsig is never measured, it holds signatures of the result);
 * 253 added .uname and .sbat before .pcrpkey; 256 added .ucode after .initrd.
 */
export function measuredSections(version?: string): string[] {
  const major = version ? Number.parseInt(version, 10) : Number.POSITIVE_INFINITY;
  const list = ['.linux', '.osrel', '.cmdline', '.initrd'];
  if (major >= 256) list.push('.ucode');
  list.push('.splash', '.dtb');
  if (major >= 253) list.push('.uname', '.sbat');
  list.push('.pcrpkey');
  return list;
}

/** The boot phases systemd-pcrphase measures into PCR 11 after the stub, in order. */
export const BOOT_PHASES = ['enter-initrd', 'leave-initrd', 'sysinit', 'ready'] as const;

/**
 * The phases of a boot whose initramfs does not run systemd, as LamaDist's lamadist-init: only the
 * main system's words are measured.
 */
export const BOOT_PHASES_WITHOUT_INITRD = ['sysinit', 'ready'] as const;

/** One extend operation, for display and debugging. */
export interface MeasureStep {
  section: string;
  what: 'name' | 'data';
  digest: string;
  pcr: string;
}

/**
 * Predict PCR 11 after systemd-stub has measured `uki`. The stub version is read from the UKI's
 * .sdmagic section (the table above depends on it); `stub` overrides it.
 */
export function predictPcr11(
  uki: Buffer,
  opts: { bank?: Bank; stub?: string } = {},
): { bank: Bank; value: string; stub?: string; phases: { phase: string; value: string }[]; phasesWithoutInitrd: { phase: string; value: string }[]; steps: MeasureStep[] } {
  const bank = opts.bank ?? 'sha256';
  const info = parsePe(uki, 'UKI');
  const version = opts.stub ?? stubVersion(uki, info);
  const digest = (b: Buffer): Buffer => createHash(bank).update(b).digest();
  let pcr: Buffer = Buffer.alloc(createHash(bank).digest().length);
  const steps: MeasureStep[] = [];
  const extend = (section: string, what: 'name' | 'data', d: Buffer): void => {
    pcr = digest(Buffer.concat([pcr, d]));
    steps.push({ section, what, digest: d.toString('hex'), pcr: pcr.toString('hex') });
  };
  for (const name of measuredSections(version)) {
    const s = info.sections.find((x) => x.name === name);
    if (!s) continue;
    // The stub measures the section as loaded: VirtualSize bytes, zero-filled beyond the raw data.
    const raw = sectionData(uki, info, name) ?? Buffer.alloc(0);
    const data = s.virtualSize > raw.length ? Buffer.concat([raw, Buffer.alloc(s.virtualSize - raw.length)]) : raw;
    extend(name, 'name', digest(Buffer.from(`${name}\0`, 'latin1')));
    extend(name, 'data', digest(data));
  }
  const after = (words: readonly string[]): { phase: string; value: string }[] => {
    let p: Buffer = pcr;
    return words.map((word, i) => {
      p = digest(Buffer.concat([p, digest(Buffer.from(word, 'utf8'))]));
      return { phase: words.slice(0, i + 1).join(':'), value: p.toString('hex') };
    });
  };
  return { bank, value: pcr.toString('hex'), stub: version, phases: after(BOOT_PHASES), phasesWithoutInitrd: after(BOOT_PHASES_WITHOUT_INITRD), steps };
}
