import { UserError } from '../errors.js';

/**
 * Rollout planning and wave decisions as pure data. The service layer applies these decisions in
 * database transactions; everything here is deterministic and unit-tested without a server.
 */

/** One wave: a number of devices, or a percentage of all targeted devices (rounded up). */
export type WaveSpec = { count: number } | { percent: number };

/** Which devices a rollout targets. Every given criterion must hold; an empty list matches no device. */
export interface TargetFilter {
  /** Devices carrying all of these tags. */
  tags?: string[];
  /** Devices whose reported or assigned attributes equal these values. */
  attributes?: Record<string, string>;
  /** BSP name (src/bsp). */
  bsp?: string;
  /** Explicit controller ids. */
  devices?: string[];
}

/** The device fields a filter looks at. */
export interface FilterableDevice {
  controllerId: string;
  tags: readonly string[];
  attributes: Readonly<Record<string, string>>;
  bsp: string | null;
}

/** Action states. Open ones are offered to the device on its next poll. */
export type ActionState =
  | 'scheduled'
  | 'pending'
  | 'running'
  | 'installed'
  | 'success'
  | 'failed'
  | 'rolled_back'
  | 'canceling'
  | 'canceled';

export const OPEN_STATES: readonly ActionState[] = ['pending', 'running'];
export const FAILED_STATES: readonly ActionState[] = ['failed', 'rolled_back'];
export const DONE_STATES: readonly ActionState[] = ['success', 'failed', 'rolled_back', 'canceled'];

/**
 * Parse a wave list such as `1,10%,50%`: each entry is a wave size, a count or a percentage of all
 * targets; devices left over after the listed waves form one last wave.
 */
export function parseWaves(text: string): WaveSpec[] {
  const out: WaveSpec[] = [];
  for (const raw of text.split(',')) {
    const s = raw.trim();
    const pct = /^(\d+(?:\.\d+)?)%$/.exec(s);
    if (pct && pct[1] !== undefined) {
      const percent = Number(pct[1]);
      if (percent <= 0 || percent > 100) throw new UserError('LAMA_E_ROLLOUT_WAVES', `wave '${s}' must be a percentage in (0, 100]`);
      out.push({ percent });
    } else if (/^\d+$/.test(s) && Number(s) > 0) {
      out.push({ count: Number(s) });
    } else {
      throw new UserError('LAMA_E_ROLLOUT_WAVES', `wave '${s}' must be a device count (e.g. 5) or a percentage (e.g. 10%)`);
    }
  }
  return out;
}

/** Wave sizes for `total` targets. Never an empty wave; the sizes sum to `total`. */
export function planWaveSizes(total: number, waves: readonly WaveSpec[]): number[] {
  const sizes: number[] = [];
  let left = total;
  for (const w of waves) {
    if (left === 0) break;
    const want = 'count' in w ? w.count : Math.ceil((w.percent / 100) * total);
    const n = Math.min(left, Math.max(1, want));
    sizes.push(n);
    left -= n;
  }
  if (left > 0) sizes.push(left);
  return sizes;
}

/** True when the device satisfies every criterion of the filter. */
export function matchesFilter(d: FilterableDevice, f: TargetFilter): boolean {
  if (f.devices && !f.devices.includes(d.controllerId)) return false;
  if (f.bsp !== undefined && d.bsp !== f.bsp) return false;
  if (f.tags && (f.tags.length === 0 || !f.tags.every((t) => d.tags.includes(t)))) return false;
  if (f.attributes) {
    for (const [k, v] of Object.entries(f.attributes)) if (!Object.hasOwn(d.attributes, k) || d.attributes[k] !== v) return false;
  }
  return true;
}

/**
 * Refuse a filter with an empty device or tag list or an empty BSP. Such a filter matches no
 * device, and it is almost always a list that a script computed and that came out empty: naming
 * the field is more use than "no targets", and far safer than reading it as "no criterion" (which
 * once rolled the release out to the whole tenant).
 */
export function checkFilter(f: TargetFilter): void {
  for (const key of ['devices', 'tags'] as const) {
    if (f[key]?.length === 0) throw new UserError('LAMA_E_ROLLOUT_FILTER', `filter.${key} is an empty list, which matches no device; leave it out to not filter by ${key}`);
  }
  if (f.bsp === '') throw new UserError('LAMA_E_ROLLOUT_FILTER', 'filter.bsp is empty, which matches no device; leave it out to not filter by BSP');
}

/**
 * Assign targets to waves in a stable order (by controller id) so re-planning after a crash or on
 * another server yields the same groups.
 */
export function assignWaves<T extends { controllerId: string }>(targets: readonly T[], sizes: readonly number[]): T[][] {
  const sorted = [...targets].sort((a, b) => (a.controllerId < b.controllerId ? -1 : a.controllerId > b.controllerId ? 1 : 0));
  const out: T[][] = [];
  let i = 0;
  for (const n of sizes) {
    out.push(sorted.slice(i, i + n));
    i += n;
  }
  return out;
}

/** Counts of one wave's actions by state. */
export type WaveCounts = Partial<Record<ActionState, number>>;

export type WaveDecision = 'wait' | 'next-wave' | 'finish' | 'pause';

/**
 * What a running rollout does after a change in its current wave: pause when failures exceed the
 * error threshold (percent of the wave), start the next wave once the successes reach the success
 * threshold, finish when the last wave has no open action left.
 */
export function decideWave(
  counts: WaveCounts,
  opts: { successThreshold: number; errorThreshold: number; isLastWave: boolean; checkErrors: boolean },
): WaveDecision {
  const total = Object.values(counts).reduce((a, b) => a + (b ?? 0), 0);
  if (total === 0) return opts.isLastWave ? 'finish' : 'next-wave';
  const failed = (counts.failed ?? 0) + (counts.rolled_back ?? 0);
  const success = counts.success ?? 0;
  if (opts.checkErrors && failed > 0 && (failed * 100) / total > opts.errorThreshold) return 'pause';
  const open = total - success - failed - (counts.canceled ?? 0);
  if (opts.isLastWave) return open === 0 ? 'finish' : 'wait';
  return (success * 100) / total >= opts.successThreshold ? 'next-wave' : 'wait';
}

/** DDI `HH:MM:SS` from seconds. */
export function formatSleep(seconds: number): string {
  const s = Math.max(0, Math.floor(seconds));
  const pad = (n: number): string => String(n).padStart(2, '0');
  return `${pad(Math.floor(s / 3600))}:${pad(Math.floor((s % 3600) / 60))}:${pad(s % 60)}`;
}
