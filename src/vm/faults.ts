import { promises as fs } from 'node:fs';
import { UserError } from '../errors.js';
import type { ImagePlan } from '../image/index.js';
import { LUKS2_DATA_OFFSET } from '../luks/index.js';
import { GUID, addStoreVariables, listStoreVariables, type StoredVariable } from '../secureboot/index.js';
import { writeFileAtomic } from '../util/fsx.js';
import type { QemuResult } from './qemu.js';

/**
 * Faults for the emulated device: a changed byte in a slot's root image, the UEFI boot variables
 * of the device's variable store (read them, or set BootNext as RAUC does after an install), and
 * power cuts at a chosen moment of a run.
 */

/** Byte of the root image that every boot reads: the EROFS superblock sits at 1024 in block 0. */
export const SUPERBLOCK_OFFSET = 1024;

/** One changed byte on the device's disk. */
export interface Tamper {
  slot: 'a' | 'b';
  /** Offset in the slot's root image (the plaintext inside LUKS2). */
  imageOffset: number;
  /** Offset in the disk image file. */
  diskOffset: number;
  before: number;
  after: number;
}

/**
 * Where byte `imageOffset` of slot `slot`'s root image lies on the disk (pure). On an encrypted
 * disk that is the ciphertext of the LUKS2 payload: changing it garbles the whole 4096-byte sector
 * around it once decrypted, which is what an attacker with the disk in hand can do.
 */
export function slotByteOffset(plan: ImagePlan, slot: 'a' | 'b', imageOffset: number): number {
  const part = plan.partitions.find((p) => p.label === `rootfs_${slot}`);
  if (!part) throw new UserError('LAMA_E_VM_INPUT', `the disk has no partition rootfs_${slot}`);
  const payload = part.offset + (part.luksUuid ? LUKS2_DATA_OFFSET : 0);
  const room = part.offset + part.size - payload;
  if (!Number.isInteger(imageOffset) || imageOffset < 0 || imageOffset >= room) {
    throw new UserError('LAMA_E_VM_INPUT', `offset ${imageOffset} is outside the root image of slot ${slot} (${room} bytes)`);
  }
  return payload + imageOffset;
}

/**
 * Change one byte of a slot's root image on the device's disk (its lowest bit flipped), in place.
 * Default: a byte of the EROFS superblock, which the initramfs reads when it mounts the root.
 * The VM must not be running.
 */
export async function tamperSlot(dev: { disk: string; plan: ImagePlan }, slot: 'a' | 'b', opts: { imageOffset?: number } = {}): Promise<Tamper> {
  const imageOffset = opts.imageOffset ?? SUPERBLOCK_OFFSET;
  const diskOffset = slotByteOffset(dev.plan, slot, imageOffset);
  const h = await fs.open(dev.disk, 'r+');
  try {
    const b = Buffer.alloc(1);
    const { bytesRead } = await h.read(b, 0, 1, diskOffset);
    if (bytesRead !== 1) throw new UserError('LAMA_E_VM_INPUT', `${dev.disk} ends before byte ${diskOffset}`);
    const before = b[0] ?? 0;
    const after = before ^ 0x01;
    b[0] = after;
    await h.write(b, 0, 1, diskOffset);
    await h.sync();
    return { slot, imageOffset, diskOffset, before, after };
  } finally {
    await h.close();
  }
}

/** The boot variables of a UEFI variable store, Boot#### numbers as 4 uppercase hex digits. */
export interface BootVariables {
  /** BootOrder. */
  order: string[];
  /** BootNext, when set (consumed by the firmware on the next boot). */
  next?: string;
  /** Boot#### → its description ("A", "B", "UEFI QEMU HARDDISK ..."). */
  entries: Record<string, string>;
}

const hex4 = (n: number): string => n.toString(16).toUpperCase().padStart(4, '0');
const VAR_ADDED = 0x3f;
const VAR_IN_DELETED_TRANSITION = 0x3e;

/** The live copy of each variable: the added one, else one caught mid-update (as EDK2 reads it). */
function liveVariables(all: StoredVariable[]): StoredVariable[] {
  const byKey = new Map<string, StoredVariable>();
  for (const v of all) {
    const key = `${v.guid}/${v.name}`;
    if (v.state === VAR_ADDED) byKey.set(key, v);
    else if (v.state === VAR_IN_DELETED_TRANSITION && byKey.get(key)?.state !== VAR_ADDED) byKey.set(key, v);
  }
  return [...byKey.values()];
}

/** Description of an EFI_LOAD_OPTION: attributes (4), device path length (2), UTF-16 text up to NUL. */
function loadOptionDescription(data: Buffer): string {
  let end = 6;
  while (end + 1 < data.length && (data[end] !== 0 || data[end + 1] !== 0)) end += 2;
  return data.toString('utf16le', 6, end);
}

