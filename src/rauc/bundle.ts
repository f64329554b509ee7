import { createHash, randomBytes } from 'node:crypto';
import { constants, promises as fs } from 'node:fs';
import type { FileHandle } from 'node:fs/promises';
import path from 'node:path';
import { UserError, isErrno } from '../errors.js';
import { AtomicFile, makeTempDir, readUserFile, withAtomicFile } from '../util/fsx.js';
import { onCleanup } from '../util/cleanup.js';
import { run } from '../util/proc.js';
import { formatVerity, verifyVerity } from '../verity/index.js';
import { decryptEnvelope, detachedDigestName, envelope, isDetached, recipientsOf, signEmbedded, signerSummary, unverifiedContent, verifyDetached, verifyEmbedded, type CertSummary, type SignerMaterial } from './cms.js';
import { casyncKind, parseCasyncIndex, type CasyncIndex } from './casync.js';
import { readLayout, type BundleLayout } from './layout.js';
import { parseManifest, renderManifest, type ImageHook, type Manifest, type ManifestImage } from './manifest.js';
import { ALIGNED_SQUASHFS_ARGS, BLOCK, alignPayload, cryptInPlace, digestImage, digestPrefix, makeSquashfs, type AlignedPayload } from './payload.js';

/** One image to put into a bundle. */
export interface BundleImageInput {
  slotClass: string;
  /** The image file on the build host. */
  path: string;
  /** Name inside the bundle; default: basename of `path`. */
  filename?: string;
  /** Generate a block-hash-index and mark the image `adaptive=block-hash-index`. */
  adaptive?: boolean;
  hooks?: ImageHook[];
}

/** Everything `createBundle` needs. */
export interface CreateBundleOptions {
  out: string;
  compatible: string;
  version: string;
  build?: string;
  description?: string;
  images: BundleImageInput[];
  /** Slot classes the target's system.conf defines; images for other classes are refused. */
  slotClasses?: readonly string[];
  /**
   * Further files for the payload, beside the images (`name` is a relative path such as
   * `hosts/<machine-id>/uki-a.map`). The signed verity tree covers them like every payload byte;
   * hooks read them from the mounted bundle, and a streaming device fetches only what it reads.
   */
  payloadFiles?: { name: string; from: string }[];
  /** Bundle hook script (copied as `hook.sh`) and whether it implements install-check. */
  hookScript?: string;
  installCheck?: boolean;
  format?: 'verity' | 'crypt';
  signer: SignerMaterial;
  /** Signing time (the only thing that differs between two runs over the same inputs). Default: now. */
  signingTime?: Date;
  /** Every timestamp inside the squashfs payload. Default: the epoch, so the payload depends only on content. */
  contentTime?: Date;
  /** dm-verity salt; default: derived from the manifest so identical inputs give identical bundles. */
  salt?: Buffer;
  /**
   * squashfs block size (mksquashfs -b; default its 128 KiB). A streamed install fetches whole
   * squashfs blocks, so a bundle read a few blocks at a time wants small ones.
   */
  squashfsBlockSize?: number;
  /**
   * Store the payload uncompressed with every image starting on a 4 KiB boundary of the bundle
   * (`alignPayload`), so a streaming device reads exactly the blocks it lacks. Costs the squashfs
   * compression: images should arrive compressed already (EROFS lz4hc, compressed kernels).
   */
  alignImages?: boolean;
  /** Crypt bundles: envelope the signature for these recipient certificates (PEM texts) right away. */
  recipients?: string[];
  force?: boolean;
  onStep?: (step: string) => void;
}

/** What `createBundle` reports. */
export interface CreatedBundle {
  path: string;
  size: number;
  format: 'verity' | 'crypt';
  payloadSize: number;
  verityHash: string;
  veritySalt: string;
  veritySize: number;
  /** The signed manifest as stored in the CMS, without the crypt key of a crypt bundle. */
  manifest: Manifest;
  signatureSize: number;
}

const HOOK_NAME = 'hook.sh';

