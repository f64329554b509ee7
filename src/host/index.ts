/**
 * Host inventory (hosts.yaml) and the per-host kernel command line. Host identity (hostname,
 * machine-id, network) travels on the signed UKI's command line, so one root image serves every
 * host: the inventory plus a slot's root hash determine each host's UKI.
 *
 * hosts.yaml:
 *   hosts:
 *     node01:
 *       machine-id: 4f6c0a9e1d2b4c3e8a7f6b5c4d3e2f1a   # generated once by `host add`, then kept
 *       bsp: x86_64                                    # optional, default x86_64
 *       ip: dhcp                                       # or a static block, or a raw ip= value
 *       # ip: { address: 192.168.1.10/24, gateway: 192.168.1.1, interface: eth0, dns: [192.168.1.1] }
 *       kernel-args: [quiet]                           # optional extra arguments
 *       smbios-uuid: 4c4c4544-0042-3510-8052-b4c04f4e3232   # optional: how the installer stick
 *       mac: 52:54:00:12:34:56                         #   recognises the machine (mac: one or a list)
 *
 * Public API:
 * - `loadInventory(path)` → Inventory (every error located file:line:col)
 * - `kernelCmdline(host, { rootHash, bsp?, slot, extra? })` → string
 * - `parseIpArg(value)` / `formatIpArg(fields)`: the kernel's nfsroot `ip=` syntax
 * - `addHost(path, spec)`, `removeHost(path, name)`: edit the file, keeping comments
 * - `isInventoryName(s)`, `isMachineId(s)`: the rules for a host's name and machine-id
 * - `newMachineId()` → 32 hex digits (random, UUID v4 layout as systemd makes them)
 * - `normalizeSmbiosUuid(s)`, `normalizeMac(s)` → canonical lowercase form, or undefined when malformed
 */
import { randomBytes } from 'node:crypto';
import { promises as fs } from 'node:fs';
import { isMap, parseDocument, type Document } from 'yaml';
import { getBsp } from '../bsp/index.js';
import { UserError, isErrno } from '../errors.js';
import { writeFileAtomic } from '../util/fsx.js';
import { parseYamlLocated, type LocatedYaml } from '../util/yaml.js';

/** The ten colon-separated fields of the kernel's `ip=` argument (Documentation/admin-guide/nfs/nfsroot.rst). */
export interface IpFields {
  clientIp: string;
  serverIp: string;
  gatewayIp: string;
  netmask: string;
  hostname: string;
  device: string;
  autoconf: string;
  dns0: string;
  dns1: string;
  ntp0: string;
}

const IP_FIELD_NAMES: (keyof IpFields)[] = ['clientIp', 'serverIp', 'gatewayIp', 'netmask', 'hostname', 'device', 'autoconf', 'dns0', 'dns1', 'ntp0'];
const IP_FIELD_LABELS = ['client-ip', 'server-ip', 'gw-ip', 'netmask', 'hostname', 'device', 'autoconf', 'dns0-ip', 'dns1-ip', 'ntp0-ip'];
/** Values the kernel accepts for <autoconf> (and for `ip=` on its own). */
export const AUTOCONF = ['off', 'none', 'on', 'any', 'dhcp', 'bootp', 'rarp', 'both'] as const;

function isIpv4(s: string): boolean {
  const parts = s.split('.');
  return parts.length === 4 && parts.every((p) => /^\d{1,3}$/.test(p) && Number(p) <= 255);
}

function isNetmask(s: string): boolean {
  if (!isIpv4(s)) return false;
  const n = s.split('.').reduce((acc, p) => acc * 256 + Number(p), 0);
  const inv = ~n >>> 0;
  return ((inv + 1) & inv) === 0 && n !== 0;
}

/** Hostname label rules (RFC 1123) within the kernel's 64-byte limit. */
function isHostname(s: string): boolean {
  return s.length <= 64 && /^[A-Za-z0-9]([A-Za-z0-9-]{0,62}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}[A-Za-z0-9])?)*$/.test(s);
}

