import { execFileSync } from 'node:child_process';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { gunzipSync } from 'node:zlib';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { UserError } from '../../src/errors.js';
import { buildInitramfs, encodeNewc, mergedPath, modulesDepText, parseLdd, planQemu, planSwtpm, OVMF } from '../../src/vm/index.js';

let dir: string;
beforeAll(async () => {
  dir = await fs.mkdtemp(path.join(os.tmpdir(), 'vm-kit-fast-'));
});
afterAll(async () => {
  await fs.rm(dir, { recursive: true, force: true });
});

describe('planQemu', () => {
  it('direct kernel boot with disks, forwarding and no firmware', () => {
    const argv = planQemu(
      {
        kernel: '/k',
        initrd: '/i',
        append: 'console=ttyS0',
        disks: [{ path: '/d.img', readonly: true, serial: 'root' }, { path: '/e.qcow2', format: 'qcow2' }],
        hostForward: [{ host: 8022, guest: 22 }],
        noReboot: true,
        memMiB: 768,
      },
      { accel: 'tcg' },
    );
    const s = argv.join(' ');
    expect(s).toContain('-machine q35 -accel tcg -cpu max');
    expect(s).toContain('-m 768');
    expect(s).toContain('-kernel /k -initrd /i -append console=ttyS0');
    expect(s).toContain('-drive file=/d.img,format=raw,if=none,id=disk0,readonly=on -device virtio-blk-pci,drive=disk0,bootindex=1,serial=root');
    expect(s).toContain('-drive file=/e.qcow2,format=qcow2,if=none,id=disk1 -device virtio-blk-pci,drive=disk1,bootindex=2');
    expect(s).toContain('-netdev user,id=net0,hostfwd=tcp:127.0.0.1:8022-:22 -device virtio-net-pci,netdev=net0');
    expect(argv).toContain('-no-reboot');
    expect(s).not.toContain('pflash');
    expect(s).not.toContain('tpm');
  });

  it('Secure Boot firmware turns on SMM and protects the flash; TPM goes through the swtpm socket', () => {
    const argv = planQemu(
      { firmware: { code: OVMF.secbootCode, vars: OVMF.vars }, tpm: { stateDir: '/state' }, network: false },
      { accel: 'kvm', varsPath: '/tmp/x/VARS.fd', tpmSocket: '/tmp/x/swtpm.sock', qmpSocket: '/tmp/x/qmp.sock' },
    );
    const s = argv.join(' ');
    expect(s).toContain('-qmp unix:/tmp/x/qmp.sock,server=on,wait=off');
    expect(s).toContain('-machine q35,smm=on -accel kvm -cpu host');
    expect(s).toContain('-global driver=cfi.pflash01,property=secure,value=on');
    expect(s).toContain(`-drive if=pflash,format=raw,unit=0,readonly=on,file=${OVMF.secbootCode}`);
    expect(s).toContain('-drive if=pflash,format=raw,unit=1,file=/tmp/x/VARS.fd');
    expect(s).toContain('-chardev socket,id=chrtpm,path=/tmp/x/swtpm.sock -tpmdev emulator,id=tpm0,chardev=chrtpm -device tpm-tis,tpmdev=tpm0');
    expect(s).not.toContain('netdev');
  });

  it('plain OVMF has no SMM; firmware without a vars path is a bug', () => {
    const argv = planQemu({ firmware: { code: OVMF.code, vars: OVMF.vars } }, { accel: 'tcg', varsPath: '/v' });
    expect(argv).toContain('q35');
    expect(argv.join(' ')).not.toContain('secure,value=on');
    expect(() => planQemu({ firmware: { code: OVMF.code, vars: OVMF.vars } }, { accel: 'tcg' })).toThrow(/variable store/);
  });

  it('swtpm is a TPM2 on a unix control socket that ends with its VM', () => {
    expect(planSwtpm('/s', '/t/sock')).toEqual(['socket', '--tpm2', '--tpmstate', 'dir=/s', '--ctrl', 'type=unixio,path=/t/sock', '--terminate']);
  });
});

