// henge-mqtt console: the fleet at a glance, live. No build step, no dependencies: it ships in the package.
// State lives in one Map (device -> status row), patched from the event stream and rendered at most
// every 300 ms, so a reconnect storm of thousands of events costs one render, not thousands.
"use strict";

const API = "/api/v1";
const MAX_ROWS = 100; // rows in the DOM, a page; the filters narrow the rest (500 cost a storm 100 ms of layout)
const $ = (id) => document.getElementById(id);
const state = { token: sessionStorage.getItem("henge-token") || "", role: "", rows: new Map(), lastId: "",
  sort: { key: "device", dir: 1 }, dirty: false, reloadTimer: 0, stream: null, device: "",
  where: "", whereMatches: null, // the --where filter (docs/where.md), answered by the service: a Set of ids
  page: 1, fleetHash: "#/" }; // the table's page (MAX_ROWS each); the fleet view's URL, for "All devices"

class ApiError extends Error {
  constructor(problem) { super(problem.detail || problem.title); this.problem = problem; }
}

async function api(path, opts = {}) {
  return (await apiTagged(path, opts)).body;
}

async function apiTagged(path, opts = {}) { // the body, and the ETag the answer carries

  const headers = Object.assign({ Authorization: `Bearer ${state.token}` }, opts.headers || {});
  const res = await fetch(API + path, Object.assign({}, opts, { headers }));
  if (res.status === 401) { signOut("Your token is unknown or was revoked."); throw new ApiError({ detail: "unauthorized" }); }
  const text = await res.text();
  const body = text ? JSON.parse(text) : null;
  if (!res.ok) throw new ApiError(body || { detail: res.statusText });
  return { body, tag: res.headers.get("ETag") };
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v; else if (k === "text") node.textContent = v; else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

function age(iso) {
  if (!iso) return "-";
  const s = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  if (s < 60) return `${Math.floor(s)}s ago`;
  if (s < 3600) return `${Math.floor(s / 60)}m ago`;
  if (s < 86400) return `${Math.floor(s / 3600)}h ago`;
  return `${Math.floor(s / 86400)}d ago`;
}

// A time as people read it (relative), the exact time on hover.
function when(iso) {
  if (!iso) return el("span", { text: "-" });
  return el("time", { datetime: iso, title: new Date(iso).toISOString().replace(/\.\d+Z$/, "Z"), text: age(iso) });
}

function syncText(s) {
  return !s.desired_version ? "no config" : s.sync;
}

// ---- sign in / out ---------------------------------------------------------------------------------

function signOut(message) {
  sessionStorage.removeItem("henge-token");
  state.token = "";
  if (state.stream) state.stream.abort();
  show("login");
  $("login-error").textContent = message || "";
  $("signout").hidden = true;
  $("who").textContent = "";
}

async function signIn(token) {
  state.token = token;
  try {
    const me = await api("/me");
    state.role = me.role;
    sessionStorage.setItem("henge-token", token);
    $("who").textContent = `${me.name} (${me.role})`;
    $("signout").hidden = false;
    // The table is drawn from the first page; the rest loads behind it.
    await new Promise((resolve, reject) => { loadAll(resolve).then(resolve, reject); });
    loadRollouts().catch(() => {});
    connectStream();
    route();
  } catch (e) {
    if (e instanceof ApiError) signOut(e.message === "unauthorized" ? "That token is unknown or was revoked." : e.message);
    else signOut("Cannot reach the service.");
  }
}

function show(section) {
  for (const id of ["login", "fleet", "device", "audit", "tokens", "layers"]) $(id).hidden = id !== section;
}

// ---- fleet table --------------------------------------------------------------------------------------

async function loadAll(firstPage = () => {}) {
  // The first page first (the table is drawn from it at once), then the rest by cursor in large
  // pages, drawn as they come: a fleet of 100,000 shows its first rows in one small request.
  // A reload (devices added or removed) keeps showing the complete table it has until the new one is.
  const rows = new Map(), progressive = state.rows.size === 0;
  let cursor = "", first = true;
  state.partial = progressive;
  try {
    for (;;) {
      const page = await api(`/devices?limit=${first ? MAX_ROWS : 5000}${cursor ? `&cursor=${encodeURIComponent(cursor)}` : ""}`);
      for (const row of page.items) rows.set(row.device, row);
      if (!state.lastId) state.lastId = page.last_event_id;
      if (first && progressive) { state.rows = rows; renderNow(); }
      if (first) firstPage();
      first = false;
      if (!page.next_cursor) break;
      cursor = page.next_cursor;
    }
  } finally {
    state.partial = false;
  }
  state.rows = rows;
  markDirty();
}

function markDirty() { // events: at most one render per 300 ms, however many arrive
  if (state.dirty) return;
  state.dirty = true;
  setTimeout(() => requestAnimationFrame(render), 300);
}

function renderNow() { // what the operator typed or clicked: the next frame
  state.dirty = true;
  requestAnimationFrame(() => { if (state.dirty) render(); });
}

function scheduleReload() {
  clearTimeout(state.reloadTimer);
  state.reloadTimer = setTimeout(() => loadAll().catch(() => {}), 1000);
}

function syncOf(row) { // as the service computes it (DeviceReports.sync); drift needs hashes: reloaded instead
  if (row.applied_version == null && row.rejected_version == null) return "unknown";
  if (row.applied_version != null && row.applied_version >= row.desired_version) return "in_sync";
  if (row.rejected_version === row.desired_version) return "rejected";
  return "pending";
}

function filtered() {
  const q = $("f-q").value.trim(), st = $("f-state").value, sy = $("f-sync").value;
  const conflicts = $("f-conflict").checked;
  const [lk, lv] = $("f-label").value.includes("=") ? $("f-label").value.split("=", 2) : [null, null];
  const out = [];
  for (const row of state.rows.values()) {
    if (state.whereMatches && !state.whereMatches.has(row.device)) continue;
    if (q && !row.device.includes(q)) continue;
    if (st && row.state !== st) continue;
    if (sy && row.sync !== sy) continue;
    if (conflicts && !row.conflict) continue;
    if (lk !== null && row.labels[lk.trim()] !== lv.trim()) continue;
    out.push(row);
  }
  const { key, dir } = state.sort;
  // By id, the rows are nearly always in order already (the service sends them so): one pass to
  // check instead of a sort of 100,000 rows on every render of an event storm.
  if (key === "device" && out.every((row, i) => i === 0 || (out[i - 1].device < row.device) === (dir > 0))) return out;
  out.sort((a, b) => {
    const x = a[key] ?? "", y = b[key] ?? "";
    return (x < y ? -1 : x > y ? 1 : 0) * dir || (a.device < b.device ? -1 : 1);
  });
  return out;
}

const CARD_FILTER = { online: "state=online", offline: "state=offline", quarantined: "state=quarantined",
  in_sync: "sync=in_sync", pending: "sync=pending", rejected: "sync=rejected", invalid: "sync=invalid",
  drift: "sync=drift", conflicts: "conflict=1" };
const VIEW_FIELDS = { q: "f-q", state: "f-state", sync: "f-sync", label: "f-label", where: "f-where" };

function viewHash() { // the fleet view as a URL: filters, sort and page
  const p = new URLSearchParams();
  for (const [key, id] of Object.entries(VIEW_FIELDS)) if ($(id).value.trim()) p.set(key, $(id).value.trim());
  if ($("f-conflict").checked) p.set("conflict", "1");
  if (state.sort.key !== "device" || state.sort.dir !== 1) p.set("sort", (state.sort.dir < 0 ? "-" : "") + state.sort.key);
  if (state.page > 1) p.set("page", String(state.page));
  const query = p.toString();
  return "#/" + (query ? `?${query}` : "");
}

function saveView() { // in the address bar without a new history entry per keystroke
  state.fleetHash = viewHash();
  if (!state.device && location.hash !== state.fleetHash && !(location.hash === "" && state.fleetHash === "#/")) {
    history.replaceState(null, "", state.fleetHash);
  }
}

function loadView(hash) { // a fleet URL's filters into the form
  const p = new URLSearchParams(hash.replace(/^#\/?\??/, ""));
  for (const [key, id] of Object.entries(VIEW_FIELDS)) $(id).value = p.get(key) || "";
  $("f-conflict").checked = p.get("conflict") === "1";
  const sort = p.get("sort") || "device";
  state.sort = { key: sort.replace(/^-/, ""), dir: sort.startsWith("-") ? -1 : 1 };
  state.page = Math.max(1, parseInt(p.get("page") || "1", 10) || 1);
  if ($("f-where").value.trim() !== state.where) loadWhere().catch(() => {});
}

function turnPage(by) {
  const pages = Math.max(1, Math.ceil(filtered().length / MAX_ROWS));
  const next = Math.min(pages, Math.max(1, state.page + by));
  if (next === state.page) return;
  state.page = next;
  saveView();
  renderNow();
}

function renderSummary() {
  if (state.partial) return; // counts of part of the fleet would be wrong: the cards wait for all of it
  const c = { devices: 0, online: 0, offline: 0, quarantined: 0, in_sync: 0, pending: 0, rejected: 0, invalid: 0,
    drift: 0, conflicts: 0 };
  for (const row of state.rows.values()) {
    c.devices++; c[row.state]++; if (row.sync in c) c[row.sync]++; if (row.conflict) c.conflicts++;
  }
  const items = [["devices", "Devices"], ["online", "Online"], ["offline", "Offline"], ["in_sync", "In sync"],
    ["pending", "Pending"], ["rejected", "Rejected"], ["conflicts", "Conflicts"]];
  if (c.quarantined) items.splice(3, 0, ["quarantined", "Quarantined"]);
  if (c.invalid) items.splice(items.length - 1, 0, ["invalid", "Invalid"]);
  if (c.drift) items.splice(items.length - 1, 0, ["drift", "Drift"]);
  // Each card is a link to its filter: a view to open, reload and share.
  $("summary").replaceChildren(...items.map(([k, label]) => el("li", { id: `sum-${k}` },
    el("a", { href: "#/" + (CARD_FILTER[k] ? `?${CARD_FILTER[k]}` : "") }, el("b", { text: String(c[k]) }), label))));
}

const drawn = new Map(), drawing = new Set(); // device -> { tr, cells } in the table now; those of this render

function cellsOf(row) { // [class, text, title] of each cell after the device's own
  const labels = Object.entries(row.labels).map(([k, v]) => `${k}=${v}`).join(", ");
  const version = row.desired_version ? `v${row.desired_version}` + (row.applied_version ? ` (applied v${row.applied_version})` : "") : "-";
  return [
    [`state-${row.state}`, row.state + (row.conflict ? " ⚠ conflict" : "")],
    [`wrap sync-${row.sync}`, syncText(row) + (row.sync === "rejected" && row.error ? `: ${row.error}`
      : row.sync === "invalid" && row.schema_error ? `: ${row.schema_error}` : "")],
    ["version", version],
    ["wide", age(row.since), row.since || ""],
    ["wide", row.remote || "-"],
    ["wide", labels || "-"]];
}

function rowFor(row) { // the device's table row, made once and then only its changed cells written
  let shown = drawn.get(row.device);
  if (!shown) {
    const tr = el("tr", { "data-device": row.device },
      el("td", {}, el("a", { href: `#/device/${encodeURIComponent(row.device)}`, text: row.device })));
    for (let i = 0; i < 6; i++) tr.append(el("td"));
    shown = { tr, cells: [] };
    drawn.set(row.device, shown);
  }
  drawing.add(row.device);
  const { tr, cells } = shown;
  if (tr.dataset.state !== row.state) tr.dataset.state = row.state;
  if (tr.dataset.sync !== row.sync) tr.dataset.sync = row.sync;
  cellsOf(row).forEach(([cls, text, title], i) => {
    const was = cells[i], td = tr.cells[i + 1];
    if (!was || was[0] !== cls) td.className = cls;
    if (!was || was[1] !== text) td.textContent = text;
    if (title !== undefined && (!was || was[2] !== title)) td.title = title;
    cells[i] = [cls, text, title];
  });
  return tr;
}

function render() {
  state.dirty = false;
  renderSummary();
  if ($("fleet").hidden) return;
  const rows = filtered();
  const pages = Math.max(1, Math.ceil(rows.length / MAX_ROWS));
  if (state.page > pages) state.page = pages;
  const first = (state.page - 1) * MAX_ROWS;
  // Rows already drawn are kept and only their changed cells written: a storm changes a few cells
  // of each row, and rebuilding 500 rows cost Chromium more in style and layout than the script.
  const trs = rows.slice(first, first + MAX_ROWS).map(rowFor);
  const body = $("devices").tBodies[0];
  if (trs.length !== body.rows.length || trs.some((tr, i) => body.rows[i] !== tr)) body.replaceChildren(...trs);
  for (const device of drawn.keys()) if (!drawing.has(device)) drawn.delete(device);
  drawing.clear();
  $("shown").textContent = rows.length > MAX_ROWS
    ? `Devices ${first + 1}-${Math.min(first + MAX_ROWS, rows.length)} of ${rows.length} matching (${state.rows.size} in all), ` +
      `page ${state.page} of ${pages}: n / p for the next and previous page.`
    : `${rows.length} of ${state.rows.size} devices.`;
  if (state.partial) $("shown").textContent += " Loading the rest…";
  $("page-prev").disabled = state.page <= 1;
  $("page-next").disabled = state.page >= pages;
  $("pager").hidden = pages <= 1;
  for (const b of document.querySelectorAll("th button[data-sort]")) {
    if (b.dataset.sort === state.sort.key) b.setAttribute("aria-sort", state.sort.dir > 0 ? "ascending" : "descending");
    else b.removeAttribute("aria-sort");
  }
}

// ---- rollouts -------------------------------------------------------------------------------------------

let rolloutTimer = 0;
function scheduleRollouts() {
  clearTimeout(rolloutTimer);
  rolloutTimer = setTimeout(() => loadRollouts().catch(() => {}), 300);
}

async function loadRollouts() {
  const all = await api("/rollouts");
  const shown = all.filter((r) => ["running", "paused", "reverting"].includes(r.state)).concat(
    all.filter((r) => !["running", "paused", "reverting"].includes(r.state)).slice(-3));
  const details = await Promise.all(shown.map((r) => api(`/rollouts/${encodeURIComponent(r.id)}`)));
  $("rollouts").hidden = details.length === 0;
  $("rollout-list").replaceChildren(...details.reverse().map((r) => {
    const waves = r.waves.map((w) => {
      const done = w.applied + w.rejected;
      return el("li", { "data-wave": String(w.wave) },
        el("span", { text: `wave ${w.wave}: ${w.targeted} devices` }), " ",
        el("progress", { max: String(Math.max(1, w.targeted)), value: String(done), "aria-label": `wave ${w.wave} reported` }),
        el("span", { text: w.published ? ` ${w.applied} applied, ${w.rejected} rejected, ${w.offline} offline, ${w.pending} pending` +
          (w.reverted ? `, ${w.reverted} reverted` : "") : " not yet out" }));
    });
    return el("article", { class: "rollout", "data-rollout": r.id, "data-state": r.state },
      el("h4", { text: `${r.id}: ${r.state}` + (r.reason ? ` (${r.reason})` : "") + (r.message ? ` — ${r.message}` : "") }),
      el("ol", { class: "waves" }, ...waves), rolloutActions(r));
  }));
}

// What an operator can do with a rollout that is still going: pause, resume, abort (and revert).
function rolloutActions(r) {
  const actions = [];
  if (r.state === "running") actions.push(["Pause", "pause"]);
  if (r.state === "paused") actions.push(["Resume", "resume"]);
  if (r.state === "running" || r.state === "paused") {
    actions.push(["Abort", "abort"], ["Abort and revert", "abort?revert=true"]);
  }
  const buttons = actions.map(([label, path]) => {
    const b = el("button", { type: "button", text: label, "data-action": path.replace("?revert=true", "-revert") });
    allow(b, "operator", "");
    b.onclick = () => rolloutAction(r.id, label, path).catch((e) => {
      $("rollout-note").className = "error"; $("rollout-note").textContent = e.message;
    });
    return b;
  });
  return el("p", { class: "filters" }, ...buttons);
}

async function rolloutAction(id, label, path) {
  if (path.startsWith("abort") && !confirm(`${label} rollout ${id}? It stops for good` +
      (path.includes("revert") ? ", and the devices it changed get their versions from before it." : "."))) return;
  $("rollout-note").className = "help";
  $("rollout-note").textContent = `${label}: asked…`;
  const r = await api(`/rollouts/${encodeURIComponent(id)}/${path}`, { method: "POST" });
  $("rollout-note").textContent = `${label}: rollout ${r.id} is ${r.state}` + (r.reason ? ` (${r.reason}).` : ".");
  scheduleRollouts();
}

// ---- the fleet over time (GET /series: stored a point a minute, kept a week), drawn as plain SVG -------------

const SERIES = [["online", "Online", "line-online"], ["in_sync", "In sync", "line-sync"], ["rejected", "Rejected", "line-rejected"]];
const SVG_NS = "http://www.w3.org/2000/svg";

async function loadChart() {
  const r = await api(`/series?window=${state.chartWindow || "24h"}`);
  drawChart(r);
}

function drawChart(r) {
  const W = 800, H = 160, span = (r.window === "7d" ? 7 * 24 : 24) * 3600e3, end = Date.now(), start = end - span;
  const top = Math.max(1, ...r.points.map((p) => p.devices));
  const x = (p) => (((Date.parse(p.at) - start) / span) * W).toFixed(1);
  const y = (v) => (H - (v / top) * (H - 4)).toFixed(1);
  const svg = $("chart");
  const nodes = [0.5, 1].map((f) => { // gridlines at half and full
    const line = document.createElementNS(SVG_NS, "line");
    line.setAttribute("x1", "0"); line.setAttribute("x2", String(W));
    line.setAttribute("y1", y(top * f)); line.setAttribute("y2", y(top * f));
    line.setAttribute("class", "grid");
    return line;
  });
  for (const [key, , cls] of SERIES) { // a line per run of points: a gap (the service was down) stays a gap
    let run = [], last = 0;
    const flush = () => {
      if (!run.length) return;
      const line = document.createElementNS(SVG_NS, "polyline");
      line.setAttribute("points", run.join(" "));
      line.setAttribute("class", cls);
      line.setAttribute("data-series", key);
      nodes.push(line);
      run = [];
    };
    for (const p of r.points) {
      const at = Date.parse(p.at);
      if (run.length && at - last > 2 * r.step_s * 1000) flush();
      run.push(`${x(p)},${y(p[key])}`);
      last = at;
    }
    flush();
  }
  svg.replaceChildren(...nodes);
  svg.dataset.points = String(r.points.length);
  svg.dataset.window = r.window;
  const latest = r.points[r.points.length - 1];
  $("chart-legend").replaceChildren(...SERIES.map(([key, label, cls]) => el("li", { class: cls, "data-series": key },
    el("span", { class: "swatch", "aria-hidden": "true" }), `${label} `, el("b", { text: latest ? String(latest[key]) : "-" }))));
  $("chart-max").textContent = String(top);
  $("chart-from").textContent = r.window === "7d" ? "7 days ago" : "24 hours ago";
  $("chart-desc").textContent = r.points.length
    ? `${r.points.length} points (one per ${r.step_s / 60} min), ${latest.devices} devices at the last: ${latest.online} online, ` +
      `${latest.in_sync} in sync, ${latest.rejected} rejected.`
    : "No points yet: the service keeps one a minute.";
  for (const b of document.querySelectorAll("#history button[data-window]")) {
    b.setAttribute("aria-pressed", String(b.dataset.window === r.window));
  }
}

// ---- live events (fetch, not EventSource: it must send the Authorization header) ------------------------

function applyEvent(ev) {
  const row = ev.device ? state.rows.get(ev.device) : null;
  switch (ev.type) {
    case "connected": case "disconnected":
      if (row) {
        Object.assign(row, { online: ev.type === "connected", epoch: ev.data.epoch, reason: ev.data.reason,
          remote: ev.data.remote, since: ev.at });
        row.state = row.online ? "online" : (row.state === "quarantined" ? "quarantined" : "offline");
      }
      break;
    case "config_published":
      if (row && row.sync === "drift") scheduleReload();
      if (row) { row.desired_version = ev.data.version; row.schema_error = null; row.sync = syncOf(row); row.error = null; }
      break;
    case "reported": // only a new config hash can change sync (drift); other members matter to a where filter
      if (row && (ev.data.changed || []).includes("config_sha256")) scheduleReload();
      if (state.where && !whereTimer) scheduleWhere(2000);
      break;
    case "report":
      if (row && row.sync === "drift") scheduleReload();
      if (row) {
        if (ev.data.status === "applied") row.applied_version = Math.max(row.applied_version || 0, ev.data.version);
        else { row.rejected_version = ev.data.version; row.error = ev.data.error; }
        row.sync = syncOf(row);
      }
      break;
    case "device_added": case "device_removed": case "labels_changed": case "devices_imported": case "fleet_push":
    case "conflict": case "conflict_cleared": case "quarantine": case "schema_set": case "schema_removed":
    case "rollout_wave": case "rollout_reverted": case "layer_applied":
      scheduleReload();
      break;
    default:
      if (ev.device && !row) scheduleReload();
  }
  if (state.device && ev.device === state.device) scheduleDevice();
  if (ev.type.startsWith("rollout_") || (ev.type === "report" && !$("rollouts").hidden)) scheduleRollouts();
  markDirty();
}

async function connectStream() {
  if (state.stream) state.stream.abort();
  const ctrl = new AbortController();
  state.stream = ctrl;
  const live = $("live");
  try {
    const headers = { Authorization: `Bearer ${state.token}` };
    if (state.lastId) headers["Last-Event-ID"] = state.lastId;
    const res = await fetch(`${API}/events`, { headers, signal: ctrl.signal });
    if (!res.ok) throw new Error(String(res.status));
    live.textContent = "live"; live.classList.add("on");
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const frame = buf.slice(0, cut); buf = buf.slice(cut + 2);
        let id = "", type = "message", data = "";
        for (const line of frame.split("\n")) {
          if (line.startsWith("id: ")) id = line.slice(4);
          else if (line.startsWith("event: ")) type = line.slice(7);
          else if (line.startsWith("data: ")) data += line.slice(6);
        }
        if (id) state.lastId = id;
        if (type === "reset" || type === "dropped") { scheduleReload(); continue; }
        if (type === "message" && data) applyEvent(JSON.parse(data));
      }
    }
  } catch (e) {
    if (ctrl.signal.aborted) return;
  }
  live.textContent = "reconnecting"; live.classList.remove("on");
  if (state.token && state.stream === ctrl) setTimeout(connectStream, 2000);
}

// ---- device page ----------------------------------------------------------------------------------------

let deviceTimer = 0;
let whereTimer = 0;
function scheduleWhere(delay = 400) { // 400 ms after typing; 2 s after devices report (a fleet reports a lot)
  clearTimeout(whereTimer);
  whereTimer = setTimeout(() => loadWhere().catch(() => {}), delay);
}

async function loadWhere() { // the ids the service says the filter matches (it parses it: one grammar)
  whereTimer = 0;
  const text = $("f-where").value.trim();
  state.where = text;
  if (!text) { state.whereMatches = null; $("f-where-error").textContent = ""; markDirty(); return; }
  const ids = new Set();
  let cursor = "";
  try {
    do {
      const page = await api(`/devices?limit=10000&where=${encodeURIComponent(text)}` +
        (cursor ? `&cursor=${encodeURIComponent(cursor)}` : ""));
      for (const row of page.items) ids.add(row.device);
      cursor = page.next_cursor;
    } while (cursor);
  } catch (e) {
    if (state.where === text) { $("f-where-error").textContent = e.message; state.whereMatches = new Set(); markDirty(); }
    return;
  }
  if (state.where !== text) return; // typed on meanwhile
  $("f-where-error").textContent = "";
  state.whereMatches = ids;
  markDirty();
}

const RANK = { viewer: 0, operator: 1, admin: 2 };

function allow(button, needs, why) { // a button the role cannot use says why, and the API refuses it anyway
  const ok = RANK[state.role] >= RANK[needs];
  button.disabled = !ok || Boolean(why);
  button.title = !ok ? `Your role (${state.role}) cannot: this needs ${needs}.` : why || "";
}

function say(id, text, bad = false) { // a note under a form: help, or an error
  $(id).className = bad ? "error" : "help";
  $(id).textContent = text;
}

const actionNote = (text, bad = false) => say("act-note", text, bad);

function diffInto(pre, text) { // a unified diff, its added and removed lines marked
  pre.replaceChildren(...text.split("\n").map((line) => el("span",
    { class: line.startsWith("+") && !line.startsWith("+++") ? "add" : line.startsWith("-") && !line.startsWith("---") ? "del" : "",
      text: line + "\n" })));
  pre.hidden = false;
}

// After a 412 the edit is kept: a button makes it apply to what is there now; under the diff of what
// changed meanwhile, when there is one to show.
function offerRebase(box, noteId, label, after, rebased, diff) {
  const rebase = el("button", { type: "button", text: label });
  rebase.addEventListener("click", async () => {
    await rebased();
    box.replaceChildren();
    say(noteId, after);
  });
  box.replaceChildren(...(diff === undefined ? [] : [el("pre", { class: "diff-note", text: diff })]), rebase);
}

function named(r) { // the devices a preview names: ": a, b and 3 more." or "."
  return r.devices.length ? `: ${r.devices.join(", ")}${r.more ? ` and ${r.more} more` : ""}.` : ".";
}

async function act(run) {
  try { await run(); } catch (e) { actionNote(e.message, true); }
}

function wireActions(id, s, labels) {
  allow($("act-kick"), "operator", s.online ? "" : "It is not connected.");
  allow($("act-clear"), "operator", s.conflict || s.quarantined_until ? "" : "It has no identity conflict.");
  allow($("act-rotate"), "admin", "");
  allow($("labels-save"), "admin", "");
  allow($("remove-button"), "admin", $("remove-confirm").value === id ? "" : "Type the device id first.");
  $("labels-edit").readOnly = RANK[state.role] < RANK.admin;
  if (!$("labels-edit").dataset.touched) {
    $("labels-edit").value = Object.entries(labels).map(([k, v]) => `${k}=${v}`).join(", ");
  }
  const path = `/devices/${encodeURIComponent(id)}`;
  $("act-kick").onclick = () => act(async () => {
    const r = await api(`${path}/kick`, { method: "POST" });
    actionNote(r.kicked ? "Its connection was closed; it may connect again." : r.detail || "It was not connected.");
  });
  $("act-clear").onclick = () => act(async () => {
    const r = await api(`${path}/clear-conflict`, { method: "POST" });
    actionNote(r.cleared ? "The conflict and any quarantine are cleared." : "There was no conflict to clear.");
  });
  $("act-rotate").onclick = () => act(async () => {
    const r = await api(`${path}/secret`, { method: "POST" });
    $("secret-value").textContent = r.secret;
    $("secret-box").hidden = false;
    actionNote("A new secret is set; its connection was closed. Give the device the secret above.");
  });
  $("labels-form").onsubmit = (e) => { e.preventDefault(); act(async () => {
    const wanted = parseLabels($("labels-edit").value);
    const base = state.labelsBase || { labels, tag: null };
    const remove = Object.keys(base.labels).filter((k) => !(k in wanted));
    const headers = { "Content-Type": "application/json" };
    if (base.tag) headers["If-Match"] = base.tag; // labels changed meanwhile: refused (412), never written over
    let r;
    try {
      r = await api(`${path}/labels`, { method: "PATCH", headers, body: JSON.stringify({ set: wanted, remove }) });
    } catch (e) {
      if (e.problem && e.problem.status === 412) { await showLabelsConflict(id, base.labels, e.problem.current); return; }
      throw e;
    }
    $("labels-conflict").replaceChildren();
    $("labels-edit").dataset.touched = "";
    actionNote(`Labels saved: ${Object.entries(r.labels).map(([k, v]) => `${k}=${v}`).join(", ") || "none"}.`);
  }); };
  $("remove-confirm").oninput = () => allow($("remove-button"), "admin",
    $("remove-confirm").value === id ? "" : "Type the device id first.");
  $("remove-form").onsubmit = (e) => { e.preventDefault(); act(async () => {
    if ($("remove-confirm").value !== id) throw new Error("Type the device id to remove it.");
    await api(path, { method: "DELETE" });
    state.rows.delete(id);
    location.hash = state.fleetHash;
  }); };
}

// Someone changed the labels since this edit began: who, from what to what; the edit kept to rebase.
async function showLabelsConflict(id, was, now) {
  const text = (l) => Object.entries(l).map(([k, v]) => `${k}=${v}`).join(", ") || "none";
  const trail = await api(`/devices/${encodeURIComponent(id)}/audit?limit=20`).catch(() => []);
  const last = [...trail].reverse().find((e) => e.action === "device.label");
  actionNote(`Not saved: the labels changed since you opened them (${text(was)} → ${text(now)}` +
    (last ? `, by ${last.actor}` : "") + "). Your edit is kept; rebase it onto theirs and save again.", true);
  offerRebase($("labels-conflict"), "act-note", "Rebase my edit onto their labels",
    "Your edit now applies to their labels: save when ready.", async () => {
      const fresh = await apiTagged(`/devices/${encodeURIComponent(id)}`);
      state.labelsBase = { tag: fresh.tag, labels: fresh.body.labels };
    });
}

function parseLabels(text) { // "k=v, k2=v2" as the label forms take it
  const labels = {};
  for (const part of text.split(",").map((p) => p.trim()).filter(Boolean)) {
    const at = part.indexOf("=");
    if (at < 1) throw new Error(`${part}: a label is k=v`);
    labels[part.slice(0, at).trim()] = part.slice(at + 1).trim();
  }
  return labels;
}

function copyButton(button, code, note) { // copy a secret shown once; select it where the clipboard is refused
  button.addEventListener("click", () => {
    const text = code.textContent;
    const select = () => { getSelection().selectAllChildren(code); note("Selected: copy it with Ctrl+C."); };
    if (navigator.clipboard) navigator.clipboard.writeText(text).then(() => note("Copied."), select);
    else select();
  });
}

// ---- a fleet push: previewed (which devices change, one diff) before it is stored ---------------------------

const manyNote = (text, bad = false) => say("many-note", text, bad);

function manyBody() { // the push's target and config as the form says them now
  const kind = $("many-target").value, text = $("many-select").value.trim();
  const body = { config: JSON.parse($("many-config").value || "null") };
  if (!body.config || typeof body.config !== "object" || Array.isArray(body.config)) throw new Error("The config is a JSON object.");
  if (kind === "all") body.all = true;
  else if (kind === "where") { if (!text) throw new Error("Give the filter (docs/where.md)."); body.where = text; }
  else { body.labels = parseLabels(text); if (!Object.keys(body.labels).length) throw new Error("Give a label, k=v."); }
  return body;
}

function wireMany() {
  const waves = $("many-how").value === "rollout";
  $("many-waves").hidden = !waves;
  allow($("many-preview"), "viewer", "");
  const previewed = state.previewed && state.previewed.key === manyKey() ? state.previewed : null;
  allow($("many-push"), "operator", previewed ? (previewed.change ? "" : "No device would change.")
    : "Preview first: see which devices change, and how.");
  $("many-push").textContent = !previewed || !previewed.change ? (waves ? "Start rollout" : "Push")
    : waves ? `Start rollout of ${previewed.targeted} devices` : `Push to ${previewed.change} devices`;
}

function manyKey() { // what a preview was of: it stands while these do not change
  return JSON.stringify([...document.querySelectorAll("#many-form input, #many-form select, #many-form textarea")]
    .filter((e) => e.id !== "many-message").map((e) => e.value));
}

function rolloutArgs() { // the waves and thresholds as POST /rollouts takes them
  const args = { max_rejected: $("r-max").value.trim() || "1", min_applied: Number($("r-min").value || 90),
    wave_timeout: Number($("r-timeout").value || 300), pause: Number($("r-pause").value || 0) };
  if ($("r-size").value) args.wave_size = Number($("r-size").value);
  else {
    args.waves = $("r-waves").value.split(",").map((w) => Number(w.trim()));
    if (args.waves.some((w) => !(w > 0))) throw new Error("Waves are cumulative percentages: 1,10,50,100.");
  }
  return args;
}

async function previewMany(event) {
  event.preventDefault();
  state.previewed = null;
  $("many-diff").hidden = true;
  $("many-wave-sizes").hidden = true;
  try {
    const key = manyKey(), waves = $("many-how").value === "rollout";
    const body = waves ? Object.assign(manyBody(), rolloutArgs()) : manyBody();
    const r = await api(waves ? "/rollouts/preview" : "/push/preview", { method: "POST",
      headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
    state.previewed = { key, change: r.change, targeted: r.targeted };
    if (waves) {
      $("many-wave-sizes").replaceChildren(...r.waves.map((n, i) => el("li", { text: `wave ${i + 1}: ${n} devices` })));
      $("many-wave-sizes").hidden = false;
      manyNote(`Would roll out to ${r.targeted} devices in ${r.waves.length} waves, changing the config of ` +
        `${r.change} (${r.unchanged} already there). A wave goes on when ${body.min_applied}% of its online devices ` +
        `applied within ${body.wave_timeout} s, and halts at more than ${body.max_rejected} rejections.` +
        (r.example ? ` The change for ${r.example.device}:` : " Nothing was started."));
    } else {
      manyNote(`Would change ${r.change} of ${r.targeted} devices (${r.unchanged} already there)` + named(r) +
        (r.example ? ` The change for ${r.example.device}:` : " Nothing was stored."));
    }
    if (r.example) diffInto($("many-diff"), r.example.diff);
  } catch (e) { manyNote(e instanceof SyntaxError ? `The config is not JSON: ${e.message}` : e.message, true); }
  wireMany();
}

async function pushMany() {
  if (!state.previewed || state.previewed.key !== manyKey()) { wireMany(); return; }
  try {
    $("many-push").disabled = true;
    const body = Object.assign(manyBody(), { message: $("many-message").value });
    if ($("many-how").value === "rollout") {
      const r = await api("/rollouts", { method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify(Object.assign(body, rolloutArgs())) });
      state.previewed = null;
      $("many-diff").hidden = true; $("many-wave-sizes").hidden = true;
      manyNote(`Rollout ${r.id} started: ${r.devices} devices in ${r.waves.length} waves (follow it above).`);
      scheduleRollouts();
      wireMany();
      return;
    }
    manyNote("Storing and delivering…");
    const r = await api("/push", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
    state.previewed = null;
    $("many-diff").hidden = true;
    manyNote(`Pushed: ${r.targeted} devices, ${r.unchanged} unchanged; ${r.online} online, ` +
      (r.delivered == null ? "" : `${r.delivered} delivered, `) + `${r.applied} applied, ${r.rejected} rejected, ` +
      `${r.pending} pending, ${r.offline} offline.`);
  } catch (e) { manyNote(e.message, true); }
  wireMany();
}

// ---- adding devices: one, or many from CSV with a preview --------------------------------------------------

const NAME_RE = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/; // a device id, a label key, a token name (henge_mqtt.ids)
const PREVIEW_ROWS = 1000;

const addNote = (text, bad = false) => say("add-note", text, bad);

function brokerSaid(result) { // what an external broker did with the identities (never silence)
  const b = result.broker;
  return b && !b.applied ? ` The broker does not know yet: ${b.detail}` : "";
}

function wireAdd() {
  allow($("add-button"), "admin", "");
  importPreview();
}

async function addDevice(event) {
  event.preventDefault();
  try {
    const device = $("add-id").value.trim();
    if (!NAME_RE.test(device)) throw new Error(`${device || "(empty)"}: a device id is 1-64 of A-Z a-z 0-9 . _ -, starting with a letter or digit`);
    const r = await api("/devices", { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ device, labels: parseLabels($("add-labels").value) }) });
    $("add-secret").textContent = r.secret;
    $("add-secret-box").hidden = false;
    $("add-id").value = ""; $("add-labels").value = "";
    addNote(`Device ${r.device} added.${brokerSaid(r)}`, Boolean(brokerSaid(r)));
    scheduleReload();
  } catch (e) { addNote(e.message, true); }
}

function parseCsv(text) { // RFC 4180: quoted fields, "" inside them, CRLF or LF
  const rows = [];
  let row = [], field = "", quoted = false, i = 0;
  while (i < text.length) {
    const c = text[i];
    if (quoted) {
      if (c === '"' && text[i + 1] === '"') { field += '"'; i += 2; continue; }
      if (c === '"') quoted = false; else field += c;
      i++; continue;
    }
    if (c === '"' && field === "") quoted = true;
    else if (c === ",") { row.push(field); field = ""; }
    else if (c === "\n" || c === "\r") {
      row.push(field); rows.push(row); row = []; field = "";
      if (c === "\r" && text[i + 1] === "\n") i++;
    } else field += c;
    i++;
  }
  if (quoted) throw new Error("a quoted field is never closed");
  if (field !== "" || row.length) { row.push(field); rows.push(row); }
  return rows.filter((r) => !(r.length === 1 && r[0].trim() === ""));
}

function importPreview() { // what the import would do, line by line, before anything is stored
  state.importing = null;
  const text = $("import-csv").value, body = $("import-preview").tBodies[0];
  const done = (summary, bad) => {
    $("import-summary").className = bad ? "error" : "help";
    $("import-summary").textContent = summary;
    const n = state.importing ? state.importing.devices.length : 0;
    $("import-button").textContent = n ? `Import ${n} devices` : "Import";
    allow($("import-button"), "admin", n ? "" : bad ? "Fix the lines marked first." : "Nothing to import yet.");
  };
  body.replaceChildren();
  $("import-preview").hidden = true;
  if (!text.trim()) return done("", false);
  let rows;
  try { rows = parseCsv(text); } catch (e) { return done(`Not CSV: ${e.message}.`, true); }
  const [header, ...lines] = rows.map((r) => r.map((c) => c.trim()));
  const idAt = header.indexOf("id");
  if (idAt < 0) return done("The first line names the columns, and one of them is id.", true);
  const badKey = header.find((k, j) => j !== idAt && !NAME_RE.test(k));
  if (badKey !== undefined) return done(`Column ${JSON.stringify(badKey)} is not a label name (1-64 of A-Z a-z 0-9 . _ -).`, true);
  const update = $("import-update").checked, seen = new Set(), devices = [], shown = [];
  let problems = 0, updates = 0;
  lines.forEach((cells, n) => {
    const id = cells[idAt] || "", labels = {};
    header.forEach((k, j) => { if (j !== idAt && cells[j]) labels[k] = cells[j]; });
    let will = "create";
    if (cells.length !== header.length) will = `problem: ${cells.length} fields, the first line has ${header.length}`;
    else if (!NAME_RE.test(id)) will = "problem: not a device id (1-64 of A-Z a-z 0-9 . _ -)";
    else if (seen.has(id)) will = "problem: appears twice";
    else if (state.rows.has(id)) will = update ? "update its labels" : "problem: exists (tick the box to update its labels)";
    seen.add(id);
    if (will.startsWith("problem")) problems++; else devices.push({ id, labels });
    if (will === "update its labels") updates++;
    shown.push([n + 2, id, labels, will]);
  });
  shown.sort((a, b) => Number(b[3].startsWith("problem")) - Number(a[3].startsWith("problem"))); // problems first
  body.replaceChildren(...shown.slice(0, PREVIEW_ROWS).map(([line, id, labels, will]) => el("tr",
    { class: will.startsWith("problem") ? "bad" : "" },
    el("td", { text: String(line) }), el("td", { text: id }),
    el("td", { text: Object.entries(labels).map(([k, v]) => `${k}=${v}`).join(", ") }), el("td", { text: will }))));
  $("import-preview").hidden = shown.length === 0;
  if (problems) return done(`${lines.length} lines: ${problems} with a problem (listed first); nothing can be imported until they are fixed.`, true);
  state.importing = { devices, update };
  done(`${lines.length} lines: ${devices.length - updates} new devices, ${updates} updated` +
    (shown.length > PREVIEW_ROWS ? ` (the first ${PREVIEW_ROWS} shown)` : "") + ".", false);
}

async function importDevices() {
  const job = state.importing;
  if (!job) return;
  try {
    $("import-button").disabled = true;
    const r = await api("/devices/import", { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify(job) });
    const ids = Object.keys(r.secrets);
    const csv = "id,secret\n" + ids.map((id) => `${id},${r.secrets[id]}`).join("\n") + "\n";
    const link = $("import-secrets");
    if (link.href) URL.revokeObjectURL(link.href);
    link.href = URL.createObjectURL(new Blob([csv], { type: "text/csv" }));
    link.textContent = `Download the ${ids.length} new secrets (henge-secrets.csv): shown this once`;
    link.hidden = ids.length === 0;
    $("import-csv").value = ""; $("import-file").value = "";
    importPreview();
    addNote(`Imported: ${ids.length} new devices, ${r.updated} updated.${brokerSaid(r)}`, Boolean(brokerSaid(r)));
    scheduleReload();
  } catch (e) { addNote(e.message, true); importPreview(); }
}

// ---- config layers: edited with a preview as you type, and explained per device -----------------------------

async function loadLayers() {
  const rows = await api("/layers");
  state.layerVersions = Object.fromEntries(rows.map((l) => [l.layer, l.version])); // what this page has seen
  $("l-table").tBodies[0].replaceChildren(...rows.map((l) => {
    const edit = el("button", { type: "button", text: "Edit", "data-layer": l.layer });
    edit.onclick = () => editLayer(l.layer).catch((e) => say("l-note", e.message, true));
    const to = l.layer === "fleet" ? "every device" : [Object.entries(l.labels).map(([k, v]) => `${k}=${v}`).join(", "),
      l.where ? `where ${l.where}` : ""].filter(Boolean).join(" ");
    return el("tr", { "data-layer": l.layer }, el("td", { text: l.layer }), el("td", { text: to }),
      el("td", { text: String(l.priority) }), el("td", { text: `v${l.version}` }), el("td", {}, edit));
  }));
  checkLayerSoon(0);
}

async function editLayer(name) {
  const l = await api(`/layers/${encodeURIComponent(name)}`);
  $("l-editing").textContent = `Layer ${name} (v${l.version})`;
  state.layerBase = { name, version: l.version };
  $("l-conflict").replaceChildren();
  $("l-name").value = name;
  $("l-labels").value = Object.entries(l.labels || {}).map(([k, v]) => `${k}=${v}`).join(", ");
  $("l-where").value = l.where || "";
  $("l-priority").value = String(l.priority ?? 0);
  $("l-content").value = JSON.stringify(l.content, null, 2);
  $("l-note").textContent = "";
  checkLayerSoon(0);
}

function layerBody() { // the form as PUT /layers/{name} takes it; throws on what is not valid yet
  const name = $("l-name").value.trim();
  if (!NAME_RE.test(name)) throw new Error("Name the layer (1-64 of A-Z a-z 0-9 . _ -; fleet: every device).");
  let content;
  try { content = JSON.parse($("l-content").value); } catch (e) { throw new Error(`Not JSON: ${e.message}`); }
  if (!content || typeof content !== "object" || Array.isArray(content)) throw new Error("A layer is a JSON object.");
  const body = { content, priority: Number($("l-priority").value || 0) };
  if (name !== "fleet") { body.labels = parseLabels($("l-labels").value); body.where = $("l-where").value.trim(); }
  return [name, body];
}

let layerTimer = 0;
function checkLayerSoon(delay = 400) { // as the operator types: the syntax at once, the service's preview after a pause
  clearTimeout(layerTimer);
  allow($("l-save"), "operator", "Checking…");
  layerTimer = setTimeout(() => checkLayer().catch((e) => say("l-check", e.message, true)), delay);
}

async function checkLayer() {
  $("l-diff").hidden = true;
  state.layerChecked = null;
  let name, body;
  try { [name, body] = layerBody(); } catch (e) {
    say("l-check", $("l-content").value.trim() || $("l-name").value.trim() ? e.message : "", Boolean($("l-content").value.trim()));
    allow($("l-save"), "operator", e.message);
    return;
  }
  const key = JSON.stringify([name, body]);
  const r = await api(`/layers/${encodeURIComponent(name)}/preview`, { method: "POST",
    headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
  if (key !== JSON.stringify((() => { try { return layerBody(); } catch { return null; } })())) return; // typed on
  const problems = r.invalid.concat(r.new_devices_invalid.map((line) => `a device added later: ${line}`));
  say("l-check", (problems.length ? `Its schemas would refuse it: ${problems.join("; ")}. ` : "") +
    `Would change the config of ${r.change} device(s)` + named(r) +
    (r.example ? ` The change for ${r.example.device}:` : ""), problems.length > 0);
  if (r.example) diffInto($("l-diff"), r.example.diff);
  state.layerChecked = key;
  allow($("l-save"), "operator", r.invalid.length ? "Its schemas would refuse it (above)." : "");
}

function baseOf(saved, versions, name) { // the version an edit of `name` began from (0: none yet)
  return saved && saved.name === name ? saved.version : (versions || {})[name] || 0;
}

// PUT with If-Match: the version the edit began from. A concurrent change is refused (412), never
// overwritten: conflict() shows it, and the answer is null.
async function putFrom(path, base, body, conflict) {
  try {
    return await api(path, { method: "PUT", headers: { "Content-Type": "application/json", "If-Match": `"${base}"` },
      body });
  } catch (e) {
    if (e.problem && e.problem.status === 412) { await conflict(); return null; }
    throw e;
  }
}

async function saveLayer(event) {
  event.preventDefault();
  try {
    const [name, body] = layerBody();
    if (state.layerChecked !== JSON.stringify([name, body])) { checkLayerSoon(0); return; }
    body.message = $("l-why").value;
    const base = baseOf(state.layerBase, state.layerVersions, name);
    $("l-conflict").replaceChildren();
    const r = await putFrom(`/layers/${encodeURIComponent(name)}`, base, JSON.stringify(body),
      () => showLayerConflict(name, base));
    if (!r) return;
    state.layerBase = { name, version: r.version };
    $("l-editing").textContent = `Layer ${name} (v${r.version})`; // what the next save starts from
    say("l-note", `Layer ${r.layer} is at version ${r.version}; ${r.devices} device(s) got a new version.` +
      (r.new_devices_invalid ? ` Warning: ${r.new_devices_invalid.join("; ")}` : ""));
    $("l-why").value = "";
    await loadLayers();
  } catch (e) { say("l-note", e.message, true); }
}

// ---- schemas: checked as typed against every current config, saved only when none breaks it ----------------

function schemaName() { // the path name of the selector in the form: fleet, or k=v,k2=v2 (sorted)
  const labels = parseLabels($("s-selector").value);
  const keys = Object.keys(labels).sort();
  return keys.length ? keys.map((k) => `${k}=${labels[k]}`).join(",") : "fleet";
}

async function loadSchemas() {
  const rows = await api("/schemas");
  state.schemaVersions = Object.fromEntries(rows.map((s) => [s.schema, s.version])); // what an edit starts from
  $("s-table").tBodies[0].replaceChildren(...rows.map((s) => {
    const edit = el("button", { type: "button", text: "Edit", "data-schema": s.schema });
    edit.onclick = () => editSchema(s.schema).catch((e) => say("s-note", e.message, true));
    return el("tr", { "data-schema": s.schema }, el("td", { text: s.schema }), el("td", { text: `v${s.version}` }),
      el("td", {}, edit));
  }));
  checkSchemaSoon(0);
}

async function editSchema(name) {
  const s = await api(`/schemas/${encodeURIComponent(name)}`);
  state.schemaBase = { name, version: s.version }; // sent as If-Match on save
  $("s-conflict").replaceChildren();
  $("s-selector").value = name === "fleet" ? "" : name.split(",").join(", ");
  $("s-document").value = JSON.stringify(s.document, null, 2);
  $("s-note").textContent = "";
  checkSchemaSoon(0);
}

let schemaTimer = 0;
function checkSchemaSoon(delay = 400) {
  clearTimeout(schemaTimer);
  allow($("s-save"), "admin", "Checking…");
  schemaTimer = setTimeout(() => checkSchema().catch((e) => {
    say("s-check", e.message, true);
    allow($("s-save"), "admin", e.message);
  }), delay);
}

async function checkSchema() {
  state.schemaChecked = null;
  const text = $("s-document").value;
  if (!text.trim()) { say("s-check", ""); allow($("s-save"), "admin", "Write the schema first."); return; }
  let document, name;
  try { document = JSON.parse(text); name = schemaName(); } catch (e) {
    say("s-check", e instanceof SyntaxError ? `Not JSON: ${e.message}` : e.message, true);
    allow($("s-save"), "admin", "Fix it first (above).");
    return;
  }
  const key = JSON.stringify([name, text]);
  const r = await api(`/schemas/${encodeURIComponent(name)}/preview`, { method: "POST",
    headers: { "Content-Type": "application/json" }, body: text });
  if (key !== JSON.stringify([(() => { try { return schemaName(); } catch { return ""; } })(), $("s-document").value])) return;
  const refused = r.invalid_devices.length + r.more;
  say("s-check", refused ? `It would refuse the current config of ${refused} device(s): ${r.violations.join("; ")}`
    : `Every current config passes it; it would be schema ${r.schema} version ${r.version}.`, refused > 0);
  state.schemaChecked = key;
  allow($("s-save"), "admin", refused ? "Current configs break it (above): fix them or the schema first." : "");
}

async function saveSchema(event) {
  event.preventDefault();
  try {
    const name = schemaName(), text = $("s-document").value;
    if (state.schemaChecked !== JSON.stringify([name, text])) { checkSchemaSoon(0); return; }
    const base = baseOf(state.schemaBase, state.schemaVersions, name);
    $("s-conflict").replaceChildren();
    const r = await putFrom(`/schemas/${encodeURIComponent(name)}`, base, text, () => showSchemaConflict(name, base));
    if (!r) return;
    state.schemaBase = { name, version: r.version };
    say("s-note", `Schema ${r.schema} is at version ${r.version}.`);
    await loadSchemas();
  } catch (e) { say("s-note", e.message, true); }
}

function lineDiff(a, b) { // the lines of b against a: "- " gone, "+ " new, "  " kept (a schema is small)
  const x = a.split("\n"), y = b.split("\n");
  const n = x.length, m = y.length, lcs = Array.from({ length: n + 1 }, () => new Array(m + 1).fill(0));
  for (let i = n - 1; i >= 0; i--) for (let j = m - 1; j >= 0; j--) {
    lcs[i][j] = x[i] === y[j] ? lcs[i + 1][j + 1] + 1 : Math.max(lcs[i + 1][j], lcs[i][j + 1]);
  }
  const out = [];
  let i = 0, j = 0;
  while (i < n || j < m) {
    if (i < n && j < m && x[i] === y[j]) { out.push(`  ${x[i]}`); i++; j++; }
    else if (j < m && (i >= n || lcs[i][j + 1] >= lcs[i + 1][j])) out.push(`+ ${y[j++]}`);
    else out.push(`- ${x[i++]}`);
  }
  return out.join("\n");
}

// Someone changed the schema since this edit began: who and what, and the edit kept to rebase.
async function showSchemaConflict(name, base) {
  const history = await api(`/schemas/${encodeURIComponent(name)}/history`);
  const current = history[history.length - 1], was = history.find((v) => v.version === base);
  const text = (v) => (v && v.document ? JSON.stringify(v.document, null, 2) : "");
  say("s-note", `Not stored: schema ${name} changed since you opened it (v${base} → v${current.version} by ` +
    `${current.actor}${current.removed ? ", removed" : ""}). Your edit is kept above; rebase it onto ` +
    `v${current.version} and save again.`, true);
  offerRebase($("s-conflict"), "s-note", `Rebase my schema onto v${current.version}`,
    `Your edit now applies to v${current.version}: save when ready.`, () => {
      state.schemaBase = { name, version: current.version };
      checkSchemaSoon(0);
    }, lineDiff(text(was), text(current)));
}

// Someone changed the layer since this edit began: who and what, and the edit kept to rebase.
async function showLayerConflict(name, base) {
  const path = `/layers/${encodeURIComponent(name)}`;
  const current = await api(path);
  const diff = base ? (await api(`${path}/diff?a=${base}&b=${current.version}`)).diff
    : "(there was no such layer when you began)";
  say("l-note", `Not stored: layer ${name} changed since you opened it (v${base} → v${current.version} by ` +
    `${current.actor}${current.message ? `: "${current.message}"` : ""}). Your edit is kept above; rebase it onto ` +
    `v${current.version} and save again.`, true);
  offerRebase($("l-conflict"), "l-note", `Rebase my edit onto v${current.version}`,
    `Your edit now applies to v${current.version}: save when ready.`, () => {
      state.layerBase = { name, version: current.version };
      $("l-editing").textContent = `Layer ${name} (v${current.version})`;
      checkLayerSoon(0);
    }, diff);
}

async function explainDevice(event) {
  event.preventDefault();
  const device = $("x-device").value.trim();
  try {
    const rows = await api(`/devices/${encodeURIComponent(device)}/explain`);
    $("x-table").tBodies[0].replaceChildren(...rows.map((x) => el("tr", {},
      el("td", {}, el("code", { text: x.pointer })), el("td", {}, el("code", { text: JSON.stringify(x.value) })),
      el("td", { text: x.layer }))));
    say("x-note", rows.length ? `${device}'s current config, value by value, and the layer that set each.`
      : `${device} has no config.`);
  } catch (e) { $("x-table").tBodies[0].replaceChildren(); say("x-note", e.message, true); }
}

// ---- API tokens -------------------------------------------------------------------------------------------

const tokenNote = (text, bad = false) => say("t-note", text, bad);

async function loadTokens() {
  allow($("t-create"), "admin", "");
  if (RANK[state.role] < RANK.admin) {
    $("t-table").tBodies[0].replaceChildren();
    tokenNote(`Your role (${state.role}) cannot see or make tokens: this needs admin.`);
    return;
  }
  const rows = await api("/tokens");
  $("t-table").tBodies[0].replaceChildren(...rows.map((t) => {
    const revoke = el("button", { type: "button", text: "Revoke", "data-token": t.name });
    allow(revoke, "admin", "");
    revoke.onclick = () => revokeToken(t).catch((e) => tokenNote(e.message, true));
    return el("tr", { "data-token": t.name }, el("td", { text: t.name }), el("td", { text: t.role }),
      el("td", {}, when(t.created_at)), el("td", { text: t.created_by || "-" }), el("td", {}, when(t.last_used_at)),
      el("td", {}, revoke));
  }));
  if (!$("t-note").textContent) tokenNote(rows.length ? "" : "No tokens yet.");
}

async function revokeToken(t) {
  if (!confirm(`Revoke token ${t.name} (${t.role})? Whatever uses it stops working at once.`)) return;
  await api(`/tokens/${encodeURIComponent(t.id)}`, { method: "DELETE" });
  tokenNote(`Token ${t.name} revoked.`);
  await loadTokens();
}

async function createToken(event) {
  event.preventDefault();
  try {
    const name = $("t-name").value.trim();
    if (!NAME_RE.test(name)) throw new Error(`${name || "(empty)"}: a token name is 1-64 of A-Z a-z 0-9 . _ -`);
    const r = await api("/tokens", { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ name, role: $("t-role").value }) });
    $("t-secret").textContent = r.token;
    $("t-secret-box").hidden = false;
    $("t-name").value = "";
    tokenNote(`Token ${r.name} (${r.role}) created: copy it now, it is not shown again.`);
    await loadTokens();
  } catch (e) { tokenNote(e.message, true); }
}

// ---- the audit trail ------------------------------------------------------------------------------------

let auditTimer = 0;
function scheduleAudit() {
  clearTimeout(auditTimer);
  auditTimer = setTimeout(() => loadAudit().catch((e) => { $("a-shown").textContent = e.message; }), 300);
}

async function loadAudit() { // the service's trail (device and limit), narrowed here by action or actor
  const device = $("a-device").value.trim(), text = $("a-text").value.trim().toLowerCase();
  const p = new URLSearchParams();
  if (device) p.set("device", device);
  if (text) p.set("q", $("a-text").value.trim());
  if ($("a-limit").value !== "100") p.set("limit", $("a-limit").value);
  history.replaceState(null, "", "#/audit" + (p.toString() ? `?${p}` : ""));
  const entries = await api(`/audit?limit=${$("a-limit").value}` + (device ? `&device=${encodeURIComponent(device)}` : ""));
  const shown = entries.filter((e) => !text || e.action.toLowerCase().includes(text) || e.actor.toLowerCase().includes(text))
    .reverse(); // newest first
  $("a-table").tBodies[0].replaceChildren(...shown.map((e) => el("tr", { "data-action": e.action },
    el("td", {}, when(e.at)), el("td", { text: e.actor }), el("td", { text: e.action }),
    el("td", {}, e.device ? el("a", { href: `#/device/${encodeURIComponent(e.device)}`, text: e.device }) : "-"),
    el("td", { class: "wrap", text: JSON.stringify(e.summary) }))));
  $("a-shown").textContent = `${shown.length} of the newest ${entries.length} entries, newest first.`;
}

async function reconcile(id) {
  const note = $("reconcile-note");
  try {
    const r = await api(`/devices/${encodeURIComponent(id)}/reconcile`, { method: "POST" });
    note.className = "help";
    note.textContent = `v${r.version} delivered again` + (r.online ? "." : " (offline: it gets it when it connects).");
  } catch (e) { note.className = "error"; note.textContent = e.message; }
}

function scheduleDevice() {
  clearTimeout(deviceTimer);
  deviceTimer = setTimeout(() => loadDevice(state.device).catch(() => {}), 400);
}

// A device's presence over a window as a band: online, offline, unknown (before the first change kept);
// takeovers and conflicts as marks. From GET /devices/{id}/timeline (stored a week).
async function loadBand(id) {
  const window = state.bandWindow || "24h";
  const t = await api(`/devices/${encodeURIComponent(id)}/timeline?window=${window}`);
  if (state.device !== id) return;
  const W = 800, start = Date.parse(t.from), span = Math.max(1, Date.parse(t.to) - start);
  const x = (iso) => ((Date.parse(iso) - start) / span) * W;
  const rect = (from, to, cls, title) => {
    const r = document.createElementNS(SVG_NS, "rect");
    const w = Math.max(cls === "seg-unknown" ? 0 : 2, x(to) - x(from)); // a short visit still shows
    r.setAttribute("x", Math.min(x(from), W - w).toFixed(1)); r.setAttribute("y", "0"); r.setAttribute("height", "24");
    r.setAttribute("width", w.toFixed(1));
    r.setAttribute("class", cls);
    const tip = document.createElementNS(SVG_NS, "title");
    tip.textContent = title;
    r.append(tip);
    return r;
  };
  const band = $("d-band");
  band.replaceChildren(...t.segments.map((s) => rect(s.from, s.to, `seg-${s.state}`,
    `${s.state} from ${s.from} to ${s.to}`)), ...t.marks.map((m) => rect(m.at, m.at, `mark-${m.state}`,
    `${m.state} at ${m.at}${m.reason ? ` (${m.reason})` : ""}`)));
  band.dataset.segments = String(t.segments.length);
  band.dataset.marks = String(t.marks.length);
  band.dataset.window = t.window;
  const online = t.segments.filter((s) => s.state === "online")
    .reduce((sum, s) => sum + Date.parse(s.to) - Date.parse(s.from), 0);
  const count = (k) => t.marks.filter((m) => m.state === k).length;
  $("d-band-from").textContent = window === "7d" ? "7 days ago" : "24 hours ago";
  $("d-band-desc").textContent = `Online ${Math.round((100 * online) / span)}% of the ${window === "7d" ? "last 7 days" : "last 24 hours"}; ` +
    `${count("takeover")} takeovers, ${count("conflict")} conflicts.`;
  for (const b of document.querySelectorAll("button[data-pwindow]")) b.setAttribute("aria-pressed", String(b.dataset.pwindow === window));
}

async function loadDevice(id) {
  loadBand(id).catch((e) => { $("d-band-desc").textContent = e.message; });
  const path = `/devices/${encodeURIComponent(id)}`;
  const [tagged, presence, versions, reported] = await Promise.all([apiTagged(path), api(`${path}/presence`),
    api(`${path}/versions`), api(`${path}/reported`)]);
  if (state.device !== id) return;
  const info = tagged.body;
  // The labels an edit starts from (If-Match on save): renewed only while the operator is not editing.
  if (!$("labels-edit").dataset.touched) state.labelsBase = { tag: tagged.tag, labels: info.labels };
  const s = info.status;
  state.rows.set(id, s);
  $("d-title").textContent = id;
  const byVersion = new Map(versions.map((v) => [v.version, v]));
  const rejectedReport = s.rejected_version && byVersion.get(s.rejected_version) ? byVersion.get(s.rejected_version).report : null;
  const facts = [["State", s.state + (s.conflict ? ` — identity conflict (${s.conflict_remotes.join(", ")})` : "")],
    ["Epoch", s.epoch], ["Since", s.since ? when(s.since) : "-"], ["Reason", s.reason],
    ["Remote", s.remote || "-"], ["Desired version", s.desired_version || "-"], ["Sync", syncText(s)],
    ["Applied", s.applied_version ? [`v${s.applied_version} `, when(s.applied_at)] : "-"],
    ["Rejected", s.rejected_version ? `v${s.rejected_version}: ${(rejectedReport && rejectedReport.error) || s.error || "no reason given"}` : "-"],
    ["Schema", s.schema_error ? `invalid: ${s.schema_error}` : "valid"],
    ["Layers", (versions.length && versions[versions.length - 1].layers.length) ? versions[versions.length - 1].layers.join(" + ") : "its own config only"],
    ["Labels", Object.entries(info.labels).map(([k, v]) => `${k}=${v}`).join(", ") || "-"]];
  const fact = (k, v) => {
    const dd = el("dd", { "data-fact": k });
    if (v instanceof Node) dd.append(v); else if (Array.isArray(v)) dd.append(...v); else dd.textContent = String(v);
    return dd;
  };
  $("d-status").replaceChildren(...facts.flatMap(([k, v]) => [el("dt", { text: k }), fact(k, v)]));
  $("d-presence").replaceChildren(...(presence.changes.length ? presence.changes.map((e) =>
    el("li", {}, when(e.at), ` ${e.type === "connected" ? "online" : "offline"}  epoch ${e.data.epoch}  ${e.data.reason}  ${e.data.remote || ""}`))
    : [el("li", { text: "No connects or disconnects seen in this run of the service yet." })]));
  const canWrite = state.role === "operator" || state.role === "admin";
  wireActions(id, s, info.labels);
  $("d-reported-when").replaceChildren(...(reported.document === null ? ["This device has not reported its state yet."]
    : ["Reported ", when(reported.at), `, changed `, when(reported.changed_at), ` (#${reported.seq}).`]));
  $("d-reported").textContent = reported.document === null ? "" : JSON.stringify(reported.document, null, 2);
  const fix = $("reconcile-button");
  fix.hidden = s.sync !== "drift";
  fix.disabled = !canWrite;
  fix.title = canWrite ? "The config on the device is not the version it applied: send that version again"
    : `Your role (${state.role}) can look, not deliver.`;
  fix.onclick = () => reconcile(id);
  const vbody = $("d-versions").tBodies[0];
  vbody.replaceChildren(...versions.slice().reverse().map((v) => {
    // Each version's own report, kept with it: a rejection keeps its reason after later versions.
    const r = v.report;
    const report = !r ? "" : r.status === "applied" ? "applied" : `rejected: ${r.error || "no reason given"}`;
    const btn = el("button", { type: "button", text: `Roll back to v${v.version}` });
    btn.disabled = !canWrite || v.version === s.desired_version;
    btn.addEventListener("click", () => rollback(id, v.version));
    const cell = el("td", { class: "wrap " + (!r ? "" : r.status === "rejected" ? "sync-rejected" : "sync-in_sync"), text: report });
    if (r) cell.title = `${r.status} ${new Date(r.at).toISOString()}${r.epoch ? `, connection epoch ${r.epoch}` : ""}`;
    return el("tr", {}, el("td", { text: `v${v.version}` }), el("td", {}, when(v.created_at)), el("td", { text: v.actor }),
      el("td", { class: "wrap", text: v.message || "" }), cell, el("td", {}, btn));
  }));
  // The note under the push form follows the version it announced until the device answers.
  const pending = state.pushed && state.pushed.device === id ? byVersion.get(state.pushed.version) : null;
  if (pending && pending.report) {
    const note = $("push-note");
    note.className = pending.report.status === "rejected" ? "error" : "help";
    note.textContent = pending.report.status === "rejected"
      ? `The device rejected v${pending.version}: ${pending.report.error || "no reason given"}`
      : `The device applied v${pending.version}.`;
    state.pushed = null;
  }
  for (const sel of [$("diff-a"), $("diff-b")]) {
    const keep = sel.value;
    sel.replaceChildren(...versions.map((v) => el("option", { value: String(v.version), text: `v${v.version}` })));
    if (keep) sel.value = keep;
  }
  if (versions.length && !$("diff-b").dataset.touched) {
    $("diff-b").value = String(versions[versions.length - 1].version);
    $("diff-a").value = String(versions[Math.max(0, versions.length - 2)].version);
  }
  const config = $("push-config");
  if (!config.dataset.touched) {
    const text = s.desired_version ? JSON.stringify((await api(`${path}/config`)).config, null, 2) : "{\n}";
    // The operator may have started typing while the config was on its way: their edit wins.
    if (!config.dataset.touched && state.device === id) {
      config.value = text;
      state.baseVersion = s.desired_version || 0; // the version this edit starts from: sent as If-Match
    }
  }
  $("push-button").disabled = !canWrite;
  config.readOnly = !canWrite;
  if (!canWrite) $("push-note").textContent = `Your role (${state.role}) can look, not push or roll back.`;
}

async function push(event) {
  event.preventDefault();
  const id = state.device, note = $("push-note");
  let config;
  try { config = JSON.parse($("push-config").value); } catch (e) { note.textContent = `Not JSON: ${e.message}`; note.className = "error"; return; }
  note.className = "help"; note.textContent = "Pushing…";
  $("push-conflict").replaceChildren();
  const base = state.baseVersion || 0;
  try {
    const msg = encodeURIComponent($("push-message").value);
    const headers = { "Content-Type": "application/json" };
    if (base) headers["If-Match"] = `"${base}"`; // a concurrent edit is refused (412), never overwritten
    const res = await api(`/devices/${encodeURIComponent(id)}/config?message=${msg}`, {
      method: "PUT", headers, body: JSON.stringify(config) });
    if (res.unchanged) note.textContent = `Unchanged: v${res.version} already holds this config.`;
    else { note.textContent = `Stored v${res.version}; waiting for the device's report.`; state.pushed = { device: id, version: res.version }; }
    $("push-config").dataset.touched = "";
    loadDevice(id);
  } catch (e) {
    note.className = "error";
    if (e.problem && e.problem.status === 412) await showConflict(id, base);
    else note.textContent = e.message;
  }
}

// Someone stored a version since this edit began: say who and what, and let the operator rebase.
async function showConflict(id, base) {
  const path = `/devices/${encodeURIComponent(id)}`;
  const current = await api(`${path}/config`);
  const diff = base ? (await api(`${path}/diff?a=${base}&b=${current.version}`)).diff : "(the device had no config when you opened it)";
  $("push-note").textContent = `Not stored: the config changed since you opened it (v${base} → v${current.version} by ${current.actor}` +
    `${current.message ? `: "${current.message}"` : ""}). Your edit is kept below; rebase it onto v${current.version} and push again.`;
  offerRebase($("push-conflict"), "push-note", `Rebase my edit onto v${current.version}`,
    `Your edit now applies to v${current.version}: push when ready.`, () => { state.baseVersion = current.version; }, diff);
}

async function rollback(id, version) {
  const note = $("push-note");
  try {
    const res = await api(`/devices/${encodeURIComponent(id)}/rollback`, {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ version }) });
    note.className = "help"; note.textContent = `Rolled back: v${res.version} holds v${version}'s config.`;
    loadDevice(id);
  } catch (e) { note.className = "error"; note.textContent = e.message; }
}

