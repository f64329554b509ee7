/**
 * `npm run bench [name...]`: run every capability's benchmark (src/bench/<capability>.ts exporting
 * `run()`), or only the named ones. Each prints its own lines with ratios against the peer tool
 * measured in the same run. LAMADIST_BENCH_SCALE shrinks the data sizes.
 */

const BENCHES: Record<string, () => Promise<{ run: () => Promise<void> }>> = {
  boot: () => import('./boot.js'),
  check: () => import('./check.js'),
  disk: () => import('./disk.js'),
  ota: () => import('./ota.js'),
  rauc: () => import('./rauc.js'),
  server: () => import('./server.js'),
  vm: () => import('./vm.js'),
};

async function main(argv: string[]): Promise<number> {
  const wanted = argv.length > 0 ? argv : Object.keys(BENCHES);
  const unknown = wanted.filter((n) => !BENCHES[n]);
  if (unknown.length > 0) {
    process.stderr.write(`unknown benchmark(s): ${unknown.join(', ')} (known: ${Object.keys(BENCHES).join(', ')})\n`);
    return 2;
  }
  for (const name of wanted) {
    const load = BENCHES[name] as () => Promise<{ run: () => Promise<void> }>;
    await (await load()).run();
  }
  return 0;
}

process.exitCode = await main(process.argv.slice(2));
