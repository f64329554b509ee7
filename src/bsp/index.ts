import { UserError } from '../errors.js';

/**
 * The board support packages LamaDist builds for. This table is the toolkit's single source of
 * truth for BSP names; `lamadist check` verifies that each row has its kas file, machine config,
 * layout and RAUC system.conf in the repository, and that no BSP exists there without a row here.
 */

/** Architectures as the Discoverable Partitions Specification names them. */
export type DpsArch = 'x86-64' | 'arm64';

export interface Bsp {
  /** Name used on the command line and in kas/bsp/<name>.kas.yml. */
  name: string;
  /** One-line description for `lamadist bsp list`. */
  title: string;
  /** MACHINE in meta-lamadist-bsp/conf/machine/<machine>.conf. */
  machine: string;
  arch: DpsArch;
  /** Disk layout definition: meta-lamadist/wic/layouts/<layout>.yaml. */
  layout: 'x86-64' | 'aarch64' | 'rockchip';
  /** RAUC system.conf family directory under meta-lamadist/recipes-core/rauc/files/. */
  raucFamily: 'efi' | 'uboot';
  /** How the board boots the UKI or kernel. */
  boot: 'uki' | 'u-boot';
  /** Kernel console argument for the serial port. */
  console: string;
  /** RAUC `compatible` string; bundles for one BSP are refused by the others. */
  compatible: string;
  /** EFI removable-media boot file name, when the board boots UEFI. */
  efiBootName?: string;
}

export const BSPS: readonly Bsp[] = [
  {
    name: 'x86_64',
    title: 'Intel/AMD x86-64 UEFI machines (Secure Boot, TPM2, UKI direct boot)',
    machine: 'lamadist-x86-64',
    arch: 'x86-64',
    layout: 'x86-64',
    raucFamily: 'efi',
    boot: 'uki',
    console: 'console=ttyS0,115200',
    compatible: 'lamadist-x86-64',
    efiBootName: 'BOOTX64.EFI',
  },
  {
    name: 'orin-nx',
    title: 'NVIDIA Jetson Orin NX (UEFI, meta-tegra)',
    machine: 'lamadist-orin-nx',
    arch: 'arm64',
    layout: 'aarch64',
    raucFamily: 'efi',
    boot: 'uki',
    console: 'console=ttyTCU0,115200',
    compatible: 'lamadist-orin-nx',
    efiBootName: 'BOOTAA64.EFI',
  },
  {
    name: 'rk1',
    title: 'Turing RK1, Rockchip RK3588 (U-Boot)',
    machine: 'lamadist-rk1',
    arch: 'arm64',
    layout: 'rockchip',
    raucFamily: 'uboot',
    boot: 'u-boot',
    console: 'console=ttyS9,115200',
    compatible: 'lamadist-rk1',
  },
  {
    name: 'soquartz',
    title: 'Pine64 SOQuartz, Rockchip RK3566 (U-Boot)',
    machine: 'lamadist-soquartz',
    arch: 'arm64',
    layout: 'rockchip',
    raucFamily: 'uboot',
    boot: 'u-boot',
    console: 'console=ttyS2,1500000',
    compatible: 'lamadist-soquartz',
  },
];

export const DEFAULT_BSP = 'x86_64';

/** Look up a BSP by name, with a UserError listing the valid names. */
export function getBsp(name: string): Bsp {
  const found = BSPS.find((b) => b.name === name);
  if (found) return found;
  throw new UserError('LAMA_E_UNKNOWN_BSP', `unknown BSP '${name}' (known: ${BSPS.map((b) => b.name).join(', ')})`);
}
