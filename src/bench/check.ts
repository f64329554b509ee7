import { readdirSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { performance } from 'node:perf_hooks';
import { findKasSchema } from '../check/index.js';
import { loadKasFile, loadKasSchema, validateKasFile, type KasFile } from '../kas/index.js';
import { run as runTool } from '../util/proc.js';

/**
 * kas schema validation: the toolkit (ajv) against Python's jsonschema, the validator kas itself
 * uses, each validating the repository's kas files the same number of times in its own process.
 */

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');

const PEER = `
import json, sys, time, yaml, jsonschema
schema = json.load(open(sys.argv[1]))
n = int(sys.argv[2])
docs = [yaml.safe_load(open(f)) for f in sys.argv[3:]]
v = jsonschema.Draft7Validator(schema)
t = time.perf_counter()
for _ in range(n):
    for d in docs:
        list(v.iter_errors(d))
print((time.perf_counter() - t) * 1000)
`;

function kasPaths(dir: string): string[] {
  return readdirSync(dir, { withFileTypes: true }).flatMap((e) =>
    e.isDirectory() ? kasPaths(path.join(dir, e.name)) : /\.ya?ml$/.test(e.name) ? [path.join(dir, e.name)] : [],
  );
}

/** Print one line: our validation time, the peer's, and the ratio. */
export async function run(): Promise<void> {
  const scale = Number(process.env.LAMADIST_BENCH_SCALE ?? '1') || 1;
  const rounds = Math.max(5, Math.round(500 * scale));
  const schemaFile = await findKasSchema(ROOT);
  const schema = await loadKasSchema(schemaFile);
  const paths = kasPaths(path.join(ROOT, 'kas'));
  const files: KasFile[] = await Promise.all(paths.map((p) => loadKasFile(p, ROOT)));
  let problems = 0;
  const t0 = performance.now();
  for (let i = 0; i < rounds; i++) for (const f of files) problems += validateKasFile(f, schema).length;
  const ours = performance.now() - t0;
  const r = await runTool('/usr/bin/python3', ['-c', PEER, schemaFile, String(rounds), ...paths]);
  const peer = Number(r.stdout.trim());
  const n = rounds * files.length;
  process.stdout.write(
    `check: kas schema validation, ${n} validations (${files.length} files × ${rounds}, ${problems} problems): ` +
      `lamadist ${ours.toFixed(0)} ms, python3-jsonschema ${peer.toFixed(0)} ms, ratio ${(peer / ours).toFixed(1)}× faster\n`,
  );
}
