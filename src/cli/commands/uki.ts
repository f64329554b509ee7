import path from 'node:path';
import type { Command } from 'commander';
import { UserError } from '../../errors.js';
import { findHost, kernelCmdline, loadInventory } from '../../host/index.js';
import { keyPath } from '../../keys/index.js';
import { predictPcr11, type Bank } from '../../measure/index.js';
import { listSignatures, signPe, verifyPe, type PeSignature } from '../../secureboot/index.js';
import { EFI_STUBS, buildUki, defaultOsRelease, inspectUki, type UkiInfo } from '../../uki/index.js';
import { readUserFile, writeFileAtomic } from '../../util/fsx.js';
import { act } from '../action.js';
import type { Context } from '../context.js';
import { DEFAULT_INVENTORY } from './host.js';

/** Debian's systemd EFI stub (package systemd-boot-efi); a real build passes the build's own stub. */
export const DEFAULT_STUB = EFI_STUBS['x86-64'] as string;

export interface UkiBuildOptions {
  kernel: string;
  initrd?: string[];
  cmdline?: string;
  host?: string;
  inventory?: string;
  rootHash?: string;
  slot?: 'a' | 'b';
  stub?: string;
  osrel?: string;
  uname?: string;
  splash?: string;
  /** Sign with the db key of this key directory... */
  keys?: string;
  /** ...or with this certificate and key. */
  cert?: string;
  key?: string;
  out: string;
  force?: boolean;
}

async function signer(o: UkiBuildOptions): Promise<{ certPem: Buffer; keyPem: Buffer } | undefined> {
  if (o.keys && (o.cert || o.key)) throw new UserError('LAMA_E_USAGE', 'use either --keys or --cert/--key');
  if (o.keys) {
    return { certPem: await readUserFile(await keyPath(o.keys, 'secureboot-db-cert')), keyPem: await readUserFile(await keyPath(o.keys, 'secureboot-db-key')) };
  }
  if (Boolean(o.cert) !== Boolean(o.key)) throw new UserError('LAMA_E_USAGE', '--cert and --key go together');
  if (o.cert && o.key) return { certPem: await readUserFile(o.cert, 'certificate'), keyPem: await readUserFile(o.key, 'private key') };
  return undefined;
}

/** The command line for the build: given literally, or derived from the host inventory and the slot. */
async function resolveCmdline(o: UkiBuildOptions): Promise<string> {
  if ((o.cmdline === undefined) === (o.host === undefined)) throw new UserError('LAMA_E_USAGE', 'give exactly one of --cmdline and --host');
  if (o.cmdline !== undefined) return o.cmdline;
  if (!o.rootHash || !o.slot) throw new UserError('LAMA_E_USAGE', '--host needs --root-hash and --slot (the slot image\'s dm-verity root hash)');
  const host = findHost(await loadInventory(o.inventory ?? DEFAULT_INVENTORY), o.host ?? '');
  return kernelCmdline(host, { rootHash: o.rootHash, slot: o.slot });
}

/**
 * `.osrel` when --osrel is not given: the UKI specification requires the section and systemd-boot
 * lists no UKI without it, so take the initrd's os-release, else the running system's (as ukify).
 */
async function osrelFor(initrd: Buffer[]): Promise<{ data: Buffer; note: string }> {
  const found = await defaultOsRelease(initrd);
  if (!found)
    throw new UserError('LAMA_E_USAGE', 'no --osrel given, and neither the initrd nor this system has an os-release');
  const note =
    found.from === 'initrd'
      ? `.osrel: ${found.path} from the initrd (no --osrel given)`
      : `.osrel: ${found.path} of the running system (no --osrel given; ${found.why})`;
  return { data: found.data, note };
}

/**
 * `lamadist uki build`: assemble a UKI and, with keys, sign it (and check the signature) before it
 * is written atomically. Returns what was written and the PCR 11 value the stub will measure.
 */
export async function ukiBuild(ctx: Context, o: UkiBuildOptions): Promise<{ out: string; cmdline: string; signed: boolean; pcr11: string; sections: string[] }> {
  const cmdline = await resolveCmdline(o);
  const keys = await signer(o);
  const initrd = await Promise.all((o.initrd ?? []).map((f) => readUserFile(f, 'initrd')));
  const chosen = o.osrel === undefined ? await osrelFor(initrd) : undefined;
  let pe = await buildUki({ stub: o.stub ?? DEFAULT_STUB, kernel: o.kernel, initrd, cmdline, osrel: o.osrel ?? chosen?.data, uname: o.uname, splash: o.splash });
  if (keys) {
    pe = signPe(pe, keys);
    verifyPe(pe, keys.certPem, o.out);
  } else {
    ctx.warn('no --keys or --cert/--key given: the UKI is unsigned and will not boot with Secure Boot enforcing');
  }
  await writeFileAtomic(o.out, pe, { force: o.force });
  // said once the UKI exists, so a refused build stays a single error line
  if (chosen) ctx.info(chosen.note);
  const info = inspectUki(pe);
  const pcr11 = predictPcr11(pe).value;
  const result = { out: o.out, cmdline, signed: Boolean(keys), pcr11, sections: info.sections.map((s) => s.name) };
  ctx.result(result, () => `wrote ${o.out} (${keys ? 'signed' : 'unsigned'}, ${pe.length} bytes)\ncmdline: ${cmdline}\nPCR 11:  ${pcr11}`);
  return result;
}

