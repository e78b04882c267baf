// The nbq dashboard page: a snapshot at load, then deltas over server-sent events (api/live).
// No build step, no library. Every URL is relative to the page, so the same page works at
// the root of `nbq dashboard` and at <base_url>/nbq/ inside Jupyter.
"use strict";

const params = new URLSearchParams(location.search);
const TOKEN = params.get("token"), BROKER = params.get("broker");
// ?glance=1: workers and maps only, narrow (JupyterLab's side panel shows the page so)
const GLANCE = params.get("glance") === "1";
// the broker last opened here, for JupyterLab's side panel (same origin: same storage)
const BROKER_KEY = "nbq-dashboard-broker";
const ROWS = 200, SPAN = 600;
const view = { workers: new Map(), queues: [], tasks: new Map(), maps: new Map(), series: [],
               filter: {}, detail: null };

function apiUrl(path, extra) {
  const u = new URL(path, location.href.split("#")[0]);
  u.search = "";
  if (BROKER) u.searchParams.set("broker", BROKER);
  if (TOKEN) u.searchParams.set("token", TOKEN);
  for (const [k, v] of Object.entries(extra || {})) if (v) u.searchParams.set(k, v);
  return u.toString();
}

async function getJson(path, extra) {
  const r = await fetch(apiUrl(path, extra), { credentials: "same-origin" });
  const body = await r.json().catch(() => ({ error: `${r.status} ${r.statusText}` }));
  if (!r.ok) throw new Error(body.error || `${r.status}`);
  return body;
}

function cookie(name) {
  const m = document.cookie.match(new RegExp("(?:^|; )" + name + "=([^;]*)"));
  return m ? decodeURIComponent(m[1]) : null;
}

async function control(action) {
  const headers = { "Content-Type": "application/json" };
  const xsrf = cookie("_xsrf");
  if (xsrf) headers["X-XSRFToken"] = xsrf;
  const r = await fetch(apiUrl("api/control"), { method: "POST", headers, credentials: "same-origin",
                                                 body: JSON.stringify(action) });
  const body = await r.json().catch(() => ({ error: `${r.status} ${r.statusText}` }));
  const notice = document.getElementById("notice");
  notice.hidden = false;
  notice.textContent = r.ok ? `${action.action}: ${JSON.stringify(body.answer)}`
                            : `${action.action} failed: ${body.error}`;
  notice.className = r.ok ? "ok" : "failed";
  return body;
}

// -- formatting -------------------------------------------------------------------------

