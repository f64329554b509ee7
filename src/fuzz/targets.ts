import { createHash } from 'node:crypto';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { Writable } from 'node:stream';
import { bundleExtract, bundleInspect } from '../cli/commands/bundle.js';
import { gptShow } from '../cli/commands/gpt.js';
import { hostAdd, hostList, hostShow } from '../cli/commands/host.js';
import { recoveryKey } from '../cli/commands/recovery-key.js';
import { luksDump, luksFormat } from '../cli/commands/luks.js';
import { ukiInspect, ukiMeasure } from '../cli/commands/uki.js';
import { verityVerify } from '../cli/commands/verity.js';
import { createContext, type Context } from '../cli/context.js';
import { findKasSchema } from '../check/index.js';
import { readErofsSuperblock } from '../erofs/index.js';
import { UserError } from '../errors.js';
import { composeKas, loadKasFile, loadKasSchema, validateKasFile } from '../kas/index.js';
import { initKeys, keyPath } from '../keys/index.js';
import { createBundle, parseManifest, renderManifest } from '../rauc/index.js';
import {
  cmsType,
  decryptEnvelope,
  envelope,
  isDetached,
  recipientsOf,
  signerSummary,
  unverifiedContent,
  verifyEmbedded,
} from '../rauc/cms.js';
import { getBsp } from '../bsp/index.js';
import { renderRecord } from '../recovery/index.js';
import { applyUkiPatch, parsePatch, releaseBootFiles } from '../release/index.js';
import { signPe } from '../secureboot/index.js';
import { planRange, startServer } from '../server/index.js';
import { multipartPlan } from '../server/range.js';
import { EFI_STUBS, buildUki } from '../uki/index.js';
import { run } from '../util/proc.js';
import { loadEkTrust, makeCredential, parseEkCertificate, parseEkPublic, verifyEkCertificate, verifyQuote } from '../attestation/index.js';
import { createAk, extendPcr, manufactureSwtpm, quote, startSwtpm } from './swtpm.js';
import { Rng, jsonText, mutateBytes, mutateJson, mutateText, mutateYaml, type Regions } from './mutate.js';

/** One fuzz case as the target sees it. */
export interface Case {
  /** Case number within the run (selects options such as --json or --keyring). */
  n: number;
  /** Index of the seed it was mutated from. */
  seed: number;
  data: Buffer;
  /** Where the runner wrote `data`. */
  file: string;
}

/** A seed input: valid, made at fuzz time by the real tool or the project's own writer. */
export interface Seed {
  name: string;
  data: Buffer;
}

/** A target ready to run: its seeds, how to mutate them, and the entry point under test. */
export interface Prepared {
  seeds: Seed[];
  /** Where the structures live in a seed (mutations go there mostly). */
  regions?: (seed: Buffer) => Regions;
  /** Mutation other than the default binary one (JSON, YAML, text). */
  mutate?: (rng: Rng, seed: Seed) => { data: Buffer; steps: string[] };
  /** Write the case input to `file` (default: as is). */
  materialize?: (data: Buffer, file: string) => Promise<void>;
  /** Parse through the function the CLI command calls. Resolve = accepted, UserError = refused. */
  run: (ctx: Context, c: Case) => Promise<void>;
  /** The peer tool's verdict on the same file: true when it accepts it. */
  peer?: { name: string; accepts: (file: string, c: Case) => Promise<boolean> };
  /** The same input through the real CLI binary: argv, and an output that must not exist after a refusal. */
  cli?: (file: string, dir: string) => { args: string[]; output?: string };
  close?: () => Promise<void>;
}

export interface FuzzTarget {
  name: string;
  /** The parser and the CLI entry point, for the report. */
  parser: string;
  /** Per-case time bound; a slower case is a failure (a hang). */
  timeoutMs: number;
  prepare(dir: string, shared: Shared): Promise<Prepared>;
}

/** Material several targets share: one PKI made with openssl, one bundle made by the project's writer. */
export interface Shared {
  pki(): Promise<Pki>;
}

export interface Pki {
  dir: string;
  ca: string;
  signCert: string;
  signKey: string;
  device: string;
  deviceKey: string;
  db: string;
  dbKey: string;
  /** RAUC system.conf for `rauc info` (keyring and codesign purpose). */
  conf: string;
}

/** A Context that prints nowhere: the fuzzer wants the command's verdict, not its output. */
export function quietContext(json = false): Context {
  const sink = new Writable({ write: (_chunk, _enc, done) => done() });
  return createContext({ json, color: false }, { stdout: sink, stderr: sink });
}

/** Refusal by a check that reports problems instead of throwing (kas validation, HTTP 4xx). */
function refused(message: string): UserError {
  return new UserError('LAMA_E_FUZZ_REFUSED', message);
}

async function tool(cmd: string, args: string[], cwd?: string): Promise<string> {
  return (await run(cmd, args, cwd === undefined ? {} : { cwd })).stdout;
}

/** The peer tool accepts the input when it exits 0 (its stderr is its business). */
async function exitsZero(cmd: string, args: string[]): Promise<boolean> {
  return (await run(cmd, args, { allowFailure: true, timeoutMs: 60_000 })).code === 0;
}

/** Deterministic bytes, so the seeds of two runs with the same seed number are the same. */
function pseudoRandom(n: number, seed: number): Buffer {
  return new Rng(seed).bytes(n);
}