/** `lamadist uki inspect FILE [--cert CRT]`: sections, metadata, signatures and PCR 11 prediction. */
export async function ukiInspect(ctx: Context, file: string, o: { cert?: string } = {}): Promise<UkiInfo & { signatures: PeSignature[]; verified?: boolean; pcr11: string }> {
  const pe = await readUserFile(file, 'UKI');
  const info = inspectUki(pe, file);
  const signatures = listSignatures(pe, file);
  let verified: boolean | undefined;
  if (o.cert) {
    verifyPe(pe, await readUserFile(o.cert, 'certificate'), file);
    verified = true;
  }
  const pcr11 = predictPcr11(pe).value;
  const out = { ...info, signatures, ...(verified === undefined ? {} : { verified }), pcr11 };
  ctx.result(out, () => {
    const lines = [`${ctx.c.bold(path.basename(file))}${info.stub ? ctx.c.dim(`  (systemd-stub ${info.stub})`) : ''}`];
    for (const s of info.sections) lines.push(`  ${s.name.padEnd(9)} vma 0x${s.virtualAddress.toString(16).padStart(8, '0')}  size ${String(s.virtualSize).padStart(10)}`);
    if (info.cmdline !== undefined) lines.push(`cmdline:   ${info.cmdline}`);
    if (info.uname) lines.push(`uname:     ${info.uname}`);
    if (info.osrel) lines.push(`os-release: ${info.osrel.PRETTY_NAME ?? info.osrel.NAME ?? ''} ${info.osrel.VERSION_ID ?? ''}`.trimEnd());
    if (signatures.length === 0) lines.push(`signature: ${ctx.c.yellow('unsigned')}`);
    for (const s of signatures) lines.push(`signature: ${s.subject} (${s.digestAlgorithm || '?'}, ${s.error ? ctx.c.red(s.error) : s.digestMatches ? ctx.c.green('digest matches') : ''})`);
    if (verified) lines.push(`verified:  ${ctx.c.green('yes')} against ${o.cert}`);
    lines.push(`PCR 11:    ${pcr11}`);
    return lines.join('\n');
  });
  return out;
}

/** `lamadist uki measure FILE`: the PCR 11 values systemd-stub and systemd-pcrphase will produce. */
export async function ukiMeasure(ctx: Context, file: string, o: { bank?: Bank } = {}): Promise<ReturnType<typeof predictPcr11>> {
  const p = predictPcr11(await readUserFile(file, 'UKI'), { bank: o.bank });
  ctx.result(p, () => [`11:${p.bank}=${p.value}  (after systemd-stub)`, ...p.phases.map((ph) => `11:${p.bank}=${ph.value}  (phase ${ph.phase})`)].join('\n'));
  return p;
}

function collect(v: string, prev: string[] = []): string[] {
  return [...prev, v];
}

const BANKS = ['sha1', 'sha256', 'sha384', 'sha512'];

export function configure(cmd: Command): void {
  cmd.description('build, inspect and measure Unified Kernel Images');
  cmd
    .command('build')
    .description('assemble a UKI from the systemd stub, kernel, initrd and command line; sign it with --keys')
    .requiredOption('--kernel <file>', 'kernel image (bzImage)')
    .option('--initrd <file>', 'initrd (repeat to concatenate)', collect)
    .option('--cmdline <text>', 'kernel command line')
    .option('--host <name>', 'derive the command line from the host inventory')
    .option('--inventory <file>', 'host inventory', DEFAULT_INVENTORY)
    .option('--root-hash <hex>', 'dm-verity root hash of the slot (with --host)')
    .option('--slot <a|b>', 'slot this UKI boots (with --host)')
    .option('--stub <file>', 'systemd EFI stub', DEFAULT_STUB)
    .option('--osrel <file>', 'os-release file for .osrel (default: the initrd\'s, else this system\'s)')
    .option('--uname <release>', 'kernel release for .uname (default: read from the kernel)')
    .option('--splash <file>', 'BMP splash image')
    .option('--keys <dir>', 'sign with this key directory\'s db key')
    .option('--cert <file>', 'sign with this certificate...')
    .option('--key <file>', '...and this private key')
    .requiredOption('-o, --out <file>', 'output UKI')
    .option('--force', 'replace an existing output')
    .action(act<UkiBuildOptions>(async (ctx, _a, o) => void (await ukiBuild(ctx, o))));
  cmd
    .command('inspect')
    .description('show a UKI\'s sections, command line, os-release, signatures and PCR 11 prediction')
    .argument('<file>', 'UKI')
    .option('--cert <file>', 'also verify the signature against this certificate')
    .action(act<{ cert?: string }>(async (ctx, [file], o) => void (await ukiInspect(ctx, file ?? '', o))));
  cmd
    .command('measure')
    .description('predict PCR 11 for a UKI (as systemd-measure calculate)')
    .argument('<file>', 'UKI')
    .option('--bank <alg>', `PCR bank (${BANKS.join(', ')})`, 'sha256')
    .action(
      act<{ bank: string }>(async (ctx, [file], o) => {
        if (!BANKS.includes(o.bank)) throw new UserError('LAMA_E_USAGE', `--bank must be one of ${BANKS.join(', ')}`);
        await ukiMeasure(ctx, file ?? '', { bank: o.bank as Bank });
      }),
    );
}