/** BootOrder, BootNext and the Boot#### entries of an OVMF variable store image (pure). */
export function parseBootVariables(store: Buffer, where = 'variable store'): BootVariables {
  const out: BootVariables = { order: [], entries: {} };
  for (const v of liveVariables(listStoreVariables(store, where))) {
    if (v.guid !== GUID.globalVariable) continue;
    if (v.name === 'BootOrder') {
      for (let i = 0; i + 1 < v.data.length; i += 2) out.order.push(hex4(v.data.readUInt16LE(i)));
    } else if (v.name === 'BootNext' && v.data.length >= 2) {
      out.next = hex4(v.data.readUInt16LE(0));
    } else if (/^Boot[0-9A-F]{4}$/.test(v.name)) {
      out.entries[v.name.slice(4)] = loadOptionDescription(v.data);
    }
  }
  return out;
}

/** The boot variables of a device's persisted variable store (read while its VM is off). */
export async function readBootVariables(varsFile: string): Promise<BootVariables> {
  return parseBootVariables(await fs.readFile(varsFile), varsFile);
}

/** The Boot#### entry RAUC uses for a slot: the one described by its bootname (A or B). */
export function slotEntry(vars: BootVariables, slot: 'a' | 'b'): string | undefined {
  const want = slot.toUpperCase();
  return Object.entries(vars.entries).find(([, d]) => d === want)?.[0];
}

const ATTR_NV_BS_RT = 0x07;

/**
 * Ask the device to try a slot on its next boot, as RAUC does after an install: BootNext set to
 * the slot's Boot entry in the device's variable store (written atomically while the VM is off).
 * Returns the entry number.
 */
export async function setBootNext(varsFile: string, slot: 'a' | 'b'): Promise<string> {
  const store = await fs.readFile(varsFile);
  const entry = slotEntry(parseBootVariables(store, varsFile), slot);
  if (!entry) throw new UserError('LAMA_E_VM_INPUT', `${varsFile} has no Boot entry for slot ${slot.toUpperCase()} (the device creates them on its first boot)`);
  const data = Buffer.alloc(2);
  data.writeUInt16LE(parseInt(entry, 16));
  await writeFileAtomic(varsFile, addStoreVariables(store, [{ name: 'BootNext', guid: GUID.globalVariable, attributes: ATTR_NV_BS_RT, data }], varsFile), {
    force: true,
  });
  return entry;
}

/** A moment to cut the power: `delayMs` after the first serial line matching `after`. */
export interface CutPoint {
  name: string;
  after: RegExp;
  delayMs?: number;
}

/** Where a power cut happened. */
export interface PowerCutRecord {
  point: string;
  /** The serial line that armed the cut. */
  line: string;
  delayMs: number;
  /** Milliseconds from the start of the run to the cut. */
  atMs: number;
}

/** Hooks a boot function hands to runQemu (its `signal` and `onLine` options). */
export interface RunHooks {
  signal: AbortSignal;
  onLine: (line: string) => void;
}

/**
 * Cut the power of a running device: `boot` starts the VM with the given hooks; once a serial
 * line matches `point.after`, QEMU is killed (SIGKILL, through the abort signal) `delayMs` later.
 * The guest gets no shutdown: no ACPI event, no unmount, whatever it had not written is lost.
 * Fails when the run ended before the cut (the point never came, or the VM stopped by itself).
 */
export async function cutPower<T extends QemuResult>(boot: (hooks: RunHooks) => Promise<T>, point: CutPoint): Promise<T & { cut: PowerCutRecord }> {
  const ctl = new AbortController();
  const started = Date.now();
  const delayMs = point.delayMs ?? 0;
  let armed: { line: string } | undefined;
  let cutAt = 0;
  let timer: NodeJS.Timeout | undefined;
  const onLine = (line: string): void => {
    if (armed || !point.after.test(line)) return;
    armed = { line: line.trim() };
    timer = setTimeout(() => {
      cutAt = Date.now() - started;
      ctl.abort();
    }, delayMs);
  };
  try {
    const r = await boot({ signal: ctl.signal, onLine });
    if (!r.aborted || !armed) {
      const why = armed ? `the VM stopped ${delayMs} ms too early for the cut` : `no serial line matched ${String(point.after)}`;
      throw new UserError('LAMA_E_VM_FAULT', `power cut "${point.name}" did not happen: ${why}`);
    }
    return { ...r, cut: { point: point.name, line: armed.line, delayMs, atMs: cutAt } };
  } finally {
    clearTimeout(timer);
  }
}
