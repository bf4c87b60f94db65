// Drives the dashboard in a real headless Chromium (Debian's, through playwright-core).
//
//   node tests/browser/dashboard.mjs BASE_URL SCREENSHOT_DIR FIXTURE_JSON
//
// tests/dashboard.rs runs it against the real binary after issuing the fixture's
// transactions through the API. FIXTURE_JSON names the client and the references:
//   {clientId, clientSecret, issued, big, failed, other, otherProgram, xss, xssText}
// It prints one "ok - …" line per check and exits 0, or prints "not ok - …" and exits 1.
// The browser runs in en-US in Asia/Dubai (UTC+4), so that shown times must be converted
// from the API's UTC to be right. Environment: CHROMIUM (default /usr/bin/chromium).
import { chromium } from 'playwright-core';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';

const [base, shots, fixtureText] = process.argv.slice(2);
if (!base || !shots || !fixtureText) {
  console.error('usage: node tests/browser/dashboard.mjs BASE_URL SCREENSHOT_DIR FIXTURE_JSON');
  process.exit(2);
}
const fixture = JSON.parse(fixtureText);
const origin = new URL(base).origin;
const LOCALE = 'en-US';
const ZONE = 'Asia/Dubai';

let checks = 0;
function ok(what) { checks += 1; console.log(`ok - ${what}`); }
function check(condition, what, detail = '') {
  if (!condition) throw new Error(`${what}${detail ? `: ${detail}` : ''}`);
  ok(what);
}
const squash = (s) => String(s).replace(/\s+/g, ' ').trim();

// ---- The API, from Node, for the expected values ------------------------------------
let apiToken;
async function apiGet(path, accept = 'application/json') {
  if (!apiToken) {
    const r = await fetch(`${base}/v1/auth`, {
      method: 'POST', headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ clientId: fixture.clientId, clientSecret: fixture.clientSecret }),
    });
    apiToken = (await r.json()).accessToken;
  }
  const r = await fetch(`${base}${path}`, { headers: { authorization: `Bearer ${apiToken}`, accept } });
  if (!r.ok) throw new Error(`GET ${path}: ${r.status} ${await r.text()}`);
  return accept === 'text/csv' ? r.text() : r.json();
}
const tx = (reference) => apiGet(`/v1/transactions/${encodeURIComponent(reference)}`);
async function until(what, probe, seconds = 20) {
  const deadline = Date.now() + seconds * 1000;
  for (;;) {
    const value = await probe();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 200));
  }
}

const money = (minor, exponent, currency) => new Intl.NumberFormat(LOCALE, {
  style: 'currency', currency, minimumFractionDigits: exponent, maximumFractionDigits: exponent,
}).format(String(minor / 10 ** exponent));
const localTime = (rfc3339) => new Intl.DateTimeFormat(LOCALE, {
  dateStyle: 'medium', timeStyle: 'medium', timeZone: ZONE,
}).format(new Date(rfc3339));

// ---- The browser ----------------------------------------------------------------------
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  // CI runs as root, where Chromium's sandbox cannot start.
  args: ['--no-sandbox', '--disable-dev-shm-usage'],
});
const context = await browser.newContext({
  locale: LOCALE, timezoneId: ZONE, viewport: { width: 1280, height: 900 }, acceptDownloads: true,
});
const foreign = [];
const problems = [];
context.on('request', (request) => {
  const url = new URL(request.url());
  // blob: URLs (the CSV download) have this origin too.
  if (url.origin !== origin) foreign.push(request.url());
  if (url.pathname === '/x') problems.push(`the page requested ${request.url()} (an <img src=x> ran)`);
});
const page = await context.newPage();
const dialogs = [];
page.on('dialog', (dialog) => { dialogs.push(dialog.message()); dialog.dismiss().catch(() => {}); });
page.on('pageerror', (error) => problems.push(`page error: ${error.message}`));
page.on('console', (msg) => { if (msg.type() === 'error' && !/status of 40[14]/.test(msg.text())) problems.push(`console error: ${msg.text()}`); });

