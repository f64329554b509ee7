import path from 'node:path';
import type { Command } from 'commander';
import { UserError } from '../../errors.js';
import { FleetClient } from '../../fleet/index.js';
import { parseWaves, type TargetFilter } from '../../server/index.js';
import { readUserFile, writeFileAtomic } from '../../util/fsx.js';
import { act, collect, intOption } from '../action.js';
import type { Context } from '../context.js';
import { defaultStore } from './server.js';

export interface FleetCliOptions {
  server?: string;
  tokenFile?: string;
  tenant?: string;
  ca?: string;
}

/**
 * The client for the fleet commands: server URL from --server / LAMADIST_SERVER, admin token from
 * --token-file, LAMADIST_ADMIN_TOKEN or the default store's admin.token.
 */
export async function fleetClient(o: FleetCliOptions): Promise<FleetClient> {
  const url = o.server ?? process.env.LAMADIST_SERVER ?? 'http://127.0.0.1:8080';
  let token = o.tokenFile ? undefined : process.env.LAMADIST_ADMIN_TOKEN;
  if (!token) {
    const file = o.tokenFile ?? path.join(defaultStore(), 'admin.token');
    token = (await readUserFile(file, 'admin token file')).toString('utf8').trim();
  }
  if (!token) throw new UserError('LAMA_E_FLEET_TOKEN', 'the admin token is empty');
  const ca = o.ca ? await readUserFile(o.ca, 'CA certificate') : undefined;
  return new FleetClient({ url, token, ...(o.tenant ? { tenant: o.tenant } : {}), ...(ca ? { ca } : {}) });
}

function parseAttrs(list: string[] | undefined): Record<string, string> | undefined {
  if (!list?.length) return undefined;
  const out: Record<string, string> = {};
  for (const kv of list) {
    const i = kv.indexOf('=');
    if (i <= 0) throw new UserError('LAMA_E_FLEET_ATTR', `attribute '${kv}' must be KEY=VALUE`);
    out[kv.slice(0, i)] = kv.slice(i + 1);
  }
  return out;
}

async function emitToken(ctx: Context, token: string, out: string | undefined, force: boolean, data: object): Promise<void> {
  if (out) {
    await writeFileAtomic(out, token + '\n', { mode: 0o600, force });
    ctx.result({ ...data, tokenFile: path.resolve(out) }, `token written to ${out} (mode 0600)`);
  } else {
    ctx.result({ ...data, token }, token);
  }
}

/** `lamadist fleet devices`: table of devices. */
export async function fleetDevices(ctx: Context, c: FleetClient): Promise<void> {
  const devices = await c.listDevices();
  ctx.result(devices, () =>
    devices.length === 0
      ? 'no devices'
      : devices
          .map((d) => `${d.controllerId.padEnd(24)} ${(d.bsp ?? '-').padEnd(9)} ${(d.version ?? 'unknown').padEnd(14)} ${d.status.padEnd(10)} ${d.tags.join(',')}`)
          .join('\n'),
  );
}

function rolloutLine(r: { id: number; name: string; releaseVersion: string; status: string; currentWave: number; heldBack: string[]; progress: { size: number; states: Record<string, number> }[] }): string {
  const waves = r.progress.map((w) => `${w.states.success ?? 0}/${w.size}`).join(' ');
  const held = r.heldBack.length ? `; held back (not attested): ${r.heldBack.join(', ')}` : '';
  return `#${r.id} ${r.name} → ${r.releaseVersion}: ${r.status}, wave ${r.currentWave + 1}/${r.progress.length} [${waves}]${held}`;
}

