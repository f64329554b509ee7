import { execFileSync } from 'node:child_process';
import { copyFileSync, mkdirSync, readFileSync, statSync, truncateSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Rng } from '../../src/fuzz/mutate.js';
import { initKeys, keyPath } from '../../src/keys/index.js';
import { openEscrow, parseRecord, renderRecord, type RecoveryRecord } from '../../src/recovery/index.js';
import { runCli } from '../helpers/cli.js';
import { tempDir } from '../uki/helpers.js';
import { userErrorOf } from '../helpers/errors.js';

const t = tempDir('lamadist-recovery-');
const keys = path.join(t.dir, 'keys');
const KEY = 'cbdefghi-jklnrtuv-cbdefghi-jklnrtuv-vutrnlkj-ihgfedcb-vutrnlkj-ihgfedcb';
const RECORD: RecoveryRecord = {
  host: 'node01',
  machineId: '4f6c0a9e1d2b4c3e8a7f6b5c4d3e2f1a',
  luks: [
    { label: 'rootfs_a', uuid: '0b7c2a1e-1111-4222-8333-444455556666' },
    { label: 'rootfs_b', uuid: '1b7c2a1e-1111-4222-8333-444455556666' },
    { label: 'var', uuid: '2b7c2a1e-1111-4222-8333-444455556666' },
  ],
  key: KEY,
};
let pair: { certPem: string; keyPem: string };
let cert: string;
let escrow: Buffer;

const OAEP = ['-keyopt', 'rsa_padding_mode:oaep', '-keyopt', 'rsa_oaep_md:sha256', '-keyopt', 'rsa_mgf1_md:sha256'];

/** Encrypt a record to `recip` with the installer's command line, or a variant of its cipher and key options. */
function installerEscrow(recordText: string, recip: string, name: string, variant: { cipher?: string; keyopts?: string[]; keyid?: boolean } = {}): string {
  const rec = path.join(t.dir, `${name}.record`);
  const out = path.join(t.dir, `${name}.cms`);
  writeFileSync(rec, recordText);
  const args = ['cms', '-encrypt', '-binary', variant.cipher ?? '-aes-256-cbc', '-outform', 'DER', '-recip', recip, ...(variant.keyid ? ['-keyid'] : []), ...(variant.keyopts ?? OAEP), '-in', rec, '-out', out];
  execFileSync('openssl', args, { stdio: 'pipe' });
  return out;
}


beforeAll(async () => {
  await initKeys(keys);
  cert = await keyPath(keys, 'recovery-cert');
  pair = { certPem: readFileSync(cert, 'utf8'), keyPem: readFileSync(await keyPath(keys, 'recovery-key'), 'utf8') };
  escrow = readFileSync(installerEscrow(renderRecord(RECORD), cert, 'node01'));
}, 120_000);
afterAll(() => t.remove());

