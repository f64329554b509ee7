/**
 * A software TPM 2.0 (swtpm) driven with tpm2-tools, for the quotes that attestation tests and the
 * quote fuzz target start from: real TPM output, made the way the device's agent makes it.
 */
import { promises as fs } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { spawn, type ChildProcess } from 'node:child_process';
import { onCleanup } from '../util/cleanup.js';
import { missingTool, run, type RunResult } from '../util/proc.js';

export interface Swtpm {
  /** TPM2TOOLS_TCTI for programs that talk to this TPM themselves (the device's agent in tests). */
  tcti: string;
  /** Run a tpm2-tools command against this TPM (transient objects are flushed afterwards). */
  tool(cmd: string, args: readonly string[]): Promise<RunResult>;
  /** Power-cycle the TPM: PCRs start again from zero, persistent keys stay. */
  reboot(): Promise<void>;
  close(): Promise<void>;
}

function portsFree(port: number): Promise<boolean> {
  const one = (p: number): Promise<boolean> =>
    new Promise((resolve) => {
      const s = net.createServer();
      s.once('error', () => resolve(false));
      s.listen(p, '127.0.0.1', () => s.close(() => resolve(true)));
    });
  return one(port).then((a) => a && one(port + 1));
}

async function connectable(port: number, child: ChildProcess, ms: number): Promise<void> {
  const until = Date.now() + ms;
  for (;;) {
    if (child.exitCode !== null) throw new Error(`swtpm exited with ${child.exitCode}`);
    const ok = await new Promise<boolean>((resolve) => {
      const c = net.connect(port, '127.0.0.1', () => c.end(() => resolve(true)));
      c.once('error', () => resolve(false));
    });
    if (ok) return;
    if (Date.now() > until) throw new Error(`swtpm did not listen on ${port} within ${ms} ms`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/**
 * Start swtpm (TPM 2.0, state in `dir/state`) on two consecutive TCP ports, as tpm2-tools' swtpm
 * TCTI expects: commands on the port, control on the next one.
 */
export async function startSwtpm(dir: string): Promise<Swtpm> {
  const state = path.join(dir, 'state');
  await fs.mkdir(state, { recursive: true });
  for (let attempt = 1; ; attempt++) {
    const port = 20000 + Math.floor(Math.random() * 20000) * 2;
    if (!(await portsFree(port))) {
      if (attempt === 20) throw new Error('no two consecutive free TCP ports found for swtpm');
      continue;
    }
    const child = spawn(
      'swtpm',
      [
        'socket', '--tpm2', '--tpmstate', `dir=${state}`,
        '--server', `type=tcp,port=${port},bindaddr=127.0.0.1`,
        '--ctrl', `type=tcp,port=${port + 1},bindaddr=127.0.0.1`,
        '--flags', 'not-need-init,startup-clear',
      ],
      { stdio: 'ignore' },
    );
    // Killed with lamadist (or the test run) if nobody closes it.
    const unregister = onCleanup(() => {
      if (child.exitCode === null) child.kill('SIGKILL');
    });
    const spawned = new Promise<never>((_, reject) => child.once('error', (e: NodeJS.ErrnoException) => reject(e.code === 'ENOENT' ? missingTool('swtpm') : e)));
    try {
      await Promise.race([connectable(port, child, 10_000), spawned]);
    } catch (err) {
      // swtpm exits at once when another process took a port between the check and its bind.
      const lostPort = child.exitCode !== null;
      child.kill('SIGKILL');
      unregister();
      if (lostPort && attempt < 20) continue;
      throw err;
    }
    const tcti = `swtpm:host=127.0.0.1,port=${port}`;
    const env = { ...process.env, TPM2TOOLS_TCTI: tcti };
    // Without a resource manager every transient object stays loaded; swtpm holds only three.
    const tool = async (cmd: string, args: readonly string[]): Promise<RunResult> => {
      try {
        return await run(cmd, args, { env, cwd: dir });
      } finally {
        await run('tpm2_flushcontext', ['-t'], { env, allowFailure: true });
      }
    };
    return {
      tcti,
      tool,
      async reboot() {
        // An orderly shutdown first: a TPM reset without one counts against dictionary-attack lockout.
        await tool('tpm2_shutdown', ['-c']);
        // swtpm's control channel: CMD_INIT (2) with no flags resets the TPM as a power cycle would.
        const answer = await new Promise<Buffer>((resolve, reject) => {
          const c = net.connect(port + 1, '127.0.0.1', () => c.write(Buffer.from([0, 0, 0, 2, 0, 0, 0, 0])));
          c.once('data', (d) => {
            c.end();
            resolve(d);
          });
          c.once('error', reject);
        });
        if (answer.length < 4 || answer.readUInt32BE(0) !== 0) throw new Error(`swtpm CMD_INIT answered ${answer.toString('hex')}`);
        await tool('tpm2_startup', ['-c']);
      },
      close: () =>
        new Promise<void>((resolve) => {
          unregister();
          if (child.exitCode !== null) return resolve();
          child.once('exit', () => resolve());
          child.kill('SIGTERM');
        }),
    };
  }
}

export type AkKind = 'ecdsa' | 'rsassa' | 'rsapss';

/**
 * An attestation key under the endorsement hierarchy (`tpm2_createek` + `tpm2_createak`, as the
 * device's agent makes it), made persistent at `handle` so it outlives reboots. The EK is ECC for an
 * ECDSA AK and RSA otherwise, unless `ek` says. Returns the handle to quote with, the AK's
 * TPM2B_PUBLIC and name, and the EK's TPM2B_PUBLIC.
 */
export async function createAk(tpm: Swtpm, dir: string, kind: AkKind, handle: number, ek: 'rsa' | 'ecc' = kind === 'ecdsa' ? 'ecc' : 'rsa'): Promise<{ context: string; public: Buffer; name: Buffer; ekPublic: Buffer }> {
  const name = `ak-${handle.toString(16)}`;
  const ekCtx = path.join(dir, `${name}-ek.ctx`);
  const context = path.join(dir, `${name}.ctx`);
  const pub = path.join(dir, `${name}.pub`);
  const ekPub = path.join(dir, `${name}-ek.pub`);
  const akName = path.join(dir, `${name}.name`);
  await tpm.tool('tpm2_createek', ['-c', ekCtx, '-G', ek, '-u', ekPub]);
  await tpm.tool('tpm2_createak', ['-C', ekCtx, '-c', context, '-G', kind === 'ecdsa' ? 'ecc' : 'rsa', '-g', 'sha256', '-s', kind, '-u', pub, '-n', akName]);
  const persistent = `0x${handle.toString(16)}`;
  await tpm.tool('tpm2_evictcontrol', ['-C', 'o', '-c', context, persistent]);
  return { context: persistent, public: await fs.readFile(pub), name: await fs.readFile(akName), ekPublic: await fs.readFile(ekPub) };
}

/**
 * `tpm2_quote -g sha256 -l sha256:<pcrs>` with `nonce`: the TPMS_ATTEST, the TPMT_SIGNATURE and the
 * PCR values it covers. `scheme` must be the AK's own when it has one (tpm2_quote defaults RSA to RSASSA).
 */
export async function quote(tpm: Swtpm, dir: string, ak: string, nonce: Buffer, pcrs: readonly number[], scheme?: AkKind): Promise<{ quote: Buffer; signature: Buffer; pcrs: Record<number, Buffer> }> {
  const msg = path.join(dir, 'quote.msg');
  const sig = path.join(dir, 'quote.sig');
  // The PCR values are printed only when they are also written out (-o).
  const out = path.join(dir, 'quote.pcrs');
  const r = await tpm.tool('tpm2_quote', ['-c', ak, '-g', 'sha256', '-l', `sha256:${pcrs.join(',')}`, '-q', nonce.toString('hex'), '-m', msg, '-s', sig, '-o', out, ...(scheme ? [`--scheme=${scheme}`] : [])]);
  const values: Record<number, Buffer> = {};
  for (const m of r.stdout.matchAll(/^\s+(\d+)\s*: 0x([0-9A-Fa-f]{64})$/gm)) values[Number(m[1])] = Buffer.from(m[2] as string, 'hex');
  return { quote: await fs.readFile(msg), signature: await fs.readFile(sig), pcrs: values };
}

/** Extend `pcr` of the SHA-256 bank with `digest`. */
export async function extendPcr(tpm: Swtpm, pcr: number, digest: Buffer): Promise<void> {
  await tpm.tool('tpm2_pcrextend', [`${pcr}:sha256=${digest.toString('hex')}`]);
}

/**
 * Manufacture a software TPM in `dir` (its state in `dir/state`, for `startSwtpm(dir)`) the way
 * swtpm_setup does for a VM: RSA and ECC endorsement keys, each with an EK certificate in its NV
 * index, issued by swtpm_localca from the local CA in `caDir` (made on first use: a root and an
 * issuing CA below it). Nothing is read from or written to /etc or /var/lib. Returns the CA bundle
 * (issuing CA and root, PEM) that EK certificates of this CA chain to.
 */
export async function manufactureSwtpm(dir: string, caDir: string): Promise<{ caBundle: string }> {
  await fs.mkdir(path.join(dir, 'state'), { recursive: true });
  await fs.mkdir(caDir, { recursive: true });
  const conf = path.join(caDir, 'swtpm-localca.conf');
  const options = path.join(caDir, 'swtpm-localca.options');
  const setup = path.join(caDir, 'swtpm_setup.conf');
  await fs.writeFile(conf, [`statedir = ${caDir}`, `signingkey = ${caDir}/signkey.pem`, `issuercert = ${caDir}/issuercert.pem`, `certserial = ${caDir}/certserial`, ''].join('\n'));
  await fs.writeFile(options, '--platform-manufacturer LamaDist\n--platform-version 2.1\n--platform-model test\n');
  await fs.writeFile(setup, [`create_certs_tool = swtpm_localca`, `create_certs_tool_config = ${conf}`, `create_certs_tool_options = ${options}`, 'active_pcr_banks = sha256', ''].join('\n'));
  await run('swtpm_setup', ['--tpm2', '--tpmstate', path.join(dir, 'state'), '--create-ek-cert', '--config', setup, '--overwrite']);
  const caBundle = path.join(caDir, 'ek-ca.pem');
  const pems = await Promise.all(['issuercert.pem', 'swtpm-localca-rootca-cert.pem'].map((f) => fs.readFile(path.join(caDir, f), 'utf8')));
  await fs.writeFile(caBundle, pems.join(''));
  return { caBundle };
}
