import { X509Certificate } from 'node:crypto';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { UserError } from '../../src/errors.js';
import { fuzz, type FuzzReport } from '../../src/fuzz/index.js';
import { Rng, jsonText, mutateBytes, mutateJson, mutateYaml } from '../../src/fuzz/mutate.js';
import { composeKas } from '../../src/kas/index.js';
import { signEmbedded, verifyEmbedded } from '../../src/rauc/cms.js';
import { makePki } from '../../src/fuzz/targets.js';
import { parsePe } from '../../src/pe/index.js';
import { EFI_STUBS, buildUki } from '../../src/uki/index.js';
import { runCli } from '../helpers/cli.js';

let dir: string;
beforeAll(async () => {
  dir = await fs.mkdtemp(path.join(os.tmpdir(), 'lamadist-fuzz-test-'));
});
afterAll(async () => {
  await fs.rm(dir, { recursive: true, force: true });
});

describe('mutations', () => {
  it('are reproducible from (seed, target, case) alone', () => {
    const seed = Buffer.from('EFI PART'.repeat(64));
    const a = mutateBytes(Rng.forCase(1, 'gpt', 17), seed);
    const b = mutateBytes(Rng.forCase(1, 'gpt', 17), seed);
    expect(a.data.equals(b.data)).toBe(true);
    expect(a.steps).toEqual(b.steps);
    expect(mutateBytes(Rng.forCase(2, 'gpt', 17), seed).data.equals(a.data)).toBe(false);
  });

  it('reach the structural cases the issue names: hostile keys, deep nesting, aliases', () => {
    const seen = new Set<string>();
    for (let n = 0; n < 400; n++) {
      const j = mutateJson(Rng.forCase(1, 'json', n), { a: { b: [1, 'x'] }, c: 'd' });
      for (const s of j.steps) seen.add(s.split(' ')[0] as string);
      const text = jsonText(j.value) ?? '';
      if (text.includes('"__proto__"')) seen.add('__proto__');
      if (text.includes('[[[[[[[[[[') || text.includes('{"a":{"a":{"a":{"a":')) seen.add('deep');
      const y = mutateYaml(Rng.forCase(1, 'yaml', n), 'header:\n  version: 14\nmachine: qemux86-64\n');
      for (const s of y.steps) seen.add(s);
    }
    for (const s of [
      'replace',
      'delete',
      'key',
      'array',
      '__proto__',
      'deep',
      'undefined alias',
      'alias bomb',
      'merge key',
    ])
      expect(seen).toContain(s);
  });
});

describe('fixed-seed fuzz run (the fast subset of npm run fuzz)', () => {
  let report: FuzzReport;
  beforeAll(async () => {
    report = await fuzz({
      seed: 1,
      cases: 40,
      peerEvery: 0,
      cliCases: 1,
      results: path.join(dir, 'results'),
    });
  }, 240_000);

  it('covers every parser of untrusted input', () => {
    expect(report.targets.map((t) => t.name)).toEqual([
      'gpt',
      'luks2',
      'rauc-bundle',
      'rauc-manifest',
      'cms',
      'recovery-escrow',
      'tpm2-quote',
      'tpm2-ek',
      'pe-uki',
      'uki-patch',
      'verity',
      'erofs',
      'kas-yaml',
      'hosts-yaml',
      'ddi-json',
      'http-range',
    ]);
    for (const t of report.targets) expect(t.accepted + t.refused + t.failures.length, t.name).toBe(40);
  });

  it('every mutant is accepted or refused with one line, in time, leaving nothing behind', () => {
    const failures = report.targets.flatMap((t) =>
      t.failures.map(
        (f) => `${f.target} case ${f.n} (${f.steps.join('; ')}): ${f.problem.split('\n')[0] ?? ''}`,
      ),
    );
    expect(failures).toEqual([]);
  });

  it('the CLI binary exits 0 or 2 on the same kind of input', () => {
    const cli = report.targets.filter((t) => t.cli.cases > 0);
    expect(cli.map((t) => t.name)).toEqual(['gpt', 'luks2', 'rauc-bundle', 'recovery-escrow', 'pe-uki', 'verity', 'hosts-yaml']);
    for (const t of cli) expect(t.cli.exit0 + t.cli.exit2, t.name).toBe(t.cli.cases);
  });
});