export async function makePki(dir: string): Promise<Pki> {
  const d = path.join(dir, 'pki');
  await fs.mkdir(d, { recursive: true });
  const ossl = (args: string[]): Promise<string> => tool('openssl', args, d);
  await ossl([
    'req',
    '-x509',
    '-newkey',
    'ec',
    '-pkeyopt',
    'ec_paramgen_curve:P-256',
    '-nodes',
    '-keyout',
    'ca.key',
    '-out',
    'ca.pem',
    '-days',
    '30',
    '-subj',
    '/CN=fuzz CA',
    '-addext',
    'basicConstraints=critical,CA:TRUE',
    '-addext',
    'keyUsage=critical,keyCertSign,cRLSign',
  ]);
  const leaf = async (name: string, key: string[], eku: string): Promise<void> => {
    await ossl([
      'req',
      '-newkey',
      ...key,
      '-nodes',
      '-keyout',
      `${name}.key`,
      '-out',
      `${name}.csr`,
      '-subj',
      `/CN=fuzz ${name}`,
    ]);
    await fs.writeFile(
      path.join(d, `${name}.ext`),
      `basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=${eku}\n`,
    );
    await ossl([
      'x509',
      '-req',
      '-in',
      `${name}.csr`,
      '-CA',
      'ca.pem',
      '-CAkey',
      'ca.key',
      '-CAcreateserial',
      '-out',
      `${name}.pem`,
      '-days',
      '30',
      '-extfile',
      `${name}.ext`,
    ]);
  };
  await leaf('sign', ['ec', '-pkeyopt', 'ec_paramgen_curve:P-256'], 'codeSigning');
  await leaf('device', ['rsa:2048'], 'clientAuth');
  await ossl([
    'req',
    '-x509',
    '-newkey',
    'rsa:2048',
    '-nodes',
    '-keyout',
    'db.key',
    '-out',
    'db.pem',
    '-days',
    '30',
    '-subj',
    '/CN=fuzz db',
  ]);
  const conf = path.join(d, 'system.conf');
  await fs.writeFile(
    conf,
    `[system]\ncompatible=lamadist-x86-64\nbootloader=noop\n[keyring]\npath=${path.join(d, 'ca.pem')}\ncheck-purpose=codesign\n[slot.rootfs.0]\ndevice=/dev/null\n`,
  );
  const p = (f: string): string => path.join(d, f);
  return {
    dir: d,
    ca: p('ca.pem'),
    signCert: p('sign.pem'),
    signKey: p('sign.key'),
    device: p('device.pem'),
    deviceKey: p('device.key'),
    db: p('db.pem'),
    dbKey: p('db.key'),
    conf,
  };
}

const SECTOR = 512;

/** An empty (sparse) file of `size` bytes for a tool to write a table or header into. */
async function sparseFile(file: string, size: number): Promise<void> {
  await fs.writeFile(file, Buffer.alloc(0));
  await fs.truncate(file, size);
}

const gpt: FuzzTarget = {
  name: 'gpt',
  parser: 'GPT (src/disk, lamadist gpt show)',
  timeoutMs: 5000,
  async prepare(dir) {
    const size = 2 * 1024 * 1024;
    const sg = path.join(dir, 'sgdisk.img');
    await sparseFile(sg, size);
    await tool('sgdisk', [
      '-n',
      '1:2048:+512K',
      '-t',
      '1:ef00',
      '-c',
      '1:esp',
      '-n',
      '2:0:+512K',
      '-t',
      '2:4f68bce3-e8cd-4db1-96e7-fbcaf984b709',
      '-c',
      '2:root-a',
      '-A',
      '2:set:60',
      sg,
    ]);
    const sf = path.join(dir, 'sfdisk.img');
    await sparseFile(sf, size);
    await run('sfdisk', ['--quiet', '--no-reread', '--no-tell-kernel', sf], {
      input: 'label: gpt\n,256K,U\n,256K,L\n,,L\n',
    });
    return {
      seeds: [
        { name: 'sgdisk', data: await fs.readFile(sg) },
        { name: 'sfdisk', data: await fs.readFile(sf) },
      ],
      regions: (s) => [
        [SECTOR, 34 * SECTOR],
        [s.length - 33 * SECTOR, s.length],
        [0, SECTOR],
      ],
      run: async (ctx, c) => void (await gptShow(ctx, c.file)),
      // sgdisk -v exits 0 whatever it finds; like `gpt show`, count a table it had to recover or
      // that it warns about as refused (sfdisk --dump silently takes the backup and exits 0).
      peer: {
        name: 'sgdisk -v',
        accepts: async (f) => {
          const r = await run('sgdisk', ['-v', f], { allowFailure: true, timeoutMs: 60_000 });
          const out = r.stdout + r.stderr;
          return (
            r.code === 0 &&
            /No problems found/.test(out) &&
            !/invalid|corrupt|CRC|damaged|backup|overlap|Warning/i.test(out)
          );
        },
      },
      cli: (f) => ({ args: ['gpt', 'show', f] }),
    };
  },
};

const LUKS_HEADERS = 32768;

/** Rewrite the JSON area of both LUKS2 header copies and their checksums, as a tool that edits metadata would. */
function rewriteLuksJson(seed: Buffer, json: string): Buffer | undefined {
  const out = Buffer.from(seed);
  const hdrSize = Number(seed.readBigUInt64BE(8));
  if (hdrSize * 2 > out.length) return undefined;
  const text = Buffer.from(json);
  if (text.length >= hdrSize - 4096) return undefined;
  for (const at of [0, hdrSize]) {
    out.fill(0, at + 4096, at + hdrSize);
    text.copy(out, at + 4096);
    out.fill(0, at + 448, at + 512);
    createHash('sha256')
      .update(out.subarray(at, at + hdrSize))
      .digest()
      .copy(out, at + 448);
  }
  return out;
}