async function showDiff(event) {
  event.preventDefault();
  const a = $("diff-a").value, b = $("diff-b").value;
  const res = await api(`/devices/${encodeURIComponent(state.device)}/diff?a=${a}&b=${b}`);
  const left = [], right = [];
  for (const line of res.diff.split("\n").slice(2)) {
    if (line.startsWith("@@")) { left.push(["head", line]); right.push(["head", line]); }
    else if (line.startsWith("-")) left.push(["del", line.slice(1)]);
    else if (line.startsWith("+")) right.push(["add", line.slice(1)]);
    else { while (left.length < right.length) left.push(["", ""]); while (right.length < left.length) right.push(["", ""]);
      left.push(["", line.slice(1)]); right.push(["", line.slice(1)]); }
  }
  while (left.length < right.length) left.push(["", ""]);
  while (right.length < left.length) right.push(["", ""]);
  const cells = [el("pre", { class: "head", text: `v${a}` }), el("pre", { class: "head", text: `v${b}` })];
  if (res.same) cells.push(el("pre", { text: "(the same config)" }), el("pre", { text: "" }));
  for (let i = 0; i < left.length; i++) {
    cells.push(el("pre", { class: left[i][0], text: left[i][1] }), el("pre", { class: right[i][0], text: right[i][1] }));
  }
  $("diff").replaceChildren(...cells);
}

