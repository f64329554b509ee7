import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runCli } from '../helpers/cli.js';

// End to end through bin/lamadist.js (built by `npm test`'s pretest): keys from `lamadist keys`,
// bundles checked by the real `rauc info`.

// Each test spawns the CLI several times (a node start-up each); generous for a loaded 2-core runner.
const CLI_TIMEOUT = 240_000;

let dir: string;
let kd: string;
let conf: string;

function rauc(args: string[]): { code: number; out: string } {
  const r = spawnSync('rauc', args, { encoding: 'utf8' });
  return { code: r.status ?? 128, out: `${r.stdout}${r.stderr}` };
}

beforeAll(async () => {
  dir = mkdtempSync(path.join(os.tmpdir(), 'lamadist-bundle-cli-'));
  kd = path.join(dir, 'keys');
  expect((await runCli(['keys', 'init', kd])).code).toBe(0);
  expect((await runCli(['keys', 'device', 'node1', '--dir', kd])).code).toBe(0);
  conf = path.join(dir, 'system.conf');
  writeFileSync(conf, `[system]\ncompatible=lamadist-x86-64\nbootloader=noop\n[keyring]\npath=${kd}/rauc-ca.crt\ncheck-purpose=codesign\n[slot.rootfs.0]\ndevice=/dev/null\n`);
  const img = Buffer.alloc(1024 * 1024);
  for (let i = 0; i < img.length; i += 4096) img.writeUInt32LE(i + 1, i);
  writeFileSync(path.join(dir, 'rootfs.erofs'), img);
  writeFileSync(path.join(dir, 'rootfs.verity'), img.subarray(0, 16384));
  writeFileSync(path.join(dir, 'lamadist.efi'), 'MZ uki');
}, 120_000);
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const images = (): string[] => ['--rootfs', path.join(dir, 'rootfs.erofs'), '--verity', path.join(dir, 'rootfs.verity'), '--efi', path.join(dir, 'lamadist.efi')];

