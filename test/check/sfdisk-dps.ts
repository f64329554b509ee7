import { run } from '../../src/util/proc.js';
import type { DpsLookup, PartitionRole } from '../../src/check/index.js';
import type { DpsArch } from '../../src/bsp/index.js';

/**
 * A DPS lookup built from util-linux's own GPT type list (`sfdisk --list-types`), so the check
 * logic is tested against a table that lamadist did not write.
 */
export async function sfdiskDps(): Promise<DpsLookup> {
  const { stdout } = await run('sfdisk', ['--label', 'gpt', '--list-types']);
  const names = new Map<string, string>();
  for (const line of stdout.split('\n')) {
    const m = /^([0-9A-F-]{36})\s+(.+)$/i.exec(line.trim());
    if (m?.[1] && m[2]) names.set(m[2].trim(), m[1].toUpperCase());
  }
  const archName: Record<DpsArch, string> = { 'x86-64': 'x86-64', arm64: 'ARM-64' };
  const nameFor = (role: PartitionRole, arch: DpsArch): string =>
    ({ esp: 'EFI System', var: 'Linux variable data', root: `Linux root (${archName[arch]})`, 'root-verity': `Linux root verity (${archName[arch]})` })[role];
  return {
    typeFor: (role, arch) => names.get(nameFor(role, arch)),
    describe: (uuid) => [...names].find(([, u]) => u === uuid.toUpperCase())?.[0],
  };
}
