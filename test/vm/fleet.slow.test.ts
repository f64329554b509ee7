import { createHash } from 'node:crypto';
import { createReadStream, promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { PassThrough } from 'node:stream';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { planGpt, readGpt, writeGpt } from '../../src/disk/index.js';
import { buildEsp, readEspFile } from '../../src/fat/index.js';
import { keyPath, signingPair } from '../../src/keys/index.js';
import { openRelease, releaseUki } from '../../src/release/index.js';
import { makeOvmfVars, signPe, stripSignature } from '../../src/secureboot/index.js';
import { inspectUki, setUkiCmdline } from '../../src/uki/index.js';
import {
  blankMachine,
  FIXTURE_KERNEL_ARGS,
  fleetRelease,
  installFromStick,
  matchAfter,
  OVMF,
  parseReport,
  parseSlots,
  runQemu,
  startFleetServer,
  watchDevice,
  type DeviceWatch,
  type FixtureRelease,
  type FleetMachine,
} from '../../src/vm/index.js';
import type { RunningServer } from '../../src/server/index.js';
import type { FleetClient } from '../../src/fleet/index.js';
import { runCli } from '../helpers/cli.js';
import { expectEnforcing } from './selinux.js';
import { tool } from '../uki/helpers.js';

// Issue 13, acceptance 1 to 4 on the emulated hardware: two new machines (blank drives, firmware in
// setup mode, fresh TPMs, their own SMBIOS UUIDs; one with a static address, one by DHCP) become a
// fleet through the operator's path only: `keys init`, `host add`, `provision --installer` (one
// stick for both), booting the stick, then updates from the server by tag. Issue 16's remote
// attestation on the same machines: each attests its first boot to the update server, and a UKI the
// fleet signed with another command line fails on PCR 11 and is held back by a rollout.

const GiB = 1024 ** 3;
const MiB = 1024 ** 2;
/** Partition sizes that fit the fixture with room for updates, small enough for tests (as the VM device's). */
const SIZES = ['esp=300', 'rootfs_a=640', 'verity_a=16', 'rootfs_b=640', 'verity_b=16', 'var=600'];
// fleet-static is recorded by its SMBIOS UUID, fleet-dhcp by its NIC's MAC address only.
const HOSTS = [
  { name: 'fleet-static', uuid: '4c414d41-0000-4000-8000-000000000001', mac: '52:54:00:4c:4d:01', id: ['--smbios-uuid', '4C414D41-0000-4000-8000-000000000001'], net: ['--address', '10.0.2.20/24', '--gateway', '10.0.2.2'] },
  { name: 'fleet-dhcp', uuid: '4c414d41-0000-4000-8000-000000000002', mac: '52:54:00:4c:4d:02', id: ['--mac', '52-54-00-4C-4D-02'], net: ['--dhcp'] },
] as const;
const INSTALL_MS = 900_000;
/** The attestation agent's last line of a run: its verdict or why there was none (not its key's lines). */
const ATTEST_VERDICT = /lamadist-attest: (?!created an attestation key|attestation key )[^\r\n]*/;

/** The console line a `waitFor` match ended in. */
function lineAt(w: DeviceWatch, end: number): string {
  const serial = w.serial();
  return serial.slice(serial.lastIndexOf('\n', end - 1) + 1, end);
}

/** SHA-256 of a file of any size (the drives are 3 GiB). */
async function sha256(file: string): Promise<string> {
  const h = createHash('sha256');
  for await (const chunk of createReadStream(file)) h.update(chunk as Buffer);
  return h.digest('hex');
}

/** Copy a sparse image (the stick for runs that must not share its write lock). */
async function sparseCopy(from: string, to: string): Promise<string> {
  const r = tool('cp', ['--sparse=always', from, to]);
  expect(r.code, r.out).toBe(0);
  return to;
}

describe('issue 13: a fleet from blank machines through provision --installer, one release by tag', () => {
  let dir: string;
  let keys: string;
  let inventory: string;
  let stick: string;
  let server: RunningServer;
  let fleet: FleetClient;
  let serverCert: string;
  let provisioned: {
    host: string;
    machineId: string;
    luks: { label: string; uuid: string }[];
    outputs: { token: string; installer: string; recoveryEscrow: string; ukis: Record<'a' | 'b', string> };
  }[];
  const machines: Record<string, FleetMachine> = {};
  let v1: FixtureRelease;

  /** What a slot holds after a release is installed into it: the SHA-256 the slots report prints. */
  const slotDigests = async (bundle: string, machineId: string, slot: 'a' | 'b'): Promise<Record<string, string>> => {
    const r = await openRelease(bundle, { keys });
    try {
      return {
        slot_rootfs_sha256: await sha256(r.rootfs),
        slot_verity_sha256: await sha256(r.verity),
        slot_uki_sha256: createHash('sha256').update(await releaseUki(r, machineId, slot)).digest('hex'),
      };
    } finally {
      await r.close();
    }
  };

  beforeAll(async () => {
    dir = await fs.mkdtemp(path.join(os.tmpdir(), 'vm-fleet-'));
    keys = path.join(dir, 'keys');
    inventory = path.join(dir, 'hosts.yaml');
    stick = path.join(dir, 'installer.img');
    expect((await runCli(['keys', 'init', keys])).code).toBe(0);
    for (const h of HOSTS) {
      const r = await runCli(['host', 'add', h.name, '--inventory', inventory, ...h.id, ...h.net, ...FIXTURE_KERNEL_ARGS.flatMap((a) => ['--kernel-arg', a])]);
      expect(r.code, r.stderr).toBe(0);
    }
    ({ server, fleet, serverCert } = await startFleetServer(dir, keys, 5, () => undefined));
    v1 = await fleetRelease({ dir, keys, inventory, version: '1', out: path.join(dir, 'release-1.raucb'), recipients: [serverCert] });
    const tokenFile = server.adminTokenFile as string;
    const r = await runCli(
      [
        'provision', ...HOSTS.map((h) => h.name), '--release', v1.bundle, '--keys', keys, '--inventory', inventory,
        '--out', path.join(dir, 'provision'), '--installer', stick, '--tag', 'fleet', '--server', server.url,
        '--token-file', tokenFile, '--device-server', `10.0.2.2:${server.port}`, ...SIZES.flatMap((s) => ['--size', s]), '--json',
      ],
      { timeoutMs: 600_000 },
    );
    expect(r.code, r.stderr).toBe(0);
    provisioned = JSON.parse(r.stdout) as typeof provisioned;
    for (const h of HOSTS) machines[h.name] = await blankMachine({ dir, name: h.name, smbiosUuid: h.uuid, mac: h.mac, diskBytes: 3 * GiB });
  }, 1_500_000);
  afterAll(async () => {
    await server?.close();
    await fs.rm(dir, { recursive: true, force: true });
  });

  it('provision --json names each host, its token file, the stick, its LUKS2 UUIDs and where its recovery key is escrowed', async () => {
    expect(provisioned.map((p) => p.host)).toEqual(HOSTS.map((h) => h.name));
    for (const p of provisioned) {
      expect(p.outputs.installer).toBe(stick);
      expect(p.outputs.recoveryEscrow).toBe(`${stick}:installer_data/escrow/${p.host}.cms`);
      expect((await fs.stat(p.outputs.token)).mode & 0o777).toBe(0o600);
      expect(p.luks.map((l) => l.label)).toEqual(['rootfs_a', 'rootfs_b', 'var']);
    }
    const devices = await fleet.listDevices();
    expect(devices.filter((d) => d.tags.includes('fleet')).map((d) => d.controllerId).sort()).toEqual(HOSTS.map((h) => h.name).sort());
  });

  it('refuses a machine it has no host for and a drive too small, one line each, the drive untouched', async () => {
    const stranger = await blankMachine({ dir, name: 'stranger', smbiosUuid: '4c414d41-0000-4000-8000-0000000000ff', diskBytes: 3 * GiB });
    const small = await blankMachine({ dir, name: 'small', smbiosUuid: '4c414d41-0000-4000-8000-0000000000fe', mac: HOSTS[1].mac, diskBytes: 1 * GiB });
    const before = { stranger: await sha256(stranger.disk), small: await sha256(small.disk) };
    const [a, b] = await Promise.all([
      installFromStick(stranger, await sparseCopy(stick, path.join(dir, 'stick-stranger.img')), { timeoutMs: INSTALL_MS, serialLog: path.join(dir, 'stranger.log') }),
      installFromStick(small, await sparseCopy(stick, path.join(dir, 'stick-small.img')), { timeoutMs: INSTALL_MS, serialLog: path.join(dir, 'small.log') }),
    ]);
    expect(a.serial).toMatch(/lamadist-install: no host of this stick has SMBIOS UUID 4c414d41-0000-4000-8000-0000000000ff or MAC 52:54:00:12:34:56; type its name \(fleet-dhcp fleet-static\) within 30 s: \r?\n/);
    expect(a.error, a.serial.slice(-3000)).toMatch(/^lamadist-install: error: no host of this installer matches this machine \(SMBIOS UUID 4c414d41-0000-4000-8000-0000000000ff\)/);
    expect(b.error, b.serial.slice(-3000)).toMatch(/^lamadist-install: error: \/dev\/vda holds 1073741824 bytes; host fleet-dhcp needs at least \d+ .*nothing was written$/);
    expect(await sha256(stranger.disk)).toBe(before.stranger);
    expect(await sha256(small.disk)).toBe(before.small);
  }, 2 * INSTALL_MS);

  it('installs both machines from the one stick; a power cut while writing slot A is repaired by running it again', async () => {
    const first = machines['fleet-static'] as FleetMachine;
    const cut = new AbortController();
    const killed = await installFromStick(first, stick, {
      timeoutMs: INSTALL_MS,
      serialLog: path.join(dir, 'install-cut.log'),
      signal: cut.signal,
      onLine: (l) => {
        if (/lamadist-install: writing slot A/.test(l)) setTimeout(() => cut.abort(), 3000);
      },
    });
    expect(killed.aborted, killed.serial.slice(-3000)).toBe(true);
    for (const m of [first, machines['fleet-dhcp'] as FleetMachine]) {
      const r = await installFromStick(m, stick, { timeoutMs: INSTALL_MS, serialLog: path.join(dir, `install-${m.name}.log`) });
      expect(r.installed, r.serial.slice(-4000)).toBe(true);
      expect(r.serial).toMatch(new RegExp(`lamadist-install: host ${m.name} \\(machine-id [0-9a-f]{32}\\) onto /dev/vda`));
      expect(r.serial).toMatch(/lamadist-secureboot-enroll: enrolled PK, KEK and db/);
      // /var took the rest of the drive: the table's last partition ends at the last usable sector.
      const gpt = (await readGpt(m.disk)).table;
      const last = gpt.partitions[gpt.partitions.length - 1];
      expect(last?.name).toBe('var');
      expect(gpt.lastUsableLba - (last?.lastLba ?? 0n)).toBeLessThan(BigInt((1 * MiB) / 512));
    }
  }, 3 * INSTALL_MS);

  it('each host boots under Secure Boot with the fleet keys, comes online as itself, refuses a release without it and takes one release by tag to slot B', async () => {
    const watches: Record<string, DeviceWatch> = {};
    for (const h of HOSTS) {
      watches[h.name] = watchDevice(machines[h.name] as FleetMachine, { timeoutMs: 2_400_000, serialLog: path.join(dir, `${h.name}.log`) });
    }
    const ws = watches as Record<(typeof HOSTS)[number]['name'], DeviceWatch>;
    try {
      await Promise.all(HOSTS.map((h) => ws[h.name].waitFor(/lamadist-ddi: reported version 1 slot A/)));
      // Issue 16: each device attests its first boot (PCR 7: Secure Boot under exactly the fleet's
      // keys; 10: the IMA list; 11: release 1's UKI for this host, which provision uploaded).
      const verdicts = await Promise.all(HOSTS.map(async (h) => lineAt(ws[h.name], await ws[h.name].waitFor(ATTEST_VERDICT))));
      for (const v of verdicts) expect(v).toMatch(/lamadist-attest: attested/);
      for (const h of HOSTS) expect((await fleet.getDevice(h.name)).attestation, h.name).toMatchObject({ state: 'attested' });
      // When the server asks (fleet device attest): the device's ask timer sees the request in its
      // base poll within a minute and answers with a quote whose nonce was issued after it.
      const requestedAt = Date.parse((await fleet.requestAttestation('fleet-dhcp')).requestedAt);
      expect((await fleet.getDevice('fleet-dhcp')).attestation.requestedAt).not.toBeNull();
      const askedAt = await ws['fleet-dhcp'].waitFor(/lamadist-attest: the server asks for a fresh quote/);
      expect(lineAt(ws['fleet-dhcp'], await ws['fleet-dhcp'].waitFor(/lamadist-attest: (attested|the server judged)/, askedAt))).toMatch(/lamadist-attest: attested/);
      const fresh = (await fleet.getDevice('fleet-dhcp')).attestation;
      expect(fresh).toMatchObject({ state: 'attested', requestedAt: null });
      expect(Date.parse(fresh.checkedAt ?? '')).toBeGreaterThanOrEqual(requestedAt);
      // A release that carries fleet-static only, offered to fleet-dhcp: its install check refuses it.
      const lackingInv = path.join(dir, 'hosts-static-only.yaml');
      await fs.copyFile(inventory, lackingInv);
      expect((await runCli(['host', 'remove', 'fleet-dhcp', '--inventory', lackingInv])).code).toBe(0);
      const lacking = await fleetRelease({ dir, keys, inventory: lackingInv, version: '1.9', out: path.join(dir, 'release-1.9.raucb'), recipients: [serverCert] });
      const up19 = await fleet.uploadRelease(lacking.bundle);
      await fleet.createRollout({ releaseId: up19.release.id, name: 'lacking fleet-dhcp', filter: { devices: ['fleet-dhcp'] }, start: true });
      await ws['fleet-dhcp'].waitFor(/lamadist-ddi: rauc install failed: .*is not in this release/);
      const refused = (await fleet.getDevice('fleet-dhcp')).actions.find((a) => a.releaseId === up19.release.id);
      expect(refused?.state).toBe('failed');
      expect(JSON.stringify(refused?.history)).toMatch(/is not in this release/);

      const v2 = await fleetRelease({ dir, keys, inventory, version: '2', out: path.join(dir, 'release-2.raucb'), recipients: [serverCert] });
      const up2 = await fleet.uploadRelease(v2.bundle);
      const before = server.service.counters.artifactBytes;
      await fleet.createRollout({ releaseId: up2.release.id, name: 'fleet v2', filter: { tags: ['fleet'] }, start: true });
      await Promise.all(HOSTS.map((h) => ws[h.name].waitFor(/lamadist-ddi: reported version 2 slot B/)));
      // The slot report of B comes before or after B's report to the server.
      await Promise.all(HOSTS.map(async (h) => ws[h.name].waitFor(/LAMADIST-SLOTS-END/, await ws[h.name].waitFor(/installed version 2; rebooting/))));
      // Sizes are the benchmark's (npm run bench ota); this bound only catches whole-image downloads.
      expect(server.service.counters.artifactBytes - before).toBeLessThan(0.25 * v2.size * HOSTS.length);
      const esl = async (v: 'pk' | 'kek' | 'db'): Promise<string> => sha256(await keyPath(keys, `secureboot-${v}-esl`));
      for (const h of HOSTS) {
        const serial = ws[h.name].serial();
        const p = provisioned.find((x) => x.host === h.name);
        // First boot: unlocked with the provisioning key the installer left, TPM2 enrolled, then a
        // verity-backed read-only EROFS root, LUKS2 /var and the /etc overlay.
        expect(serial, h.name).toContain('unlocked with the provisioning key (first boot)');
        expect(serial).toMatch(/TPM2 enrolled \(PCRs 7\)/);
        const report = parseReport(serial.slice(0, matchAfter(serial, /LAMADIST-REPORT-END/))) ?? {};
        expect(report.root).toMatch(/^\/dev\/mapper\/root erofs\s+ro[, ]/);
        expect(report).toMatchObject({ root_dm: 'verity', var: '/dev/mapper/var ext4', var_luks: 'LUKS2', slot: 'a', persist: '' });
        expect(report.etc).toMatch(/^overlay /);
        // The boot into B unlocked with the TPM2 alone and kept what the first boot wrote to /var.
        const second = serial.slice(matchAfter(serial, /installed version 2; rebooting/));
        expect(second).not.toMatch(/provisioning key|recovery key/);
        // IMA appraisal in both releases, each under its own policy and certificate (lamadist-init
        // loads it; systemd loads the policy): a program copied into /var without its signature is
        // refused (126: EACCES), with its security.ima it runs; what ran is in the measurement list.
        for (const r of [report, parseReport(second) ?? {}]) {
          expect(r, h.name).toMatchObject({ ima_unsigned_exec: '126', ima_signed_exec: '0' });
          expect(Number(r.ima_entries)).toBeGreaterThan(100);
        }
        expect(serial.match(/lamadist-init: IMA certificate of the root loaded into _ima/g)?.length).toBeGreaterThanOrEqual(2);
        // SELinux enforcing on the first boot and after the update, with no denial in between
        // (first boot, TPM2 enrollment, attestation, the refused release, the update).
        expectEnforcing(serial, `${h.name} first boot`);
        expectEnforcing(second, `${h.name} after the update`);
        const first = parseSlots(serial);
        const after = parseSlots(serial.slice(matchAfter(serial, /installed version 2; rebooting/)));
        for (const s of [first, after]) {
          expect(s?.facts.hostname, `${h.name}: ${JSON.stringify(s?.facts)}`).toBe(h.name);
          expect(s?.facts.machine_id).toBe(p?.machineId);
          // Secure Boot enforcing, user mode, exactly the fleet's PK, KEK and db.
          expect(s?.facts).toMatchObject({ secure_boot: '1', setup_mode: '0', esl_PK: await esl('pk'), esl_KEK: await esl('kek'), esl_db: await esl('db') });
        }
        // Slot A as the stick wrote it, slot B as the update wrote it: byte for byte the releases'.
        expect(first?.facts).toMatchObject(await slotDigests(v1.bundle, p?.machineId ?? '', 'a'));
        expect(after?.facts).toMatchObject(await slotDigests(v2.bundle, p?.machineId ?? '', 'b'));
        if (h.name === 'fleet-static') expect(after?.facts.ipv4?.trim()).toBe('10.0.2.20/24');
        expect(after?.var_marker).toMatch(/^boot-[0-9a-f-]{36}$/);
        expect(after?.var_marker).toBe(first?.var_marker);
        expect(after?.booted, serial.slice(-4000)).toBe('B');
        expect(after?.version).toBe('2');
        expect(after?.health).toBe('success');
        expect(after?.state.B).toMatchObject({ state: 'booted', boot: 'good' });
        expect((await fleet.getDevice(h.name)).actions.find((a) => a.releaseId === up2.release.id)?.state).toBe('success');
      }
    } finally {
      await Promise.all(Object.values(watches).map((w) => w.stop()));
    }
  }, 2_400_000);

  it('lamadist recovery-key HOST, from the stick, opens every container of that host, whose provisioning keyslot is gone', async () => {
    for (const h of HOSTS) {
      const r = await runCli(['recovery-key', h.name, '--keys', keys, '--escrow', stick]);
      expect(r.code, r.stderr).toBe(0);
      const key = path.join(dir, `${h.name}.recovery`);
      await fs.writeFile(key, r.stdout.trim(), { mode: 0o600 });
      const m = machines[h.name] as FleetMachine;
      const gpt = (await readGpt(m.disk)).table;
      const p = provisioned.find((x) => x.host === h.name);
      for (const l of p?.luks ?? []) {
        const part = gpt.partitions.find((x) => x.name === l.label);
        expect(part, l.label).toBeDefined();
        // The keyslots live in the first 16 MiB: that much of the partition is the whole header.
        const header = path.join(dir, `${h.name}-${l.label}.hdr`);
        const fh = await fs.open(m.disk, 'r');
        const buf = Buffer.alloc(16 * MiB);
        await fh.read(buf, 0, buf.length, Number(part?.firstLba ?? 0n) * 512);
        await fh.close();
        await fs.writeFile(header, buf);
        expect(tool('cryptsetup', ['luksUUID', header]).out.trim()).toBe(l.uuid);
        // First boot replaced the provisioning keyslot (1) with a TPM2 one; the recovery keyslot (0) stays.
        const dump = tool('cryptsetup', ['luksDump', header]).out;
        expect(dump, l.label).toContain('systemd-tpm2');
        expect(dump).toMatch(/^\s+0: luks2$/m);
        const test = tool('cryptsetup', ['open', '--test-passphrase', '--key-file', key, header]);
        expect(test.code, `${h.name} ${l.label}: ${test.out}`).toBe(0);
      }
    }
  }, 300_000);

  // Acceptance 3's PCR 11 and PCR 7 cases share one boot of fleet-static (each boot costs minutes
  // of TCG): each check judges its own register, with its own reason, and PCR 10 still holds.
  it('a UKI the fleet signed with another command line fails on PCR 11; one more certificate in db keeps the disk sealed until the recovery key is typed and fails on PCR 7; a rollout that requires attestation holds the host back', async () => {
    const m = machines['fleet-static'] as FleetMachine;
    const esp = (await readGpt(m.disk)).table.partitions.find((x) => x.name === 'esp');
    const offset = Number(esp?.firstLba ?? 0n) * 512;
    // The booted slot's UKI as the update wrote it, with one more kernel argument, signed with the fleet's db key.
    const current = await readEspFile(m.disk, offset, '/EFI/Linux/lamadist-b.efi');
    const line = `${inspectUki(current).cmdline ?? ''} lamadist.test=other-line`;
    const other = path.join(dir, 'other-line.efi');
    await fs.writeFile(other, signPe(setUkiCmdline(stripSignature(current), line), await signingPair(keys, 'secureboot-db')));
    const copied = tool('mcopy', ['-o', '-i', `${m.disk}@@${offset}`, other, '::/EFI/Linux/lamadist-b.efi']);
    expect(copied.code, copied.out).toBe(0);
    // Secure Boot stays enforcing and the UKIs still verify against the fleet's db certificate,
    // but PCR 7 measures a db with another certificate beside it.
    const extra = path.join(dir, 'pcr7-keys');
    expect((await runCli(['keys', 'init', extra])).code).toBe(0);
    await makeOvmfVars({
      template: m.vars,
      out: m.vars,
      force: true,
      pk: await keyPath(keys, 'secureboot-pk-cert'),
      kek: await keyPath(keys, 'secureboot-kek-cert'),
      db: [await keyPath(keys, 'secureboot-db-cert'), await keyPath(extra, 'secureboot-db-cert')],
    });
    const recovery = (await fs.readFile(path.join(dir, 'fleet-static.recovery'), 'utf8')).trim();
    const tty = new PassThrough();
    // cryptsetup flushes what was typed before its prompt: the operator waits for it.
    const onLine = (l: string): void => {
      if (/asking for the recovery key/.test(l)) setTimeout(() => tty.write(`${recovery}\n`), 5_000);
    };
    const w = watchDevice(m, { timeoutMs: 900_000, serialLog: path.join(dir, 'pcr7-pcr11.log'), onLine, input: tty });
    try {
      const verdict = lineAt(w, await w.waitFor(ATTEST_VERDICT));
      expect(w.serial()).toContain('lamadist.test=other-line');
      expect(w.serial()).toMatch(/no TPM2 token or provisioning key opens .*; asking for the recovery key/);
      expect(verdict, w.serial().slice(-3000)).toMatch(/the server judged this device failed: PCR 7: .*; PCR 11: /);
    } finally {
      await w.stop();
      tty.end();
    }
    const a = (await fleet.getDevice('fleet-static')).attestation;
    expect(a.state).toBe('failed');
    expect(a.checks.map((c) => [c.pcr, c.ok])).toEqual([[7, false], [10, true], [11, false]]);
    expect(a.checks.find((c) => c.pcr === 7)?.reason).toMatch(/db holds 2 entries that differ from the fleet's db certificates/);
    expect(a.checks.find((c) => c.pcr === 11)?.reason).toMatch(/which no UKI of the release the device runs leaves/);
    const up1 = await fleet.uploadRelease(v1.bundle);
    const rollout = await fleet.createRollout({ releaseId: up1.release.id, name: 'attested hosts only', filter: { tags: ['fleet'] }, requireAttestation: true });
    expect(rollout.heldBack).toEqual(['fleet-static']);
  }, 1_000_000);

  it('after enrollment the firmware refuses a UKI signed by a key that is not the fleet\'s', async () => {
    const other = path.join(dir, 'other-keys');
    expect((await runCli(['keys', 'init', other])).code).toBe(0);
    const ours = await fs.readFile(provisioned[1]?.outputs.ukis.a as string);
    const foreign = signPe(stripSignature(ours), await signingPair(other, 'secureboot-db'));
    const disk = path.join(dir, 'foreign.img');
    const gpt = planGpt({ partitions: [{ name: 'esp', typeGuid: 'c12a7328-f81f-11d2-ba4b-00a0c93ec93b', size: 100 * MiB }] });
    const fh = await fs.open(disk, 'w+');
    await fh.truncate(Number(gpt.diskSectors) * 512);
    await writeGpt(fh, gpt);
    await fh.close();
    const esp = gpt.partitions[0];
    const at = Number(esp?.firstLba ?? 0n) * 512;
    await buildEsp({ image: disk, offset: at, size: Number((esp?.lastLba ?? 0n) + 1n) * 512 - at, volumeId: '4c414d41', files: { '/EFI/BOOT/BOOTX64.EFI': foreign }, timestamp: 0 });
    const m = machines['fleet-dhcp'] as FleetMachine;
    const r = await runQemu({
      firmware: { code: OVMF.secbootCode, vars: m.vars },
      disks: [{ path: disk }],
      network: false,
      timeoutMs: 300_000,
      until: /Access Denied|Linux version/,
      serialLog: path.join(dir, 'foreign.log'),
    });
    expect(r.serial, r.serial.slice(-3000)).toMatch(/Access Denied/);
    expect(r.serial).not.toMatch(/Linux version/);
  }, 400_000);
});
