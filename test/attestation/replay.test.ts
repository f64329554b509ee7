import { createHash, randomBytes } from 'node:crypto';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  EV_EFI_VARIABLE_AUTHORITY,
  EV_EFI_VARIABLE_DRIVER_CONFIG,
  EV_SEPARATOR,
  appraise,
  checkPcr7,
  parseEventLog,
  parseImaAscii,
  parseImaBinary,
  parseImaLog,
  replayIma,
  replayPcr,
  type Evidence,
  type SecureBootKeys,
} from '../../src/attestation/index.js';
import { createAk, extendPcr, quote, startSwtpm, type Swtpm } from '../../src/fuzz/swtpm.js';
import { initKeys, keyPath } from '../../src/keys/index.js';
import { GUID, makeEsl } from '../../src/secureboot/efivars.js';
import { run } from '../../src/util/proc.js';
import { userErrorOf } from '../helpers/errors.js';
import { eventLog, imaRecord, variableEventData, type LogEvent } from './logs.js';

const sha256 = (b: Buffer): Buffer => createHash('sha256').update(b).digest();

let dir: string;
let tpm: Swtpm;
let fleet: SecureBootKeys;
let fleetCerts: { pk: string; kek: string; db: string };
let ak: { context: string; public: Buffer };

/** PCR 7 events as OVMF with Secure Boot enforcing writes them; `keys` are the enrolled lists. */
function secureBootEvents(keys: SecureBootKeys, secureBoot = 1): LogEvent[] {
  const v = (guid: string, name: string, data: Buffer): LogEvent => ({ pcr: 7, type: EV_EFI_VARIABLE_DRIVER_CONFIG, data: variableEventData(guid, name, data) });
  return [
    v(GUID.globalVariable, 'SecureBoot', Buffer.from([secureBoot])),
    v(GUID.globalVariable, 'PK', keys.pk),
    v(GUID.globalVariable, 'KEK', keys.kek),
    v(GUID.imageSecurityDatabase, 'db', keys.db),
    v(GUID.imageSecurityDatabase, 'dbx', Buffer.alloc(0)),
    { pcr: 7, type: EV_SEPARATOR, data: Buffer.alloc(4) },
    { pcr: 7, type: EV_EFI_VARIABLE_AUTHORITY, data: variableEventData(GUID.imageSecurityDatabase, 'db', keys.db.subarray(28)) },
    // PCR 4 (boot applications) interleaves with PCR 7 in a real log.
    { pcr: 4, type: 0x80000003, data: randomBytes(64), digest: randomBytes(32) },
  ];
}

/** Extend the TPM as the firmware and kernel would for these logs, and quote PCRs 7, 10, 11. */
async function boot(events: LogEvent[], ima: ReturnType<typeof imaRecord>[], pcr11: Buffer): Promise<Evidence & { log: Buffer }> {
  await tpm.reboot();
  const { log, extends: ext } = eventLog(events);
  for (const e of ext) await extendPcr(tpm, e.pcr, e.digest);
  for (const r of ima) await extendPcr(tpm, 10, r.extend);
  await extendPcr(tpm, 11, pcr11);
  const nonce = randomBytes(32);
  const q = await quote(tpm, dir, ak.context, nonce, [7, 10, 11]);
  return { quote: q.quote, signature: q.signature, akPublic: ak.public, nonce, pcrs: q.pcrs, eventLog: log, imaLog: Buffer.concat(ima.map((r) => r.binary)), log };
}

beforeAll(async () => {
  dir = await fs.mkdtemp(path.join(os.tmpdir(), 'lamadist-replay-'));
  const keys = path.join(dir, 'keys');
  await initKeys(keys, { commonName: 'replay' });
  const read = async (p: 'secureboot-pk-esl' | 'secureboot-kek-esl' | 'secureboot-db-esl'): Promise<Buffer> => fs.readFile(await keyPath(keys, p));
  fleet = { pk: await read('secureboot-pk-esl'), kek: await read('secureboot-kek-esl'), db: await read('secureboot-db-esl') };
  fleetCerts = {
    pk: await fs.readFile(await keyPath(keys, 'secureboot-pk-cert'), 'utf8'),
    kek: await fs.readFile(await keyPath(keys, 'secureboot-kek-cert'), 'utf8'),
    db: await fs.readFile(await keyPath(keys, 'secureboot-db-cert'), 'utf8'),
  };
  tpm = await startSwtpm(dir);
  ak = await createAk(tpm, dir, 'ecdsa', 0x81010020);
}, 120_000);

afterAll(async () => {
  await tpm?.close();
  await fs.rm(dir, { recursive: true, force: true });
});