export function configure(cmd: Command): void {
  cmd
    .description('manage devices, releases and rollouts on an update server')
    .option('--server <url>', 'update server URL (env LAMADIST_SERVER, default http://127.0.0.1:8080)')
    .option('--token-file <file>', 'admin token file (env LAMADIST_ADMIN_TOKEN, default the local store admin.token)')
    .option('--tenant <name>', 'tenant (default: the server default, DEFAULT)')
    .option('--ca <pem>', 'CA certificate of an https server');
  const client = (c: Command): Promise<FleetClient> => fleetClient(c.optsWithGlobals<FleetCliOptions>());

  cmd.command('devices').description('list devices with version and status').action(act(async (ctx, _a, _o, c) => fleetDevices(ctx, await client(c))));

  const device = cmd.command('device').description('register and inspect devices');
  device
    .command('add <controllerId>')
    .description('pre-register a device and print (or write) its TargetToken')
    .option('--name <name>', 'display name')
    .option('--bsp <bsp>', 'BSP name (restricts rollouts to bundles of its compatible)')
    .option('--tag <tag>', 'tag (repeatable)', collect)
    .option('--attr <key=value>', 'attribute (repeatable)', collect)
    .option('--token-out <file>', 'write the token to this file (0600) instead of stdout')
    .option('--force', 'replace an existing --token-out file')
    .action(
      act<{ name?: string; bsp?: string; tag?: string[]; attr?: string[]; tokenOut?: string; force?: boolean }>(async (ctx, [id], o, c) => {
        const attributes = parseAttrs(o.attr);
        const r = await (await client(c)).registerDevice({
          controllerId: id as string,
          ...(o.name ? { name: o.name } : {}),
          ...(o.bsp ? { bsp: o.bsp } : {}),
          ...(o.tag ? { tags: o.tag } : {}),
          ...(attributes ? { attributes } : {}),
        });
        await emitToken(ctx, r.token, o.tokenOut, Boolean(o.force), { device: r.device });
      }),
    );
  device
    .command('show <controllerId>')
    .description('device detail with action history')
    .action(
      act(async (ctx, [id], _o, c) => {
        const d = await (await client(c)).getDevice(id as string);
        ctx.result(d, () =>
          [
            `${d.controllerId} (${d.name}) ${d.bsp ?? ''} version ${d.version ?? 'unknown'}, ${d.status}, last seen ${d.lastSeen ?? 'never'}`,
            `  attestation: ${d.attestation.state}${d.attestation.checkedAt ? ` (checked ${d.attestation.checkedAt})` : ''}${d.attestation.reason ? `: ${d.attestation.reason}` : ''}`,
            ...(d.attestation.requestedAt ? [`  fresh quote requested ${d.attestation.requestedAt}, not judged yet`] : []),
            ...(d.attestation.ek
              ? [`  EK certificate: ${d.attestation.ek.issuer}, serial ${d.attestation.ek.serial}, ${d.attestation.ek.bound ? 'key bound to it by credential activation' : 'not checked (trust on first use)'}`]
              : []),
            ...d.actions.map((a) => `  action #${a.id} ${a.releaseVersion} ${a.state}${a.rolloutId ? ` (rollout #${a.rolloutId})` : ''}`),
          ].join('\n'),
        );
      }),
    );
  device
    .command('attest <controllerId>')
    .description('ask the device for a fresh TPM quote (its lamadist-attest-ask timer checks every minute)')
    .action(
      act(async (ctx, [id], _o, c) => {
        const r = await (await client(c)).requestAttestation(id as string);
        ctx.result(r, `asked ${r.controllerId} for a fresh quote at ${r.requestedAt}; its verdict shows in \`fleet device show ${r.controllerId}\` once judged`);
      }),
    );
  device
    .command('tag <controllerId>')
    .description('add or remove tags')
    .option('--add <tag>', 'tag to add (repeatable)', collect)
    .option('--remove <tag>', 'tag to remove (repeatable)', collect)
    .action(
      act<{ add?: string[]; remove?: string[] }>(async (ctx, [id], o, c) => {
        const d = await (await client(c)).updateDevice(id as string, { addTags: o.add ?? [], removeTags: o.remove ?? [] });
        ctx.result(d, `${d.controllerId}: ${d.tags.join(', ') || 'no tags'}`);
      }),
    );
  device
    .command('token <controllerId>')
    .description('replace the device TargetToken')
    .option('--token-out <file>', 'write the token to this file (0600)')
    .option('--force', 'replace an existing --token-out file')
    .action(
      act<{ tokenOut?: string; force?: boolean }>(async (ctx, [id], o, c) => {
        await emitToken(ctx, await (await client(c)).rotateDeviceToken(id as string), o.tokenOut, Boolean(o.force), { controllerId: id });
      }),
    );

  cmd
    .command('gateway-token')
    .description('create or replace the tenant GatewayToken (devices then register themselves)')
    .option('--token-out <file>', 'write the token to this file (0600)')
    .option('--force', 'replace an existing --token-out file')
    .action(
      act<{ tokenOut?: string; force?: boolean }>(async (ctx, _a, o, c) => {
        await emitToken(ctx, await (await client(c)).gatewayToken(), o.tokenOut, Boolean(o.force), {});
      }),
    );

  const release = cmd.command('release').description('upload and list releases');
  release
    .command('upload <bundle>')
    .description('upload a RAUC bundle; the server verifies its signature and compatible first')
    .option('--filename <name>', 'artifact name devices see (default COMPATIBLE-VERSION.raucb)')
    .action(
      act<{ filename?: string }>(async (ctx, [file], o, c) => {
        const r = await (await client(c)).uploadRelease(file as string, o.filename ? { filename: o.filename } : {});
        ctx.result(r, `${r.created ? 'accepted' : 'already stored'}: release ${r.release.id} ${r.release.compatible} ${r.release.version} (${r.release.sha256})`);
      }),
    );
  release
    .command('list')
    .description('list releases')
    .action(
      act(async (ctx, _a, _o, c) => {
        const list = await (await client(c)).listReleases();
        ctx.result(list, () => list.map((r) => `${String(r.id).padStart(4)} ${r.compatible.padEnd(20)} ${r.version.padEnd(14)} ${r.format.padEnd(7)} ${r.size}`).join('\n') || 'no releases');
      }),
    );

  const rollout = cmd.command('rollout').description('roll a release out in waves');
  rollout
    .command('create')
    .description('create and start a rollout')
    .requiredOption('--release <id|bundle>', 'release id, or a bundle file (uploaded first, or found if already stored)')
    .option('--name <name>', 'rollout name')
    .option('--tag <tag>', 'target devices with this tag (repeatable; all must match)', collect)
    .option('--attr <key=value>', 'target devices with this attribute (repeatable)', collect)
    .option('--bsp <bsp>', 'target devices of this BSP')
    .option('--device <controllerId>', 'target this device (repeatable)', collect)
    .option('--waves <list>', 'wave sizes, counts or percentages, e.g. 1,10%,50% (rest in a last wave)')
    .option('--success-threshold <pct>', 'percent of a wave that must succeed to start the next (default 100)', intOption('--success-threshold'))
    .option('--error-threshold <pct>', 'percent of a wave that may fail before the rollout pauses (default 0)', intOption('--error-threshold'))
    .option('--no-start', 'create without starting')
    .option('--require-attestation', 'offer the release only to devices attested when their wave starts; the others are held back, not failed')
    .action(
      act<{
        release: string;
        name?: string;
        tag?: string[];
        attr?: string[];
        bsp?: string;
        device?: string[];
        waves?: string;
        successThreshold?: number;
        errorThreshold?: number;
        start: boolean;
        requireAttestation?: boolean;
      }>(async (ctx, _a, o, c) => {
        const attributes = parseAttrs(o.attr);
        const filter: TargetFilter = {
          ...(o.tag ? { tags: o.tag } : {}),
          ...(attributes ? { attributes } : {}),
          ...(o.bsp ? { bsp: o.bsp } : {}),
          ...(o.device ? { devices: o.device } : {}),
        };
        const api = await client(c);
        const releaseId = /^\d+$/.test(o.release) ? Number(o.release) : (await api.uploadRelease(o.release)).release.id;
        const r = await api.createRollout({
          releaseId,
          filter,
          start: o.start,
          ...(o.requireAttestation ? { requireAttestation: true } : {}),
          ...(o.name ? { name: o.name } : {}),
          ...(o.waves ? { waves: parseWaves(o.waves) } : {}),
          ...(o.successThreshold !== undefined ? { successThreshold: o.successThreshold } : {}),
          ...(o.errorThreshold !== undefined ? { errorThreshold: o.errorThreshold } : {}),
        });
        ctx.result(r, rolloutLine(r));
      }),
    );
  rollout
    .command('list')
    .description('list rollouts with wave progress')
    .action(
      act(async (ctx, _a, _o, c) => {
        const list = await (await client(c)).listRollouts();
        ctx.result(list, () => list.map(rolloutLine).join('\n') || 'no rollouts');
      }),
    );
  rollout
    .command('show <id>')
    .description('one rollout with wave progress')
    .action(
      act(async (ctx, [id], _o, c) => {
        const r = await (await client(c)).getRollout(intOption('rollout id')(id as string));
        ctx.result(r, () =>
          [rolloutLine(r), ...r.progress.map((w) => `  wave ${w.wave + 1}: ${Object.entries(w.states).map(([s, n]) => `${s} ${n}`).join(', ')}`)].join('\n'),
        );
      }),
    );
  for (const op of ['start', 'pause', 'resume', 'cancel'] as const) {
    rollout
      .command(`${op} <id>`)
      .description(`${op} a rollout`)
      .action(
        act(async (ctx, [id], _o, c) => {
          const r = await (await client(c)).rolloutOp(intOption('rollout id')(id as string), op);
          ctx.result(r, rolloutLine(r));
        }),
      );
  }

  cmd
    .command('audit')
    .description('the audit log of management changes, newest first')
    .option('--limit <n>', 'entries (default 200)', intOption('--limit'))
    .action(
      act<{ limit?: number }>(async (ctx, _a, o, c) => {
        const list = await (await client(c)).audit(o.limit);
        ctx.result(list, () => list.map((e) => `${e.time} ${e.actor} ${e.action} ${e.target}`).join('\n'));
      }),
    );
  cmd
    .command('overview')
    .description('devices by version and status, overdue devices')
    .action(
      act(async (ctx, _a, _o, c) => {
        const o = await (await client(c)).overview();
        ctx.result(o, () =>
          [
            `${o.total} devices`,
            ...Object.entries(o.byStatus).map(([s, n]) => `  ${s}: ${n}`),
            ...Object.entries(o.byVersion).map(([v, n]) => `  on ${v}: ${n}`),
            `overdue: ${o.overdue.join(', ') || 'none'}`,
          ].join('\n'),
        );
      }),
    );
}
