// Razar dashboard: a small single-page app over the collector's /api/v1.
// No dependencies and nothing loaded from the network but the collector itself.
"use strict";

const API = "/api/v1";
const app = document.getElementById("app");
const live = document.getElementById("live");
let token = localStorage.getItem("razar.token") || "";
let route = null;          // the page shown: { render, onEvent }
let stream = null;         // AbortController of the live event stream
let refreshTimer = null;

// ---------------------------------------------------------------- helpers

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

const badge = (s) => h("span", { class: "badge s-" + String(s || "unknown").toLowerCase() }, s ?? "—");
const link = (href, text) => h("a", { href }, text);
const enc = encodeURIComponent;
// A host's link; fleet-wide items (no host) show "fleet".
const hostLink = (host) => (host ? link("#/host/" + enc(host), host) : "fleet");

function ago(ts) {
  if (!ts) return "—";
  const s = Math.round((Date.now() - new Date(ts).getTime()) / 1000);
  if (s < 0) return "just now";
  if (s < 90) return s + " s ago";
  if (s < 5400) return Math.round(s / 60) + " min ago";
  if (s < 172800) return Math.round(s / 3600) + " h ago";
  return Math.round(s / 86400) + " d ago";
}

function fmtBytes(b) {
  if (b === null || b === undefined) return "—";
  const u = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (Math.abs(b) >= 1024 && i < u.length - 1) { b /= 1024; i++; }
  return b.toFixed(i ? 1 : 0) + " " + u[i];
}

const pct = (r) => (r === null || r === undefined ? "—" : (r * 100).toFixed(0) + " %");
const num = (v, d = 1) => (v === null || v === undefined ? "—" : Number(v).toFixed(d));

function table(columns, rows, empty) {
  if (!rows.length) return h("p", { class: "muted" }, empty || "Nothing here.");
  return h("table", {},
    h("thead", {}, h("tr", {}, columns.map((c) => h("th", {}, c[0])))),
    h("tbody", {}, rows.map((r) => h("tr", {}, columns.map((c) => {
      const v = c[1](r);
      return h("td", { class: c[2] || null }, v instanceof Node ? v : (v ?? "—"));
    })))));
}

function kv(pairs) {
  return h("table", { class: "kv" }, pairs.map(([k, v]) => h("tr", {}, h("td", {}, k), h("td", { class: "wrap" }, v ?? "—"))));
}

// ---------------------------------------------------------------- API

class ApiError extends Error {
  constructor(status, code, message) { super(message); this.status = status; this.code = code; }
}

async function api(path, opts = {}) {
  const res = await fetch(API + path, {
    method: opts.method || "GET",
    headers: Object.assign({ Authorization: "Bearer " + token },
      opts.body ? { "Content-Type": "application/json" } : {}),
    body: opts.body ? JSON.stringify(opts.body) : undefined,
  });
  if (res.status === 401) { signOut(); throw new ApiError(401, "unauthorized", "sign in again"); }
  const text = await res.text();
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch (_) { body = text; }
  if (!res.ok) throw new ApiError(res.status, body?.code || "error", body?.message || res.statusText);
  return body;
}

// Lists come either bare or wrapped ({items: [...]}, {hosts: [...]}, ...).
function items(body, key) {
  if (Array.isArray(body)) return body;
  if (!body) return [];
  return body[key] || body.items || body.data || [];
}

// ---------------------------------------------------------------- live events

