import { describe, expect, it } from 'vitest';
import { assignWaves, checkFilter, decideWave, formatSleep, matchesFilter, parseWaves, planWaveSizes } from '../../src/server/rollout.js';

describe('rollout planning', () => {
  it('parses wave lists and refuses nonsense with a clear code', () => {
    expect(parseWaves('1, 10%,50%')).toEqual([{ count: 1 }, { percent: 10 }, { percent: 50 }]);
    for (const bad of ['0', '-1', '110%', 'abc', '', '5%%']) expect(() => parseWaves(bad), bad).toThrow(/LAMA_E_ROLLOUT_WAVES|wave/);
  });

  it('sizes waves by count or percentage of all targets, never empty, remainder in a last wave', () => {
    expect(planWaveSizes(10, [{ count: 1 }, { percent: 25 }])).toEqual([1, 3, 6]);
    expect(planWaveSizes(3, [{ count: 5 }, { percent: 50 }])).toEqual([3]);
    expect(planWaveSizes(7, [{ percent: 1 }, { percent: 100 }])).toEqual([1, 6]);
    expect(planWaveSizes(4, [])).toEqual([4]);
    expect(planWaveSizes(0, [{ count: 1 }])).toEqual([]);
  });

  it('assigns targets to waves in a stable order', () => {
    const t = ['d', 'a', 'c', 'b'].map((controllerId) => ({ controllerId }));
    expect(assignWaves(t, [1, 3]).map((w) => w.map((d) => d.controllerId))).toEqual([['a'], ['b', 'c', 'd']]);
  });

  it('matches filters on tags, attributes, BSP and ids', () => {
    const d = { controllerId: 'n1', tags: ['lab', 'rack2'], attributes: { site: 'home' }, bsp: 'x86_64' };
    expect(matchesFilter(d, {})).toBe(true);
    expect(matchesFilter(d, { tags: ['lab', 'rack2'], attributes: { site: 'home' }, bsp: 'x86_64', devices: ['n1'] })).toBe(true);
    expect(matchesFilter(d, { tags: ['lab', 'rack3'] })).toBe(false);
    expect(matchesFilter(d, { attributes: { site: 'work' } })).toBe(false);
    expect(matchesFilter(d, { bsp: 'rk1' })).toBe(false);
    expect(matchesFilter(d, { devices: ['n2'] })).toBe(false);
    // An empty list is a criterion no device meets, never "no criterion".
    expect(matchesFilter(d, { devices: [] })).toBe(false);
    expect(matchesFilter(d, { tags: [] })).toBe(false);
    expect(matchesFilter(d, { bsp: '' })).toBe(false);
    expect(matchesFilter({ ...d, attributes: {} }, { attributes: { toString: 'x' } })).toBe(false);
  });

  it('refuses filters with an empty list or BSP, naming the field', () => {
    expect(() => checkFilter({ devices: [] })).toThrow(/LAMA_E_ROLLOUT_FILTER|filter\.devices is an empty list/);
    expect(() => checkFilter({ tags: [], devices: ['n1'] })).toThrow(/filter\.tags is an empty list/);
    expect(() => checkFilter({ bsp: '' })).toThrow(/filter\.bsp is empty/);
    expect(() => checkFilter({ devices: ['n1'], tags: ['lab'], attributes: {} })).not.toThrow();
  });

  it('decides waves by success and error thresholds', () => {
    const o = { successThreshold: 80, errorThreshold: 10, isLastWave: false, checkErrors: true };
    expect(decideWave({ pending: 5 }, o)).toBe('wait');
    expect(decideWave({ success: 4, installed: 1 }, o)).toBe('next-wave');
    expect(decideWave({ success: 3, installed: 2 }, o)).toBe('wait');
    expect(decideWave({ success: 9, rolled_back: 1 }, o)).toBe('next-wave');
    expect(decideWave({ success: 8, rolled_back: 2 }, o)).toBe('pause');
    expect(decideWave({ success: 8, failed: 2 }, { ...o, checkErrors: false })).toBe('next-wave');
    expect(decideWave({ success: 1, installed: 1 }, { ...o, isLastWave: true })).toBe('wait');
    expect(decideWave({ success: 1, canceled: 1 }, { ...o, isLastWave: true })).toBe('finish');
    expect(decideWave({}, { ...o, isLastWave: true })).toBe('finish');
  });

  it('formats DDI polling sleep as HH:MM:SS', () => {
    expect(formatSleep(300)).toBe('00:05:00');
    expect(formatSleep(3 * 3600 + 61)).toBe('03:01:01');
  });
});