/** Validate the inputs and compute the manifest skeleton (pure). */
export function planBundle(o: Omit<CreateBundleOptions, 'signer' | 'out'>): { manifest: Manifest; files: { name: string; from: string }[] } {
  if (!o.compatible) throw new UserError('LAMA_E_BUNDLE_INPUT', 'compatible must not be empty');
  if (!o.version) throw new UserError('LAMA_E_BUNDLE_INPUT', 'version must not be empty');
  if (o.images.length === 0) throw new UserError('LAMA_E_BUNDLE_INPUT', 'a bundle needs at least one image');
  const files: { name: string; from: string }[] = [];
  const seenClass = new Set<string>();
  const images: ManifestImage[] = o.images.map((i) => {
    if (!/^[A-Za-z0-9_-]+$/.test(i.slotClass)) throw new UserError('LAMA_E_BUNDLE_INPUT', `invalid slot class '${i.slotClass}'`);
    if (o.slotClasses && !o.slotClasses.includes(i.slotClass)) {
      throw new UserError('LAMA_E_BUNDLE_INPUT', `slot class '${i.slotClass}' is not defined by the target's system.conf (${o.slotClasses.join(', ')})`);
    }
    if (seenClass.has(i.slotClass)) throw new UserError('LAMA_E_BUNDLE_INPUT', `two images for slot class '${i.slotClass}'`);
    seenClass.add(i.slotClass);
    const name = i.filename ?? path.basename(i.path);
    if (!/^[A-Za-z0-9][A-Za-z0-9._+-]*$/.test(name) || name === 'manifest.raucm' || name === HOOK_NAME || name.endsWith('.block-hash-index')) {
      throw new UserError('LAMA_E_BUNDLE_INPUT', `image file name '${name}' is not allowed in a bundle`);
    }
    if (files.some((f) => f.name === name)) throw new UserError('LAMA_E_BUNDLE_INPUT', `two images named '${name}'`);
    files.push({ name, from: i.path });
    return { slotClass: i.slotClass, filename: name, ...(i.hooks?.length && { hooks: i.hooks }), ...(i.adaptive && { adaptive: ['block-hash-index'] }) };
  });
  if (o.hookScript) files.push({ name: HOOK_NAME, from: o.hookScript });
  for (const f of o.payloadFiles ?? []) {
    const parts = f.name.split('/');
    if (parts.length < 2 || !parts.every((p) => /^[A-Za-z0-9][A-Za-z0-9._+-]*$/.test(p))) {
      throw new UserError('LAMA_E_BUNDLE_INPUT', `payload file '${f.name}' must be a relative path inside a directory of the bundle`);
    }
    if (files.some((x) => x.name === f.name || x.name === parts[0])) throw new UserError('LAMA_E_BUNDLE_INPUT', `payload file '${f.name}' collides with another file of the bundle`);
    files.push(f);
  }
  const needsHookScript = o.installCheck || o.images.some((i) => i.hooks?.length);
  if (needsHookScript && !o.hookScript) throw new UserError('LAMA_E_BUNDLE_INPUT', 'hooks were requested but no hook script was given');
  const manifest: Manifest = {
    compatible: o.compatible,
    version: o.version,
    ...(o.description !== undefined && { description: o.description }),
    ...(o.build !== undefined && { build: o.build }),
    format: o.format ?? 'verity',
    formatExplicit: true,
    ...(o.hookScript && { hookScript: HOOK_NAME }),
    ...(o.installCheck && { installCheck: true }),
    images,
  };
  return { manifest, files };
}

/** A temp directory inside `parent` (same filesystem as the output, so images can be hard-linked). */
async function tempDirIn(parent: string): Promise<{ dir: string; remove: () => Promise<void> }> {
  let dir: string;
  try {
    dir = await fs.mkdtemp(path.join(parent, '.lamadist-bundle-'));
  } catch (err) {
    if (isErrno(err, 'ENOENT')) throw new UserError('LAMA_E_NO_DIR', `output directory ${parent} does not exist`);
    throw err;
  }
  const remove = async (): Promise<void> => {
    unregister();
    await fs.rm(dir, { recursive: true, force: true });
  };
  const unregister = onCleanup(remove);
  return { dir, remove };
}

/** Create `rel` under `root`, each directory 0755 whatever the umask (squashfs records modes). */
async function mkdirs(root: string, rel: string): Promise<void> {
  let dir = root;
  for (const part of rel.split('/')) {
    dir = path.join(dir, part);
    await fs.mkdir(dir, { recursive: true });
    await fs.chmod(dir, 0o755);
  }
}

/**
 * Put `from` into the staging directory as `to` with `mode` (images 0644; the hook script 0755,
 * since RAUC executes it): a hard link when the file already has that mode, otherwise a copy.
 */
async function stage(from: string, to: string, mode = 0o644): Promise<void> {
  let st;
  try {
    st = await fs.stat(from);
  } catch (err) {
    if (isErrno(err, 'ENOENT')) throw new UserError('LAMA_E_NOT_FOUND', `image ${from} does not exist`);
    throw err;
  }
  if (!st.isFile()) throw new UserError('LAMA_E_BUNDLE_INPUT', `${from} is not a regular file`);
  // squashfs records the mode (-all-root fixes only owners), so link only files that already have it.
  if ((st.mode & 0o7777) === mode) {
    try {
      await fs.link(from, to);
      return;
    } catch (err) {
      if (!isErrno(err, 'EXDEV') && !isErrno(err, 'EPERM')) throw err;
    }
  }
  await fs.copyFile(from, to, constants.COPYFILE_FICLONE);
  await fs.chmod(to, mode);
}

