// LamaDist fleet dashboard: plain JavaScript over the management API. The admin token lives in
// sessionStorage only, so closing the tab signs out.
/* global document, window, sessionStorage, location, fetch, Node */
'use strict';

const $ = (sel) => document.querySelector(sel);
const tokenKey = 'lamadist.adminToken';

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === 'class') e.className = v;
    else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const c of children.flat()) e.append(c instanceof Node ? c : document.createTextNode(c == null ? '' : String(c)));
  return e;
}

async function api(path, init) {
  const headers = Object.assign({ Authorization: 'Bearer ' + sessionStorage.getItem(tokenKey) }, (init && init.headers) || {});
  const res = await fetch(path, Object.assign({}, init, { headers }));
  if (res.status === 401) {
    sessionStorage.removeItem(tokenKey);
    route();
    throw new Error('signed out: the admin token was not accepted');
  }
  const body = res.headers.get('content-type')?.includes('json') ? await res.json() : await res.text();
  if (!res.ok) throw new Error((body && body.message) || res.statusText);
  return body;
}

function table(headers, rows) {
  return el('table', {}, el('thead', {}, el('tr', {}, headers.map((h) => el('th', {}, h)))), el('tbody', {}, rows));
}

function when(iso) {
  return iso ? new Date(iso).toLocaleString() : 'never';
}

function progressBar(states, size) {
  const ok = states.success || 0;
  const bad = (states.failed || 0) + (states.rolled_back || 0);
  const run = (states.pending || 0) + (states.running || 0) + (states.installed || 0) + (states.canceling || 0);
  const pct = (n) => (size ? (100 * n) / size : 0) + '%';
  // Widths go through the CSSOM: the Content-Security-Policy forbids inline style attributes.
  const part = (cls, n) => {
    const s = el('span', { class: cls });
    s.style.width = pct(n);
    return s;
  };
  return el('div', { class: 'bar', title: `${ok} ok, ${bad} failed, ${run} in progress of ${size}` }, part('ok', ok), part('bad', bad), part('run', run));
}

function rolloutTable(rollouts) {
  return table(['Rollout', 'Release', 'Status', 'Wave', 'Progress per wave'], rollouts.map((r) =>
    el('tr', { 'data-rollout': r.id },
      el('td', {}, `#${r.id} ${r.name}`),
      el('td', {}, r.releaseVersion),
      el('td', { class: 'status-' + r.status }, r.status),
      el('td', {}, `${r.currentWave + 1} / ${r.progress.length}`),
      el('td', {}, r.progress.map((w) => el('div', { class: 'wave' },
        el('span', { class: 'muted' }, `wave ${w.wave + 1}: `),
        Object.entries(w.states).map(([s, n]) => el('span', { class: 'state-' + s }, `${s} ${n} `)),
        progressBar(w.states, w.size))),
        r.heldBack.length ? el('div', { class: 'muted' }, 'held back (not attested): ' + r.heldBack.join(', ')) : []))));
}

/** A device's attestation verdict; the reason (which PCR, why) on hover and in the detail view. */
function attestation(a) {
  return el('td', { class: 'attest-' + a.state, title: a.reason }, a.state);
}

async function overview(view) {
  const [ov, devices, rollouts] = await Promise.all([api('/api/v1/overview'), api('/api/v1/devices'), api('/api/v1/rollouts')]);
  view.append(
    el('div', { class: 'cards' },
      el('div', { class: 'card' }, el('b', { id: 'total-devices' }, ov.total), 'devices'),
      Object.entries(ov.byStatus).map(([s, n]) => el('div', { class: 'card status-' + s }, el('b', {}, n), s)),
      Object.entries(ov.byVersion).map(([v, n]) => el('div', { class: 'card' }, el('b', {}, n), 'on ' + v))),
    el('h2', {}, 'Rollouts'), rolloutTable(rollouts.slice(0, 5)),
    el('h2', {}, 'Overdue devices'), ov.overdue.length ? el('p', {}, ov.overdue.join(', ')) : el('p', { class: 'muted' }, 'none'),
    el('h2', {}, 'Devices'),
    table(['Device', 'BSP', 'Version', 'Status', 'Attestation', 'Tags', 'Last seen'], devices.map((d) =>
      el('tr', { 'data-device': d.controllerId },
        el('td', {}, el('a', { href: '#/device/' + encodeURIComponent(d.controllerId) }, d.controllerId)),
        el('td', {}, d.bsp || ''),
        el('td', {}, d.version || 'unknown'),
        el('td', { class: 'status-' + d.status }, d.status),
        attestation(d.attestation),
        el('td', {}, d.tags.join(', ')),
        el('td', {}, when(d.lastSeen))))));
}

