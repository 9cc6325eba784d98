// prefixserve admin page: prefixes, live figures from /metrics, tenants (weight, quotas, usage), and a box
// to try a prefix (beams, n, per-token log-probabilities).
// Plain DOM, no framework; everything from the server is put in the page with textContent, never innerHTML.
"use strict";

const KEY_STORAGE = "prefixserve.apiKey";
const REFRESH_MS = 3000;
const MAX_PAGES = 50; // prefix list: pages of 100, followed through next_cursor
// what this page polls by itself: left out of the request figures so they show the API's real traffic
const OWN_ENDPOINTS = new Set(["/metrics", "/healthz", "/readyz", "/admin", "/admin/admin.js"]);

const $ = (id) => document.getElementById(id);
let apiKey = localStorage.getItem(KEY_STORAGE) || "";
let previous = null; // last metrics snapshot, for rates
let shownTenant = null; // the tenant whose settings the Tenants panel shows
const tenantsFromPrefixes = new Set(); // suggestions for the tenant box
const tenantsFromMetrics = new Set();

// ---- HTTP -------------------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (apiKey) headers["Authorization"] = "Bearer " + apiKey;
  const response = await fetch(path, Object.assign({}, options, { headers }));
  if (!response.ok) {
    let code = "http_" + response.status;
    let message = response.statusText || "request failed";
    try {
      const body = await response.json();
      if (body && body.error) ({ code, message } = body.error);
    } catch (_) { /* not JSON: keep the status line */ }
    throw new ApiError(response.status, code, message);
  }
  return response;
}

function describe(error) {
  if (!(error instanceof ApiError)) return "cannot reach the server: " + error.message;
  const hint = error.status === 401 ? " — enter a valid API key above" : "";
  return `${error.code} (${error.status}): ${error.message}${hint}`;
}

// ---- formatting ---------------------------------------------------------------------------------------

const integer = new Intl.NumberFormat("en", { maximumFractionDigits: 0 });
const decimal = new Intl.NumberFormat("en", { maximumFractionDigits: 2 });

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? decimal.format(n) : integer.format(n)) + " " + units[i];
}

function when(seconds) {
  if (!seconds) return "–";
  return new Date(seconds * 1000).toLocaleString("sv-SE").slice(0, 19); // YYYY-MM-DD HH:MM:SS
}

