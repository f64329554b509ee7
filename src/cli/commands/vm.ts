import type { Command } from 'commander';
import path from 'node:path';
import { UserError } from '../../errors.js';
import { OVMF, bootDevice, cacheRoot, prepareDevice, runQemu, type Device, type HostForward, type QemuOptions, type QemuResult } from '../../vm/index.js';
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
    { matched: r.matched, exitCode: r.exitCode, timedOut: r.timedOut, durationMs: r.durationMs, serialLog: opts.serial ?? null },
    '',
  );
  if (r.timedOut) throw new UserError('LAMA_E_VM_TIMEOUT', `the VM did not ${opts.until ? `print /${opts.until}/` : 'power off'} within ${opts.timeout} s`);
  return r;
}

/** What each demo boot showed, from the device's own report on its console. */
export interface DemoBoot {
  seconds: number;
  report: Record<string, string>;
}

function checkBoot(name: string, r: Awaited<ReturnType<typeof bootDevice>>, log: string): DemoBoot {
  const report = r.report;
  if (!r.matched || !report) {
    throw new UserError('LAMA_E_DEMO', `${name} did not come up${r.timedOut ? ' before the timeout' : ''}; see the serial log ${log}`);
  }
  if (!/^\/dev\/mapper\/root erofs\s+ro/.test(report.root ?? '') || report.root_dm !== 'verity') {
    throw new UserError('LAMA_E_DEMO', `${name}: / is '${report.root ?? ''}', not the read-only dm-verity EROFS root; see ${log}`);
  }
  return { seconds: r.durationMs / 1000, report };
}

/**
 * `lamadist vm demo`: the device without a build host. Builds the fixture rootfs, fleet keys,
 * signed per-host UKIs and the encrypted A/B disk, then boots it twice under Secure Boot with a
 * TPM2: the first boot enrolls the TPM2 and wipes the provisioning key, the second unlocks with
 * the TPM2 alone and keeps what the first wrote to /etc and /var. Work files go to `dir`.
 */
export async function vmDemo(ctx: Context, opts: { dir?: string; timeout?: number }): Promise<{ device: Device; boots: DemoBoot[] }> {
  const dir = path.resolve(opts.dir ?? path.join(cacheRoot(), 'demo'));
  const timeoutMs = (opts.timeout ?? 1200) * 1000;
  const state: { device?: Device; boots: DemoBoot[] } = { boots: [] };
  const boot = async (name: string): Promise<void> => {
    const log = path.join(dir, `boot${state.boots.length + 1}.log`);
    const r = await bootDevice(state.device as Device, { timeoutMs, serialLog: log, onLine: (l) => ctx.detail(l) });
    state.boots.push(checkBoot(name, r, log));
  };
  await ctx.steps<typeof state>(
    [
      {
        title: 'build the fixture rootfs, fleet keys, signed UKIs and the encrypted A/B disk',
        run: async (s) => {
          s.device = await prepareDevice({ dir, hostname: 'lamadist-demo', log: (m) => ctx.detail(m) });
        },
      },
      { title: 'first boot: Secure Boot, provisioning key, TPM2 enrollment, verity root', run: () => boot('first boot') },
      { title: 'second boot: TPM2-only unlock, /etc and /var kept', run: () => boot('second boot') },
    ],
    state,
  );
  const device = state.device as Device;
  const [first, second] = state.boots as [DemoBoot, DemoBoot];
  if (!second.report.persist || second.report.persist !== second.report.var_marker) {
    throw new UserError('LAMA_E_DEMO', `second boot did not find the first boot's /etc and /var writes; see ${path.join(dir, 'boot2.log')}`);
  }
  ctx.result(
    { dir, disk: device.disk, recoveryKey: device.recoveryKey, boots: state.boots },
    () =>
      [
        `device ${first.report.hostname} (machine-id ${first.report.machine_id}) on slot ${first.report.slot}`,
        `  root  ${first.report.root} (${first.report.root_dm})`,
        `  /var  ${first.report.var} (${first.report.var_luks}), /etc ${first.report.etc?.split(' ')[0] ?? ''}`,
        `  first boot ${first.seconds.toFixed(0)} s (TPM2 enrolled), second boot ${second.seconds.toFixed(0)} s (TPM2 unlock)`,
        `  disk ${device.disk}, recovery key ${device.recoveryKey}`,
      ].join('\n'),
  );
  return { device, boots: state.boots };
}

function collect(value: string, previous: string[] = []): string[] {
  return [...previous, value];
}

export function configure(cmd: Command): void {
  cmd
    .command('demo')
    .description('build the test fixture device and boot it under Secure Boot with a TPM2 (no build host needed)')
    .option('--dir <dir>', 'work directory (default ~/.cache/lamadist/demo)')
    .option('--timeout <s>', 'limit per boot in seconds (default 1200)', intOption('--timeout'))
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
