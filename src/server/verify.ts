import { predictPcr11Values } from '../attestation/index.js';
import { inspectBundle } from '../rauc/index.js';
import { releaseUki, unpackRelease } from '../release/open.js';
import type { BundleVerifier } from './api.js';
import type { Pcr11Prediction } from './attestation.js';

/**
 * Release verification with the RAUC bundle inspector: CMS signature and signer chain against the
 * keyring, then the payload (dm-verity tree and image hashes). Crypt bundles are signed inside an
 * envelope for their recipients, so the server needs a recipient key of its own to check them.
 * Any failure is the inspector's UserError (LAMA_E_BUNDLE_*), which refuses the upload.
 *
 * A LamaDist release (one with an efi image) also yields the PCR 11 value every host's UKI leaves
 * in each slot, which attestation compares devices against.
 */
export function raucBundleVerifier(keyring: string, recipient?: { key: string; cert?: string }): BundleVerifier {
  return async (file) => {
    const info = await inspectBundle(file, {
      keyring,
      verifyPayload: true,
      ...(recipient ? { deviceKey: recipient.key, ...(recipient.cert ? { deviceCert: recipient.cert } : {}) } : {}),
    });
    const pcr11: Pcr11Prediction[] = [];
    if (info.manifest.images.some((i) => i.slotClass === 'efi')) {
      const release = await unpackRelease(file, { keyring, candidates: [recipient?.key] });
      try {
        for (const machineId of [...release.hosts].sort()) {
          for (const slot of ['a', 'b'] as const) pcr11.push({ machineId, slot, values: predictPcr11Values(await releaseUki(release, machineId, slot)) });
        }
      } finally {
        await release.close();
      }
    }
    return {
      compatible: info.manifest.compatible,
      version: info.manifest.version ?? 'unversioned',
      format: info.format,
      signer: info.signer?.subject ?? 'unknown',
      pcr11,
    };
  };
}