describe('regressions found by the fuzzer', () => {
  it('hosts.yaml: a static ip block with a list or mapping where a string belongs is a located error', async () => {
    for (const [field, value] of [
      ['address', '{toString: 1}'],
      ['gateway', '[10.0.0.1]'],
      ['interface', '{a: 1}'],
      ['ntp', '[1]'],
      ['dns', '[[1]]'],
    ]) {
      const inv = path.join(dir, `hosts-${field}.yaml`);
      const block = { address: '10.0.0.5/24', [field as string]: value };
      const lines = Object.entries(block).map(([k, v]) => `      ${k}: ${v}`);
      await fs.writeFile(
        inv,
        `hosts:\n  alpha:\n    machine-id: ${'ab'.repeat(16)}\n    ip:\n${lines.join('\n')}\n`,
      );
      const r = await runCli(['host', 'list', '--inventory', inv]);
      expect(r.code, `${field}: ${r.stderr}`).toBe(2);
      expect(r.stderr).toMatch(
        new RegExp(`^lamadist: error: ${inv.replaceAll('.', '\\.')}:5:\\d+: .*\\[LAMA_E_BAD_IP\\]\\n$`),
      );
    }
  });

  it('CMS: a signer certificate whose public key does not decode refuses the signature', async () => {
    const pki = await makePki(dir);
    const certPem = await fs.readFile(pki.signCert, 'utf8');
    const keyring = await fs.readFile(pki.ca, 'utf8');
    const der = signEmbedded(
      Buffer.from('manifest'),
      { certPem, keyPem: await fs.readFile(pki.signKey, 'utf8') },
      new Date(),
    );
    // The EC point closes the certificate's SubjectPublicKeyInfo; one changed byte puts it off the curve.
    const point = new X509Certificate(certPem).publicKey
      .export({ type: 'spki', format: 'der' })
      .subarray(-65);
    const at = der.indexOf(point);
    expect(at).toBeGreaterThan(0);
    const bad = Buffer.from(der);
    bad[at + 40] = (bad[at + 40] as number) ^ 0x01;
    const err = (() => {
      try {
        verifyEmbedded(bad, keyring);
      } catch (e) {
        return e;
      }
      return undefined;
    })();
    expect(err).toBeInstanceOf(UserError);
    expect((err as UserError).code).toBe('LAMA_E_BUNDLE_BAD_SIGNATURE');
  });

  it('PE: a section whose VirtualSize reaches beyond SizeOfImage is refused, not zero-filled to gigabytes', async () => {
    const uki = await buildUki({
      stub: EFI_STUBS['x86-64'] as string,
      kernel: Buffer.alloc(8192, 1),
      cmdline: 'quiet',
      osrel: Buffer.from('ID=x\n'),
      uname: '6.1.0',
    });
    const linux = parsePe(uki).sections.find((s) => s.name === '.linux');
    expect(linux).toBeDefined();
    const bad = Buffer.from(uki);
    bad.writeUInt32LE(0x80000000, (linux?.headerOffset ?? 0) + 8);
    const file = path.join(dir, 'huge-vsize.efi');
    await fs.writeFile(file, bad);
    const t0 = performance.now();
    const r = await runCli(['uki', 'measure', file]);
    expect(r.code, r.stderr).toBe(2);
    expect(r.stderr).toMatch(
      /^lamadist: error: .*section \.linux .* lies outside SizeOfImage .*\[LAMA_E_NOT_PE\]\n$/,
    );
    expect(performance.now() - t0).toBeLessThan(10_000);
  });

  it('a UserError quoting a line break from the input stays one line', async () => {
    const root = path.join(dir, 'kas-newline');
    await fs.mkdir(path.join(root, 'kas'), { recursive: true });
    await fs.writeFile(
      path.join(root, 'kas', 'a.kas.yml'),
      'header:\n  version: 14\n  includes:\n    - "no\\nsuch.yml"\n',
    );
    const err = await composeKas(['kas/a.kas.yml'], { repoRoot: root }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(UserError);
    expect((err as UserError).line()).not.toContain('\n');
    expect((err as UserError).line()).toContain("'no\\nsuch.yml'");
  });

  it('kas: a file including the same file 10000 times composes in linear time', async () => {
    const root = path.join(dir, 'kas-many');
    await fs.mkdir(path.join(root, 'kas'), { recursive: true });
    await fs.writeFile(
      path.join(root, 'kas', 'base.kas.yml'),
      'header:\n  version: 14\nmachine: qemux86-64\n',
    );
    const includes = Array.from({ length: 10000 }, () => '    - kas/base.kas.yml').join('\n');
    await fs.writeFile(
      path.join(root, 'kas', 'top.kas.yml'),
      `header:\n  version: 14\n  includes:\n${includes}\n`,
    );
    const t0 = performance.now();
    const c = await composeKas(['kas/top.kas.yml'], { repoRoot: root });
    expect(c.config.machine).toBe('qemux86-64');
    expect(performance.now() - t0).toBeLessThan(5000);
  });

  it('YAML: a collection used as a key prints no Node warning (one stderr line at most)', async () => {
    const inv = path.join(dir, 'hosts-collection-key.yaml');
    await fs.writeFile(inv, '? [a, b]\n: 1\nhosts: {}\n');
    const r = await runCli(['host', 'list', '--inventory', inv]);
    expect(r.stderr).toBe('');
  });
});
