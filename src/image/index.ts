/**
 * The LamaDist A/B disk image: plan (pure) and build (apply), and inspection.
 *
 * Disk layout (labels fixed, sizes from meta-lamadist/wic/layouts/<layout>.yaml, DPS type UUIDs of
 * the BSP's architecture): esp, rootfs_a, verity_a, rootfs_b, verity_b, var. rootfs_X is a LUKS2
 * container (payload at 16 MiB, aes-xts-plain64, 4096-byte sectors) holding the slot's EROFS image;
 * verity_X holds its dm-verity tree with a veritysetup superblock at offset 0 (data = the decrypted
 * EROFS, so `veritysetup open /dev/mapper/rootfs_X root <verity_X> <roothash>`); var is LUKS2 holding
 * ext4 with overlay/etc/{upper,work}. With `encrypt: false` the same partitions hold the plain images.
 *
 * Keys: each image gets its own random recovery key (a typeable systemd-style modhex passphrase,
 * keyslot 0 of every container, written 0600 to `<image>.recovery-key`, never logged) and a
 * one-time 64-byte provisioning key (keyslot 1) stored on the ESP at `/lamadist/provision.key`,
 * which the initramfs uses once at first boot to enroll the TPM2 and then wipes (slot and file).
 * Only `recoveryKey` (a file the user names) shares a key between images.
 *
 * ESP: `/EFI/Linux/lamadist-a.efi` and `lamadist-b.efi` (command line `roothash=<hex>
 * lamadist.slot=a|b <console> rw`), `/EFI/BOOT/BOOTX64.EFI` (or BOOTAA64.EFI) = slot A's UKI,
 * `/EFI/RAUC/`, and the provisioning key.
 *
 * Public API:
 * - `planImage(input)` → `{ plan, gpt }` (pure), `planText(plan)`, `slotCmdline(rootHash, slot, bsp, extra?)`
 * - `buildImage(options)` → `ImagePlan` (writes the image atomically; `dryRun` plans only)
 * - `buildRootErofs(options)` → the root EROFS of a tree, SELinux-labelled (`fileContexts`, or the
 *   tree's own policy) and IMA-signed (`ima`) when asked
 * - `inspectImage(file, { key?, verify? })` → `ImageReport`
 * - `loadLayout(nameOrFile)`, `parseLayout(text, file)`, `withSizes(layout, sizes)`
 * - constants `PROVISION_KEY_PATH`, `ukiPath(slot)`, `RAUC_DIR`
 */
export { buildImage, copyInto, recoveryKeyText, type BuildImageOptions } from './build.js';
export {
  inspectImage,
  type ImageReport,
  type PartitionReport,
  type SlotReport,
  type UkiReport,
} from './inspect.js';
export {
  layoutsDir,
  loadLayout,
  parseLayout,
  withSizes,
  type Layout,
  type LayoutPartition,
  type LayoutRaw,
} from './layout.js';
export {
  PROVISION_KEY_PATH,
  RAUC_DIR,
  planImage,
  planText,
  slotCmdline,
  ukiPath,
  type ImagePlan,
  type PlanInput,
  type PlannedPartition,
  type SlotContent,
  type SlotPlan,
} from './plan.js';
export { buildRootErofs, type RootErofsOptions } from './root.js';
export { VAR_DIRS, buildVarExt4, mkfsExt4Args } from './ext4.js';