const luks: FuzzTarget = {
  name: 'luks2',
  parser: 'LUKS2 header and JSON (src/luks, lamadist luks dump)',
  timeoutMs: 5000,
  async prepare(dir) {
    const full = 20 * 1024 * 1024;
    const key = path.join(dir, 'key');
    await fs.writeFile(key, pseudoRandom(32, 7));
    const cs = path.join(dir, 'cryptsetup.luks');
    await sparseFile(cs, full);
    await tool('cryptsetup', [
      'luksFormat',
      '--type',
      'luks2',
      '--batch-mode',
      '--pbkdf',
      'pbkdf2',
      '--pbkdf-force-iterations',
      '1000',
      '--key-file',
      key,
      '--label',
      'fuzz',
      cs,
    ]);
    const payload = path.join(dir, 'payload');
    await fs.writeFile(payload, pseudoRandom(8192, 8));
    const own = path.join(dir, 'lamadist.luks');
    await luksFormat(quietContext(), payload, own, { keyFile: [key] });
    const head = async (f: string): Promise<Buffer> => (await fs.readFile(f)).subarray(0, LUKS_HEADERS);
    return {
      seeds: [
        { name: 'cryptsetup luksFormat', data: await head(cs) },
        { name: 'lamadist luks format', data: await head(own) },
      ],
      mutate: (rng, seed) => {
        if (rng.chance(0.5)) {
          const hdrSize = Number(seed.data.readBigUInt64BE(8));
          const json = JSON.parse(
            seed.data.subarray(4096, hdrSize).toString('utf8').replace(/\0+$/, ''),
          ) as unknown;
          const m = mutateJson(rng, json);
          const printed = jsonText(m.value);
          const text = printed === undefined || rng.chance(0.8) ? printed : mutateText(rng, printed).text;
          const data = text === undefined ? undefined : rewriteLuksJson(seed.data, text);
          if (data) return { data, steps: [...m.steps, 'checksums recomputed'] };
        }
        return mutateBytes(rng, seed.data, [
          [0, 512],
          [4096, 8192],
          [16384, 16896],
          [20480, 24576],
        ]);
      },
      // The keyslot area lies beyond the two header copies; cryptsetup wants the file at full size.
      materialize: async (data, file) => {
        await fs.writeFile(file, data);
        if (data.length >= LUKS_HEADERS) await fs.truncate(file, full);
      },
      run: async (ctx, c) => void (await luksDump(ctx, c.file, {})),
      peer: { name: 'cryptsetup luksDump', accepts: (f) => exitsZero('cryptsetup', ['luksDump', f]) },
      cli: (f) => ({ args: ['luks', 'dump', f] }),
    };
  },
};

/** The CMS and u64 trailer at the end of a bundle: where signature, manifest and sizes live. */
function bundleRegions(b: Buffer): Regions {
  if (b.length < 8) return [];
  const sig = Number(b.readBigUInt64BE(b.length - 8));
  const start = Math.max(0, b.length - 8 - sig);
  return [
    [start, b.length],
    [start, b.length],
    [0, 96],
  ];
}

async function makeBundles(
  dir: string,
  pki: Pki,
): Promise<{ own: string; rauc: string; plain: string; manifestTexts: string[] }> {
  const content = path.join(dir, 'content');
  await fs.mkdir(content, { recursive: true });
  await fs.writeFile(path.join(content, 'rootfs.img'), pseudoRandom(64 * 1024, 9));
  const own = path.join(dir, 'lamadist.raucb');
  const created = await createBundle({
    out: own,
    compatible: 'lamadist-x86-64',
    version: '1.0.0',
    images: [{ slotClass: 'rootfs', path: path.join(content, 'rootfs.img') }],
    signer: {
      certPem: await fs.readFile(pki.signCert, 'utf8'),
      keyPem: await fs.readFile(pki.signKey, 'utf8'),
    },
    signingTime: new Date(),
  });
  const texts = [renderManifest(created.manifest)];
  const out: Record<string, string> = {};
  for (const format of ['verity', 'plain']) {
    const m = `[update]\ncompatible=lamadist-x86-64\nversion=2.0.0\nbuild=fuzz\n\n[bundle]\nformat=${format}\n\n[image.rootfs]\nfilename=rootfs.img\n`;
    await fs.writeFile(path.join(content, 'manifest.raucm'), m);
    texts.push(m);
    out[format] = path.join(dir, `rauc-${format}.raucb`);
    await run('rauc', [
      'bundle',
      '--cert',
      pki.signCert,
      '--key',
      pki.signKey,
      content,
      out[format] as string,
    ]);
  }
  return { own, rauc: out.verity as string, plain: out.plain as string, manifestTexts: texts };
}

let bundlesMade: Promise<Awaited<ReturnType<typeof makeBundles>>> | undefined;

const bundle: FuzzTarget = {
  name: 'rauc-bundle',
  parser: 'RAUC bundle (src/rauc, lamadist bundle inspect/verify/extract)',
  timeoutMs: 15000,
  async prepare(dir, shared) {
    const pki = await shared.pki();
    bundlesMade ??= makeBundles(dir, pki);
    const b = await bundlesMade;
    return {
      seeds: [
        { name: 'lamadist bundle create (verity)', data: await fs.readFile(b.own) },
        { name: 'rauc bundle (verity)', data: await fs.readFile(b.rauc) },
        { name: 'rauc bundle (plain)', data: await fs.readFile(b.plain) },
      ],
      regions: bundleRegions,
      run: async (ctx, c) => {
        if (c.n % 10 === 9) {
          await bundleExtract(ctx, c.file, path.join(path.dirname(c.file), 'extracted'), { keyring: pki.ca });
          return;
        }
        await bundleInspect(ctx, c.file, c.n % 3 === 0 ? {} : { keyring: pki.ca });
      },
      // Without --keyring, `bundle inspect` shows what the bundle claims: rauc info --no-verify asks the same.
      peer: {
        name: 'rauc info',
        accepts: (f, c) =>
          exitsZero('rauc', [
            'info',
            ...(c.n % 3 === 0 && c.n % 10 !== 9 ? ['--no-verify'] : []),
            '--conf',
            pki.conf,
            f,
          ]),
      },
      cli: (f, d) => ({
        args: ['bundle', 'extract', '--keyring', pki.ca, f, path.join(d, 'cli-out')],
        output: path.join(d, 'cli-out'),
      }),
    };
  },
};

const manifest: FuzzTarget = {
  name: 'rauc-manifest',
  parser: 'RAUC manifest key file (src/rauc/manifest.ts)',
  timeoutMs: 2000,
  async prepare(dir, shared) {
    bundlesMade ??= makeBundles(dir, await shared.pki());
    const b = await bundlesMade;
    return {
      seeds: b.manifestTexts.map((t, i) => ({
        name: i === 0 ? 'lamadist bundle create' : 'rauc manifest',
        data: Buffer.from(t),
      })),
      mutate: (rng, seed) => {
        const m = mutateText(rng, seed.data.toString('utf8'));
        return { data: Buffer.from(m.text, 'latin1'), steps: m.steps };
      },
      run: async (_ctx, c) => void parseManifest(c.data.toString('utf8'), 'manifest.raucm'),
    };
  },
};

