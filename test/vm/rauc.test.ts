import { describe, expect, it } from 'vitest';
import { RAUC_CONFIGURE_FLAGS, debSrcSources } from '../../src/vm/rauc.js';

describe('deb-src entries from the host apt sources', () => {
  it('turns deb822 binary stanzas into source stanzas and keeps mirror, suites and keys', () => {
    const host = [
      'Types: deb',
      'URIs: http://deb.debian.org/debian',
      'Suites: bookworm bookworm-updates',
      'Components: main',
      'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg',
      '',
      'Types: deb',
      'URIs: http://example.org/debian',
      'Suites: bookworm',
      'Enabled: no',
      '',
      'Types: deb deb-src',
      'URIs: http://deb.debian.org/debian-security',
      'Suites: bookworm-security',
      'Components: main',
      '',
    ].join('\n');
    expect(debSrcSources(host, 'deb822')).toBe(
      [
        'Types: deb-src',
        'URIs: http://deb.debian.org/debian',
        'Suites: bookworm bookworm-updates',
        'Components: main',
        'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg',
        '',
        'Types: deb-src',
        'URIs: http://deb.debian.org/debian-security',
        'Suites: bookworm-security',
        'Components: main',
        '',
      ].join('\n'),
    );
  });

  it('turns one-line deb entries into deb-src and drops comments and existing deb-src lines', () => {
    const host = '# mirror\ndeb [arch=amd64] http://deb.debian.org/debian bookworm main\ndeb-src http://x/debian bookworm main\n';
    expect(debSrcSources(host, 'one-line')).toBe('deb-src [arch=amd64] http://deb.debian.org/debian bookworm main\n');
  });

  it('keeps Debian\'s own configure flag and adds streaming', () => {
    expect(RAUC_CONFIGURE_FLAGS).toContain('--enable-gpt');
    expect(RAUC_CONFIGURE_FLAGS).toContain('--enable-streaming');
  });
});
