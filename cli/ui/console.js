// cutover console: plain JavaScript, no build step. Everything shown comes
// from the console's JSON API (cli/src/ui.rs), which calls the coordinators
// with the user's certificate. Text is always set as text, never as HTML.
'use strict';

// The token `cutover ui` printed in the URL's fragment; kept for this tab
// only, and the fragment then becomes the page's route.
const TOKEN = (() => {
  const m = /(?:^#|&)token=([0-9a-f]+)/.exec(location.hash);
  if (m) {
    sessionStorage.setItem('cutover-token', m[1]);
    history.replaceState(null, '', '#/overview');
  }
  return sessionStorage.getItem('cutover-token') || '';
})();

let who = { can_act: false, identity: '', role: '' };
let refreshTimer = null;
let stream = null;

// ---- small helpers -------------------------------------------------------

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else if (k === 'class') el.className = v;
    // Through the CSSOM: the page's CSP refuses style attributes.
    else if (k === 'style') el.style.cssText = v;
    else el.setAttribute(k, v === true ? '' : v);
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

const badge = (text, cls) => h('span', { class: `badge ${cls || text}` }, text);
const when = (ms) => (ms ? new Date(ms).toLocaleString() : '–');
const ago = (ms) => {
  if (!ms) return '–';
  const s = Math.max(0, (Date.now() - ms) / 1000);
  if (s < 90) return `${Math.round(s)} s ago`;
  if (s < 5400) return `${Math.round(s / 60)} min ago`;
  if (s < 172800) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} d ago`;
};
const dur = (ms) => {
  if (ms === undefined || ms === null) return '–';
  if (ms < 1000) return `${Math.round(ms)} ms`;
  if (ms < 120000) return `${(ms / 1000).toFixed(1)} s`;
  return `${(ms / 60000).toFixed(1)} min`;
};
const bytes = (n) => {
  const u = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${u[i]}`;
};
const table = (heads, rows) =>
  h('table', {}, h('thead', {}, h('tr', {}, heads.map((t) => h('th', {}, t)))), h('tbody', {}, rows));

async function api(path, options) {
  const res = await fetch(path, {
    ...(options || {}),
    headers: { 'x-cutover-token': TOKEN, ...((options || {}).headers || {}) },
  });
  const body = await res.json().catch(() => ({}));
  if (!res.ok) throw new Error(body.error || `${res.status} ${res.statusText}`);
  return body;
}

function flash(text, isError) {
  const el = document.getElementById('flash');
  el.textContent = text;
  el.className = isError ? 'flash error' : 'flash';
  el.hidden = false;
  clearTimeout(flash.timer);
  flash.timer = setTimeout(() => { el.hidden = true; }, 6000);
}

function show(...nodes) {
  const main = document.getElementById('main');
  main.replaceChildren(...nodes);
}

// ---- pages ----------------------------------------------------------------

async function overview() {
  const { cluster, agents } = await api('/api/overview');
  const members = cluster.members.map((m) =>
    h('tr', {}, h('td', {}, `node ${m.node_id}`), h('td', { class: 'mono' }, m.address), h('td', {}, m.role),
      h('td', {}, m.leader ? badge('leader') : '')));
  const regions = {};
  for (const a of agents) (regions[a.region] = regions[a.region] || []).push(a);
  const agentRows = Object.keys(regions).sort().flatMap((r) => regions[r].map((a) =>
    h('tr', { 'data-region': a.region }, h('td', {}, a.region), h('td', {}, a.cluster), h('td', {}, badge(a.state)),
      h('td', {}, ago(a.since_unix_ms)), h('td', { class: 'mono' }, a.version))));
  show(
    h('h1', {}, 'Regions and coordinators'),
    h('div', { class: 'card' },
      h('h2', {}, 'Agents'),
      table(['Region', 'Cluster', 'Agent', 'Since', 'Version'], agentRows)),
    h('div', { class: 'card' },
      h('h2', {}, 'Coordinators'),
      h('p', { class: 'muted' },
        `leader node ${cluster.leader_id || 'none'} · term ${cluster.term} · committed ${cluster.commit_index} · applied ${cluster.applied_index} (node ${cluster.node_id})`),
      table(['Node', 'Address', 'Role', ''], members)),
  );
}

