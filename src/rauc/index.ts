/**
 * RAUC update bundles, byte-compatible with RAUC 1.8: create signed `verity` bundles and `crypt`
 * bundles, encrypt crypt bundles for RSA or EC device certificates, and inspect/verify any verity,
 * crypt or plain bundle (ours or made by `rauc bundle`/`rauc encrypt`/`rauc convert`, casync
 * bundles included).
 *
 * Public API:
 * - `createBundle(options)` → `CreatedBundle`: squashfs payload (mksquashfs, fixed timestamps),
 *   dm-verity tree appended (src/verity), manifest signed as CMS SignedData, u64 size trailer.
 * - `encryptBundle(input, out, recipientCertFiles, { deviceKey?, deviceCert?, keyring?, force? })`
 *   → `EncryptedBundle`: rewrites only the CMS and trailer of a crypt bundle.
 * - `inspectBundle(path, { keyring?, deviceKey?, deviceCert?, compatible?, verifyPayload?, casyncStore? })`
 *   → `BundleInfo` `{ format, encrypted, manifest: { compatible, version, build?, images: [{ slotClass,
 *   filename, sha256, size, adaptive?, casync? }] }, signer, chain, verified, payloadVerified, sizes,
 *   unchecked }` (`unchecked`: what a casync bundle leaves to its chunk store).
 *   With `keyring` the signature, signer chain, dm-verity tree and image hashes are verified;
 *   every failure is a UserError with a distinct LAMA_E_BUNDLE_* code located at the bundle.
 *   The update server calls this on every upload: `inspectBundle(path, { keyring, compatible })`.
 * - `extractBundle(path, dir, { keyring, deviceKey?, deviceCert? })`: verify, then unpack.
 * - `planBundle(...)` (pure manifest planning), `renderManifest`/`parseManifest` (RAUC's key-file
 *   manifest, byte-identical to RAUC's output), `slotClassesOf(systemConf)`,
 *   `digestImage(path, { blockIndex })` (SHA-256 and block-hash-index in one pass),
 *   `adaptiveFetchBytes(oldIndex, newIndex)`, `blockHashes(data, blockSize?)`,
 *   `alignPayload(images)` (the padding and mksquashfs order that put each image of an
 *   `alignImages` bundle on a 4 KiB boundary).
 */

export { createBundle, encryptBundle, extractBundle, inspectBundle, planBundle } from './bundle.js';
export type { BundleImageInput, BundleInfo, CreateBundleOptions, CreatedBundle, EncryptedBundle, InspectOptions } from './bundle.js';
export { parseManifest, renderManifest, slotClassesOf } from './manifest.js';
export type { BundleFormat, ImageHook, Manifest, ManifestImage } from './manifest.js';
export { ALIGNED_SQUASHFS_ARGS, ALIGN_PAD_PREFIX, adaptiveFetchBytes, alignPayload, blockHashes, digestImage } from './payload.js';
export type { CertSummary, SignerMaterial } from './cms.js';
