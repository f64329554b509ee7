import type { Command } from 'commander';
import { addHost, findHost, kernelCmdline, loadInventory, removeHost, type Host, type StaticIp } from '../../host/index.js';
import { UserError } from '../../errors.js';
import { act, collect } from '../action.js';
import type { Context } from '../context.js';

export const DEFAULT_INVENTORY = 'hosts.yaml';

interface AddOpts {
  inventory: string;
  bsp?: string;
  dhcp?: boolean;
  ip?: string;
  address?: string;
  gateway?: string;
  interface?: string;
  dns?: string[];
  ntp?: string;
  kernelArg?: string[];
  smbiosUuid?: string;
  mac?: string[];
}

function ipSpec(o: AddOpts): string | StaticIp | undefined {
  const modes = [o.dhcp, o.ip !== undefined, o.address !== undefined].filter(Boolean).length;
  if (modes > 1) throw new UserError('LAMA_E_USAGE', 'use only one of --dhcp, --ip and --address');
  if (o.dhcp) return 'dhcp';
  if (o.ip !== undefined) return o.ip;
  if (o.address !== undefined) {
    const s: StaticIp = { address: o.address };
    if (o.gateway) s.gateway = o.gateway;
    if (o.interface) s.interface = o.interface;
    if (o.dns?.length) s.dns = o.dns;
    if (o.ntp) s.ntp = o.ntp;
    return s;
  }
  if (o.gateway || o.interface || o.dns?.length || o.ntp) throw new UserError('LAMA_E_USAGE', '--gateway/--interface/--dns/--ntp need --address');
  return undefined;
}

/** `lamadist host add NAME`: record a host with a new machine-id. */
export async function hostAdd(ctx: Context, name: string, o: AddOpts): Promise<Host> {
  const inv = await addHost(o.inventory, { name, bsp: o.bsp, ip: ipSpec(o), kernelArgs: o.kernelArg, smbiosUuid: o.smbiosUuid, macs: o.mac });
  const h = findHost(inv, name);
  ctx.result(h, `added ${h.name} (machine-id ${h.machineId}) to ${o.inventory}`);
  return h;
}

/** `lamadist host list`. */
export async function hostList(ctx: Context, o: { inventory: string }): Promise<Host[]> {
  const inv = await loadInventory(o.inventory);
  ctx.result(inv.hosts, () => {
    if (inv.hosts.length === 0) return ctx.c.dim(`no hosts in ${o.inventory}`);
    const w = Math.max(...inv.hosts.map((h) => h.name.length));
    return inv.hosts.map((h) => `${ctx.c.bold(h.name.padEnd(w))}  ${h.machineId}  ${h.bsp.padEnd(8)}  ${h.ip ? `ip=${h.ip}` : ctx.c.dim('(no ip=)')}`).join('\n');
  });
  return inv.hosts;
}

/** `lamadist host show NAME [--root-hash H --slot S]`: a host, and its kernel command line for a slot. */
export async function hostShow(ctx: Context, name: string, o: { inventory: string; rootHash?: string; slot?: 'a' | 'b' }): Promise<Host & { cmdline?: string }> {
  const h = findHost(await loadInventory(o.inventory), name);
  if ((o.rootHash === undefined) !== (o.slot === undefined)) throw new UserError('LAMA_E_USAGE', '--root-hash and --slot go together');
  const cmdline = o.rootHash && o.slot ? kernelCmdline(h, { rootHash: o.rootHash, slot: o.slot }) : undefined;
  const out = { ...h, ...(cmdline ? { cmdline } : {}) };
  ctx.result(out, () =>
    [`name        ${h.name}`, `machine-id  ${h.machineId}`, `bsp         ${h.bsp}`, `ip          ${h.ip ?? '(none)'}`, `kernel-args ${h.kernelArgs.join(' ') || '(none)'}`, `smbios-uuid ${h.smbiosUuid ?? '(none)'}`, `mac         ${h.macs.join(' ') || '(none)'}`, ...(cmdline ? [`cmdline     ${cmdline}`] : [])].join('\n'),
  );
  return out;
}

/** `lamadist host remove NAME`. */
export async function hostRemove(ctx: Context, name: string, o: { inventory: string }): Promise<void> {
  await removeHost(o.inventory, name);
  ctx.result({ removed: name }, `removed ${name} from ${o.inventory}`);
}

export function configure(cmd: Command): void {
  cmd.description('manage the host inventory (identity and network on the kernel command line)');
  const inv = (c: Command): Command => c.option('--inventory <file>', 'host inventory', DEFAULT_INVENTORY);
  inv(cmd.command('add').description('add a host with a newly generated machine-id').argument('<name>', 'host name'))
    .option('--bsp <name>', 'board support package', 'x86_64')
    .option('--dhcp', 'configure the network by DHCP (ip=dhcp)')
    .option('--ip <value>', 'raw kernel ip= value (nfsroot syntax)')
    .option('--address <cidr>', 'static IPv4 address with prefix, e.g. 192.168.1.10/24')
    .option('--gateway <ip>', 'static gateway')
    .option('--interface <dev>', 'network interface for the static address')
    .option('--dns <ip>', 'DNS server (repeat for a second)', collect)
    .option('--ntp <ip>', 'NTP server')
    .option('--kernel-arg <arg>', 'extra kernel argument (repeatable)', collect)
    .option('--smbios-uuid <uuid>', "the machine's SMBIOS UUID (/sys/class/dmi/id/product_uuid), for the installer stick")
    .option('--mac <addr>', "a network card's MAC address, for the installer stick (repeatable)", collect)
    .action(act<AddOpts>(async (ctx, [name], o) => void (await hostAdd(ctx, name ?? '', o))));
  inv(cmd.command('list').description('list hosts')).action(act<{ inventory: string }>(async (ctx, _a, o) => void (await hostList(ctx, o))));
  inv(cmd.command('show').description('show a host and, with --root-hash/--slot, its kernel command line').argument('<name>', 'host name'))
    .option('--root-hash <hex>', 'dm-verity root hash of the slot')
    .option('--slot <a|b>', 'slot the UKI boots')
    .action(act<{ inventory: string; rootHash?: string; slot?: 'a' | 'b' }>(async (ctx, [name], o) => void (await hostShow(ctx, name ?? '', o))));
  inv(cmd.command('remove').description('remove a host').argument('<name>', 'host name')).action(
    act<{ inventory: string }>(async (ctx, [name], o) => void (await hostRemove(ctx, name ?? '', o))),
  );
}
