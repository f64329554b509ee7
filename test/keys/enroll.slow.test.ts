import { createHash } from 'node:crypto';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { keyPath } from '../../src/keys/index.js';
import { OVMF, buildInitramfs, debianKernel, runQemu, type InitramfsFile } from '../../src/vm/index.js';
import { REPO_ROOT, runCli } from '../helpers/cli.js';
import { tempDir } from '../uki/helpers.js';

const EFI_GLOBAL = '8be4df61-93ca-11d2-aa0d-00e098032b8c';
const EFI_DB = 'd719b2cb-3d3a-4596-a3bc-dad00e67656f';
const TIMEOUT = 420_000;
const ENROLL = path.join(REPO_ROOT, 'meta-lamadist/recipes-core/lamadist-installer/files/lamadist-secureboot-enroll');

/**
 * What efi-updatevar writes to efivarfs: the attributes (NV|BS|RT|time-based authenticated) and the
 * .auth file, in one write() so the kernel hands it to SetVariable as one authenticated update.
 */
function efivarfsWrite(auth: Buffer): Buffer {
  const attrs = Buffer.alloc(4);
  attrs.writeUInt32LE(0x27);
  return Buffer.concat([attrs, auth]);
}

// The firmware as the judge of our signed variable updates: OVMF starts in setup mode (Debian's
// blank variable store) and the guest runs meta-lamadist's lamadist-secureboot-enroll, which writes
// PK.auth, then KEK.auth (the firmware checks it against the enrolled PK), then db.auth (checked
// against KEK) through efivarfs. A db.auth from another key directory must be refused once PK and
// KEK are in place.
describe('enrolling the key directory\'s .auth files in OVMF setup mode', () => {
  const t = tempDir('lamadist-enroll-');
  let serial = '';
  const eslSize: Record<string, number> = {};
  let dbEslSha = '';

  beforeAll(async () => {
    const keys = path.join(t.dir, 'keys');
    expect((await runCli(['keys', 'init', keys])).code).toBe(0);
    const files: Record<string, InitramfsFile> = {};
    for (const name of ['PK', 'KEK', 'db'] as const) {
      const lower = name.toLowerCase() as 'pk' | 'kek' | 'db';
      files[`/keys/${name}.auth`] = await fs.readFile(await keyPath(keys, `secureboot-${lower}-auth`));
      const esl = await fs.readFile(await keyPath(keys, `secureboot-${lower}-esl`));
      eslSize[name] = esl.length;
      if (name === 'db') dbEslSha = createHash('sha256').update(esl).digest('hex');
    }
    // db.auth re-signed by PK instead of KEK: valid PKCS#7, wrong signer for db.
    const wrong = path.join(t.dir, 'other');
    expect((await runCli(['keys', 'init', wrong])).code).toBe(0);
    files['/keys/db-wrong.var'] = efivarfsWrite(await fs.readFile(path.join(wrong, 'db.auth')));
    files['/sbin/lamadist-secureboot-enroll'] = { data: await fs.readFile(ENROLL), mode: 0o755 };
    const kernel = await debianKernel();
    const initrd = await buildInitramfs({
      init: [
        'mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev',
        'modprobe efivarfs; mount -t efivarfs efivarfs /sys/firmware/efi/efivars',
        `sm() { echo "SETUPMODE=$(cat /sys/firmware/efi/efivars/SetupMode-${EFI_GLOBAL} | tail -c 1 | od -An -tu1 | tr -d ' ')"; }`,
        'sm',
        // The installer's step: meta-lamadist's enrollment script on the key directory's files.
        'lamadist-secureboot-enroll /keys; echo "RC_ENROLL=$?"',
        'sm',
        // Run again, the firmware now in user mode: a warning, nothing written.
        'lamadist-secureboot-enroll /keys; echo "RC_AGAIN=$?"',
        `put() { dd if=/keys/$1.var of=/sys/firmware/efi/efivars/$2 bs=64k 2>/dev/null; echo "RC_$3=$?"; }`,
        `put db-wrong db-${EFI_DB} DB_WRONG`,
        `for v in PK KEK; do echo "$v=$(cat /sys/firmware/efi/efivars/$v-${EFI_GLOBAL} | wc -c)"; done`,
        `echo "DB=$(cat /sys/firmware/efi/efivars/db-${EFI_DB} | wc -c)"`,
        `echo "DBSHA=$(cat /sys/firmware/efi/efivars/db-${EFI_DB} | tail -c +5 | sha256sum)"`,
        'echo LAMA-ENROLL-DONE',
        'poweroff -f',
      ].join('\n'),
      modules: ['efivarfs'],
      files,
      out: path.join(t.dir, 'initrd.gz'),
    });
    const r = await runQemu({
      kernel: kernel.vmlinuz,
      initrd,
      append: 'console=ttyS0,115200 panic=-1',
      firmware: { code: OVMF.secbootCode, vars: OVMF.vars },
      network: false,
      memMiB: 768,
      timeoutMs: TIMEOUT - 30_000,
      until: /LAMA-ENROLL-DONE/,
      serialLog: path.join(t.dir, 'serial.log'),
    });
    serial = r.serial.replace(/\r/g, '');
    expect(r.timedOut, serial.slice(-3000)).toBe(false);
  }, TIMEOUT);
  afterAll(() => t.remove());

  it('lamadist-secureboot-enroll enrolls PK, then KEK signed by PK and db signed by KEK, in setup mode, which it leaves', () => {
    expect(serial).toMatch(/SETUPMODE=1\n[\s\S]*lamadist-secureboot-enroll: enrolled PK, KEK and db[^\n]*\nRC_ENROLL=0\n[\s\S]*SETUPMODE=0\n/);
  });

  it('leaves firmware in user mode alone with a one-line warning', () => {
    expect(serial).toMatch(/lamadist-secureboot-enroll: warning: the firmware is in user mode[^\n]*\nRC_AGAIN=0\n/);
  });

  it('the enrolled variables are the key directory\'s; a db.auth from another key directory is refused', () => {
    expect(serial).toMatch(/RC_DB_WRONG=[1-9]\d*\n/);
    // efivarfs shows 4 attribute bytes and the signature list the firmware stored: ours, not the
    // other directory's. (db goes first: a refused write of a variable that does not exist yet
    // leaves an efivarfs entry behind that makes the next write of that name fail.)
    expect(Number(/\nPK=(\d+)/.exec(serial)?.[1])).toBe(4 + (eslSize.PK ?? 0));
    expect(Number(/\nKEK=(\d+)/.exec(serial)?.[1])).toBe(4 + (eslSize.KEK ?? 0));
    expect(Number(/\nDB=(\d+)/.exec(serial)?.[1])).toBe(4 + (eslSize.db ?? 0));
    expect(/DBSHA=([0-9a-f]{64})/.exec(serial)?.[1]).toBe(dbEslSha);
  });
});