/**
 * Create a signed bundle in RAUC's verity (or crypt) format: squashfs payload from mksquashfs, the
 * dm-verity tree appended without superblock, the manifest (with verity hash, salt and size) signed
 * as CMS SignedData with the manifest embedded, then the signature size as big-endian u64. The
 * output appears only when complete (temp file, fsync, rename).
 */
export async function createBundle(o: CreateBundleOptions): Promise<CreatedBundle> {
  const { manifest, files } = planBundle(o);
  const signingTime = o.signingTime ?? new Date();
  const step = o.onStep ?? ((): void => undefined);
  const outDir = path.dirname(path.resolve(o.out));
  const staging = await tempDirIn(outDir);
  // The payload directory is a subdirectory: the mksquashfs sort file must stay out of the payload.
  const content = path.join(staging.dir, 'payload');
  try {
    await mkdirs(staging.dir, 'payload');
    step('hashing images');
    for (const f of files) {
      const to = path.join(content, f.name);
      if (f.name.includes('/')) await mkdirs(content, path.dirname(f.name));
      await stage(f.from, to, f.name === HOOK_NAME ? 0o755 : 0o644);
    }
    for (const img of manifest.images) {
      const p = path.join(content, img.filename);
      const d = await digestImage(p, { blockIndex: Boolean(img.adaptive) });
      img.sha256 = d.sha256;
      img.size = d.size;
      if (d.blockHashIndex) {
        const idx = path.join(content, `${img.filename}.block-hash-index`);
        await fs.writeFile(idx, d.blockHashIndex, { mode: 0o644 });
        await fs.chmod(idx, 0o644);
      }
    }
    const inner = renderManifest(manifest);
    await fs.writeFile(path.join(content, 'manifest.raucm'), inner, { mode: 0o644 });
    await fs.chmod(path.join(content, 'manifest.raucm'), 0o644);
    const squashfsArgs = o.squashfsBlockSize ? ['-b', String(o.squashfsBlockSize)] : [];
    const aligned = o.alignImages ? alignPayload(manifest.images.map((i) => ({ name: i.filename, size: i.size ?? 0 }))) : undefined;
    if (aligned) {
      for (const pad of aligned.pads) await fs.writeFile(path.join(content, pad.name), Buffer.alloc(pad.size), { mode: 0o644 });
      const sortFile = path.join(staging.dir, 'payload.sort');
      await fs.writeFile(sortFile, aligned.sortFile);
      squashfsArgs.push(...ALIGNED_SQUASHFS_ARGS, '-sort', sortFile);
    }
    return await withAtomicFile(o.out, { force: o.force ?? false }, async (out) => {
      step('creating squashfs payload');
      await makeSquashfs(content, out.temp, (o.contentTime?.getTime() ?? 0) / 1000, squashfsArgs);
      if (aligned) await checkPlaced(out.fd, content, aligned.placed);
      await staging.remove();
      let payloadSize = (await out.fd.stat()).size;
      if (payloadSize % BLOCK !== 0) throw new Error(`mksquashfs produced ${payloadSize} bytes, not a multiple of ${BLOCK}`);
      if (payloadSize === BLOCK) {
        // A one-block payload has no hash tree, which RAUC cannot express (verity-size 0) and
        // `rauc bundle` refuses. squashfs ignores bytes past its recorded size, so pad one block.
        payloadSize += BLOCK;
        await out.fd.truncate(payloadSize);
      }
      const signed: Manifest = { ...manifest, images: manifest.images.map((i) => ({ ...i })) };
      if (signed.format === 'crypt') {
        step('encrypting payload');
        const key = randomBytes(32);
        await cryptInPlace(out.fd, payloadSize, key, true);
        signed.cryptKey = key.toString('hex');
      }
      await out.fd.sync();
      step('computing dm-verity hash tree');
      // RAUC picks a random salt; deriving it from the manifest (which fixes every payload byte)
      // keeps it unique per content while making identical inputs give identical bundles.
      const salt = o.salt ?? createHash('sha256').update('lamadist rauc bundle verity salt\0').update(inner).digest();
      const v = await formatVerity({ dataPath: out.temp, hashPath: out.temp, hashOffset: payloadSize, superblock: false, salt });
      signed.verityHash = v.rootHash.toString('hex');
      signed.veritySalt = salt.toString('hex');
      signed.veritySize = v.hashTreeBytes;
      step('signing manifest');
      const text = renderManifest(signed);
      let cms = signEmbedded(Buffer.from(text), o.signer, signingTime);
      if (o.recipients?.length) {
        if (signed.format !== 'crypt') throw new UserError('LAMA_E_BUNDLE_INPUT', 'only crypt bundles can be encrypted for recipients');
        cms = envelope(cms, o.recipients);
      }
      const end = payloadSize + v.hashTreeBytes;
      await writeSignature(out, end, cms);
      // The crypt key stays inside the signature: results end up in logs and --json output.
      const { cryptKey: _secret, ...publicManifest } = signed;
      return {
        path: out.final,
        size: end + cms.length + 8,
        format: signed.format as 'verity' | 'crypt',
        payloadSize,
        verityHash: signed.verityHash,
        veritySalt: signed.veritySalt,
        veritySize: v.hashTreeBytes,
        manifest: publicManifest,
        signatureSize: cms.length,
      };
    });
  } finally {
    await staging.remove();
  }
}