// SSE over fetch so the token travels in a header, never in a URL; resumes from the
// last id it saw (Last-Event-ID), so a reconnect neither loses nor repeats an event.
async function startStream() {
  if (stream) stream.abort();
  const ctl = new AbortController();
  stream = ctl;
  let lastId = null;
  let backoff = 500;
  while (!ctl.signal.aborted) {
    try {
      const headers = { Authorization: "Bearer " + token, Accept: "text/event-stream" };
      if (lastId) headers["Last-Event-ID"] = lastId;
      const res = await fetch(API + "/events/stream", { headers, signal: ctl.signal });
      if (!res.ok || !res.body) throw new Error("stream " + res.status);
      live.textContent = "live"; live.className = "live on";
      backoff = 500;
      const reader = res.body.getReader();
      const dec = new TextDecoder();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += dec.decode(value, { stream: true });
        let cut;
        while ((cut = buf.indexOf("\n\n")) >= 0) {
          const frame = buf.slice(0, cut);
          buf = buf.slice(cut + 2);
          let id = null, data = "";
          for (const line of frame.split("\n")) {
            if (line.startsWith("id:")) id = line.slice(3).trim();
            else if (line.startsWith("data:")) data += line.slice(5).trim();
          }
          if (id) lastId = id;
          if (data) {
            let ev = null;
            try { ev = JSON.parse(data); } catch (_) { /* keep-alive or text */ }
            if (ev) onLiveEvent(ev);
          }
        }
      }
    } catch (e) {
      if (ctl.signal.aborted) return;
    }
    live.textContent = "reconnecting"; live.className = "live off";
    await new Promise((r) => setTimeout(r, backoff));
    backoff = Math.min(backoff * 2, 10000);
  }
}

function onLiveEvent(ev) {
  if (route && route.onEvent && route.onEvent(ev) === false) return;
  // Coalesce bursts: one refresh at most every second.
  if (refreshTimer) return;
  refreshTimer = setTimeout(() => { refreshTimer = null; if (route) route.render(true); }, 1000);
}

// ---------------------------------------------------------------- charts

function chart(title, series, fmt) {
  const W = 600, H = 150, P = 4;
  const pts = series.flatMap((s) => s.points);
  const box = h("div", { class: "card chart" }, h("h2", {}, title));
  if (!pts.length) { box.append(h("p", { class: "muted" }, "No data in this range.")); return box; }
  const xs = pts.map((p) => p[0]), ys = pts.map((p) => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs);
  let y0 = Math.min(0, ...ys), y1 = Math.max(...ys);
  if (y1 === y0) y1 = y0 + 1;
  const X = (x) => P + ((x - x0) / Math.max(1, x1 - x0)) * (W - 2 * P);
  const Y = (y) => H - P - ((y - y0) / (y1 - y0)) * (H - 2 * P);
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.setAttribute("preserveAspectRatio", "none");
  const colors = ["#4c9be8", "#3fb97a", "#e0a93b", "#a77de8", "#e5534b", "#39c5cf", "#d16ba5", "#8595a5"];
  series.forEach((s, i) => {
    if (!s.points.length) return;
    const path = document.createElementNS(ns, "path");
    path.setAttribute("d", s.points.map((p, j) => (j ? "L" : "M") + X(p[0]).toFixed(1) + " " + Y(p[1]).toFixed(1)).join(""));
    path.setAttribute("fill", "none");
    path.setAttribute("stroke", colors[i % colors.length]);
    path.setAttribute("stroke-width", "1.5");
    path.setAttribute("vector-effect", "non-scaling-stroke");
    svg.append(path);
  });
  box.append(svg);
  box.append(h("div", { class: "legend" },
    series.map((s, i) => h("span", { style: `color:${colors[i % colors.length]};margin-right:1rem` },
      "■ " + s.name + " " + (s.points.length ? fmt(s.points[s.points.length - 1][1]) : ""))),
    " · max " + fmt(y1)));
  return box;
}

// GET /history answers { metric, from, to, step_ms, source, series: [{ series_id,
// host_id, labels, points: [{ ts_ms, value, min, max, count }] }] }. `labels` narrows
// the series (e.g. {"engine":"gpu"}); `rate` turns a counter into its per-second rate.
async function fetchHistory(metric, host, range, labels, rate) {
  const to = Date.now(), from = to - range;
  let q = `metric=${enc(metric)}&host=${enc(host)}&from=${enc(new Date(from).toISOString())}&to=${enc(new Date(to).toISOString())}&points=300`;
  if (labels) q += "&labels=" + enc(JSON.stringify(labels));
  const body = await api("/history?" + q);
  return items(body, "series").map((s) => {
    let points = (s.points || []).map((p) => [p.ts_ms, p.value]);
    if (rate) {
      points = points.slice(1).map((p, i) => {
        const dt = (p[0] - points[i][0]) / 1000;
        return [p[0], dt > 0 ? Math.max(0, (p[1] - points[i][1]) / dt) : 0];
      });
    }
    return { labels: s.labels || {}, points };
  });
}

