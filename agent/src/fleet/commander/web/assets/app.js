// The fleet page: renders the server's snapshots (server-sent events, one
// shared Consul watch on the server) and posts the controls. No framework,
// no build step; every string from Consul goes in as text, never as HTML.
'use strict';

const CSRF = document.querySelector('meta[name="csrf-token"]').content;
const READ_ONLY = document.querySelector('meta[name="read-only"]').content === 'true';
const $ = (id) => document.getElementById(id);

// Exposed for the browser tests and for curious commanders.
const stats = (window.fleetStats = { snapshots: 0, version: 0, lastRenderMs: 0, lastPaintMs: 0, hosts: 0, bytes: 0, actions: 0 });

let snap = null;        // the last snapshot
let receivedAt = 0;     // Date.now() when it arrived
let rows = [];          // host rows (arrays, see snap.host_fields)
let hay = [];           // lowercase search text per row
let view = [];          // indexes of rows after filter and sort
let sortCol = 0, sortDir = 1;
const F = { host: 0, tier: 1, build: 2, desired: 3, phase: 4, state: 5, error: 6, updated: 7, bucket: 8 };
const ROW_H = 22;

function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  if (attrs) {
    for (const k in attrs) {
      const v = attrs[k];
      if (v == null || v === false) continue;
      if (k === 'class') e.className = v;
      else if (k === 'text') e.textContent = v;
      else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
      // Through the CSSOM: the CSP (style-src 'self') blocks style attributes.
      else if (k === 'width') e.style.width = v;
      else e.setAttribute(k, v === true ? '' : v);
    }
  }
  for (const c of kids) if (c != null && c !== false) e.append(c instanceof Node ? c : String(c));
  return e;
}

function serverNow() {
  return snap ? snap.generated_at + (Date.now() - receivedAt) / 1000 : Date.now() / 1000;
}

function fmtAge(secs) {
  secs = Math.max(0, Math.round(secs));
  if (secs < 60) return secs + 's';
  const m = Math.floor(secs / 60), s = secs % 60;
  if (m < 60) return m + 'm ' + s + 's';
  const h = Math.floor(m / 60);
  if (h < 48) return h + 'h ' + (m % 60) + 'm';
  return Math.floor(h / 24) + 'd ' + (h % 24) + 'h';
}

function fmtTime(t) {
  if (!t) return '-';
  const d = new Date(t * 1000);
  return d.toISOString().replace('T', ' ').replace(/\.\d+Z$/, ' UTC') + ' (' + fmtAge(serverNow() - t) + ' ago)';
}

function pct(n, d) { return d ? (100 * n / d) : 0; }

// ---- live data ----

function connect() {
  const es = new EventSource('/api/events');
  es.addEventListener('open', () => setConn(true));
  es.addEventListener('error', () => setConn(false));
  es.addEventListener('snapshot', (ev) => onSnapshot(ev.data, Number(ev.lastEventId)));
}

function setConn(up) {
  const c = $('conn');
  c.textContent = up ? 'live' : 'reconnecting';
  c.className = 'pill ' + (up ? 'live' : 'down');
}

function onSnapshot(data, version) {
  const t0 = performance.now();
  snap = JSON.parse(data);
  receivedAt = Date.now();
  rows = snap.hosts;
  hay = rows.map((r) => [r[0], r[1], r[2], r[3], r[4], r[5], r[6]].join(' ').toLowerCase());
  renderAll();
  stats.snapshots++;
  stats.version = version || stats.version + 1;
  stats.hosts = rows.length;
  stats.bytes = data.length;
  stats.lastRenderMs = performance.now() - t0;
  requestAnimationFrame(() => setTimeout(() => { stats.lastPaintMs = performance.now() - t0; }, 0));
}

function renderAll() {
  renderHeader();
  renderTiers();
  renderProblems();
  renderFilters();
  applyFilter();
}

function renderHeader() {
  const ce = $('consul-error');
  ce.hidden = !snap.error;
  ce.textContent = snap.error ? 'Consul: ' + snap.error + ' (showing the last data read)' : '';
  const f = $('freeze');
  f.hidden = !snap.freeze;
  if (snap.freeze) {
    f.className = 'pill frozen';
    f.textContent = 'FROZEN' + (snap.freeze.reason ? ': ' + snap.freeze.reason : '');
  }
  $('totals').textContent = rows.length + ' hosts, ' + snap.tiers.length + ' tiers';
  $('updated').textContent = 'updated ' + new Date(snap.generated_at * 1000).toLocaleTimeString();
}

function renderTiers() {
  const box = $('tiers');
  box.replaceChildren(...(snap.tiers.length ? snap.tiers.map(tierCard) : [el('p', { class: 'muted', text: 'Nothing published under ' + snap.app + ' and no host reports yet.' })]));
}