function colorCell(colors, name) {
  const c = (colors || []).find((x) => x.color === name);
  if (!c) return h('td', { class: 'muted' }, '–');
  // An empty color is idle, not failing.
  if (!c.image) return h('td', { class: 'muted' }, 'empty');
  return h('td', {}, h('div', { class: 'mono' }, c.image),
    h('div', { class: 'muted' }, `${c.replicas_ready}/${c.replicas_desired} ready · `,
      c.healthy ? 'healthy' : h('span', { style: 'color: var(--red)' }, 'unhealthy')));
}

async function apps() {
  const list = await api('/api/apps');
  if (!list.length) return show(h('h1', {}, 'Apps'), h('p', { class: 'muted' }, 'No apps yet: cutover apps apply'));
  show(h('h1', {}, 'Apps'), ...list.map((app) => {
    const waves = ((app.spec || {}).waves || []).map((w) => w.join(', ')).join(' → ');
    const rows = app.status.clusters.map((s) => h('tr', { 'data-app': app.name, 'data-region': s.region },
      h('td', {}, s.region), h('td', {}, s.cluster), h('td', {}, badge(s.agent)),
      h('td', {}, s.active && s.active !== '-' ? badge(s.active) : h('span', { class: 'muted' }, 'none')),
      colorCell(s.colors, 'blue'), colorCell(s.colors, 'green'),
      h('td', {}, s.maintenance ? badge('maintenance', 'waiting') : '', ago(s.last_switch_unix_ms))));
    return h('div', { class: 'card' },
      h('h2', {}, app.name),
      waves ? h('p', { class: 'muted' }, `waves: ${waves}`) : '',
      table(['Region', 'Cluster', 'Agent', 'Active', 'Blue', 'Green', 'Last switch'], rows));
  }));
}

const opDuration = (op) =>
  (op.state === 'running' || op.state === 'pending' ? Date.now() : op.updated_at_unix_ms) - op.created_at_unix_ms;

async function operations() {
  const ops = await api('/api/operations');
  const rows = ops.map((op) => h('tr', { class: 'link', 'data-operation': op.id, onclick: () => { location.hash = `#/operations/${op.id}`; } },
    h('td', { class: 'mono' }, op.id), h('td', {}, op.kind), h('td', {}, op.app || '–'),
    h('td', {}, badge(op.state), op.awaiting_gate ? [' ', badge(`gate ${op.awaiting_gate}`, 'waiting')] : '', op.paused ? [' ', badge('paused', 'waiting')] : ''),
    h('td', {}, op.created_by), h('td', {}, ago(op.created_at_unix_ms)), h('td', {}, dur(opDuration(op)))));
  show(h('h1', {}, 'Operations'), h('div', { class: 'card' },
    table(['Operation', 'Kind', 'App', 'State', 'By', 'Started', 'Duration'], rows)));
}

// The gate results a task recorded: each probe and the load probe.
function checks(task) {
  const out = (task.result || {}).outputs || {};
  if (!out.report) return null;
  let report;
  try { report = JSON.parse(out.report); } catch (e) { return null; }
  const items = (report.probes || []).map((p) =>
    h('li', { class: p.passed ? 'pass' : 'fail' }, `${p.passed ? 'pass' : 'FAIL'} ${p.name}: ${p.detail || ''} (${p.millis} ms)`));
  if (report.load) {
    const l = report.load;
    items.push(h('li', { class: l.passed ? 'pass' : 'fail' },
      `${l.passed ? 'pass' : 'FAIL'} load: ${l.requests} requests, ${l.errors} errors, p95 ${(l.p95_ms || 0).toFixed(1)} ms, p99 ${(l.p99_ms || 0).toFixed(1)} ms`,
      (l.violations || []).length ? ` (${l.violations.join('; ')})` : ''));
  }
  return items.length ? h('ul', { class: 'checks' }, items) : null;
}

