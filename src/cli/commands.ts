import type { Command } from 'commander';

/** What every module in src/cli/commands/ exports: wiring of its verb into the parser. */
export interface CommandModule {
  configure(cmd: Command): void;
}

/**
 * The command table. Only the chosen verb's module is imported (lazy loading keeps `lamadist
 * version` fast and lets a broken optional dependency affect only its own command).
 * One row per verb; the module is src/cli/commands/<file>.ts.
 */
export const COMMANDS: Record<string, { summary: string; load: () => Promise<CommandModule> }> = {
  bsp: { summary: 'list the supported board support packages', load: () => import('./commands/bsp.js') },
  bundle: { summary: 'create, encrypt, inspect and verify RAUC update bundles', load: () => import('./commands/bundle.js') },
  server: { summary: 'run the update server (hawkBit DDI, management API, dashboard)', load: () => import('./commands/server.js') },
  fleet: { summary: 'manage devices, releases and rollouts on an update server', load: () => import('./commands/fleet.js') },
  gpt: { summary: 'show and repair GUID partition tables with DPS roles', load: () => import('./commands/gpt.js') },
  image: { summary: 'build and inspect the split A/B disk image', load: () => import('./commands/image.js') },
  luks: { summary: 'create and dump LUKS2 containers (userspace, aes-xts-plain64)', load: () => import('./commands/luks.js') },
  verity: { summary: 'write and verify dm-verity hash trees (veritysetup format)', load: () => import('./commands/verity.js') },
  version: { summary: 'print the build version from git (GitVersion style)', load: () => import('./commands/version.js') },
  keys: { summary: 'create and inspect the fleet key directory (Secure Boot, RAUC, devices, RPM, recovery)', load: () => import('./commands/keys.js') },
  uki: { summary: 'build, inspect and measure Unified Kernel Images', load: () => import('./commands/uki.js') },
  sign: { summary: 'Authenticode-sign EFI images with the Secure Boot db key', load: () => import('./commands/sign.js') },
  verify: { summary: 'verify EFI image signatures against a certificate', load: () => import('./commands/verify.js') },
  host: { summary: 'manage the host inventory (identity and network on the kernel command line)', load: () => import('./commands/host.js') },
  'recovery-key': { summary: "print a host's LUKS recovery passphrase from its escrow (needs the fleet recovery key)", load: () => import('./commands/recovery-key.js') },
  release: { summary: 'make the release bundle that serves every host of the fleet', load: () => import('./commands/release.js') },
  provision: { summary: 'provision hosts from a release: device key, registration, update client, signed UKIs, sealed disk', load: () => import('./commands/provision.js') },
  build: { summary: 'build LamaDist images with kas in the build container', load: () => import('./commands/build.js') },
  shell: { summary: 'open a kas shell for a BSP in the build container', load: () => import('./commands/shell.js') },
  container: { summary: 'build, enter or remove the kas build container', load: () => import('./commands/container.js') },
  dump: { summary: 'print the composed kas configuration (computed offline)', load: () => import('./commands/dump.js') },
  clean: { summary: 'remove build output, the sstate cache or the build container', load: () => import('./commands/clean.js') },
  doctor: { summary: 'check host prerequisites for building, each with its fix', load: () => import('./commands/doctor.js') },
  check: { summary: 'check the distribution definition (kas, layers, machines, wks, RAUC) with file:line:col', load: () => import('./commands/check.js') },
  vm: { summary: 'run LamaDist images in QEMU (UEFI, Secure Boot, TPM2) and the end-to-end demo', load: () => import('./commands/vm.js') },
};