/** A host name of the inventory: one hostname label (it is also the host's systemd hostname). */
export function isInventoryName(s: string): boolean {
  return isHostname(s) && !s.includes('.');
}

/** Linux interface names: 1–15 bytes, no '/', ':' or whitespace. */
function isIfname(s: string): boolean {
  return s.length >= 1 && s.length <= 15 && !/[/:\s]/.test(s);
}

/**
 * Validate and split an `ip=` value in the kernel's nfsroot syntax: either one autoconf word, or
 * `<client-ip>:<server-ip>:<gw-ip>:<netmask>:<hostname>:<device>:<autoconf>:<dns0-ip>:<dns1-ip>:<ntp0-ip>`
 * with trailing fields optional. Throws LAMA_E_BAD_IP naming the bad field.
 */
export function parseIpArg(value: string, where?: string): IpFields {
  const bad = (m: string): never => {
    throw new UserError('LAMA_E_BAD_IP', `invalid ip=${value}: ${m}`, where ? { where } : undefined);
  };
  const empty: IpFields = { clientIp: '', serverIp: '', gatewayIp: '', netmask: '', hostname: '', device: '', autoconf: '', dns0: '', dns1: '', ntp0: '' };
  if (!value.includes(':')) {
    if (!(AUTOCONF as readonly string[]).includes(value)) bad(`expected one of ${AUTOCONF.join('|')} or the colon-separated form`);
    return { ...empty, autoconf: value };
  }
  const parts = value.split(':');
  if (parts.length > 10) bad(`${parts.length} fields, at most 10 (${IP_FIELD_LABELS.join(':')})`);
  const f = { ...empty };
  parts.forEach((p, i) => {
    const key = IP_FIELD_NAMES[i] as keyof IpFields;
    f[key] = p;
  });
  for (const [i, key] of IP_FIELD_NAMES.entries()) {
    const v = f[key];
    if (v === '') continue;
    const label = IP_FIELD_LABELS[i] ?? key;
    if (['clientIp', 'serverIp', 'gatewayIp', 'dns0', 'dns1', 'ntp0'].includes(key) && !isIpv4(v)) bad(`<${label}> '${v}' is not an IPv4 address`);
    if (key === 'netmask' && !isNetmask(v)) bad(`<netmask> '${v}' is not a contiguous IPv4 netmask`);
    if (key === 'hostname' && !isHostname(v)) bad(`<hostname> '${v}' is not a valid host name`);
    if (key === 'device' && !isIfname(v)) bad(`<device> '${v}' is not a network interface name`);
    if (key === 'autoconf' && !(AUTOCONF as readonly string[]).includes(v)) bad(`<autoconf> '${v}' is not one of ${AUTOCONF.join('|')}`);
  }
  const static_ = f.autoconf === '' || f.autoconf === 'off' || f.autoconf === 'none';
  if (static_ && f.clientIp === '') bad('static configuration (autoconf off/none/empty) needs <client-ip>');
  if (static_ && f.clientIp !== '' && f.netmask === '') bad('static configuration needs <netmask>');
  return f;
}

/** Join fields back into an `ip=` value, dropping empty trailing fields. */
export function formatIpArg(f: IpFields): string {
  if (IP_FIELD_NAMES.every((k) => k === 'autoconf' || f[k] === '')) return f.autoconf;
  const parts = IP_FIELD_NAMES.map((k) => f[k]);
  while (parts.length > 1 && parts[parts.length - 1] === '') parts.pop();
  return parts.length === 1 ? (parts[0] ?? '') : parts.join(':');
}

/** A static network configuration as written in hosts.yaml. */
export interface StaticIp {
  /** Address with prefix length, e.g. 192.168.1.10/24. */
  address: string;
  gateway?: string;
  interface?: string;
  dns?: string[];
  ntp?: string;
}

/** One host of the inventory. */
export interface Host {
  name: string;
  machineId: string;
  bsp: string;
  /** The validated `ip=` value, or undefined for no ip= argument. */
  ip?: string;
  kernelArgs: string[];
  /** SMBIOS system UUID (/sys/class/dmi/id/product_uuid), canonical lowercase 8-4-4-4-12. */
  smbiosUuid?: string;
  /** The machine's network card addresses, lowercase colon-separated. */
  macs: string[];
}