function timeline(op) {
  const start = op.created_at_unix_ms;
  const end = Math.max(Date.now() * (op.state === 'running' ? 1 : 0), op.updated_at_unix_ms,
    ...op.tasks.map((t) => t.finished_at_unix_ms || 0));
  const span = Math.max(1, end - start);
  let waves = [];
  try { waves = JSON.parse((op.params || {}).waves || '[]'); } catch (e) { waves = []; }
  const regionOf = (t) => t.target.split('/')[0];
  const row = (t) => {
    const from = t.created_at_unix_ms || start;
    const to = t.finished_at_unix_ms || (t.state === 'running' || t.state === 'pending' ? Date.now() : from);
    const left = ((from - start) / span) * 100;
    const width = ((to - from) / span) * 100;
    const message = t.result ? t.result.message.split('\n')[0] : (t.progress.length ? t.progress[t.progress.length - 1].message : '');
    return h('tr', { 'data-task-kind': t.kind, 'data-task-state': t.state },
      h('td', {}, t.kind), h('td', {}, t.target), h('td', {}, badge(t.state)), h('td', {}, dur(to - from)),
      h('td', { class: 'bar' }, h('div', { class: 'track' },
        h('span', { class: t.state, style: `left:${left.toFixed(2)}%;width:${Math.max(width, 0.3).toFixed(2)}%` }))),
      h('td', {}, message, checks(t)));
  };
  const heads = ['Step', 'Cluster', 'State', 'Duration', 'Timeline', 'Result'];
  const groups = [];
  const placed = new Set();
  waves.forEach((regions, i) => {
    const tasks = op.tasks.filter((t) => regions.includes(regionOf(t)));
    tasks.forEach((t) => placed.add(t.task_id));
    const gate = i + 1;
    const gateState = op.promoted_gates.includes(gate) ? badge('promoted', 'passed')
      : op.awaiting_gate === gate ? badge('waiting for promotion', 'waiting') : null;
    groups.push(h('div', { class: 'wave', 'data-wave': gate }, `Wave ${gate}: ${regions.join(', ')} `,
      (op.params || {}).promotion === 'manual' ? ['· promotion gate ', gateState || badge('not reached', 'pending')] : ''));
    groups.push(tasks.length ? table(heads, tasks.map(row)) : h('p', { class: 'muted' }, 'no step yet'));
  });
  const rest = op.tasks.filter((t) => !placed.has(t.task_id));
  if (rest.length) {
    if (waves.length) groups.push(h('div', { class: 'wave' }, 'Other steps'));
    groups.push(table(heads, rest.map(row)));
  }
  return h('div', { class: 'timeline' }, groups);
}

async function act(op, action) {
  const words = {
    promote: `Promote ${op.id} past gate ${op.awaiting_gate}? The next wave's traffic switches.`,
    pause: `Pause ${op.id}? No new step starts until it is resumed.`,
    resume: `Resume ${op.id}?`,
    abort: `Abort ${op.id}? Every region it switched is switched back.`,
    rollback: `Roll ${op.app} back to its previous color in every region?`,
  };
  if (!window.confirm(words[action])) return;
  try {
    if (action === 'rollback') {
      const r = await api(`/api/apps/${encodeURIComponent(op.app)}/rollback`, { method: 'POST' });
      flash(`rollback started: ${r.operation_id}`);
      location.hash = `#/operations/${r.operation_id}`;
    } else {
      const updated = await api(`/api/operations/${encodeURIComponent(op.id)}/${action}`, { method: 'POST' });
      flash(`${op.id}: ${action} accepted`);
      renderOperation(updated);
    }
  } catch (e) {
    flash(`${action} refused: ${e.message}`, true);
  }
}

function actions(op) {
  // A viewer gets the same page without any button (the coordinators would
  // refuse its writes anyway).
  if (!who.can_act) return null;
  const live = op.state === 'running' || op.state === 'pending';
  const button = (action, label, enabled, cls) =>
    h('button', { 'data-action': action, class: cls, disabled: !enabled, onclick: () => act(op, action) }, label);
  return h('div', { class: 'actions' },
    button('promote', 'Promote', live && op.awaiting_gate > 0, 'primary'),
    button('pause', 'Pause', live && !op.paused),
    button('resume', 'Resume', live && op.paused),
    button('abort', 'Abort', live, 'danger'),
    op.app && (op.kind === 'deploy' || op.kind === 'switch') ? button('rollback', 'Rollback', !live, 'danger') : null);
}