function tierCard(t) {
  const s = t.summary;
  const frozen = !!snap.freeze;
  const card = el('article', { class: 'tier', id: 'tier-' + t.tier, 'data-tier': t.tier, 'data-index': t.modify_index });
  card.append(el('h2', null, t.tier,
    el('span', { class: 'pill percent-pill', text: t.percent + '%' }),
    frozen ? el('span', { class: 'pill frozen', text: 'FROZEN' }) : null));
  const dl = el('dl');
  const row = (k, v, cls) => dl.append(el('dt', { text: k }), el('dd', { class: cls, text: v }));
  row('Build', t.build || '(nothing published)', 'build');
  row('Percent', t.percent + '%', 'percent');
  row('Previous', t.previous || '-', 'previous');
  row('Published', fmtTime(t.published_at), 'published');
  row('Freeze', frozen ? 'frozen' + (snap.freeze.by ? ' by ' + snap.freeze.by : '') + (snap.freeze.reason ? ': ' + snap.freeze.reason : '') + (snap.freeze.at ? ', ' + fmtAge(serverNow() - snap.freeze.at) + ' ago' : '') : 'not frozen', 'freeze-state');
  if (t.rolled_back_from) row('Rolled back from', t.rolled_back_from, 'rolled-back');
  row('Key', t.key + ' @ index ' + t.modify_index, 'key');
  row('Hosts', s.hosts + ' reporting, ' + s.converged + ' converged (' + s.converged_percent.toFixed(1) + '%), ' + s.on_target + ' on ' + (t.build || '-') + ', ' + s.failed.length + ' failed, ' + t.stale.length + ' stale', 'hosts');
  card.append(dl);
  if (t.problem) card.append(el('p', { class: 'banner error', text: t.problem }));
  const cmds = [...t.produced_by];
  if (snap.freeze) cmds.push(snap.freeze.cli);
  if (cmds.length) {
    card.append(el('div', { class: 'muted', text: 'Written by' }), el('div', { class: 'cmds produced' }, ...cmds.map((c) => el('code', { text: c }))));
  }
  card.append(controls(t));
  if (t.steps.length) {
    card.append(el('div', { class: 'muted', text: 'Converged per step of this rollout (' + (t.build || '') + ')' }));
    const bars = el('div', { class: 'bars steps' });
    for (const st of t.steps) {
      const p = pct(st.converged, st.hosts);
      bars.append(
        el('span', { text: st.percent + '%' + (st.percent === t.percent ? ' ◀' : '') }),
        el('div', { class: 'bar' + (st.reached ? '' : ' future'), title: st.reached ? 'converged on ' + t.build : 'not reached yet; already on ' + t.build }, el('i', { width: p.toFixed(1) + '%' })),
        el('span', { class: 'step-text', 'data-step': st.percent, text: st.reached ? st.converged + '/' + st.hosts + ' (' + p.toFixed(0) + '%)' : 'not yet: ' + st.converged + '/' + st.hosts + ' on it' }));
    }
    card.append(bars);
  }
  card.append(el('div', { class: 'cols' },
    el('div', null, el('div', { class: 'muted', text: 'Per build' }), breakdown(s.per_build, s.hosts, 'build', 'per-build')),
    el('div', null, el('div', { class: 'muted', text: 'Per phase' }), breakdown(s.per_phase, s.hosts, 'phase', 'per-phase'))));
  return card;
}

function breakdown(map, total, kind, cls) {
  const bars = el('div', { class: 'bars ' + cls });
  const entries = Object.entries(map).sort((a, b) => b[1] - a[1]);
  for (const [k, n] of entries) {
    bars.append(el('span', { class: 'mono', text: k, title: k }),
      el('div', { class: 'bar ' + kind }, el('i', { width: pct(n, total).toFixed(1) + '%' })),
      el('span', { 'data-key': k, text: String(n) }));
  }
  if (!entries.length) bars.append(el('span', { class: 'muted', text: 'no hosts' }));
  return bars;
}

function controls(t) {
  const a = t.actions;
  const box = el('div', { class: 'controls' });
  const add = (kind, label, planned) => {
    const b = el('button', { type: 'button', class: kind, text: label, disabled: !planned || READ_ONLY,
      onclick: () => openConfirm(t, kind, planned) });
    box.append(b, planned ? el('code', { class: 'cli', text: planned.cli }) : el('span', { class: 'muted', text: reason(a, kind) }));
  };
  add('promote', a.promote ? 'Promote to ' + a.promote.percent + '%' : 'Promote', a.promote);
  add('rollback', a.rollback ? 'Roll back to ' + a.rollback.build : 'Roll back', a.rollback);
  if (a.unfreeze) add('unfreeze', 'Unfreeze', a.unfreeze);
  else add('freeze', 'Freeze', a.freeze);
  if (READ_ONLY) box.append(el('span'), el('span', { class: 'muted', text: 'read-only page: run the commands above' }));
  return box;
}