export interface Inventory {
  file: string;
  hosts: Host[];
}

function prefixToNetmask(prefix: number): string {
  const n = prefix === 0 ? 0 : (0xffffffff << (32 - prefix)) >>> 0;
  return [24, 16, 8, 0].map((s) => (n >>> s) & 0xff).join('.');
}

/** Build the `ip=` value for a static block or autoconf word; validates the result. */
export function ipFromSpec(name: string, spec: string | StaticIp, where?: string): string {
  if (typeof spec === 'string') return formatIpArg(parseIpArg(spec, where));
  // hosts.yaml is hand-written: a list or mapping where a string belongs must be refused here, before
  // it reaches string operations as an object.
  const fields = spec as unknown as Record<string, unknown>;
  for (const k of ['address', 'gateway', 'interface', 'ntp']) {
    if (fields[k] !== undefined && typeof fields[k] !== 'string') throw new UserError('LAMA_E_BAD_IP', `${k} must be a string`, where ? { where } : undefined);
  }
  if (fields.dns !== undefined && (!Array.isArray(fields.dns) || fields.dns.some((d) => typeof d !== 'string'))) {
    throw new UserError('LAMA_E_BAD_IP', 'dns must be a list of IPv4 addresses', where ? { where } : undefined);
  }
  const m = /^([\d.]+)\/(\d{1,2})$/.exec(spec.address ?? '');
  if (!m || Number(m[2]) > 32) throw new UserError('LAMA_E_BAD_IP', `address '${String(spec.address)}' must be IPv4/prefix, e.g. 192.168.1.10/24`, where ? { where } : undefined);
  const dns = spec.dns ?? [];
  if (dns.length > 2) throw new UserError('LAMA_E_BAD_IP', `the kernel's ip= carries at most 2 DNS servers, ${dns.length} given`, where ? { where } : undefined);
  const value = formatIpArg({
    clientIp: m[1] ?? '',
    serverIp: '',
    gatewayIp: spec.gateway ?? '',
    netmask: prefixToNetmask(Number(m[2])),
    hostname: name,
    device: spec.interface ?? '',
    autoconf: 'none',
    dns0: dns[0] ?? '',
    dns1: dns[1] ?? '',
    ntp0: spec.ntp ?? '',
  });
  parseIpArg(value, where);
  return value;
}

/** systemd machine-id: 32 lowercase hex digits, not all zero. */
export function isMachineId(s: string): boolean {
  return /^[0-9a-f]{32}$/.test(s) && !/^0+$/.test(s);
}

/** A fresh machine-id (random 128 bits with the UUID v4 version and variant bits, as systemd does). */
export function newMachineId(): string {
  const b = randomBytes(16);
  b[6] = ((b[6] ?? 0) & 0x0f) | 0x40;
  b[8] = ((b[8] ?? 0) & 0x3f) | 0x80;
  return b.toString('hex');
}

/**
 * An SMBIOS UUID in canonical lowercase form (uppercase accepted), or undefined. All-zero means
 * "not present" and all-ones "not settable" (SMBIOS 3.x, 7.2.1): firmware shipping either gives
 * every machine the same value, so it cannot tell machines apart.
 */
export function normalizeSmbiosUuid(s: string): string | undefined {
  const u = s.toLowerCase();
  if (!/^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/.test(u)) return undefined;
  return /^[0-]+$/.test(u) || /^[f-]+$/.test(u) ? undefined : u;
}

/**
 * A unicast MAC address as six lowercase colon-separated octets (`-` separators and uppercase
 * accepted), or undefined. A group (multicast/broadcast) or all-zero address is never a network
 * card's own.
 */
export function normalizeMac(s: string): string | undefined {
  if (!/^[0-9a-fA-F]{2}([:-][0-9a-fA-F]{2}){5}$/.test(s)) return undefined;
  const m = s.toLowerCase().replace(/-/g, ':');
  return (parseInt(m.slice(0, 2), 16) & 1) === 1 || m === '00:00:00:00:00:00' ? undefined : m;
}