const cms: FuzzTarget = {
  name: 'cms',
  parser: 'CMS SignedData/EnvelopedData (src/rauc/cms.ts)',
  timeoutMs: 5000,
  async prepare(dir, shared) {
    const pki = await shared.pki();
    bundlesMade ??= makeBundles(dir, pki);
    const own = await fs.readFile((await bundlesMade).own);
    const sig = Number(own.readBigUInt64BE(own.length - 8));
    const signed = own.subarray(own.length - 8 - sig, own.length - 8);
    const keyring = await fs.readFile(pki.ca, 'utf8');
    const deviceKey = await fs.readFile(pki.deviceKey, 'utf8');
    const deviceCert = await fs.readFile(pki.device, 'utf8');
    const enveloped = envelope(Buffer.from('fuzz content'), [deviceCert]);
    return {
      seeds: [
        { name: 'lamadist signature', data: Buffer.from(signed) },
        { name: 'lamadist envelope', data: enveloped },
      ],
      run: async (_ctx, c) => {
        const kind = cmsType(c.data);
        if (kind === 'signed') {
          signerSummary(c.data);
          if (!isDetached(c.data)) unverifiedContent(c.data);
          verifyEmbedded(c.data, keyring);
        } else if (kind === 'enveloped') {
          recipientsOf(c.data);
          decryptEnvelope(c.data, deviceKey, deviceCert);
        } else {
          throw refused(`not a CMS SignedData or EnvelopedData (${String(kind)})`);
        }
      },
      peer: {
        name: 'openssl cms',
        accepts: async (f) => {
          const der = await fs.readFile(f);
          return cmsType(der) === 'enveloped'
            ? exitsZero('openssl', [
                'cms',
                '-decrypt',
                '-inform',
                'DER',
                '-in',
                f,
                '-inkey',
                pki.deviceKey,
                '-recip',
                pki.device,
                '-out',
                '/dev/null',
              ])
            : exitsZero('openssl', [
                'cms',
                '-verify',
                '-inform',
                'DER',
                '-in',
                f,
                '-CAfile',
                pki.ca,
                '-purpose',
                'any',
                '-out',
                '/dev/null',
              ]);
        },
      },
    };
  },
};

const uki: FuzzTarget = {
  name: 'pe-uki',
  parser: 'PE/UKI (src/pe, src/uki, lamadist uki inspect/measure)',
  timeoutMs: 5000,
  async prepare(dir, shared) {
    const pki = await shared.pki();
    const unsigned = await buildUki({
      stub: EFI_STUBS['x86-64'] as string,
      kernel: pseudoRandom(32 * 1024, 10),
      initrd: pseudoRandom(4096, 11),
      cmdline: 'root=/dev/sda2 quiet',
      osrel: Buffer.from('ID=lamadist\nVERSION_ID=1.0\nPRETTY_NAME="LamaDist fuzz"\n'),
      uname: '6.1.0-fuzz',
    });
    const signed = signPe(unsigned, {
      certPem: await fs.readFile(pki.db),
      keyPem: await fs.readFile(pki.dbKey),
    });
    const sbsigned = path.join(dir, 'sbsign.efi');
    await fs.writeFile(path.join(dir, 'unsigned.efi'), unsigned);
    await tool('sbsign', [
      '--key',
      pki.dbKey,
      '--cert',
      pki.db,
      '--output',
      sbsigned,
      path.join(dir, 'unsigned.efi'),
    ]);
    return {
      seeds: [
        { name: 'lamadist uki build', data: unsigned },
        { name: 'lamadist sign efi', data: signed },
        { name: 'sbsign', data: await fs.readFile(sbsigned) },
      ],
      regions: (s) => {
        const pe = s.length > 0x40 ? s.readUInt32LE(0x3c) : 0;
        const tail = Math.max(0, s.length - 2048);
        return [
          [0, 0x40],
          [pe, pe + 0x400],
          [pe, pe + 0x400],
          [tail, s.length],
        ];
      },
      run: async (ctx, c) => {
        if (c.n % 3 === 2) await ukiMeasure(ctx, c.file);
        else await ukiInspect(ctx, c.file, c.n % 3 === 1 ? { cert: pki.db } : {});
      },
      // The same question as the case asked: with --cert, does the signature verify; otherwise, does
      // sbverify manage to read the image at all.
      peer: {
        name: 'sbverify',
        accepts: async (f, c) => {
          if (c.n % 3 === 1) return exitsZero('sbverify', ['--cert', pki.db, f]);
          const r = await run('sbverify', ['--list', f], { allowFailure: true, timeoutMs: 60_000 });
          return !/Can't open image/.test(r.stdout + r.stderr);
        },
      },
      cli: (f) => ({ args: ['uki', 'inspect', f] }),
    };
  },
};

const verity: FuzzTarget = {
  name: 'verity',
  parser: 'dm-verity superblock and tree (src/verity, lamadist verity verify)',
  timeoutMs: 5000,
  async prepare(dir) {
    const data = path.join(dir, 'data.img');
    await fs.writeFile(data, pseudoRandom(64 * 1024, 12));
    const hash = path.join(dir, 'hash.img');
    const out = await tool('veritysetup', ['format', data, hash]);
    const root = /Root hash:\s+([0-9a-f]+)/.exec(out)?.[1];
    if (!root) throw new Error(`veritysetup format printed no root hash: ${out}`);
    const sha1 = path.join(dir, 'hash-sha1.img');
    const out1 = await tool('veritysetup', [
      'format',
      '--hash',
      'sha1',
      '--data-block-size',
      '1024',
      '--hash-block-size',
      '1024',
      data,
      sha1,
    ]);
    const root1 = /Root hash:\s+([0-9a-f]+)/.exec(out1)?.[1] as string;
    const roots = [root, root1];
    return {
      seeds: [
        { name: 'veritysetup format (sha256/4096)', data: await fs.readFile(hash) },
        { name: 'veritysetup format (sha1/1024)', data: await fs.readFile(sha1) },
      ],
      regions: () => [
        [0, 512],
        [0, 512],
        [512, 8192],
      ],
      run: async (ctx, c) => void (await verityVerify(ctx, data, c.file, roots[c.seed] as string, {})),
      peer: {
        name: 'veritysetup verify',
        accepts: (f, c) => exitsZero('veritysetup', ['verify', data, f, roots[c.seed] as string]),
      },
      cli: (f) => ({ args: ['verity', 'verify', data, f, root] }),
    };
  },
};