function renderOperation(op) {
  if (!location.hash.endsWith(op.id)) return;
  show(
    h('h1', {}, `${op.kind} ${op.app || ''}`),
    h('div', { class: 'card', 'data-operation': op.id, 'data-state': op.state },
      h('p', {}, badge(op.state), ' ', h('span', { class: 'mono' }, op.id), ' · by ', op.created_by,
        ' · started ', when(op.created_at_unix_ms), ' · ', dur(opDuration(op)),
        (op.params || {}).image ? [' · image ', h('span', { class: 'mono' }, op.params.image)] : ''),
      op.awaiting_gate ? h('div', { class: 'banner', 'data-awaiting-gate': op.awaiting_gate },
        `Waiting at promotion gate ${op.awaiting_gate}: promote to switch wave ${op.awaiting_gate}.`) : null,
      op.paused ? h('div', { class: 'banner' }, 'Paused: no new step starts until it is resumed.') : null,
      op.summary ? h('p', { class: 'summary' }, op.summary) : null,
      op.aborted_by ? h('p', {}, `aborted by ${op.aborted_by}`) : null,
      actions(op)),
    h('div', { class: 'card' }, h('h2', {}, 'Steps'), timeline(op)),
  );
}

async function operationPage(id) {
  renderOperation(await api(`/api/operations/${encodeURIComponent(id)}`));
  // Live from WatchOperation; the browser reconnects a broken stream.
  stream = new EventSource(`/api/operations/${encodeURIComponent(id)}/events?token=${TOKEN}`);
  stream.addEventListener('operation', (e) => renderOperation(JSON.parse(e.data)));
  stream.addEventListener('end', () => { stream.close(); stream = null; });
}

async function releases() {
  const list = await api('/api/releases');
  show(h('h1', {}, 'Releases and attestations'), ...list.map((a) => h('div', { class: 'card' },
    h('h2', {}, a.app),
    a.releases.length ? table(['Image', 'Migrations', 'Reversible', 'By', 'Created', 'Attestations'], a.releases.map((r) =>
      h('tr', { 'data-release': r.image }, h('td', { class: 'mono' }, r.image), h('td', {}, r.newest_version ? `to version ${r.newest_version} (${r.files.length} files)` : 'none'),
        h('td', {}, r.reversible ? 'yes' : 'no'), h('td', {}, r.created_by), h('td', {}, when(r.created_at_unix_ms)),
        h('td', {}, r.attestations.length ? h('ul', { class: 'checks' }, r.attestations.map((t) =>
          h('li', {}, `${t.check} = ${t.value} (${t.attested_by})`))) : h('span', { class: 'muted' }, 'none')))))
      : h('p', { class: 'muted' }, 'no release: cutover release create'))));
}

async function audit() {
  const events = await api('/api/audit');
  show(h('h1', {}, 'Audit log'), h('div', { class: 'card' }, table(['#', 'When', 'Actor', 'Action', 'Parameters', 'Outcome'],
    events.map((e) => h('tr', {}, h('td', {}, e.sequence), h('td', {}, when(e.at_unix_ms)), h('td', {}, e.actor),
      h('td', {}, e.action), h('td', { class: 'mono' }, e.parameters.length > 160 ? `${e.parameters.slice(0, 160)}…` : e.parameters),
      h('td', {}, e.outcome))))));
}

// RTO and RPO of passed drills over time, as an SVG line chart.
function drillChart(drills) {
  const points = drills.filter((d) => d.passed && d.rto_ms !== null).slice().reverse();
  const ns = 'http://www.w3.org/2000/svg';
  const svg = document.createElementNS(ns, 'svg');
  svg.setAttribute('class', 'chart');
  svg.setAttribute('viewBox', '0 0 400 160');
  svg.setAttribute('preserveAspectRatio', 'none');
  const text = (x, y, s) => { const t = document.createElementNS(ns, 'text'); t.setAttribute('x', x); t.setAttribute('y', y); t.textContent = s; svg.append(t); };
  if (points.length === 0) { text(12, 80, 'no passed drill yet'); return svg; }
  const max = Math.max(1, ...points.map((d) => Math.max(d.rto_ms || 0, d.rpo_ms || 0)));
  const x = (i) => (points.length === 1 ? 200 : 30 + (i * 360) / (points.length - 1));
  const y = (v) => 145 - (v / max) * 125;
  for (const [key, cls] of [['rto_ms', 'rto'], ['rpo_ms', 'rpo']]) {
    const line = document.createElementNS(ns, 'polyline');
    line.setAttribute('class', cls);
    line.setAttribute('points', points.map((d, i) => `${x(i)},${y(d[key] || 0)}`).join(' '));
    svg.append(line);
  }
  text(4, 16, dur(max));
  text(4, 150, '0');
  text(30, 158, new Date(points[0].started_at_unix_ms).toLocaleDateString());
  return svg;
}

