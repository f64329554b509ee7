import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { bootDevice, parseSlots, prepareFleetDevice, rollOutRelease, type FleetDevice } from '../../src/vm/index.js';

// Acceptance 2 and 3 on one device: the fixture device registered with the update server in this
// process boots (first boot: TPM2 enrollment on slot A, version 1), its DDI client takes the
// rollout of version 2, RAUC installs the crypt bundle into slot B, the device reboots into B
// (BootNext), the health check marks B good and only then does the server call the action a
// success. Then version 3, whose health check fails, goes to slot A: its trial boot reboots, the
// firmware's BootOrder brings back B, and the server records "rolled back".

/** Index just past the first match of `re` at or after `from`, or -1. */
function after(serial: string, re: RegExp, from = 0): number {
  const m = new RegExp(re.source, 'g');
  m.lastIndex = from;
  const r = m.exec(serial);
  return r ? r.index + r[0].length : -1;
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

  it('rolls out version 2: installed to slot B, success only after B booted and was marked good', async () => {
    const v2 = await rollOutRelease(fd, { version: '2' });
    const stateAtReboot: string[] = [];
    const bytesBefore = fd.server.service.counters.artifactBytes;
    const r = await bootDevice(fd.device, {
      timeoutMs: 1_200_000,
      serialLog: path.join(dir, 'ota.log'),
      onLine: (l) => {
        if (l.includes('lamadist-ddi: installed version 2; rebooting')) {
          void fd.fleet.getDevice(fd.controllerId).then((d) => stateAtReboot.push(d.actions.find((a) => a.releaseId === v2.releaseId)?.state ?? 'none'));
        }
      },
      until: (s) => after(s, /lamadist-ddi: reported version 2 slot B/, Math.max(0, after(s, /installed version 2; rebooting/))) > 0,
    });
    const tail = r.serial.slice(-6000);
    expect(r.matched, tail).toBe(true);
    // First boot on A with version 1, reported before anything was installed.
    expect(r.serial).toContain('TPM2 enrolled');
    expect(r.serial).toMatch(/lamadist-boot-entries: created Boot[0-9A-F]{4} "A"/);
    expect(r.serial).toMatch(/lamadist-ddi: reported version 1 slot A/);
    expect(r.serial).toMatch(/provisioned \/var\/lib\/rauc\/encryption\/device\.key\.pem/);
    // The install wrote slot B and set BootNext; the next boot ran B, healthy and marked good.
    const reboot = after(r.serial, /installed version 2; rebooting/);
    const slots = parseSlots(r.serial.slice(reboot));
    expect(slots?.booted, tail).toBe('B');
    expect(slots?.version).toBe('2');
    expect(slots?.health).toBe('success');
    expect(slots?.state.B).toMatchObject({ state: 'booted', boot: 'good' });
    expect(stateAtReboot).toEqual(['installed']);
    const device = await fd.fleet.getDevice(fd.controllerId);
    expect(device.actions.find((a) => a.releaseId === v2.releaseId)?.state).toBe('success');
    const fetched = fd.server.service.counters.artifactBytes - bytesBefore;
    console.log(`OTA v2: bundle ${v2.release.size} bytes, device fetched ${fetched} bytes (${((100 * fetched) / v2.release.size).toFixed(1)}%), boot to B-good ${(r.durationMs / 1000).toFixed(0)} s`);
    expect(fetched).toBeGreaterThan(0);
  }, 2_400_000);

  it('rolls out version 3 that fails its health check: the device falls back to B, the server records rolled back, /var kept', async () => {
    const v3 = await rollOutRelease(fd, { version: '3', failHealth: true });
    const r = await bootDevice(fd.device, {
      timeoutMs: 1_500_000,
      serialLog: path.join(dir, 'rollback.log'),
      until: (s) => after(s, /lamadist-ddi: reported version 2 slot B/, Math.max(0, after(s, /unhealthy trial boot/))) > 0,
    });
    const tail = r.serial.slice(-6000);
    expect(r.matched, tail).toBe(true);
    const firstReport = after(r.serial, /LAMADIST-SLOTS-END/);
    const before = parseSlots(r.serial.slice(0, firstReport));
    expect(before?.booted).toBe('B');
    expect(r.serial).toContain('lamadist-ddi: installed version 3; rebooting');
    expect(r.serial).toMatch(/lamadist-health: FAIL: check 50-fixture-fails failed/);
    const fellBack = after(r.serial, /unhealthy trial boot/);
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
