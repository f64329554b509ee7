import { existsSync, promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { run } from '../../src/util/proc.js';
import { compilePolicyModules, DEVEL_MAKEFILE, DISTRO_POLICY_MODULES, policySources, REFPOLICY_SRC } from '../../src/vm/policy.js';
import { REPO_ROOT } from '../helpers/cli.js';
import { skipBecause } from '../helpers/skip.js';

/**
 * meta-lamadist's SELinux modules in the policy the emulated device runs: Debian's build of the
 * reference policy (selinux-policy-default). Both modules are compiled with refpolicy's
 * development Makefile and linked with semodule into a copy of the host's policy store, and the
 * resulting kernel policy is asked with sesearch and seinfo who may read the device's secrets and
 * which domains LamaDist's programs run in, and its file_contexts with matchpathcon.
 */

const STORE = '/var/lib/selinux/default';
const POLICY_DIR = '/etc/selinux/default';

const TOOLS = ['make', 'checkmodule', 'semodule_package', 'semodule', 'sesearch', 'seinfo', 'matchpathcon', 'tar', 'zstd'];

async function missing(): Promise<string[]> {
  const absent: string[] = [];
  for (const t of TOOLS) if ((await run('sh', ['-c', `command -v ${t}`], { allowFailure: true })).code !== 0) absent.push(t);
  for (const f of [DEVEL_MAKEFILE, STORE, POLICY_DIR, REFPOLICY_SRC]) if (!existsSync(f)) absent.push(f);
  return absent;
}
const absent = await missing();

interface Rule {
  source: string;
  target: string;
}

let tmp: string;
let root: string;
let policy: string;
let built: { code: number; out: string };
let loaded: { code: number; out: string };
const attributes = new Map<string, string[]>();

async function tool(cmd: string, args: string[], cwd?: string): Promise<{ code: number; out: string }> {
  const r = await run(cmd, args, { cwd, allowFailure: true, timeoutMs: 120_000 });
  return { code: r.code, out: `${r.stdout}${r.stderr}` };
}

/** Every attribute of the policy with the types it stands for (seinfo -x -a). */
async function loadAttributes(): Promise<void> {
  const r = await tool('seinfo', [policy, '-x', '-a']);
  expect(r.code, r.out).toBe(0);
  let current: string[] | undefined;
  for (const line of r.out.split('\n')) {
    const attr = /^\s+attribute (\S+);$/.exec(line);
    if (attr) attributes.set(attr[1] ?? '', (current = []));
    else if (current && /^\s+[a-z0-9_]+$/.test(line)) current.push(line.trim());
  }
}

/** The types an attribute stands for, or the name itself when it is a type. */
function expand(name: string): string[] {
  return attributes.get(name) ?? [name];
}

/** Allow rules from sesearch; each names a source and a target, either may be an attribute. */
async function allowRules(args: string[]): Promise<Rule[]> {
  const r = await tool('sesearch', ['-A', ...args, policy]);
  expect(r.code, r.out).toBe(0);
  return [...r.out.matchAll(/^allow (\S+) (\S+):\S+ /gm)].map((m) => ({ source: m[1] ?? '', target: m[2] ?? '' }));
}

function domainsOf(rules: Rule[]): string[] {
  return [...new Set(rules.flatMap((r) => expand(r.source)))].sort();
}

/**
 * The rules by which a domain may read files of `type` (sesearch matches the attributes the type
 * is in), conditional ones whatever their boolean.
 */
const readRules = new Map<string, Rule[]>();
async function readers(type: string): Promise<Rule[]> {
  const known = readRules.get(type);
  if (known) return known;
  const rules = await allowRules(['-t', type, '-c', 'file', '-p', 'read']);
  readRules.set(type, rules);
  return rules;
}

/**
 * Those whose rule names the type or an attribute narrower than every file: the domains that read
 * every file on the system (unconfined ones, whole-disk backup and integrity tools) left out.
 */
async function namedReaders(type: string): Promise<string[]> {
  return domainsOf((await readers(type)).filter((r) => r.target !== 'file_type'));
}

async function lamadistReaders(type: string): Promise<string[]> {
  const ours = new Set(expand('lamadist_domain'));
  return domainsOf(await readers(type)).filter((d) => ours.has(d));
}

describe.skipIf(skipBecause(absent.length > 0, 'SELinux policy modules in the reference policy', `missing ${absent.join(', ')} (scripts/setup installs them)`))(
  "meta-lamadist's SELinux modules in Debian's reference policy",
  () => {
    beforeAll(async () => {
      tmp = await fs.mkdtemp(path.join(os.tmpdir(), 'lamadist-selinux-'));
      const packages = await compilePolicyModules(path.join(tmp, 'work'), await policySources(REPO_ROOT, DISTRO_POLICY_MODULES)).then(
        (p) => ({ code: 0, out: '', p }),
        (err: unknown) => ({ code: 1, out: String(err), p: [] as string[] }),
      );
      built = packages;

      // The device's policy store, copied: semodule -p links the modules into the copy and writes
      // the kernel policy and file_contexts under the copy's /etc/selinux.
      root = path.join(tmp, 'root');
      await fs.mkdir(path.join(root, 'var/lib/selinux'), { recursive: true });
      await fs.mkdir(path.join(root, 'etc/selinux'), { recursive: true });
      await fs.cp(STORE, path.join(root, 'var/lib/selinux/default'), { recursive: true });
      await fs.cp(POLICY_DIR, path.join(root, 'etc/selinux/default'), { recursive: true });
      loaded = built.code === 0
        ? await tool('semodule', ['-p', root, '-s', 'default', '-i', ...packages.p])
        : { code: -1, out: 'not built' };
      policy = path.join(root, 'etc/selinux/default/policy/policy.33');
      if (loaded.code === 0) await loadAttributes();
    });
    afterAll(async () => {
      if (tmp) await fs.rm(tmp, { recursive: true, force: true });
    });

    it('lamadist and lamadist_k3s compile against the refpolicy headers and load into the device policy with semodule -i', async () => {
      expect(built.code, built.out).toBe(0);
      expect(loaded.code, loaded.out).toBe(0);
      const listed = await tool('semodule', ['-p', root, '-s', 'default', '-l']);
      expect(listed.out.split('\n')).toEqual(expect.arrayContaining(['container', 'lamadist', 'lamadist_k3s', 'lamadist_system']));
      // The kernel policy was rebuilt with them; the host's own store is untouched.
      expect((await tool('seinfo', ['-t', 'lamadist_bundle_key_t', policy])).out).toMatch(/^\s+lamadist_bundle_key_t$/m);
      expect((await tool('seinfo', ['-t', 'lamadist_bundle_key_t', path.join(POLICY_DIR, 'policy/policy.33')])).out).not.toMatch(/^\s+lamadist_bundle_key_t$/m);
    });

    it('only RAUC reads the bundle key, besides the domains that read every file', async () => {
      expect(await namedReaders('lamadist_bundle_key_t')).toEqual(['lamadist_rauc_t']);
      // Of LamaDist's own domains, the update path alone: RAUC, its hook and the installer (the
      // three keep unconfined rights for now).
      expect(await lamadistReaders('lamadist_bundle_key_t')).toEqual(['lamadist_install_t', 'lamadist_rauc_hook_t', 'lamadist_rauc_t']);
    });

    it('only the update client and the attestation agent read the update token, besides the domains that read every file', async () => {
      expect(await namedReaders('lamadist_update_token_t')).toEqual(['lamadist_attest_t', 'lamadist_update_t']);
      expect(await lamadistReaders('lamadist_update_token_t')).toEqual([
        'lamadist_attest_t', 'lamadist_install_t', 'lamadist_rauc_hook_t', 'lamadist_rauc_t', 'lamadist_update_t',
      ]);
    });

    it('the confined services have no rule, direct or through an attribute, that reads the secrets', async () => {
      const can = async (domain: string, type: string): Promise<boolean> => domainsOf(await readers(type)).includes(domain);
      for (const domain of ['lamadist_health_t', 'lamadist_attest_t', 'lamadist_boot_entries_t', 'lamadist_grow_var_t', 'lamadist_update_t']) {
        expect(await can(domain, 'lamadist_bundle_key_t'), `${domain} reads the bundle key`).toBe(false);
      }
      for (const domain of ['lamadist_health_t', 'lamadist_boot_entries_t', 'lamadist_grow_var_t']) {
        expect(await can(domain, 'lamadist_update_token_t'), `${domain} reads the update token`).toBe(false);
      }
      // The same query finds the rules that exist.
      expect(await can('lamadist_rauc_t', 'lamadist_bundle_key_t')).toBe(true);
      expect(await can('lamadist_attest_t', 'lamadist_update_token_t')).toBe(true);
      expect(await can('lamadist_health_t', 'etc_t')).toBe(true);
    });

    it("systemd starts LamaDist's programs in their domains, and RAUC runs the bundle's hook in its own", async () => {
      const entries: [string, string][] = [
        ['lamadist_health_exec_t', 'lamadist_health_t'],
        ['lamadist_boot_entries_exec_t', 'lamadist_boot_entries_t'],
        ['lamadist_grow_var_exec_t', 'lamadist_grow_var_t'],
        ['lamadist_attest_exec_t', 'lamadist_attest_t'],
        ['lamadist_update_exec_t', 'lamadist_update_t'],
        ['lamadist_rauc_exec_t', 'lamadist_rauc_t'],
        ['lamadist_install_exec_t', 'lamadist_install_t'],
      ];
      const transitions = (await tool('sesearch', ['-T', '-s', 'init_t', '-c', 'process', policy])).out;
      const entrypoints = await allowRules(['-c', 'file', '-p', 'entrypoint', '-rt', '-t', '^lamadist_']);
      for (const [exec, domain] of entries) {
        expect(transitions).toContain(`type_transition init_t ${exec}:process ${domain};`);
        expect(entrypoints).toContainEqual({ source: domain, target: exec });
      }
      expect(transitions).not.toMatch(/type_transition init_t bin_t:process lamadist_/);
      const hook = (await tool('sesearch', ['-T', '-s', 'lamadist_rauc_t', '-t', 'unlabeled_t', '-c', 'process', policy])).out;
      expect(hook).toContain('type_transition lamadist_rauc_t unlabeled_t:process lamadist_rauc_hook_t;');
      // Only RAUC's domain enters the hook's (which, unconfined, may "enter" itself).
      const into = (await allowRules(['-t', 'lamadist_rauc_hook_t', '-c', 'process', '-p', 'transition'])).filter((r) => r.target === 'lamadist_rauc_hook_t');
      expect(domainsOf(into).filter((d) => d !== 'lamadist_rauc_hook_t')).toEqual(['lamadist_rauc_t']);
      const hookEntry = await allowRules(['-s', 'lamadist_rauc_hook_t', '-t', 'unlabeled_t', '-c', 'file', '-p', 'entrypoint']);
      expect(hookEntry).toContainEqual({ source: 'lamadist_rauc_hook_t', target: 'unlabeled_t' });
      // From the bundle RAUC mounted nosuid.
      expect(await allowRules(['-s', 'lamadist_rauc_t', '-t', 'lamadist_rauc_hook_t', '-c', 'process2', '-p', 'nosuid_transition'])).toContainEqual({ source: 'lamadist_rauc_t', target: 'lamadist_rauc_hook_t' });
    });

    it("the policy's file_contexts give the on-target files their types", async () => {
      const fc = path.join(root, 'etc/selinux/default/contexts/files/file_contexts');
      const expected: Record<string, string> = {
        '/usr/libexec/lamadist/lamadist-health': 'lamadist_health_exec_t',
        '/usr/libexec/lamadist/lamadist-boot-entries': 'lamadist_boot_entries_exec_t',
        '/usr/libexec/lamadist/lamadist-grow-var': 'lamadist_grow_var_exec_t',
        '/usr/libexec/lamadist/lamadist-attest': 'lamadist_attest_exec_t',
        '/usr/libexec/lamadist/lamadist-ddi-client': 'lamadist_update_exec_t',
        '/usr/bin/rauc-hawkbit-updater': 'lamadist_update_exec_t',
        '/usr/bin/rauc': 'lamadist_rauc_exec_t',
        '/usr/sbin/lamadist-install': 'lamadist_install_exec_t',
        '/var/lib/rauc/encryption': 'lamadist_bundle_key_t',
        '/var/lib/rauc/encryption/device.key.pem': 'lamadist_bundle_key_t',
        '/var/lib/rauc/encryption/device.cert.pem': 'lamadist_bundle_key_t',
        '/var/lib/lamadist/hawkbit.conf': 'lamadist_update_token_t',
        '/etc/rauc-hawkbit-updater/config.conf': 'lamadist_update_token_t',
        '/var/lib/lamadist/attest/ak.priv': 'lamadist_attest_var_lib_t',
        '/var/lib/lamadist/relabel.stamp': 'lamadist_var_lib_t',
        // What the module leaves to the reference policy.
        '/var/lib/rauc/central.raucs': 'var_lib_t',
        '/etc/rauc/system.conf': 'etc_t',
        '/etc/lamadist/health.conf': 'etc_t',
        '/usr/libexec/lamadist/lamadist-relabel': 'bin_t',
        // lamadist_k3s.
        '/usr/bin/k3s': 'container_engine_exec_t',
        '/var/lib/rancher/k3s/storage/pvc-1/data': 'container_file_t',
      };
      const r = await tool('matchpathcon', ['-f', fc, ...Object.keys(expected)]);
      expect(r.code, r.out).toBe(0);
      const got = Object.fromEntries([...r.out.matchAll(/^(\S+)\t\w+:\w+:(\w+):s0$/gm)].map((m) => [m[1] ?? '', m[2] ?? '']));
      expect(got).toEqual(expected);
    });
  },
);
