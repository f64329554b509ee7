import { promises as fs } from 'node:fs';
import path from 'node:path';
import { run } from '../../src/util/proc.js';

/** An openssl-made CA with a code-signing certificate, as RAUC's keyring expects. */
export interface Pki {
  caCert: string;
  signCert: string;
  signKey: string;
}

async function openssl(args: string[], cwd: string): Promise<void> {
  await run('openssl', args, { cwd });
}

/** Create a CA and a codeSigning leaf under `dir/name`. */
export async function makePki(dir: string, name = 'pki'): Promise<Pki> {
  const d = path.join(dir, name);
  await fs.mkdir(d, { recursive: true });
  await openssl(['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', 'ca.key', '-out', 'ca.pem', '-days', '30',
    '-subj', `/CN=${name} CA`, '-addext', 'basicConstraints=critical,CA:TRUE', '-addext', 'keyUsage=critical,keyCertSign,cRLSign'], d);
  await openssl(['req', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', 'sign.key', '-out', 'sign.csr', '-subj', `/CN=${name} signer`], d);
  await fs.writeFile(path.join(d, 'ext.cnf'), 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=codeSigning\n');
  await openssl(['x509', '-req', '-in', 'sign.csr', '-CA', 'ca.pem', '-CAkey', 'ca.key', '-CAcreateserial', '-out', 'sign.pem', '-days', '30', '-extfile', 'ext.cnf'], d);
  return { caCert: path.join(d, 'ca.pem'), signCert: path.join(d, 'sign.pem'), signKey: path.join(d, 'sign.key') };
}

/**
 * Build a real bundle with `rauc bundle` (verity format by default) holding one rootfs image of
 * `imageBytes` pseudo-random bytes. Returns the bundle path.
 */
export async function makeBundle(
  dir: string,
  o: { pki: Pki; compatible: string; version: string; imageBytes?: number; format?: 'plain' | 'verity'; name?: string },
): Promise<string> {
  const name = o.name ?? `${o.compatible}-${o.version}`;
  const content = path.join(dir, `${name}.content`);
  await fs.rm(content, { recursive: true, force: true });
  await fs.mkdir(content, { recursive: true });
  const size = o.imageBytes ?? 256 * 1024;
  const img = Buffer.alloc(size);
  // Deterministic but non-repeating content, so range reads at different offsets differ.
  let x = 0x9e3779b9 ^ size ^ o.version.length;
  for (let i = 0; i + 4 <= size; i += 4) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    img.writeUInt32LE(x >>> 0, i);
  }
  await fs.writeFile(path.join(content, 'rootfs.img'), img);
  await fs.writeFile(
    path.join(content, 'manifest.raucm'),
    `[update]\ncompatible=${o.compatible}\nversion=${o.version}\n\n[bundle]\nformat=${o.format ?? 'verity'}\n\n[image.rootfs]\nfilename=rootfs.img\n`,
  );
  const out = path.join(dir, `${name}.raucb`);
  await fs.rm(out, { force: true });
  await run('rauc', ['bundle', '--cert', o.pki.signCert, '--key', o.pki.signKey, content, out]);
  return out;
}
