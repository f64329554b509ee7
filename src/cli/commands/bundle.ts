import type { Command } from 'commander';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { getBsp } from '../../bsp/index.js';
import { UserError } from '../../errors.js';
import { loadInventory } from '../../host/index.js';
import { keyPath } from '../../keys/index.js';
import { systemConfClasses } from '../../release/index.js';
import {
  createBundle,
  encryptBundle,
  extractBundle,
  inspectBundle,
  parseManifest,
  type BundleImageInput,
  type BundleInfo,
  type CreatedBundle,
  type EncryptedBundle,
} from '../../rauc/index.js';
import { readUserFile } from '../../util/fsx.js';
import { act, collect } from '../action.js';
import type { Context } from '../context.js';


/** Options of `lamadist bundle create`. */
export interface CreateCliOptions {
  output: string;
  bsp?: string;
  compatible?: string;
  version?: string;
  build?: string;
  description?: string;
  rootfs?: string;
  verity?: string;
  efi?: string;
  image?: string[];
  manifest?: string;
  hooks?: string;
  hook?: string[];
  adaptive?: boolean;
  format?: string;
  to?: string[];
  toHosts?: string;
  cert?: string;
  key?: string;
  keys?: string;
  intermediate?: string[];
  signingTime?: string;
  force?: boolean;
}

/** Parse --signing-time (ISO 8601 or seconds since the epoch); default SOURCE_DATE_EPOCH, else now. */
export function parseSigningTime(value: string | undefined, env: NodeJS.ProcessEnv = process.env): Date {
  const v = value ?? env.SOURCE_DATE_EPOCH;
  if (v === undefined || v === '') return new Date(Math.floor(Date.now() / 1000) * 1000);
  const d = /^\d+$/.test(v) ? new Date(Number(v) * 1000) : new Date(v);
  if (Number.isNaN(d.getTime())) throw new UserError('LAMA_E_BAD_TIME', `signing time '${v}' is neither ISO 8601 nor seconds since the epoch`);
  return d;
}

async function signerFrom(o: { cert?: string; key?: string; keys?: string; intermediate?: string[] }): Promise<{ certPem: string; keyPem: string; chainPems: string[] }> {
  let cert = o.cert;
  let key = o.key;
  if (o.keys && (!cert || !key)) {
    cert ??= await keyPath(o.keys, 'rauc-signing-cert');
    key ??= await keyPath(o.keys, 'rauc-signing-key');
  }
  if (!cert || !key) throw new UserError('LAMA_E_BUNDLE_INPUT', 'signing needs --cert and --key, or --keys DIR from `lamadist keys init`');
  return {
    certPem: (await readUserFile(cert, 'signing certificate')).toString('utf8'),
    keyPem: (await readUserFile(key, 'signing key')).toString('utf8'),
    chainPems: await Promise.all((o.intermediate ?? []).map(async (f) => (await readUserFile(f, 'intermediate certificate')).toString('utf8'))),
  };
}

/** Recipient certificate files: --to files plus, with --to-hosts, every inventory host's device cert. */
async function recipientFiles(o: { to?: string[]; toHosts?: string; keys?: string }): Promise<string[]> {
  const files = [...(o.to ?? [])];
  if (o.toHosts) {
    if (!o.keys) throw new UserError('LAMA_E_BUNDLE_INPUT', '--to-hosts needs --keys DIR holding the device certificates (`lamadist keys device NAME`)');
    const inv = await loadInventory(o.toHosts);
    for (const h of inv.hosts) files.push(await keyPath(o.keys, 'device-cert', h.name));
  }
  return files;
}

async function isBlockSized(file: string): Promise<boolean> {
  try {
    const st = await fs.stat(file);
    return st.size > 0 && st.size % 4096 === 0;
  } catch {
    return false;
  }
}

