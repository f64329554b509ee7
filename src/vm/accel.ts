import { spawn } from 'node:child_process';
import { constants, promises as fs } from 'node:fs';
import path from 'node:path';
import { makeTempDir } from '../util/fsx.js';
import { buildInitramfs } from './initramfs.js';
import { cacheRoot, debianKernel } from './kernel.js';

let decided: Promise<'kvm' | 'tcg'> | undefined;

/**
 * Boot Debian's kernel under KVM to a marker. Some hosts (nested sandboxes) let /dev/kvm open and
 * even run the BIOS, but the kernel hangs right after decompression; only a real boot tells.
 */
async function kvmBoots(): Promise<boolean> {
  const tmp = await makeTempDir('lamadist-kvm-probe-');
  try {
    const kernel = await debianKernel();
    const initrd = await buildInitramfs({ init: 'echo LAMADIST-KVM-OK\npoweroff -f\n', out: path.join(tmp.dir, 'initrd.gz') });
    const argv = ['-accel', 'kvm', '-machine', 'q35', '-cpu', 'host', '-m', '256', '-nodefaults', '-display', 'none', '-serial', 'stdio', '-no-reboot'];
    argv.push('-kernel', kernel.vmlinuz, '-initrd', initrd, '-append', 'console=ttyS0 quiet panic=-1');
    return await new Promise<boolean>((resolve) => {
      const q = spawn('qemu-system-x86_64', argv, { stdio: ['ignore', 'pipe', 'ignore'] });
      let out = '';
      const timer = setTimeout(() => q.kill('SIGKILL'), 20_000);
      q.stdout.on('data', (c: Buffer) => {
        out += c.toString();
        if (out.includes('LAMADIST-KVM-OK')) q.kill('SIGKILL');
      });
      q.on('error', () => resolve(false));
      q.on('close', () => {
        clearTimeout(timer);
        resolve(out.includes('LAMADIST-KVM-OK'));
      });
    });
  } finally {
    await tmp.remove();
  }
}

async function probe(): Promise<'kvm' | 'tcg'> {
  try {
    await fs.access('/dev/kvm', constants.R_OK | constants.W_OK);
  } catch {
    return 'tcg';
  }
  // Cached per host boot: the answer cannot change until the host reboots.
  const bootId = (await fs.readFile('/proc/sys/kernel/random/boot_id', 'utf8').catch(() => 'unknown')).trim();
  const file = path.join(cacheRoot(), 'kvm-probe.json');
  const cached = await fs.readFile(file, 'utf8').then((t) => JSON.parse(t) as { bootId: string; accel: 'kvm' | 'tcg' }, () => undefined);
  if (cached?.bootId === bootId) return cached.accel;
  const accel = (await kvmBoots()) ? 'kvm' : 'tcg';
  await fs.mkdir(cacheRoot(), { recursive: true });
  await fs.writeFile(file, JSON.stringify({ bootId, accel }) + '\n');
  return accel;
}

/**
 * The accelerator VMs use: LAMADIST_VM_ACCEL=kvm|tcg if set; otherwise kvm when /dev/kvm opens
 * read-write and a Debian kernel actually boots under it (probed once per host boot), else tcg.
 */
export function detectAccel(): Promise<'kvm' | 'tcg'> {
  const forced = process.env.LAMADIST_VM_ACCEL;
  if (forced === 'kvm' || forced === 'tcg') return Promise.resolve(forced);
  decided ??= probe();
  return decided;
}