const erofs: FuzzTarget = {
  name: 'erofs',
  parser: 'EROFS superblock (src/erofs, read by image inspect)',
  timeoutMs: 2000,
  async prepare(dir) {
    const tree = path.join(dir, 'tree');
    await fs.mkdir(path.join(tree, 'etc'), { recursive: true });
    await fs.writeFile(path.join(tree, 'etc', 'os-release'), 'ID=lamadist\n');
    await fs.writeFile(path.join(tree, 'blob'), pseudoRandom(20000, 13));
    const plain = path.join(dir, 'plain.erofs');
    await tool('mkfs.erofs', ['-T0', plain, tree]);
    const lz4 = path.join(dir, 'lz4.erofs');
    await tool('mkfs.erofs', ['-T0', '-zlz4hc', lz4, tree]);
    return {
      seeds: [
        { name: 'mkfs.erofs', data: await fs.readFile(plain) },
        { name: 'mkfs.erofs -zlz4hc', data: await fs.readFile(lz4) },
      ],
      regions: () => [[1024, 1152]],
      run: async (_ctx, c) => {
        if (!(await readErofsSuperblock(c.file))) throw refused('no EROFS superblock');
      },
      peer: { name: 'dump.erofs', accepts: (f) => exitsZero('dump.erofs', [f]) },
    };
  },
};

const kas: FuzzTarget = {
  name: 'kas-yaml',
  parser: 'kas YAML (src/kas, the kas-schema and kas-compose checks of lamadist check)',
  timeoutMs: 5000,
  async prepare(dir) {
    const repo = path.resolve(path.dirname(new URL(import.meta.url).pathname), '../..');
    const root = path.join(dir, 'repo');
    await fs.cp(path.join(repo, 'kas'), path.join(root, 'kas'), { recursive: true });
    const schema = await loadKasSchema(await findKasSchema(repo));
    const files: string[] = [];
    const walk = async (d: string): Promise<void> => {
      for (const e of await fs.readdir(d, { withFileTypes: true })) {
        const p = path.join(d, e.name);
        if (e.isDirectory()) await walk(p);
        else if (e.name.endsWith('.yml')) files.push(p);
      }
    };
    await walk(path.join(root, 'kas'));
    files.sort();
    const seeds = await Promise.all(
      files.map(async (f) => ({ name: path.relative(root, f), data: await fs.readFile(f) })),
    );
    return {
      seeds,
      mutate: (rng, seed) => {
        const m = mutateYaml(rng, seed.data.toString('utf8'));
        return { data: Buffer.from(m.text), steps: m.steps };
      },
      run: async (_ctx, c) => {
        const target = files[c.seed] as string;
        await fs.writeFile(target, c.data);
        try {
          const kf = await loadKasFile(target, root);
          const problems = validateKasFile(kf, schema);
          if (problems[0]) throw refused(`${problems[0].where}: ${problems[0].message}`);
          await composeKas([target], { repoRoot: root });
        } finally {
          await fs.writeFile(target, (seeds[c.seed] as Seed).data);
        }
      },
    };
  },
};

const recovery: FuzzTarget = {
  name: 'recovery-escrow',
  parser: "a host's recovery key escrow (src/recovery openEscrow, lamadist recovery-key)",
  timeoutMs: 5000,
  async prepare(dir) {
    const keys = path.join(dir, 'recovery-keys');
    await initKeys(keys, { commonName: 'fuzz' });
    const cert = await keyPath(keys, 'recovery-cert');
    const key = await keyPath(keys, 'recovery-key');
    const record = path.join(dir, 'recovery.record');
    await fs.writeFile(
      record,
      renderRecord({
        host: 'fuzz',
        machineId: 'f'.repeat(32),
        luks: ['rootfs_a', 'rootfs_b', 'var'].map((label, i) => ({ label, uuid: `${String(i).repeat(8)}-1111-4222-8333-444455556666` })),
        key: 'cbdefghi-jklnrtuv-cbdefghi-jklnrtuv-vutrnlkj-ihgfedcb-vutrnlkj-ihgfedcb',
      }),
    );
    // The installer's command line, and the same naming the recipient by subject key identifier.
    const escrow = async (name: string, extra: string[]): Promise<Seed> => {
      const out = path.join(dir, `${name}.cms`);
      await tool('openssl', [
        'cms',
        '-encrypt',
        '-binary',
        '-aes-256-cbc',
        '-outform',
        'DER',
        '-recip',
        cert,
        ...extra,
        '-keyopt',
        'rsa_padding_mode:oaep',
        '-keyopt',
        'rsa_oaep_md:sha256',
        '-keyopt',
        'rsa_mgf1_md:sha256',
        '-in',
        record,
        '-out',
        out,
      ]);
      return { name: `openssl cms -encrypt${extra.length ? ` ${extra.join(' ')}` : ''}`, data: await fs.readFile(out) };
    };
    return {
      seeds: [await escrow('installer', []), await escrow('keyid', ['-keyid'])],
      run: async (ctx, c) => {
        const out = c.n % 4 === 3 ? { out: path.join(path.dirname(c.file), 'key') } : {};
        await recoveryKey(ctx, 'fuzz', { keys, escrow: c.file, ...out });
      },
      peer: {
        name: 'openssl cms -decrypt',
        accepts: (f) => exitsZero('openssl', ['cms', '-decrypt', '-inform', 'DER', '-in', f, '-inkey', key, '-recip', cert, '-out', '/dev/null']),
      },
      cli: (f, d) => ({ args: ['recovery-key', 'fuzz', '--keys', keys, '--escrow', f, '--out', path.join(d, 'key')], output: path.join(d, 'key') }),
    };
  },
};

