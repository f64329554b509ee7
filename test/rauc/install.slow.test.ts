import { createHash, randomBytes } from 'node:crypto';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createBundle, encryptBundle } from '../../src/rauc/index.js';
import { debianKernel, type DebianKernel } from '../../src/vm/index.js';
import { runRaucGuest } from './guest.js';
import { makePki, type Pki } from './pki.js';

// What only a kernel with device-mapper can show: the real `rauc install` (RAUC 1.8's service on a
// session bus, noop bootloader) mounts our verity bundle through loop + dm-verity, and our crypt
// bundle through dm-verity + dm-crypt after opening its envelope with the device key, and writes
// the image into the inactive slot; the slot's bytes are then compared with the input on the host.

const SIZE = 2 * 1024 * 1024;

describe('rauc install of our bundles in a QEMU guest', () => {
  let dir: string;
  let pki: Pki;
  let kernel: DebianKernel;
  let image: Buffer;
  let verityBundle: string;
  let cryptBundle: string;

  beforeAll(async () => {
    dir = await fs.mkdtemp(path.join(os.tmpdir(), 'lamadist-rauc-install-'));
    pki = makePki();
    kernel = await debianKernel();
    image = randomBytes(SIZE);
    const img = path.join(dir, 'rootfs.img');
    await fs.writeFile(img, image);
    const signer = { certPem: await fs.readFile(pki.cert, 'utf8'), keyPem: await fs.readFile(pki.key, 'utf8') };
    const common = { compatible: 'lamadist-x86-64', version: '1', images: [{ slotClass: 'rootfs', path: img, adaptive: true }], signer };
    verityBundle = path.join(dir, 'verity.raucb');
    await createBundle({ ...common, out: verityBundle });
    const unencrypted = path.join(dir, 'crypt-plain.raucb');
    await createBundle({ ...common, out: unencrypted, format: 'crypt' });
    cryptBundle = path.join(dir, 'crypt.raucb');
    await encryptBundle(unencrypted, cryptBundle, [pki.device]);
  });
  afterAll(async () => {
    await fs.rm(dir, { recursive: true, force: true });
    await fs.rm(pki.dir, { recursive: true, force: true });
  });

  it('installs the verity bundle and the encrypted crypt bundle into slot B', async () => {
    const slotA = path.join(dir, 'slot-a.img');
    const slotB = path.join(dir, 'slot-b.img');
    await fs.writeFile(slotA, Buffer.alloc(SIZE + 1024 * 1024));
    await fs.writeFile(slotB, Buffer.alloc(SIZE + 1024 * 1024));
    const slotSha = `head -c ${SIZE} /dev/vdb | sha256sum | cut -d" " -f1`;
    const r = await runRaucGuest({
      dir,
      kernel,
      pki,
      slotA,
      slotB,
      steps: [
        'rauc status 2>&1 | head -5',
        'rauc install /verity.raucb && echo LAMA-VERITY-INSTALLED',
        `echo "LAMA-SHA-VERITY=$(${slotSha})"`,
        'dd if=/dev/zero of=/dev/vdb bs=1M count=2 2>/dev/null; sync',
        'rauc install /crypt.raucb && echo LAMA-CRYPT-INSTALLED',
        `echo "LAMA-SHA-CRYPT=$(${slotSha})"`,
      ],
      files: { '/verity.raucb': await fs.readFile(verityBundle), '/crypt.raucb': await fs.readFile(cryptBundle) },
    });
    const tail = r.serial.slice(-6000);
    const want = createHash('sha256').update(image).digest('hex');
    expect(r.timedOut, tail).toBe(false);
    expect(r.serial, tail).toContain('LAMA-VERITY-INSTALLED');
    expect(r.serial, tail).toContain(`LAMA-SHA-VERITY=${want}`);
    expect(r.serial, tail).toContain('LAMA-CRYPT-INSTALLED');
    expect(r.serial, tail).toContain(`LAMA-SHA-CRYPT=${want}`);
    const b = await fs.readFile(slotB);
    expect(b.subarray(0, SIZE).equals(image)).toBe(true);
    expect(b.subarray(0, SIZE).equals(Buffer.alloc(SIZE))).toBe(false);
    const a = await fs.readFile(slotA);
    expect(a.equals(Buffer.alloc(a.length))).toBe(true);
  });
});
