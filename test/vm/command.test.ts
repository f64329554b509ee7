import { describe, expect, it } from 'vitest';
import { UserError } from '../../src/errors.js';
import { parseForward, planVmRun } from '../../src/cli/commands/vm.js';
import { OVMF } from '../../src/vm/index.js';

describe('lamadist vm run planning', () => {
  it('parses HOST:GUEST forwards and rejects anything else with a one-line error', () => {
    expect(parseForward('8080:80')).toEqual({ host: 8080, guest: 80 });
    for (const bad of ['80', '0:22', '70000:22', 'a:b', '1:2:3']) expect(() => parseForward(bad)).toThrow(UserError);
  });

  it('boots an image through UEFI; --secure-boot picks the secboot firmware and the given vars', () => {
    const p = planVmRun('/img/disk.raw', { secureBoot: true, vars: '/k/vars.fd', tpm: true, forward: ['2222:22'], serial: '/tmp/s.log' });
    expect(p.firmware).toEqual({ code: OVMF.secbootCode, vars: '/k/vars.fd', persistVars: false });
    expect(p.secureBoot).toBe(true);
    expect(p.tpm).toEqual({ stateDir: '/img/disk.raw.tpm' });
    expect(p.disks).toEqual([{ path: '/img/disk.raw' }]);
    expect(p.hostForward).toEqual([{ host: 2222, guest: 22 }]);
    expect(p.serialLog).toBe('/tmp/s.log');
    expect(p.timeoutMs).toBe(0);
  });

  it('plain UEFI without Secure Boot uses Debian OVMF; a kernel boots directly without firmware', () => {
    expect(planVmRun('/d', {}).firmware).toEqual({ code: OVMF.code, vars: OVMF.vars, persistVars: false });
    const k = planVmRun(undefined, { kernel: '/k', initrd: '/i', append: 'x', timeout: 30, until: 'MARK', tpm: '/t' });
    expect(k.firmware).toBeUndefined();
    expect(k.tpm).toEqual({ stateDir: '/t' });
    expect(k.timeoutMs).toBe(30_000);
    expect(k.until).toEqual(/MARK/);
  });

  it('refuses nonsense: nothing to boot, bad regex, persisting the Debian template', () => {
    expect(() => planVmRun(undefined, {})).toThrow(/IMAGE/);
    expect(() => planVmRun('/d', { until: '(' })).toThrow(UserError);
    expect(() => planVmRun('/d', { persistVars: true })).toThrow(/--vars/);
  });
});