/**
 * mksquashfs has no option that promises a layout: check that each aligned image really begins
 * where the plan put it (its first block there), or the bundle would stream 25 % more than it says.
 */
async function checkPlaced(payload: FileHandle, content: string, placed: AlignedPayload['placed']): Promise<void> {
  for (const p of placed) {
    const n = Math.min(p.size, BLOCK);
    const want = Buffer.alloc(n);
    const got = Buffer.alloc(n);
    const img = await fs.open(path.join(content, p.name), 'r');
    try {
      await img.read(want, 0, n, 0);
    } finally {
      await img.close();
    }
    await payload.read(got, 0, n, p.offset);
    if (!got.equals(want)) throw new Error(`mksquashfs did not place ${p.name} at byte ${p.offset} of the payload as planned`);
  }
}

async function writeSignature(out: AtomicFile, at: number, cms: Buffer): Promise<void> {
  const trailer = Buffer.alloc(8);
  trailer.writeBigUInt64BE(BigInt(cms.length));
  const all = Buffer.concat([cms, trailer]);
  await out.fd.write(all, 0, all.length, at);
  await out.fd.truncate(at + all.length);
}

/** Options for `inspectBundle`. */
export interface InspectOptions {
  /** CA certificate(s) PEM file: verify the signature chain against it. Without it nothing is trusted. */
  keyring?: string;
  /** Device private key (PEM file) to open an encrypted crypt bundle. */
  deviceKey?: string;
  /** Device certificate (PEM file) selecting the recipient entry. */
  deviceCert?: string;
  /** Refuse a bundle whose manifest names another compatible. */
  compatible?: string;
  /** Also check the dm-verity tree over the payload and every image's SHA-256 (default: when a keyring is given). */
  verifyPayload?: boolean;
  /** Check certificate validity at the bundle's signing time, not now (RAUC's use-bundle-signing-time). */
  useSigningTime?: boolean;
  /**
   * casync bundles: the chunk store (`rauc convert` writes `<bundle>.castr`). With it every blob
   * image is rebuilt by `casync extract`, which checks each chunk's id, and its SHA-256 compared.
   */
  casyncStore?: string;
}

/** What `inspectBundle` reports. */
export interface BundleInfo {
  path: string;
  format: 'plain' | 'verity' | 'crypt';
  /** Crypt bundle whose signature is enveloped for recipients. */
  encrypted: boolean;
  manifest: {
    compatible: string;
    version?: string;
    build?: string;
    description?: string;
    verityHash?: string;
    veritySalt?: string;
    veritySize?: number;
    hooks: string[];
    images: {
      slotClass: string;
      filename: string;
      sha256: string;
      size: number;
      adaptive?: string[];
      hooks?: string[];
      /** casync bundles (`rauc convert`): the payload holds this index instead of the image. */
      casync?: { kind: 'caibx' | 'caidx'; chunks?: number; indexSize?: number; chunkDigest?: string; rebuilt?: boolean };
    }[];
  };
  signer: CertSummary | undefined;
  /** Signer first, keyring CA last (only when verified). */
  chain: CertSummary[];
  signingTime?: string;
  recipients?: { issuer: string; serial: string; keyEncryption: string }[];
  sizes: { file: number; payload: number; hashTree: number; signature: number };
  /** Signature checked against the keyring. */
  verified: boolean;
  /** dm-verity tree and image hashes checked. */
  payloadVerified: boolean;
  /** What a verified bundle still leaves unchecked: the images of a casync bundle live in its chunk store. */
  unchecked: string[];
}

async function openBundle(file: string): Promise<FileHandle> {
  try {
    const h = await fs.open(file, 'r');
    if (!(await h.stat()).isFile()) {
      await h.close();
      throw new UserError('LAMA_E_NOT_FOUND', `${file} is not a regular file`);
    }
    return h;
  } catch (err) {
    if (isErrno(err, 'ENOENT')) throw new UserError('LAMA_E_NOT_FOUND', `bundle ${file} does not exist`);
    if (isErrno(err, 'EISDIR')) throw new UserError('LAMA_E_NOT_FOUND', `bundle ${file} is a directory`);
    throw err;
  }
}

