import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { FleetClient } from '../../src/fleet/index.js';
import { startServer, type RunningServer } from '../../src/server/index.js';
import { demoSteps } from '../../src/cli/commands/vm.js';
import { hawkbitConf, provisioningFiles } from '../../src/provision/index.js';
import { FAILING_HEALTH_CHECK, matchAfter, otaMilestones, parseSlots, planVariant, repoRoot } from '../../src/vm/index.js';
import { makeBundle, makePki } from '../server/fixtures.js';

describe('fixture releases (pure)', () => {
  const osRelease = 'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nID=debian\nIMAGE_ID=lamadist-fixture\nIMAGE_VERSION=1\n';

  it('replaces IMAGE_VERSION and adds a failing health check only when asked', () => {
    const v2 = planVariant(osRelease, { version: '2' });
    expect(Object.keys(v2)).toEqual(['usr/lib/os-release']);
    expect(v2['usr/lib/os-release']?.data).toBe('PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nID=debian\nIMAGE_ID=lamadist-fixture\nIMAGE_VERSION=2\n');
    const v3 = planVariant(osRelease, { version: '3', failHealth: true });
    const check = v3[FAILING_HEALTH_CHECK.slice(1)];
    expect(check?.mode).toBe(0o755);
    expect(check?.data).toMatch(/^#!\/bin\/sh\n[\s\S]*exit 1\n$/);
  });

  it('refuses a version that cannot stand in os-release', () => {
    expect(() => planVariant(osRelease, { version: '2 "x"' })).toThrow(/LAMA_E_VM_INPUT|must be letters/);
  });
});

describe('device provisioning (pure)', () => {
  const ddi = { server: '10.0.2.2:8080', tenant: 'DEFAULT', controllerId: 'node-1', token: 'tok' };

  it('writes rauc-hawkbit-updater style configuration', () => {
    expect(hawkbitConf(ddi)).toBe(
      '[client]\nhawkbit_server = 10.0.2.2:8080\nssl = false\ntenant_id = DEFAULT\ntarget_name = node-1\nauth_token = tok\nstream_bundle = true\n' +
        'bundle_download_location = /var/tmp/lamadist-ddi/bundle.raucb\n',
    );
  });

  it('puts the key pair where system.conf [encryption] reads it, under the ESP tree lamadist-init moves to /var', async () => {
    const files = provisioningFiles(Buffer.from('KEY'), Buffer.from('CERT'), ddi);
    expect(Object.keys(files).sort()).toEqual([
      '/lamadist/var/lib/lamadist/hawkbit.conf',
      '/lamadist/var/lib/rauc/encryption/device.cert.pem',
      '/lamadist/var/lib/rauc/encryption/device.key.pem',
    ]);
    const conf = await fs.readFile(path.join(repoRoot(), 'meta-lamadist/recipes-core/rauc/files/efi/system.conf'), 'utf8');
    expect(conf).toContain('key=/var/lib/rauc/encryption/device.key.pem');
    expect(conf).toContain('cert=/var/lib/rauc/encryption/device.cert.pem');
    const init = await fs.readFile(path.join(repoRoot(), 'meta-lamadist/recipes-core/lamadist-boot/files/lamadist-init'), 'utf8');
    expect(init).toContain('PROVISION_VAR_REL=lamadist/var');
    expect(Object.keys(provisioningFiles(Buffer.from('K'), Buffer.from('C')))).toHaveLength(2);
  });
});

describe('slot report parsing', () => {
  it('reads RAUC slot states by bootname and the UEFI entries', () => {
    const serial = [
      'noise',
      'LAMADIST-SLOTS-BEGIN',
      'LAMADIST-SLOTS health=success',
      'LAMADIST-SLOTS version=2',
      'LAMADIST-SLOTS booted=B',
      "LAMADIST-SLOTS SLOT_CLASS_1='rootfs'",
      "LAMADIST-SLOTS SLOT_BOOTNAME_1='A'",
      "LAMADIST-SLOTS SLOT_STATE_1='inactive'",
      "LAMADIST-SLOTS SLOT_BOOT_STATUS_1='good'",
      "LAMADIST-SLOTS SLOT_CLASS_2='rootfs'",
      "LAMADIST-SLOTS SLOT_BOOTNAME_2='B'",
      "LAMADIST-SLOTS SLOT_STATE_2='booted'",
      "LAMADIST-SLOTS SLOT_BOOT_STATUS_2='good'",
      "LAMADIST-SLOTS SLOT_CLASS_3='efi'",
      'LAMADIST-SLOTS efi BootOrder: 0004,0003,0001',
      'LAMADIST-SLOTS efi Boot0003* A',
      'LAMADIST-SLOTS var_marker=boot-1',
      'LAMADIST-SLOTS-END',
      'LAMADIST-SLOTS-BEGIN',
      'LAMADIST-SLOTS version=9',
      'LAMADIST-SLOTS-END',
    ].join('\r\n');
    const r = parseSlots(serial);
    expect(r?.facts).toMatchObject({ health: 'success', SLOT_BOOTNAME_2: 'B', var_marker: 'boot-1' });
    expect({ ...r, facts: undefined }).toEqual({
      facts: undefined,
      health: 'success',
      version: '2',
      booted: 'B',
      state: { A: { state: 'inactive', boot: 'good' }, B: { state: 'booted', boot: 'good' } },
      efi: ['BootOrder: 0004,0003,0001', 'Boot0003* A'],
      var_marker: 'boot-1',
    });
    expect(parseSlots('LAMADIST-SLOTS-BEGIN\nno end')).toBeUndefined();
  });
});

describe('update milestones on the console', () => {
  // What the device prints during an update, in order (client, RAUC, reboot, fixture report).
  const serial = [
    'lamadist-ddi: reported version 1 slot A',
    'lamadist-ddi: deployment 1: version 2',
    '100% Installing done.',
    'lamadist-ddi: installed version 2; rebooting',
    'LAMADIST-SLOTS-BEGIN',
    'LAMADIST-SLOTS booted=B',
    'LAMADIST-SLOTS-END',
    'lamadist-ddi: reported version 2 slot B',
  ].join('\n');

  it('finds each milestone after the one before, the new slot\'s two reports in either order', () => {
    const follow = (text: string): number[] => {
      const marks: number[] = [];
      let at = 0;
      for (const m of otaMilestones('1', '2', 'A')) {
        const next = matchAfter(text, m.marker, m.since === undefined ? at : marks[m.since]);
        expect(next, m.title).toBeGreaterThan(0);
        marks.push(next);
        at = Math.max(at, next);
      }
      return marks;
    };
    expect(Math.max(...follow(serial))).toBe(serial.length);
    const lines = serial.split('\n');
    const swapped = [...lines.slice(0, 4), lines[7], ...lines.slice(4, 7)].join('\n');
    expect(Math.max(...follow(swapped))).toBe(swapped.length);
    // The slot report before the reboot must not count as the new slot's.
    expect(matchAfter(serial, /LAMADIST-SLOTS-END/, matchAfter(serial, /reported version 2 slot B/))).toBe(-1);
  });

  it('escapes versions and names the slots of a B to A update', () => {
    const m = otaMilestones('2.0+1', '3', 'B');
    expect(m[0]?.marker.test('lamadist-ddi: reported version 2.0+1 slot B')).toBe(true);
    expect(m[0]?.marker.test('lamadist-ddi: reported version 2.0 1 slot B')).toBe(false);
    expect(m[3]?.marker.source).toContain('slot A');
  });

  it('the demo goes the operator\'s path (keys, host, server, provision --installer, install, rollout), then follows the four console milestones', () => {
    const steps = demoSteps();
    expect(steps).toHaveLength(8);
    expect(steps.slice(0, 4).every((s) => s.marker === undefined)).toBe(true);
    expect(steps.slice(0, 4).map((s) => s.title).join(' | ')).toMatch(/keys init.*host add.*server.*provision --installer.*stick.*rolled out to the tag/);
    expect(steps.slice(4).map((s) => s.marker?.source)).toEqual(otaMilestones('1', '2', 'A').map((m) => m.marker.source));
  });
});

// The fixture's DDI client (a shell script run in the guest) against the real update server on the
// host: RAUC and systemctl are recording shims here, so this proves the protocol part: poll,
// configData, deploymentBase, feedback, the TargetToken download and its SHA-256 check.
describe('fixture DDI client against the update server', () => {
  let dir: string;
  let server: RunningServer;
  let fleet: FleetClient;
  let bundle: string;

  beforeAll(async () => {
    dir = await fs.mkdtemp(path.join(os.tmpdir(), 'lamadist-ddi-client-'));
    const pki = await makePki(dir);
    bundle = await makeBundle(dir, { pki, compatible: 'lamadist-x86-64', version: '2.0.0' });
    server = await startServer({ store: path.join(dir, 'store'), listen: '127.0.0.1:0', keyring: pki.caCert, pollSeconds: 1 });
    fleet = new FleetClient({ url: server.url, token: (await fs.readFile(server.adminTokenFile as string, 'utf8')).trim() });
  });
  afterAll(async () => {
    await server?.close();
    await fs.rm(dir, { recursive: true, force: true });
  });

  async function runClient(controllerId: string, token: string, raucExit: number, stream = true): Promise<{ out: string; calls: string }> {
    const bin = path.join(dir, `bin-${controllerId}`);
    await fs.mkdir(bin, { recursive: true });
    const calls = path.join(dir, `calls-${controllerId}`);
    const shim = (name: string, body: string): Promise<void> => fs.writeFile(path.join(bin, name), `#!/bin/sh\necho "${name} $*" >>${calls}\n${body}\n`, { mode: 0o755 });
    await shim('rauc', `[ -f "$2" ] && sha256sum "$2" | cut -d' ' -f1 >>${calls}\necho "100% Installing done."\nexit ${raucExit}`);
    await shim('systemctl', 'exit 0');
    const conf = path.join(dir, `${controllerId}.conf`);
    await fs.writeFile(
      conf,
      hawkbitConf({ server: new URL(server.url).host, tenant: 'DEFAULT', controllerId, token })
        .replace('/var/tmp/lamadist-ddi/', `${dir}/dl-${controllerId}/`)
        .replace('stream_bundle = true', `stream_bundle = ${stream}`),
    );
    const script = await fs.readFile(path.join(repoRoot(), 'src/vm/fixture/lamadist-ddi-client'), 'utf8');
    // Only the runtime directory moves into the test's temp dir; the protocol code runs as shipped.
    const patched = path.join(dir, `client-${controllerId}`);
    await fs.writeFile(patched, script.replace('RUN=/run/lamadist-ddi', `RUN=${dir}/run-${controllerId}`).replace('PATH=/usr/sbin', `PATH=${bin}:/usr/sbin`), { mode: 0o755 });
    const child = spawn('sh', [patched], { env: { ...process.env, LAMADIST_DDI_CONF: conf } });
    let out = '';
    child.stdout.on('data', (c: Buffer) => (out += c.toString()));
    child.stderr.on('data', (c: Buffer) => (out += c.toString()));
    const done = new Promise<void>((resolve) => child.on('close', () => resolve()));
    const deadline = Date.now() + 30_000;
    while (Date.now() < deadline && !/rebooting|rauc install failed/.test(out)) await new Promise((r) => setTimeout(r, 100));
    if (!/rebooting/.test(out)) child.kill();
    await done;
    return { out, calls: await fs.readFile(calls, 'utf8').catch(() => '') };
  }

  it('reports its version, has RAUC stream the bundle with its token, and leaves the action installed', async () => {
    const { token } = await fleet.registerDevice({ controllerId: 'sh-1', bsp: 'x86_64' });
    const rel = (await fleet.uploadRelease(bundle)).release;
    await fleet.createRollout({ releaseId: rel.id, filter: { devices: ['sh-1'] }, start: true });
    const { out, calls } = await runClient('sh-1', token, 0);
    expect(out).toMatch(/lamadist-ddi: reported version \S+ slot/);
    expect(out).toContain('lamadist-ddi: deployment');
    expect(out).toContain('100% Installing done.');
    expect(out).toContain('lamadist-ddi: installed version 2.0.0; rebooting');
    expect(calls).toContain(`rauc install -H Authorization: TargetToken ${token} ${server.url}/DEFAULT/controller/v1/sh-1/softwaremodules/${rel.id}/artifacts/${rel.filename}`);
    expect(calls).toContain('systemctl reboot');
    const d = await fleet.getDevice('sh-1');
    expect(d.attributes).toHaveProperty('boot_id');
    const action = d.actions.find((a) => a.releaseId === rel.id);
    expect(action?.state).toBe('installed');
    expect(action?.history.map((h) => h.execution)).toEqual(expect.arrayContaining(['proceeding', 'closed']));
  });

  it('without streaming downloads the bundle with its token, checks its SHA-256 and installs the file', async () => {
    const { token } = await fleet.registerDevice({ controllerId: 'sh-3', bsp: 'x86_64' });
    const rel = (await fleet.listReleases())[0];
    await fleet.createRollout({ releaseId: rel?.id ?? 0, filter: { devices: ['sh-3'] }, start: true });
    const { out, calls } = await runClient('sh-3', token, 0, false);
    const sha = createHash('sha256').update(await fs.readFile(bundle)).digest('hex');
    expect(out).toContain('lamadist-ddi: installed version 2.0.0; rebooting');
    expect(calls).toContain(`rauc install ${dir}/dl-sh-3/bundle.raucb`);
    expect(calls).toContain(sha);
    expect((await fleet.getDevice('sh-3')).actions[0]?.state).toBe('installed');
  });

  it('reports a failed installation as closed/failure and does not reboot', async () => {
    const { token } = await fleet.registerDevice({ controllerId: 'sh-2', bsp: 'x86_64' });
    const rel = (await fleet.listReleases())[0];
    await fleet.createRollout({ releaseId: rel?.id ?? 0, filter: { devices: ['sh-2'] }, start: true });
    const { out, calls } = await runClient('sh-2', token, 1);
    expect(out).toContain('lamadist-ddi: rauc install failed');
    expect(calls).not.toContain('systemctl reboot');
    const d = await fleet.getDevice('sh-2');
    expect(d.actions[0]?.state).toBe('failed');
  });
});