const esc = (s) => String(s ?? "").replace(/[&<>"']/g,
  (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
const num = (n, d = 0) => n == null ? "" : Number(n).toLocaleString(undefined,
  { minimumFractionDigits: d, maximumFractionDigits: d });
const time = (ts) => ts ? new Date(ts * 1000).toLocaleTimeString() : "";
const secs = (s) => s == null ? "" : s < 1 ? `${(s * 1000).toFixed(1)} ms` : `${s.toFixed(2)} s`;
const bytes = (b) => b == null ? "" : b > 1e9 ? `${(b / 1e9).toFixed(2)} GB` : `${(b / 1e6).toFixed(1)} MB`;
const ago = (ts) => ts ? `${Math.max(0, (Date.now() / 1000 - ts)).toFixed(1)} s ago` : "";

// -- rendering --------------------------------------------------------------------------

function renderWorkers() {
  const rows = [...view.workers.values()].sort((a, b) => a.name.localeCompare(b.name));
  document.querySelector("#workers tbody").innerHTML = rows.map((w) => `
    <tr data-worker="${esc(w.name)}" class="${w.online ? "" : "offline"}">
      <td>${esc(w.name)}${w.online ? "" : " (offline)"}</td><td>${esc(w.host)}</td>
      <td class="num">${esc(w.pid)}</td>
      <td class="num processes">${w.processes ? w.processes.length : ""}</td>
      <td class="num">${num(w.active)}</td><td class="num">${num(w.processed)}</td>
      <td class="num">${num(w.failed)}</td>
      <td class="num">${Array.isArray(w.load) ? w.load.map((x) => x.toFixed(2)).join(" ") : esc(w.load)}</td>
      <td class="num">${bytes(w.memory)}</td><td class="hb" data-ts="${w.last_heartbeat || ""}">${ago(w.last_heartbeat)}</td>
      <td>${esc((w.queues || []).join(", "))}</td>
      <td>${w.online ? `<button data-act="pool_grow">+1 process</button>
          <button data-act="pool_shrink">−1 process</button>
          <button data-act="shutdown">shut down</button>` : ""}</td>
    </tr>`).join("");
  const select = document.querySelector("#rate-form select");
  const chosen = select.value;
  select.innerHTML = `<option value="">all workers</option>` + rows.filter((w) => w.online)
    .map((w) => `<option>${esc(w.name)}</option>`).join("");
  select.value = chosen;
}

function renderQueues() {
  document.querySelector("#queues tbody").innerHTML = view.queues.map((q) => `
    <tr data-queue="${esc(q.name)}"><td>${esc(q.name)}</td><td class="num">${num(q.length)}</td>
      <td>${q.by_priority ? Object.entries(q.by_priority).map(([p, n]) => `${esc(p)}: ${num(n)}`).join(", ") : ""}</td>
      <td class="num">${num(q.rate_in, 1)}</td><td class="num">${num(q.rate_out, 1)}</td></tr>`).join("");
}

function matches(t) {
  const f = view.filter;
  return (!f.state || t.state === f.state) && (!f.name || (t.name || "").includes(f.name))
    && (!f.worker || t.worker === f.worker) && (!f.q || t.id.includes(f.q));
}

function renderTasks() {
  const rows = [...view.tasks.values()].sort((a, b) => (b.ts || 0) - (a.ts || 0)).slice(0, ROWS);
  view.tasks = new Map(rows.map((t) => [t.id, t]));
  document.querySelector("#tasks tbody").innerHTML = rows.map((t) => `
    <tr data-task="${esc(t.id)}"><td><a class="task">${esc(t.id)}</a></td>
      <td class="state-${esc(t.state)}">${esc(t.state)}</td><td>${esc(t.name)}</td>
      <td class="args" title="${esc(t.args)}">${esc(t.args)}</td><td>${esc(t.worker)}</td>
      <td>${time(t.received)}</td><td>${time(t.started)}</td>
      <td class="num">${secs(t.runtime)}</td></tr>`).join("");
}

function renderMaps() {
  const rows = [...view.maps.values()].sort((a, b) => b.start - a.start);
  document.querySelector("#maps tbody").innerHTML = rows.map((m) => {
    const frac = m.total ? Math.min(1, m.done / m.total) : 0;
    const style = m.failed ? "danger" : m.total != null && m.done >= m.total ? "success" : "";
    return `<tr data-map="${esc(m.id)}"><td>${esc(m.id)}</td><td>${esc(m.name)}</td>
      <td><div class="bar ${style}"><div style="width:${(frac * 100).toFixed(1)}%"></div></div>
          <span class="map-text">${esc(m.text)}</span></td>
      <td class="num done">${num(m.done)}</td><td class="num">${num(m.failed)}</td>
      <td class="num">${m.total == null ? "?" : num(m.total)}</td>
      <td class="num">${num(m.rate)}</td><td>${m.eta == null ? "" : `${m.eta.toFixed(1)} s`}</td></tr>`;
  }).join("");
}

function renderStates(d) {
  document.getElementById("states").innerHTML = Object.entries(d.states || {})
    .filter(([, n]) => n > 0).map(([s, n]) => `<span class="state-${esc(s)}">${esc(s)} ${num(n)}</span>`).join("");
  document.getElementById("kept").textContent = `${num(d.kept)} tasks in history`;
  const err = document.getElementById("error");
  err.hidden = !d.error;
  err.textContent = d.error || "";
}

// -- charts: a few lines on a canvas -----------------------------------------------------

const COLORS = ["#1e88e5", "#e53935", "#43a047", "#fb8c00", "#8e24aa", "#00897b"];

function lineChart(id, lines, floor) {
  const canvas = document.getElementById(id), g = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height, left = 50, bottom = 18;
  g.clearRect(0, 0, w, h);
  const now = Math.floor(Date.now() / 1000), t0 = now - SPAN;
  const max = Math.max(floor, ...lines.flatMap((l) => l.points.map((p) => p[1] ?? 0)));
  g.font = "11px sans-serif"; g.fillStyle = "#555"; g.strokeStyle = "#ddd";
  g.beginPath(); g.moveTo(left, 4); g.lineTo(left, h - bottom); g.lineTo(w, h - bottom); g.stroke();
  g.fillText(max < 1 ? max.toPrecision(2) : num(max), 2, 12); g.fillText("0", 2, h - bottom);
  g.fillText("-10 min", left, h - 4); g.fillText("now", w - 24, h - 4);
  const x = (t) => left + (t - t0) / SPAN * (w - left), y = (v) => h - bottom - v / max * (h - bottom - 6);
  lines.forEach((l, i) => {
    g.strokeStyle = COLORS[i % COLORS.length]; g.beginPath();
    let on = false;
    for (const [t, v] of l.points) {
      if (v == null || t < t0) { on = false; continue; }
      on ? g.lineTo(x(t), y(v)) : g.moveTo(x(t), y(v)); on = true;
    }
    g.stroke();
    g.fillStyle = g.strokeStyle; g.fillText(l.label, left + 8 + i * 90, 12);
  });
}

function renderCharts() {
  if (document.getElementById("tab-charts").hidden) return;
  const s = view.series;
  lineChart("chart-throughput", [
    { label: "done/s", points: s.map((b) => [b.t, b.done]) },
    { label: "failed/s", points: s.map((b) => [b.t, b.failed]) },
    { label: "sent/s", points: s.map((b) => [b.t, b.sent]) }], 1);
  lineChart("chart-latency", ["p50", "p95", "p99"].map((p) =>
    ({ label: p, points: s.map((b) => [b.t, b[p]]) })), 1e-3);
  const names = [...new Set(s.flatMap((b) => Object.keys(b.queues || {})))];
  lineChart("chart-queues", names.map((q) =>
    ({ label: q, points: s.filter((b) => b.queues && q in b.queues).map((b) => [b.t, b.queues[q]]) })), 1);
}

// -- data in --------------------------------------------------------------------------------

function apply(d, whole) {
  if (whole) { view.workers.clear(); view.maps.clear(); view.tasks.clear(); view.series = []; }
  for (const w of d.workers || []) view.workers.set(w.name, w);
  for (const m of d.maps || []) view.maps.set(m.id, m);
  for (const t of d.tasks || []) {
    if (matches(t)) view.tasks.set(t.id, t);
    if (view.detail === t.id) showTask(t.id);
  }
  view.queues = d.queues || view.queues;
  const last = view.series.length ? view.series[view.series.length - 1].t : 0;
  view.series.push(...(d.series || []).filter((b) => b.t > last));
  view.series = view.series.filter((b) => b.t >= d.now - SPAN);
  if (d.broker) document.getElementById("broker").textContent = d.broker;
  renderStates(d); renderQueues();
  if (whole || d.workers.length) renderWorkers();
  if (whole || d.tasks.length) renderTasks();
  if (whole || d.maps.length) renderMaps();
  if (whole || d.series.length) renderCharts();
}

async function load() {
  const d = await getJson("api/snapshot", view.filter);
  apply(d, true);
  document.body.dataset.loaded = "1";
}

function follow() {
  const live = document.getElementById("live");
  const source = new EventSource(apiUrl("api/live"), { withCredentials: true });
  source.onopen = () => { live.className = "on"; live.textContent = "live"; load().catch(showError); };
  source.onmessage = (e) => apply(JSON.parse(e.data), false);
  source.onerror = () => { live.className = "off"; live.textContent = "reconnecting"; };
}

function showError(e) {
  const err = document.getElementById("error");
  err.hidden = false;
  err.textContent = String(e.message || e);
}

// -- a task's detail ------------------------------------------------------------------------

async function showTask(id) {
  view.detail = id;
  const box = document.getElementById("task-detail");
  let t;
  try { t = await getJson(`api/task/${encodeURIComponent(id)}`); } catch (e) { showError(e); return; }
  const field = (k, v) => v == null || v === "" ? "" : `<tr><th>${k}</th><td>${v}</td></tr>`;
  const link = (x) => x ? `<a class="task" data-id="${esc(x)}">${esc(x)}</a>` : "";
  box.hidden = false;
  box.innerHTML = `<h3>Task <code>${esc(t.id)}</code> <span class="state-${esc(t.state)}">${esc(t.state)}</span></h3>
    <table>${field("name", esc(t.name))}${field("args", `<code>${esc(t.args)}</code>`)}
    ${field("worker", esc(t.worker))}${field("queue", esc(t.queue))}${field("map", esc(t.map))}
    ${field("sent", time(t.sent))}${field("received", time(t.received))}${field("started", time(t.started))}
    ${field("finished", time(t.finished))}${field("runtime", secs(t.runtime))}${field("retries", t.retries)}
    ${field("parent", link(t.parent))}${field("root", link(t.root))}
    ${field("children", (t.children || []).map((c) => `${link(c.id)} <span class="state-${esc(c.state)}">${esc(c.state)}</span>`).join("<br>"))}
    ${field("exception", esc(t.exception))}</table>
    ${t.traceback ? `<pre class="traceback">${esc(t.traceback)}</pre>` : ""}
    <p><button data-act="revoke">Revoke</button> <button data-act="terminate">Terminate (SIGTERM)</button>
       <button data-act="close">Close</button></p>`;
}

// -- wiring -----------------------------------------------------------------------------------

function showTab(name) {
  for (const s of document.querySelectorAll("main > section")) s.hidden = s.id !== `tab-${name}`;
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("on", a.dataset.tab === name);
  renderCharts();
}

document.addEventListener("DOMContentLoaded", () => {
  if (BROKER && !GLANCE) localStorage.setItem(BROKER_KEY, BROKER);
  if (GLANCE) {
    document.body.classList.add("glance");
    for (const id of ["tab-workers", "tab-maps"]) document.getElementById(id).hidden = false;
  } else {
    const tab = () => showTab((location.hash || "#workers").slice(1));
    window.addEventListener("hashchange", tab);
    tab();
  }
  document.querySelector("#workers tbody").addEventListener("click", (e) => {
    const act = e.target.dataset.act, worker = e.target.closest("tr")?.dataset.worker;
    if (!act || !worker) return;
    if (act === "shutdown" && !confirm(`Shut down ${worker}?`)) return;
    control({ action: act, worker, n: 1 });
  });
  document.getElementById("rate-form").addEventListener("submit", (e) => {
    e.preventDefault();
    control({ action: "rate_limit", ...Object.fromEntries(new FormData(e.target)) });
  });
  document.getElementById("task-filter").addEventListener("submit", (e) => {
    e.preventDefault();
    view.filter = Object.fromEntries(new FormData(e.target));
    getJson("api/tasks", view.filter).then((d) => {
      view.tasks = new Map(d.tasks.map((t) => [t.id, t])); renderTasks();
    }).catch(showError);
  });
  document.getElementById("tab-tasks").addEventListener("click", (e) => {
    const a = e.target.closest("a.task");
    if (a) { showTask(a.dataset.id || a.textContent); return; }
    const act = e.target.dataset.act;
    if (act === "close") { view.detail = null; document.getElementById("task-detail").hidden = true; }
    else if (act === "revoke" || act === "terminate") {
      control({ action: "revoke", task_id: view.detail, terminate: act === "terminate" });
    }
  });
  setInterval(() => {  // "last heartbeat … ago" moves on its own
    for (const td of document.querySelectorAll("#workers td.hb")) td.textContent = ago(Number(td.dataset.ts));
  }, 1000);
  follow();
});