/** The SignedData of a bundle, decrypting the envelope with the device key when there is one. */
async function signedDataOf(layout: BundleLayout, file: string, o: Pick<InspectOptions, 'deviceKey' | 'deviceCert'>): Promise<Buffer> {
  if (layout.cms === 'signed') return layout.signature;
  if (!o.deviceKey) {
    throw new UserError('LAMA_E_BUNDLE_NEEDS_KEY', 'bundle is encrypted for its recipients; give the device key with --key', { where: file });
  }
  const keyPem = (await readUserFile(o.deviceKey, 'device key')).toString('utf8');
  const certPem = o.deviceCert ? (await readUserFile(o.deviceCert, 'device certificate')).toString('utf8') : undefined;
  try {
    return decryptEnvelope(layout.signature, keyPem, certPem);
  } catch (err) {
    located(err, file);
  }
}

function located(err: unknown, file: string): never {
  if (err instanceof UserError && err.where === undefined) throw new UserError(err.code, err.message, { where: file, cause: err });
  throw err;
}

/** A bundle read and checked up to (not including) its payload. */
interface OpenedBundle {
  layout: BundleLayout;
  signedData: Buffer;
  /** The signed manifest; includes the crypt key of a crypt bundle, so it never leaves this module. */
  manifest: Manifest;
  payload: number;
  chain: CertSummary[];
  signingTime?: Date;
  verified: boolean;
}

async function layoutOf(file: string): Promise<BundleLayout> {
  const h = await openBundle(file);
  try {
    return await readLayout(h, file);
  } finally {
    await h.close();
  }
}

/**
 * A plain bundle: the detached signature covers the whole squashfs and the manifest is the one
 * inside it (RAUC's original format; LamaDist devices refuse it, but we read what `rauc bundle`
 * makes by default).
 */
async function openPlain(file: string, layout: BundleLayout, sd: Buffer, o: InspectOptions): Promise<OpenedBundle> {
  let chain: CertSummary[] = [];
  let signingTime: Date | undefined;
  if (o.keyring) {
    const keyringPem = (await readUserFile(o.keyring, 'keyring')).toString('utf8');
    const digest = await digestPrefix(file, layout.signatureOffset, detachedDigestName(sd));
    try {
      ({ chain, signingTime } = verifyDetached(sd, keyringPem, digest, o.useSigningTime ?? false));
    } catch (err) {
      located(err, file);
    }
  }
  const r = await run('unsquashfs', ['-cat', file, 'manifest.raucm'], { allowFailure: true });
  if (r.code !== 0) throw new UserError('LAMA_E_BUNDLE_BAD_SIGNATURE', 'plain bundle payload holds no manifest.raucm', { where: file });
  const m = parseManifest(r.stdout, `${file}: manifest.raucm`);
  if (m.format !== 'plain') throw new UserError('LAMA_E_BUNDLE_BAD_SIGNATURE', `detached signature but the manifest says format '${m.format}'`, { where: file });
  return checked(file, { layout, signedData: sd, manifest: m, payload: layout.signatureOffset, chain, ...(signingTime && { signingTime }), verified: o.keyring !== undefined }, o);
}

async function openChecked(file: string, o: InspectOptions): Promise<OpenedBundle> {
  const layout = await layoutOf(file);
  const sd = await signedDataOf(layout, file, o);
  if (layout.cms === 'signed' && isDetached(sd)) return openPlain(file, layout, sd, o);
  let content: Buffer;
  let chain: CertSummary[] = [];
  let signingTime: Date | undefined;
  try {
    if (o.keyring) {
      const keyringPem = (await readUserFile(o.keyring, 'keyring')).toString('utf8');
      const v = verifyEmbedded(sd, keyringPem, o.useSigningTime ?? false);
      content = v.content;
      chain = v.chain;
      signingTime = v.signingTime;
    } else {
      content = unverifiedContent(sd);
    }
  } catch (err) {
    located(err, file);
  }
  const m = parseManifest(content.toString('utf8'), `${file}: signed manifest`);
  if (layout.cms === 'enveloped' && m.format !== 'crypt') {
    throw new UserError('LAMA_E_BUNDLE_BAD_SIGNATURE', `an encrypted signature must belong to a crypt bundle, manifest says '${m.format}'`, { where: file });
  }
  if (m.format === 'plain') {
    throw new UserError('LAMA_E_BUNDLE_BAD_SIGNATURE', 'an embedded manifest cannot be in plain format', { where: file });
  }
  if (layout.signatureOffset % BLOCK !== 0) {
    throw new UserError('LAMA_E_BUNDLE_TRAILER', `signature starts at byte ${layout.signatureOffset}, which is not 4 KiB aligned as a ${m.format} bundle's hash tree must end`, { where: file });
  }
  if (!m.verityHash || !m.veritySalt || !m.veritySize) {
    throw new UserError('LAMA_E_BUNDLE_BAD_SIGNATURE', `${m.format} manifest lacks verity-hash, verity-salt or verity-size`, { where: file });
  }
  const payload = layout.signatureOffset - m.veritySize;
  if (payload <= 0 || payload % BLOCK !== 0) {
    throw new UserError('LAMA_E_BUNDLE_TRUNCATED', `payload and hash tree end at byte ${layout.signatureOffset}, which cannot hold a ${m.veritySize}-byte hash tree`, { where: file });
  }
  return checked(file, { layout, signedData: sd, manifest: m, payload, chain, ...(signingTime && { signingTime }), verified: o.keyring !== undefined }, o);
}

