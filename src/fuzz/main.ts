import os from 'node:os';
import path from 'node:path';
import { UserError } from '../errors.js';
import { formatTotal, fuzz } from './index.js';

/**
 * `npm run fuzz [-- --seed S --cases N --target a,b --case N --peer-every K --cli N --results DIR]`.
 * The default size (seed 1, 1000 cases per target, every fifth also asked of the peer tool) takes about
 * four minutes on two cores. Exit 1
 * when any case failed; its input is saved under --results and printed with the command that
 * reproduces it.
 */

const USAGE =
  'usage: npm run fuzz -- [--seed N] [--cases N] [--target NAME,...] [--case N] [--peer-every N] [--cli N] [--results DIR]';

function parseArgs(argv: string[]): Parameters<typeof fuzz>[0] {
  const o: Parameters<typeof fuzz>[0] = {
    seed: 1,
    cases: 1000,
    peerEvery: 5,
    cliCases: 3,
    results: path.join(os.tmpdir(), 'lamadist-fuzz-results'),
    log: (line) => process.stdout.write(line + '\n'),
  };
  const num = (flag: string, v: string | undefined): number => {
    if (v === undefined || !/^\d+$/.test(v))
      throw new UserError('LAMA_E_USAGE', `${flag} needs a whole number\n${USAGE}`);
    return Number(v);
  };
  for (let i = 0; i < argv.length; i++) {
    const flag = argv[i] as string;
    const v = argv[i + 1];
    i++;
    if (flag === '--seed') o.seed = num(flag, v);
    else if (flag === '--cases') o.cases = num(flag, v);
    else if (flag === '--case') o.only = num(flag, v);
    else if (flag === '--peer-every') o.peerEvery = num(flag, v);
    else if (flag === '--cli') o.cliCases = num(flag, v);
    else if (flag === '--target') o.targets = (v ?? '').split(',').filter(Boolean);
    else if (flag === '--results' && v) o.results = path.resolve(v);
    else throw new UserError('LAMA_E_USAGE', `unknown argument ${flag}; ${USAGE}`);
  }
  return o;
}

async function main(argv: string[]): Promise<number> {
  try {
    const report = await fuzz(parseArgs(argv));
    process.stdout.write(formatTotal(report) + '\n');
    return report.failures > 0 ? 1 : 0;
  } catch (err) {
    if (err instanceof UserError) {
      process.stderr.write(`fuzz: ${err.message}\n`);
      return 2;
    }
    throw err;
  }
}

process.exitCode = await main(process.argv.slice(2));
