import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { chromium, type BrowserContext } from 'playwright-core';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { FleetClient } from '../../src/fleet/index.js';
import { startServer, type RunningServer } from '../../src/server/index.js';
import { REPO_ROOT } from '../helpers/cli.js';
import { SimDevice } from './ddi-sim.js';
import { makeBundle, makePki } from './fixtures.js';

describe('fleet dashboard in headless Chromium', () => {
  let dir: string;
  let server: RunningServer;
  let browser: BrowserContext;
  let token: string;
  let v2: string;

  beforeAll(async () => {
    dir = await fs.mkdtemp(path.join(os.tmpdir(), 'lamadist-dash-'));
    const pki = await makePki(dir);
    const v1 = await makeBundle(dir, { pki, compatible: 'lamadist-x86-64', version: '1.0.0' });
    v2 = await makeBundle(dir, { pki, compatible: 'lamadist-x86-64', version: '2.0.0' });
    server = await startServer({ store: path.join(dir, 'store'), listen: '127.0.0.1:0', keyring: pki.caCert, pollSeconds: 60 });
    token = (await fs.readFile(server.adminTokenFile as string, 'utf8')).trim();
    const fleet = new FleetClient({ url: server.url, token });
    const devices: SimDevice[] = [];
    for (let i = 1; i <= 4; i++) {
      const id = `rack-${i}`;
      const r = await fleet.registerDevice({ controllerId: id, bsp: 'x86_64', tags: ['rack'] });
      const d = new SimDevice(server.url, 'DEFAULT', id, { scheme: 'TargetToken', token: r.token });
      await d.putConfig(`${d.base}/configData`, { version: '0.9.0', boot_id: `${id}-1` });
      devices.push(d);
    }
    await fleet.registerDevice({ controllerId: 'never-seen', bsp: 'x86_64' });
    const rel = await fleet.uploadRelease(v1);
    await fleet.createRollout({ releaseId: rel.release.id, name: 'spring', filter: { tags: ['rack'] }, waves: [{ count: 2 }] });
    // Wave 1: one device boots the new version, one is still installing.
    for (const d of devices.slice(0, 2)) {
      const p = await d.poll();
      const dep = await d.deployment(p.links.deploymentBase?.href ?? '');
      await d.feedback(dep.id, 'closed', 'success', ['written to slot B']);
    }
    await devices[0]?.putConfig(`${devices[0].base}/configData`, { version: '1.0.0', boot_id: 'rack-1-2' });
    browser = await chromium.launchPersistentContext(path.join(dir, 'chromium-profile'), {
      executablePath: '/usr/bin/chromium',
      headless: true,
      args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'],
    });
  });

  afterAll(async () => {
    await browser?.close();
    await server?.close();
    await fs.rm(dir, { recursive: true, force: true });
  });

  it('lists the devices and the rollout progress per wave, shows device history and uploads a release', async () => {
    const page = await browser.newPage();
    const foreign: string[] = [];
    page.on('request', (r) => {
      if (!r.url().startsWith(server.url)) foreign.push(r.url());
    });
    const consoleErrors: string[] = [];
    page.on('console', (m) => {
      if (m.type() === 'error') consoleErrors.push(m.text());
    });
    await page.goto(`${server.url}/ui/`);
    await page.fill('#token', token);
    await page.click('#login-form button[type=submit]');
    await page.waitForSelector('tr[data-device]');
    expect(await page.locator('tr[data-device]').count()).toBe(5);
    expect(await page.textContent('#total-devices')).toBe('5');
    const row = page.locator('tr[data-device="rack-1"]');
    expect(await row.textContent()).toMatch(/1\.0\.0.*online/);
    // No device here speaks the attestation extension: each shows the verdict unknown.
    expect(await row.locator('td.attest-unknown').textContent()).toBe('unknown');
    expect(await page.locator('tr[data-device="never-seen"]').textContent()).toMatch(/registered/);
    const rollout = await page.locator('tr[data-rollout]').first().textContent();
    expect(rollout).toMatch(/spring/);
    expect(rollout).toMatch(/wave 1: .*success 1.*installed 1|wave 1: .*installed 1.*success 1/);
    expect(rollout).toMatch(/wave 2: scheduled 2/);
    await fs.mkdir(path.join(REPO_ROOT, 'test-output'), { recursive: true });
    await page.screenshot({ path: path.join(REPO_ROOT, 'test-output', 'server-dashboard.png'), fullPage: true });

    await page.click('a[href="#/device/rack-2"]');
    await page.waitForSelector('text=Action history');
    expect(await page.textContent('#view')).toMatch(/installed.*closed\/success written to slot B/s);

    await page.click('a[href="#/releases"]');
    await page.setInputFiles('#bundle', v2);
    await page.click('form.inline button[type=submit]');
    await page.waitForSelector('text=accepted: 2.0.0');
    await page.waitForSelector('td:text-is("2.0.0")');
    await page.screenshot({ path: path.join(REPO_ROOT, 'test-output', 'server-dashboard-releases.png'), fullPage: true });
    expect(foreign).toEqual([]);
    expect(consoleErrors.join("\n")).toBe("");
  });

  it('refuses a wrong admin token and shows the sign-in form again', async () => {
    const page = await browser.newPage();
    await page.goto(`${server.url}/ui/`);
    await page.fill('#token', 'not-the-token');
    await page.click('#login-form button[type=submit]');
    await page.waitForSelector('#login:not([hidden])');
    expect(await page.locator('tr[data-device]').count()).toBe(0);
  });
});