/** Checks common to every format once the manifest is known. */
function checked(file: string, b: OpenedBundle, o: InspectOptions): OpenedBundle {
  const m = b.manifest;
  if (o.compatible !== undefined && m.compatible !== o.compatible) {
    throw new UserError('LAMA_E_BUNDLE_WRONG_COMPATIBLE', `bundle is for '${m.compatible}', expected '${o.compatible}'`, { where: file });
  }
  for (const img of m.images) {
    if (img.sha256 === undefined || img.size === undefined) {
      throw new UserError('LAMA_E_BUNDLE_BAD_SIGNATURE', `[image.${img.slotClass}] has no sha256 or size`, { where: file });
    }
  }
  return b;
}

/**
 * Read a bundle, and with `keyring` verify it: CMS signature and signer chain, then (unless
 * `verifyPayload` is false) the dm-verity tree over the payload and each image's SHA-256.
 * Failures are UserErrors located at the bundle: LAMA_E_BUNDLE_NOT_A_BUNDLE, _TRUNCATED, _TRAILER,
 * _BAD_SIGNATURE, _MANIFEST_TAMPERED, _UNTRUSTED_SIGNER, _PAYLOAD_TAMPERED / _HASH_TREE_TAMPERED
 * (with the byte offset), _IMAGE_TAMPERED, _WRONG_COMPATIBLE, _WRONG_DEVICE_KEY, _NEEDS_KEY.
 */
export async function inspectBundle(file: string, o: InspectOptions = {}): Promise<BundleInfo> {
  const b = await openChecked(file, o);
  const verifyPayload = o.verifyPayload ?? b.verified;
  let indexes = new Map<string, CheckedIndex>();
  if (verifyPayload) {
    // A plain bundle's payload was covered by the signature digest already.
    if (b.manifest.format !== 'plain') await checkVerity(file, b.payload, b.manifest);
    indexes = await checkImages(file, b.payload, b.manifest, o.casyncStore);
  }
  return describe(file, b, verifyPayload, indexes);
}

function describe(file: string, b: OpenedBundle, payloadVerified: boolean, indexes = new Map<string, CheckedIndex>()): BundleInfo {
  const m = b.manifest;
  const { layout, chain, signingTime } = b;
  const signer = chain[0] ?? signerSummary(b.signedData);
  return {
    path: file,
    format: m.format,
    encrypted: layout.cms === 'enveloped',
    manifest: {
      compatible: m.compatible,
      ...(m.version !== undefined && { version: m.version }),
      ...(m.build !== undefined && { build: m.build }),
      ...(m.description !== undefined && { description: m.description }),
      verityHash: m.verityHash,
      veritySalt: m.veritySalt,
      veritySize: m.veritySize,
      hooks: m.installCheck ? ['install-check'] : [],
      images: m.images.map((i) => ({
        slotClass: i.slotClass,
        filename: i.filename,
        sha256: i.sha256 as string,
        size: i.size as number,
        ...(i.adaptive && { adaptive: i.adaptive }),
        ...(i.hooks && { hooks: i.hooks }),
        ...casyncOf(i.filename, indexes.get(i.filename)),
      })),
    },
    signer,
    chain,
    ...(signingTime && { signingTime: signingTime.toISOString() }),
    ...(layout.cms === 'enveloped' && { recipients: recipientsOf(layout.signature) }),
    sizes: { file: layout.fileSize, payload: b.payload, hashTree: m.veritySize ?? 0, signature: layout.signatureSize },
    verified: b.verified,
    payloadVerified,
    unchecked: m.images.flatMap((i) => {
      const kind = casyncKind(i.filename);
      if (kind === 'caidx') return [`[${i.slotClass}] ${i.filename}: the image's sha256 and size are those of the tar archive, which casync does not rebuild (it rebuilds the directory tree)`];
      if (kind === 'caibx' && !indexes.get(i.filename)?.rebuilt) return [`[${i.slotClass}] ${i.filename}: the image's sha256 and the chunks need the casync chunk store (--casync-store)`];
      return [];
    }),
  };
}

