import type { Command } from 'commander';
import { verifyPe, type PeSignature } from '../../secureboot/index.js';
import { readUserFile } from '../../util/fsx.js';
import { act } from '../action.js';
import type { Context } from '../context.js';

/** `lamadist verify efi IN --cert CRT`: check an Authenticode signature as firmware would against db. */
export async function verifyEfi(ctx: Context, input: string, opts: { cert: string }): Promise<PeSignature> {
  const pe = await readUserFile(input, 'PE image');
  const sig = verifyPe(pe, await readUserFile(opts.cert, 'certificate'), input);
  ctx.result({ file: input, verified: true, signer: sig.subject, issuer: sig.issuer, digestAlgorithm: sig.digestAlgorithm }, `${input}: signature OK (${sig.subject})`);
  return sig;
}

export function configure(cmd: Command): void {
  cmd.description('verify signatures of boot artefacts');
  cmd
    .command('efi')
    .description('verify a PE/EFI image\'s Authenticode signature against a trusted certificate')
    .argument('<in>', 'PE image')
    .requiredOption('--cert <file>', 'trusted certificate (PEM), e.g. keys/db.crt')
    .action(act<{ cert: string }>(async (ctx, [input], o) => void (await verifyEfi(ctx, input ?? '', o))));
}
