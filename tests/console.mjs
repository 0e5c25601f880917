// Drives the web console (`cutover ui`) in Debian's chromium through
// playwright-core, as a user would; run by tests/tests/console.rs.
//
//   node tests/console.mjs operator|viewer
//
// Environment: CONSOLE_URL (what `cutover ui` printed), PLAYWRIGHT_DIR (a
// node_modules holding playwright-core), CHROMIUM, SHOTS (a directory for
// screenshots), and for `operator` CUTOVER_BIN plus the CUTOVER_* connection
// variables, with which it starts a deploy. Prints `key=value` lines for the
// Rust test and exits non-zero on the first expectation that fails.
import { createRequire } from 'node:module';
import { execFileSync } from 'node:child_process';
import path from 'node:path';

const mode = process.argv[2];
const require = createRequire(path.join(process.env.PLAYWRIGHT_DIR, 'x.js'));
const { chromium } = require('playwright-core');

const url = process.env.CONSOLE_URL;
const shots = process.env.SHOTS;
const base = url.slice(0, url.indexOf('#'));

function fail(message) {
  throw new Error(message);
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  // Root in CI: chromium's sandbox needs an unprivileged user.
  args: ['--no-sandbox'],
});
const consoleErrors = [];
try {
  const page = await browser.newPage({ viewport: { width: 1360, height: 860 } });
  page.setDefaultTimeout(60_000);
  // Any error the page logs (a refused script, a CSP violation, a thrown
  // exception) fails the run.
  page.on('console', (m) => { if (m.type() === 'error') consoleErrors.push(m.text()); });
  page.on('pageerror', (e) => consoleErrors.push(String(e)));
  const noErrors = () => {
    if (consoleErrors.length) fail(`the page logged errors: ${consoleErrors.join(' | ')}`);
  };
  const shot = (name) => page.screenshot({ path: path.join(shots, `console-${name}.png`), fullPage: true });
  const visit = async (route, ready) => {
    await page.evaluate((r) => { location.hash = r; }, route);
    await page.waitForSelector(ready);
  };

  await page.goto(url);
  // The token left the address bar once read.
  await page.waitForFunction(() => !location.href.includes('token='), null, { timeout: 10_000 })
    .catch(() => fail(`the token stays in the address bar: ${page.url()}`));
  noErrors();
  await page.waitForFunction((who) => document.getElementById('who').textContent.includes(who),
    mode === 'operator' ? 'operator/admin' : 'viewer/');
  // Regions: both agents up.
  await page.waitForFunction(() => document.querySelectorAll('tr[data-region] .badge.up').length >= 2);
  console.log(`agents_up=${await page.locator('tr[data-region] .badge.up').count()}`);

  if (mode === 'operator') {
    await shot('regions');
    await visit('#/apps', 'tr[data-app="sample"]');
    await page.waitForFunction(() => document.querySelectorAll('tr[data-app="sample"] .badge.blue, tr[data-app="sample"] .badge.green').length >= 2);
    await shot('apps');
    await visit('#/operations', 'tr[data-operation]');

    // CI's part, as in the README: a release of the image and a fact about it.
    const cli = (args) => execFileSync(process.env.CUTOVER_BIN, args, { encoding: 'utf8' });
    cli(['release', 'create', '--app', 'sample', '--image', 'sample:v2']);
    cli(['attest', '--image', 'sample:v2', '--check', 'tests=passed']);
    // A deploy with manual promotion, started as the CLI user would.
    const out = execFileSync(process.env.CUTOVER_BIN,
      ['deploy', '--app', 'sample', '--image', 'sample:v2', '--manual-promotion', '--detach', '-o', 'json'],
      { encoding: 'utf8' });
    const id = JSON.parse(out).operation_id;
    console.log(`operation=${id}`);
    // The list refreshes by itself: the new operation appears, running.
    await page.waitForSelector(`tr[data-operation="${id}"]`);
    await page.click(`tr[data-operation="${id}"]`);
    await page.waitForSelector(`[data-operation="${id}"]`);

    // Its steps appear live, then it waits at the first promotion gate.
    const kinds = new Set();
    const seen = async () => {
      for (const k of await page.locator('tr[data-task-kind]').evaluateAll((rows) => rows.map((r) => r.dataset.taskKind))) kinds.add(k);
    };
    await page.waitForSelector('tr[data-task-kind="app.deploy"]');
    await seen();
    await page.waitForSelector('[data-awaiting-gate="1"]');
    await seen();
    await shot('operation');

    // Promote asks for confirmation; accept it. Each wave has a gate.
    const dialogs = [];
    page.on('dialog', async (d) => { dialogs.push(d.message()); await d.accept(); });
    for (const gate of [1, 2]) {
      await page.waitForSelector(`[data-awaiting-gate="${gate}"]`);
      await seen();
      await page.click('button[data-action="promote"]:not([disabled])');
      await page.waitForFunction((g) => !document.querySelector(`[data-awaiting-gate="${g}"]`), gate);
    }
    await page.waitForSelector(`[data-operation="${id}"][data-state="succeeded"]`, { timeout: 120_000 });
    await seen();
    console.log(`steps=${[...kinds].sort().join(',')}`);
    console.log(`confirmations=${dialogs.length}`);
    if (!dialogs.every((m) => m.startsWith(`Promote ${id}`))) fail(`unexpected dialogs: ${dialogs}`);
    // The wave rows say the gates were promoted, the steps their results.
    const promoted = await page.locator('[data-wave] .badge.passed').count();
    console.log(`gates_promoted=${promoted}`);
    const gateResults = await page.locator('tr[data-task-kind="app.gates"] .checks li.pass').count();
    console.log(`gate_checks_passed=${gateResults}`);
    console.log(`state=${await page.getAttribute(`[data-operation="${id}"]`, 'data-state')}`);
    await shot('operation-succeeded');

    await visit('#/audit', 'table tbody tr');
    await page.waitForFunction(() => document.querySelector('main').textContent.includes('PromoteOperation'));
    console.log('audit_has_promote=true');
    await shot('audit');
    await visit('#/releases', 'tr[data-release="sample:v2"]');
    await page.waitForFunction(() => document.querySelector('tr[data-release="sample:v2"]').textContent.includes('tests = passed'));
    console.log('release_attested=true');
    await shot('releases');
    await visit('#/dr', 'svg.chart');
    await shot('dr');
    noErrors();
  } else {
    // Every page, read-only: no button anywhere.
    const pages = [
      ['#/overview', 'tr[data-region]'],
      ['#/apps', 'tr[data-app]'],
      ['#/operations', 'tr[data-operation]'],
      ['#/releases', 'main .card'],
      ['#/audit', 'table tbody tr'],
      ['#/dr', 'svg.chart'],
    ];
    let buttons = 0;
    for (const [route, ready] of pages) {
      await visit(route, ready);
      buttons += await page.locator('button').count();
    }
    // An operation's page, where an operator has the buttons.
    await visit('#/operations', 'tr[data-operation]');
    const id = await page.getAttribute('tr[data-operation]', 'data-operation');
    await page.click(`tr[data-operation="${id}"]`);
    await page.waitForSelector(`[data-operation="${id}"] .badge`);
    await page.waitForSelector('tr[data-task-kind]');
    buttons += await page.locator('button').count();
    console.log(`pages=${pages.length + 1}`);
    console.log(`buttons=${buttons}`);
    await shot('viewer-operation');
    noErrors();
    // A write sent by hand still fails: the coordinators refuse the viewer.
    // (From here on the browser logs the refusals it is shown.)
    const [status, body] = await page.evaluate(async (op) => {
      const r = await fetch(`/api/operations/${op}/abort`, {
        method: 'POST', headers: { 'x-cutover-token': sessionStorage.getItem('cutover-token') },
      });
      return [r.status, await r.text()];
    }, id);
    console.log(`viewer_abort_status=${status}`);
    console.log(`viewer_abort_error=${JSON.parse(body).error.split(':')[0]}`);
  }

  // Without the token the API answers nothing (another local user, or a
  // page of another site, cannot use the console's certificate).
  const anonymous = await page.evaluate(async (b) => (await fetch(`${b}api/operations`)).status, base);
  console.log(`without_token_status=${anonymous}`);
  console.log('console_errors=0');
} finally {
  await browser.close();
}