function parseHookList(hooks: string[] | undefined): { installCheck: boolean; perClass: Map<string, ('pre-install' | 'install' | 'post-install')[]> } {
  const perClass = new Map<string, ('pre-install' | 'install' | 'post-install')[]>();
  let installCheck = false;
  for (const h of hooks ?? []) {
    if (h === 'install-check') {
      installCheck = true;
      continue;
    }
    const m = /^([A-Za-z0-9_-]+):(pre-install|install|post-install)$/.exec(h);
    if (!m?.[1] || !m[2]) throw new UserError('LAMA_E_BUNDLE_INPUT', `hook '${h}' must be install-check or CLASS:pre-install|install|post-install`);
    perClass.set(m[1], [...(perClass.get(m[1]) ?? []), m[2] as 'pre-install' | 'install' | 'post-install']);
  }
  return { installCheck, perClass };
}

/** `lamadist bundle create`: a signed verity (or crypt) bundle from build outputs or a manifest. */
export async function bundleCreate(ctx: Context, o: CreateCliOptions): Promise<CreatedBundle> {
  const bsp = o.bsp ? getBsp(o.bsp) : undefined;
  const slotClasses = bsp ? await systemConfClasses(bsp.raucFamily) : undefined;
  const hooks = parseHookList(o.hook);
  const images: BundleImageInput[] = [];
  let compatible = o.compatible ?? bsp?.compatible;
  let version = o.version;
  let build = o.build;
  let description = o.description;
  let installCheck = hooks.installCheck;
  if (o.manifest) {
    const text = (await readUserFile(o.manifest, 'manifest')).toString('utf8');
    const m = parseManifest(text, o.manifest);
    compatible ??= m.compatible;
    version ??= m.version;
    build ??= m.build;
    description ??= m.description;
    installCheck ||= Boolean(m.installCheck);
    const base = path.dirname(o.manifest);
    for (const i of m.images) {
      images.push({ slotClass: i.slotClass, path: path.join(base, i.filename), filename: i.filename, ...(i.adaptive?.includes('block-hash-index') && { adaptive: true }), ...(i.hooks && { hooks: i.hooks }) });
    }
  }
  const named: [string, string | undefined][] = [['rootfs', o.rootfs], ['verity', o.verity], ['efi', o.efi]];
  const extra = (o.image ?? []).map((spec): [string, string] => {
    const eq = spec.indexOf('=');
    if (eq <= 0) throw new UserError('LAMA_E_BUNDLE_INPUT', `--image '${spec}' must be CLASS=PATH`);
    return [spec.slice(0, eq), spec.slice(eq + 1)];
  });
  for (const [slotClass, file] of [...named, ...extra]) {
    if (!file) continue;
    // Block images (rootfs, hash tree) get a block-hash-index; the UKI is a file on the vfat ESP.
    const adaptive = o.adaptive !== false && slotClass !== 'efi' && (await isBlockSized(file));
    images.push({ slotClass, path: file, ...(adaptive && { adaptive: true }) });
  }
  for (const img of images) {
    const h = hooks.perClass.get(img.slotClass);
    if (h) img.hooks = [...new Set([...(img.hooks ?? []), ...h])];
  }
  if (!compatible) throw new UserError('LAMA_E_BUNDLE_INPUT', 'no compatible: give --bsp, --compatible or a --manifest with [update] compatible');
  if (!version) throw new UserError('LAMA_E_BUNDLE_INPUT', 'no version: give --version or a --manifest with [update] version');
  const format = o.format ?? 'verity';
  if (format !== 'verity' && format !== 'crypt') throw new UserError('LAMA_E_BUNDLE_INPUT', `--format must be verity or crypt, got '${format}'`);
  const recipients = await recipientFiles(o);
  if (recipients.length > 0 && format !== 'crypt') throw new UserError('LAMA_E_BUNDLE_INPUT', '--to/--to-hosts need --format crypt');
  const signer = await signerFrom(o);
  const recipientPems = await Promise.all(recipients.map(async (f) => (await readUserFile(f, 'recipient certificate')).toString('utf8')));
  const bar = ctx.progress('bundle', 5);
  let n = 0;
  const created = await createBundle({
    out: o.output,
    compatible,
    version,
    ...(build !== undefined && { build }),
    ...(description !== undefined && { description }),
    images,
    ...(slotClasses && { slotClasses }),
    ...(o.hooks && { hookScript: o.hooks }),
    installCheck,
    format,
    signer,
    signingTime: parseSigningTime(o.signingTime),
    ...(process.env.SOURCE_DATE_EPOCH && { contentTime: parseSigningTime(undefined) }),
    ...(recipientPems.length > 0 && { recipients: recipientPems }),
    force: o.force ?? false,
    onStep: (s) => {
      bar.update(n++, 5, s);
      ctx.detail(s);
    },
  });
  bar.finish();
  ctx.result(created, () =>
    [
      `${ctx.c.green('created')} ${created.path} (${created.format}, ${created.size} bytes)`,
      `  compatible ${created.manifest.compatible}, version ${created.manifest.version ?? ''}`,
      `  verity hash ${created.verityHash}`,
      ...created.manifest.images.map((i) => `  [${i.slotClass}] ${i.filename} ${i.size} bytes sha256 ${i.sha256}${i.adaptive ? ` adaptive=${i.adaptive.join(',')}` : ''}`),
    ].join('\n'),
  );
  return created;
}