// ---------------------------------------------------------------- pages

async function fleetPage() {
  const ov = await api("/overview");
  const hosts = ov.hosts || {}, gpus = ov.gpus || {};
  const tot = Math.max(1, gpus.total || 0);
  const bar = (parts) => h("div", { class: "bar" }, parts.map(([n, c]) => h("span", { style: `width:${(100 * (n || 0)) / tot}%;background:${c}` })));
  const list = ov.host_list || [];
  const tiles = h("div", { class: "tiles" }, list.map((x) => h("a", {
    href: "#/host/" + enc(x.host),
    class: "tile " + (x.state === "lost" ? "lost" : (x.gpus_unhealthy || x.components_failed) ? "warn" : ""),
    title: `${x.host}: ${x.state}`,
  })));
  const breaker = ov.breaker || {};
  return [
    h("h1", {}, "Fleet"),
    h("div", { class: "grid" },
      h("div", { class: "card stat", "data-test": "hosts-online" }, h("div", { class: "n" }, hosts.online ?? 0, h("span", { class: "muted" }, " / " + (hosts.total ?? 0))), h("div", { class: "l" }, "hosts online"),
        hosts.lost ? h("div", { class: "error" }, hosts.lost + " lost") : null),
      h("div", { class: "card stat", "data-test": "gpus" }, h("div", { class: "n" }, gpus.healthy ?? 0, h("span", { class: "muted" }, " / " + (gpus.total ?? 0))), h("div", { class: "l" }, "GPUs in service"),
        bar([[gpus.healthy, "var(--ok)"], [gpus.probation, "var(--warn)"], [gpus.quarantined, "var(--bad)"], [gpus.inspection, "var(--violet)"]]),
        h("div", { class: "muted" }, `${gpus.quarantined || 0} quarantined · ${gpus.probation || 0} probation · ${gpus.inspection || 0} inspection`)),
      h("div", { class: "card stat" }, h("div", { class: "n" }, pct(gpus.utilization_avg)), h("div", { class: "l" }, "GPU utilisation (avg)"),
        h("div", { class: "muted" }, fmtBytes(gpus.memory_used_bytes) + " of " + fmtBytes(gpus.memory_total_bytes) + " VRAM")),
      h("div", { class: "card stat", "data-test": "escalations-open" }, h("div", { class: "n" }, ov.escalations_open_count ?? (ov.escalations_open || []).length), h("div", { class: "l" }, "open escalations")),
      h("div", { class: "card stat" }, h("div", { class: "n" }, badge(breaker.state || "closed")), h("div", { class: "l" }, "automation breaker"),
        breaker.held ? h("div", { class: "muted" }, breaker.held + " actions held") : null)),
    h("div", { class: "card" }, h("h2", {}, "Hosts"), tiles),
    h("div", { class: "grid", style: "grid-template-columns:1fr 1fr" },
      h("div", { class: "card" }, h("h2", {}, "Open escalations"), table([
        ["severity", (e) => badge(e.severity)],
        ["host", (e) => hostLink(e.host)],
        ["what", (e) => link("#/escalation/" + e.id, e.summary || e.kind), "wrap"],
        ["since", (e) => ago(e.opened_at)],
      ], ov.escalations_open || [], "No open escalations.")),
      h("div", { class: "card" }, h("h2", {}, "Deployments in progress"), table([
        ["component", (d) => link("#/deployment/" + d.id, d.component)],
        ["revision", (d) => d.revision],
        ["state", (d) => badge(d.state)],
        ["progress", (d) => `${d.hosts_done ?? 0} / ${d.hosts_total ?? 0}`],
      ], ov.deployments_active || [], "No deployment in progress."))),
    h("div", { class: "card" }, h("h2", {}, "All hosts"), table([
      ["host", (x) => link("#/host/" + enc(x.host), x.host)],
      ["state", (x) => badge(x.state)],
      ["last seen", (x) => ago(x.last_seen)],
      ["GPUs", (x) => `${x.gpus ?? 0}` + (x.gpus_unhealthy ? ` (${x.gpus_unhealthy} out)` : "")],
      ["GPU util", (x) => pct(x.gpu_util)],
      ["components", (x) => `${x.components ?? 0}` + (x.components_failed ? ` (${x.components_failed} failing)` : "")],
      ["agent", (x) => x.agent_version],
    ], list, "No host has connected yet.")),
  ];
}

