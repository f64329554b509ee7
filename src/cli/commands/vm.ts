import type { Command } from 'commander';
import path from 'node:path';
import { UserError } from '../../errors.js';
import { promises as fs } from 'node:fs';
import {
  OVMF,
  cacheRoot,
  matchAfter,
  oneHostFleet,
  otaMilestones,
  parseReport,
  parseSlots,
  runQemu,
  watchDevice,
  type DeviceWatch,
  type FleetMachine,
  type HostForward,
  type OneHostFleet,
  type QemuOptions,
  type QemuResult,
  type SlotsReport,
} from '../../vm/index.js';
import { act, intOption } from '../action.js';
import type { Context } from '../context.js';

/** Options of `lamadist vm run`. */
export interface VmRunOptions {
  secureBoot?: boolean;
  /** Variable store template (e.g. from `lamadist keys`/makeOvmfVars with our keys enrolled). */
  vars?: string;
  /** Keep variable writes in `vars` (BootOrder/BootNext across runs). */
  persistVars?: boolean;
  /** TPM2 state directory, or true for `<image>.tpm` next to the image. */
  tpm?: boolean | string;
  mem?: number;
  cpus?: number;
  serial?: string;
  forward?: string[];
  kernel?: string;
  initrd?: string;
  append?: string;
  timeout?: number;
  until?: string;
  noReboot?: boolean;
}

/** Parse `HOST:GUEST` port pairs. */
export function parseForward(spec: string): HostForward {
  const m = /^(\d{1,5}):(\d{1,5})$/.exec(spec);
  const host = Number(m?.[1]);
  const guest = Number(m?.[2]);
  if (!m || host < 1 || host > 65535 || guest < 1 || guest > 65535) {
    throw new UserError('LAMA_E_VM_FORWARD', `--forward wants HOST:GUEST TCP ports (1-65535), got '${spec}'`);
  }
  return { host, guest };
}

/** The runQemu options `lamadist vm run` uses for an image (pure). */
export function planVmRun(image: string | undefined, opts: VmRunOptions): Omit<QemuOptions, 'echo' | 'input' | 'onLine'> {
  if (!image && !opts.kernel) throw new UserError('LAMA_E_VM_INPUT', 'give a disk IMAGE, or --kernel for a direct kernel boot');
  const q: Omit<QemuOptions, 'echo' | 'input' | 'onLine'> = {
    disks: image ? [{ path: image }] : [],
    memMiB: opts.mem ?? 1024,
    timeoutMs: (opts.timeout ?? 0) * 1000,
    hostForward: (opts.forward ?? []).map(parseForward),
  };
  if (opts.cpus) q.cpus = opts.cpus;
  if (opts.kernel) q.kernel = opts.kernel;
  if (opts.initrd) q.initrd = opts.initrd;
  if (opts.append !== undefined) q.append = opts.append;
  if (opts.serial) q.serialLog = opts.serial;
  if (opts.noReboot) q.noReboot = true;
  if (opts.until) {
    try {
      q.until = new RegExp(opts.until);
    } catch {
      throw new UserError('LAMA_E_VM_INPUT', `--until is not a valid regular expression: ${opts.until}`);
    }
  }
  if (!opts.kernel || opts.secureBoot || opts.vars) {
    q.firmware = {
      code: opts.secureBoot ? OVMF.secbootCode : OVMF.code,
      vars: opts.vars ?? OVMF.vars,
      persistVars: Boolean(opts.persistVars),
    };
    q.secureBoot = Boolean(opts.secureBoot);
  }
  if (opts.persistVars && !opts.vars) throw new UserError('LAMA_E_VM_INPUT', '--persist-vars needs --vars FILE (the Debian template is never written)');
  if (opts.tpm) {
    const base = image ?? opts.kernel ?? 'vm';
    q.tpm = { stateDir: typeof opts.tpm === 'string' ? opts.tpm : `${path.resolve(base)}.tpm` };
  }
  return q;
}

/**
 * `lamadist vm run`: boot an image (or a kernel) in QEMU, the serial console on the terminal (on
 * stderr with --json) and in --serial FILE; keyboard input goes to the serial console. Ends when
 * the guest powers off, --until matches, --timeout passes or on Ctrl-C; swtpm and temp files go too.
 */
