import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { REPO_ROOT } from '../helpers/cli.js';
import { skipBecause } from '../helpers/skip.js';

// The real BitBake parse of one BSP (3-4 minutes cold on two cores), run only when the layer
// checkouts are given: LAMADIST_LAYERS_DIR=<dir with poky, meta-openembedded, ...> and, as root,
// PARSE_CHECK_USER=<non-root user>. CI has no checkouts (no network to the layer hosts), so there
// it is skipped; scripts/parse-check itself reports SKIP (exit 77) in that case.
const layers = process.env.LAMADIST_LAYERS_DIR;
const bsp = process.env.LAMADIST_PARSE_CHECK_BSP ?? 'x86_64';

describe.skipIf(
  skipBecause(!layers || !existsSync(layers), 'BitBake parse (opt-in)', 'set LAMADIST_LAYERS_DIR to a directory with the layer checkouts to run it'),
)('BitBake parse of the distribution (scripts/parse-check)', () => {
  it(`parses every recipe and resolves lama-image-base for ${bsp}`, () => {
    const r = spawnSync(path.join(REPO_ROOT, 'scripts/parse-check'), [layers ?? '', bsp], { encoding: 'utf8', timeout: 1_200_000 });
    expect(r.stderr).toBe('');
    expect(r.stdout).toMatch(new RegExp(`^parse-check: PASS ${bsp}: MACHINE=\\S+: bitbake -p ok \\(\\d+ recipes.*bitbake -g lama-image-base ok \\((\\d+) tasks`, 'm'));
    expect(r.status).toBe(0);
  }, 1_300_000);
});