const RANGES = { "1h": 3600e3, "6h": 6 * 3600e3, "24h": 24 * 3600e3, "7d": 7 * 24 * 3600e3 };
let hostRange = "1h";

async function hostPage(host) {
  const [info, comps, gpus] = await Promise.all([
    api("/hosts/" + enc(host)),
    api("/hosts/" + enc(host) + "/components").then((b) => items(b, "components")),
    api("/hosts/" + enc(host) + "/gpus").then((b) => items(b, "gpus")),
  ]);
  const range = RANGES[hostRange];
  const name = (s, key) => (s.labels[key] !== undefined ? `${key} ${s.labels[key]}` : Object.values(s.labels).join(" ") || "value");
  const charts = [
    ["GPU utilisation", "razar_gpu_utilization_ratio", "gpu", pct, { engine: "gpu" }],
    ["GPU memory used", "razar_gpu_memory_used_bytes", "gpu", fmtBytes],
    ["GPU temperature", "razar_gpu_temperature_celsius", "gpu", (v) => num(v, 0) + " °C", { sensor: "gpu" }],
    ["GPU power", "razar_gpu_power_watts", "gpu", (v) => num(v, 0) + " W"],
    ["Component CPU", "razar_component_cpu_seconds_total", "component", (v) => num(v, 2) + " cores", null, true],
    ["Component RSS", "razar_component_resident_memory_bytes", "component", fmtBytes],
  ];
  const drawn = await Promise.all(charts.map(async ([title, metric, key, fmt, labels, rate]) => {
    try {
      const series = await fetchHistory(metric, host, range, labels, rate);
      return chart(title, series.map((s) => ({ name: name(s, key), points: s.points })), fmt);
    } catch (e) {
      return h("div", { class: "card chart" }, h("h2", {}, title), h("p", { class: "error" }, e.message));
    }
  }));
  const toolbar = h("div", { class: "toolbar" }, "Range",
    h("select", { onchange: (e) => { hostRange = e.target.value; render(); } },
      Object.keys(RANGES).map((r) => h("option", { value: r, selected: r === hostRange }, r))));
  const hi = info;
  return [
    h("h1", {}, host, " ", badge(hi.state)),
    h("div", { class: "grid" },
      h("div", { class: "card" }, kv([
        ["last seen", ago(hi.last_seen)], ["agent", hi.agent_version], ["profile", hi.profile],
        ["lost since", hi.lost_since ? ago(hi.lost_since) : null]]))),
    h("div", { class: "card", "data-test": "components" }, h("h2", {}, "Components"), table([
      ["component", (c) => c.name],
      ["state", (c) => badge(c.state)],
      ["revision", (c) => c.revision],
      ["critical", (c) => (c.critical ? "yes" : "no")],
      ["updated", (c) => ago(c.updated_at)],
      ["", (c) => h("span", {},
        h("button", { onclick: () => command(host, { kind: "restart", component: c.name }) }, "restart"), " ",
        h("a", { href: `#/logs/${enc(host)}/${enc(c.name)}` }, "logs"))],
    ], comps, "No components.")),
    h("div", { class: "card", "data-test": "gpus" }, h("h2", {}, "GPUs"), table([
      ["#", (g) => g.index],
      ["model", (g) => g.name],
      ["uuid", (g) => g.uuid],
      ["health", (g) => badge(g.health_state || "healthy")],
      ["util", (g) => pct(latest(g, "razar_gpu_utilization_ratio"))],
      ["memory", (g) => fmtBytes(latest(g, "razar_gpu_memory_used_bytes")) + " / " + fmtBytes(g.memory_total_bytes)],
      ["temp", (g) => num(latest(g, "razar_gpu_temperature_celsius"), 0) + " °C"],
      ["power", (g) => num(latest(g, "razar_gpu_power_watts"), 0) + " W"],
    ], gpus, "No GPUs.")),
    toolbar,
    h("div", { class: "charts" }, drawn),
  ];
}