// ---- routing and wiring ---------------------------------------------------------------------------------

function route() {
  if (!state.token) { show("login"); return; }
  const m = location.hash.match(/^#\/device\/(.+)$/);
  const audit = location.hash.match(/^#\/audit(?:\?(.*))?$/);
  if (location.hash === "#/layers") {
    state.device = "";
    show("layers");
    loadLayers().catch((e) => say("l-note", e.message, true));
    loadSchemas().catch((e) => say("s-note", e.message, true));
  } else if (location.hash === "#/tokens") {
    state.device = "";
    $("t-secret-box").hidden = true; $("t-note").textContent = "";
    show("tokens");
    loadTokens().catch((e) => tokenNote(e.message, true));
  } else if (audit) {
    state.device = "";
    const p = new URLSearchParams(audit[1] || "");
    $("a-device").value = p.get("device") || "";
    $("a-text").value = p.get("q") || "";
    $("a-limit").value = ["1000", "10000"].includes(p.get("limit")) ? p.get("limit") : "100";
    show("audit");
    loadAudit().catch((e) => { $("a-shown").textContent = e.message; });
  } else if (m) {
    state.device = decodeURIComponent(m[1]);
    $("push-config").dataset.touched = ""; $("diff-b").dataset.touched = ""; $("push-note").textContent = "";
    $("labels-edit").dataset.touched = ""; $("remove-confirm").value = ""; $("secret-box").hidden = true;
    $("labels-conflict").replaceChildren();
    $("act-note").textContent = "";
    $("diff").replaceChildren();
    show("device");
    loadDevice(state.device).catch((e) => { $("d-title").textContent = e.message; });
  } else {
    state.device = "";
    loadView(location.hash);
    state.fleetHash = viewHash();
    show("fleet");
    wireAdd();
    wireMany();
    loadChart().catch((e) => { $("chart-desc").textContent = e.message; });
    renderNow();
  }
  $("back").href = state.fleetHash; // "All devices" goes back to the view the operator came from
  $("main").focus();
}

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", (e) => { e.preventDefault(); signIn($("token").value.trim()); });
  $("signout").addEventListener("click", () => signOut(""));
  $("filters").addEventListener("input", (e) => {
    state.page = 1;
    saveView();
    if (e.target.id === "f-where") scheduleWhere(); else renderNow();
  });
  $("audit-filters").addEventListener("input", scheduleAudit);
  $("audit-filters").addEventListener("submit", (e) => e.preventDefault());
  $("page-prev").addEventListener("click", () => turnPage(-1));
  $("page-next").addEventListener("click", () => turnPage(1));
  document.addEventListener("keydown", (e) => { // / search, n / p pages: not while typing, not with a modifier
    const typing = e.target instanceof HTMLElement && (e.target.matches("input, textarea, select") || e.target.isContentEditable);
    if (typing || e.ctrlKey || e.metaKey || e.altKey || $("fleet").hidden) return;
    if (e.key === "/") { e.preventDefault(); $("f-q").focus(); }
    else if (e.key === "n") turnPage(1);
    else if (e.key === "p") turnPage(-1);
  });
  $("filters").addEventListener("submit", (e) => e.preventDefault());
  for (const b of document.querySelectorAll("th button[data-sort]")) {
    b.addEventListener("click", () => {
      state.sort = { key: b.dataset.sort, dir: state.sort.key === b.dataset.sort ? -state.sort.dir : 1 };
      saveView();
      renderNow();
    });
  }
  $("push-form").addEventListener("submit", push);
  $("push-config").addEventListener("input", () => { $("push-config").dataset.touched = "1"; });
  $("labels-edit").addEventListener("input", () => { $("labels-edit").dataset.touched = "1"; });
  copyButton($("secret-copy"), $("secret-value"), actionNote);
  copyButton($("add-secret-copy"), $("add-secret"), addNote);
  copyButton($("t-secret-copy"), $("t-secret"), tokenNote);
  $("add-form").addEventListener("submit", addDevice);
  $("many-form").addEventListener("submit", previewMany);
  $("many-form").addEventListener("input", wireMany);
  $("many-form").addEventListener("change", wireMany);
  $("many-push").addEventListener("click", pushMany);
  $("many-target").addEventListener("change", () => {
    $("many-select").placeholder = { label: "site=berlin", where: 'reported.fw < "2.4"', all: "" }[$("many-target").value];
    $("many-select").disabled = $("many-target").value === "all";
  });
  $("import-csv").addEventListener("input", importPreview);
  $("import-update").addEventListener("change", importPreview);
  $("import-file").addEventListener("change", async () => {
    const file = $("import-file").files[0];
    if (!file) return;
    if (file.size > 20 * 1024 * 1024) { addNote("That file is over 20 MB: import it with henge device import.", true); return; }
    $("import-csv").value = await file.text();
    importPreview();
  });
  $("import-button").addEventListener("click", importDevices);
  $("t-form").addEventListener("submit", createToken);
  $("l-form").addEventListener("input", (e) => { if (e.target.id !== "l-why") checkLayerSoon(); });
  $("l-form").addEventListener("submit", saveLayer);
  $("x-form").addEventListener("submit", explainDevice);
  $("s-form").addEventListener("input", () => checkSchemaSoon());
  $("s-form").addEventListener("submit", saveSchema);
  $("diff-b").addEventListener("change", () => { $("diff-b").dataset.touched = "1"; });
  $("diff-form").addEventListener("submit", (e) => showDiff(e).catch((err) => { $("diff").textContent = err.message; }));
  window.addEventListener("hashchange", route);
  setInterval(markDirty, 15000); // ages ("3m ago") move on
  setInterval(() => { if (state.token && !$("fleet").hidden) loadChart().catch(() => {}); }, 60000); // a point a minute
  for (const b of document.querySelectorAll("button[data-pwindow]")) {
    b.addEventListener("click", () => {
      state.bandWindow = b.dataset.pwindow;
      if (state.device) loadBand(state.device).catch((e) => { $("d-band-desc").textContent = e.message; });
    });
  }
  for (const b of document.querySelectorAll("#history button[data-window]")) {
    b.addEventListener("click", () => {
      state.chartWindow = b.dataset.window;
      loadChart().catch((e) => { $("chart-desc").textContent = e.message; });
    });
  }
  if (state.token) signIn(state.token); else show("login");
});
