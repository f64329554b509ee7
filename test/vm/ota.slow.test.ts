import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { bootDevice, matchAfter, parseSlots, prepareFleetDevice, rollOutRelease, type FleetDevice } from '../../src/vm/index.js';
import { expectEnforcing } from './selinux.js';

// Rollback on the emulated device: the fixture device registered with the update server in this
// process boots (first boot: TPM2 enrollment on slot A, version 1), its DDI client takes version 3,
// whose health check fails; RAUC installs it into slot B, the device reboots into B (BootNext), the
// trial boot is unhealthy, the firmware's BootOrder brings back A, and the server records "rolled
// back". A successful update to slot B, a release lacking the host, and first and second boots are
// test/vm/fleet.slow.test.ts's, on two machines installed from a stick.

/** True once `second` shows on the console after `first` did. */
function inOrder(serial: string, first: RegExp, second: RegExp): boolean {
  const at = matchAfter(serial, first);
  return at >= 0 && matchAfter(serial, second, at) >= 0;
}

describe('rollback of a failing release to the slot that ran before', () => {
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

  it('rolls out version 3 that fails its health check: the device falls back to A, the server records rolled back, /var kept', async () => {
    const v3 = await rollOutRelease(fd, { version: '3', failHealth: true });
    const r = await bootDevice(fd.device, {
      timeoutMs: 1_500_000,
      serialLog: path.join(dir, 'rollback.log'),
      // A's report to the server and its slot report come in either order.
      until: (s) => inOrder(s, /unhealthy trial boot/, /lamadist-ddi: reported version 1 slot A/) && inOrder(s, /unhealthy trial boot/, /LAMADIST-SLOTS-END/),
    });
    const tail = r.serial.slice(-6000);
    expect(r.matched, tail).toBe(true);
    const before = parseSlots(r.serial.slice(0, matchAfter(r.serial, /LAMADIST-SLOTS-END/)));
    expect(before?.booted).toBe('A');
    expect(before?.version).toBe('1');
    expect(r.serial).toMatch(/Copying image to rootfs\.1 done/);
    expect(r.serial).toContain('lamadist-ddi: installed version 3; rebooting');
    expect(r.serial).toMatch(/lamadist-health: FAIL: check 50-fixture-fails failed/);
    const back = parseSlots(r.serial.slice(matchAfter(r.serial, /unhealthy trial boot/)));
    expect(back?.booted, tail).toBe('A');
    expect(back?.version).toBe('1');
    expect(back?.state.B?.boot).toBe('bad');
    expect(back?.var_marker).toBe(before?.var_marker);
    expect(back?.var_marker).toMatch(/^boot-[0-9a-f-]{36}$/);
    // SELinux enforcing throughout: no denial from the update, the failing trial boot or the rollback.
    expectEnforcing(r.serial.slice(matchAfter(r.serial, /unhealthy trial boot/)), 'after the rollback');
    const device = await fd.fleet.getDevice(fd.controllerId);
    expect(device.actions.find((a) => a.releaseId === v3.releaseId)?.state).toBe('rolled_back');
  }, 2_400_000);
});