// A GPU's newest value of a metric (GET /hosts/{host}/gpus lists `values`, the
// utilisation of the `gpu` engine and the `gpu` sensor's temperature first).
function latest(g, metric) {
  const v = (g.values || []).find((x) => x.metric === metric);
  return v ? v.value : null;
}

async function command(host, action) {
  try {
    const c = await api("/commands", { method: "POST", body: { host, action } });
    alert("command " + (c.id || "") + " " + (c.state || "queued"));
  } catch (e) {
    alert("refused: " + e.message);
  }
}

async function escalationsPage() {
  const list = items(await api("/escalations"), "escalations");
  return [h("h1", {}, "Escalations"), h("div", { class: "card" }, table([
    ["severity", (e) => badge(e.severity)],
    ["state", (e) => badge(e.state)],
    ["host", (e) => hostLink(e.host ?? e.host_id)],
    ["subject", (e) => e.subject],
    ["what", (e) => link("#/escalation/" + (e.id ?? e.escalation_id), e.summary || e.kind), "wrap"],
    ["opened", (e) => ago(e.opened_at)],
  ], list, "No escalations."))];
}

async function escalationPage(id) {
  const e = await api("/escalations/" + enc(id));
  const act = (verb) => async () => {
    const note = prompt(verb + " with a note:");
    if (note === null) return;
    try { await api(`/escalations/${enc(id)}/${verb}`, { method: "POST", body: { note } }); render(); } catch (x) { alert(x.message); }
  };
  return [
    h("h1", {}, "Escalation ", badge(e.state), " ", badge(e.severity)),
    h("div", { class: "card" }, kv([
      ["summary", e.summary], ["host", hostLink(e.host ?? e.host_id)], ["subject", e.subject], ["kind", e.kind],
      ["opened", ago(e.opened_at)], ["acknowledged", e.acknowledged_at ? `${ago(e.acknowledged_at)} by ${e.acknowledged_by}` : null],
      ["resolved", e.resolved_at ? `${ago(e.resolved_at)} by ${e.resolved_by || "auto"}` : null], ["note", e.note],
      ["notification level", e.level],
      ["decision", e.decision_id ? link("#/decision/" + e.decision_id, "#" + e.decision_id) : null]])),
    h("div", { class: "toolbar" },
      e.state === "open" ? h("button", { onclick: act("ack") }, "Acknowledge") : null,
      e.state !== "resolved" ? h("button", { onclick: act("resolve") }, "Resolve") : null),
  ];
}

async function decisionsPage() {
  const list = items(await api("/decisions"), "decisions");
  return [h("h1", {}, "Decisions"), h("div", { class: "card" }, table([
    ["#", (d) => link("#/decision/" + (d.id ?? d.decision_id), d.id ?? d.decision_id)],
    ["at", (d) => ago(d.decided_at ?? d.created_at)],
    ["rule", (d) => d.rule],
    ["host", (d) => d.host ?? d.host_id],
    ["summary", (d) => d.summary, "wrap"],
  ], list, "No decisions yet."))];
}

