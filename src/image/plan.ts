import { UserError } from '../errors.js';
import type { Bsp } from '../bsp/index.js';
import { slotBootArgs } from '../host/index.js';
import { GPT_ATTRIBUTES, dpsTypeFor, planGpt, type GptTable } from '../disk/index.js';
import { randomUuid, type RandomSource } from '../disk/random.js';
import { LUKS2_DATA_OFFSET } from '../luks/index.js';
import type { Layout } from './layout.js';

/**
 * The split A/B disk as pure data: every partition's offset, size, type and UUID, what goes into it,
 * the slots' root hashes and UKI command lines, and the ESP's files. Computed before a byte of the
 * image is written, printed (or emitted as JSON), then applied by build.ts.
 */

const MiB = 1024 * 1024;

/** Where the one-time provisioning key lives on the ESP; lamadist-init reads `lamadist/provision.key` from the ESP root. */
export const PROVISION_KEY_PATH = '/lamadist/provision.key';
/** UKI of each slot on the ESP (the RAUC efi slots replace exactly these files). */
export const ukiPath = (slot: 'a' | 'b'): string => `/EFI/Linux/lamadist-${slot}.efi`;
/** Directory RAUC keeps its EFI-side state in. */
export const RAUC_DIR = '/EFI/RAUC/';

export type PartitionContent = 'esp' | 'erofs' | 'verity' | 'ext4' | 'empty';

export interface PlannedPartition {
  number: number;
  label: string;
  role: string;
  slot?: 'a' | 'b';
  typeGuid: string;
  uuid: string;
  offset: number;
  size: number;
  content: PartitionContent;
  /** LUKS2 container UUID when the partition is encrypted; the payload starts 16 MiB in. */
  luksUuid?: string;
  /** Bytes of payload written (EROFS image, hash tree, ext4 file system). */
  payloadBytes: number;
}

/** What one populated slot holds. */
export interface SlotContent {
  erofs: { uuid: string; bytes: number };
  verity: { rootHash: string; salt: string; uuid: string; hashTreeBytes: number; dataBlocks: number };
  uki: { cmdline: string; bytes: number; signed: boolean };
}

export interface SlotPlan extends Partial<SlotContent> {
  slot: 'a' | 'b';
  populated: boolean;
  ukiPath?: string;
}

export interface ImagePlan {
  bsp: string;
  arch: string;
  layout: string;
  encrypt: boolean;
  timestamp: number;
  disk: { size: number; guid: string; sectorSize: number };
  partitions: PlannedPartition[];
  slots: SlotPlan[];
  esp: { volumeId: string; files: { path: string; bytes: number }[] };
  /** Where the keys are; never the keys themselves. */
  keys?: {
    recoveryKeyFile: string;
    provisionKeyPath: string;
    keyslots: { recovery: number; provision: number };
  };
  raw: { name: string; offset: number; bytes: number }[];
  var: { uuid: string; bytes: number };
}

export interface PlanInput {
  bsp: Bsp;
  layout: Layout;
  encrypt: boolean;
  timestamp: number;
  random: RandomSource;
  slots: { a: SlotContent; b?: SlotContent };
  /** ESP files other than the UKIs and the provisioning key, with sizes. */
  espExtra?: { path: string; bytes: number }[];
  raw?: { name: string; bytes: number }[];
  recoveryKeyFile?: string;
  /** Total disk size; the grow partition (var) takes what is left. */
  diskSize?: number;
}

function contentOf(role: string, slotPopulated: boolean): PartitionContent {
  if (role === 'esp') return 'esp';
  if (role === 'var') return 'ext4';
  if (role === 'root') return slotPopulated ? 'erofs' : 'empty';
  if (role === 'root-verity') return slotPopulated ? 'verity' : 'empty';
  return 'empty';
}

function mib(n: number): string {
  return `${(n / MiB).toFixed(n % MiB === 0 ? 0 : 1)} MiB`;
}

