import { promises as fs } from 'node:fs';
import path from 'node:path';
import type { Credential } from '../../src/attestation/ek.js';
import type { Swtpm } from '../../src/fuzz/swtpm.js';

/** TCG NV indices of the low-range EK certificates (EK Credential Profile 2.2.1.4). */
export const EK_CERT_NV = { rsa: '0x01c00002', ecc: '0x01c0000a' } as const;

/** The EK certificate the TPM holds for `alg`, read as the device's agent reads it. */
export async function readEkCert(tpm: Swtpm, alg: 'rsa' | 'ecc', dir: string): Promise<Buffer> {
  const out = path.join(dir, `ek-${alg}.der`);
  await tpm.tool('tpm2_nvread', [EK_CERT_NV[alg], '-o', out]);
  return fs.readFile(out);
}

/** The file tpm2_activatecredential reads (tpm2-tools' header, then the two TPM2Bs). */
export function credentialFile(c: Credential): Buffer {
  return Buffer.concat([Buffer.from('badcc0de00000001', 'hex'), c.credentialBlob, c.encryptedSecret]);
}

/**
 * TPM2_ActivateCredential on the TPM, as tpm2-tools documents it: the AK (`ak`, loaded or a
 * persistent handle) authorized by its empty password, the EK by a policy session satisfying
 * PolicySecret(TPM_RH_ENDORSEMENT). Resolves with the recovered secret; rejects when the TPM refuses.
 */
export async function activateOnTpm(tpm: Swtpm, dir: string, ek: 'rsa' | 'ecc', ak: string, credential: Buffer): Promise<Buffer> {
  const f = (n: string): string => path.join(dir, `activate.${n}`);
  await fs.writeFile(f('cred'), credential);
  await tpm.tool('tpm2_createek', ['-c', f('ek.ctx'), '-G', ek]);
  await tpm.tool('tpm2_startauthsession', ['--policy-session', '-S', f('session.ctx')]);
  try {
    await tpm.tool('tpm2_policysecret', ['-S', f('session.ctx'), '-c', 'e']);
    await tpm.tool('tpm2_activatecredential', ['-c', ak, '-C', f('ek.ctx'), '-i', f('cred'), '-o', f('secret'), '-P', `session:${f('session.ctx')}`]);
  } finally {
    await tpm.tool('tpm2_flushcontext', [f('session.ctx')]).catch(() => undefined);
  }
  return fs.readFile(f('secret'));
}
