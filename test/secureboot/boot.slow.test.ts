import { execFileSync } from 'node:child_process';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { loadInventory, findHost, kernelCmdline } from '../../src/host/index.js';
import { createCertificate, keyPath } from '../../src/keys/index.js';
import { predictPcr11 } from '../../src/measure/index.js';
import { signPe, stripSignature } from '../../src/secureboot/index.js';
import { OVMF, buildInitramfs, debianKernel, runQemu } from '../../src/vm/index.js';
import { runCli } from '../helpers/cli.js';
import { tempDir } from '../uki/helpers.js';

const EFI_GLOBAL = '8be4df61-93ca-11d2-aa0d-00e098032b8c';
const TCTI = '/usr/lib/x86_64-linux-gnu/libtss2-tcti-device.so.0';
const ROOT_HASH = '5d41402abc4b2a76b9719d911017c592' + '7e240d7e8a6e3ef8a3d2c1b0a9f8e7d6';
const BOOT_TIMEOUT = 420_000;

// The acceptance boot: a UKI that `lamadist uki build --host` made from Debian's kernel and a tiny
// initramfs, signed with our db key, boots under OVMF's Secure Boot firmware with our PK/KEK/db
// enrolled by makeOvmfVars and a swtpm TPM2; the guest reports PCR 11 (tpm2_pcrread and sysfs) and
// /proc/cmdline. The same UKI unsigned, or signed by a foreign key, is refused by the firmware.
describe('Secure Boot and measured boot of a lamadist UKI in OVMF', () => {
  const t = tempDir('lamadist-boot-');
  const d = (f: string): string => path.join(t.dir, f);
  let vars: string;
  let signed: Buffer;
  let expectedCmdline: string;

  async function esp(name: string, uki: Buffer): Promise<string> {
    const disk = d(`${name}.img`);
    await fs.writeFile(d(`${name}.efi`), uki);
    await fs.writeFile(disk, Buffer.alloc(0));
    await fs.truncate(disk, 80 * 1024 * 1024);
    execFileSync('sgdisk', ['-n', '1:2048:+72M', '-t', '1:ef00', '-c', '1:esp', disk], { stdio: 'ignore' });
    execFileSync('mkfs.vfat', ['-F', '32', '--offset', '2048', disk, String(72 * 1024)], { stdio: 'ignore' });
    execFileSync('mmd', ['-i', `${disk}@@1M`, '::EFI', '::EFI/BOOT']);
    execFileSync('mcopy', ['-i', `${disk}@@1M`, d(`${name}.efi`), '::EFI/BOOT/BOOTX64.EFI']);
    return disk;
  }

  async function boot(name: string, uki: Buffer, until: RegExp): Promise<string> {
    const r = await runQemu({
      firmware: { code: OVMF.secbootCode, vars },
      tpm: { stateDir: d(`${name}.tpm`) },
      disks: [{ path: await esp(name, uki) }],
      network: false,
      memMiB: 768,
      timeoutMs: BOOT_TIMEOUT - 20_000,
      until,
      serialLog: d(`${name}.log`),
    });
    expect(r.timedOut, r.serial.slice(-3000)).toBe(false);
    return r.serial;
  }

  beforeAll(async () => {
    const keys = d('keys');
    expect((await runCli(['keys', 'init', keys])).code).toBe(0);
    vars = d('OVMF_VARS.fd');
    expect((await runCli(['keys', 'ovmf-vars', keys, '-o', vars])).code).toBe(0);
    const inventory = d('hosts.yaml');
    const add = await runCli(['host', 'add', 'node01', '--inventory', inventory, '--address', '192.168.50.10/24', '--gateway', '192.168.50.1', '--interface', 'eth0', '--dns', '192.168.50.1']);
    expect(add.code, add.stderr).toBe(0);
    expectedCmdline = kernelCmdline(findHost(await loadInventory(inventory), 'node01'), { rootHash: ROOT_HASH, slot: 'b' });

    const kernel = await debianKernel();
    const initrd = await buildInitramfs({
      init: [
        'mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev',
        'modprobe efivarfs; mount -t efivarfs efivarfs /sys/firmware/efi/efivars',
        // efivarfs files are 4 attribute bytes then the value; busybox od cannot seek in them, tail can.
        `echo "SB=$(tail -c 1 /sys/firmware/efi/efivars/SecureBoot-${EFI_GLOBAL} | od -An -tu1 | tr -d ' ')"`,
        'echo "CMDLINE=$(cat /proc/cmdline)"',
        'echo "SYSFS_PCR11=$(cat /sys/class/tpm/tpm0/pcr-sha256/11)"',
        'TPM2TOOLS_TCTI=device:/dev/tpmrm0 tpm2_pcrread sha256:11 2>&1 | sed "s/^/PCRREAD /"',
        'echo LAMA-BOOT-MARKER',
        'poweroff -f',
      ].join('\n'),
      binaries: ['tpm2_pcrread', TCTI],
      modules: ['efivarfs'],
      out: d('initrd.gz'),
    });
    const build = await runCli(
      ['--json', 'uki', 'build', '--kernel', kernel.vmlinuz, '--initrd', initrd, '--host', 'node01', '--inventory', inventory, '--root-hash', ROOT_HASH, '--slot', 'b', '--keys', keys, '-o', d('node01.efi')],
      { timeoutMs: 120_000 },
    );
    expect(build.code, build.stderr).toBe(0);
    expect(JSON.parse(build.stdout)).toMatchObject({ signed: true, cmdline: expectedCmdline });
    signed = await fs.readFile(d('node01.efi'));
    expect((await keyPath(keys, 'secureboot-db-cert')).endsWith('db.crt')).toBe(true);
  }, 300_000);
  afterAll(() => t.remove());

  it('boots the signed UKI; PCR 11 equals our prediction and /proc/cmdline the inventory line', async () => {
    const serial = await boot('signed', signed, /LAMA-BOOT-MARKER/);
    expect(serial).toContain('LAMA-BOOT-MARKER');
    expect(serial).toMatch(/SB=1\r?\n/);
    expect(serial).toContain('secureboot: Secure boot enabled');
    const cmdline = /CMDLINE=(.*?)\r?\n/.exec(serial)?.[1];
    expect(cmdline?.trim()).toBe(expectedCmdline);
    const predicted = predictPcr11(signed).value.toUpperCase();
    expect(/SYSFS_PCR11=([0-9A-F]+)/.exec(serial)?.[1]).toBe(predicted);
    expect(/PCRREAD\s+11: 0x([0-9A-F]+)/.exec(serial)?.[1]).toBe(predicted);
  }, BOOT_TIMEOUT);

  it('refuses the same UKI unsigned', async () => {
    const serial = await boot('unsigned', stripSignature(signed), /Access Denied|LAMA-BOOT-MARKER/);
    expect(serial).toMatch(/BdsDxe: failed to load Boot\w+ .*Access Denied/);
    expect(serial).not.toContain('LAMA-BOOT-MARKER');
  }, BOOT_TIMEOUT);

  it('refuses the same UKI signed with another key', async () => {
    const foreign = await createCertificate({ commonName: 'Someone Else db' });
    const serial = await boot('foreign', signPe(signed, foreign), /Access Denied|LAMA-BOOT-MARKER/);
    expect(serial).toMatch(/Access Denied/);
    expect(serial).not.toContain('LAMA-BOOT-MARKER');
  }, BOOT_TIMEOUT);
});
