import type { Command } from 'commander';
import { signPe, verifyPe, type PeSignature } from '../../secureboot/index.js';
import { readUserFile, writeFileAtomic } from '../../util/fsx.js';
import { act } from '../action.js';
import type { Context } from '../context.js';

/**
 * `lamadist sign efi IN --cert --key [-o OUT]`: Authenticode-sign a PE image (UKI, bootloader). The
 * result is verified with the same certificate before it is written; without -o, IN is replaced
 * atomically.
 */
export async function signEfi(ctx: Context, input: string, opts: { cert: string; key: string; out?: string; force?: boolean }): Promise<PeSignature> {
  const pe = await readUserFile(input, 'PE image');
  const certPem = await readUserFile(opts.cert, 'certificate');
  const keyPem = await readUserFile(opts.key, 'private key');
  const signed = signPe(pe, { certPem, keyPem });
  const sig = verifyPe(signed, certPem, input);
  const out = opts.out ?? input;
  await writeFileAtomic(out, signed, { force: opts.force || out === input });
  ctx.result({ out, signer: sig.subject, digestAlgorithm: sig.digestAlgorithm }, `signed ${out} as ${sig.subject}`);
  return sig;
}

export function configure(cmd: Command): void {
  cmd.description('sign boot artefacts');
  cmd
    .command('efi')
    .description('Authenticode-sign a PE/EFI image (SHA-256) with the Secure Boot db key')
    .argument('<in>', 'PE image (UKI, EFI application)')
    .requiredOption('--cert <file>', 'signing certificate (PEM), normally keys/db.crt')
    .requiredOption('--key <file>', 'private key (PEM), normally keys/db.key')
    .option('-o, --out <file>', 'output (default: replace the input)')
    .option('--force', 'replace an existing output')
    .action(act<{ cert: string; key: string; out?: string; force?: boolean }>(async (ctx, [input], o) => void (await signEfi(ctx, input ?? '', o))));
}