async function decisionPage(id) {
  const d = await api("/decisions/" + enc(id));
  const alts = d.rejected || d.alternatives || [];
  return [
    h("h1", {}, "Decision #" + (d.id ?? d.decision_id)),
    h("div", { class: "card" }, kv([
      ["rule", `${d.rule} (v${d.rule_version ?? "?"})`], ["summary", d.summary], ["host", d.host],
      ["XID catalog", d.catalog_revision], ["breaker", d.breaker ? JSON.stringify(d.breaker) : null],
      ["term", d.term], ["at", d.decided_at ?? d.created_at]])),
    h("div", { class: "card", "data-test": "evidence" }, h("h2", {}, "Evidence"), h("pre", {}, JSON.stringify(d.evidence, null, 2))),
    h("div", { class: "card", "data-test": "rejected" }, h("h2", {}, "Rejected alternatives"),
      alts.length ? h("ul", {}, alts.map((a) => h("li", {}, typeof a === "string" ? a : `${a.alternative || a.action}: ${a.reason}`)))
        : h("p", { class: "muted" }, "None considered.")),
    h("div", { class: "card" }, h("h2", {}, "Actions"), h("pre", {}, JSON.stringify(d.actions, null, 2))),
  ];
}

async function deploymentsPage() {
  const list = items(await api("/deployments"), "deployments");
  return [h("h1", {}, "Deployments"), h("div", { class: "card" }, table([
    ["#", (d) => link("#/deployment/" + (d.id ?? d.deployment_id), d.id ?? d.deployment_id)],
    ["component", (d) => d.component],
    ["revision", (d) => d.revision?.version || d.revision],
    ["state", (d) => badge(d.state)],
    ["reason", (d) => d.reason, "wrap"],
    ["created", (d) => ago(d.created_at)],
  ], list, "No deployments."))];
}

async function deploymentPage(id) {
  const d = await api("/deployments/" + enc(id));
  const op = (verb) => async () => {
    try { await api(`/deployments/${enc(id)}/${verb}`, { method: "POST", body: {} }); render(); } catch (x) { alert(x.message); }
  };
  return [
    h("h1", {}, `Deployment #${d.id ?? d.deployment_id} `, badge(d.state)),
    h("div", { class: "card" }, kv([
      ["component", d.component], ["revision", d.revision?.version || d.revision], ["reason", d.reason],
      ["canaries", d.canaries ?? d.canary], ["max parallel", d.max_parallel], ["created", ago(d.created_at)]])),
    h("div", { class: "toolbar" },
      ["pause", "resume", "promote", "rollback"].map((v) => h("button", { onclick: op(v) }, v))),
    h("div", { class: "card" }, h("h2", {}, "Hosts"), table([
      ["host", (x) => hostLink(x.host ?? x.host_id)],
      ["wave", (x) => x.wave ?? x.position],
      ["state", (x) => badge(x.state)],
      ["reason", (x) => x.reason, "wrap"],
      ["updated", (x) => ago(x.updated_at)],
    ], d.hosts || [], "No hosts selected.")),
  ];
}

async function eventsPage() {
  const list = items(await api("/events?limit=200"), "events");
  return [h("h1", {}, "Events"), h("div", { class: "card" }, table([
    ["at", (e) => new Date(e.ts).toLocaleString()],
    ["severity", (e) => badge(e.severity)],
    ["host", (e) => hostLink(e.host_id)],
    ["subject", (e) => (e.subject_id ? `${e.subject_kind} ${e.subject_id}` : e.subject_kind)],
    ["kind", (e) => e.kind],
    ["message", (e) => e.message, "wrap"],
  ], list, "No events."))];
}

