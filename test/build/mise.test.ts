import { readFileSync } from 'node:fs';
import path from 'node:path';
import { Command } from 'commander';
import { describe, expect, it } from 'vitest';
import { COMMANDS } from '../../src/cli/commands.js';
import { REPO_ROOT } from '../helpers/cli.js';

/** The tasks of .mise.toml, read with the two TOML forms the file uses ([tasks.x] / [tasks."x:y"] and run = "..."). */
function miseTasks(): Map<string, string> {
  const tasks = new Map<string, string>();
  let current: string | undefined;
  for (const line of readFileSync(path.join(REPO_ROOT, '.mise.toml'), 'utf8').split('\n')) {
    const head = /^\[tasks\.(?:"([^"]+)"|([\w-]+))\]$/.exec(line.trim());
    if (head) current = head[1] ?? head[2];
    else if (/^\[/.test(line.trim())) current = undefined;
    const run = /^run\s*=\s*"([^"]*)"$/.exec(line.trim());
    if (run && current) tasks.set(current, run[1] ?? '');
  }
  return tasks;
}

describe('.mise.toml', () => {
  const tasks = miseTasks();
  it('has every task the architecture lists, each calling lamadist', () => {
    expect([...tasks.keys()].sort()).toEqual(
      ['build', 'ci-build', 'clean', 'clean:all', 'clean:container', 'clean:sstate', 'container', 'container-shell', 'dump', 'shell', 'version'].sort(),
    );
    for (const run of tasks.values()) expect(run).toMatch(/^node bin\/lamadist\.js /);
  });

  for (const [name, run] of tasks) {
    it(`task ${name} is a valid lamadist command line`, async () => {
      const [verb = '', ...rest] = run.split(' ').slice(2);
      const entry = COMMANDS[verb];
      expect(entry).toBeDefined();
      const cmd = new Command(verb);
      (await entry!.load()).configure(cmd);
      const sub = cmd.commands.find((c) => c.name() === rest[0]);
      const target = sub ?? cmd;
      const { operands, unknown } = target.parseOptions(sub ? rest.slice(1) : rest);
      expect(unknown).toEqual([]);
      if (!sub && cmd.commands.length > 0) expect(operands).toEqual([]);
    });
  }

  it('rejects a misspelt option, so the check above can fail', async () => {
    const cmd = new Command('clean');
    (await COMMANDS.clean!.load()).configure(cmd);
    expect(cmd.parseOptions(['--sstatee']).unknown).toEqual(['--sstatee']);
  });
});