const HOST_KEYS = new Set(['machine-id', 'bsp', 'ip', 'kernel-args', 'smbios-uuid', 'mac']);

const UUID_RULE = 'must be an SMBIOS UUID (8-4-4-4-12 hex digits, not all 0 or all f)';
const MAC_RULE = 'must be a unicast MAC address (six hex octets separated by : or -)';

function parseHosts(y: LocatedYaml): Host[] {
  const root = y.value as { hosts?: unknown } | null;
  if (root === null || root === undefined) return [];
  if (typeof root !== 'object' || Array.isArray(root)) throw new UserError('LAMA_E_INVENTORY', 'expected a mapping with a "hosts" key', { where: y.where([]) });
  const hosts = root.hosts ?? {};
  if (typeof hosts !== 'object' || hosts === null || Array.isArray(hosts)) throw new UserError('LAMA_E_INVENTORY', '"hosts" must be a mapping of host name to settings', { where: y.where(['hosts']) });
  const out: Host[] = [];
  const seen = new Map<string, string>();
  // The installer stick picks a host by these: two hosts sharing one would install the wrong disk.
  const seenUuid = new Map<string, string>();
  const seenMac = new Map<string, string>();
  for (const [name, raw] of Object.entries(hosts as Record<string, unknown>)) {
    const at = (...p: string[]): string => y.where(['hosts', name, ...p], p.length ? 'value' : 'key');
    if (!isInventoryName(name)) throw new UserError('LAMA_E_INVENTORY', `host name '${name}' is not a valid host name`, { where: at() });
    if (typeof raw !== 'object' || raw === null || Array.isArray(raw)) throw new UserError('LAMA_E_INVENTORY', `host ${name}: expected a mapping`, { where: at() });
    const h = raw as Record<string, unknown>;
    for (const k of Object.keys(h)) {
      if (!HOST_KEYS.has(k)) throw new UserError('LAMA_E_INVENTORY', `host ${name}: unknown key '${k}' (known: ${[...HOST_KEYS].join(', ')})`, { where: y.where(['hosts', name, k]) });
    }
    const machineId = String(h['machine-id'] ?? '');
    if (!isMachineId(machineId)) throw new UserError('LAMA_E_INVENTORY', `host ${name}: machine-id must be 32 lowercase hex digits, not all zero`, { where: at('machine-id') });
    const dup = seen.get(machineId);
    if (dup) throw new UserError('LAMA_E_DUPLICATE_MACHINE_ID', `host ${name} has the same machine-id as host ${dup}`, { where: at('machine-id') });
    seen.set(machineId, name);
    const bsp = String(h.bsp ?? 'x86_64');
    try {
      getBsp(bsp);
    } catch (e) {
      if (e instanceof UserError) throw new UserError(e.code, e.message, { where: at('bsp') });
      throw e;
    }
    const ipSpec = h.ip as string | StaticIp | undefined;
    if (ipSpec !== undefined && typeof ipSpec !== 'string' && (typeof ipSpec !== 'object' || ipSpec === null || Array.isArray(ipSpec))) {
      throw new UserError('LAMA_E_INVENTORY', `host ${name}: ip must be dhcp, a static block or an ip= value`, { where: at('ip') });
    }
    const ip = ipSpec === undefined ? undefined : ipFromSpec(name, ipSpec, at('ip'));
    const args = h['kernel-args'] ?? [];
    if (!Array.isArray(args) || args.some((a) => typeof a !== 'string' || /\s/.test(a) || a === '')) {
      throw new UserError('LAMA_E_INVENTORY', `host ${name}: kernel-args must be a list of single arguments`, { where: at('kernel-args') });
    }
    for (const [i, a] of (args as string[]).entries()) {
      if (/^(systemd\.hostname|systemd\.machine_id|roothash|lamadist\.slot|ip)=/.test(a)) {
        throw new UserError('LAMA_E_INVENTORY', `host ${name}: kernel-args must not set ${a.split('=')[0]}= (it comes from the inventory and the slot)`, { where: y.where(['hosts', name, 'kernel-args', i]) });
      }
    }
    let smbiosUuid: string | undefined;
    if (h['smbios-uuid'] !== undefined) {
      const raw = h['smbios-uuid'];
      smbiosUuid = typeof raw === 'string' ? normalizeSmbiosUuid(raw) : undefined;
      if (!smbiosUuid) throw new UserError('LAMA_E_INVENTORY', `host ${name}: smbios-uuid ${UUID_RULE}`, { where: at('smbios-uuid') });
      const other = seenUuid.get(smbiosUuid);
      if (other) throw new UserError('LAMA_E_DUPLICATE_SMBIOS_UUID', `host ${name} has the same smbios-uuid as host ${other}`, { where: at('smbios-uuid') });
      seenUuid.set(smbiosUuid, name);
    }
    const macSpec = h.mac ?? [];
    const macList = Array.isArray(macSpec) ? (macSpec as unknown[]) : [macSpec];
    const macs: string[] = [];
    for (const [i, raw] of macList.entries()) {
      const where = Array.isArray(macSpec) ? y.where(['hosts', name, 'mac', i]) : at('mac');
      const mac = typeof raw === 'string' ? normalizeMac(raw) : undefined;
      if (!mac) throw new UserError('LAMA_E_INVENTORY', `host ${name}: mac ${MAC_RULE}`, { where });
      if (macs.includes(mac)) throw new UserError('LAMA_E_INVENTORY', `host ${name} lists mac ${mac} twice`, { where });
      const other = seenMac.get(mac);
      if (other) throw new UserError('LAMA_E_DUPLICATE_MAC', `host ${name} has the same mac ${mac} as host ${other}`, { where });
      seenMac.set(mac, name);
      macs.push(mac);
    }
    out.push({ name, machineId, bsp, ip, kernelArgs: args as string[], ...(smbiosUuid && { smbiosUuid }), macs });
  }
  return out;
}