function reason(a, kind) {
  const r = a.unavailable.find((u) => u.startsWith(kind + ':'));
  return r ? r.slice(kind.length + 1).trim() : 'not available';
}

function renderProblems() {
  const failed = [], stale = [];
  for (const t of snap.tiers) {
    for (const f of t.summary.failed) failed.push([t.tier, f]);
    for (const s of t.stale) stale.push([t.tier, s]);
  }
  $('failed-count').textContent = failed.length;
  $('stale-count').textContent = stale.length;
  const now = serverNow();
  const cap = 200;
  $('failed').replaceChildren(...failed.slice(0, cap).map(([tier, f]) =>
    el('li', { 'data-host': f.host }, el('span', { class: 'host', text: f.host }), ' ',
      el('span', { class: 'muted', text: tier + ', ' + (f.build || '-') + ': ' }), f.error || '(no error text)')),
    failed.length > cap ? el('li', { class: 'muted', text: '… and ' + (failed.length - cap) + ' more (filter the table by state "failed")' }) : '');
  $('stale').replaceChildren(...stale.slice(0, cap).map(([tier, s]) =>
    el('li', { 'data-host': s.host }, el('span', { class: 'host', text: s.host }), ' ',
      el('span', { class: 'silent', text: 'silent for ' + fmtAge(s.silent_secs + (now - snap.generated_at)) }),
      el('span', { class: 'muted', text: ' · ' + tier + ', on ' + (s.build || '-') + ', ' + s.phase }))),
    stale.length > cap ? el('li', { class: 'muted', text: '… and ' + (stale.length - cap) + ' more' }) : '');
}

// ---- host table: filtered, sorted, virtualized ----

function renderFilters() {
  const fill = (id, values, all) => {
    const sel = $(id), cur = sel.value;
    const vs = [...new Set(values)].filter((v) => v != null).sort();
    sel.replaceChildren(el('option', { value: '', text: all }), ...vs.map((v) => el('option', { value: v, text: v })));
    sel.value = vs.includes(cur) ? cur : '';
  };
  fill('f-tier', rows.map((r) => r[F.tier]), 'all tiers');
  fill('f-build', rows.map((r) => r[F.build]), 'all builds');
  fill('f-phase', rows.map((r) => r[F.phase]), 'all phases');
}

function applyFilter() {
  const q = $('q').value.trim().toLowerCase();
  const tier = $('f-tier').value, build = $('f-build').value, phase = $('f-phase').value, state = $('f-state').value;
  const out = [];
  for (let i = 0; i < rows.length; i++) {
    const r = rows[i];
    if (tier && r[F.tier] !== tier) continue;
    if (build && r[F.build] !== build) continue;
    if (phase && r[F.phase] !== phase) continue;
    if (state && r[F.state] !== state) continue;
    if (q && !hay[i].includes(q)) continue;
    out.push(i);
  }
  if (sortCol !== 0 || sortDir !== 1) {
    out.sort((a, b) => {
      const x = rows[a][sortCol], y = rows[b][sortCol];
      return (x == null ? -1 : y == null ? 1 : x < y ? -1 : x > y ? 1 : 0) * sortDir;
    });
  }
  view = out;
  $('host-count').textContent = view.length === rows.length ? String(rows.length) : view.length + ' of ' + rows.length;
  $('spacer').style.height = view.length * ROW_H + 'px';
  drawRows();
}

let pool = [];
function drawRows() {
  const vp = $('viewport');
  const first = Math.max(0, Math.floor(vp.scrollTop / ROW_H) - 10);
  const count = Math.min(view.length - first, Math.ceil(vp.clientHeight / ROW_H) + 20);
  const box = $('rows');
  box.style.transform = 'translateY(' + first * ROW_H + 'px)';
  while (pool.length < count) {
    const r = el('div', { class: 'row' });
    for (let c = 0; c < 8; c++) r.append(el('span'));
    pool.push(r);
    box.append(r);
  }
  const now = serverNow();
  for (let k = 0; k < pool.length; k++) {
    const node = pool[k];
    if (k >= count) { node.hidden = true; continue; }
    node.hidden = false;
    const r = rows[view[first + k]];
    const cells = node.children;
    const vals = [r[F.host], r[F.tier] || '-', r[F.build] || '-', r[F.desired] || '-', r[F.phase], r[F.state], fmtAge(now - r[F.updated]) + ' ago', r[F.error] || ''];
    for (let c = 0; c < 8; c++) {
      if (cells[c].textContent !== vals[c]) cells[c].textContent = vals[c];
    }
    cells[5].className = 's-' + r[F.state];
    cells[7].title = r[F.error] || '';
    node.dataset.host = r[F.host];
  }
}

