import os from 'node:os';
import path from 'node:path';
import type { Command } from 'commander';
import { startServer, type RunningServer, type ServerOptions } from '../../server/index.js';
import { onCleanup } from '../../util/cleanup.js';
import { readUserFile } from '../../util/fsx.js';
import { act, intOption } from '../action.js';
import type { Context } from '../context.js';

export interface ServerCliOptions {
  db?: string;
  store?: string;
  listen?: string;
  keyring?: string;
  tlsCert?: string;
  tlsKey?: string;
  clientCa?: string;
  pollInterval?: number;
  publicUrl?: string;
  adminTokenFile?: string;
  bundleKey?: string;
  bundleCert?: string;
  maxBundleSize?: number;
  cacheMib?: number;
  versionAttribute?: string;
  bootIdAttribute?: string;
  keys?: string;
  ekCa?: string;
  log?: boolean;
}

/** Default artifact store: $XDG_DATA_HOME/lamadist/server (or ~/.local/share/lamadist/server). */
export function defaultStore(): string {
  return path.join(process.env.XDG_DATA_HOME ?? path.join(os.homedir(), '.local/share'), 'lamadist/server');
}

/**
 * `lamadist server`: start the update server and report where it listens. Resolves with the running
 * server; the CLI keeps it up until Ctrl-C/SIGTERM, when the cleanup handler closes it.
 */
export async function serve(ctx: Context, o: ServerCliOptions): Promise<RunningServer> {
  const store = path.resolve(o.store ?? defaultStore());
  const adminToken = o.adminTokenFile ? (await readUserFile(o.adminTokenFile, 'admin token file')).toString('utf8').trim() : undefined;
  const options: ServerOptions = {
    store,
    keyring: o.keyring ?? path.join(store, 'keyring.pem'),
    ...(o.db ? { db: o.db } : {}),
    ...(o.listen ? { listen: o.listen } : {}),
    ...(o.tlsCert ? { tlsCert: o.tlsCert } : {}),
    ...(o.tlsKey ? { tlsKey: o.tlsKey } : {}),
    ...(o.clientCa ? { clientCa: o.clientCa } : {}),
    ...(o.pollInterval !== undefined ? { pollSeconds: o.pollInterval } : {}),
    ...(o.publicUrl ? { publicUrl: o.publicUrl } : {}),
    ...(adminToken ? { adminToken } : {}),
    ...(o.bundleKey ? { bundleKey: o.bundleKey } : {}),
    ...(o.bundleCert ? { bundleCert: o.bundleCert } : {}),
    ...(o.maxBundleSize !== undefined ? { maxBundleBytes: o.maxBundleSize } : {}),
    ...(o.cacheMib !== undefined ? { cacheMiB: o.cacheMib } : {}),
    ...(o.versionAttribute ? { versionAttribute: o.versionAttribute } : {}),
    ...(o.bootIdAttribute ? { bootIdAttribute: o.bootIdAttribute } : {}),
    ...(o.keys ? { keys: o.keys } : {}),
    ...(o.ekCa ? { ekCa: o.ekCa } : {}),
    ...(o.log ? { log: true } : {}),
  };
  const server = await startServer(options);
  onCleanup(() => server.close());
  ctx.result(
    { url: server.url, store, adminTokenFile: server.adminTokenFile ?? null, db: o.db ?? `sqlite:${path.join(store, 'lamadist.db')}`, cacheMiB: server.cacheMiB },
    `listening on ${server.url}\n  dashboard: ${server.url}/ui/\n  OpenAPI:   ${server.url}/api/openapi.json\n  range-read cache: up to ${server.cacheMiB} MiB${
      server.adminTokenFile ? `\n  admin token: ${server.adminTokenFile}` : ''
    }`,
  );
  return server;
}

export function configure(cmd: Command): void {
  cmd
    .description('run the update server (hawkBit DDI device API, management API, dashboard)')
    .option('--db <url>', 'sqlite:PATH or postgres://USER:PASS@HOST/DB[?schema=NAME] (default: sqlite in the store)')
    .option('--store <dir>', `artifact directory (default ${defaultStore()})`)
    .option('--listen <addr>', 'HOST:PORT, :PORT or PORT (default 127.0.0.1:8080)')
    .option('--keyring <pem>', 'CA certificate(s) bundles must be signed under (default <store>/keyring.pem)')
    .option('--tls-cert <pem>', 'serve HTTPS with this certificate')
    .option('--tls-key <pem>', 'private key for --tls-cert')
    .option('--client-ca <pem>', 'accept device client certificates issued by this CA (CN = controller id)')
    .option('--poll-interval <seconds>', 'device polling interval (default 300)', intOption('--poll-interval'))
    .option('--public-url <url>', 'base URL in links sent to devices (behind a proxy)')
    .option('--admin-token-file <file>', 'admin token for the management API (default <store>/admin.token, created 0600)')
    .option('--bundle-key <pem>', 'server recipient key, to verify crypt bundles encrypted for it')
    .option('--bundle-cert <pem>', 'certificate matching --bundle-key')
    .option('--max-bundle-size <bytes>', 'largest accepted upload (default 8 GiB)', intOption('--max-bundle-size'))
    .option('--cache-mib <MiB>', 'memory for bundle blocks served to streaming devices (default: 1/8 of RAM, at most 1024; idle blocks are freed after 5 minutes; 0 = off)', intOption('--cache-mib'))
    .option('--version-attribute <name>', 'configData attribute with the running version (default version)')
    .option('--boot-id-attribute <name>', 'configData attribute with the kernel boot id (default boot_id)')
    .option('--keys <dir>', "fleet key directory: its Secure Boot PK/KEK/db are what attested devices' PCR 7 must show (docs/attestation.md)")
    .option('--ek-ca <pem>', "trusted EK CA certificates: pin a device's attestation key only when its TPM's EK certificate chains to one and credential activation binds the key to that EK (default: trust on first use)")
    .option('--log', 'log every request (JSON) to stderr')
    .action(
      act<ServerCliOptions>(async (ctx, _args, opts) => {
        await serve(ctx, opts);
        // Runs until a signal: main's handler runs the cleanup (closing the server) and exits 130.
        await new Promise<never>(() => undefined);
      }),
    );
}