/** Compute the whole disk; throws a UserError naming the partition when something does not fit. */
export function planImage(input: PlanInput): { plan: ImagePlan; gpt: GptTable } {
  const { layout, bsp, random } = input;
  if (layout.arch !== bsp.arch)
    throw new UserError(
      'LAMA_E_LAYOUT',
      `layout ${layout.name} is for ${layout.arch} but BSP ${bsp.name} is ${bsp.arch}`,
    );
  const gpt = planGpt({
    alignment: layout.alignmentMiB * MiB,
    firstOffset: layout.firstPartitionMiB * MiB,
    diskSize: input.diskSize,
    diskGuid: randomUuid(random, 'gpt:disk'),
    partitions: layout.partitions.map((p) => ({
      name: p.label,
      typeGuid: dpsTypeFor(p.role, layout.arch),
      uuid: randomUuid(random, `gpt:${p.label}`),
      size: p.sizeMiB * MiB,
      grow: p.grow,
      // An empty slot is not bootable: no-auto keeps auto-discovery (systemd-dissect, gpt-auto) off it.
      attributes: p.slot && !input.slots[p.slot] ? 1n << BigInt(GPT_ATTRIBUTES['no-auto'] as number) : 0n,
    })),
  });
  const slotOf = (s: 'a' | 'b' | undefined): SlotContent | undefined => (s ? input.slots[s] : undefined);
  const espFiles = new Map<string, number>();
  for (const s of ['a', 'b'] as const) {
    const c = input.slots[s];
    if (c) espFiles.set(ukiPath(s), c.uki.bytes);
  }
  if (bsp.efiBootName) espFiles.set(`/EFI/BOOT/${bsp.efiBootName}`, input.slots.a.uki.bytes);
  if (input.encrypt) espFiles.set(PROVISION_KEY_PATH, 64);
  for (const f of input.espExtra ?? []) espFiles.set(f.path, f.bytes);

  let varPlan = { uuid: '', bytes: 0 };
  const partitions = layout.partitions.map((lp, i): PlannedPartition => {
    const g = gpt.partitions[i];
    if (!g) throw new Error('GPT plan lost a partition');
    const offset = Number(g.firstLba) * gpt.sectorSize;
    const size = Number(g.lastLba - g.firstLba + 1n) * gpt.sectorSize;
    const slot = slotOf(lp.slot);
    const content = contentOf(lp.role, Boolean(slot));
    const encrypted = input.encrypt && lp.encrypt === 'luks2';
    const room = size - (encrypted ? LUKS2_DATA_OFFSET : 0);
    let payloadBytes = 0;
    if (content === 'erofs' && slot) {
      payloadBytes = slot.erofs.bytes;
      if (payloadBytes > room) {
        const hdr = encrypted ? ` (${mib(room)} after the 16 MiB LUKS2 header)` : '';
        throw new UserError(
          'LAMA_E_ROOTFS_TOO_BIG',
          `rootfs image is ${mib(payloadBytes)} but slot ${lp.label} is ${mib(size)}${hdr}; raise size-mib in ${layout.file} or pass --size ${lp.label}=<MiB>`,
        );
      }
    } else if (content === 'verity' && slot) {
      payloadBytes = slot.verity.hashTreeBytes;
      if (payloadBytes > size)
        throw new UserError(
          'LAMA_E_ROOTFS_TOO_BIG',
          `hash tree of ${mib(payloadBytes)} does not fit partition ${lp.label} (${mib(size)}); pass --size ${lp.label}=<MiB>`,
        );
    } else if (content === 'ext4') {
      if (room < 8 * MiB)
        throw new UserError(
          'LAMA_E_LAYOUT',
          `partition ${lp.label} (${mib(size)}) is too small for its file system`,
        );
      // ext4 counts whole 4 KiB blocks; the grow partition may end off that grid.
      payloadBytes = Math.floor(room / 4096) * 4096;
      varPlan = { uuid: randomUuid(random, `ext4:${lp.label}`), bytes: payloadBytes };
    } else if (content === 'esp') {
      const total = [...espFiles.values()].reduce((a, b) => a + Math.ceil(b / 4096) * 4096, 0);
      // FAT tables and directories need room too: keep a margin of 1 MiB plus 2 %.
      if (total + MiB + size / 50 > size)
        throw new UserError(
          'LAMA_E_ESP_TOO_SMALL',
          `ESP files need ${mib(total)} but partition ${lp.label} is ${mib(size)}; pass --size ${lp.label}=<MiB>`,
        );
      payloadBytes = total;
    }
    // Empty slots are still LUKS2 containers: the initramfs opens both slots on every boot.
    const luks = encrypted && (content === 'erofs' || content === 'ext4' || lp.role === 'root');
    return {
      number: g.number,
      label: lp.label,
      role: lp.role,
      slot: lp.slot,
      typeGuid: g.typeGuid,
      uuid: g.uuid,
      offset,
      size,
      content,
      luksUuid: luks ? randomUuid(random, `luks-uuid:${lp.label}`) : undefined,
      payloadBytes,
    };
  });

  const raw = layout.raw.map((r) => {
    const given = input.raw?.find((x) => x.name === r.name);
    if (!given)
      throw new UserError(
        'LAMA_E_RAW_MISSING',
        `layout ${layout.name} needs the boot loader part '${r.name}' (${r.source}): pass --raw ${r.name}=<file>`,
      );
    if (given.bytes > r.maxKiB * 1024)
      throw new UserError(
        'LAMA_E_RAW_TOO_BIG',
        `${r.name} is ${given.bytes} bytes; at most ${r.maxKiB} KiB fit at sector ${r.offsetSectors}`,
      );
    return { name: r.name, offset: r.offsetSectors * 512, bytes: given.bytes };
  });

  const slots: SlotPlan[] = (['a', 'b'] as const).map((s) => {
    const c = input.slots[s];
    return c ? { slot: s, populated: true, ukiPath: ukiPath(s), ...c } : { slot: s, populated: false };
  });
  const espId = random('esp:volume-id', 4).toString('hex');
  const plan: ImagePlan = {
    bsp: bsp.name,
    arch: layout.arch,
    layout: layout.name,
    encrypt: input.encrypt,
    timestamp: input.timestamp,
    disk: { size: Number(gpt.diskSectors) * gpt.sectorSize, guid: gpt.diskGuid, sectorSize: gpt.sectorSize },
    partitions,
    slots,
    esp: {
      volumeId: espId,
      files: [...espFiles.entries()]
        .sort(([a], [b]) => a.localeCompare(b))
        .map(([path, bytes]) => ({ path, bytes })),
    },
    keys: input.encrypt
      ? {
          recoveryKeyFile: input.recoveryKeyFile ?? '',
          provisionKeyPath: PROVISION_KEY_PATH,
          keyslots: { recovery: 0, provision: 1 },
        }
      : undefined,
    raw,
    var: varPlan,
  };
  return { plan, gpt };
}

