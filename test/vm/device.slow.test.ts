import { execFileSync } from 'node:child_process';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { bootDevice, prepareDevice, type Device } from '../../src/vm/index.js';

const MACHINE_ID = '0123456789abcdef0123456789abcdef';

/** The first 16 MiB of a LUKS2 partition (its header and keyslots) as a detached header file. */
async function luksHeader(dev: Device, label: string, out: string): Promise<string> {
  const p = dev.plan.partitions.find((x) => x.label === label);
  if (!p) throw new Error(`no partition ${label}`);
  const h = await fs.open(dev.disk, 'r');
  try {
    const buf = Buffer.alloc(16 * 1024 * 1024);
    await h.read(buf, 0, buf.length, p.offset);
    await fs.writeFile(out, buf);
  } finally {
    await h.close();
  }
  return out;
}

// Acceptance 1: the fixture device boots through OVMF Secure Boot (our keys enrolled) with swtpm;
// meta-lamadist's lamadist-init unlocks with the provisioning key, enrolls the TPM2, opens
// dm-verity and switches root; the second boot unlocks with the TPM2 alone.
describe('acceptance 1: first and second boot of the encrypted A/B device', () => {
  let dir: string;
  let dev: Device;
  let first: Awaited<ReturnType<typeof bootDevice>>;

  beforeAll(async () => {
    dir = await fs.mkdtemp(path.join(os.tmpdir(), 'vm-device-'));
    dev = await prepareDevice({ dir, hostname: 'lama-node-7', machineId: MACHINE_ID });
  }, 1_500_000);
  afterAll(async () => {
    await fs.rm(dir, { recursive: true, force: true });
  });

  it('first boot enrolls the TPM2 and comes up on a verity-backed read-only EROFS root', async () => {
    first = await bootDevice(dev, { timeoutMs: 600_000, serialLog: path.join(dir, 'boot1.log') });
    const tail = first.serial.slice(-4000);
    expect(first.matched, tail).toBe(true);
    expect(first.serial).toContain('unlocked with the provisioning key (first boot)');
    expect(first.serial).toMatch(/TPM2 enrolled \(PCRs 7\)/);
    const r = first.report ?? {};
    expect(r.root, tail).toMatch(/^\/dev\/mapper\/root erofs\s+ro[, ]/);
    expect(r.root_dm).toBe('verity');
    expect(r.var).toBe('/dev/mapper/var ext4');
    expect(r.var_luks).toBe('LUKS2');
    expect(r.etc).toMatch(/^overlay /);
    expect(r.hostname).toBe('lama-node-7');
    expect(r.machine_id).toBe(MACHINE_ID);
    expect(r.slot).toBe('a');
    expect(r.persist).toBe('');
  });

  it('the provisioning keyslot is gone, the recovery key and a TPM2 token remain', async () => {
    for (const label of ['rootfs_a', 'rootfs_b', 'var']) {
      const hdr = await luksHeader(dev, label, path.join(dir, `${label}.hdr`));
      const dump = execFileSync('cryptsetup', ['luksDump', hdr]).toString();
      expect(dump, label).toContain('systemd-tpm2');
      execFileSync('cryptsetup', ['open', '--test-passphrase', '--key-file', dev.recoveryKey, hdr]);
    }
    const esp = await fs.readFile(path.join(dir, 'boot1.log'), 'utf8');
    expect(esp).toContain('provisioning key removed');
  });

  it('second boot unlocks with the TPM2 alone and keeps what was written to /etc', async () => {
    const second = await bootDevice(dev, { timeoutMs: 600_000, serialLog: path.join(dir, 'boot2.log') });
    const tail = second.serial.slice(-4000);
    expect(second.matched, tail).toBe(true);
    expect(second.serial).not.toContain('provisioning key');
    expect(second.serial).not.toContain('recovery key');
    const r = second.report ?? {};
    expect(r.persist, tail).toMatch(/^boot-[0-9a-f-]{36}$/);
    expect(r.var_marker).toBe(r.persist);
    expect(r.root).toMatch(/^\/dev\/mapper\/root erofs\s+ro[, ]/);
    expect(r.hostname).toBe('lama-node-7');
  });
});