const hosts: FuzzTarget = {
  name: 'hosts-yaml',
  parser: 'hosts.yaml (src/host, lamadist host list/show/add)',
  timeoutMs: 5000,
  async prepare(dir) {
    const inv = path.join(dir, 'hosts.yaml');
    const ctx = quietContext();
    await hostAdd(ctx, 'alpha', {
      inventory: inv,
      dhcp: true,
      kernelArg: ['quiet'],
      smbiosUuid: '4C4C4544-0042-3510-8052-B4C04F4E3232',
      mac: ['52:54:00:12:34:56'],
    });
    await hostAdd(ctx, 'beta', {
      inventory: inv,
      address: '192.168.1.20/24',
      gateway: '192.168.1.1',
      interface: 'eth0',
      dns: ['192.168.1.1'],
      ntp: '192.168.1.1',
      mac: ['52-54-00-AB-CD-EF', '52:54:00:ab:cd:f0'],
    });
    await hostAdd(ctx, 'gamma', { inventory: inv, ip: '10.0.0.5::10.0.0.1:255.255.255.0:gamma:eth0:off' });
    return {
      seeds: [{ name: 'lamadist host add', data: await fs.readFile(inv) }],
      mutate: (rng, seed) => {
        const m = mutateYaml(rng, seed.data.toString('utf8'));
        return { data: Buffer.from(m.text), steps: m.steps };
      },
      run: async (ctx, c) => {
        if (c.n % 4 === 3) {
          await hostAdd(ctx, `new${c.n}`, { inventory: c.file });
          return;
        }
        const list = await hostList(ctx, { inventory: c.file });
        const first = list[0];
        if (first)
          await hostShow(ctx, first.name, {
            inventory: c.file,
            rootHash: 'ab'.repeat(32),
            slot: c.n % 2 === 0 ? 'a' : 'b',
          });
      },
      cli: (f) => ({ args: ['host', 'add', 'fuzzcli', '--inventory', f] }),
    };
  },
};

interface Route {
  method: 'PUT' | 'POST' | 'PATCH';
  url: string;
  admin: boolean;
  body: unknown;
}

const ddi: FuzzTarget = {
  name: 'ddi-json',
  parser: 'DDI and management JSON bodies (src/server, fastify.inject)',
  timeoutMs: 5000,
  async prepare(dir, shared) {
    const pki = await shared.pki();
    const server = await startServer({
      store: path.join(dir, 'store'),
      listen: '127.0.0.1:0',
      keyring: pki.ca,
      pollSeconds: 60,
      adminToken: 'fuzz-admin-token',
    });
    const admin = { authorization: 'Bearer fuzz-admin-token' };
    const reg = await server.app.inject({
      method: 'POST',
      url: '/api/v1/devices',
      headers: admin,
      payload: { controllerId: 'dev1', bsp: 'x86_64' },
    });
    const token = (reg.json() as { token?: string }).token;
    if (reg.statusCode !== 201 || !token)
      throw new Error(`device registration failed: ${reg.statusCode} ${reg.body}`);
    const device = { authorization: `TargetToken ${token}` };
    const base = '/DEFAULT/controller/v1/dev1';
    const feedback = {
      id: '1',
      status: {
        execution: 'closed',
        result: { finished: 'success', progress: { cnt: 2, of: 5 } },
        details: ['installed'],
      },
      time: '20240101T000000',
    };
    const routes: Route[] = [
      {
        method: 'PUT',
        url: `${base}/configData`,
        admin: false,
        body: {
          mode: 'merge',
          data: { version: '1.0.0', boot_id: 'abc', hw: 'x' },
          status: { execution: 'closed', result: { finished: 'success' } },
        },
      },
      { method: 'POST', url: `${base}/deploymentBase/1/feedback`, admin: false, body: feedback },
      { method: 'POST', url: `${base}/cancelAction/1/feedback`, admin: false, body: feedback },
      {
        method: 'POST',
        url: '/api/v1/devices',
        admin: true,
        body: { controllerId: 'dev2', name: 'two', bsp: 'x86_64', tags: ['lab'], attributes: { room: '1' } },
      },
      {
        method: 'PATCH',
        url: '/api/v1/devices/dev1',
        admin: true,
        body: { name: 'one', addTags: ['lab', 'rack'], removeTags: ['old'] },
      },
      {
        method: 'POST',
        url: '/api/v1/rollouts',
        admin: true,
        body: {
          name: 'r',
          releaseId: 1,
          filter: { tags: ['lab'] },
          waves: [{ percent: 50 }],
          successThreshold: 90,
          errorThreshold: 5,
          start: false,
        },
      },
    ];
    // The attestation extension's bodies, from a real TPM: a key pinned for dev1 and a quote over its nonce.
    const tpmDir = path.join(dir, 'tpm');
    const tpm = await startSwtpm(tpmDir);
    try {
      const ak = await createAk(tpm, tpmDir, 'ecdsa', 0x81010001);
      const keyBody = { akPublic: ak.public.toString('base64'), machineId: 'f'.repeat(32), ekPublic: ak.ekPublic.toString('base64') };
      await server.app.inject({ method: 'POST', url: `${base}/attestation/key`, headers: device, payload: keyBody });
      const n = await server.app.inject({ method: 'POST', url: `${base}/attestation/nonce`, headers: device });
      const q = await quote(tpm, tpmDir, ak.context, Buffer.from((n.json() as { nonce: string }).nonce, 'base64'), [7, 10, 11]);
      routes.push({ method: 'POST', url: `${base}/attestation/key`, admin: false, body: keyBody });
      routes.push({ method: 'POST', url: `${base}/attestation/key/activate`, admin: false, body: { secret: pseudoRandom(32, 33).toString('base64') } });
      routes.push({
        method: 'POST',
        url: `${base}/attestation/quote`,
        admin: false,
        body: {
          quote: q.quote.toString('base64'),
          signature: q.signature.toString('base64'),
          pcrs: Object.fromEntries(Object.entries(q.pcrs).map(([k, v]) => [k, v.toString('hex')])),
          imaLog: '',
          eventLog: '',
        },
      });
    } finally {
      await tpm.close();
    }
    return {
      seeds: routes.map((r) => ({ name: `${r.method} ${r.url}`, data: Buffer.from(JSON.stringify(r.body)) })),
      mutate: (rng, seed) => {
        if (rng.chance(0.8)) {
          const m = mutateJson(rng, JSON.parse(seed.data.toString('utf8')) as unknown);
          const text = jsonText(m.value);
          if (text !== undefined) return { data: Buffer.from(text), steps: m.steps };
        }
        const m = mutateText(rng, seed.data.toString('utf8'));
        return { data: Buffer.from(m.text, 'latin1'), steps: m.steps };
      },
      run: async (_ctx, c) => {
        const r = routes[c.seed] as Route;
        const res = await server.app.inject({
          method: r.method,
          url: r.url,
          headers: { ...(r.admin ? admin : device), 'content-type': 'application/json' },
          payload: c.data,
        });
        if (res.statusCode >= 500)
          throw new Error(`HTTP ${res.statusCode} from ${r.method} ${r.url}: ${res.body.slice(0, 300)}`);
        if (res.statusCode >= 400) throw refused(`HTTP ${res.statusCode}`);
      },
      close: () => server.close(),
    };
  },
};