async function device(view, id) {
  const d = await api('/api/v1/devices/' + encodeURIComponent(id));
  view.append(
    el('h2', {}, `Device ${d.controllerId}`),
    table(['Name', 'BSP', 'Version', 'Status', 'Last seen'], [el('tr', {},
      el('td', {}, d.name), el('td', {}, d.bsp || ''), el('td', {}, d.version || 'unknown'),
      el('td', { class: 'status-' + d.status }, d.status), el('td', {}, when(d.lastSeen)))]),
    el('h2', {}, 'Attestation'),
    table(['Verdict', 'Checked', 'Attestation key', 'Reason'], [el('tr', {},
      attestation(d.attestation), el('td', {}, when(d.attestation.checkedAt)),
      el('td', { class: 'muted' }, d.attestation.akName || 'none'), el('td', {}, d.attestation.reason))]),
    el('h2', {}, 'Attributes'),
    table(['Name', 'Value'], Object.entries(d.attributes).map(([k, v]) => el('tr', {}, el('td', {}, k), el('td', {}, v)))),
    el('h2', {}, 'Action history'),
    table(['Action', 'Release', 'Rollout', 'State', 'Feedback'], d.actions.map((a) => el('tr', {},
      el('td', {}, '#' + a.id), el('td', {}, a.releaseVersion), el('td', {}, a.rolloutId ? '#' + a.rolloutId : ''),
      el('td', { class: 'state-' + a.state }, a.state),
      el('td', {}, a.history.map((h) => el('div', {}, `${when(h.time)} ${h.execution}/${h.finished} ${h.details.join('; ')}`)))))));
}

async function rollouts(view) {
  view.append(el('h2', {}, 'Rollouts'), rolloutTable(await api('/api/v1/rollouts')));
}

// The outcome of the last upload survives the re-render that shows the new release.
let uploadNotice = '';

async function releases(view) {
  const list = await api('/api/v1/releases');
  const file = el('input', { type: 'file', id: 'bundle', accept: '.raucb' });
  const status = el('span', { class: 'muted', id: 'upload-status' }, uploadNotice);
  const form = el('form', { class: 'inline', onsubmit: async (ev) => {
    ev.preventDefault();
    const f = file.files[0];
    if (!f) return;
    status.textContent = 'uploading and verifying…';
    try {
      const r = await api('/api/v1/releases?filename=' + encodeURIComponent(f.name), { method: 'POST', headers: { 'Content-Type': 'application/octet-stream' }, body: f });
      uploadNotice = `${r.created ? 'accepted' : 'already stored'}: ${r.release.version} (${r.release.compatible})`;
      route();
    } catch (e) {
      status.textContent = 'refused: ' + e.message;
    }
  } }, el('label', {}, 'Upload bundle ', file), el('button', { type: 'submit' }, 'Upload'), status);
  view.append(el('h2', {}, 'Upload a release'), form, el('h2', {}, 'Releases'),
    table(['ID', 'Version', 'Compatible', 'Format', 'Signer', 'Size', 'SHA-256'], list.map((r) => el('tr', {},
      el('td', {}, r.id), el('td', {}, r.version), el('td', {}, r.compatible), el('td', {}, r.format), el('td', {}, r.signer),
      el('td', {}, (r.size / 1048576).toFixed(1) + ' MiB'), el('td', {}, el('code', {}, r.sha256.slice(0, 16) + '…'))))));
}

async function route() {
  const view = $('#view');
  const err = $('#error');
  view.replaceChildren();
  err.hidden = true;
  const signedIn = Boolean(sessionStorage.getItem(tokenKey));
  $('#login').hidden = signedIn;
  $('#logout').hidden = !signedIn;
  if (!signedIn) return;
  const hash = location.hash.replace(/^#/, '') || '/';
  try {
    if (hash.startsWith('/device/')) await device(view, decodeURIComponent(hash.slice(8)));
    else if (hash === '/rollouts') await rollouts(view);
    else if (hash === '/releases') await releases(view);
    else await overview(view);
  } catch (e) {
    err.textContent = e.message;
    err.hidden = false;
  }
}

document.addEventListener('DOMContentLoaded', () => {
  $('#login-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    sessionStorage.setItem(tokenKey, $('#token').value.trim());
    $('#token').value = '';
    route();
  });
  $('#logout').addEventListener('click', () => {
    sessionStorage.removeItem(tokenKey);
    route();
  });
  window.addEventListener('hashchange', route);
  route();
});