describe('initramfs pieces', () => {
  it('parses ldd output, including the loader, and refuses missing libraries', () => {
    const out = [
      '\tlinux-vdso.so.1 (0x00007ffd)',
      '\tlibcryptsetup.so.12 => /lib/x86_64-linux-gnu/libcryptsetup.so.12 (0x00007f)',
      '\t/lib64/ld-linux-x86-64.so.2 (0x00007f)',
    ].join('\n');
    expect(parseLdd(out, 'x')).toEqual(['/lib/x86_64-linux-gnu/libcryptsetup.so.12', '/lib64/ld-linux-x86-64.so.2']);
    expect(parseLdd('\tnot a dynamic executable\n', 'x')).toEqual([]);
    expect(() => parseLdd('\tlibfoo.so.1 => not found\n', '/usr/bin/x')).toThrow(UserError);
  });

  it('maps host paths into the merged /usr layout', () => {
    expect(mergedPath('/lib64/ld-linux-x86-64.so.2')).toBe('/usr/lib64/ld-linux-x86-64.so.2');
    expect(mergedPath('/sbin/modprobe')).toBe('/usr/sbin/modprobe');
    expect(mergedPath('/usr/bin/x')).toBe('/usr/bin/x');
    expect(mergedPath('/etc/x')).toBe('/etc/x');
  });

  it('writes modules.dep with the first module to load last', () => {
    const text = modulesDepText([
      { name: 'dm_mod', rel: 'kernel/dm-mod.ko', deps: [] },
      { name: 'reed_solomon', rel: 'kernel/rs.ko', deps: [] },
      { name: 'dm_bufio', rel: 'kernel/dm-bufio.ko', deps: ['dm_mod'] },
      { name: 'dm_verity', rel: 'kernel/dm-verity.ko', deps: ['reed_solomon', 'dm_bufio', 'dm_mod'] },
    ]);
    expect(text).toBe(
      'kernel/dm-mod.ko:\nkernel/rs.ko:\nkernel/dm-bufio.ko: kernel/dm-mod.ko\nkernel/dm-verity.ko: kernel/dm-bufio.ko kernel/rs.ko kernel/dm-mod.ko\n',
    );
  });

  it('encodes newc that GNU cpio lists and extracts byte for byte', async () => {
    const data = Buffer.from('hello\nworld\n');
    const archive = encodeNewc([
      { type: 'dir', path: '/etc' },
      { type: 'file', path: '/etc/odd', data: Buffer.from('abc'), mode: 0o600 },
      { type: 'file', path: '/etc/hello', data },
      { type: 'symlink', path: '/etc/link', target: 'hello' },
      { type: 'char', path: '/console', major: 5, minor: 1 },
    ]);
    const list = execFileSync('cpio', ['-t', '-v', '--quiet'], { input: archive }).toString();
    expect(list).toMatch(/^drwxr-xr-x .* etc$/m);
    expect(list).toMatch(/^-rw------- .* etc\/odd$/m);
    expect(list).toMatch(/^lrwxrwxrwx .* etc\/link -> hello$/m);
    expect(list).toMatch(/^crw------- .* 5,\s+1 .* console$/m);
    const out = path.join(dir, 'x');
    await fs.mkdir(out);
    execFileSync('cpio', ['-i', '-d', '--quiet', '--nonmatching', 'console'], { input: archive, cwd: out });
    expect(await fs.readFile(path.join(out, 'etc/hello'))).toEqual(data);
    expect(await fs.readlink(path.join(out, 'etc/link'))).toBe('hello');
  });

  it('builds a gzip initramfs with busybox, a host binary and its libraries, /init and files', async () => {
    const out = await buildInitramfs({
      init: 'echo hi',
      binaries: ['cpio'],
      files: { '/etc/motd': 'x', '/usr/bin/tool': '#!/bin/sh\necho\n', '/etc/key': { data: 'k', mode: 0o600 } },
      out: path.join(dir, 'i.gz'),
    });
    const archive = gunzipSync(await fs.readFile(out));
    const list = execFileSync('cpio', ['-t', '-v', '--quiet'], { input: archive }).toString();
    expect(list).toMatch(/^-rwxr-xr-x .* init$/m);
    expect(list).toMatch(/^lrwxrwxrwx .* lib64 -> usr\/lib64$/m);
    expect(list).toMatch(/^-rwxr-xr-x .* usr\/bin\/busybox$/m);
    expect(list).toMatch(/^lrwxrwxrwx .* usr\/bin\/sh -> busybox$/m);
    expect(list).toMatch(/^-rwxr-xr-x .* usr\/bin\/cpio$/m);
    expect(list).toMatch(/usr\/lib\/x86_64-linux-gnu\/libc\.so\.6$/m);
    expect(list).toMatch(/usr\/lib64\/ld-linux-x86-64\.so\.2$/m);
    expect(list).toMatch(/^crw------- .* 5,\s+1 .* dev\/console$/m);
    expect(list).toMatch(/^-rwxr-xr-x .* usr\/bin\/tool$/m);
    expect(list).toMatch(/^-rw------- .* etc\/key$/m);
    expect(list).toMatch(/^-rw-r--r-- .* etc\/motd$/m);
    // every directory precedes its entries, as the kernel's unpacker requires
    const names = execFileSync('cpio', ['-t', '--quiet'], { input: archive }).toString().split('\n').filter(Boolean);
    const dirs = new Set<string>();
    for (const n of names) {
      const parent = path.posix.dirname(n);
      if (parent !== '.') expect(dirs.has(parent), `${n} before ${parent}`).toBe(true);
      dirs.add(n);
    }
  });
});

describe('fixture device report', () => {
  it('reads the last report block from the serial console', async () => {
    const { parseReport } = await import('../../src/vm/index.js');
    const serial = [
      'LAMADIST-REPORT-BEGIN', 'LAMADIST-REPORT hostname=old', 'LAMADIST-REPORT-END',
      'noise', 'LAMADIST-REPORT-BEGIN\r', 'LAMADIST-REPORT root=/dev/mapper/root erofs ro,relatime\r', 'LAMADIST-REPORT persist=\r', 'LAMADIST-REPORT-END\r',
    ].join('\n');
    expect(parseReport(serial)).toEqual({ root: '/dev/mapper/root erofs ro,relatime', persist: '' });
    expect(parseReport('LAMADIST-REPORT-BEGIN\nLAMADIST-REPORT a=b\n')).toBeUndefined();
  });

  it('writes modules.alias lines for the request_module path', async () => {
    const { modulesAliasText } = await import('../../src/vm/modules.js');
    expect(modulesAliasText([{ name: 'crc32c_generic', rel: 'kernel/crypto/crc32c_generic.ko', deps: [], aliases: ['crypto-crc32c', 'crc32c'] }])).toBe(
      'alias crypto-crc32c crc32c_generic\nalias crc32c crc32c_generic\n',
    );
  });
});
