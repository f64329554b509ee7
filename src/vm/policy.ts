import { promises as fs } from 'node:fs';
import path from 'node:path';
import { UserError, isErrno } from '../errors.js';
import { makeTempDir } from '../util/fsx.js';
import { run } from '../util/proc.js';

/**
 * The SELinux policy modules the emulated device adds to Debian's refpolicy, as the Yocto image
 * adds them to meta-selinux's refpolicy-targeted at rootfs time: refpolicy's own container module
 * (Debian's binary policy leaves it out; lamadist_k3s builds on it), meta-lamadist's modules, and
 * the fixture's probe. Each is compiled with refpolicy's development Makefile against Debian's
 * headers (selinux-policy-dev, the same release as the device's policy).
 *
 * Public API:
 * - `DISTRO_POLICY_MODULES`: the distribution's, in link order; `POLICY_MODULES`: those and the probe;
 * - `policySources(repo, modules?)` → the files each module is made from (name → contents), for a
 *   cache key and for `compilePolicyModules`;
 * - `compilePolicyModules(work, sources)` → the `.pp` packages, in the sources' order.
 */

/** Where Debian's source package of refpolicy leaves its sources, and container's within them. */
export const REFPOLICY_SRC = '/usr/src/selinux-policy-src.tar.zst';
const REFPOLICY_SERVICES = 'selinux-policy-src/policy/modules/services';
export const DEVEL_MAKEFILE = '/usr/share/selinux/devel/Makefile';

const RECIPES = 'meta-lamadist/dynamic-layers/selinux/recipes-security';

export interface PolicyModule {
  name: string;
  /** A directory of the repository holding `<name>.te` and optionally `.fc`, `.if`; absent: refpolicy's source. */
  dir?: string;
}

/** What the distribution's image links into its policy. */
export const DISTRO_POLICY_MODULES: readonly PolicyModule[] = [
  { name: 'container' },
  { name: 'lamadist_k3s', dir: `${RECIPES}/lamadist-k3s-selinux/files` },
  { name: 'lamadist', dir: `${RECIPES}/lamadist-selinux/files` },
  { name: 'lamadist_system', dir: `${RECIPES}/lamadist-system-selinux/files` },
];

export const POLICY_MODULES: readonly PolicyModule[] = [
  ...DISTRO_POLICY_MODULES,
  // Test-only: an entry point into the update client's domain for the slot report's probe.
  { name: 'lamadist_fixture', dir: 'src/vm/fixture' },
];

export type PolicySources = Map<string, Map<string, Buffer>>;

/** The `.te`, `.fc` and `.if` files of each module, read from `repo` or refpolicy's source. */
export async function policySources(repo: string, modules: readonly PolicyModule[] = POLICY_MODULES): Promise<PolicySources> {
  const out: PolicySources = new Map();
  // refpolicy's modules come out of its source tarball in one pass (selinux-policy-dev's headers carry their .if).
  const fromRefpolicy = modules.filter((m) => !m.dir).flatMap((m) => [`${m.name}.te`, `${m.name}.fc`]);
  const refpolicy = fromRefpolicy.length > 0 ? await refpolicyFiles(fromRefpolicy) : new Map<string, Buffer>();
  for (const m of modules) {
    const files = new Map<string, Buffer>();
    for (const ext of ['te', 'fc', 'if']) {
      const file = `${m.name}.${ext}`;
      const data = m.dir
        ? await fs.readFile(path.join(repo, m.dir, file)).catch((err: unknown) => {
            if (ext !== 'te' && isErrno(err, 'ENOENT')) return undefined;
            throw new UserError('LAMA_E_FIXTURE', `policy module source ${path.join(m.dir ?? '', file)} is missing from ${repo}`);
          })
        : refpolicy.get(file);
      if (data) files.set(file, data);
    }
    out.set(m.name, files);
  }
  return out;
}

async function refpolicyFiles(files: string[]): Promise<Map<string, Buffer>> {
  const tmp = await makeTempDir('lamadist-refpolicy-');
  try {
    const members = files.map((f) => `${REFPOLICY_SERVICES}/${f}`);
    const r = await run('tar', ['--zstd', '-xf', REFPOLICY_SRC, '-C', tmp.dir, ...members], { allowFailure: true });
    if (r.code !== 0) throw new UserError('LAMA_E_FIXTURE', `cannot read ${members.join(', ')} from ${REFPOLICY_SRC} (scripts/setup installs selinux-policy-src)`);
    return new Map(await Promise.all(files.map(async (f) => [f, await fs.readFile(path.join(tmp.dir, REFPOLICY_SERVICES, f))] as const)));
  } finally {
    await tmp.remove();
  }
}

/** Write the sources into `work`, compile each module there and return the packages' paths. */
export async function compilePolicyModules(work: string, sources: PolicySources): Promise<string[]> {
  await fs.mkdir(work, { recursive: true });
  for (const files of sources.values()) for (const [file, data] of files) await fs.writeFile(path.join(work, file), data);
  const packages = [...sources.keys()].map((n) => `${n}.pp`);
  await run('make', ['-s', '-C', work, '-f', DEVEL_MAKEFILE, ...packages], { userErrorCode: 'LAMA_E_FIXTURE' });
  return packages.map((p) => path.join(work, p));
}