function casyncOf(filename: string, idx: CheckedIndex | undefined): Pick<BundleInfo['manifest']['images'][number], 'casync'> {
  const kind = casyncKind(filename);
  if (!kind) return {};
  return { casync: { kind, ...(idx && { chunks: idx.chunks, indexSize: idx.size, chunkDigest: idx.chunkDigest, ...(idx.rebuilt && { rebuilt: true }) }) } };
}

async function checkVerity(file: string, payload: number, m: Manifest): Promise<void> {
  try {
    await verifyVerity({
      dataPath: file,
      hashPath: file,
      dataBlocks: payload / BLOCK,
      hashOffset: payload,
      superblock: false,
      salt: Buffer.from(m.veritySalt as string, 'hex'),
      rootHash: Buffer.from(m.verityHash as string, 'hex'),
    });
  } catch (err) {
    if (err instanceof UserError && err.code === 'LAMA_E_VERITY_MISMATCH') {
      const at = /byte offset (\d+)/.exec(err.message);
      const offset = at ? Number(at[1]) : undefined;
      const inTree = offset !== undefined && offset >= payload;
      throw new UserError(
        inTree ? 'LAMA_E_BUNDLE_HASH_TREE_TAMPERED' : 'LAMA_E_BUNDLE_PAYLOAD_TAMPERED',
        `${inTree ? 'hash tree' : 'payload'} tampered with: ${err.message}`,
        { where: offset !== undefined ? `${file}@${offset}` : file, cause: err },
      );
    }
    if (err instanceof UserError && err.code === 'LAMA_E_VERITY_TRUNCATED') {
      throw new UserError('LAMA_E_BUNDLE_TRUNCATED', err.message, { where: file, cause: err });
    }
    throw err;
  }
}

/**
 * Extract the payload's files into `dir` with unsquashfs (decrypting a crypt payload into a temp
 * copy first) and return the directory.
 */
async function unpack(file: string, payload: number, m: Manifest, dir: string, only?: string[]): Promise<void> {
  let source = file;
  let tmp: { dir: string; remove: () => Promise<void> } | undefined;
  try {
    if (m.format === 'crypt') {
      if (!m.cryptKey) throw new UserError('LAMA_E_BUNDLE_BAD_SIGNATURE', 'crypt manifest has no crypt-key', { where: file });
      tmp = await makeTempDir('lamadist-decrypt-');
      source = path.join(tmp.dir, 'payload.squashfs');
      await fs.copyFile(file, source, constants.COPYFILE_FICLONE);
      const h = await fs.open(source, 'r+');
      try {
        await h.truncate(payload);
        await cryptInPlace(h, payload, Buffer.from(m.cryptKey, 'hex'), false);
      } finally {
        await h.close();
      }
    }
    await run('unsquashfs', ['-no-progress', '-no-xattrs', '-f', '-d', dir, source, ...(only ?? [])], { userErrorCode: 'LAMA_E_BUNDLE_PAYLOAD_TAMPERED' });
  } finally {
    await tmp?.remove();
  }
}

/** A casync index as checked; `rebuilt` when the image was rebuilt from the chunk store and its hash compared. */
type CheckedIndex = CasyncIndex & { rebuilt?: boolean };

/**
 * Each image against its manifest hash. The index of a casync image is checked for structure and,
 * for a blob index, for the image size it describes: the manifest's sha256 is that of the image
 * in the chunk store, so a valid index never matches it. With the chunk store, blob images are
 * rebuilt and hashed as well.
 */
async function checkImages(file: string, payload: number, m: Manifest, store?: string): Promise<Map<string, CheckedIndex>> {
  if (store !== undefined && !(await fs.stat(store).catch(() => undefined))?.isDirectory()) {
    throw new UserError('LAMA_E_NOT_FOUND', `casync chunk store ${store} is not a directory`);
  }
  const tmp = await makeTempDir('lamadist-inspect-');
  const indexes = new Map<string, CheckedIndex>();
  try {
    const out = path.join(tmp.dir, 'x');
    await unpack(file, payload, m, out, m.images.map((i) => i.filename));
    for (const img of m.images) {
      const kind = casyncKind(img.filename);
      if (kind) {
        const idx = parseCasyncIndex(await readIndex(file, path.join(out, img.filename), img.filename), kind, `${file}: ${img.filename}`);
        if (kind === 'caibx' && idx.size !== img.size) {
          throw new UserError('LAMA_E_BUNDLE_CASYNC_INDEX', `casync index ${img.filename} describes a ${idx.size}-byte image, the manifest says ${img.size}`, { where: file });
        }
        const rebuilt = kind === 'caibx' && store !== undefined && (await checkRebuilt(file, path.join(out, img.filename), img, store, tmp.dir));
        indexes.set(img.filename, { ...idx, ...(rebuilt && { rebuilt }) });
        continue;
      }
      const d = await digestImage(path.join(out, img.filename)).catch((err: unknown) => {
        if (err instanceof UserError && err.code === 'LAMA_E_NOT_FOUND') {
          throw new UserError('LAMA_E_BUNDLE_IMAGE_TAMPERED', `image ${img.filename} named by the manifest is missing from the payload`, { where: file });
        }
        throw err;
      });
      if (d.sha256 !== img.sha256 || d.size !== img.size) {
        throw new UserError('LAMA_E_BUNDLE_IMAGE_TAMPERED', `image ${img.filename} does not match its manifest hash`, { where: file });
      }
    }
  } finally {
    await tmp.remove();
  }
  return indexes;
}