async function readText(file: string, missingOk: boolean): Promise<string | undefined> {
  try {
    return await fs.readFile(file, 'utf8');
  } catch (err) {
    if (isErrno(err, 'ENOENT')) {
      if (missingOk) return undefined;
      throw new UserError('LAMA_E_NOT_FOUND', `host inventory ${file} does not exist (create it with 'lamadist host add NAME')`);
    }
    throw err;
  }
}

/** Load and validate hosts.yaml. */
export async function loadInventory(file: string): Promise<Inventory> {
  const text = (await readText(file, false)) ?? '';
  return { file, hosts: parseHosts(parseYamlLocated(text, file)) };
}

/** Find a host by name. */
export function findHost(inv: Inventory, name: string): Host {
  const h = inv.hosts.find((x) => x.name === name);
  if (!h) throw new UserError('LAMA_E_NO_HOST', `no host '${name}' in ${inv.file} (known: ${inv.hosts.map((x) => x.name).join(', ') || 'none'})`);
  return h;
}

/**
 * The slot-specific arguments every UKI carries: the dm-verity root hash, LamaDist's slot name for
 * the initramfs, and RAUC's bootname (A/B in system.conf) so RAUC knows which slot booted.
 */
export function slotBootArgs(rootHash: string, slot: 'a' | 'b'): string[] {
  return [`roothash=${rootHash}`, `lamadist.slot=${slot}`, `rauc.slot=${slot.toUpperCase()}`];
}

/**
 * The kernel command line for a host booting a slot: console from the BSP, the slot's dm-verity
 * root hash and name, the host identity and network, then the host's and the caller's extras.
 */
