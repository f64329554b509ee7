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

  it('exits 2 on an unknown command even when help is asked for, so a typo is not success', async () => {
    for (const argv of [
      ['provison', '--help'],
      ['lusk', '-h'],
      ['help', 'lusk'],
      ['luks', 'nosuch', '--help'],
      ['luks', 'help', 'nosuch'],
      ['fleet', '--server', 'http://127.0.0.1:1', 'nosuch', '--help'],
    ]) {
      const r = await runCli(argv);
      expect(r.code, argv.join(' ')).toBe(2);
      expect(r.stdout, argv.join(' ')).toBe('');
      expect(r.stderr, argv.join(' ')).toMatch(/^error: unknown command '(provison|lusk|nosuch)'\n/);
    }
    expect((await runCli(['lusk', '--help'])).stderr).toContain('(Did you mean luks?)');
    // help for commands that exist is still help, exit 0
    for (const argv of [['--help'], ['luks', '--help'], ['luks', 'help', 'dump'], ['fleet', '--server', 'http://127.0.0.1:1', 'devices', '--help']]) {
      const r = await runCli(argv);
      expect(r.code, argv.join(' ')).toBe(0);
      expect(r.stdout).toMatch(/^Usage: lamadist/);
    }
  });

  it('honours NO_COLOR', async () => {
    const r = await runCli(['bsp', 'list'], { env: { NO_COLOR: '1', FORCE_COLOR: '' } });
    expect(r.stdout).not.toContain('\u001b[');
  });
});