/** Options of `lamadist bundle encrypt`. */
export interface EncryptCliOptions {
  output: string;
  to?: string[];
  toHosts?: string;
  keys?: string;
  key?: string;
  cert?: string;
  keyring?: string;
  force?: boolean;
}

/** `lamadist bundle encrypt`: envelope a crypt bundle's signature for device certificates. */
export async function bundleEncrypt(ctx: Context, bundle: string, o: EncryptCliOptions): Promise<EncryptedBundle> {
  const recipients = await recipientFiles(o);
  if (recipients.length === 0) throw new UserError('LAMA_E_BUNDLE_NO_RECIPIENTS', 'give at least one --to CERT or --to-hosts INVENTORY');
  const r = await encryptBundle(bundle, o.output, recipients, {
    ...(o.key && { deviceKey: o.key }),
    ...(o.cert && { deviceCert: o.cert }),
    ...(o.keyring && { keyring: o.keyring }),
    force: o.force ?? false,
  });
  ctx.result(r, () => `${ctx.c.green('encrypted')} ${r.path} for ${r.recipients.length} recipient(s)`);
  return r;
}

/** Options of `lamadist bundle inspect|verify|extract`. */
export interface InspectCliOptions {
  keyring?: string;
  key?: string;
  cert?: string;
  compatible?: string;
  bsp?: string;
  payload?: boolean;
  useSigningTime?: boolean;
  casyncStore?: string;
}

function inspectOptions(o: InspectCliOptions, requireKeyring: boolean): Parameters<typeof inspectBundle>[1] {
  if (requireKeyring && !o.keyring) throw new UserError('LAMA_E_BUNDLE_INPUT', 'verifying needs --keyring CA.pem');
  const compatible = o.compatible ?? (o.bsp ? getBsp(o.bsp).compatible : undefined);
  return {
    ...(o.keyring && { keyring: o.keyring }),
    ...(o.key && { deviceKey: o.key }),
    ...(o.cert && { deviceCert: o.cert }),
    ...(compatible && { compatible }),
    ...(o.payload === false && { verifyPayload: false }),
    ...(o.useSigningTime && { useSigningTime: true }),
    ...(o.casyncStore && { casyncStore: o.casyncStore }),
  };
}

