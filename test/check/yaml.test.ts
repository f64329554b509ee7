import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { UserError } from '../../src/errors.js';
import { parseYamlLocated } from '../../src/util/yaml.js';
import { runCli } from '../helpers/cli.js';

const tmp = mkdtempSync(path.join(os.tmpdir(), 'lamadist-yaml-'));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

function located(text: string): { code: string; where?: string; message: string } {
  try {
    parseYamlLocated(text, 'x.yml');
  } catch (e) {
    expect(e).toBeInstanceOf(UserError);
    return { code: (e as UserError).code, where: (e as UserError).where, message: (e as UserError).message };
  }
  throw new Error('parsed');
}

describe('YAML aliases in files the user wrote', () => {
  it('an alias to no anchor (or to one defined later) is an error at the alias, not an internal one', () => {
    expect(located('header:\n  version: 14\ntarget: *nosuch\n')).toEqual({
      code: 'LAMA_E_YAML',
      where: 'x.yml:3:9',
      message: 'alias *nosuch names no anchor defined before it',
    });
    expect(located('a: *later\nb: &later 1\n').where).toBe('x.yml:1:4');
    expect(parseYamlLocated('a: &x [1]\nb: *x\n', 'x.yml').value).toEqual({ a: [1], b: [1] });
  });

  it('aliases that expand beyond the limit ("billion laughs") are a located error', () => {
    const bomb = [
      'a: &a [1,1,1,1,1,1,1,1,1,1]',
      ...'bcdefg'.split('').map((c, i) => `${c}: &${c} [${Array(10).fill(`*${'abcdefg'[i]}`).join(',')}]`),
    ].join('\n');
    expect(located(bomb)).toMatchObject({ code: 'LAMA_E_YAML', where: 'x.yml:2:8' });
  });

  it('the host inventory reports an undefined alias in one line with file:line:col, exit 2', async () => {
    const inv = path.join(tmp, 'hosts.yaml');
    writeFileSync(inv, 'hosts:\n  web1: *nosuch\n');
    const r = await runCli(['host', 'list', '--inventory', inv]);
    expect(r.code).toBe(2);
    expect(r.stdout).toBe('');
    expect(r.stderr.trim().split('\n')).toEqual([
      `lamadist: error: ${inv}:2:9: alias *nosuch names no anchor defined before it [LAMA_E_YAML]`,
    ]);
  });
});
