import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { bootDevice, matchAfter, otaMilestones, parseSlots, prepareFleetDevice, rollOutRelease, watchDevice, type FleetDevice } from '../../src/vm/index.js';

// Acceptance 2 and 3 on one device: the fixture device registered with the update server in this
// process boots (first boot: TPM2 enrollment on slot A, version 1), its DDI client takes the
// rollout of version 2, RAUC installs the crypt bundle into slot B, the device reboots into B
// (BootNext), the health check marks B good and only then does the server call the action a
// success. Then version 3, whose health check fails, goes to slot A: its trial boot reboots, the
// firmware's BootOrder brings back B, and the server records "rolled back".

/** True once `second` shows on the console after `first` did. */
function inOrder(serial: string, first: RegExp, second: RegExp): boolean {
  const at = matchAfter(serial, first);
  return at >= 0 && matchAfter(serial, second, at) >= 0;
}

describe('acceptance 2 and 3: over-the-air update to slot B and rollback of a failing release', () => {
  let dir: string;
  let fd: FleetDevice;

  beforeAll(async () => {
    dir = await fs.mkdtemp(path.join(os.tmpdir(), 'vm-ota-'));
    fd = await prepareFleetDevice({ dir, hostname: 'lama-ota', pollSeconds: 5 });
  }, 1_500_000);
  afterAll(async () => {
    await fd?.server.close();
    await fs.rm(dir, { recursive: true, force: true });
  });

  it('refuses a release that lacks the device, then rolls out version 2: installed to slot B, success only after B booted and was marked good', async () => {
    // A fleet release for two other hosts: the device's install check must refuse it, nothing is
    // written, and the server shows the failure with the hook's reason.
    const others = ['lama-other-1', 'lama-other-2'].map((name, i) => {
      const machineId = `${'0'.repeat(31)}${i + 1}`;
      return { name, machineId, args: [`systemd.hostname=${name}`, `systemd.machine_id=${machineId}`] };
    });
    const lacking = await rollOutRelease(fd, { version: '1.9', omitDevice: true, otherHosts: others });
    const watch = watchDevice(fd.device, { timeoutMs: 1_500_000, serialLog: path.join(dir, 'ota.log') });
    let v2: Awaited<ReturnType<typeof rollOutRelease>> | undefined;
    let bytesBefore = 0;
    const actionState = async (id: number | undefined): Promise<string> => (await fd.fleet.getDevice(fd.controllerId)).actions.find((a) => a.releaseId === id)?.state ?? 'none';
    // The console milestones `lamadist vm demo` follows, with the server's view after each.
    const seen: { title: string; seconds: number; action: string }[] = [];
    const t0 = Date.now();
    let at = 0;
    try {
      at = await watch.waitFor(/lamadist-ddi: rauc install failed: .*is not in this release/);
      const refused = (await fd.fleet.getDevice(fd.controllerId)).actions.find((a) => a.releaseId === lacking.releaseId);
      expect(refused?.state).toBe('failed');
      expect(JSON.stringify(refused?.history)).toMatch(/is not in this release/);
      v2 = await rollOutRelease(fd, { version: '2' });
      bytesBefore = fd.server.service.counters.artifactBytes;
      // The first milestone (slot A's report of version 1) came before the refusal.
      at = 0;
      for (const m of otaMilestones('1', '2', 'A')) {
        at = await watch.waitFor(m.marker, at);
        seen.push({ title: m.title, seconds: Math.round((Date.now() - t0) / 1000), action: await actionState(v2.releaseId) });
      }
    } finally {
      await watch.stop();
    }
    const serial = watch.serial();
    const tail = serial.slice(-6000);
    // First boot on A with version 1, reported before anything was installed.
    expect(serial).toContain('TPM2 enrolled');
    expect(serial).toMatch(/lamadist-boot-entries: created Boot[0-9A-F]{4} "A"/);
    expect(serial).toMatch(/provisioned \/var\/lib\/rauc\/encryption\/device\.key\.pem/);
    expect(seen[0]?.action).not.toBe('success');
    // RAUC wrote slot B and the feedback made the action "installed, awaiting boot", not success.
    expect(serial).toMatch(/Copying image to rootfs\.1 done/);
    expect(serial).toMatch(/Copying image to efi\.1 done/);
    expect(seen[1]?.action).toBe('installed');
    // The next boot ran B (BootNext), healthy and marked good; only B's report closed the action.
    const slots = parseSlots(serial.slice(matchAfter(serial, /installed version 2; rebooting/)));
    expect(slots?.booted, tail).toBe('B');
    expect(slots?.version).toBe('2');
    expect(slots?.health).toBe('success');
    expect(slots?.state.B).toMatchObject({ state: 'booted', boot: 'good' });
    expect(seen[2]?.action).toBe('installed');
    expect(await actionState(v2?.releaseId)).toBe('success');
    const fetched = fd.server.service.counters.artifactBytes - bytesBefore;
    console.log(
      [
        `OTA v2: bundle ${v2?.release.size} bytes, device fetched ${fetched} bytes (${((100 * fetched) / (v2?.release.size ?? 1)).toFixed(1)}%)`,
        ...seen.map((m) => `  ${String(m.seconds).padStart(4)} s  ${m.title} (server: ${m.action})`),
      ].join('\n'),
    );
    expect(fetched).toBeGreaterThan(0);
  }, 2_400_000);

  it('rolls out version 3 that fails its health check: the device falls back to B, the server records rolled back, /var kept', async () => {
    const v3 = await rollOutRelease(fd, { version: '3', failHealth: true });
    const r = await bootDevice(fd.device, {
      timeoutMs: 1_500_000,
      serialLog: path.join(dir, 'rollback.log'),
      until: (s) => inOrder(s, /unhealthy trial boot/, /lamadist-ddi: reported version 2 slot B/),
    });
    const tail = r.serial.slice(-6000);
    expect(r.matched, tail).toBe(true);
    const firstReport = matchAfter(r.serial, /LAMADIST-SLOTS-END/);
    const before = parseSlots(r.serial.slice(0, firstReport));
    expect(before?.booted).toBe('B');
    expect(r.serial).toContain('lamadist-ddi: installed version 3; rebooting');
    expect(r.serial).toMatch(/lamadist-health: FAIL: check 50-fixture-fails failed/);
    const fellBack = matchAfter(r.serial, /unhealthy trial boot/);
    const back = parseSlots(r.serial.slice(fellBack));
    expect(back?.booted, tail).toBe('B');
    expect(back?.version).toBe('2');
    expect(back?.state.A?.boot).toBe('bad');
    expect(back?.var_marker).toBe(before?.var_marker);
    expect(back?.var_marker).toMatch(/^boot-[0-9a-f-]{36}$/);
    const device = await fd.fleet.getDevice(fd.controllerId);
    expect(device.actions.find((a) => a.releaseId === v3.releaseId)?.state).toBe('rolled_back');
  }, 2_400_000);
});
