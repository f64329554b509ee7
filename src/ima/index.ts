/**
 * IMA file signatures for root images: which files of a root tree get one (pure), the
 * `security.ima` value (IMA v2 digital signature over the file's SHA-256, as `evmctl ima_sign`
 * writes it and the kernel appraises it), the fleet IMA key from the key directory, and applying
 * the signatures to a staged copy of the tree with one `setfattr --restore` run.
 *
 * The value: type 0x03 (EVM_IMA_XATTR_DIGSIG), version 2, hash algorithm (4 = SHA-256), the key id
 * (last 4 bytes of the certificate's subjectKeyIdentifier, which is how the kernel finds the key on
 * `.ima`), the signature size (2 bytes, big-endian) and the signature (RSA PKCS#1 v1.5 or ECDSA DER
 * over the digest). RSA PKCS#1 v1.5 is deterministic, so a tree signed twice gives the same bytes.
 *
 * Public API:
 * - `imaTargets(files)` → relative paths to sign (pure); `listTree(dir)` → `TreeFile[]`
 * - `imaXattr(keyId, signature)` → `security.ima` value (pure); `signFile(file, signer)` → value
 * - `loadImaSigner(key, cert?)` → `ImaSigner` (key directory, or key file plus certificate)
 * - `setfattrRestore(entries)` → input for `setfattr --restore` (pure); `signTree(dir, signer)`
 * - `policyAppraises(text)` (pure); `checkTreeIma(tree, signer?)` before a root image is built;
 *   `installImaCert(dir, signer)` puts the certificate where lamadist-init loads it from
 */
import { createPrivateKey, createPublicKey, createSign, type KeyObject } from 'node:crypto';
import { createReadStream, promises as fs } from 'node:fs';
import path from 'node:path';
import { pipeline } from 'node:stream/promises';
import * as x509 from '@peculiar/x509';
import { UserError, isErrno } from '../errors.js';
import { keyPath } from '../keys/index.js';
import { makeTempDir } from '../util/fsx.js';
import { run } from '../util/proc.js';

export const EVM_IMA_XATTR_DIGSIG = 0x03;
export const IMA_SIGNATURE_V2 = 2;
/** The kernel's enum hash_algo value for SHA-256. */
export const HASH_ALGO_SHA256 = 4;
export const IMA_XATTR = 'security.ima';
/** Where a root carries the certificate that verifies its signatures: lamadist-init loads it. */
export const IMA_CERT_PATH = 'etc/keys/x509_ima.der';
/** The IMA policy systemd loads at startup (meta-lamadist's lamadist-ima-policy). */
export const IMA_POLICY_PATH = 'etc/ima/ima-policy';

/** A regular file of a root tree, as `imaTargets` needs to see it. */
export interface TreeFile {
  /** Path relative to the tree's root, `/`-separated. */
  path: string;
  mode: number;
  /** Starts with the ELF magic. */
  elf: boolean;
}

const MODULE_RE = /\.ko(\.(xz|gz|zst))?$/;

/**
 * The files whose execution or mapping IMA appraises: anything executable, every ELF object
 * (shared libraries are mapped, not executed, and are often mode 0644) and kernel modules
 * (compressed ones too: the kernel appraises the file as it is read). Sorted by path. Pure.
 */
export function imaTargets(files: readonly TreeFile[]): string[] {
  return files
    .filter((f) => (f.mode & 0o111) !== 0 || f.elf || MODULE_RE.test(f.path))
    .map((f) => f.path)
    .sort();
}

/** The `security.ima` value for a signature made with the key whose id is `keyId`. Pure. */
export function imaXattr(keyId: Buffer, signature: Buffer): Buffer {
  if (keyId.length !== 4) throw new Error(`IMA key id must be 4 bytes, got ${keyId.length}`);
  if (signature.length > 0xffff) throw new Error(`signature of ${signature.length} bytes does not fit IMA v2`);
  const head = Buffer.alloc(9);
  head.writeUInt8(EVM_IMA_XATTR_DIGSIG, 0);
  head.writeUInt8(IMA_SIGNATURE_V2, 1);
  head.writeUInt8(HASH_ALGO_SHA256, 2);
  keyId.copy(head, 3);
  head.writeUInt16BE(signature.length, 7);
  return Buffer.concat([head, signature]);
}