export function kernelCmdline(host: Host, opts: { rootHash: string; bsp?: string; slot: 'a' | 'b'; extra?: string[] }): string {
  if (!/^[0-9a-f]{64}([0-9a-f]{32}|[0-9a-f]{64})?$/.test(opts.rootHash)) {
    throw new UserError('LAMA_E_BAD_ROOT_HASH', `root hash '${opts.rootHash}' must be 64, 96 or 128 lowercase hex digits`);
  }
  if (opts.slot !== 'a' && opts.slot !== 'b') throw new UserError('LAMA_E_BAD_SLOT', `slot '${String(opts.slot)}' must be a or b`);
  const bsp = getBsp(opts.bsp ?? host.bsp);
  return [bsp.console, ...slotBootArgs(opts.rootHash, opts.slot), ...hostArgs(host), ...(opts.extra ?? [])].join(' ');
}

/** What a host's command line adds to its release's: identity, network and the host's own arguments. */
export function hostArgs(host: Host): string[] {
  return [`systemd.hostname=${host.name}`, `systemd.machine_id=${host.machineId}`, ...(host.ip ? [`ip=${host.ip}`] : []), ...host.kernelArgs];
}

/** What `host add` records. */
export interface HostSpec {
  name: string;
  bsp?: string;
  ip?: string | StaticIp;
  kernelArgs?: string[];
  smbiosUuid?: string;
  macs?: string[];
}

async function editInventory(file: string, edit: (doc: Document.Parsed) => void): Promise<Inventory> {
  const text = (await readText(file, true)) ?? '';
  parseHosts(parseYamlLocated(text, file));
  const doc = parseDocument(text);
  if (!isMap(doc.contents)) doc.contents = doc.createNode({}) as unknown as typeof doc.contents;
  edit(doc);
  const out = doc.toString();
  const inv: Inventory = { file, hosts: parseHosts(parseYamlLocated(out, file)) };
  await writeFileAtomic(file, out, { force: true });
  return inv;
}

/**
 * Add a host with a newly generated machine-id (kept from then on: the file is the record).
 * Refuses an existing name; the whole file is re-validated before it is replaced.
 */
export async function addHost(file: string, spec: HostSpec): Promise<Inventory> {
  if (!isInventoryName(spec.name)) throw new UserError('LAMA_E_BAD_NAME', `host name '${spec.name}' is not a valid host name`);
  if (spec.ip !== undefined) ipFromSpec(spec.name, spec.ip);
  const smbiosUuid = spec.smbiosUuid === undefined ? undefined : normalizeSmbiosUuid(spec.smbiosUuid);
  if (spec.smbiosUuid !== undefined && !smbiosUuid) throw new UserError('LAMA_E_USAGE', `--smbios-uuid '${spec.smbiosUuid}' ${UUID_RULE}`);
  const macs = (spec.macs ?? []).map((m) => {
    const n = normalizeMac(m);
    if (!n) throw new UserError('LAMA_E_USAGE', `--mac '${m}' ${MAC_RULE}`);
    return n;
  });
  return editInventory(file, (doc) => {
    if (doc.hasIn(['hosts', spec.name])) throw new UserError('LAMA_E_EXISTS', `host ${spec.name} already exists in ${file}`);
    const entry: Record<string, unknown> = { 'machine-id': newMachineId() };
    if (spec.bsp) entry.bsp = getBsp(spec.bsp).name;
    if (spec.ip !== undefined) entry.ip = spec.ip;
    if (spec.kernelArgs?.length) entry['kernel-args'] = spec.kernelArgs;
    if (smbiosUuid) entry['smbios-uuid'] = smbiosUuid;
    if (macs.length) entry.mac = macs.length === 1 ? macs[0] : macs;
    const hosts = doc.get('hosts');
    if (!isMap(hosts) || hosts.items.length === 0) {
      // Block style, so the next `host add` and a human editing the file see one host per block.
      const fresh = doc.createNode({});
      fresh.flow = false;
      doc.set('hosts', fresh);
    }
    doc.setIn(['hosts', spec.name], doc.createNode(entry));
  });
}

/** Remove a host (its machine-id is gone with it). */
export async function removeHost(file: string, name: string): Promise<Inventory> {
  await loadInventory(file).then((inv) => findHost(inv, name));
  return editInventory(file, (doc) => {
    doc.deleteIn(['hosts', name]);
  });
}