async function logsPage(host, component) {
  const pre = h("pre", { style: "height:70vh" });
  const ctl = new AbortController();
  route.cleanup = () => ctl.abort();
  (async () => {
    try {
      const res = await fetch(`${API}/hosts/${enc(host)}/components/${enc(component)}/logs?lines=200&follow=true`, {
        headers: { Authorization: "Bearer " + token, Accept: "text/event-stream" }, signal: ctl.signal });
      if (!res.ok) { pre.append(`error ${res.status}: ${await res.text()}\n`); return; }
      const reader = res.body.getReader();
      const dec = new TextDecoder();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += dec.decode(value, { stream: true });
        const cut = buf.lastIndexOf("\n");
        if (cut < 0) continue;
        const whole = buf.slice(0, cut);
        buf = buf.slice(cut + 1);
        for (const line of whole.split("\n")) {
          if (line.startsWith("data:")) {
            let text = line.slice(5).trim();
            try { const j = JSON.parse(text); text = j.line ?? j.text ?? (j.lines ? j.lines.join("\n") : text); } catch (_) { /* plain text */ }
            pre.append(text + "\n");
            pre.scrollTop = pre.scrollHeight;
          }
        }
      }
    } catch (_) { /* left the page */ }
  })();
  return [h("h1", {}, `${host} / ${component} logs`), pre];
}

// ---------------------------------------------------------------- router

const ROUTES = [
  [/^#?\/?$/, () => fleetPage()],
  [/^#\/host\/([^/]+)$/, (m) => hostPage(decodeURIComponent(m[1]))],
  [/^#\/escalations$/, () => escalationsPage()],
  [/^#\/escalation\/([^/]+)$/, (m) => escalationPage(m[1])],
  [/^#\/decisions$/, () => decisionsPage()],
  [/^#\/decision\/([^/]+)$/, (m) => decisionPage(m[1])],
  [/^#\/deployments$/, () => deploymentsPage()],
  [/^#\/deployment\/([^/]+)$/, (m) => deploymentPage(m[1])],
  [/^#\/events$/, () => eventsPage()],
  [/^#\/logs\/([^/]+)\/([^/]+)$/, (m) => logsPage(decodeURIComponent(m[1]), decodeURIComponent(m[2])), { live: false }],
];

async function render(quiet) {
  const hash = location.hash || "#/";
  for (const [re, page, opts] of ROUTES) {
    const m = hash.match(re);
    if (!m) continue;
    if (!quiet) {
      if (route && route.cleanup) route.cleanup();
      route = { render, onEvent: opts && opts.live === false ? () => false : null };
    }
    try {
      const nodes = await page(m);
      const scroll = window.scrollY;
      app.replaceChildren(...[nodes].flat());
      app.dataset.ready = hash;
      if (quiet) window.scrollTo(0, scroll);
    } catch (e) {
      if (e.status !== 401) app.replaceChildren(h("p", { class: "error" }, `${e.code || "error"}: ${e.message}`));
    }
    return;
  }
  app.replaceChildren(h("p", { class: "error" }, "No such page."));
}

function signOut() {
  token = "";
  localStorage.removeItem("razar.token");
  if (stream) stream.abort();
  showLogin();
}

function showLogin() {
  document.getElementById("logout").hidden = true;
  app.replaceChildren(document.getElementById("login-tpl").content.cloneNode(true));
  document.getElementById("login").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    token = document.getElementById("token").value.trim();
    try {
      await api("/hosts?limit=1");
      localStorage.setItem("razar.token", token);
      start();
    } catch (e) {
      document.getElementById("login-error").textContent = e.message;
    }
  });
}

function start() {
  document.getElementById("logout").hidden = false;
  // `?nolive` renders without the live stream (headless screenshots).
  if (!new URLSearchParams(location.search).has("nolive")) startStream();
  render();
}

document.getElementById("logout").addEventListener("click", signOut);
window.addEventListener("hashchange", () => render());
// A token in the fragment (#token=...) signs in directly: dev mode prints such a link;
// `&next=/host/h` then opens that page instead of the fleet's.
if (location.hash.startsWith("#token=")) {
  const [tok, next] = location.hash.slice(7).split("&next=");
  token = decodeURIComponent(tok);
  localStorage.setItem("razar.token", token);
  history.replaceState(null, "", "#" + (next ? decodeURIComponent(next) : "/"));
}
if (token) start(); else showLogin();