const range: FuzzTarget = {
  name: 'http-range',
  parser: 'HTTP Range/If-Range headers (src/server/range.ts)',
  timeoutMs: 2000,
  async prepare() {
    const size = 20 * 1024 * 1024;
    const v = { etag: '"abc"', lastModified: new Date('2024-01-01T00:00:00Z') };
    const headers = [
      'bytes=0-99',
      'bytes=-500',
      'bytes=100-',
      'bytes=0-0,-1',
      'bytes=0-,0-',
      'bytes=10-20, 30-40, 4096-',
      `bytes=${size - 1}-${size}`,
    ];
    return {
      seeds: headers.map((h) => ({ name: h, data: Buffer.from(h) })),
      mutate: (rng, seed) => {
        const text = seed.data.toString('latin1');
        const op = rng.int(4);
        if (op === 0) {
          const spec = text.replace(/^bytes=/, '').split(',')[0] ?? '0-';
          const n = rng.pick([2, 10, 255, 256, 257, 1000]);
          return { data: Buffer.from(`bytes=${Array(n).fill(spec).join(',')}`), steps: [`${n} x ${spec}`] };
        }
        if (op === 1) {
          const num = rng.pick([
            '99999999999999999999',
            '9007199254740993',
            '-1',
            '1e3',
            '0x10',
            '',
            ' ',
            String(size),
            String(size - 1),
          ]);
          const out = text.replace(/\d+/, num);
          return { data: Buffer.from(out), steps: [`number ${num}`] };
        }
        const m = mutateText(rng, text);
        return { data: Buffer.from(m.text, 'latin1'), steps: m.steps };
      },
      run: async (_ctx, c) => {
        const header = c.data.toString('latin1');
        const ifRange =
          c.n % 5 === 0 ? (c.n % 10 === 0 ? '"abc"' : 'Mon, 01 Jan 2024 00:00:00 GMT') : undefined;
        const plan = planRange(size, header, ifRange, v);
        if (plan.status === 416) throw refused('416');
        if (plan.status !== 206) return;
        let total = 0;
        for (const r of plan.ranges) {
          if (
            !Number.isSafeInteger(r.start) ||
            !Number.isSafeInteger(r.end) ||
            r.start < 0 ||
            r.end < r.start ||
            r.end >= size
          ) {
            throw new Error(`range ${JSON.stringify(r)} outside an entity of ${size} bytes`);
          }
          total += r.end - r.start + 1;
        }
        // Issue 14 C1: a request must never make the server send more than the entity once.
        if (total > size)
          throw new Error(`${plan.ranges.length} ranges add up to ${total} bytes for an entity of ${size}`);
        multipartPlan(plan.ranges, size, 'application/octet-stream', 'b');
      },
    };
  },
};

const ukiPatch: FuzzTarget = {
  name: 'uki-patch',
  parser: "a host's UKI patch in a release bundle (src/release parsePatch, applyUkiPatch)",
  timeoutMs: 5000,
  async prepare(_dir, shared) {
    const pki = await shared.pki();
    const boot = await releaseBootFiles({
      bsp: getBsp('x86_64'),
      rootHash: 'ab'.repeat(32),
      stub: EFI_STUBS['x86-64'] as string,
      kernel: pseudoRandom(32 * 1024, 12),
      initrd: [pseudoRandom(4096, 13)],
      hosts: [{ name: 'fuzz', machineId: 'f'.repeat(32), args: ['systemd.hostname=fuzz', `systemd.machine_id=${'f'.repeat(32)}`] }],
      db: { certPem: await fs.readFile(pki.db), keyPem: await fs.readFile(pki.dbKey) },
    });
    const files = boot.hosts[0]?.files ?? {};
    const bins = ['a', 'b'].map((slot) => files[`hosts/${'f'.repeat(32)}/uki-${slot}.bin`] as Buffer);
    return {
      seeds: ['a', 'b'].map((slot) => ({ name: `release patch, slot ${slot}`, data: files[`hosts/${'f'.repeat(32)}/uki-${slot}.map`] as Buffer })),
      mutate: (rng, seed) => {
        const m = mutateText(rng, seed.data.toString('utf8'));
        return { data: Buffer.from(m.text, 'latin1'), steps: m.steps };
      },
      run: async (_ctx, c) => {
        const slot = c.seed === 0 ? 'a' : 'b';
        applyUkiPatch(boot.templates[slot], parsePatch(c.data.toString('latin1'), bins[c.seed] as Buffer, 'uki.map'), 'uki.map');
      },
    };
  },
};