export interface ImaSigner {
  key: KeyObject;
  keyId: Buffer;
  /** The certificate (DER) that verifies the signatures. */
  certDer: Buffer;
  keyFile: string;
  certFile: string;
}

/** Sign one file's content: the `security.ima` value. */
export async function signFile(file: string, signer: ImaSigner): Promise<Buffer> {
  const s = createSign('sha256');
  await pipeline(createReadStream(file), s);
  return imaXattr(signer.keyId, s.sign(signer.key));
}

async function readKeyFile(file: string, what: string): Promise<Buffer> {
  try {
    return await fs.readFile(file);
  } catch (err) {
    if (isErrno(err, 'ENOENT')) throw new UserError('LAMA_E_NOT_FOUND', `${what} ${file} does not exist`);
    if (isErrno(err, 'EACCES')) throw new UserError('LAMA_E_IMA_KEY', `${what} ${file} is not readable`);
    if (isErrno(err, 'EISDIR')) throw new UserError('LAMA_E_IMA_KEY', `${what} ${file} is a directory`);
    throw err;
  }
}

function parseCert(data: Buffer, file: string): x509.X509Certificate {
  try {
    return new x509.X509Certificate(data.subarray(0, 11).toString('latin1') === '-----BEGIN ' ? data.toString('latin1') : data);
  } catch {
    throw new UserError('LAMA_E_IMA_KEY', 'not an X.509 certificate (DER or PEM)', { where: file });
  }
}

/**
 * The IMA signer: from a key directory (its `ima-key` and `ima-cert-der`), or from a private key
 * file and `cert`. Refuses a key that is not the certificate's, a certificate that may not sign
 * (keyUsage without digitalSignature) and one without a subjectKeyIdentifier (the kernel could not
 * match signatures to it).
 */
export async function loadImaSigner(key: string, cert?: string): Promise<ImaSigner> {
  const st = await fs.stat(key).catch((err: unknown) => {
    if (isErrno(err, 'ENOENT')) throw new UserError('LAMA_E_NOT_FOUND', `IMA key ${key} does not exist`);
    throw err;
  });
  let keyFile = key;
  let certFile = cert;
  if (st.isDirectory()) {
    keyFile = await keyPath(key, 'ima-key');
    certFile ??= await keyPath(key, 'ima-cert-der');
  }
  if (!certFile) throw new UserError('LAMA_E_USAGE', '--ima-key FILE needs --ima-cert (or give the key directory)');
  let privateKey: KeyObject;
  try {
    privateKey = createPrivateKey(await readKeyFile(keyFile, 'IMA key'));
  } catch (err) {
    if (err instanceof UserError) throw err;
    throw new UserError('LAMA_E_IMA_KEY', 'not an unencrypted private key (PEM or DER)', { where: keyFile });
  }
  const c = parseCert(await readKeyFile(certFile, 'IMA certificate'), certFile);
  const spki = Buffer.from(c.publicKey.rawData);
  if (!createPublicKey(privateKey).export({ type: 'spki', format: 'der' }).equals(spki))
    throw new UserError('LAMA_E_IMA_KEY', `${keyFile} is not the key of the IMA certificate ${certFile}`);
  const usage = c.getExtension(x509.KeyUsagesExtension);
  if (usage && (usage.usages & x509.KeyUsageFlags.digitalSignature) === 0)
    throw new UserError('LAMA_E_IMA_KEY', 'certificate keyUsage lacks digitalSignature: the kernel would not verify signatures with it', { where: certFile });
  const skid = c.getExtension(x509.SubjectKeyIdentifierExtension);
  if (!skid) throw new UserError('LAMA_E_IMA_KEY', 'certificate has no subjectKeyIdentifier: the kernel could not find it for a signature', { where: certFile });
  const id = Buffer.from(skid.keyId, 'hex');
  return { key: privateKey, keyId: id.subarray(id.length - 4), certDer: Buffer.from(c.rawData), keyFile, certFile };
}

async function isElf(file: string): Promise<boolean> {
  const h = await fs.open(file, 'r');
  try {
    const b = Buffer.alloc(4);
    const { bytesRead } = await h.read(b, 0, 4, 0);
    return bytesRead === 4 && b.readUInt32BE(0) === 0x7f454c46;
  } finally {
    await h.close();
  }
}