const imaList = (): ReturnType<typeof imaRecord>[] => [
  imaRecord({ path: 'boot_aggregate', fileDigest: randomBytes(32) }),
  imaRecord({ path: '/usr/sbin/lamadist-init', fileDigest: randomBytes(32) }),
  imaRecord({ path: '/usr/lib/x86_64-linux-gnu/libc.so.6', fileDigest: randomBytes(32), sig: randomBytes(40) }),
  imaRecord({ path: '/var/log/opened-for-write', fileDigest: Buffer.alloc(32), violation: true }),
  imaRecord({ path: '/usr/bin/caf\xe9', fileDigest: randomBytes(32) }),
];

describe('IMA measurement list replay against a quoted PCR 10', () => {
  it('the binary and the ASCII list both replay to the PCR 10 the TPM quotes', async () => {
    const ima = imaList();
    const ev = await boot([], ima, randomBytes(32));
    const binary = parseImaBinary(ev.imaLog as Buffer);
    const ascii = Buffer.from(ima.map((r) => r.ascii).join(''), 'latin1');
    expect(binary.map((e) => e.template)).toEqual(['ima-ng', 'ima-ng', 'ima-sig', 'ima-ng', 'ima-ng']);
    expect(binary[3]?.violation).toBe(true);
    expect(replayIma(binary).equals(ev.pcrs[10] as Buffer)).toBe(true);
    expect(replayIma(parseImaLog(ascii)).equals(ev.pcrs[10] as Buffer)).toBe(true);
    // Rebuilt from ASCII, each entry's template data is the kernel's, byte for byte.
    expect(parseImaAscii(ascii.toString('latin1')).map((e) => e.data.toString('hex'))).toEqual(binary.map((e) => e.data.toString('hex')));
    // One entry fewer, or the SHA-256 bank extended with the SHA-1 digest, does not replay.
    expect(replayIma(binary.slice(0, -1)).equals(ev.pcrs[10] as Buffer)).toBe(false);
    expect(replayIma(binary, 11).equals(Buffer.alloc(32))).toBe(true);
  });

  it('refuses a list that does not rebuild exactly, with the line or byte', () => {
    const ima = imaList();
    const ascii = ima.map((r) => r.ascii).join('');
    const edited = ascii.replace('lamadist-init', 'lamadist-evil');
    const e = userErrorOf(() => parseImaAscii(edited));
    expect(e.code).toBe('LAMA_E_ATTEST_IMA');
    expect(e.where).toBe('IMA list line 2');
    expect(userErrorOf(() => parseImaAscii('10 abc ima-ng x\n')).code).toBe('LAMA_E_ATTEST_IMA');
    expect(userErrorOf(() => parseImaAscii(ascii.replace(/ ima-ng /, ' evm-sig '))).message).toMatch(/send the binary list/);
    const binary = Buffer.concat(ima.map((r) => r.binary));
    for (let n = 1; n < binary.length; n += 7) {
      const cut = (() => {
        try {
          parseImaBinary(binary.subarray(0, n));
          return undefined;
        } catch (err) {
          return err as { code: string };
        }
      })();
      // A cut on an entry boundary is a shorter valid list; anywhere else it is truncated.
      if (cut) expect(cut.code, `cut to ${n}`).toBe('LAMA_E_ATTEST_TRUNCATED');
    }
    const flipped = Buffer.from(binary);
    flipped[flipped.length - 3] = (flipped[flipped.length - 3] as number) ^ 1;
    expect(userErrorOf(() => parseImaBinary(flipped)).message).toMatch(/does not hash to its listed SHA-1 template digest/);
  });
});