describe('recovery record', () => {
  it('renders the installer layout and parses back', () => {
    const text = renderRecord(RECORD);
    expect(text).toBe(
      `lamadist-recovery 1\nhost node01\nmachine-id 4f6c0a9e1d2b4c3e8a7f6b5c4d3e2f1a\nluks rootfs_a 0b7c2a1e-1111-4222-8333-444455556666\nluks rootfs_b 1b7c2a1e-1111-4222-8333-444455556666\nluks var 2b7c2a1e-1111-4222-8333-444455556666\nkey ${KEY}\n`,
    );
    expect(parseRecord(text)).toEqual(RECORD);
    expect(parseRecord(Buffer.from(text.trimEnd()))).toEqual(RECORD);
    expect(parseRecord(text.replace('0b7c2a1e', '0B7C2A1E')).luks[0]?.uuid).toBe('0b7c2a1e-1111-4222-8333-444455556666');
  });

  it('refuses malformed records with record:LINE and never quotes the passphrase', () => {
    const good = renderRecord(RECORD).split('\n');
    const edit = (i: number, line: string | undefined): string => good.map((l, j) => (j === i ? line : l)).filter((l) => l !== undefined).join('\n');
    const cases: [string | Buffer, string, RegExp][] = [
      ['', 'record:1', /not a LamaDist recovery record/],
      [edit(0, 'lamadist-recovery 2'), 'record:1', /unsupported record version/],
      [edit(0, 'hello'), 'record:1', /not a LamaDist recovery record/],
      [edit(1, 'host bad.name'), 'record:2', /host 'bad\.name' is not a valid/],
      [edit(1, 'hostname x'), 'record:2', /expected 'host <name>'/],
      [edit(2, 'machine-id 00000000000000000000000000000000'), 'record:3', /machine-id/],
      [edit(3, 'luks rootfs_a not-a-uuid'), 'record:4', /LUKS UUID 'not-a-uuid'/],
      [edit(3, 'luks rootfs a 0b7c2a1e-1111-4222-8333-444455556666'), 'record:4', /expected 'luks/],
      [edit(4, good[3]), 'record:5', /container rootfs_a is listed twice/],
      [edit(3, undefined).replace(/luks.*\n/g, ''), 'record:4', /at least one container/],
      [edit(6, `key ${KEY} x`), 'record:7', /printable ASCII characters without spaces/],
      [edit(6, `key ${'a'.repeat(257)}`), 'record:7', /1 to 256/],
      [edit(6, 'key '), 'record:7', /1 to 256/],
      [edit(6, `key ${KEY}\r`), 'record:7', /carriage return/],
      [edit(6, undefined), 'record:7', /ends before its key line/],
      [renderRecord(RECORD) + 'extra\n', 'record:8', /unexpected line after the key/],
      [Buffer.concat([Buffer.from(good.slice(0, 6).join('\n') + '\nkey '), Buffer.from([0xff, 0xfe])]), 'record:7', /not UTF-8/],
    ];
    for (const [input, where, re] of cases) {
      const e = userErrorOf(() => parseRecord(input));
      expect(e.code, String(re)).toBe('LAMA_E_RECOVERY_RECORD');
      expect(e.where).toBe(where);
      expect(e.message).toMatch(re);
      expect(e.line()).not.toContain(KEY.slice(0, 8));
    }
    const many = renderRecord({ ...RECORD, luks: Array.from({ length: 16 }, (_, i) => ({ label: `p${i}`, uuid: `${String(i).padStart(8, '0')}-1111-4222-8333-444455556666` })) });
    expect(parseRecord(many).luks).toHaveLength(16);
    const tooMany = many.replace('key ', 'luks p16 99999999-1111-4222-8333-444455556666\nkey ');
    expect(userErrorOf(() => parseRecord(tooMany)).line()).toMatch(/^record:20: more than 16 containers/);
  });
});

describe('escrow made by openssl cms -encrypt (the installer command)', () => {
  it('opens to the record', () => {
    expect(openEscrow(escrow, pair, 'node01.cms')).toEqual(RECORD);
  });

  it('also opens AES-128-CBC content and a recipient named by subject key identifier', () => {
    const aes128 = installerEscrow(renderRecord(RECORD), cert, 'aes128', { cipher: '-aes-128-cbc' });
    expect(openEscrow(readFileSync(aes128), pair)).toEqual(RECORD);
    const ski = installerEscrow(renderRecord(RECORD), cert, 'ski', { keyid: true });
    expect(execFileSync('openssl', ['cms', '-cmsout', '-print', '-inform', 'DER', '-in', ski], { encoding: 'utf8' })).toMatch(/subjectKeyIdentifier/);
    expect(openEscrow(readFileSync(ski), pair)).toEqual(RECORD);
  });

  it('refuses an escrow encrypted to another certificate, and PKCS#1 v1.5 key transport, in one line', () => {
    const other = path.join(t.dir, 'other');
    execFileSync('openssl', ['req', '-x509', '-newkey', 'rsa:3072', '-nodes', '-keyout', `${other}.key`, '-out', `${other}.crt`, '-subj', '/CN=another fleet', '-days', '30'], { stdio: 'pipe' });
    const foreign = readFileSync(installerEscrow(renderRecord(RECORD), `${other}.crt`, 'foreign'));
    const e = userErrorOf(() => openEscrow(foreign, pair, 'foreign.cms'));
    expect(e.line()).toBe("foreign.cms: not encrypted to this fleet's recovery certificate [LAMA_E_ESCROW_RECIPIENT]");
    const v15 = readFileSync(installerEscrow(renderRecord(RECORD), cert, 'v15', { keyopts: [] }));
    expect(userErrorOf(() => openEscrow(v15, pair, 'v15.cms')).line()).toMatch(/^v15\.cms@\d+: .*PKCS#1 v1\.5; escrows use RSA-OAEP.*\[LAMA_E_ESCROW\]$/);
  });

  it('a record the recovery key opens but that is not valid is refused on its line', () => {
    const bad = readFileSync(installerEscrow(renderRecord(RECORD).replace('machine-id 4f', 'machine-id 4F'), cert, 'badrecord'));
    expect(userErrorOf(() => openEscrow(bad, pair, 'bad.cms')).line()).toMatch(/^bad\.cms record:3: machine-id .*\[LAMA_E_RECOVERY_RECORD\]$/);
  });

  it('every truncation is a one-line UserError naming a byte offset', () => {
    for (let n = 0; n < escrow.length; n++) {
      const e = userErrorOf(() => openEscrow(escrow.subarray(0, n), pair, 'cut.cms'));
      expect(e.code, `length ${n}`).toBe('LAMA_E_ESCROW');
      expect(e.where, `length ${n}`).toMatch(/^cut\.cms@\d+$/);
      expect(e.line()).not.toContain('\n');
    }
    expect(userErrorOf(() => openEscrow(Buffer.concat([escrow, Buffer.from([0])]), pair, 'long.cms')).line()).toBe(`long.cms@${escrow.length}: 1 bytes follow the CMS structure [LAMA_E_ESCROW]`);
  });

  it('200 seeded single-byte edits are each refused with a one-line UserError', () => {
    const rng = new Rng(13);
    const codes = new Map<string, number>();
    for (let n = 0; n < 200; n++) {
      const bad = Buffer.from(escrow);
      const at = rng.int(bad.length);
      bad[at] = ((bad[at] as number) ^ (1 + rng.int(255))) & 0xff;
      const e = userErrorOf(() => openEscrow(bad, pair, 'edit.cms'));
      expect(e.line(), `byte ${at}`).not.toContain('\n');
      expect(e.line()).not.toContain(KEY.slice(0, 8));
      codes.set(e.code, (codes.get(e.code) ?? 0) + 1);
    }
    expect([...codes.keys()].every((c) => ['LAMA_E_ESCROW', 'LAMA_E_ESCROW_RECIPIENT', 'LAMA_E_RECOVERY_RECORD'].includes(c)), JSON.stringify([...codes])).toBe(true);
  });
});

describe('lamadist recovery-key', () => {
  let stick: string;
  beforeAll(() => {
    stick = path.join(t.dir, 'stick');
    mkdirSync(path.join(stick, 'escrow'), { recursive: true });
    writeFileSync(path.join(stick, 'escrow', 'node01.cms'), escrow);
    // An escrow filed under the wrong name: the record inside says node01.
    copyFileSync(path.join(stick, 'escrow', 'node01.cms'), path.join(stick, 'escrow', 'node02.cms'));
  });

  it('prints the passphrase alone on stdout, from a .cms file or a stick directory', async () => {
    for (const where of [path.join(stick, 'escrow', 'node01.cms'), stick, path.join(stick, 'escrow')]) {
      const r = await runCli(['recovery-key', 'node01', '--keys', keys, '--escrow', where]);
      expect(r.code, r.stderr).toBe(0);
      expect(r.stdout).toBe(`${KEY}\n`);
      expect(r.stderr).toBe('');
    }
  });

  it('--json carries host, machine-id, containers, escrow and key', async () => {
    const r = await runCli(['--json', 'recovery-key', 'node01', '--keys', keys, '--escrow', stick]);
    expect(r.code, r.stderr).toBe(0);
    expect(JSON.parse(r.stdout)).toEqual({ host: 'node01', machineId: RECORD.machineId, luks: RECORD.luks, escrow: path.join(stick, 'escrow', 'node01.cms'), key: KEY });
  });

  it('--out writes the passphrase 0600 without a newline, refuses to replace it without --force, and --json then omits the key', async () => {
    const out = path.join(t.dir, 'node01.key');
    const r = await runCli(['--json', 'recovery-key', 'node01', '--keys', keys, '--escrow', stick, '--out', out]);
    expect(r.code, r.stderr).toBe(0);
    expect(readFileSync(out, 'utf8')).toBe(KEY);
    expect(statSync(out).mode & 0o777).toBe(0o600);
    const json = JSON.parse(r.stdout) as Record<string, unknown>;
    expect(json).not.toHaveProperty('key');
    expect(r.stdout + r.stderr).not.toContain(KEY);
    const again = await runCli(['recovery-key', 'node01', '--keys', keys, '--escrow', stick, '--out', out]);
    expect(again.code).toBe(2);
    expect(again.stderr).toMatch(/already exists.*--force.*LAMA_E_EXISTS/);
    writeFileSync(out, 'old');
    const forced = await runCli(['recovery-key', 'node01', '--keys', keys, '--escrow', stick, '--out', out, '--force']);
    expect(forced.code, forced.stderr).toBe(0);
    expect(forced.stdout).toBe('');
    expect(readFileSync(out, 'utf8')).toBe(KEY);
  });

  it('refuses an escrow of another host, a missing escrow and a key directory without a recovery key, in one line with exit 2', async () => {
    const wrong = await runCli(['recovery-key', 'node02', '--keys', keys, '--escrow', stick]);
    expect(wrong.code).toBe(2);
    expect(wrong.stdout).toBe('');
    expect(wrong.stderr.trim().split('\n')).toEqual([expect.stringMatching(/escrow\/node02\.cms: the escrow holds the recovery key of host node01, not of node02 \[LAMA_E_ESCROW_HOST\]$/)]);
    const missing = await runCli(['recovery-key', 'node03', '--keys', keys, '--escrow', stick]);
    expect(missing.code).toBe(2);
    expect(missing.stderr.trim().split('\n')).toEqual([expect.stringMatching(/no escrow of host node03 in .*node03\.cms and escrow\/node03\.cms\) \[LAMA_E_NOT_FOUND\]$/)]);
    const none = await runCli(['recovery-key', 'node01', '--keys', keys, '--escrow', path.join(t.dir, 'nowhere.cms')]);
    expect(none.code).toBe(2);
    expect(none.stderr).toMatch(/nowhere\.cms does not exist/);
    const bare = path.join(t.dir, 'bare-keys');
    mkdirSync(bare);
    writeFileSync(path.join(bare, 'manifest.json'), JSON.stringify({ version: 1, created: new Date().toISOString(), owner: 'x', files: [] }));
    const nokey = await runCli(['recovery-key', 'node01', '--keys', bare, '--escrow', stick]);
    expect(nokey.code).toBe(2);
    expect(nokey.stderr).toMatch(/has no recovery key \(issue one with 'lamadist keys recovery/);
  });

  it('the passphrase opens a LUKS2 recovery keyslot: cryptsetup reads it from the pipe and from --out', async () => {
    const luks = path.join(t.dir, 'var.luks');
    const keyFile = path.join(t.dir, 'installer.key');
    writeFileSync(luks, '');
    truncateSync(luks, 20 << 20);
    // As the installer adds keyslot 0: the key file holds the passphrase without a newline.
    writeFileSync(keyFile, KEY);
    execFileSync('cryptsetup', ['luksFormat', '--batch-mode', '--type', 'luks2', '--pbkdf', 'pbkdf2', '--pbkdf-force-iterations', '1000', '--uuid', RECORD.luks[2]?.uuid ?? '', '--key-file', keyFile, luks], { stdio: 'pipe' });
    const printed = await runCli(['recovery-key', 'node01', '--keys', keys, '--escrow', stick]);
    execFileSync('cryptsetup', ['open', '--test-passphrase', luks], { input: printed.stdout, stdio: ['pipe', 'pipe', 'pipe'] });
    const out = path.join(t.dir, 'var.key');
    expect((await runCli(['recovery-key', 'node01', '--keys', keys, '--escrow', stick, '--out', out])).code).toBe(0);
    execFileSync('cryptsetup', ['open', '--test-passphrase', '--key-file', out, luks], { stdio: 'pipe' });
    expect(execFileSync('cryptsetup', ['luksUUID', luks], { encoding: 'utf8' }).trim()).toBe(RECORD.luks[2]?.uuid);
  });

  it('--help documents the command', async () => {
    const r = await runCli(['recovery-key', '--help']);
    expect(r.code).toBe(0);
    expect(r.stdout).toMatch(/Usage: lamadist recovery-key \[options\] <host>/);
    expect(r.stdout).toMatch(/--escrow <path>/);
    expect(r.stdout).toMatch(/cryptsetup open/);
  });
});
