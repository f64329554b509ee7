import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { bootDevice, prepareDevice, type BootMode, type Device } from '../vm/index.js';

/**
 * Boot time of the emulated device, from QEMU start to the health check's verdict on the serial
 * console, in the same run:
 * - direct kernel boot of an unencrypted image (no firmware, no TPM2, no LUKS2; dm-verity still on);
 * - the full chain: OVMF Secure Boot verifying the signed UKI, swtpm TPM2 unlocking LUKS2, dm-verity
 *   (first boot, which also enrolls the TPM2, and the steady-state second boot).
 * The ratio shows what the security chain costs. QEMU runs under TCG here, so absolute numbers are
 * far above real hardware; LAMADIST_BENCH_SCALE does not apply (a boot has no size to scale).
 */

const HEALTH = /lamadist-health: (healthy|unhealthy|FAIL)|LAMADIST-REPORT-END/;

async function timeBoot(dev: Device, mode: BootMode): Promise<number> {
  const r = await bootDevice(dev, { mode, timeoutMs: 900_000, until: HEALTH });
  if (!r.matched) throw new Error(`${mode} boot did not reach the health check: ${r.serial.slice(-500)}`);
  return r.durationMs / 1000;
}

export async function run(): Promise<void> {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'lamadist-bench-vm-'));
  try {
    const plain = await prepareDevice({ dir: path.join(dir, 'plain'), encrypt: false });
    const secure = await prepareDevice({ dir: path.join(dir, 'secure') });
    const direct = await timeBoot(plain, 'direct');
    const first = await timeBoot(secure, 'secure');
    const second = await timeBoot(secure, 'secure');
    const line = (name: string, s: number): string => `vm: ${name.padEnd(58)} ${s.toFixed(1).padStart(7)} s  (${(s / direct).toFixed(2)}x direct)`;
    process.stdout.write(`${line('QEMU start → health check, direct kernel boot (plain)', direct)}\n`);
    process.stdout.write(`${line('… Secure Boot + TPM2 + LUKS2 + verity, first boot (enroll)', first)}\n`);
    process.stdout.write(`${line('… Secure Boot + TPM2 + LUKS2 + verity, second boot', second)}\n`);
  } finally {
    await fs.rm(dir, { recursive: true, force: true });
  }
}