/** Human rendering close to `rauc info`. */
export function describeBundle(ctx: Context, i: BundleInfo): string {
  const b = ctx.c.bold;
  const lines = [
    `${b('Compatible:')}   ${i.manifest.compatible}`,
    `${b('Version:')}      ${i.manifest.version ?? '-'}`,
    `${b('Build:')}        ${i.manifest.build ?? '-'}`,
    `${b('Format:')}       ${i.format}${i.encrypted ? ' (encrypted)' : ''}`,
    `${b('Verity hash:')}  ${i.manifest.verityHash ?? '-'}`,
    `${b('Verity salt:')}  ${i.manifest.veritySalt ?? '-'}`,
    `${b('Verity size:')}  ${i.manifest.veritySize ?? '-'}`,
    `${b('Hooks:')}        ${i.manifest.hooks.join(', ') || '-'}`,
    `${b('Sizes:')}        payload ${i.sizes.payload}, hash tree ${i.sizes.hashTree}, signature ${i.sizes.signature}, file ${i.sizes.file}`,
    '',
    `${i.manifest.images.length} image(s):`,
    ...i.manifest.images.flatMap((m) => [
      `  [${m.slotClass}] ${m.filename}`,
      `    sha256 ${m.sha256}  size ${m.size}${m.adaptive ? `  adaptive ${m.adaptive.join(',')}` : ''}${m.hooks ? `  hooks ${m.hooks.join(',')}` : ''}`,
      ...(m.casync ? [`    casync ${m.casync.kind}${m.casync.chunks !== undefined ? `: ${m.casync.chunks} chunks (${m.casync.chunkDigest}), ${m.casync.indexSize} bytes${m.casync.rebuilt ? ', rebuilt from the chunk store' : ''}` : ''}`] : []),
    ]),
    '',
    i.verified ? 'Certificate chain:' : `Signer (${ctx.c.yellow('NOT verified: no --keyring')}):`,
    ...(i.verified ? i.chain : i.signer ? [i.signer] : []).flatMap((c, n) => [`  ${n} Subject: ${c.subject}`, `    Issuer: ${c.issuer}`, `    SPKI sha256: ${c.spkiSha256}`, `    Valid: ${c.notBefore} .. ${c.notAfter}`]),
    ...(i.recipients ? ['', `${i.recipients.length} recipient(s):`, ...i.recipients.map((r) => `  serial ${r.serial} issuer ${r.issuer} (${r.keyEncryption})`)] : []),
  ];
  if (i.verified) lines.push('', ctx.c.green(`signature verified${i.payloadVerified ? `, payload and ${i.unchecked.length ? 'casync indexes' : 'images'} verified` : ''}`));
  if (i.payloadVerified) lines.push(...i.unchecked.map((u) => ctx.c.yellow(`not checked: ${u}`)));
  return lines.join('\n');
}

/** `lamadist bundle inspect`: print manifest, signer chain and format; verify when --keyring is given. */
export async function bundleInspect(ctx: Context, bundle: string, o: InspectCliOptions): Promise<BundleInfo> {
  const info = await inspectBundle(bundle, inspectOptions(o, false));
  if (!info.verified) ctx.warn('no --keyring given: showing what the bundle claims, nothing is verified');
  ctx.result(info, () => describeBundle(ctx, info));
  return info;
}

/** `lamadist bundle verify`: signature, signer chain, dm-verity tree and image hashes; exit 2 on any failure. */
export async function bundleVerify(ctx: Context, bundle: string, o: InspectCliOptions): Promise<BundleInfo> {
  const info = await inspectBundle(bundle, { ...inspectOptions(o, true), verifyPayload: true });
  ctx.result(info, () =>
    [
      `${ctx.c.green('OK')} ${bundle}: ${info.format} bundle for ${info.manifest.compatible} ${info.manifest.version ?? ''}, signed by ${info.signer?.subject ?? '?'}`,
      ...info.unchecked.map((u) => ctx.c.yellow(`  not checked: ${u}`)),
    ].join('\n'),
  );
  return info;
}

/** `lamadist bundle extract`: verify, then unpack the payload into a new directory. */
export async function bundleExtract(ctx: Context, bundle: string, dir: string, o: InspectCliOptions): Promise<BundleInfo> {
  const opts = inspectOptions(o, true);
  const info = await extractBundle(bundle, dir, { ...opts, keyring: o.keyring as string });
  ctx.result(info, () => `${ctx.c.green('extracted')} ${bundle} into ${dir}`);
  return info;
}

function inspectFlags(cmd: Command): Command {
  return cmd
    .option('--keyring <ca.pem>', 'CA certificate(s) the signer must chain to')
    .option('--key <device.key>', 'device private key (RSA or EC) to open an encrypted crypt bundle')
    .option('--cert <device.crt>', 'device certificate (selects the recipient entry)')
    .option('--compatible <string>', 'refuse a bundle for another compatible')
    .option('--bsp <name>', 'refuse a bundle not for this BSP')
    .option('--use-signing-time', 'check certificate validity at the signing time (RAUC use-bundle-signing-time)')
    .option('--casync-store <dir>', 'casync bundle: chunk store to rebuild and hash its blob images from');
}