let filterTimer = 0;
function onFilterInput() {
  clearTimeout(filterTimer);
  filterTimer = setTimeout(applyFilter, 80);
}

// ---- controls ----

let pending = null;

function openConfirm(t, kind, planned) {
  // Captured now: the confirmation names what the commander saw, and the
  // server refuses if the key moved since.
  pending = { tier: t.tier, action: kind, expected_index: planned.expected_index, build: planned.build || null, percent: planned.percent, cli: planned.cli };
  const frozen = snap.freeze;
  const titles = { promote: 'Promote ' + t.tier, rollback: 'Roll back ' + t.tier, freeze: 'Freeze ' + snap.app, unfreeze: 'Unfreeze ' + snap.app };
  const texts = {
    promote: 'Tier ' + t.tier + ': build ' + t.build + ' from ' + t.percent + '% to ' + planned.percent + '% of hosts (others stay on ' + (t.previous || '-') + ').',
    rollback: 'Tier ' + t.tier + ': from build ' + t.build + ' (at ' + t.percent + '%) back to build ' + planned.build + ' for 100% of hosts. Hosts flip from their cold slot.',
    freeze: 'Every tier of ' + snap.app + ' stops starting deploys. Tier ' + t.tier + ' stays on build ' + t.build + ' at ' + t.percent + '%.',
    unfreeze: 'Hosts of ' + snap.app + ' resume. Tier ' + t.tier + ' goes on with build ' + t.build + ' at ' + t.percent + '%.' + (frozen && frozen.reason ? ' (Frozen for: ' + frozen.reason + ')' : ''),
  };
  $('c-title').textContent = titles[kind];
  $('c-text').textContent = texts[kind];
  $('c-cli').textContent = planned.cli;
  $('c-key').textContent = planned.key;
  $('c-index').textContent = String(planned.expected_index);
  $('c-reason-row').hidden = kind !== 'freeze';
  $('c-reason').value = '';
  $('c-ok').textContent = { promote: 'Promote to ' + planned.percent + '%', rollback: 'Roll back to ' + planned.build, freeze: 'Freeze', unfreeze: 'Unfreeze' }[kind];
  $('confirm').showModal();
}

async function confirmAction() {
  const p = pending;
  if (!p) return;
  pending = null;
  $('confirm').close();
  const body = { tier: p.tier, action: p.action, expected_index: p.expected_index, build: p.build, percent: p.action === 'promote' ? p.percent : null };
  if (p.action === 'freeze') body.reason = $('c-reason').value;
  showBanner('pending', p.action + ' ' + p.tier + '…');
  try {
    const r = await fetch('/api/action', {
      method: 'POST', credentials: 'same-origin',
      headers: { 'Content-Type': 'application/json', 'X-CSRF-Token': CSRF },
      body: JSON.stringify(body),
    });
    const j = await r.json().catch(() => ({ error: 'HTTP ' + r.status }));
    stats.actions++;
    if (r.ok && j.ok) showBanner('ok', 'Done: ' + j.message + '  (CLI: ' + j.cli + ')');
    else showBanner('error', (r.status === 409 ? 'Refused, the key changed since this page showed it: ' : 'Refused: ') + j.error);
  } catch (e) {
    showBanner('error', 'Request failed: ' + e);
  }
}

function showBanner(kind, text) {
  const b = $('banner');
  b.hidden = false;
  b.className = 'banner ' + kind;
  b.dataset.kind = kind;
  b.textContent = text;
}

function init() {
  $('q').addEventListener('input', onFilterInput);
  for (const id of ['f-tier', 'f-build', 'f-phase', 'f-state']) $(id).addEventListener('change', applyFilter);
  let raf = 0;
  $('viewport').addEventListener('scroll', () => { if (!raf) raf = requestAnimationFrame(() => { raf = 0; drawRows(); }); });
  $('thead').addEventListener('click', (ev) => {
    const c = ev.target.dataset && ev.target.dataset.col;
    if (c == null) return;
    const col = Number(c);
    sortDir = sortCol === col ? -sortDir : 1;
    sortCol = col;
    applyFilter();
  });
  $('c-cancel').addEventListener('click', () => { pending = null; $('confirm').close(); });
  $('c-ok').addEventListener('click', confirmAction);
  // Ages move with the clock, not only with Consul.
  setInterval(() => { if (snap) { renderProblems(); drawRows(); } }, 5000);
  connect();
}

init();