/**
 * The kernel command line of a slot's UKI: root hash and slot first, then the BSP console and extras.
 */
export function slotCmdline(rootHash: string, slot: 'a' | 'b', bsp: Bsp, extra?: string): string {
  return [...slotBootArgs(rootHash, slot), bsp.console, 'rw', extra?.trim()]
    .filter(Boolean)
    .join(' ');
}

/** Human rendering of a plan: the partition table and the slot summary. */
export function planText(p: ImagePlan): string {
  const rows = p.partitions.map((x) => [
    String(x.number),
    x.label,
    x.role,
    String(x.offset),
    mib(x.size),
    x.content + (x.luksUuid ? '+luks2' : ''),
    x.uuid,
  ]);
  const head = ['#', 'label', 'role', 'offset', 'size', 'content', 'partuuid'];
  const widths = head.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] as string).length)));
  const line = (c: string[]): string =>
    c
      .map((s, i) => s.padEnd(widths[i] as number))
      .join('  ')
      .trimEnd();
  const out = [
    `${p.bsp} (${p.arch}, layout ${p.layout}), disk ${mib(p.disk.size)}, GUID ${p.disk.guid}${p.encrypt ? ', LUKS2 encrypted' : ', not encrypted'}`,
    line(head),
    ...rows.map(line),
  ];
  for (const s of p.slots) {
    out.push(
      s.populated
        ? `slot ${s.slot}: root hash ${s.verity?.rootHash}, EROFS ${mib(s.erofs?.bytes ?? 0)}, ${s.ukiPath}: ${s.uki?.cmdline}`
        : `slot ${s.slot}: empty`,
    );
  }
  if (p.keys)
    out.push(
      `recovery key: ${p.keys.recoveryKeyFile} (keyslot 0); provisioning key: ESP ${p.keys.provisionKeyPath} (keyslot 1, consumed at first boot)`,
    );
  return out.join('\n');
}
