import { promises as fs } from 'node:fs';
import path from 'node:path';
import { UserError } from '../errors.js';

/**
 * Kernel module dependency resolution straight from the `.modinfo` ELF section of each .ko
 * (`depends=` and `softdep=pre:`), so no depmod is needed on the host and Debian's package (which
 * ships no modules.dep; its postinst generates it) works as unpacked.
 */

/** Module names compare with '-' and '_' as the same character, as modprobe does. */
export function moduleKey(name: string): string {
  return name.replace(/\.ko(\.(xz|zst|gz))?$/, '').replace(/-/g, '_');
}

/** The NUL-separated key=value strings of an ELF64 little-endian object's .modinfo section. */
export function readModinfo(elf: Buffer): Map<string, string[]> {
  const out = new Map<string, string[]>();
  if (elf.length < 64 || elf.readUInt32BE(0) !== 0x7f454c46 || elf[4] !== 2 || elf[5] !== 1) {
    throw new Error('not a 64-bit little-endian ELF object');
  }
  const shoff = Number(elf.readBigUInt64LE(0x28));
  const shentsize = elf.readUInt16LE(0x3a);
  const shnum = elf.readUInt16LE(0x3c);
  const shstrndx = elf.readUInt16LE(0x3e);
  const section = (i: number): { name: number; offset: number; size: number } => {
    const at = shoff + i * shentsize;
    return { name: elf.readUInt32LE(at), offset: Number(elf.readBigUInt64LE(at + 24)), size: Number(elf.readBigUInt64LE(at + 32)) };
  };
  const strtab = section(shstrndx);
  for (let i = 0; i < shnum; i++) {
    const s = section(i);
    const nameEnd = elf.indexOf(0, strtab.offset + s.name);
    if (elf.toString('latin1', strtab.offset + s.name, nameEnd) !== '.modinfo') continue;
    for (const kv of elf.toString('utf8', s.offset, s.offset + s.size).split('\0')) {
      const eq = kv.indexOf('=');
      if (eq <= 0) continue;
      const k = kv.slice(0, eq);
      out.set(k, [...(out.get(k) ?? []), kv.slice(eq + 1)]);
    }
  }
  return out;
}

/** The modules a module needs loaded first: hard dependencies and `softdep=pre:` entries. */
export function moduleDeps(modinfo: Map<string, string[]>): { hard: string[]; soft: string[] } {
  const hard = (modinfo.get('depends') ?? []).flatMap((d) => d.split(',')).filter(Boolean).map(moduleKey);
  const soft = (modinfo.get('softdep') ?? []).flatMap((s) => {
    const pre = /pre:\s*([^:]*?)(\s+post:|$)/.exec(s)?.[1] ?? '';
    return pre.split(/\s+/).filter(Boolean).map(moduleKey);
  });
  return { hard, soft };
}

async function walk(dir: string, into: Map<string, string>, base: string): Promise<void> {
  for (const d of await fs.readdir(dir, { withFileTypes: true })) {
    const p = path.join(dir, d.name);
    if (d.isDirectory()) await walk(p, into, base);
    else if (/\.ko(\.(xz|zst|gz))?$/.test(d.name)) into.set(moduleKey(d.name), path.relative(base, p));
  }
}

/** A module picked for the initramfs: its path relative to lib/modules/<version> and its deps. */
export interface ResolvedModule {
  name: string;
  rel: string;
  deps: string[];
  /** `alias=` entries of its modinfo, for modules.alias (the kernel's request_module asks by alias). */
  aliases?: string[];
}

/**
 * Resolve module names to files, dependencies first (the order insmod needs). Built-in modules
 * (listed in modules.builtin) are skipped; an unknown name is a UserError; a soft dependency that
 * does not exist is ignored, as modprobe does.
 */
export async function resolveModules(modulesDir: string, names: readonly string[]): Promise<ResolvedModule[]> {
  const index = new Map<string, string>();
  await walk(path.join(modulesDir, 'kernel'), index, modulesDir);
  const builtin = new Set(
    (await fs.readFile(path.join(modulesDir, 'modules.builtin'), 'utf8').catch(() => ''))
      .split('\n')
      .filter(Boolean)
      .map((l) => moduleKey(path.basename(l))),
  );
  // Soft dependencies name algorithms or aliases (libcrc32c wants "crc32c", which crc32c_generic
  // provides); the alias index costs a read of every module, so it is built only when needed.
  let aliases: Map<string, string> | undefined;
  const byAlias = async (name: string): Promise<string | undefined> => {
    if (!aliases) {
      aliases = new Map();
      for (const [mod, rel] of index) {
        if (!rel.endsWith('.ko')) continue;
        for (const a of readModinfo(await fs.readFile(path.join(modulesDir, rel))).get('alias') ?? []) {
          if (!aliases.has(moduleKey(a))) aliases.set(moduleKey(a), mod);
        }
      }
    }
    return aliases.get(moduleKey(name));
  };
  const order: ResolvedModule[] = [];
  const state = new Map<string, 'visiting' | 'done'>();
  const visit = async (name: string, soft: boolean): Promise<void> => {
    let key = moduleKey(name);
    if (state.has(key) || builtin.has(key)) return;
    if (!index.has(key)) key = (await byAlias(key)) ?? key;
    if (state.has(key) || builtin.has(key)) return;
    const rel = index.get(key);
    if (!rel) {
      if (soft) return;
      throw new UserError('LAMA_E_MODULE', `kernel module '${name}' is not in ${modulesDir}`);
    }
    if (!rel.endsWith('.ko')) {
      throw new UserError('LAMA_E_MODULE', `kernel module ${rel} is compressed; busybox insmod needs plain .ko files`);
    }
    state.set(key, 'visiting');
    const info = readModinfo(await fs.readFile(path.join(modulesDir, rel)));
    const { hard, soft: softDeps } = moduleDeps(info);
    for (const d of softDeps) await visit(d, true);
    for (const d of hard) await visit(d, false);
    state.set(key, 'done');
    order.push({ name: key, rel, deps: hard.filter((d) => index.has(d) && !builtin.has(d)), aliases: info.get('alias') ?? [] });
  };
  for (const n of names) await visit(n, false);
  return order;
}

/**
 * modules.dep text for the chosen modules (paths relative to lib/modules/<version>, as depmod
 * writes). Each line lists the whole dependency closure with the module to load first LAST, the
 * order modprobe (kmod and busybox) walks it in. `mods` must be dependency-first, as resolveModules returns.
 */
export function modulesDepText(mods: readonly ResolvedModule[]): string {
  const position = new Map(mods.map((m, i) => [m.name, i]));
  const byName = new Map(mods.map((m) => [m.name, m]));
  const closure = (m: ResolvedModule): ResolvedModule[] => {
    const seen = new Map<string, ResolvedModule>();
    const stack = [...m.deps];
    while (stack.length > 0) {
      const d = byName.get(stack.pop() ?? '');
      if (!d || seen.has(d.name)) continue;
      seen.set(d.name, d);
      stack.push(...d.deps);
    }
    return [...seen.values()].sort((a, b) => (position.get(b.name) ?? 0) - (position.get(a.name) ?? 0));
  };
  return mods.map((m) => `${m.rel}:${closure(m).map((d) => ` ${d.rel}`).join('')}\n`).join('');
}

/** modules.alias text for the chosen modules, as depmod writes it. */
export function modulesAliasText(mods: readonly ResolvedModule[]): string {
  return mods.flatMap((m) => (m.aliases ?? []).map((a) => `alias ${a} ${m.name}\n`)).join('');
}