function cell(row, text, className) {
  const td = row.insertCell();
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

function pill(td, text, className) {
  td.textContent = "";
  const span = document.createElement("span");
  span.className = "pill " + (className || "");
  span.textContent = text;
  td.appendChild(span);
}

function emptyRow(tbody, columns, text) {
  const td = tbody.insertRow().insertCell();
  td.colSpan = columns;
  td.className = "empty";
  td.textContent = text;
}

// ---- Prometheus text -----------------------------------------------------------------------------------

// Samples of the exposition format: [{name, labels: {k: v}, value}], comments skipped.
function parsePrometheus(text) {
  const samples = [];
  const line = /^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+(\S+)/;
  const label = /([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"/g;
  for (const raw of text.split("\n")) {
    if (!raw || raw.startsWith("#")) continue;
    const m = line.exec(raw);
    if (!m) continue;
    const labels = {};
    for (const l of (m[2] || "").matchAll(label)) labels[l[1]] = l[2].replace(/\\(.)/g, "$1");
    samples.push({ name: m[1], labels, value: Number(m[3]) });
  }
  return samples;
}

function total(samples, name) {
  let sum = 0;
  let seen = false;
  for (const s of samples) if (s.name === name) { sum += s.value; seen = true; }
  return seen ? sum : null;
}

function snapshot(samples) {
  const requests = samples.filter(
    (s) => s.name === "prefixserve_requests_total" && !OWN_ENDPOINTS.has(s.labels.endpoint));
  return {
    at: performance.now(),
    requests,
    numRequests: requests.reduce((a, s) => a + s.value, 0),
    numErrors: requests.filter((s) => /^[45]/.test(s.labels.status || "")).reduce((a, s) => a + s.value, 0),
    numTokens: total(samples, "prefixserve_generated_tokens_total"),
    hits: total(samples, "prefixserve_prefix_cache_hits_total"),
    misses: total(samples, "prefixserve_prefix_cache_misses_total"),
    evictions: total(samples, "prefixserve_prefix_cache_evictions_total"),
    queue: total(samples, "prefixserve_queue_depth"),
    batchSum: total(samples, "prefixserve_batch_size_sum"),
    batchCount: total(samples, "prefixserve_batch_size_count"),
    tenants: tenantFigures(samples),
  };
}

// Per-tenant series (present only for the admin key): {tenant: {running, queued, requests, tokens, refusals}}.
const TENANT_SERIES = {
  prefixserve_tenant_running_requests: "running",
  prefixserve_tenant_queued_requests: "queued",
  prefixserve_tenant_requests_total: "requests",
  prefixserve_tenant_generated_tokens_total: "tokens",
};

function tenantFigures(samples) {
  const tenants = new Map();
  const entry = (name) => {
    if (!tenants.has(name)) tenants.set(name, { running: 0, queued: 0, requests: 0, tokens: 0, refusals: {} });
    return tenants.get(name);
  };
  for (const s of samples) {
    const tenant = s.labels.tenant;
    if (tenant === undefined) continue;
    if (s.name in TENANT_SERIES) entry(tenant)[TENANT_SERIES[s.name]] += s.value;
    else if (s.name === "prefixserve_tenant_refusals_total") {
      const refusals = entry(tenant).refusals;
      refusals[s.labels.reason || "?"] = (refusals[s.labels.reason || "?"] || 0) + s.value;
    }
  }
  return tenants;
}

function rate(now, key) {
  if (!previous || now[key] === null || previous[key] === null) return null;
  const seconds = (now.at - previous.at) / 1000;
  return seconds > 0 ? Math.max(0, now[key] - previous[key]) / seconds : null;
}

function show(id, value, format = integer) {
  $(id).textContent = value === null || Number.isNaN(value) ? "–" : format.format(value);
}

function renderMetrics(now) {
  show("m-requests", now.numRequests);
  const requestRate = rate(now, "numRequests");
  $("m-requests-sub").textContent = `${integer.format(now.numErrors)} ${now.numErrors === 1 ? "error" : "errors"}` +
    (requestRate === null ? "" : ` · ${decimal.format(requestRate)}/s`);
  show("m-tokens", now.numTokens);
  const tokenRate = rate(now, "numTokens");
  $("m-tokens-sub").textContent = tokenRate === null ? "\u00a0" : `${decimal.format(tokenRate)} tokens/s`;
  const lookups = (now.hits || 0) + (now.misses || 0);
  $("m-hit-rate").textContent = lookups ? decimal.format((100 * now.hits) / lookups) + " %" : "–";
  $("m-cache-sub").textContent = `${integer.format(now.hits || 0)} hits · ${integer.format(now.misses || 0)} misses`;
  show("m-evictions", now.evictions);
  show("m-queue", now.queue);
  show("m-batch", now.batchCount ? now.batchSum / now.batchCount : null, decimal);
  $("m-batch-sub").textContent = now.batchCount ? `over ${integer.format(now.batchCount)} steps` : "\u00a0";

  const tbody = $("requests-table").tBodies[0];
  tbody.textContent = "";
  const rows = now.requests.slice().sort((a, b) =>
    (a.labels.endpoint || "").localeCompare(b.labels.endpoint || "") ||
    (a.labels.status || "").localeCompare(b.labels.status || ""));
  for (const s of rows) {
    const row = tbody.insertRow();
    cell(row, s.labels.endpoint || "–");
    cell(row, s.labels.status || "–");
    cell(row, integer.format(s.value), "num");
  }
  if (!rows.length) emptyRow(tbody, 3, "no requests yet");
  renderTenantTable(now.tenants);
}

function renderTenantTable(tenants) {
  const tbody = $("tenant-table").tBodies[0];
  tbody.textContent = "";
  const names = [...tenants.keys()].sort();
  for (const name of names) {
    const t = tenants.get(name);
    const row = tbody.insertRow();
    row.className = "tenant-row";
    row.dataset.tenant = name;
    row.title = "click to see and set this tenant's weight and quotas";
    cell(row, name, "id");
    cell(row, integer.format(t.running), "num");
    cell(row, integer.format(t.queued), "num");
    cell(row, integer.format(t.requests), "num");
    cell(row, integer.format(t.tokens), "num");
    const reasons = Object.entries(t.refusals).filter(([, n]) => n > 0);
    const refused = reasons.reduce((a, [, n]) => a + n, 0);
    const td = cell(row, integer.format(refused), "num");
    if (reasons.length) td.title = reasons.map(([reason, n]) => `${reason}: ${integer.format(n)}`).join(" · ");
    row.addEventListener("click", () => lookUpTenant(name));
  }
  if (!names.length) emptyRow(tbody, 6, "no tenant traffic yet (the per-tenant figures need the admin key)");
  tenantsFromMetrics.clear();
  for (const name of names) tenantsFromMetrics.add(name);
  suggestTenants();
}

async function refreshMetrics() {
  try {
    const text = await (await api("/metrics")).text();
    const now = snapshot(parsePrometheus(text));
    renderMetrics(now);
    previous = now;
    $("metrics-error").textContent = "";
    $("metrics-updated").textContent = "updated " + new Date().toLocaleTimeString("en-GB") +
      ` · every ${REFRESH_MS / 1000} s`;
  } catch (error) {
    $("metrics-error").textContent = describe(error);
  }
}

async function refreshStatus() {
  const status = $("status");
  try {
    await fetch("/healthz").then((r) => { if (!r.ok) throw new Error("healthz " + r.status); });
    const ready = await fetch("/readyz");
    status.dataset.state = ready.ok ? "ready" : "not-ready";
    status.textContent = ready.ok ? "ready" : "alive, not ready (model loading or store unreachable)";
  } catch (_) {
    status.dataset.state = "down";
    status.textContent = "server unreachable";
  }
}

// ---- prefixes -------------------------------------------------------------------------------------------

async function fetchPrefixes() {
  const prefixes = [];
  let cursor = null;
  for (let page = 0; page < MAX_PAGES; page++) {
    const query = new URLSearchParams({ limit: "100" });
    if (cursor) query.set("cursor", cursor);
    const body = await (await api("/v1/prefixes?" + query)).json();
    prefixes.push(...(body.prefixes || []));
    if (!body.next_cursor || body.next_cursor === cursor) break;
    cursor = body.next_cursor;
  }
  return prefixes;
}

function renderPrefixes(prefixes) {
  const tbody = $("prefix-table").tBodies[0];
  tbody.textContent = "";
  for (const p of prefixes) {
    const row = tbody.insertRow();
    row.className = "prefix-row";
    row.dataset.id = p.id;
    row.title = `sha256 ${p.sha256 || "?"} · created ${when(p.created_at)} · click to try it`;
    cell(row, p.id, "id");
    cell(row, integer.format(p.num_virtual_tokens), "num");
    cell(row, p.source || "–");
    cell(row, (p.targets || []).join(", "));
    cell(row, p.dtype || "–");
    cell(row, bytes(p.bytes || 0), "num");
    pill(row.insertCell(), p.public ? "public" : "private", p.public ? "public" : "");
    cell(row, when(p.updated_at));
    row.addEventListener("click", () => selectPrefix(p.id));
  }
  if (!prefixes.length) emptyRow(tbody, 8, "no prefixes visible to this key — upload one with prefixctl upload");
  $("prefix-count").textContent = prefixes.length === 1 ? "1 prefix" : `${prefixes.length} prefixes`;

  const select = $("try-prefix");
  const chosen = select.value;
  select.length = 1; // keep "(bare backbone)"
  for (const p of prefixes) select.add(new Option(p.id, p.id));
  if (prefixes.some((p) => p.id === chosen)) select.value = chosen;

  tenantsFromPrefixes.clear();
  for (const p of prefixes) tenantsFromPrefixes.add(p.tenant || p.id.split("/")[0]);
  suggestTenants();
}

async function refreshPrefixes() {
  try {
    renderPrefixes(await fetchPrefixes());
    $("prefix-error").textContent = "";
  } catch (error) {
    renderPrefixes([]);
    $("prefix-error").textContent = describe(error);
  }
}

function selectPrefix(id) {
  $("try-prefix").value = id;
  $("try-prompt").focus();
}

// ---- tenants: weight, quotas, usage ------------------------------------------------------------------------

// the settings of PUT /v1/tenants/{tenant} and their inputs; an empty input sends null (the default)
const TENANT_FIELDS = [
  ["weight", "t-weight"],
  ["max_concurrent", "t-max-concurrent"],
  ["requests_per_minute", "t-requests-per-minute"],
  ["tokens_per_minute", "t-tokens-per-minute"],
];

function suggestTenants() {
  const list = $("tenant-names");
  list.textContent = "";
  for (const name of [...new Set([...tenantsFromPrefixes, ...tenantsFromMetrics])].sort()) {
    list.appendChild(new Option(name, name));
  }
}

function tenantPath(name) {
  return "/v1/tenants/" + encodeURIComponent(name);
}

function limitText(limit, unit) {
  return limit === null || limit === undefined ? "no limit" : `limit ${integer.format(limit)} ${unit}`;
}

function renderTenant(info, fillForm) {
  const usage = info.usage || {};
  show("t-running", usage.running ?? null);
  show("t-queued", usage.queued ?? null);
  show("t-requests", usage.requests_last_minute ?? null);
  show("t-tokens", usage.tokens_last_minute ?? null);
  $("t-running-sub").textContent = info.max_concurrent == null
    ? "max concurrent: no limit" : `max concurrent ${integer.format(info.max_concurrent)} (running + queued)`;
  $("t-requests-sub").textContent = limitText(info.requests_per_minute, "per minute");
  $("t-tokens-sub").textContent = "prompt + generated · " + limitText(info.tokens_per_minute, "per minute");
  if (fillForm) {
    for (const [field, id] of TENANT_FIELDS) $(id).value = info[field] == null ? "" : String(info[field]);
  }
  $("tenant-view").hidden = false;
  $("tenant-view").dataset.tenant = info.tenant;
}

async function lookUpTenant(name) {
  name = (name || "").trim();
  if (!name) return;
  $("tenant-name").value = name;
  $("tenant-error").textContent = "";
  $("tenant-saved").textContent = "";
  try {
    const info = await (await api(tenantPath(name))).json();
    shownTenant = name;
    renderTenant(info, true);
  } catch (error) {
    shownTenant = null;
    $("tenant-view").hidden = true;
    $("tenant-error").textContent = describe(error);
  }
}

async function refreshTenant() {
  if (!shownTenant) return;
  try {
    renderTenant(await (await api(tenantPath(shownTenant))).json(), false);
  } catch (error) {
    $("tenant-error").textContent = describe(error);
  }
}

async function saveTenant(event) {
  event.preventDefault();
  if (!shownTenant) return;
  const body = {};
  for (const [field, id] of TENANT_FIELDS) {
    const input = $(id);
    if (input.validity.badInput) {
      $("tenant-error").textContent = `${field} must be a number, or empty for the default`;
      return;
    }
    const text = input.value.trim();
    body[field] = text === "" ? null : Number(text);
  }
  $("tenant-save").disabled = true;
  $("tenant-error").textContent = "";
  $("tenant-saved").textContent = "";
  try {
    const headers = { "Content-Type": "application/json" };
    const response = await api(tenantPath(shownTenant), { method: "PUT", headers, body: JSON.stringify(body) });
    const info = await response.json();
    renderTenant(info, true);
    $("tenant-saved").textContent = "saved " + new Date().toLocaleTimeString("en-GB");
  } catch (error) {
    $("tenant-error").textContent = describe(error);
  } finally {
    $("tenant-save").disabled = false;
  }
}

// ---- try a prefix ----------------------------------------------------------------------------------------

const MAX_BEAMS = 16;

// The body of POST /v1/generate from the form; throws an Error whose message says which field is wrong.
function tryBody(prefix) {
  const body = {
    prefix,
    prompt: $("try-prompt").value,
    max_new_tokens: Number($("try-max").value) || 32,
    temperature: Number($("try-temp").value) || 0,
    num_beams: Number($("try-beams").value) || 1,
  };
  const n = $("try-n");
  if (n.validity.badInput) throw new Error("n must be a whole number, or empty for 1");
  if (n.value.trim() !== "") body.n = Number(n.value);
  if ($("try-show-logprobs").checked) {
    const top = $("try-top");
    if (top.validity.badInput) throw new Error("alternatives must be a whole number from 0 to 20");
    body.logprobs = top.value.trim() === "" ? 0 : Number(top.value);
  }
  return body;
}

// Every completion of an answer: `choices` when n > 1, else the top-level fields as the one completion.
function completions(result) {
  if (Array.isArray(result.choices)) return result.choices;
  return [{ index: 0, text: result.text, token_ids: result.token_ids, finish_reason: result.finish_reason,
            logprobs: result.logprobs }];
}

function renderOutput(choices) {
  const output = $("try-output");
  output.textContent = "";
  if (choices.length === 1) { output.textContent = choices[0].text; return; }
  for (const choice of choices) {
    const div = document.createElement("div");
    div.className = "choice";
    div.dataset.index = String(choice.index);
    const head = document.createElement("div");
    head.className = "choice-head";
    head.textContent = `completion ${choice.index} · ${choice.finish_reason}`;
    const text = document.createElement("div");
    text.className = "choice-text";
    text.textContent = choice.text;
    div.append(head, text);
    output.appendChild(div);
  }
}

const quoted = (text) => JSON.stringify(text); // whitespace and newlines visible
const logprobText = (lp) => (lp === null || lp === undefined ? "–" : lp.toFixed(4));

// One table per completion: each generated token, its logprob and probability, and the top alternatives
// (the chosen one highlighted). The server names the alternatives only, so a token's text is known when it
// is among them; otherwise it shows as "?" (its id is in the next column).
function renderLogprobs(choices) {
  const box = $("try-logprobs");
  box.textContent = "";
  for (const choice of choices) {
    if (!Array.isArray(choice.logprobs)) continue;
    const head = document.createElement("div");
    head.className = "subhead";
    head.textContent = (choices.length > 1 ? `completion ${choice.index} · ` : "") +
      "log-probabilities (hover a row for its alternatives)";
    const table = document.createElement("table");
    table.className = "logprobs";
    table.dataset.index = String(choice.index);
    const headRow = table.createTHead().insertRow();
    for (const [label, className] of [["#", "num"], ["Token", ""], ["ID", "num"], ["Logprob", "num"],
                                      ["Prob", ""], ["Top alternatives", ""]]) {
      const th = document.createElement("th");
      th.textContent = label;
      if (className) th.className = className;
      headRow.appendChild(th);
    }
    const tbody = table.createTBody();
    choice.logprobs.forEach((entry, position) => {
      const top = entry.top || [];
      const chosen = top.find((t) => t.token_id === entry.token_id);
      const row = tbody.insertRow();
      row.className = "logprob-row";
      row.dataset.tokenId = String(entry.token_id);
      row.dataset.logprob = String(entry.logprob);
      row.title = top.map((t) => `${quoted(t.text)} ${logprobText(t.logprob)}`).join("\n") || "no alternatives asked for";
      cell(row, String(position), "num");
      const token = cell(row, chosen ? quoted(chosen.text) : "?", "tok");
      if (!chosen) token.title = "not among the alternatives asked for, so the server sent no text for it";
      cell(row, String(entry.token_id), "num");
      cell(row, logprobText(entry.logprob), "num");
      const probability = Math.exp(entry.logprob);
      const prob = cell(row, "");
      const bar = document.createElement("span");
      bar.className = "bar";
      bar.style.width = `${Math.round(40 * probability)}px`;
      prob.append(bar, decimal.format(100 * probability) + " %");
      const alts = cell(row, "", "alts");
      for (const t of top) {
        const alt = document.createElement("span");
        alt.className = "alt" + (t.token_id === entry.token_id ? " chosen" : "");
        alt.textContent = quoted(t.text);
        const lp = document.createElement("span");
        lp.className = "lp";
        lp.textContent = logprobText(t.logprob);
        alt.appendChild(lp);
        alts.appendChild(alt);
      }
    });
    box.append(head, table);
  }
}

async function tryPrefix(event) {
  event.preventDefault();
  const prefix = $("try-prefix").value || null;
  let body;
  try {
    body = tryBody(prefix);
  } catch (error) {
    $("try-error").textContent = error.message;
    return;
  }
  const headers = { "Content-Type": "application/json" };
  if (prefix) headers["X-Prefix-Id"] = prefix;
  $("try-run").disabled = true;
  $("try-error").textContent = "";
  $("try-meta").textContent = "generating…";
  const started = performance.now();
  try {
    const result = await (await api("/v1/generate", { method: "POST", headers, body: JSON.stringify(body) })).json();
    const seconds = (performance.now() - started) / 1000;
    const choices = completions(result);
    renderOutput(choices);
    renderLogprobs(choices);
    const usage = result.usage || {};
    const many = choices.length > 1 ? `${choices.length} completions · ` : `${result.finish_reason} · `;
    $("try-meta").textContent = `${many}${usage.prompt_tokens} prompt + ` +
      `${usage.completion_tokens} generated tokens · ${decimal.format(seconds)} s`;
    refreshMetrics();
    refreshTenant();
  } catch (error) {
    $("try-output").textContent = "";
    $("try-logprobs").textContent = "";
    $("try-meta").textContent = "";
    $("try-error").textContent = describe(error);
  } finally {
    $("try-run").disabled = false;
  }
}

function setUpTryForm() {
  const beams = $("try-beams");
  for (let k = 1; k <= MAX_BEAMS; k++) beams.add(new Option(String(k), String(k)));
  beams.value = "1";
  $("try-show-logprobs").addEventListener("change", () => { $("try-top").disabled = !$("try-show-logprobs").checked; });
  $("try-form").addEventListener("submit", tryPrefix);
}

// ---- wiring --------------------------------------------------------------------------------------------

function useKey(event) {
  event.preventDefault();
  apiKey = $("api-key").value.trim();
  if (apiKey) localStorage.setItem(KEY_STORAGE, apiKey);
  else localStorage.removeItem(KEY_STORAGE);
  refreshAll();
}

function forgetKey() {
  apiKey = "";
  $("api-key").value = "";
  localStorage.removeItem(KEY_STORAGE);
  refreshAll();
}

function refreshAll() {
  refreshStatus();
  refreshPrefixes();
  refreshMetrics();
  refreshTenant();
}

$("api-key").value = apiKey;
$("key-form").addEventListener("submit", useKey);
$("forget-key").addEventListener("click", forgetKey);
$("refresh-prefixes").addEventListener("click", refreshPrefixes);
setUpTryForm();
$("tenant-lookup").addEventListener("submit", (event) => { event.preventDefault(); lookUpTenant($("tenant-name").value); });
$("tenant-form").addEventListener("submit", saveTenant);
refreshAll();
setInterval(() => { refreshMetrics(); refreshStatus(); }, REFRESH_MS);
