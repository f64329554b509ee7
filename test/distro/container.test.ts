import { promises as fs } from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { REPO_ROOT } from '../helpers/cli.js';

// The Containerfile cannot be built here (its base image comes from a registry); these checks pin
// down what the issue requires of it and that its kas is the release whose schema the tests use.
const dir = path.join(REPO_ROOT, 'container');

describe('build container definition', () => {
  it('is Ubuntu 22.04 with Python 3.12, the Yocto host packages, en_US.UTF-8 and user builder (UID 1000)', async () => {
    const text = await fs.readFile(path.join(dir, 'Containerfile'), 'utf8');
    expect(text).toMatch(/^FROM docker\.io\/library\/ubuntu:22\.04$/m);
    expect(text).toMatch(/python3\.12 python3\.12-venv/);
    expect(text).toMatch(/python3\.12 -m venv \/opt\/kas/);
    for (const pkg of ['gawk', 'wget', 'git', 'diffstat', 'unzip', 'texinfo', 'gcc', 'build-essential', 'chrpath', 'socat', 'cpio', 'python3-pexpect', 'xz-utils', 'debianutils', 'iputils-ping', 'python3-git', 'python3-jinja2', 'python3-subunit', 'zstd', 'liblz4-tool', 'file', 'locales', 'libacl1']) {
      expect(text, pkg).toMatch(new RegExp(`\\s${pkg.replace(/[.+]/g, '\\$&')}\\s`));
    }
    expect(text).toMatch(/locale-gen en_US\.UTF-8/);
    expect(text).toMatch(/^ENV LANG=en_US\.UTF-8/m);
    expect(text).toMatch(/ARG BUILDER_UID=1000/);
    expect(text).toMatch(/useradd --uid "\$\{BUILDER_UID\}"[^\n]* builder/);
    expect(text).toMatch(/^USER builder$/m);
    expect(text).toMatch(/^WORKDIR \/work$/m);
    expect(text).toMatch(/pip install [^\n]*-r \/opt\/lamadist\/requirements\.txt/);
  });

  it('pins kas 5.4 (the schema the kas files are validated against) by its release commit', async () => {
    const lock = await fs.readFile(path.join(dir, 'requirements.txt'), 'utf8');
    const input = await fs.readFile(path.join(dir, 'requirements.in'), 'utf8');
    expect(input).toMatch(/^kas\[tui\] == 5\.4$/m);
    expect(lock).toMatch(/^kas\[tui\] @ git\+https:\/\/github\.com\/siemens\/kas\.git@81bab5294be29de4b64adedce962d36184bfc66f$/m);
    for (const line of lock.split('\n').filter((l) => l && !l.startsWith('#') && !l.startsWith('kas'))) {
      expect(line, 'every dependency has an exact version').toMatch(/^[A-Za-z0-9_.-]+==\d[^\s]*$/);
    }
  });
});