/** Rebuild a blob image from the chunk store with `casync extract` (which checks every chunk id) and compare its hash. */
async function checkRebuilt(file: string, index: string, img: ManifestImage, store: string, tmpDir: string): Promise<true> {
  const rebuilt = path.join(tmpDir, `rebuilt-${img.slotClass}`);
  try {
    const r = await run('casync', ['extract', `--store=${store}`, index, rebuilt], { allowFailure: true });
    if (r.code !== 0) {
      const why = r.stderr.trim().split('\n').pop() ?? `exit ${r.code}`;
      throw new UserError('LAMA_E_BUNDLE_CASYNC_STORE', `casync cannot rebuild ${img.filename} from the chunk store ${store}: ${why}`, { where: file });
    }
    const d = await digestImage(rebuilt);
    if (d.sha256 !== img.sha256 || d.size !== img.size) {
      throw new UserError('LAMA_E_BUNDLE_IMAGE_TAMPERED', `image rebuilt from ${img.filename} and the chunk store ${store} does not match its manifest hash`, { where: file });
    }
    return true;
  } finally {
    await fs.rm(rebuilt, { force: true });
  }
}

async function readIndex(file: string, p: string, name: string): Promise<Buffer> {
  try {
    return await fs.readFile(p);
  } catch (err) {
    if (isErrno(err, 'ENOENT')) throw new UserError('LAMA_E_BUNDLE_IMAGE_TAMPERED', `casync index ${name} named by the manifest is missing from the payload`, { where: file });
    throw err;
  }
}

/**
 * Verify a bundle against `keyring` (signature, verity tree) and extract its payload into `dir`
 * (which must not exist yet), like `rauc extract`.
 */
export async function extractBundle(file: string, dir: string, o: Omit<InspectOptions, 'verifyPayload'> & { keyring: string }): Promise<BundleInfo> {
  try {
    await fs.access(dir);
    throw new UserError('LAMA_E_EXISTS', `${dir} already exists`);
  } catch (err) {
    if (!isErrno(err, 'ENOENT')) throw err;
  }
  const b = await openChecked(file, o);
  if (b.manifest.format !== 'plain') await checkVerity(file, b.payload, b.manifest);
  await unpack(file, b.payload, b.manifest, dir);
  return describe(file, b, true);
}

/** What `encryptBundle` reports. */
export interface EncryptedBundle {
  path: string;
  size: number;
  signatureSize: number;
  recipients: { issuer: string; serial: string; keyEncryption: string }[];
}

/**
 * Encrypt a crypt bundle's signature for `recipients` (PEM certificate files): only the CMS and the
 * size trailer change, payload and hash tree are copied as they are. An already encrypted bundle is
 * re-encrypted for a new set of devices when `deviceKey` (one of its current recipients) is given.
 */
export async function encryptBundle(
  input: string,
  out: string,
  recipients: string[],
  o: { deviceKey?: string; deviceCert?: string; keyring?: string; force?: boolean } = {},
): Promise<EncryptedBundle> {
  const layout = await layoutOf(input);
  const sd = await signedDataOf(layout, input, o);
  const keyringPem = o.keyring ? (await readUserFile(o.keyring, 'keyring')).toString('utf8') : undefined;
  let content: Buffer;
  try {
    content = keyringPem ? verifyEmbedded(sd, keyringPem).content : unverifiedContent(sd);
  } catch (err) {
    located(err, input);
  }
  const m = parseManifest(content.toString('utf8'), `${input}: signed manifest`);
  if (m.format !== 'crypt') {
    throw new UserError('LAMA_E_BUNDLE_FORMAT', `only crypt bundles can be encrypted; ${input} is in '${m.format}' format (create it with --format crypt)`, { where: input });
  }
  const pems = await Promise.all(recipients.map(async (r) => (await readUserFile(r, 'recipient certificate')).toString('utf8')));
  const cms = envelope(sd, pems);
  await withAtomicFile(out, { force: o.force ?? false }, async (f) => {
    await fs.copyFile(input, f.temp, constants.COPYFILE_FICLONE);
    await writeSignature(f, layout.signatureOffset, cms);
  });
  return { path: path.resolve(out), size: layout.signatureOffset + cms.length + 8, signatureSize: cms.length, recipients: recipientsOf(cms) };
}