let failed = false;
try {
  // Sign in.
  const response = await page.goto(`${base}/`);
  check(response.status() === 200, 'GET / answers 200');
  check((response.headers()['content-security-policy'] || '').includes("script-src 'self'"), 'the page carries its CSP');
  await page.getByLabel('Client id').fill(fixture.clientId);
  await page.getByLabel('Client secret').fill(fixture.clientSecret);
  await page.getByRole('button', { name: 'Sign in' }).click();
  await page.locator('#dashboard').waitFor({ state: 'visible' });
  check(await page.getByLabel('Client secret').inputValue() === '', 'the secret field is cleared after sign-in');
  const stored = await page.evaluate(() => ({
    local: localStorage.length, session: sessionStorage.length, cookie: document.cookie, url: location.href,
  }));
  check(stored.local === 0 && stored.session === 0 && stored.cookie === '' && !/token|Bearer/i.test(stored.url),
    'the token is in no storage, cookie or URL', JSON.stringify(stored));

  const profile = await apiGet('/v1/profile');
  const fmt = (minor) => money(minor, profile.currencyExponent, profile.currency);
  const row = (reference) => page.locator(`#transactions tbody tr[data-reference="${reference}"]`);

  // See a transaction issued through the API, in the browser's zone, with separators.
  const issued = await tx(fixture.issued);
  await row(fixture.issued).waitFor();
  const time = row(fixture.issued).locator('time');
  check(await time.getAttribute('datetime') === issued.createdAt, 'the row carries the API time');
  check(squash(await time.textContent()) === squash(localTime(issued.createdAt)),
    'the time is shown in the browser zone', `${await time.textContent()} vs ${localTime(issued.createdAt)}`);
  const issuedText = squash(await row(fixture.issued).textContent());
  check(issuedText.includes(squash(fmt(issued.sourceValue))), 'the value is shown in the business currency', issuedText);
  const big = await tx(fixture.big);
  const bigText = squash(await row(fixture.big).textContent());
  check(bigText.includes(squash(fmt(big.sourceValue))) && /\d,\d{3}\.\d\d/.test(fmt(big.sourceValue)),
    'large values have thousands separators', bigText);
  check(bigText.includes(new Intl.NumberFormat(LOCALE).format(big.totalPoints)) && big.totalPoints >= 1000,
    'large points have thousands separators', bigText);
  await page.locator('#counts [data-status="failed"]').waitFor(); // the summary has loaded
  const counts = await page.locator('#counts').textContent();
  check(/completed/i.test(counts) && /failed/i.test(counts) && /pending/i.test(counts), 'counts by status are shown');
  const failedCount = squash(await page.locator('#counts [data-status="failed"] dd').textContent());
  check(failedCount === '1', 'the failed count is 1', failedCount);
  const bars = await page.locator('#chart svg rect.bar').count();
  check(bars >= 2, 'the chart has a bar per program and day', `${bars} bars`);

  // The XSS description is text, and nothing ran.
  const xssCell = row(fixture.xss).locator('td.description');
  check(await xssCell.textContent() === fixture.xssText, 'a description with markup shows as text');
  check(await page.locator('#transactions img').count() === 0, 'no element was made from the description');

  // Filter by program, then by program and status.
  await page.getByLabel('Program', { exact: true }).selectOption(fixture.otherProgram);
  await page.getByRole('button', { name: 'Show' }).click();
  await row(fixture.issued).waitFor({ state: 'detached' });
  const programs = await page.locator('#transactions tbody tr').evaluateAll((rows) => rows.map((r) => r.dataset.program));
  check(programs.length >= 1 && programs.every((p) => p === fixture.otherProgram), 'the program filter keeps only that program', programs.join(','));
  await page.getByLabel('Program', { exact: true }).selectOption('skywards');
  await page.getByLabel('Status', { exact: true }).selectOption('failed');
  await page.getByRole('button', { name: 'Show' }).click();
  await row(fixture.issued).waitFor({ state: 'detached' });
  await row(fixture.failed).waitFor();
  check(await page.locator('#transactions tbody tr').count() === 1, 'program and status filters keep the failed one only');
  await page.getByLabel('Program', { exact: true }).selectOption('');
  await page.getByLabel('Status', { exact: true }).selectOption('');
  await page.getByRole('button', { name: 'Show' }).click();
  await row(fixture.issued).waitFor();

  // Paging: one per page, Next and Previous.
  await page.getByLabel('Per page').selectOption('10');
  await page.getByRole('button', { name: 'Show' }).click();
  await row(fixture.issued).waitFor();
  check(await page.getByRole('button', { name: 'Next page' }).isDisabled(), 'one page holds the five transactions');

  // Reverse part of the issued one, with confirmation; the remaining value shows.
  await row(fixture.issued).getByRole('button', { name: `Reverse ${fixture.issued}` }).click();
  const dialog = page.locator('#reverse-dialog');
  await dialog.waitFor({ state: 'visible' });
  await dialog.getByLabel(/Amount to reverse/).fill('10.00');
  await dialog.getByRole('button', { name: 'Review' }).click();
  const confirmText = await dialog.locator('#reverse-confirm').textContent();
  check(confirmText.includes(squash(fmt(1000))) || squash(confirmText).includes(squash(fmt(1000))), 'the confirmation names the amount', confirmText);
  const beforeConfirm = await tx(fixture.issued);
  check(beforeConfirm.reversedValue === 0, 'nothing is reversed before the confirmation');
  await dialog.getByRole('button', { name: 'Confirm reversal' }).click();
  await dialog.waitFor({ state: 'hidden' });
  const reversed = await tx(fixture.issued);
  check(reversed.reversedValue === 1000, 'the API shows the partial reversal', JSON.stringify(reversed.reversedValue));
  const remaining = fmt(reversed.sourceValue - reversed.reversedValue);
  await page.locator(`#transactions tbody tr[data-reference="${fixture.issued}"] .remaining`).waitFor();
  const remainingText = await row(fixture.issued).locator('.remaining').textContent();
  check(squash(remainingText).includes(squash(remaining)), 'the row shows the remaining value', `${remainingText} vs ${remaining}`);
  const leftText = squash(await row(fixture.issued).locator('.points-left').textContent());
  check(leftText.startsWith(String(reversed.totalPoints - reversed.reversedPoints)), 'the row shows the points left', leftText);
  await page.locator('#notice', { hasText: 'Reversed' }).waitFor();
  check(squash(await page.locator('#notice').textContent()).includes(squash(remaining)), 'the notice says what remains');

  // A reversal over what remains is refused by the page before any request.
  await row(fixture.issued).getByRole('button', { name: `Reverse ${fixture.issued}` }).click();
  await dialog.getByLabel(/Amount to reverse/).fill('99999');
  await dialog.getByRole('button', { name: 'Review' }).click();
  check(/remains/.test(await dialog.locator('#reverse-error').textContent()), 'more than remains is refused in the dialog');
  await dialog.getByRole('button', { name: 'Cancel' }).click();
  await dialog.waitFor({ state: 'hidden' });

  // The failed delivery with the partner's reason, and Redeliver.
  const failedTx = await tx(fixture.failed);
  const item = page.locator(`#failed li[data-reference="${fixture.failed}"]`);
  await item.waitFor();
  const reason = await item.locator('.reason').textContent();
  check(failedTx.delivery.error && reason.includes(failedTx.delivery.error.detail), "the partner's reason is shown", reason);
  await item.getByRole('button', { name: `Redeliver ${fixture.failed}` }).click();
  await until('the redelivery to be attempted', async () => (await tx(fixture.failed)).delivery.attempts > failedTx.delivery.attempts);
  ok('Redeliver sent it to the partner again');
  await page.locator('#notice', { hasText: 'to the partner again' }).waitFor();
  ok('the notice confirms the redelivery');
  // The sandbox rejects it again: wait until it is failed again before comparing the CSV.
  await until('the redelivery to fail again', async () => (await tx(fixture.failed)).status === 'failed');

  // CSV download of the range, compared with the API's listing.
  await page.getByRole('button', { name: 'Show' }).click();
  await row(fixture.issued).waitFor();
  const [download] = await Promise.all([
    page.waitForEvent('download'),
    page.getByRole('button', { name: 'Download CSV' }).click(),
  ]);
  const saved = await readFile(await download.path(), 'utf8');
  const q = await page.evaluate(() => {
    const day = (v) => v.split('-').map(Number);
    const [fy, fm, fd] = day(document.getElementById('from').value);
    const [ty, tm, td] = day(document.getElementById('to').value);
    const pad = (n) => String(n).padStart(10, '0');
    return {
      start: pad(Math.floor(new Date(fy, fm - 1, fd).getTime() / 1000)),
      end: pad(Math.floor(new Date(ty, tm - 1, td + 1).getTime() / 1000) - 1),
    };
  });
  const expected = await apiGet(`/v1/transactions?startDate=${q.start}&endDate=${q.end}`, 'text/csv');
  check(saved === expected, 'the downloaded CSV equals the API listing', `${saved.length} vs ${expected.length} bytes`);
  check(saved.split('\r\n').filter(Boolean).length === 6, 'the CSV has a header and five rows');
  check(/\.csv$/.test(download.suggestedFilename()), 'the download is named .csv', download.suggestedFilename());

  await page.screenshot({ path: join(shots, 'dashboard.png'), fullPage: true });
  ok(`screenshot saved to ${join(shots, 'dashboard.png')}`);

  // A phone-width screen: nothing wider than the screen.
  await page.setViewportSize({ width: 390, height: 844 });
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  check(overflow <= 0, 'no sideways scrolling at 390 px', `${overflow} px too wide`);
  await page.screenshot({ path: join(shots, 'dashboard-phone.png'), fullPage: true });

  // A 401 signs out with a message.
  await page.route('**/v1/transactions?*', (route) => route.fulfill({
    status: 401, contentType: 'application/problem+json',
    body: JSON.stringify({ type: 'urn:cosmopoints:problem:unauthenticated', title: 'Unauthenticated', status: 401, detail: 'the token has expired' }),
  }));
  await page.getByRole('button', { name: 'Show' }).click();
  await page.locator('#sign-in').waitFor({ state: 'visible' });
  await page.locator('#notice', { hasText: 'session has ended' }).waitFor();
  check(/session has ended/.test(await page.locator('#notice').textContent()), 'a 401 signs out with a message');
  check(await page.locator('#transactions tbody tr').count() === 0, 'signing out clears the data shown');
  await page.unroute('**/v1/transactions?*');

  // Expiry: at expiresIn the page signs out by itself (time moved on by a fake clock).
  const timed = await context.newPage();
  await timed.clock.install();
  await timed.goto(`${base}/`);
  await timed.getByLabel('Client id').fill(fixture.clientId);
  await timed.getByLabel('Client secret').fill(fixture.clientSecret);
  await timed.getByRole('button', { name: 'Sign in' }).click();
  await timed.locator('#dashboard').waitFor({ state: 'visible' });
  await timed.clock.fastForward('10:01');
  await timed.locator('#sign-in').waitFor({ state: 'visible' });
  check(/expired/.test(await timed.locator('#notice').textContent()), 'the session ends at expiry with a message');
  await timed.close();

  check(dialogs.length === 0, 'no dialog fired', dialogs.join(' | '));
  check(foreign.length === 0, 'no request left the origin', foreign.join(' '));
  check(problems.length === 0, 'no script error, CSP violation or injected request', problems.join(' | '));
} catch (error) {
  failed = true;
  console.log(`not ok - ${error.message.split('\n')[0]}`);
  console.error(error.stack);
  if (problems.length) console.error(`also: ${problems.join(' | ')}`);
  await page.screenshot({ path: join(shots, 'dashboard-failure.png'), fullPage: true }).catch(() => {});
} finally {
  await browser.close();
}
console.log(failed ? `dashboard browser test: FAILED after ${checks} checks` : `dashboard browser test: ${checks} checks passed`);
process.exit(failed ? 1 : 0);