export function configure(cmd: Command): void {
  cmd
    .command('create')
    .description('create a signed RAUC bundle (verity format; crypt with --format crypt)')
    .requiredOption('-o, --output <file>', 'bundle to write (.raucb)')
    .option('--bsp <name>', 'target BSP: sets compatible and the allowed slot classes')
    .option('--compatible <string>', 'RAUC compatible (overrides --bsp)')
    .option('--version <version>', 'update version')
    .option('--build <id>', 'build identifier')
    .option('--description <text>', 'update description')
    .option('--rootfs <image>', 'root filesystem image (slot class rootfs)')
    .option('--verity <image>', 'dm-verity hash image of the root filesystem (slot class verity)')
    .option('--efi <uki>', 'signed UKI (slot class efi)')
    .option('--image <class=path>', 'another image for a slot class (repeatable)', collect)
    .option('--manifest <manifest.raucm>', 'hand-written RAUC manifest; images are found next to it')
    .option('--hooks <script>', 'hook script to include')
    .option('--hook <hook>', 'install-check or CLASS:pre-install|install|post-install (repeatable)', collect)
    .option('--no-adaptive', 'no block-hash-index for block images')
    .option('--format <format>', 'verity or crypt', 'verity')
    .option('--to <cert>', 'crypt: encrypt for this device certificate (repeatable)', collect)
    .option('--to-hosts <inventory>', 'crypt: encrypt for every host of the inventory (needs --keys)')
    .option('--cert <pem>', 'signing certificate')
    .option('--key <pem>', 'signing key')
    .option('--keys <dir>', 'key directory from `lamadist keys init`')
    .option('--intermediate <pem>', 'intermediate CA certificate to embed (repeatable)', collect)
    .option('--signing-time <time>', 'ISO 8601 or epoch seconds (default SOURCE_DATE_EPOCH, else now); payload timestamps are SOURCE_DATE_EPOCH or 0')
    .option('--force', 'replace an existing output')
    .action(act<CreateCliOptions>(async (ctx, _a, o) => void (await bundleCreate(ctx, o))));
  cmd
    .command('encrypt <bundle>')
    .description('encrypt a crypt bundle for device certificates (rewrites only the signature)')
    .requiredOption('-o, --output <file>', 'encrypted bundle to write (may equal the input with --force)')
    .option('--to <cert>', 'recipient device certificate, RSA or EC (repeatable)', collect)
    .option('--to-hosts <inventory>', 'every host of the inventory (needs --keys)')
    .option('--keys <dir>', 'key directory holding device certificates')
    .option('--key <device.key>', 're-encrypt an already encrypted bundle: key of one current recipient')
    .option('--cert <device.crt>', 'certificate of that recipient')
    .option('--keyring <ca.pem>', 'verify the signature before encrypting')
    .option('--force', 'replace an existing output')
    .action(act<EncryptCliOptions>(async (ctx, a, o) => void (await bundleEncrypt(ctx, a[0] as string, o))));
  inspectFlags(cmd.command('inspect <bundle>').description('show manifest, signer chain and format; verify with --keyring'))
    .option('--no-payload', 'with --keyring: check only the signature, not the payload')
    .action(act<InspectCliOptions>(async (ctx, a, o) => void (await bundleInspect(ctx, a[0] as string, o))));
  inspectFlags(cmd.command('verify <bundle>').description('verify signature, signer chain, dm-verity tree and image hashes'))
    .action(act<InspectCliOptions>(async (ctx, a, o) => void (await bundleVerify(ctx, a[0] as string, o))));
  inspectFlags(cmd.command('extract <bundle> <dir>').description('verify a bundle and unpack its payload (like rauc extract)'))
    .action(act<InspectCliOptions>(async (ctx, a, o) => void (await bundleExtract(ctx, a[0] as string, a[1] as string, o))));
}
