import { mkdtemp, readdir, readFile, stat, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { UserError } from '../../src/errors.js';
import { withAtomicFile, writeFileAtomic } from '../../src/util/fsx.js';
import { parseYamlLocated } from '../../src/util/yaml.js';

describe('atomic outputs', () => {
  it('leaves no file behind when the writer fails', async () => {
    const dir = await mkdtemp(path.join(os.tmpdir(), 'lama-atomic-'));
    const target = path.join(dir, 'out.img');
    await expect(
      withAtomicFile(target, {}, async (out) => {
        await out.fd.write(Buffer.alloc(4096, 1));
        throw new Error('boom');
      }),
    ).rejects.toThrow('boom');
    expect(await readdir(dir)).toEqual([]);
  });

  it('refuses to overwrite without force and creates secrets 0600', async () => {
    const dir = await mkdtemp(path.join(os.tmpdir(), 'lama-atomic-'));
    const target = path.join(dir, 'key.pem');
    await writeFile(target, 'old');
    await expect(writeFileAtomic(target, 'new')).rejects.toBeInstanceOf(UserError);
    expect(await readFile(target, 'utf8')).toBe('old');
    await writeFileAtomic(target, 'new', { force: true, mode: 0o600 });
    expect(await readFile(target, 'utf8')).toBe('new');
    expect((await stat(target)).mode & 0o777).toBe(0o600);
  });
});

describe('located YAML', () => {
  it('reports syntax errors at file:line:col', () => {
    try {
      parseYamlLocated('a: 1\nb: [1, 2\n', 'x.yml');
      expect.unreachable();
    } catch (e) {
      expect(e).toBeInstanceOf(UserError);
      expect((e as UserError).where).toMatch(/^x\.yml:\d+:\d+$/);
    }
  });

  it('maps a path back to its key position', () => {
    const y = parseYamlLocated('header:\n  version: 14\nrepos:\n  poky:\n    url: x\n', 'k.yml');
    expect(y.where(['repos', 'poky', 'url'])).toBe('k.yml:5:5');
    expect(y.where(['header', 'version'], 'value')).toBe('k.yml:2:12');
  });

  it('rejects duplicate keys', () => {
    expect(() => parseYamlLocated('a: 1\na: 2\n', 'd.yml')).toThrow(UserError);
  });
});
