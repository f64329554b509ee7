/**
 * A fleet release with its UKI, and a software TPM put into the state a device booted from it
 * leaves: the server attestation tests and the device agent's tests start from both.
 */
import { randomBytes } from 'node:crypto';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { EV_EFI_VARIABLE_DRIVER_CONFIG, EV_SEPARATOR } from '../../src/attestation/index.js';
import { getBsp } from '../../src/bsp/index.js';
import { extendPcr, type Swtpm } from '../../src/fuzz/swtpm.js';
import { initKeys, keyPath, signingPair } from '../../src/keys/index.js';
import { predictPcr11 } from '../../src/measure/index.js';
import { createRelease, openRelease, releaseUki } from '../../src/release/index.js';
import { GUID } from '../../src/secureboot/efivars.js';
import { tinyRoot } from '../helpers/root.js';
import { STUB } from '../uki/helpers.js';
import { eventLog, imaRecord, variableEventData, type LogEvent } from './logs.js';

/** The machine-id of the release's one host, dev1. */
export const MID = 'c0ffee'.padEnd(32, '0');

export interface SecureBootLists {
  pk: Buffer;
  kek: Buffer;
  db: Buffer;
}

export interface AttestationRelease {
  /** The fleet key directory (`lamadist server --keys`). */
  keys: string;
  esl: SecureBootLists;
  /** The signed release bundle, version 2.0. */
  bundle: string;
  /** Host dev1's UKI for slot A. */
  uki: Buffer;
}

/**
 * A small but real release under `dir`: fleet keys, an EROFS root with its dm-verity tree, one host
 * (dev1, machine-id MID), both slots' UKIs.
 */
export async function attestationRelease(dir: string): Promise<AttestationRelease> {
  const keys = path.join(dir, 'keys');
  await initKeys(keys, { commonName: 'attest' });
  const esl = {
    pk: await fs.readFile(await keyPath(keys, 'secureboot-pk-esl')),
    kek: await fs.readFile(await keyPath(keys, 'secureboot-kek-esl')),
    db: await fs.readFile(await keyPath(keys, 'secureboot-db-esl')),
  };
  const { rootfs, verity, rootHash } = await tinyRoot(dir, { osRelease: 'ID=lamadist\nVERSION_ID=1\n', salt: 7 });
  const bundle = path.join(dir, 'release.raucb');
  await createRelease({
    out: bundle,
    bsp: getBsp('x86_64'),
    rootHash,
    stub: STUB,
    kernel: randomBytes(256 * 1024),
    initrd: [randomBytes(64 * 1024)],
    hosts: [{ name: 'dev1', machineId: MID, args: ['systemd.hostname=dev1', `systemd.machine_id=${MID}`] }],
    db: await signingPair(keys, 'secureboot-db'),
    version: '2.0',
    rootfs,
    verity,
    signer: await signingPair(keys, 'rauc-signing'),
  });
  const opened = await openRelease(bundle, { keys });
  try {
    return { keys, esl, bundle, uki: await releaseUki(opened, MID, 'a') };
  } finally {
    await opened.close();
  }
}

/**
 * Power-cycle `tpm` and measure a boot of `image` into it: PCR 7 as OVMF measures Secure Boot
 * (`secureBoot` 1 unless given) under `esl`, PCR 10 as IMA measures two files, PCR 11 as
 * systemd-stub measures the UKI. Returns the UEFI event log and the binary IMA list that explain them.
 */
export async function bootSwtpm(tpm: Swtpm, o: { esl: SecureBootLists; image: Buffer; secureBoot?: number }): Promise<{ eventLog: Buffer; imaLog: Buffer }> {
  await tpm.reboot();
  const v = (guid: string, name: string, data: Buffer): LogEvent => ({ pcr: 7, type: EV_EFI_VARIABLE_DRIVER_CONFIG, data: variableEventData(guid, name, data) });
  const log = eventLog([
    v(GUID.globalVariable, 'SecureBoot', Buffer.from([o.secureBoot ?? 1])),
    v(GUID.globalVariable, 'PK', o.esl.pk),
    v(GUID.globalVariable, 'KEK', o.esl.kek),
    v(GUID.imageSecurityDatabase, 'db', o.esl.db),
    { pcr: 7, type: EV_SEPARATOR, data: Buffer.alloc(4) },
  ]);
  for (const e of log.extends) await extendPcr(tpm, e.pcr, e.digest);
  const ima = [imaRecord({ path: 'boot_aggregate', fileDigest: randomBytes(32) }), imaRecord({ path: '/usr/bin/rauc', fileDigest: randomBytes(32) })];
  for (const r of ima) await extendPcr(tpm, 10, r.extend);
  for (const step of predictPcr11(o.image).steps) await extendPcr(tpm, 11, Buffer.from(step.digest, 'hex'));
  return { eventLog: log.log, imaLog: Buffer.concat(ima.map((r) => r.binary)) };
}
