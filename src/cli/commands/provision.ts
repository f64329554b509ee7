import type { Command } from 'commander';
import { UserError } from '../../errors.js';
import { findHost, loadInventory } from '../../host/index.js';
import { provisionHosts, type ProvisionedHost } from '../../provision/index.js';
import { readUserFile } from '../../util/fsx.js';
import { act, collect } from '../action.js';
import type { Context } from '../context.js';
import { fleetClient, type FleetCliOptions } from './fleet.js';
import { DEFAULT_INVENTORY } from './host.js';
import { parseSizes } from './image.js';

export interface ProvisionCliOptions extends FleetCliOptions {
  release: string;
  keys: string;
  inventory: string;
  out: string;
  disk?: string;
  installer?: string;
  size: string[];
  bundleKey?: string;
  offline?: boolean;
  gatewayTokenFile?: string;
  deviceServer?: string;
  tag: string[];
  force?: boolean;
}

/** Where the device reaches the server: --device-server, else the admin URL's host:port. Pure. */
export function deviceServerOf(o: { deviceServer?: string; server?: string }): {
  server: string;
  ssl: boolean;
} {
  if (o.deviceServer) {
    const m = /^(https?):\/\/([^/]+)\/?$/.exec(o.deviceServer);
    if (m) return { server: m[2] as string, ssl: m[1] === 'https' };
    if (/^[A-Za-z0-9.[\]:-]+:\d{1,5}$/.test(o.deviceServer)) return { server: o.deviceServer, ssl: false };
    throw new UserError(
      'LAMA_E_USAGE',
      `--device-server '${o.deviceServer}' must be HOST:PORT or an http(s) URL`,
    );
  }
  const url = new URL(o.server ?? process.env.LAMADIST_SERVER ?? 'http://127.0.0.1:8080');
  return { server: url.host, ssl: url.protocol === 'https:' };
}

/**
 * `lamadist provision HOST...`: per host, the device key, the registration (or a gateway token),
 * the update client's configuration, the signed UKIs and, with --disk, the sealed A/B disk.
 */
export async function provision(
  ctx: Context,
  names: string[],
  o: ProvisionCliOptions,
): Promise<ProvisionedHost[]> {
  const inv = await loadInventory(o.inventory);
  const hosts = names.map((n) => findHost(inv, n));
  let gatewayToken: string | undefined;
  if (o.offline) {
    if (!o.gatewayTokenFile)
      throw new UserError(
        'LAMA_E_USAGE',
        '--offline needs --gateway-token-file (from `lamadist fleet gateway-token`) for the device to register itself',
      );
    gatewayToken = (await readUserFile(o.gatewayTokenFile, 'gateway token file')).toString('utf8').trim();
    if (!gatewayToken)
      throw new UserError('LAMA_E_USAGE', `gateway token file ${o.gatewayTokenFile} is empty`);
  }
  const fleet = o.offline ? undefined : await fleetClient(o);
  const device = deviceServerOf(o);
  const done = await provisionHosts({
    release: o.release,
    keys: o.keys,
    ...(o.bundleKey && { bundleKey: o.bundleKey }),
    hosts,
    out: o.out,
    ...(fleet ? { fleet, tags: o.tag } : { gatewayToken: gatewayToken as string }),
    deviceServer: device.server,
    ssl: device.ssl,
    ...(o.tenant && { tenant: o.tenant }),
    ...(o.disk && { disk: o.disk }),
    ...(o.installer && { installer: o.installer }),
    ...(o.size.length > 0 && { sizes: parseSizes(o.size) }),
    force: o.force ?? false,
    log: (m) => ctx.detail(m),
    warn: (m) => ctx.warn(m),
  });
  ctx.result(done, () =>
    done
      .map((r) =>
        [
          `${ctx.c.green('provisioned')} ${r.host} (${r.bsp}, machine-id ${r.machineId}, ${r.registered === 'target-token' ? 'registered with a TargetToken' : 'registers itself with the gateway token'})`,
          `  update client: ${r.outputs.config}`,
          `  UKIs: ${r.outputs.ukis.a}, ${r.outputs.ukis.b}`,
          ...(r.outputs.disk ? [`  disk: ${r.outputs.disk} (recovery key ${r.outputs.recoveryKey})`] : []),
          ...(r.outputs.installer ? [`  installer: ${r.outputs.installer} (recovery key escrow: escrow/${r.host}.cms on its installer_data partition)`] : []),
        ].join('\n'),
      )
      .join('\n'),
  );
  return done;
}

export function configure(cmd: Command): void {
  cmd
    .description(
      'provision hosts of the inventory from a release bundle: device key, registration, update client, signed UKIs, sealed disk or installer stick',
    )
    .argument('<host...>', 'host names from the inventory')
    .requiredOption('--release <bundle>', 'release bundle (.raucb) the hosts start from')
    .requiredOption('--keys <dir>', 'fleet key directory (`lamadist keys init`)')
    .option('--inventory <file>', 'host inventory', DEFAULT_INVENTORY)
    .option('--out <dir>', 'per-host outputs go to DIR/<host>/', 'provision')
    .option(
      '--disk <file>',
      "build the sealed A/B disk to write to the host's drive ({host} is replaced by the host name)",
    )
    .option(
      '--installer <file>',
      'build one bootable installer stick (UEFI) for all the named hosts: it recognises each by SMBIOS UUID or MAC and seals its disk with keys made on the device',
    )
    .option('--size <label=MiB>', 'partition size override (repeatable)', collect, [])
    .option(
      '--bundle-key <pem>',
      "device key that opens a crypt release (default: the key directory's device keys)",
    )
    .option('--server <url>', 'update server URL (env LAMADIST_SERVER, default http://127.0.0.1:8080)')
    .option('--token-file <file>', 'admin token file (env LAMADIST_ADMIN_TOKEN)')
    .option('--tenant <name>', 'tenant (default DEFAULT)')
    .option('--ca <pem>', 'CA certificate of an https server')
    .option(
      '--device-server <host:port|url>',
      'the server as devices reach it (default: the --server host and port)',
    )
    .option('--tag <tag>', 'tag the registered devices (repeatable; rollouts target tags)', collect, [])
    .option('--offline', 'do not contact the server; devices register themselves with a gateway token')
    .option('--gateway-token-file <file>', "the tenant's gateway token (with --offline)")
    .option('--force', 'overwrite existing outputs')
    .action(act<ProvisionCliOptions>(async (ctx, names, o) => void (await provision(ctx, names, o))));
}