/** Every regular file under `dir` (symbolic links are not followed). */
export async function listTree(dir: string): Promise<TreeFile[]> {
  const out: TreeFile[] = [];
  const walk = async (rel: string): Promise<void> => {
    for (const e of await fs.readdir(path.join(dir, rel), { withFileTypes: true })) {
      const r = rel ? `${rel}/${e.name}` : e.name;
      if (e.isDirectory()) await walk(r);
      else if (e.isFile()) {
        const abs = path.join(dir, r);
        out.push({ path: r, mode: (await fs.lstat(abs)).mode, elf: await isElf(abs) });
      }
    }
  };
  await walk('');
  return out;
}

/**
 * `setfattr --restore` input setting `name` to `value` on each absolute path. Path bytes outside
 * printable ASCII, and the backslash, are written as `\ooo`, which setfattr unquotes. Pure.
 */
export function setfattrRestore(entries: readonly { file: string; name: string; value: Buffer }[]): Buffer {
  const quote = (p: string): string => {
    let s = '';
    for (const b of Buffer.from(p)) s += b <= 0x20 || b >= 0x7f || b === 0x5c ? `\\${b.toString(8).padStart(3, '0')}` : String.fromCharCode(b);
    return s;
  };
  return Buffer.from(entries.map((e) => `# file: ${quote(e.file)}\n${e.name}=0x${e.value.toString('hex')}\n\n`).join(''));
}

/**
 * Sign `imaTargets` of `dir` in place. `dir` must be a private copy: an xattr set here lands on the
 * inode, which a hard link to the operator's tree would share. Returns the signed paths.
 */
export async function signTree(dir: string, signer: ImaSigner): Promise<string[]> {
  const targets = imaTargets(await listTree(dir));
  const entries: { file: string; name: string; value: Buffer }[] = [];
  for (const t of targets) {
    const file = path.join(dir, t);
    entries.push({ file, name: IMA_XATTR, value: await signFile(file, signer) });
  }
  if (entries.length === 0) return targets;
  const tmp = await makeTempDir('lamadist-ima-');
  try {
    const script = path.join(tmp.dir, 'restore');
    await fs.writeFile(script, setfattrRestore(entries));
    await run('setfattr', [`--restore=${script}`], { userErrorCode: 'LAMA_E_IMA_SIGN' });
  } finally {
    await tmp.remove();
  }
  return targets;
}

/** Whether an IMA policy has an appraise rule (comments and blank lines aside). Pure. */
export function policyAppraises(text: string): boolean {
  return text.split('\n').some((l) => /^\s*appraise\s/.test(l));
}

async function readIfFile(file: string): Promise<Buffer | undefined> {
  try {
    return await fs.readFile(file);
  } catch (err) {
    if (isErrno(err, 'ENOENT') || isErrno(err, 'ENOTDIR') || isErrno(err, 'EISDIR')) return undefined;
    throw err;
  }
}

/**
 * Refuse a root tree that would not run once booted: one whose IMA policy appraises code, built
 * without a signer, and one that carries an IMA certificate other than the signer's.
 */
export async function checkTreeIma(tree: string, signer?: ImaSigner): Promise<void> {
  const policyFile = path.join(tree, IMA_POLICY_PATH);
  const policy = await readIfFile(policyFile);
  if (!signer) {
    if (policy && policyAppraises(policy.toString('utf8')))
      throw new UserError('LAMA_E_IMA_UNSIGNED', `the tree's IMA policy appraises code, so an unsigned image would run nothing: give --ima-key`, { where: policyFile });
    return;
  }
  const certFile = path.join(tree, IMA_CERT_PATH);
  const cert = await readIfFile(certFile);
  if (cert && !cert.equals(signer.certDer))
    throw new UserError('LAMA_E_IMA_KEY', `the tree carries another IMA certificate than ${signer.certFile}: the device could not verify the signatures`, { where: certFile });
}

/** Put the signer's certificate (DER, 0644) into the private copy `dir` where lamadist-init loads it. */
export async function installImaCert(dir: string, signer: ImaSigner): Promise<void> {
  const file = path.join(dir, IMA_CERT_PATH);
  await fs.mkdir(path.dirname(file), { recursive: true, mode: 0o755 });
  await fs.writeFile(file, signer.certDer, { mode: 0o644 });
  await fs.chmod(file, 0o644);
}
