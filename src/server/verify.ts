import { inspectBundle } from '../rauc/index.js';
import type { BundleVerifier } from './api.js';

/**
 * Release verification with the RAUC bundle inspector: CMS signature and signer chain against the
 * keyring, then the payload (dm-verity tree and image hashes). Crypt bundles are signed inside an
 * envelope for their recipients, so the server needs a recipient key of its own to check them.
 * Any failure is the inspector's UserError (LAMA_E_BUNDLE_*), which refuses the upload.
 */
export function raucBundleVerifier(keyring: string, recipient?: { key: string; cert?: string }): BundleVerifier {
  return async (file) => {
    const info = await inspectBundle(file, {
      keyring,
      verifyPayload: true,
      ...(recipient ? { deviceKey: recipient.key, ...(recipient.cert ? { deviceCert: recipient.cert } : {}) } : {}),
    });
    return {
      compatible: info.manifest.compatible,
      version: info.manifest.version ?? 'unversioned',
      format: info.format,
      signer: info.signer?.subject ?? 'unknown',
    };
  };
}
