import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { RELEASE_SQUASHFS_BLOCK, openRelease, releaseUki, type OpenRelease } from '../release/index.js';
import { inspectUki } from '../uki/index.js';
import { oneHostFleet, watchDevice, type DeviceWatch, type FixtureRelease, type FleetMachine, type OneHostFleet } from '../vm/index.js';
import { casyncFetch, changedBlocks } from './casync.js';

/**
 * Bytes an over-the-air update moves, on the emulated device installed the operator's way (fleet
 * keys, update server, installer stick), streaming each release from the server after version 1:
 * (a) only the version changes; (b) a 1 MiB file changes too; (c) the initramfs is rebuilt, which
 * also moves the kernel inside the UKI, so the device holds none of either at their new offsets.
 * Per update it prints what the device fetched (the server's artifact byte counter), the floor (the
 * 4 KiB blocks that differ between the running slot and the new one: root image, dm-verity tree,
 * the host's UKI), the bundle a full download moves, RAUC's casync mode on the same images (the
 * real casync over HTTP, the running slot as seed: `casyncFetch`), and the install time, from the
 * device taking the deployment to the slot written. QEMU runs under TCG, so times are far above
 * real hardware. LAMADIST_BENCH_SCALE does not apply. For (c) it also prints what the new kernel and
 * initramfs take in the bundle, the reference of that update.
 */

const HOST = { name: 'bench-ota', smbiosUuid: '4c414d41-4245-4e43-8000-000000000001' };
const TIMEOUT_MS = 3_600_000;

interface Case {
  name: string;
  version: string;
  payload: string;
  initramfsBuild?: string;
}

const CASES: Case[] = [
  { name: '(a) version only', version: '1.1', payload: 'one' },
  { name: '(b) + one 1 MiB file', version: '1.2', payload: 'two' },
  { name: '(c) + kernel and initramfs', version: '1.3', payload: 'two', initramfsBuild: 'c' },
];

/** The images of one slot as a release puts them there. */
interface SlotImages {
  rootfs: string;
  verity: string;
  uki: string;
}

async function slotImages(r: OpenRelease, machineId: string, slot: 'a' | 'b', dir: string): Promise<SlotImages> {
  const uki = path.join(dir, `uki-${r.version}-${slot}.efi`);
  await fs.writeFile(uki, await releaseUki(r, machineId, slot));
  return { rootfs: r.rootfs, verity: r.verity, uki };
}

const mib = (n: number): string => `${(n / 2 ** 20).toFixed(2)} MiB`;

/** Bytes the UKI's kernel and initramfs take in the bundle, which stores them verbatim (`alignImages`). */
function kernelInitrdAsTheyTravel(uki: Buffer): number {
  return inspectUki(uki)
    .sections.filter((x) => x.name === '.linux' || x.name === '.initrd')
    .reduce((sum, s) => sum + s.virtualSize, 0);
}

export async function run(): Promise<void> {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'lamadist-bench-ota-'));
  const opened: OpenRelease[] = [];
  let watch: DeviceWatch | undefined;
  const { fleet, steps } = oneHostFleet({ dir, host: HOST, tag: 'bench', payload: 'one', timeoutMs: TIMEOUT_MS, log: () => undefined });
  try {
    for (const step of steps) await step();
    const server = fleet.server as NonNullable<OneHostFleet['server']>;
    const machineId = fleet.machineId as string;
    watch = watchDevice(fleet.machine as FleetMachine, { timeoutMs: TIMEOUT_MS, serialLog: path.join(dir, 'console.log') });
    let at = await watch.waitFor(/lamadist-ddi: reported version 1 slot A/);
    let running = await openRelease((fleet.release1 as FixtureRelease).bundle, { keys: fleet.keys });
    opened.push(running);
    let slot: 'a' | 'b' = 'a';
    process.stdout.write(`ota: ${'update'.padEnd(28)} ${'fetched'.padStart(11)} ${'floor'.padStart(11)} ${'ratio'.padStart(6)} ${'full'.padStart(11)} ${'casync'.padStart(11)} ${'install'.padStart(8)}\n`);
    for (const c of CASES) {
      const next: 'a' | 'b' = slot === 'a' ? 'b' : 'a';
      const created = await fleet.release(c);
      const target = await openRelease(created.bundle, { keys: fleet.keys });
      opened.push(target);
      const from = await slotImages(running, machineId, slot, dir);
      const to = await slotImages(target, machineId, next, dir);
      if (c.initramfsBuild !== undefined) {
        const linux = async (f: string): Promise<number> => inspectUki(await fs.readFile(f)).sections.find((x) => x.name === '.linux')?.fileOffset ?? 0;
        const moved = (await linux(to.uki)) - (await linux(from.uki));
        if (moved % RELEASE_SQUASHFS_BLOCK === 0) throw new Error(`(c) left the kernel where it was (moved ${moved} bytes): the device holds its blocks`);
      }
      const uploaded = await server.fleet.uploadRelease(created.bundle);
      const before = server.server.service.counters.artifactBytes;
      await server.fleet.createRollout({ releaseId: uploaded.release.id, name: c.name, filter: { tags: ['bench'] }, start: true });
      const esc = c.version.replaceAll('.', '\\.');
      at = await watch.waitFor(new RegExp(`lamadist-ddi: deployment \\d+: version ${esc}`), at);
      const taken = Date.now();
      at = await watch.waitFor(new RegExp(`lamadist-ddi: installed version ${esc}; rebooting`), at);
      const seconds = (Date.now() - taken) / 1000;
      const fetched = server.server.service.counters.artifactBytes - before;
      at = await watch.waitFor(new RegExp(`lamadist-ddi: reported version ${esc} slot ${next.toUpperCase()}`), at);

      let floor = 0;
      let peer = 0;
      for (const k of ['rootfs', 'verity', 'uki'] as const) {
        floor += (await changedBlocks(from[k], to[k])).bytes;
        peer += (await casyncFetch({ seed: from[k], image: to[k], workDir: dir })).fetchedBytes;
      }
      process.stdout.write(
        `ota: ${c.name.padEnd(28)} ${mib(fetched).padStart(11)} ${mib(floor).padStart(11)} ${(fetched / floor).toFixed(2).padStart(5)}x ${mib(created.size).padStart(11)} ${mib(peer).padStart(11)} ${`${seconds.toFixed(0)} s`.padStart(8)}\n`,
      );
      running = target;
      slot = next;
      if (c.initramfsBuild !== undefined) {
        const travel = kernelInitrdAsTheyTravel(await fs.readFile(to.uki));
        process.stdout.write(`ota: ${c.name}: the new kernel and initramfs take ${mib(travel)} in the bundle; fetched ${(fetched / travel).toFixed(2)}x that\n`);
      }
    }
  } finally {
    await watch?.stop();
    await fleet.server?.server.close();
    for (const r of opened) await r.close();
    await fs.rm(dir, { recursive: true, force: true });
  }
}