export async function vmRun(ctx: Context, image: string | undefined, opts: VmRunOptions): Promise<QemuResult> {
  const plan = planVmRun(image, opts);
  ctx.detail(`starting QEMU${plan.firmware ? ` with ${plan.firmware.code}` : ''}${plan.tpm ? `, TPM2 state ${plan.tpm.stateDir}` : ''}`);
  const interactive = Boolean(process.stdin.isTTY) && !ctx.json;
  const r = await runQemu({ ...plan, echo: ctx.json ? ctx.stderr : ctx.stdout, ...(interactive ? { input: process.stdin } : {}) });
  if (interactive) process.stdin.pause();
  ctx.result(
    { matched: r.matched, exitCode: r.exitCode, timedOut: r.timedOut, stalled: r.stalled, resets: r.resets, durationMs: r.durationMs, serialLog: opts.serial ?? null },
    '',
  );
  if (r.timedOut) throw new UserError('LAMA_E_VM_TIMEOUT', `the VM did not ${opts.until ? `print /${opts.until}/` : 'power off'} within ${opts.timeout} s`);
  return r;
}

/** What `lamadist vm demo` ends with. */
export interface DemoResult {
  dir: string;
  host: string;
  disk: string;
  installer: string;
  /** `lamadist recovery-key` reads the host's recovery key from here with the demo's keys. */
  recoveryEscrow: string;
  server: string;
  /** Console facts of the first boot (slot A) and the slot state after the update (slot B). */
  firstBoot: Record<string, string>;
  afterUpdate: SlotsReport;
  action: string;
  bundleBytes: number;
  fetchedBytes: number;
  seconds: number;
}

/** The demo host: a new machine known to the inventory by its SMBIOS system UUID. */
const DEMO_HOST = { name: 'lamadist-demo', smbiosUuid: '4c414d41-4445-4d4f-8000-000000000001' };

/** The demo's steps in order: the operator's path, then the device's console milestones of the update. Pure. */
export function demoSteps(): { title: string; marker?: RegExp; since?: number }[] {
  return [
    { title: `keys init, host add ${DEMO_HOST.name} (by SMBIOS UUID), the update server` },
    { title: 'release 1, then provision --installer: the host registered and tagged, its installer stick' },
    { title: 'the new machine (blank drive, firmware in setup mode) boots the stick: drive sealed with keys made on it, Secure Boot enrolled' },
    { title: 'release 2 rolled out to the tag' },
    ...otaMilestones('1', '2', 'A'),
  ];
}

interface DemoState {
  watch?: DeviceWatch;
  at: number;
  /** Where each console milestone ended, in order (OtaMilestone `since` indexes these). */
  marks: number[];
  bundleBytes: number;
  releaseId: number;
}

/**
 * `lamadist vm demo`: the operator's path on emulated hardware, without a build host. Fleet keys,
 * a one-host inventory, the update server (in this process), release 1 of the test fixture,
 * `provision --installer`; a new machine boots the stick and is installed; release 2 is rolled out
 * to the host's tag, and the demo follows the device on its console: first boot on slot A with TPM2
 * enrollment, install of version 2 into slot B, reboot into B, health check, the server's verdict.
 */
