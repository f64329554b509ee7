import { readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { UserError } from '../../src/errors.js';
import { addHost, formatIpArg, ipFromSpec, kernelCmdline, loadInventory, newMachineId, parseIpArg, removeHost, type Host } from '../../src/host/index.js';
import { runCli } from '../helpers/cli.js';
import { tempDir } from '../uki/helpers.js';
import { userErrorOf } from '../helpers/errors.js';

const t = tempDir('lamadist-host-');
afterAll(() => t.remove());
const ROOT = 'c0ffee'.repeat(10) + 'abcd';


describe('ip= (kernel nfsroot syntax)', () => {
  it('accepts the documented forms and round-trips them', () => {
    for (const v of ['dhcp', 'off', 'any', '192.168.1.100::192.168.1.1:255.255.255.0:homelab01:eth0:none', '10.0.0.2:10.0.0.1:10.0.0.1:255.0.0.0:n1:enp1s0:off:1.1.1.1:9.9.9.9:10.0.0.1', ':::::eth0:dhcp']) {
      expect(formatIpArg(parseIpArg(v))).toBe(v);
    }
    expect(parseIpArg('192.168.1.100::192.168.1.1:255.255.255.0:homelab01:eth0:none')).toMatchObject({ clientIp: '192.168.1.100', gatewayIp: '192.168.1.1', device: 'eth0', autoconf: 'none' });
  });

  it('rejects malformed values naming the field', () => {
    const cases: [string, RegExp][] = [
      ['dhcpp', /expected one of off\|none\|on\|any\|dhcp/],
      ['192.168.1.300::192.168.1.1:255.255.255.0:h:eth0:none', /<client-ip> '192\.168\.1\.300' is not an IPv4 address/],
      ['192.168.1.10::192.168.1.1:255.0.255.0:h:eth0:none', /<netmask> '255\.0\.255\.0' is not a contiguous/],
      ['192.168.1.10::192.168.1.1:255.255.255.0:bad_host:eth0:none', /<hostname> 'bad_host'/],
      ['192.168.1.10::192.168.1.1:255.255.255.0:h:eth0/1:none', /<device>/],
      ['192.168.1.10::192.168.1.1:255.255.255.0:h:eth0:static', /<autoconf> 'static'/],
      ['1:2:3:4:5:6:7:8:9:10:11', /11 fields, at most 10/],
      ['::192.168.1.1:255.255.255.0:h:eth0:none', /needs <client-ip>/],
    ];
    for (const [v, re] of cases) {
      const e = userErrorOf(() => parseIpArg(v, 'hosts.yaml:3:5'));
      expect(e.code).toBe('LAMA_E_BAD_IP');
      expect(e.line()).toMatch(re);
      expect(e.line()).toMatch(/^hosts\.yaml:3:5: /);
    }
  });

  it('builds a static ip= from address/prefix, gateway, interface, DNS and NTP', () => {
    expect(ipFromSpec('node01', { address: '192.168.1.10/24', gateway: '192.168.1.1', interface: 'eth0', dns: ['192.168.1.1', '9.9.9.9'], ntp: '192.168.1.1' })).toBe(
      '192.168.1.10::192.168.1.1:255.255.255.0:node01:eth0:none:192.168.1.1:9.9.9.9:192.168.1.1',
    );
    expect(() => ipFromSpec('n', { address: '192.168.1.10' })).toThrow(/IPv4\/prefix/);
    expect(() => ipFromSpec('n', { address: '10.0.0.1/8', dns: ['1.1.1.1', '2.2.2.2', '3.3.3.3'] })).toThrow(/at most 2 DNS/);
  });
});

describe('kernel command line', () => {
  const host: Host = { name: 'node01', machineId: '4f6c0a9e1d2b4c3e8a7f6b5c4d3e2f1a', bsp: 'x86_64', ip: 'dhcp', kernelArgs: ['quiet'], macs: [] };
  it('carries console, root hash, slot, identity, network and extras in a fixed order', () => {
    expect(kernelCmdline(host, { rootHash: ROOT, slot: 'b', extra: ['loglevel=3'] })).toBe(
      `console=ttyS0,115200 roothash=${ROOT} lamadist.slot=b rauc.slot=B systemd.hostname=node01 systemd.machine_id=4f6c0a9e1d2b4c3e8a7f6b5c4d3e2f1a ip=dhcp quiet loglevel=3`,
    );
    expect(kernelCmdline({ ...host, bsp: 'soquartz', ip: undefined, kernelArgs: [] }, { rootHash: ROOT, slot: 'a' })).toMatch(/^console=ttyS2,1500000 .* systemd\.machine_id=\w+$/);
  });
  it('rejects a malformed root hash and slot', () => {
    expect(() => kernelCmdline(host, { rootHash: 'xyz', slot: 'a' })).toThrow(expect.objectContaining({ code: 'LAMA_E_BAD_ROOT_HASH' }));
    expect(() => kernelCmdline(host, { rootHash: ROOT, slot: 'c' as 'a' })).toThrow(expect.objectContaining({ code: 'LAMA_E_BAD_SLOT' }));
  });
  it('machine-ids are 32 hex digits in UUID v4 layout and unique', () => {
    const ids = new Set(Array.from({ length: 50 }, () => newMachineId()));
    expect(ids.size).toBe(50);
    for (const id of ids) expect(id).toMatch(/^[0-9a-f]{12}4[0-9a-f]{3}[89ab][0-9a-f]{15}$/);
  });
});

describe('inventory file', () => {
  it('locates a duplicate machine-id and a malformed ip= at file:line:col', async () => {
    const f = path.join(t.dir, 'dup.yaml');
    writeFileSync(f, 'hosts:\n  a:\n    machine-id: 4f6c0a9e1d2b4c3e8a7f6b5c4d3e2f1a\n  b:\n    machine-id: 4f6c0a9e1d2b4c3e8a7f6b5c4d3e2f1a\n');
    await expect(loadInventory(f)).rejects.toMatchObject({ code: 'LAMA_E_DUPLICATE_MACHINE_ID', where: `${f}:5:17`, message: 'host b has the same machine-id as host a' });
    const g = path.join(t.dir, 'ip.yaml');
    writeFileSync(g, 'hosts:\n  a:\n    machine-id: 4f6c0a9e1d2b4c3e8a7f6b5c4d3e2f1a\n    ip: 10.0.0.1::10.0.0.254:255.255.0.255:a:eth0:none\n');
    await expect(loadInventory(g)).rejects.toMatchObject({ code: 'LAMA_E_BAD_IP', where: `${g}:4:9` });
    const h = path.join(t.dir, 'syntax.yaml');
    writeFileSync(h, 'hosts:\n  a: [\n');
    await expect(loadInventory(h)).rejects.toMatchObject({ code: 'LAMA_E_YAML' });
    const u = path.join(t.dir, 'unknown.yaml');
    writeFileSync(u, 'hosts:\n  a:\n    machine-id: 4f6c0a9e1d2b4c3e8a7f6b5c4d3e2f1a\n    hostname: x\n');
    await expect(loadInventory(u)).rejects.toMatchObject({ where: `${u}:4:5`, message: expect.stringMatching(/unknown key 'hostname'/) });
  });

  it('reads smbios-uuid and mac (one or a list) normalised to lowercase, and locates malformed or shared ones', async () => {
    const id = (n: number): string => `4f6c0a9e1d2b4c3e8a7f6b5c4d3e2f1${n}`;
    const f = path.join(t.dir, 'ids.yaml');
    writeFileSync(
      f,
      `hosts:\n  a:\n    machine-id: ${id(1)}\n    smbios-uuid: 4C4C4544-0042-3510-8052-B4C04F4E3232\n    mac: 52-54-00-AB-CD-EF\n  b:\n    machine-id: ${id(2)}\n    mac: [52:54:00:00:00:01, "52:54:00:00:00:02"]\n  c:\n    machine-id: ${id(3)}\n`,
    );
    const inv = await loadInventory(f);
    expect(inv.hosts.map((h) => [h.smbiosUuid, h.macs])).toEqual([
      ['4c4c4544-0042-3510-8052-b4c04f4e3232', ['52:54:00:ab:cd:ef']],
      [undefined, ['52:54:00:00:00:01', '52:54:00:00:00:02']],
      [undefined, []],
    ]);
    expect(inv.hosts[2]).not.toHaveProperty('smbiosUuid');
    const head = `hosts:\n  a:\n    machine-id: ${id(1)}\n`;
    const cases: [string, string, string, RegExp][] = [
      ['uuid-bad', `${head}    smbios-uuid: 4c4c4544-0042-3510-8052\n`, '4:18', /host a: smbios-uuid must be an SMBIOS UUID/],
      ['uuid-zero', `${head}    smbios-uuid: 00000000-0000-0000-0000-000000000000\n`, '4:18', /not all 0 or all f/],
      ['uuid-list', `${head}    smbios-uuid: [4c4c4544-0042-3510-8052-b4c04f4e3232]\n`, '4:18', /smbios-uuid must be/],
      ['mac-bad', `${head}    mac: 52:54:00:ab:cd\n`, '4:10', /host a: mac must be a unicast MAC address/],
      ['mac-multicast', `${head}    mac: [52:54:00:ab:cd:ef, 01:00:5e:00:00:01]\n`, '4:30', /unicast/],
      ['mac-twice', `${head}    mac: [52:54:00:ab:cd:ef, 52-54-00-AB-CD-EF]\n`, '4:30', /host a lists mac 52:54:00:ab:cd:ef twice/],
      ['uuid-shared', `${head}    smbios-uuid: 4c4c4544-0042-3510-8052-b4c04f4e3232\n  b:\n    machine-id: ${id(2)}\n    smbios-uuid: 4C4C4544-0042-3510-8052-B4C04F4E3232\n`, '7:18', /host b has the same smbios-uuid as host a/],
      ['mac-shared', `${head}    mac: 52:54:00:ab:cd:ef\n  b:\n    machine-id: ${id(2)}\n    mac:\n      - 52:54:00:00:00:01\n      - 52-54-00-ab-cd-ef\n`, '9:9', /host b has the same mac 52:54:00:ab:cd:ef as host a/],
    ];
    for (const [name, text, at, re] of cases) {
      const g = path.join(t.dir, `${name}.yaml`);
      writeFileSync(g, text);
      const e = await loadInventory(g).then(
        () => undefined,
        (err: unknown) => err as UserError,
      );
      expect(e, name).toBeInstanceOf(UserError);
      expect(e?.where, name).toBe(`${g}:${at}`);
      expect(e?.message, name).toMatch(re);
    }
    const shared = path.join(t.dir, 'mac-shared.yaml');
    await expect(loadInventory(shared)).rejects.toMatchObject({ code: 'LAMA_E_DUPLICATE_MAC' });
    await expect(loadInventory(path.join(t.dir, 'uuid-shared.yaml'))).rejects.toMatchObject({ code: 'LAMA_E_DUPLICATE_SMBIOS_UUID' });
  });

  it('add keeps comments and earlier machine-ids; remove drops only that host', async () => {
    const f = path.join(t.dir, 'hosts.yaml');
    writeFileSync(f, '# my homelab\nhosts:\n  # the first box\n  alpha:\n    machine-id: 4f6c0a9e1d2b4c3e8a7f6b5c4d3e2f1a\n');
    await addHost(f, { name: 'beta', ip: { address: '192.168.1.11/24', gateway: '192.168.1.1', interface: 'eth0' } });
    await addHost(f, { name: 'gamma', ip: 'dhcp', kernelArgs: ['quiet'] });
    const text = readFileSync(f, 'utf8');
    expect(text).toContain('# my homelab');
    expect(text).toContain('# the first box');
    const inv = await loadInventory(f);
    expect(inv.hosts.map((h) => h.name)).toEqual(['alpha', 'beta', 'gamma']);
    expect(inv.hosts[0]?.machineId).toBe('4f6c0a9e1d2b4c3e8a7f6b5c4d3e2f1a');
    expect(inv.hosts[1]?.ip).toBe('192.168.1.11::192.168.1.1:255.255.255.0:beta:eth0:none');
    await expect(addHost(f, { name: 'beta' })).rejects.toMatchObject({ code: 'LAMA_E_EXISTS' });
    await expect(addHost(f, { name: 'delta', ip: '1.2.3.4:::255.255.255.0:delta:eth0:bogus' })).rejects.toMatchObject({ code: 'LAMA_E_BAD_IP' });
    expect(readFileSync(f, 'utf8')).toBe(text);
    const ids = (await loadInventory(f)).hosts.map((h) => h.machineId);
    await removeHost(f, 'beta');
    const after = await loadInventory(f);
    expect(after.hosts.map((h) => h.machineId)).toEqual([ids[0], ids[2]]);
  });
});

describe('host CLI', () => {
  it('add, list, show with the slot command line, remove; errors are one line with exit 2', async () => {
    const inv = path.join(t.dir, 'cli.yaml');
    const add = await runCli(['--json', 'host', 'add', 'node01', '--inventory', inv, '--address', '192.168.1.10/24', '--gateway', '192.168.1.1', '--interface', 'eth0', '--dns', '192.168.1.1']);
    expect(add.code, add.stderr).toBe(0);
    const h = JSON.parse(add.stdout) as Host;
    const list = await runCli(['--json', 'host', 'list', '--inventory', inv]);
    expect(JSON.parse(list.stdout)).toEqual([h]);
    const show = await runCli(['--json', 'host', 'show', 'node01', '--inventory', inv, '--root-hash', ROOT, '--slot', 'a']);
    expect((JSON.parse(show.stdout) as { cmdline: string }).cmdline).toBe(
      `console=ttyS0,115200 roothash=${ROOT} lamadist.slot=a rauc.slot=A systemd.hostname=node01 systemd.machine_id=${h.machineId} ip=192.168.1.10::192.168.1.1:255.255.255.0:node01:eth0:none:192.168.1.1`,
    );
    const bad = await runCli(['host', 'add', 'node02', '--inventory', inv, '--ip', '192.168.1.999::::node02:eth0:none']);
    expect(bad.code).toBe(2);
    expect(bad.stderr.trim().split('\n')).toEqual([expect.stringMatching(/invalid ip=.*<client-ip>.*LAMA_E_BAD_IP/)]);
    const dupText = readFileSync(inv, 'utf8') + `  node03:\n    machine-id: ${h.machineId}\n`;
    writeFileSync(inv, dupText);
    const dup = await runCli(['host', 'list', '--inventory', inv]);
    expect(dup.code).toBe(2);
    expect(dup.stderr.trim().split('\n')).toEqual([expect.stringMatching(/cli\.yaml:\d+:\d+: host node03 has the same machine-id as host node01 \[LAMA_E_DUPLICATE_MACHINE_ID\]/)]);
    const add2 = await runCli(['host', 'add', 'node04', '--inventory', inv, '--dhcp']);
    expect(add2.code).toBe(2);
    expect(readFileSync(inv, 'utf8')).toBe(dupText);
    writeFileSync(inv, dupText.replace(/ {2}node03:\n.*\n$/, ''));
    const ids = await runCli(['--json', 'host', 'add', 'node05', '--inventory', inv, '--smbios-uuid', '4C4C4544-0042-3510-8052-B4C04F4E3232', '--mac', '52-54-00-AB-CD-EF', '--mac', '52:54:00:ab:cd:f0']);
    expect(ids.code, ids.stderr).toBe(0);
    expect(JSON.parse(ids.stdout)).toMatchObject({ name: 'node05', smbiosUuid: '4c4c4544-0042-3510-8052-b4c04f4e3232', macs: ['52:54:00:ab:cd:ef', '52:54:00:ab:cd:f0'] });
    expect(readFileSync(inv, 'utf8')).toMatch(/smbios-uuid: 4c4c4544-0042-3510-8052-b4c04f4e3232\n\s+mac:\n\s+- 52:54:00:ab:cd:ef\n\s+- 52:54:00:ab:cd:f0\n/);
    const listed = JSON.parse((await runCli(['--json', 'host', 'list', '--inventory', inv])).stdout) as Host[];
    expect(listed.map((x) => [x.name, x.macs])).toEqual([['node01', []], ['node05', ['52:54:00:ab:cd:ef', '52:54:00:ab:cd:f0']]]);
    const shown = await runCli(['host', 'show', 'node05', '--inventory', inv]);
    expect(shown.stdout).toMatch(/smbios-uuid 4c4c4544-0042-3510-8052-b4c04f4e3232\nmac {9}52:54:00:ab:cd:ef 52:54:00:ab:cd:f0\n/);
    const sameMac = await runCli(['host', 'add', 'node06', '--inventory', inv, '--mac', '52:54:00:AB:CD:F0']);
    expect(sameMac.code).toBe(2);
    expect(sameMac.stderr.trim().split('\n')).toEqual([expect.stringMatching(/cli\.yaml:\d+:\d+: host node06 has the same mac 52:54:00:ab:cd:f0 as host node05 \[LAMA_E_DUPLICATE_MAC\]$/)]);
    const badMac = await runCli(['host', 'add', 'node06', '--inventory', inv, '--mac', '52:54:00']);
    expect(badMac.stderr.trim().split('\n')).toEqual([expect.stringMatching(/--mac '52:54:00' must be a unicast MAC address.*\[LAMA_E_USAGE\]$/)]);
    expect((await runCli(['host', 'remove', 'node05', '--inventory', inv])).code).toBe(0);
    const rm = await runCli(['host', 'remove', 'node01', '--inventory', inv]);
    expect(rm.code).toBe(0);
    expect((await loadInventory(inv)).hosts).toEqual([]);
  });
});