describe('lamadist bundle', () => {
  it('create --bsp --keys makes a bundle rauc info accepts; verify says OK; --json is pure JSON', async () => {
    const out = path.join(dir, 'a.raucb');
    const c = await runCli(['--json', 'bundle', 'create', '-o', out, '--bsp', 'x86_64', '--version', '1.0', '--build', 'ci', ...images(), '--keys', kd, '--signing-time', '2026-03-01T00:00:00Z']);
    expect(c.code, c.stderr).toBe(0);
    const created = JSON.parse(c.stdout) as { manifest: { compatible: string; images: { slotClass: string; adaptive?: string[] }[] } };
    expect(created.manifest.compatible).toBe('lamadist-x86-64');
    expect(created.manifest.images.map((i) => [i.slotClass, i.adaptive?.[0]])).toEqual([['rootfs', 'block-hash-index'], ['verity', 'block-hash-index'], ['efi', undefined]]);
    const info = rauc(['info', '--conf', conf, '--keyring', path.join(kd, 'rauc-ca.crt'), out]);
    expect(info.code, info.out).toBe(0);
    expect(info.out).toContain("Version:    \t'1.0'");
    const v = await runCli(['bundle', 'verify', out, '--keyring', path.join(kd, 'rauc-ca.crt'), '--bsp', 'x86_64']);
    expect(v.code, v.stderr).toBe(0);
    expect(v.stdout).toMatch(/^OK /);
    const again = await runCli(['bundle', 'create', '-o', out, '--bsp', 'x86_64', '--version', '1.0', ...images(), '--keys', kd]);
    expect(again.code).toBe(2);
    expect(again.stderr).toContain('LAMA_E_EXISTS');
  }, CLI_TIMEOUT);

  it('create --manifest takes a hand-written RAUC manifest with images next to it', async () => {
    const m = path.join(dir, 'manifest.raucm');
    writeFileSync(m, '[update]\ncompatible=lamadist-x86-64\nversion=9.9\n\n[image.rootfs]\nfilename=rootfs.erofs\nadaptive=block-hash-index;\n\n[image.efi]\nfilename=lamadist.efi\n');
    const out = path.join(dir, 'm.raucb');
    const c = await runCli(['bundle', 'create', '-o', out, '--manifest', m, '--keys', kd]);
    expect(c.code, c.stderr).toBe(0);
    const info = rauc(['info', '--conf', conf, '--keyring', path.join(kd, 'rauc-ca.crt'), out]);
    expect(info.code, info.out).toBe(0);
    expect(info.out).toContain("Version:    \t'9.9'");
    expect(info.out).toContain('Adaptive:  block-hash-index');
    writeFileSync(m, '[update]\ncompatible=x\n[image.rootfs\n');
    const bad = await runCli(['bundle', 'create', '-o', path.join(dir, 'bad.raucb'), '--manifest', m, '--keys', kd]);
    expect(bad.code).toBe(2);
    expect(bad.stderr).toContain(`${m}:3: malformed group header`);
  }, CLI_TIMEOUT);

  it('a tampered bundle exits 2 with one line naming the file, offset and code', async () => {
    const out = path.join(dir, 'b.raucb');
    expect((await runCli(['bundle', 'create', '-o', out, '--bsp', 'x86_64', '--version', '1', ...images(), '--keys', kd])).code).toBe(0);
    const b = readFileSync(out);
    b.writeUInt8(b.readUInt8(8192 + 17) ^ 0xff, 8192 + 17);
    writeFileSync(out, b);
    const v = await runCli(['bundle', 'verify', out, '--keyring', path.join(kd, 'rauc-ca.crt')]);
    expect(v.code).toBe(2);
    expect(v.stderr.trim().split('\n')).toHaveLength(1);
    expect(v.stderr).toMatch(/b\.raucb@8192: payload tampered with: data block 2 at byte offset 8192 .*\[LAMA_E_BUNDLE_PAYLOAD_TAMPERED\]/);
    const wrong = await runCli(['bundle', 'verify', path.join(dir, 'a.raucb'), '--keyring', path.join(kd, 'rauc-ca.crt'), '--bsp', 'rk1']);
    expect(wrong.code).toBe(2);
    expect(wrong.stderr).toContain('LAMA_E_BUNDLE_WRONG_COMPATIBLE');
  }, CLI_TIMEOUT);

  it('crypt bundle for --to-hosts: rauc info opens it with the device key', async () => {
    const inv = path.join(dir, 'hosts.yaml');
    expect((await runCli(['host', 'add', 'node1', '--inventory', inv])).code).toBe(0);
    const out = path.join(dir, 'c.raucb');
    const c = await runCli(['--json', 'bundle', 'create', '-o', out, '--bsp', 'x86_64', '--version', '2', ...images(), '--keys', kd, '--format', 'crypt', '--to-hosts', inv]);
    expect(c.code, c.stderr).toBe(0);
    expect(c.stdout).not.toMatch(/crypt-?key/i);
    const info = rauc(['info', '--conf', conf, '--keyring', path.join(kd, 'rauc-ca.crt'), '--key', path.join(kd, 'device-node1.key'), out]);
    expect(info.code, info.out).toBe(0);
    expect(info.out).toContain('Bundle Format: \tcrypt');
    const unenc = path.join(dir, 'c-unenc.raucb');
    expect((await runCli(['bundle', 'create', '-o', unenc, '--bsp', 'x86_64', '--version', '2', ...images(), '--keys', kd, '--format', 'crypt'])).code).toBe(0);
    const enc = path.join(dir, 'c-enc.raucb');
    const e = await runCli(['bundle', 'encrypt', unenc, '-o', enc, '--to', path.join(kd, 'device-node1.crt'), '--keyring', path.join(kd, 'rauc-ca.crt')]);
    expect(e.code, e.stderr).toBe(0);
    expect(rauc(['info', '--conf', conf, '--keyring', path.join(kd, 'rauc-ca.crt'), '--key', path.join(kd, 'device-node1.key'), enc]).code).toBe(0);
    const noKey = await runCli(['bundle', 'inspect', out]);
    expect(noKey.code).toBe(2);
    expect(noKey.stderr).toContain('LAMA_E_BUNDLE_NEEDS_KEY');
    const i = await runCli(['--json', 'bundle', 'inspect', out, '--keyring', path.join(kd, 'rauc-ca.crt'), '--key', path.join(kd, 'device-node1.key')]);
    expect(i.code, i.stderr).toBe(0);
    expect(JSON.parse(i.stdout)).toMatchObject({ format: 'crypt', encrypted: true, verified: true, payloadVerified: true });
  }, CLI_TIMEOUT);
});