describe('UEFI event log and PCR 7', () => {
  it('replays PCR 7 as the TPM quotes it and as tpm2_eventlog computes it, and finds the fleet keys', async () => {
    const ev = await boot(secureBootEvents(fleet), [], randomBytes(32));
    const log = parseEventLog(ev.log);
    expect(replayPcr(log, 7).equals(ev.pcrs[7] as Buffer)).toBe(true);
    const file = path.join(dir, 'bios.bin');
    await fs.writeFile(file, ev.log);
    const peer = await run('tpm2_eventlog', [file]);
    const peer7 = /^\s+7\s*: 0x([0-9A-Fa-f]{64})$/m.exec(peer.stdout.slice(peer.stdout.lastIndexOf('sha256:')))?.[1];
    expect(peer7?.toLowerCase()).toBe(replayPcr(log, 7).toString('hex'));
    expect(checkPcr7(log, ev.pcrs[7] as Buffer, fleet)).toEqual([]);
  });

  it('lists enrolled with another owner GUID are still the fleet keys', async () => {
    const owner = '11111111-2222-3333-4444-555555555555';
    const other = { pk: makeEsl(fleetCerts.pk, owner), kek: makeEsl(fleetCerts.kek, owner), db: makeEsl(fleetCerts.db, owner) };
    const ev = await boot(secureBootEvents(other), [], randomBytes(32));
    expect(checkPcr7(parseEventLog(ev.log), ev.pcrs[7] as Buffer, fleet)).toEqual([]);
  });

  it('says why PCR 7 is not the fleet: Secure Boot off, foreign db, a log that does not replay, a lying event', async () => {
    const off = await boot(secureBootEvents(fleet, 0), [], randomBytes(32));
    expect(checkPcr7(parseEventLog(off.log), off.pcrs[7] as Buffer, fleet)).toEqual(['SecureBoot is 00, not 01: Secure Boot is not enforcing']);
    const foreign = { ...fleet, db: makeEsl(fleetCerts.kek, '11111111-2222-3333-4444-555555555555') };
    const f = await boot(secureBootEvents(foreign), [], randomBytes(32));
    expect(checkPcr7(parseEventLog(f.log), f.pcrs[7] as Buffer, fleet)).toEqual(["db holds 1 entry that differ from the fleet's db certificates"]);
    // A log that claims the fleet's keys while the TPM measured others does not replay.
    const claimed = parseEventLog(eventLog(secureBootEvents(fleet)).log);
    const problems = checkPcr7(claimed, f.pcrs[7] as Buffer, fleet);
    expect(problems).toHaveLength(1);
    expect(problems[0]).toMatch(/^event log replays PCR 7 to [0-9a-f]{64}, the TPM quoted [0-9a-f]{64}$/);
    // An event whose data says SecureBoot=1 but whose digest is of something else.
    const events = secureBootEvents(fleet);
    events[0] = { ...(events[0] as LogEvent), digest: sha256(variableEventData(GUID.globalVariable, 'SecureBoot', Buffer.from([0]))) };
    const lie = await boot(events, [], randomBytes(32));
    expect(checkPcr7(parseEventLog(lie.log), lie.pcrs[7] as Buffer, fleet)).toEqual([
      'event at byte 69 does not hash to the digest extended into PCR 7',
      'SecureBoot variable is not measured',
    ]);
  });

  it('refuses malformed logs with their code and offset', () => {
    const { log } = eventLog(secureBootEvents(fleet));
    expect(userErrorOf(() => parseEventLog(log.subarray(0, log.length - 1))).code).toBe('LAMA_E_ATTEST_TRUNCATED');
    expect(userErrorOf(() => parseEventLog(log.subarray(0, 30))).where).toBe('event log at byte 28');
    const sha1Only = Buffer.from(log);
    sha1Only.write('Spec ID Event02', 32, 'latin1');
    expect(userErrorOf(() => parseEventLog(sha1Only)).code).toBe('LAMA_E_ATTEST_EVENTLOG');
  });
});

describe('appraise: one verdict per PCR', () => {
  it('attested when the quote verifies and PCRs 7, 10 and 11 are the fleet\'s; failed naming the PCR otherwise', async () => {
    const uki = randomBytes(32);
    const ev = await boot(secureBootEvents(fleet), imaList(), uki);
    const expected11 = sha256(Buffer.concat([Buffer.alloc(32), uki])).toString('hex');
    const good = appraise(ev, { pcr11: [expected11], secureBoot: fleet });
    expect(good.checks.map((c) => [c.pcr, c.ok])).toEqual([
      [7, true],
      [10, true],
      [11, true],
    ]);
    expect(good.state).toBe('attested');
    const other = appraise(ev, { pcr11: ['00'.repeat(32)], secureBoot: fleet });
    expect(other.state).toBe('failed');
    expect(other.checks.filter((c) => !c.ok).map((c) => c.pcr)).toEqual([11]);
    expect(other.checks[2]?.reason).toMatch(/booted another UKI or command line/);
    const noLogs = appraise({ ...ev, imaLog: undefined, eventLog: Buffer.from('junk') }, { pcr11: [expected11], secureBoot: fleet });
    expect(noLogs.checks.filter((c) => !c.ok).map((c) => [c.pcr, c.reason.replace(/ at byte \d+/, '')])).toEqual([
      [7, expect.stringMatching(/^event log: .*\[LAMA_E_ATTEST_TRUNCATED\]$/)],
      [10, 'no IMA measurement list was sent'],
    ]);
    expect(userErrorOf(() => appraise({ ...ev, nonce: randomBytes(32) }, { pcr11: [expected11], secureBoot: fleet })).code).toBe('LAMA_E_ATTEST_NONCE');
  });
});