async function dr() {
  const { backups, drills } = await api('/api/dr');
  const backupRows = backups.map((b) => {
    const v = b.validations[b.validations.length - 1];
    return h('tr', {}, h('td', { class: 'mono' }, b.id), h('td', {}, b.app), h('td', {}, `${b.region}/${b.cluster}`),
      h('td', {}, b.database), h('td', {}, bytes(b.size_bytes)), h('td', {}, ago(b.finished_at_unix_ms)),
      h('td', {}, b.trigger), h('td', {}, v ? badge(v.passed ? 'passed' : 'failed') : h('span', { class: 'muted' }, 'not validated')));
  });
  show(
    h('h1', {}, 'Backups and disaster recovery'),
    h('div', { class: 'card' }, h('h2', {}, 'Backups'),
      backups.length ? table(['Backup', 'App', 'Cluster', 'Database', 'Size', 'Taken', 'Trigger', 'Validated'], backupRows)
        : h('p', { class: 'muted' }, 'no backup yet: cutover backup create')),
    h('div', { class: 'grid' }, drills.map((a) => h('div', { class: 'card' },
      h('h2', {}, `Drills: ${a.app}`),
      a.schedule ? h('p', { class: 'muted' }, `schedule ${a.schedule.cron} · next ${when(a.schedule.next_slot_unix_ms)}`) : null,
      h('div', { class: 'legend' }, h('span', { class: 'rto' }, '— RTO'), h('span', { class: 'rpo' }, '— RPO')),
      drillChart(a.drills),
      a.drills.length ? table(['When', 'Region', 'Result', 'RTO', 'RPO', 'Source'], a.drills.slice(0, 10).map((d) =>
        h('tr', {}, h('td', {}, when(d.started_at_unix_ms)), h('td', {}, d.region),
          h('td', {}, badge(d.passed ? 'passed' : 'failed'), d.passed ? '' : ` at ${d.verdict}`),
          h('td', {}, dur(d.rto_ms)), h('td', {}, dur(d.rpo_ms)), h('td', {}, d.source))))
        : h('p', { class: 'muted' }, 'no drill yet: cutover dr drill')))),
  );
}

// ---- routing ----------------------------------------------------------------

const PAGES = { overview, apps, operations, releases, audit, dr };

async function route() {
  clearInterval(refreshTimer);
  if (stream) { stream.close(); stream = null; }
  const path = location.hash.replace(/^#\/?/, '') || 'overview';
  const [page, id] = path.split('/');
  for (const a of document.querySelectorAll('nav a')) a.classList.toggle('active', a.dataset.page === page);
  try {
    if (page === 'operations' && id) {
      await operationPage(id);
    } else {
      const render = PAGES[page] || overview;
      await render();
      // Lists refresh every 2 s; an operation's page is live instead.
      refreshTimer = setInterval(() => render().catch((e) => flash(e.message, true)), 2000);
    }
  } catch (e) {
    show(h('h1', {}, 'Cannot load this page'), h('p', { class: 'error' }, e.message));
  }
}

async function start() {
  if (!TOKEN) {
    show(h('h1', {}, 'No console token'), h('p', {}, 'Open the URL that `cutover ui` printed.'));
    return;
  }
  try {
    who = await api('/api/whoami');
  } catch (e) {
    show(h('h1', {}, 'Cannot reach the console'), h('p', {}, e.message));
    return;
  }
  document.getElementById('who').replaceChildren(who.identity, ' ', badge(who.role));
  window.addEventListener('hashchange', route);
  route();
}

start();