const tpmQuote: FuzzTarget = {
  name: 'tpm2-quote',
  parser: 'TPM2 quote, signature and attestation key (src/attestation verifyQuote, the server\'s attestation endpoint)',
  timeoutMs: 2000,
  async prepare(dir) {
    const tpm = await startSwtpm(dir);
    type Set = { pub: string; msg: string; sig: string; pcrs: string; nonce: Buffer; pcrValues: Record<number, Buffer> };
    const sets: Set[] = [];
    try {
      await extendPcr(tpm, 10, pseudoRandom(32, 21));
      for (const [i, kind] of (['ecdsa', 'rsassa'] as const).entries()) {
        const ak = await createAk(tpm, dir, kind, 0x81010001 + i);
        const nonce = pseudoRandom(32, 22 + i);
        const q = await quote(tpm, dir, ak.context, nonce, [7, 10, 11], kind);
        const f = (name: string): string => path.join(dir, `${kind}.${name}`);
        await fs.writeFile(f('pub'), ak.public);
        await fs.writeFile(f('msg'), q.quote);
        await fs.writeFile(f('sig'), q.signature);
        await fs.rename(path.join(dir, 'quote.pcrs'), f('pcrs'));
        sets.push({ pub: f('pub'), msg: f('msg'), sig: f('sig'), pcrs: f('pcrs'), nonce, pcrValues: q.pcrs });
      }
    } finally {
      await tpm.close();
    }
    const roles = [
      { role: 'msg', set: 0, name: 'tpm2_quote -m (ECDSA AK)' },
      { role: 'sig', set: 0, name: 'tpm2_quote -s (ECDSA)' },
      { role: 'pub', set: 0, name: 'tpm2_createak -u (ECC)' },
      { role: 'sig', set: 1, name: 'tpm2_quote -s (RSASSA)' },
      { role: 'pub', set: 1, name: 'tpm2_createak -u (RSA)' },
    ] as const;
    const files = (seed: number, file: string): Set => {
      const r = roles[seed] as (typeof roles)[number];
      return { ...(sets[r.set] as Set), [r.role]: file };
    };
    return {
      seeds: await Promise.all(roles.map(async (r) => ({ name: r.name, data: await fs.readFile((sets[r.set] as Set)[r.role]) }))),
      run: async (_ctx, c) => {
        const f = files(c.seed, c.file);
        verifyQuote({
          quote: await fs.readFile(f.msg),
          signature: await fs.readFile(f.sig),
          akPublic: await fs.readFile(f.pub),
          nonce: f.nonce,
          pcrs: f.pcrValues,
        });
      },
      peer: {
        name: 'tpm2_checkquote',
        accepts: (file, c) => {
          const f = files(c.seed, file);
          return exitsZero('tpm2_checkquote', ['-u', f.pub, '-m', f.msg, '-s', f.sig, '-f', f.pcrs, '-g', 'sha256', '-q', f.nonce.toString('hex')]);
        },
      },
    };
  },
};

const tpmEk: FuzzTarget = {
  name: 'tpm2-ek',
  parser: "EK certificate chain and EK public area, TPM2_MakeCredential (src/attestation/ek.ts, the server's attestation key endpoint)",
  timeoutMs: 2000,
  async prepare(dir) {
    const { caBundle } = await manufactureSwtpm(path.join(dir, 'tpm'), path.join(dir, 'ca'));
    const tpm = await startSwtpm(path.join(dir, 'tpm'));
    const f = (name: string): string => path.join(dir, name);
    try {
      for (const alg of ['rsa', 'ecc']) await tpm.tool('tpm2_createek', ['-c', f(`ek-${alg}.ctx`), '-G', alg, '-u', f(`ek-${alg}.pub`)]);
      // swtpm_setup certifies the RSA EK in the TCG index for it.
      await tpm.tool('tpm2_nvread', ['0x01c00002', '-o', f('ek-rsa.der')]);
    } finally {
      await tpm.close();
    }
    const trust = loadEkTrust(await fs.readFile(caBundle, 'utf8'), caBundle);
    const cert = await fs.readFile(f('ek-rsa.der'));
    const rsaEk = parseEkPublic(await fs.readFile(f('ek-rsa.pub')));
    const akName = Buffer.concat([Buffer.from([0, 0x0b]), pseudoRandom(32, 31)]);
    const seeds = [
      { name: 'EK certificate (swtpm_localca, NV 0x01c00002)', data: cert },
      { name: 'tpm2_createek -u (RSA)', data: await fs.readFile(f('ek-rsa.pub')) },
      { name: 'tpm2_createek -u (ECC)', data: await fs.readFile(f('ek-ecc.pub')) },
    ];
    const roots = path.join(dir, 'ca', 'swtpm-localca-rootca-cert.pem');
    const issuer = path.join(dir, 'ca', 'issuercert.pem');
    return {
      seeds,
      run: async (_ctx, c) => {
        if (c.seed === 0) {
          verifyEkCertificate(parseEkCertificate(c.data), trust, rsaEk);
          return;
        }
        const ek = parseEkPublic(c.data);
        // The certificate stands for the RSA EK only: a changed RSA key must be refused here.
        if (c.seed === 1) verifyEkCertificate(parseEkCertificate(cert), trust, ek);
        makeCredential(ek, akName, pseudoRandom(32, 32));
      },
      peer: {
        name: 'openssl verify / tpm2_print',
        accepts: (file, c) =>
          c.seed === 0
            ? exitsZero('openssl', ['verify', '-CAfile', roots, '-untrusted', issuer, file])
            : exitsZero('tpm2_print', ['-t', 'TPM2B_PUBLIC', file]),
      },
    };
  },
};

/** Every target, in report order. */
export const TARGETS: readonly FuzzTarget[] = [
  gpt,
  luks,
  bundle,
  manifest,
  cms,
  recovery,
  tpmQuote,
  tpmEk,
  uki,
  ukiPatch,
  verity,
  erofs,
  kas,
  hosts,
  ddi,
  range,
];
