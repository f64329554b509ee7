import { execFileSync } from 'node:child_process';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createCertificate, initKeys, keyPath } from '../../src/keys/index.js';
import { makeOvmfVars, signPe } from '../../src/secureboot/index.js';
import { buildUki } from '../../src/uki/index.js';
import { OVMF, buildInitramfs, debianKernel } from '../../src/vm/index.js';
import { runCli } from '../helpers/cli.js';

const STUB = '/usr/lib/systemd/boot/efi/linuxx64.efi.stub';
const EFI_GLOBAL = '8be4df61-93ca-11d2-aa0d-00e098032b8c';

// `lamadist vm run` against OVMF's Secure Boot firmware with our keys enrolled and swtpm: a UKI
// signed by our db key boots (and the guest sees Secure Boot on and a TPM2), a UKI signed by a
// foreign key is refused by the firmware itself (acceptance 4, second half).
describe('lamadist vm run: Secure Boot and TPM2 in OVMF', () => {
  let dir: string;
  let vars: string;
  let unsigned: Buffer;
  let keys: string;

  async function espDisk(name: string, uki: Buffer): Promise<string> {
    const disk = path.join(dir, name);
    const efi = path.join(dir, `${name}.efi`);
    await fs.writeFile(efi, uki);
    await fs.writeFile(disk, Buffer.alloc(0));
    await fs.truncate(disk, 80 * 1024 * 1024);
    execFileSync('sgdisk', ['-n', '1:2048:+72M', '-t', '1:ef00', '-c', '1:esp', disk], { stdio: 'ignore' });
    execFileSync('mkfs.vfat', ['-F', '32', '--offset', '2048', disk, String(72 * 1024)], { stdio: 'ignore' });
    const img = `${disk}@@1M`;
    execFileSync('mmd', ['-i', img, '::EFI', '::EFI/BOOT']);
    execFileSync('mcopy', ['-i', img, efi, '::EFI/BOOT/BOOTX64.EFI']);
    return disk;
  }

  beforeAll(async () => {
    dir = await fs.mkdtemp(path.join(os.tmpdir(), 'vm-sb-'));
    keys = path.join(dir, 'keys');
    await initKeys(keys);
    vars = path.join(dir, 'OVMF_VARS.enrolled.fd');
    await makeOvmfVars({
      template: OVMF.vars,
      out: vars,
      pk: await keyPath(keys, 'secureboot-pk-cert'),
      kek: await keyPath(keys, 'secureboot-kek-cert'),
      db: await keyPath(keys, 'secureboot-db-cert'),
    });
    const kernel = await debianKernel();
    const initrd = await buildInitramfs({
      init: [
        'mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev',
        'modprobe efivarfs; mount -t efivarfs efivarfs /sys/firmware/efi/efivars',
        `echo "SB=$(tail -c 1 /sys/firmware/efi/efivars/SecureBoot-${EFI_GLOBAL} | od -An -tu1 | tr -d " ")"`,
        'echo "TPM=$(cat /sys/class/tpm/tpm0/tpm_version_major 2>/dev/null)"',
        'echo LAMA-SB-MARKER',
        'poweroff -f',
      ].join('\n'),
      modules: ['efivarfs'],
      out: path.join(dir, 'initrd.gz'),
    });
    unsigned = await buildUki({ stub: STUB, kernel: kernel.vmlinuz, initrd, cmdline: 'console=ttyS0,115200 panic=-1' });
  });
  afterAll(async () => {
    await fs.rm(dir, { recursive: true, force: true });
  });

  it('boots a UKI signed with our db key, with Secure Boot enforcing and a TPM2 present', async () => {
    const signed = signPe(unsigned, {
      certPem: await fs.readFile(await keyPath(keys, 'secureboot-db-cert'), 'utf8'),
      keyPem: await fs.readFile(await keyPath(keys, 'secureboot-db-key'), 'utf8'),
    });
    const disk = await espDisk('good.img', signed);
    const log = path.join(dir, 'good.log');
    const tpm = path.join(dir, 'tpm');
    const r = await runCli(
      ['vm', 'run', disk, '--secure-boot', '--vars', vars, '--tpm', tpm, '--mem', '512', '--serial', log, '--timeout', '400', '--until', 'LAMA-SB-MARKER', '--json'],
      { timeoutMs: 420_000 },
    );
    const serial = await fs.readFile(log, 'utf8');
    expect(r.code, `${r.stderr.slice(-500)}\n${serial.slice(-2000)}`).toBe(0);
    expect(JSON.parse(r.stdout)).toMatchObject({ matched: true, timedOut: false });
    expect(serial).toMatch(/SB=1\r?\n/);
    expect(serial).toMatch(/TPM=2\r?\n/);
    // the TPM state directory persists for the next boot; the per-VM temp dir does not
    expect((await fs.readdir(tpm)).length).toBeGreaterThan(0);
    // the enrolled template itself was not written (each VM gets a copy)
    expect((await fs.stat(vars)).mtimeMs).toBeLessThan((await fs.stat(log)).mtimeMs);
  });

  it('refuses a UKI signed with a foreign key in the firmware', async () => {
    const foreign = await createCertificate({ commonName: 'Not Our Fleet db' });
    const disk = await espDisk('foreign.img', signPe(unsigned, foreign));
    const log = path.join(dir, 'foreign.log');
    const r = await runCli(
      ['vm', 'run', disk, '--secure-boot', '--vars', vars, '--mem', '512', '--serial', log, '--timeout', '400', '--until', 'Access Denied|LAMA-SB-MARKER'],
      { timeoutMs: 420_000 },
    );
    const serial = await fs.readFile(log, 'utf8');
    expect(r.code, serial.slice(-2000)).toBe(0);
    expect(serial).toContain('Access Denied');
    expect(serial).not.toContain('LAMA-SB-MARKER');
  });
});
