import { execFileSync, spawnSync } from 'node:child_process';
import { describe, expect, it } from 'vitest';
import { streamingRauc } from '../../src/vm/rauc.js';

// Debian's rauc 1.8 has no streaming; the fixture's rauc is built from the same Debian source
// package with streaming on. Both binaries are asked the same questions.
describe('rauc with streaming from Debian\'s source package', () => {
  it('builds once, and unlike Debian\'s binary accepts HTTP headers for streamed installs', async () => {
    const r = await streamingRauc();
    expect(r.version).toMatch(/^1\.8/);
    const ours = execFileSync(r.binary, ['install', '--help']).toString();
    expect(ours).toContain('--http-header');
    const debian = spawnSync('rauc', ['install', '--help']).stdout.toString();
    expect(debian).not.toContain('--http-header');
    expect(execFileSync('strings', ['/usr/bin/rauc']).toString()).toContain('configured without --enable-streaming');
    expect(execFileSync('strings', [r.binary]).toString()).not.toContain('configured without --enable-streaming');
    expect(execFileSync(r.binary, ['--version']).toString().trim()).toBe(execFileSync('rauc', ['--version']).toString().trim());
    const again = await streamingRauc();
    expect(again.binary).toBe(r.binary);
  }, 600_000);
});
