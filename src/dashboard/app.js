// The Cosmopoints staff dashboard: plain JavaScript, no framework, no build step.
//
// Rules this file keeps (docs/API.md, Dashboard):
// - The token lives in the `session` variable below and nowhere else: never in the
//   browser's storage, a cookie or a URL. Closing the page forgets it; its
//   expiry (or any 401) signs out with a message.
// - Every value from the API reaches the page as text (textContent, DOM nodes); nothing
//   is ever parsed as HTML. The Content-Security-Policy forbids inline code anyway.
// - Requests go to this origin only, through the public API.
'use strict';

(() => {
  /** The signed-in session: {token, timer, profile, programs}; null when signed out. */
  let session = null;
  /** The listing on screen: the page URLs seen so far (for Previous) and where we are. */
  let paging = { urls: [], index: 0, next: null };
  /** The filters the listing on screen was made with. */
  let shown = null;
  /** The reversal being prepared in the dialog. */
  let reversal = null;

  const SUMMARY_PAGE = 1000;      // the API's largest page
  const SUMMARY_MAX_PAGES = 50;   // at most 50,000 transactions in the summary
  const CHART_MAX_DAYS = 366;

  const $ = (id) => document.getElementById(id);

  // ---- DOM helpers: text only -------------------------------------------------------

  /** An element with attributes (set as attributes, never as HTML) and children (nodes
   *  or strings, which become text nodes). */
  function el(tag, attributes = {}, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attributes)) {
      if (value === undefined || value === null || value === false) continue;
      if (name === 'class') node.className = value;
      else node.setAttribute(name, value === true ? '' : String(value));
    }
    for (const child of children) {
      if (child === undefined || child === null) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  const SVG = 'http://www.w3.org/2000/svg';
  function svg(tag, attributes = {}, ...children) {
    const node = document.createElementNS(SVG, tag);
    for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, String(value));
    for (const child of children) {
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function show(node, visible) { node.hidden = !visible; }

  function message(text) {
    $('notice').textContent = text;
    show($('notice'), Boolean(text));
  }

  function failure(text) {
    $('error').textContent = text;
    show($('error'), Boolean(text));
  }

  // ---- Formatting: the browser's locale and time zone ---------------------------------

  const integer = new Intl.NumberFormat(undefined, { maximumFractionDigits: 0 });
  const dateTime = new Intl.DateTimeFormat(undefined, { dateStyle: 'medium', timeStyle: 'medium' });
  const dayLabel = new Intl.DateTimeFormat(undefined, { day: 'numeric', month: 'short' });

  function points(n) { return integer.format(n); }

  /** Minor units as an exact decimal string: 3673 with exponent 2 → "36.73". */
  function decimal(minor, exponent) {
    const negative = minor < 0;
    const digits = String(Math.abs(minor)).padStart(exponent + 1, '0');
    const whole = digits.slice(0, digits.length - exponent);
    const fraction = digits.slice(digits.length - exponent);
    return (negative ? '-' : '') + (exponent ? `${whole}.${fraction}` : whole);
  }

  /** Minor units of the business currency, formatted for this browser's locale. The
   *  decimal string goes to Intl as a string, so no float rounding is involved. */
  function money(minor) {
    const { currency, currencyExponent: exponent } = session.profile;
    const text = decimal(minor, exponent);
    try {
      return new Intl.NumberFormat(undefined, {
        style: 'currency', currency,
        minimumFractionDigits: exponent, maximumFractionDigits: exponent,
      }).format(text);
    } catch {
      const plain = new Intl.NumberFormat(undefined, {
        minimumFractionDigits: exponent, maximumFractionDigits: exponent,
      });
      return `${plain.format(text)} ${currency}`;
    }
  }

  /** "12.5" or "12,5" in the business currency → minor units (a BigInt), or an error. */
  function parseAmount(text, exponent) {
    const trimmed = text.trim();
    const match = /^(\d+)(?:[.,](\d*))?$/.exec(trimmed);
    if (!match) return { error: 'Write the amount as a number, for example 12.50.' };
    const fraction = match[2] || '';
    if (fraction.length > exponent) {
      return { error: exponent ? `Use at most ${exponent} decimals.` : 'Use a whole number.' };
    }
    const minor = BigInt(match[1]) * 10n ** BigInt(exponent) + BigInt(fraction.padEnd(exponent, '0') || '0');
    return { minor };
  }

  function localTime(rfc3339) { return dateTime.format(new Date(rfc3339)); }

  /** The local calendar day (YYYY-MM-DD) of a time. */
  function dayKey(date) {
    const pad = (n) => String(n).padStart(2, '0');
    return `${date.getFullYear()}-${pad(date.getMonth() + 1)}-${pad(date.getDate())}`;
  }

  /** Local midnight of a YYYY-MM-DD day, plus `days`. */
  function midnight(key, days = 0) {
    const [y, m, d] = key.split('-').map(Number);
    return new Date(y, m - 1, d + days);
  }

  const epoch = (date) => String(Math.floor(date.getTime() / 1000)).padStart(10, '0');

  // ---- The API --------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, detail, type) {
      super(detail);
      this.status = status;
      this.type = type;
    }
  }

  class SignedOut extends Error {}

  /** A request with the session's token. A 401 signs out; other errors become an
   *  ApiError carrying the problem's detail. */
  async function api(path, { method = 'GET', body, accept = 'application/json' } = {}) {
    if (!session) throw new SignedOut();
    const headers = { Authorization: `Bearer ${session.token}`, Accept: accept };
    const init = { method, headers, cache: 'no-store', credentials: 'omit' };
    if (body !== undefined) {
      headers['Content-Type'] = 'application/json';
      init.body = JSON.stringify(body);
    }
    const response = await fetch(path, init);
    if (response.status === 401) {
      signOut('Your session has ended: the sign-in expired or is no longer valid. Sign in again.');
      throw new SignedOut();
    }
    if (!response.ok) throw await problem(response);
    return response;
  }

  async function problem(response) {
    let detail = `The server answered ${response.status}.`;
    let type;
    try {
      const body = await response.json();
      if (typeof body.detail === 'string') detail = body.detail;
      type = body.type;
    } catch { /* not problem+json: keep the status line */ }
    const retry = response.headers.get('Retry-After');
    if (retry) detail += ` Try again in ${retry} s.`;
    return new ApiError(response.status, detail, type);
  }

  /** Runs an action, showing its failure; a sign-out is already explained. */
  async function guarded(action) {
    try {
      failure('');
      await action();
    } catch (error) {
      if (error instanceof SignedOut) return;
      if (error instanceof ApiError) failure(error.message);
      else failure(`The request failed: ${error.message}`);
    }
  }

  const path = (id) => encodeURIComponent(id);

  // ---- Sign in and out --------------------------------------------------------------

  async function signIn(event) {
    event.preventDefault();
    const clientId = $('client-id').value.trim();
    const secret = $('client-secret');
    if (!clientId || !secret.value) {
      failure('Enter the client id and the secret.');
      return;
    }
    failure('');
    message('Signing in…');
    let response;
    try {
      response = await fetch('/v1/auth', {
        method: 'POST',
        headers: { 'Content-Type': 'application/json', Accept: 'application/json' },
        body: JSON.stringify({ clientId, clientSecret: secret.value }),
        cache: 'no-store',
        credentials: 'omit',
      });
    } catch (error) {
      message('');
      failure(`The server could not be reached: ${error.message}`);
      return;
    }
    if (!response.ok) {
      message('');
      failure((await problem(response)).message);
      return;
    }
    const { accessToken, expiresIn } = await response.json();
    secret.value = '';
    const timer = setTimeout(() => {
      signOut(`Your session expired after ${Math.round(expiresIn / 60)} minutes. Sign in again.`);
    }, expiresIn * 1000);
    session = { token: accessToken, timer, profile: null, programs: [] };
    await guarded(async () => {
      const [profile, programs] = await Promise.all([
        api('/v1/profile').then((r) => r.json()),
        api('/v1/programs').then((r) => r.json()),
      ]);
      session.profile = profile;
      session.programs = programs;
      $('who').textContent = `${profile.name} · ${clientId}`;
      const select = $('program');
      select.replaceChildren(el('option', { value: '' }, 'All programs'));
      for (const program of programs) select.append(el('option', { value: program.id }, program.name));
      const today = dayKey(new Date());
      $('from').value = today;
      $('to').value = today;
      show($('sign-in'), false);
      show($('dashboard'), true);
      show($('who'), true);
      show($('sign-out'), true);
      message('');
      await refresh();
    });
  }

  /** Forgets the token and everything shown, and says why. */
  function signOut(reason) {
    if (session) clearTimeout(session.timer);
    session = null;
    shown = null;
    paging = { urls: [], index: 0, next: null };
    const dialog = $('reverse-dialog');
    if (dialog.open) dialog.close();
    reversal = null;
    for (const id of ['counts', 'chart', 'legend', 'failed', 'who']) $(id).replaceChildren();
    $('transactions').tBodies[0].replaceChildren();
    show($('dashboard'), false);
    show($('who'), false);
    show($('sign-out'), false);
    show($('sign-in'), true);
    failure('');
    message(reason);
    $('client-id').focus();
  }

  // ---- Filters and the listing ------------------------------------------------------

  /** The filters as the form holds them, checked. */
  function filters() {
    const from = $('from').value;
    const to = $('to').value;
    if (!from || !to) throw new ApiError(0, 'Choose both days of the range.');
    if (from > to) throw new ApiError(0, 'The range starts after it ends.');
    return {
      from, to,
      startDate: epoch(midnight(from)),
      endDate: epoch(new Date(midnight(to, 1).getTime() - 1000)),
      programId: $('program').value,
      status: $('status').value,
      limit: $('page-size').value,
    };
  }

  /** The listing's query for these filters; `withStatus` false leaves the status out. */
  function query(f, withStatus = true) {
    const q = new URLSearchParams({ startDate: f.startDate, endDate: f.endDate });
    if (f.programId) q.set('programId', f.programId);
    if (withStatus && f.status) q.set('status', f.status);
    return q;
  }

  /** The next page's URL from a `Link` header, if it is one of this API's listings. */
  function nextLink(response) {
    const link = response.headers.get('Link') || '';
    const match = /<([^>]*)>\s*;\s*rel="next"/.exec(link);
    return match && match[1].startsWith('/v1/transactions?') ? match[1] : null;
  }

  async function refresh() {
    shown = filters();
    const q = query(shown);
    q.set('limit', shown.limit);
    paging = { urls: [`/v1/transactions?${q}`], index: 0, next: null };
    await Promise.all([loadPage(), loadSummary()]);
  }

  async function loadPage() {
    const response = await api(paging.urls[paging.index]);
    const rows = await response.json();
    paging.next = nextLink(response);
    renderRows(rows);
    $('prev-page').disabled = paging.index === 0;
    $('next-page').disabled = !paging.next;
    $('page-label').textContent = `Page ${integer.format(paging.index + 1)}`;
  }

  function statusBadge(status) {
    return el('span', { class: `badge status-${status}` }, status);
  }

  function remainingValue(tx) { return tx.sourceValue - (tx.reversedValue || 0); }

  function renderRows(rows) {
    const body = $('transactions').tBodies[0];
    body.replaceChildren();
    show($('list-empty'), rows.length === 0);
    for (const tx of rows) {
      const program = tx.partnership && tx.partnership.destination;
      const reversedValue = tx.reversedValue || 0;
      const reversedPoints = tx.reversedPoints || 0;
      const value = el('td', { class: 'num', 'data-label': 'Value' },
        el('span', { class: 'value' }, money(tx.sourceValue)));
      if (reversedValue > 0) {
        value.append(el('span', { class: 'sub reversed' }, `reversed ${money(reversedValue)}`),
          el('span', { class: 'sub remaining' }, `remaining ${money(remainingValue(tx))}`));
      }
      const pointsCell = el('td', { class: 'num', 'data-label': 'Points' },
        el('span', { class: 'points' }, points(tx.totalPoints)));
      if (reversedPoints > 0) {
        pointsCell.append(el('span', { class: 'sub reversed' }, `−${points(reversedPoints)}`),
          el('span', { class: 'sub points-left' }, `${points(tx.totalPoints - reversedPoints)} left`));
      }
      const status = el('td', { 'data-label': 'Status' }, statusBadge(tx.status));
      const error = tx.delivery && tx.delivery.error;
      if (error) status.append(el('span', { class: 'sub error-detail' }, error.detail || error.type));
      const actions = el('td', { class: 'row-actions', 'data-label': 'Actions' });
      if (remainingValue(tx) > 0) {
        const button = el('button', { type: 'button', class: 'reverse', 'aria-label': `Reverse ${tx.referenceNumber}` }, 'Reverse');
        button.addEventListener('click', () => openReversal(tx));
        actions.append(button);
      }
      if (tx.status === 'failed') actions.append(redeliverButton(tx));
      const row = el('tr', { 'data-id': tx.id, 'data-reference': tx.referenceNumber, 'data-program': program ? program.programId : '' },
        el('td', { 'data-label': 'Time' }, el('time', { datetime: tx.createdAt }, localTime(tx.createdAt))),
        el('td', { 'data-label': 'Reference', class: 'reference' }, tx.referenceNumber),
        el('td', { 'data-label': 'Customer' }, tx.userId || tx.endUserId || ''),
        el('td', { 'data-label': 'Program' }, program ? program.name : ''),
        value,
        pointsCell,
        status,
        el('td', { 'data-label': 'Description', class: 'description' }, tx.description || ''),
        actions);
      body.append(row);
    }
  }

  function redeliverButton(tx) {
    const button = el('button', { type: 'button', class: 'redeliver', 'aria-label': `Redeliver ${tx.referenceNumber}` }, 'Redeliver');
    button.addEventListener('click', () => guarded(async () => {
      button.disabled = true;
      const response = await api(`/v1/transactions/${path(tx.id)}/redeliver`, { method: 'POST' });
      const updated = await response.json();
      message(`Sent ${updated.referenceNumber} to the partner again: it is ${updated.status} now.`);
      await Promise.all([loadPage(), loadSummary()]);
    }).finally(() => { button.disabled = false; }));
    return button;
  }

  // ---- The summary: counts, chart, failed deliveries over the whole range -----------

  async function loadSummary() {
    const f = shown;
    const q = query(f, false);
    q.set('limit', String(SUMMARY_PAGE));
    let url = `/v1/transactions?${q}`;
    const rows = [];
    let pages = 0;
    while (url && pages < SUMMARY_MAX_PAGES) {
      const response = await api(url);
      rows.push(...await response.json());
      url = nextLink(response);
      pages += 1;
    }
    if (f !== shown) return; // the filters changed meanwhile: a newer summary is coming
    const programName = f.programId
      ? (session.programs.find((p) => p.id === f.programId) || { name: f.programId }).name
      : 'all programs';
    $('summary-scope').textContent = `${integer.format(rows.length)} transactions from ${f.from} to ${f.to}, ${programName}`
      + (url ? ` (only the first ${integer.format(rows.length)}: narrow the range to see all).` : '.');
    renderCounts(rows);
    renderChart(rows, f);
    renderFailed(rows.filter((tx) => tx.status === 'failed'));
  }

  function renderCounts(rows) {
    const counts = { pending: 0, completed: 0, failed: 0 };
    for (const tx of rows) counts[tx.status] = (counts[tx.status] || 0) + 1;
    const list = $('counts');
    list.replaceChildren();
    for (const [status, count] of Object.entries(counts)) {
      list.append(el('div', { class: `count status-${status}`, 'data-status': status },
        el('dt', {}, status), el('dd', {}, integer.format(count))));
    }
  }

  function renderChart(rows, f) {
    const days = [];
    for (let day = midnight(f.from); day <= midnight(f.to) && days.length < CHART_MAX_DAYS; day = new Date(day.getFullYear(), day.getMonth(), day.getDate() + 1)) {
      days.push(dayKey(day));
    }
    const programs = [];
    const totals = new Map(days.map((d) => [d, new Map()]));
    for (const tx of rows) {
      const program = tx.partnership.destination;
      if (!programs.some((p) => p.programId === program.programId)) programs.push(program);
      const perDay = totals.get(dayKey(new Date(tx.createdAt)));
      if (perDay) perDay.set(program.programId, (perDay.get(program.programId) || 0) + tx.totalPoints);
    }
    const series = (programId) => programs.findIndex((p) => p.programId === programId) % 8;
    const max = Math.max(1, ...[...totals.values()].map((m) => [...m.values()].reduce((a, b) => a + b, 0)));

    const width = 640; const height = 240;
    const left = 64; const right = 8; const top = 10; const bottom = 28;
    const plotWidth = width - left - right; const plotHeight = height - top - bottom;
    const slot = plotWidth / days.length;
    const barWidth = Math.max(1, Math.min(40, slot * 0.7));
    const describe = programs.length
      ? programs.map((p) => `${p.name}: ${points(rows.filter((tx) => tx.partnership.destination.programId === p.programId).reduce((a, tx) => a + tx.totalPoints, 0))} points`).join('; ')
      : 'No points issued in this range';
    const chart = svg('svg', { viewBox: `0 0 ${width} ${height}`, role: 'img', 'aria-labelledby': 'chart-title chart-desc', class: 'chart-svg' },
      svg('desc', { id: 'chart-desc' }, describe));
    for (const fraction of [0, 0.5, 1]) {
      const y = top + plotHeight * (1 - fraction);
      chart.append(svg('line', { x1: left, x2: width - right, y1: y, y2: y, class: 'grid' }),
        svg('text', { x: left - 6, y: y + 4, class: 'axis', 'text-anchor': 'end' }, points(Math.round(max * fraction))));
    }
    const every = Math.max(1, Math.ceil(days.length / 8));
    days.forEach((day, i) => {
      const x = left + slot * i + (slot - barWidth) / 2;
      let y = top + plotHeight;
      for (const [programId, value] of totals.get(day)) {
        const h = (value / max) * plotHeight;
        y -= h;
        const program = programs.find((p) => p.programId === programId);
        chart.append(svg('rect', { x, y, width: barWidth, height: Math.max(h, 0.5), class: `bar series-${series(programId)}`, 'data-day': day, 'data-program': programId },
          svg('title', {}, `${dayLabel.format(midnight(day))} · ${program.name}: ${points(value)} points`)));
      }
      if (i % every === 0 || i === days.length - 1) {
        chart.append(svg('text', { x: left + slot * i + slot / 2, y: height - 8, class: 'axis', 'text-anchor': 'middle' }, dayLabel.format(midnight(day))));
      }
    });
    $('chart').replaceChildren(chart);
    $('legend').replaceChildren(...programs.map((p) => el('li', {},
      el('span', { class: `swatch series-${series(p.programId)}`, 'aria-hidden': 'true' }), p.name)));
  }

  function renderFailed(rows) {
    const list = $('failed');
    list.replaceChildren();
    show($('failed-empty'), rows.length === 0);
    for (const tx of rows) {
      const error = tx.delivery && tx.delivery.error;
      const reason = error
        ? `${error.detail || 'no detail'} (${error.type}${error.httpStatus ? `, HTTP ${error.httpStatus}` : ''})`
        : 'no reason recorded';
      list.append(el('li', { 'data-reference': tx.referenceNumber },
        el('p', { class: 'failed-head' },
          el('strong', {}, tx.referenceNumber), ' · ', tx.partnership.destination.name,
          ' · ', el('time', { datetime: tx.createdAt }, localTime(tx.createdAt)),
          ' · ', `${integer.format(tx.delivery ? tx.delivery.attempts : 0)} attempts`),
        el('p', { class: 'partner-reason' }, 'Partner said: ', el('span', { class: 'reason' }, reason)),
        redeliverButton(tx)));
    }
  }

  // ---- CSV download -------------------------------------------------------------------

  async function download() {
    const f = filters();
    const response = await api(`/v1/transactions?${query(f)}`, { accept: 'text/csv' });
    const blob = await response.blob();
    const url = URL.createObjectURL(blob);
    const link = el('a', { href: url, download: `cosmopoints-${f.from}-to-${f.to}.csv`, class: 'visually-hidden' });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60_000);
    message(`Downloaded the CSV of ${f.from} to ${f.to}.`);
  }

  // ---- Reversals: prepare, review, confirm --------------------------------------------

  /** A fresh idempotency key: one per reversal the person means to make, so that a
   *  retried click cannot reverse twice. */
  function newKey() {
    const bytes = crypto.getRandomValues(new Uint8Array(12));
    return `dash-${[...bytes].map((b) => b.toString(16).padStart(2, '0')).join('')}`;
  }

  function openReversal(tx) {
    reversal = { tx, key: newKey(), value: undefined };
    $('reverse-what').textContent = `${tx.referenceNumber} · ${tx.partnership.destination.name} · ${money(tx.sourceValue)} · ${points(tx.totalPoints)} points`;
    $('reverse-remaining').textContent = `Remaining: ${money(remainingValue(tx))} and ${points(tx.totalPoints - (tx.reversedPoints || 0))} points.`;
    $('reverse-currency').textContent = session.profile.currency;
    $('reverse-amount').value = '';
    $('reverse-reason').value = '';
    editing(true);
    $('reverse-error').textContent = '';
    show($('reverse-error'), false);
    $('reverse-dialog').showModal();
    $('reverse-amount').focus();
  }

  function editing(on) {
    $('reverse-amount').disabled = !on;
    $('reverse-reason').disabled = !on;
    show($('reverse-review'), on);
    show($('reverse-submit'), !on);
    show($('reverse-confirm'), !on);
  }

  function reverseError(text) {
    $('reverse-error').textContent = text;
    show($('reverse-error'), Boolean(text));
  }

  function review() {
    const { tx } = reversal;
    const remaining = remainingValue(tx);
    const text = $('reverse-amount').value;
    let value;
    if (text.trim() !== '') {
      const parsed = parseAmount(text, session.profile.currencyExponent);
      if (parsed.error) return reverseError(parsed.error);
      if (parsed.minor < 1n) return reverseError('The amount must be more than zero.');
      if (parsed.minor > BigInt(remaining)) return reverseError(`At most ${money(remaining)} remains.`);
      value = Number(parsed.minor);
    }
    reverseError('');
    reversal.value = value;
    reversal.reason = $('reverse-reason').value.trim() || undefined;
    const amount = value === undefined ? remaining : value;
    $('reverse-confirm').textContent = value === undefined || value === remaining
      ? `Reverse all that remains of ${tx.referenceNumber}: ${money(amount)}? Its remaining points are taken back. This cannot be undone.`
      : `Reverse ${money(amount)} of ${tx.referenceNumber} (of ${money(remaining)} remaining)? The points are taken back in proportion. This cannot be undone.`;
    editing(false);
    $('reverse-submit').focus();
  }

  async function confirmReversal() {
    const { tx, key, value, reason } = reversal;
    const button = $('reverse-submit');
    button.disabled = true;
    try {
      const body = { referenceNumber: key };
      if (value !== undefined) body.value = value;
      if (reason !== undefined) body.reason = reason;
      const made = await (await api(`/v1/transactions/${path(tx.id)}/reversals`, { method: 'POST', body })).json();
      const updated = await (await api(`/v1/transactions/${path(tx.id)}`)).json();
      $('reverse-dialog').close();
      reversal = null;
      message(`Reversed ${money(made.value)} (${points(made.points)} points) of ${updated.referenceNumber}. Remaining: ${money(remainingValue(updated))} and ${points(updated.totalPoints - updated.reversedPoints)} points.`);
      await Promise.all([loadPage(), loadSummary()]);
    } catch (error) {
      if (error instanceof SignedOut) return;
      if (error instanceof ApiError && error.status >= 400 && error.status < 500) {
        // Refused and not written: a new attempt is a new reversal.
        reversal.key = newKey();
        editing(true);
        reverseError(error.message);
      } else {
        // The outcome is unknown: the retry keeps the same key, so it cannot reverse twice.
        reverseError(`${error.message} Press "Confirm reversal" again to retry safely.`);
      }
    } finally {
      button.disabled = false;
    }
  }

  // ---- Wiring -----------------------------------------------------------------------

  document.addEventListener('DOMContentLoaded', () => {
    $('sign-in-form').addEventListener('submit', signIn);
    $('sign-out').addEventListener('click', () => signOut('Signed out.'));
    $('filters').addEventListener('submit', (event) => {
      event.preventDefault();
      message('');
      guarded(refresh);
    });
    $('download').addEventListener('click', () => guarded(download));
    $('prev-page').addEventListener('click', () => guarded(async () => {
      if (paging.index > 0) paging.index -= 1;
      await loadPage();
    }));
    $('next-page').addEventListener('click', () => guarded(async () => {
      if (!paging.next) return;
      paging.urls = paging.urls.slice(0, paging.index + 1).concat(paging.next);
      paging.index += 1;
      await loadPage();
    }));
    $('reverse-form').addEventListener('submit', (event) => {
      event.preventDefault();
      if (!reversal) return;
      if ($('reverse-submit').hidden) review(); else confirmReversal();
    });
    $('reverse-review').addEventListener('click', () => reversal && review());
    $('reverse-submit').addEventListener('click', () => reversal && confirmReversal());
    $('reverse-cancel').addEventListener('click', () => {
      $('reverse-dialog').close();
      reversal = null;
    });
    $('reverse-dialog').addEventListener('close', () => { reversal = null; });
    $('client-id').focus();
  });
})();