export async function vmDemo(ctx: Context, opts: { dir?: string; timeout?: number }): Promise<DemoResult> {
  const dir = path.resolve(opts.dir ?? path.join(cacheRoot(), 'demo'));
  const timeoutMs = (opts.timeout ?? 1800) * 1000;
  const log = path.join(dir, 'console.log');
  const detail = (m: string): void => ctx.detail(m);
  // Every run starts from nothing but the caches: a demo is the path from zero.
  await fs.rm(dir, { recursive: true, force: true });
  await fs.mkdir(dir, { recursive: true });
  const state: DemoState = { at: 0, marks: [], bundleBytes: 0, releaseId: 0 };
  const started = Date.now();
  const { fleet, steps: setup } = oneHostFleet({ dir, host: DEMO_HOST, tag: 'demo', timeoutMs, log: detail });
  const run: ((s: DemoState) => Promise<void>)[] = [
    ...setup,
    async (s) => {
      const srv = fleet.server as NonNullable<OneHostFleet['server']>;
      const v2 = await fleet.release({ version: '2' });
      const up = await srv.fleet.uploadRelease(v2.bundle);
      await srv.fleet.createRollout({ releaseId: up.release.id, name: 'demo 2', filter: { tags: ['demo'] }, start: true });
      s.bundleBytes = v2.size;
      s.releaseId = up.release.id;
      s.watch = watchDevice(fleet.machine as FleetMachine, { timeoutMs, serialLog: log, onLine: detail });
    },
  ];
  const steps = demoSteps();
  try {
    await ctx.steps<DemoState>(
      steps.map((st, i) => ({
        title: st.title,
        run: async (s: DemoState) => {
          const step = run[i];
          if (step) await step(s);
          else if (st.marker) {
            const end = await (s.watch as DeviceWatch).waitFor(st.marker, st.since === undefined ? s.at : s.marks[st.since]);
            s.marks.push(end);
            s.at = Math.max(s.at, end);
          }
        },
      })),
      state,
    );
    const srv = fleet.server as NonNullable<OneHostFleet['server']>;
    const serial = (state.watch as DeviceWatch).serial();
    const afterUpdate = parseSlots(serial.slice(matchAfter(serial, /installed version 2; rebooting/)));
    const action = (await srv.fleet.getDevice(DEMO_HOST.name)).actions.find((a) => a.releaseId === state.releaseId)?.state ?? 'none';
    if (!afterUpdate || afterUpdate.booted !== 'B' || action !== 'success') {
      throw new UserError('LAMA_E_DEMO', `the device did not come back on slot B with the update accepted (action ${action}); see ${log}`);
    }
    const result: DemoResult = {
      dir,
      host: DEMO_HOST.name,
      disk: (fleet.machine as FleetMachine).disk,
      installer: fleet.stick,
      recoveryEscrow: `${fleet.stick}:installer_data/escrow/${DEMO_HOST.name}.cms`,
      server: srv.server.url,
      firstBoot: parseReport(serial.slice(0, matchAfter(serial, /LAMADIST-REPORT-END/))) ?? {},
      afterUpdate,
      action,
      bundleBytes: state.bundleBytes,
      fetchedBytes: srv.server.service.counters.artifactBytes,
      seconds: (Date.now() - started) / 1000,
    };
    const r = result.firstBoot;
    ctx.result(result, () =>
      [
        `device ${r.hostname ?? ''} (machine-id ${r.machine_id ?? ''}), installed from ${result.installer}`,
        `  first boot: slot A, version ${r.version ?? ''}, root ${r.root ?? ''} (${r.root_dm ?? ''}), /var ${r.var ?? ''} (${r.var_luks ?? ''})`,
        `  update: version ${afterUpdate.version} on slot ${afterUpdate.booted} (${afterUpdate.state.B?.boot ?? ''}), health check ${afterUpdate.health}, server action ${action}`,
        `  bundle ${result.bundleBytes} bytes, fetched ${result.fetchedBytes} bytes; ${result.seconds.toFixed(0)} s in all`,
        `  disk ${result.disk}, console ${log}`,
        `  recovery key: lamadist recovery-key ${DEMO_HOST.name} --keys ${fleet.keys} --escrow ${fleet.stick}`,
      ].join('\n'),
    );
    return result;
  } finally {
    await state.watch?.stop();
    await fleet.server?.server.close();
  }
}

function collect(value: string, previous: string[] = []): string[] {
  return [...previous, value];
}

export function configure(cmd: Command): void {
  cmd
    .command('demo')
    .description('the operator\'s path on emulated hardware: keys, a host, the update server, provision --installer, install a new machine from the stick, roll out version 2 to its tag')
    .option('--dir <dir>', 'work directory (default ~/.cache/lamadist/demo)')
    .option('--timeout <s>', 'limit for the device run in seconds (default 1800)', intOption('--timeout'))
    .action(
      act<{ dir?: string; timeout?: number }>(async (ctx, _args, opts) => {
        await vmDemo(ctx, opts);
      }),
    );
  cmd
    .command('run')
    .description('boot a disk image (UEFI, optionally Secure Boot and TPM2) or a kernel in QEMU')
    .argument('[image]', 'raw disk image (virtio)')
    .option('--secure-boot', 'Secure Boot firmware (OVMF secboot, SMM)')
    .option('--vars <file>', 'UEFI variable store template (copied per VM unless --persist-vars)')
    .option('--persist-vars', 'write variable changes back to --vars')
    .option('--tpm [stateDir]', 'swtpm TPM2 (state kept in stateDir, default IMAGE.tpm)')
    .option('--mem <MiB>', 'guest memory', intOption('--mem'))
    .option('--cpus <n>', 'virtual CPUs', intOption('--cpus'))
    .option('--serial <file>', 'append the serial console to this log file')
    .option('--forward <host:guest>', 'forward a host TCP port to the guest (repeatable)', collect)
    .option('--kernel <file>', 'direct kernel boot')
    .option('--initrd <file>', 'initramfs for --kernel')
    .option('--append <cmdline>', 'kernel command line for --kernel')
    .option('--timeout <s>', 'stop the VM after this many seconds (exit 2)', intOption('--timeout'))
    .option('--until <regex>', 'stop the VM when the serial console matches')
    .option('--no-reboot', 'exit instead of rebooting the guest')
    .action(
      act<VmRunOptions & { reboot?: boolean }>(async (ctx, args, opts) => {
        await vmRun(ctx, args[0], { ...opts, noReboot: opts.reboot === false });
      }),
    );
}
