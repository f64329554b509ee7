import { createHash, randomBytes } from 'node:crypto';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { FleetClient } from '../../src/fleet/index.js';
import { createBundle, encryptBundle } from '../../src/rauc/index.js';
import { startServer, type RunningServer } from '../../src/server/index.js';
import { debianKernel, streamingRauc, type DebianKernel } from '../../src/vm/index.js';
import { runRaucGuest } from './guest.js';
import { makePki, type Pki } from './pki.js';

// RAUC streaming from our update server, in a guest: the streaming-enabled rauc (Debian's source
// rebuilt, src/vm/rauc.ts) installs an encrypted crypt bundle straight from `lamadist server`
// over HTTP range requests, authenticated with the device's TargetToken, into slot B. The running
// slot A holds version 1; version 2 differs in one 4 KiB block, so the adaptive block-hash-index
// update fetches that block, the bundle's metadata and hash index, not the image.

const MIB = 1024 * 1024;
const SIZE = 16 * MIB;
const CHANGED_AT = 5 * MIB + 4096 * 7;

describe('rauc streams a crypt bundle from lamadist server into slot B (QEMU guest)', () => {
  let dir: string;
  let pki: Pki;
  let kernel: DebianKernel;
  let server: RunningServer;
  let v1: Buffer;
  let v2: Buffer;
  let bundleSize: number;
  let artifactUrl: string;
  let deviceToken: string;

  beforeAll(async () => {
    dir = await fs.mkdtemp(path.join(os.tmpdir(), 'lamadist-rauc-stream-'));
    pki = makePki();
    kernel = await debianKernel();
    v1 = randomBytes(SIZE);
    v2 = Buffer.from(v1);
    randomBytes(4096).copy(v2, CHANGED_AT);
    const img = path.join(dir, 'rootfs-v2.img');
    await fs.writeFile(img, v2);
    const signer = { certPem: await fs.readFile(pki.cert, 'utf8'), keyPem: await fs.readFile(pki.key, 'utf8') };
    const plain = path.join(dir, 'v2-unencrypted.raucb');
    await createBundle({
      compatible: 'lamadist-x86-64',
      version: '2',
      images: [{ slotClass: 'rootfs', path: img, adaptive: true }],
      signer,
      out: plain,
      format: 'crypt',
    });
    // Encrypted for the device and for the server, which must open the envelope to verify the signature.
    const bundle = path.join(dir, 'v2.raucb');
    await encryptBundle(plain, bundle, [pki.device, pki.device2]);
    bundleSize = (await fs.stat(bundle)).size;

    server = await startServer({
      store: path.join(dir, 'store'),
      keyring: pki.ca,
      listen: '127.0.0.1:0',
      bundleKey: pki.device2Key,
      bundleCert: pki.device2,
    });
    const fleet = new FleetClient({ url: server.url, token: (await fs.readFile(server.adminTokenFile as string, 'utf8')).trim() });
    deviceToken = (await fleet.registerDevice({ controllerId: 'stream-1', bsp: 'x86_64' })).token;
    const { release } = await fleet.uploadRelease(bundle);
    await fleet.createRollout({ releaseId: release.id, filter: { devices: ['stream-1'] } });
    // QEMU's user network maps 10.0.2.2 to the host's loopback.
    artifactUrl = `http://10.0.2.2:${server.port}/DEFAULT/controller/v1/stream-1/softwaremodules/${release.id}/artifacts/${release.filename}`;
  }, 600_000);
  afterAll(async () => {
    await server?.close();
    await fs.rm(dir, { recursive: true, force: true });
    await fs.rm(pki.dir, { recursive: true, force: true });
  });

  it('streams only what slot A does not already hold, and slot B ends up byte-identical to version 2', async () => {
    const rauc = await streamingRauc();
    const slotA = path.join(dir, 'slot-a.img');
    const slotB = path.join(dir, 'slot-b.img');
    await fs.writeFile(slotA, v1);
    await fs.writeFile(slotB, Buffer.alloc(SIZE));
    const before = { ...server.service.counters };
    const r = await runRaucGuest({
      dir,
      kernel,
      pki,
      slotA,
      slotB,
      rauc: rauc.binary,
      system: ['data-directory=/var/lib/rauc'],
      modules: ['virtio_net', 'nbd'],
      network: true,
      steps: [
        `rauc install -H "Authorization: TargetToken ${deviceToken}" "${artifactUrl}" && echo LAMA-STREAM-INSTALLED`,
        `echo "LAMA-SHA-B=$(head -c ${SIZE} /dev/vdb | sha256sum | cut -d" " -f1)"`,
      ],
    });
    const tail = r.serial.slice(-6000);
    expect(r.timedOut, tail).toBe(false);
    expect(r.serial, tail).toContain('LAMA-STREAM-INSTALLED');
    const want = createHash('sha256').update(v2).digest('hex');
    expect(r.serial, tail).toContain(`LAMA-SHA-B=${want}`);
    const b = await fs.readFile(slotB);
    expect(b.equals(v2)).toBe(true);

    const fetched = server.service.counters.artifactBytes - before.artifactBytes;
    const requests = server.service.counters.artifactRequests - before.artifactRequests;
    console.log(`rauc streaming: ${requests} range requests fetched ${fetched} of ${bundleSize} bundle bytes (${((100 * fetched) / bundleSize).toFixed(1)}%)`);
    expect(requests).toBeGreaterThan(1);
    // The image is 16 MiB of random data; fetching it would be the whole bundle.
    expect(fetched).toBeLessThan(bundleSize / 4);
  }, 900_000);
});
