/**
 * UEFI Secure Boot: Authenticode signing and verification of PE images, EFI signature lists,
 * signed authenticated-variable updates and OVMF variable stores with our keys enrolled.
 *
 * Public API:
 * - `signPe(pe, { certPem, keyPem })` → Buffer; `verifyPe(pe, certPem, where?)` → PeSignature or a
 *   UserError (LAMA_E_UNSIGNED, LAMA_E_PE_DIGEST_MISMATCH, LAMA_E_BAD_SIGNATURE, LAMA_E_UNTRUSTED_SIGNER)
 * - `listSignatures(pe)` → PeSignature[] (each checked against the image, no trust decision)
 * - `makeEsl(cert, ownerGuid)`, `parseEsl(buf)`, `makeAuthVariable({ name, data, signer, timestamp? })`,
 *   `verifyAuthVariable(auth, name, signerCert)`
 * - `makeOvmfVars({ template, out, pk, kek, db, force? })`: Debian's OVMF_VARS_4M.fd with PK/KEK/db
 *   enrolled and Secure Boot enforcing; `readOvmfVars(file)` lists what is enrolled
 */
export { signPe, verifyPe, listSignatures, stripSignature, type PeSignature } from './authenticode.js';
export { loadCertificate, loadSigner, type SignerKeys } from './cms.js';
export {
  GUID,
  makeEsl,
  parseEsl,
  makeAuthVariable,
  verifyAuthVariable,
  authPayload,
  efiTime,
  makeOvmfVars,
  readOvmfVars,
  planSecureBootVariables,
  addStoreVariables,
  listStoreVariables,
  type EnrollKeys,
  type NewVariable,
  type StoredVariable,
} from './efivars.js';
