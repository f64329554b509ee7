import { describe, expect, it } from 'vitest';
import { runCli } from '../helpers/cli.js';

describe('CLI foundation', () => {
  it('lists BSPs as JSON with nothing but JSON on stdout', async () => {
    const r = await runCli(['--json', 'bsp', 'list']);
    expect(r.code).toBe(0);
    const data = JSON.parse(r.stdout) as { name: string }[];
    expect(data.map((b) => b.name)).toEqual(['x86_64', 'orin-nx', 'rk1', 'soquartz']);
  });

  it('prints help and exits 2 without a command', async () => {
    const r = await runCli([]);
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/Usage: lamadist/);
  });

  it('exits 2 on an unknown command or option, with one line on stderr', async () => {
    const a = await runCli(['no-such-verb']);
    expect(a.code).toBe(2);
    expect(a.stderr).toMatch(/unknown command/);
    const b = await runCli(['bsp', 'list', '--bogus']);
    expect(b.code).toBe(2);
    expect(b.stderr).toMatch(/unknown option/);
  });

  it('honours NO_COLOR', async () => {
    const r = await runCli(['bsp', 'list'], { env: { NO_COLOR: '1', FORCE_COLOR: '' } });
    expect(r.stdout).not.toContain('\u001b[');
  });
});
