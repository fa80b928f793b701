/* ollamon dashboard. Plain JS, no build step. Every string that came from a request is put in the page with
 * textContent (never innerHTML), so a model named "<img src=x onerror=...>" is shown as text. The page talks
 * only to its own origin: the JSON API for history and the live stream (Server-Sent Events) for the rest. */
"use strict";

(function () {
  const API = "/ollamon/api";
  const WINDOWS = {
    "15m": { seconds: 900, bucket: "1m", minutes: 15, live: true },
    "1h": { seconds: 3600, bucket: "1m", minutes: 60, live: true },
    "24h": { seconds: 86400, bucket: "5m", minutes: 1440, live: false },
    "7d": { seconds: 604800, bucket: "1h", minutes: 1440, live: false },
  };
  const REQ_METRICS = [
    "requests", "successful", "failed", "cancelled", "requests_per_s", "tokens_per_s",
    "ttft_ms_p50", "ttft_ms_p95", "response_time_ms_p50", "response_time_ms_p95", "queue_time_ms_p95",
  ];
  const MAX_ROWS = 100;
  const MAX_MODELS = 50;

  const state = {
    window: "15m",
    series: [], // request buckets: {t, ...figures}
    system: [], // system samples: {t, cpu_percent, memory_percent, gpus}
    gpuState: null,
    charts: {},
    rows: [], // recent requests shown, newest first
    frame: null,
    seenAny: false,
    summary: null,
    inventory: null,
    resolvedKey: "",
  };

  // -- small helpers -------------------------------------------------------------------------------

  const $ = (sel) => document.querySelector(sel);

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v === true ? "" : String(v));
    }
    for (const c of children) {
      if (c === null || c === undefined) continue;
      node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return node;
  }

  function num(v, digits) {
    if (v === null || v === undefined || Number.isNaN(v)) return "–";
    const d = digits === undefined ? (Math.abs(v) >= 100 ? 0 : Math.abs(v) >= 10 ? 1 : 2) : digits;
    return v.toLocaleString("en-US", { minimumFractionDigits: d, maximumFractionDigits: d });
  }
  function ms(v) {
    if (v === null || v === undefined) return "–";
    return v >= 10000 ? num(v / 1000, 1) + " s" : num(v, v >= 100 ? 0 : 1) + " ms";
  }
  function pct(ratio) { return ratio === null || ratio === undefined ? "–" : num(ratio * 100, ratio < 0.1 ? 2 : 1) + " %"; }
  function bytes(b) {
    if (b === null || b === undefined) return "–";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (b >= 1024 && i < units.length - 1) { b /= 1024; i += 1; }
    return num(b, i === 0 ? 0 : 1) + " " + units[i];
  }
  function epoch(iso) { return iso ? Date.parse(iso) / 1000 : null; }
  function timeOf(iso) { return iso ? iso.slice(11, 19) : "–"; }
  function ago(iso) {
    const t = epoch(iso);
    if (t === null) return "–";
    const s = t - Date.now() / 1000;
    const a = Math.abs(s);
    const txt = a < 90 ? Math.round(a) + " s" : a < 5400 ? Math.round(a / 60) + " min" : num(a / 3600, 1) + " h";
    return s >= 0 ? "in " + txt : txt + " ago";
  }
  function setTile(id, text, unit, stateName) {
    const tile = document.getElementById(id);
    const value = tile.querySelector(".value");
    value.replaceChildren(document.createTextNode(text));
    if (unit && text !== "–") value.append(el("span", { class: "u", text: unit }));
    if (stateName) tile.dataset.state = stateName; else delete tile.dataset.state;
  }
  function setStatus(id, stateName, text, title) {
    const li = document.getElementById(id);
    li.dataset.state = stateName;
    const val = li.querySelector(".val");
    val.textContent = text;
    if (title) li.title = title; else li.removeAttribute("title");
  }

  async function api(path, options) {
    const resp = await fetch(path, { credentials: "same-origin", headers: { Accept: "application/json" }, ...options });
    if (resp.status === 401) {
      window.location.assign("/ollamon/login?next=" + encodeURIComponent("/ollamon/"));
      throw new Error("the admin token is needed");
    }
    let body = null;
    try { body = await resp.json(); } catch (e) { body = null; }
    if (!resp.ok) {
      const msg = body && typeof body.error === "string" ? body.error : "HTTP " + resp.status;
      const err = new Error(msg);
      err.status = resp.status;
      throw err;
    }
    return body;
  }

  // -- charts (uPlot) ------------------------------------------------------------------------------

  // Chart times are UTC, like every time ollamon shows: HH:MM, with the date on the long windows.
  function utcLabel(t, full) {
    const iso = new Date(t * 1000).toISOString();
    if (full) return iso.slice(0, 19).replace("T", " ");
    return WINDOWS[state.window].seconds > 86400 ? iso.slice(5, 10) + " " + iso.slice(11, 16) : iso.slice(11, 16);
  }

  function css(name) { return getComputedStyle(document.documentElement).getPropertyValue(name).trim(); }
  const COLORS = ["--s1", "--s2", "--s3", "--s4", "--s5", "--s6"];

  function makeChart(id, labels, units, kind) {
    const box = document.querySelector("#" + id + " .plot");
    box.replaceChildren();
    const width = Math.max(240, box.clientWidth || 400);
    const axis = { stroke: css("--muted"), grid: { stroke: css("--grid"), width: 1 }, ticks: { stroke: css("--grid") } };
    const series = [{}].concat(labels.map((label, i) => {
      const color = css(COLORS[i % COLORS.length]);
      const s = {
        label, stroke: color, width: 1.6, spanGaps: false,
        value: (u, v) => (v === null || v === undefined ? "–" : num(v) + (units ? " " + units : "")),
      };
      if (kind === "steps" && uPlot.paths && uPlot.paths.stepped) s.paths = uPlot.paths.stepped({ align: 1 });
      return s;
    }));
    series[0] = { label: "UTC", value: (u, v) => (v === null || v === undefined ? "–" : utcLabel(v, true)) };
    const opts = {
      width, height: 200, series, legend: { live: true },
      scales: { x: { time: true }, y: { range: (u, min, max) => [0, max > 0 ? max * 1.1 : 1] } },
      axes: [
        { ...axis, values: (u, vals) => vals.map((v) => utcLabel(v, false)) },
        { ...axis, size: 56, values: (u, vals) => vals.map((v) => num(v)) },
      ],
    };
    const data = [[]].concat(labels.map(() => []));
    const chart = new uPlot(opts, data, box);
    state.charts[id] = { chart, box, labels };
    return chart;
  }

  function setChart(id, xs, ys, range) {
    const c = state.charts[id];
    if (!c) return;
    c.chart.setData([xs].concat(ys), false);
    c.chart.setScale("x", { min: range[0], max: range[1] });
    c.box.closest(".chart").dataset.points = String(xs.length);
  }

  function buildCharts() {
    for (const c of Object.values(state.charts)) c.chart.destroy();
    state.charts = {};
    makeChart("c-ttft", ["p50", "p95"], "ms");
    makeChart("c-rt", ["p50", "p95"], "ms");
    makeChart("c-tps", ["tokens/s", "requests/s"], "");
    makeChart("c-outcome", ["ok", "failed", "cancelled"], "", "steps");
    makeChart("c-queue", ["p95"], "ms");
    makeChart("c-cpu", ["CPU", "memory"], "%");
    const gpus = gpuIndexes();
    const names = gpus.length ? gpus.map((i) => "GPU " + i) : ["GPU"];
    makeChart("c-gpu-util", names, "%");
    makeChart("c-gpu-mem", names, "%");
    makeChart("c-gpu-temp", names, "°C");
    makeChart("c-gpu-power", names, "W");
    state.chartGpus = gpus.join(",");
    drawAll();
  }

  function gpuIndexes() {
    const seen = new Set();
    for (const s of state.system) for (const g of s.gpus || []) seen.add(g.index);
    return Array.from(seen).sort((a, b) => a - b);
  }

  function range() {
    const now = Date.now() / 1000;
    return [now - WINDOWS[state.window].seconds, now];
  }

  function drawRequests() {
    const r = range();
    const s = state.series;
    const xs = s.map((p) => p.t);
    const col = (k) => s.map((p) => (p[k] === undefined ? null : p[k]));
    setChart("c-ttft", xs, [col("ttft_ms_p50"), col("ttft_ms_p95")], r);
    setChart("c-rt", xs, [col("response_time_ms_p50"), col("response_time_ms_p95")], r);
    setChart("c-tps", xs, [col("tokens_per_s"), col("requests_per_s")], r);
    setChart("c-outcome", xs, [col("successful"), col("failed"), col("cancelled")], r);
    setChart("c-queue", xs, [col("queue_time_ms_p95")], r);
    const total = s.reduce((a, p) => a + (p.requests || 0), 0);
    document.getElementById("c-outcome").dataset.total = String(total);
    document.getElementById("c-tps").dataset.total = String(total);
  }

  function drawSystem() {
    const r = range();
    const s = state.system;
    const xs = s.map((p) => p.t);
    setChart("c-cpu", xs, [s.map((p) => p.cpu_percent), s.map((p) => p.memory_percent)], r);
    const gpus = gpuIndexes();
    const noGpu = gpus.length === 0;
    $("#no-gpu").hidden = !noGpu;
    $("#gpu-charts").hidden = noGpu;
    if (noGpu) {
      const g = state.gpuState;
      $("#no-gpu").textContent = "No GPU detected" + (g && g.reason ? " (" + g.reason + ")" : "");
      return;
    }
    if (state.chartGpus !== gpus.join(",")) { buildCharts(); return; }
    const pick = (key) => gpus.map((i) => s.map((p) => {
      const g = (p.gpus || []).find((x) => x.index === i);
      return g && g[key] !== undefined ? g[key] : null;
    }));
    setChart("c-gpu-util", xs, pick("utilization_percent"), r);
    setChart("c-gpu-mem", xs, pick("memory_percent"), r);
    setChart("c-gpu-temp", xs, pick("temperature_c"), r);
    setChart("c-gpu-power", xs, pick("power_w"), r);
  }

  function drawAll() { drawRequests(); drawSystem(); }

  // -- history from the JSON API -------------------------------------------------------------------

  async function loadHistory() {
    const w = WINDOWS[state.window];
    const which = state.window;
    const [ts, sys] = await Promise.allSettled([
      api(`${API}/timeseries?metric=${REQ_METRICS.join(",")}&bucket=${w.bucket}&window=${state.window}`),
      api(`${API}/system?minutes=${w.minutes}`),
    ]);
    if (which !== state.window) return;
    if (ts.status === "fulfilled") {
      state.series = ts.value.series.map((p) => ({ ...p, t: epoch(p.bucket) }));
      if (state.series.some((p) => p.requests > 0)) state.seenAny = true;
    }
    if (sys.status === "fulfilled") {
      state.gpuState = sys.value.gpu || (sys.value.enabled ? null : { state: "disabled", reason: "sampling is off" });
      state.system = (sys.value.history || []).map(systemPoint);
    }
    drawAll();
    updateEmpty();
  }

  function systemPoint(p) {
    return { t: epoch(p.timestamp), cpu_percent: p.cpu_percent, memory_percent: p.memory_percent, gpus: p.gpus || [] };
  }

  async function loadModels() {
    const [sum, inv] = await Promise.allSettled([
      api(`${API}/summary?window=${state.window}`),
      api(`${API}/models`),
    ]);
    if (sum.status === "fulfilled") {
      state.summary = sum.value;
      if (sum.value.overall && sum.value.overall.requests > 0) state.seenAny = true;
    }
    if (inv.status === "fulfilled") state.inventory = inv.value;
    $("#models-window").textContent = "(figures over the last " + state.window.replace("m", " min").replace("h", " h").replace("d", " days") + ")";
    renderModels();
    updateEmpty();
  }

  function filterQuery() {
    const q = new URLSearchParams({ limit: "50" });
    const m = $("#f-model").value.trim();
    const e = $("#f-endpoint").value.trim();
    if (m) q.set("model", m);
    if (e) q.set("endpoint", e);
    if ($("#f-failed").checked) q.set("success", "false");
    return q;
  }

  async function loadRequests() {
    try {
      const body = await api(`${API}/requests?${filterQuery()}`);
      state.rows = body.requests;
      if (state.rows.length) state.seenAny = true;
    } catch (e) {
      state.rows = [];
      $("#req-table tbody").replaceChildren(el("tr", {}, el("td", { class: "empty", colspan: 10, text: e.message })));
      return;
    }
    renderRows(new Set());
    updateEmpty();
  }

  async function loadResolved() {
    try {
      const body = await api(`${API}/alerts?state=resolved&limit=10`);
      renderAlertList($("#alerts-resolved"), body.alerts, "No alert resolved recently.");
    } catch (e) {
      $("#alerts-resolved").replaceChildren(el("p", { class: "note", text: e.status === 503 ? "Alerts are disabled (alerts.enabled)." : e.message }));
    }
  }

  // -- rendering -----------------------------------------------------------------------------------

  function matchesFilters(row) {
    const m = $("#f-model").value.trim().toLowerCase();
    const e = $("#f-endpoint").value.trim();
    const name = (row.model_name || "").toLowerCase();
    if (m && name !== m && name !== m + ":latest") return false;
    if (e && row.endpoint !== e) return false;
    if ($("#f-failed").checked && row.success) return false;
    return true;
  }

  function resultBadge(row) {
    if (row.success) return el("span", { class: "badge ok", text: "ok" });
    if (row.cancelled) return el("span", { class: "badge muted", text: "cancelled" });
    return el("span", { class: "badge bad", text: "failed" });
  }

  function renderRows(fresh) {
    const body = $("#req-table tbody");
    if (!state.rows.length) {
      body.replaceChildren(el("tr", {}, el("td", { class: "empty", colspan: 10, text: "No requests match." })));
      return;
    }
    body.replaceChildren(...state.rows.map((r) => {
      const tr = el("tr", { class: fresh.has(r.request_id) ? "fresh" : null, "data-request-id": r.request_id },
        el("td", { text: (r.timestamp || "").replace("T", " ").slice(0, 23) }),
        el("td", { class: "wrap model", text: r.model_name || "–" }),
        el("td", { text: r.endpoint || "–" }),
        el("td", { class: "num", text: r.status_code === null || r.status_code === undefined ? "–" : r.status_code }),
        el("td", {}, resultBadge(r)),
        el("td", { class: "num", text: ms(r.response_time_ms) }),
        el("td", { class: "num", text: ms(r.ttft_ms) }),
        el("td", { class: "num", text: r.completion_tokens === null || r.completion_tokens === undefined ? "–" : num(r.completion_tokens, 0) }),
        el("td", { class: "num", text: r.tokens_per_second ? num(r.tokens_per_second, 1) + " tok/s" : "–" }),
        el("td", {}, el("button", { type: "button", class: "link", "aria-label": "Details of request " + r.request_id, onclick: () => openRequest(r.request_id), text: "details" })),
      );
      if (!r.success && r.error_message) tr.title = r.error_message;
      return tr;
    }));
  }

  function addLiveRows(rows) {
    if (!rows || !rows.length) return;
    state.seenAny = true;
    const known = new Set(state.rows.map((r) => r.request_id));
    const fresh = new Set();
    const add = [];
    for (const r of rows) {
      if (known.has(r.request_id) || !matchesFilters(r)) continue;
      fresh.add(r.request_id);
      add.push(r);
    }
    if (!add.length) return;
    state.rows = add.concat(state.rows).slice(0, MAX_ROWS);
    renderRows(fresh);
  }

  function renderLive(frame) {
    const body = $("#live-table tbody");
    const names = Object.keys(frame.live || {});
    if (!names.length) {
      body.replaceChildren(el("tr", {}, el("td", { class: "empty", colspan: 6, text: "Nothing in flight." })));
    } else {
      body.replaceChildren(...names.map((n) => {
        const m = frame.live[n];
        return el("tr", {}, el("td", { class: "wrap", text: n }),
          ...["in_flight", "generating", "waiting", "loading", "queued"].map((k) => el("td", { class: "num", text: String(m[k]) })));
      }));
    }
    const st = frame.status;
    $("#live-note").textContent = st.num_parallel > 0
      ? "Queued: waiting beyond the model's " + st.num_parallel + " parallel slots (inventory.num_parallel)."
      : "Queued needs inventory.num_parallel (Ollama's OLLAMA_NUM_PARALLEL) in the config; loading needs the inventory.";
  }

  function renderStatus(frame) {
    const st = frame.status;
    const up = st.upstream;
    if (up) {
      const why = up.error || (up.status_code ? "HTTP " + up.status_code : "");
      setStatus("st-upstream", up.reachable ? "ok" : "bad", up.reachable ? "reachable" : "unreachable", up.url + (why ? " — " + why : ""));
      const banner = $("#banner-upstream");
      banner.hidden = !!up.reachable;
      if (!up.reachable) banner.textContent = "Ollama at " + up.url + " is unreachable: " + (why || "no answer") + ". Requests sent to ollamon now fail.";
    }
    if (st.db) setStatus("st-db", st.db === "ok" ? "ok" : "bad", st.db);
    if (st.redis) setStatus("st-redis", st.redis === "ok" ? "ok" : st.redis === "disabled" ? "wait" : "bad", st.redis);
    if (!st.alerts_enabled) setStatus("st-alerts", "wait", "disabled");
    else if (st.alerts_firing) setStatus("st-alerts", "bad", st.alerts_firing + " firing");
    else if (st.alerts_pending) setStatus("st-alerts", "warn", st.alerts_pending + " pending");
    else setStatus("st-alerts", "ok", "none firing");
    $("#st-version .val").textContent = "v" + frame.version;
    $("#logout").hidden = !st.admin_token;
    $("#foot-time").textContent = "Last update " + frame.time.replace("T", " ").replace("Z", " UTC");
  }

  function renderTiles(frame) {
    const t = frame.tiles;
    setTile("t-rps", num(t.requests_per_s), "req/s");
    setTile("t-tps", num(t.tokens_per_s), "tok/s");
    setTile("t-inflight", num(t.in_flight, 0), "");
    setTile("t-waiting", num(t.waiting, 0), "", t.waiting > 0 ? "warn" : null);
    setTile("t-errors", t.error_rate === null ? "–" : pct(t.error_rate), "", t.error_rate > 0.05 ? "bad" : t.error_rate > 0 ? "warn" : null);
    document.querySelector("#t-errors .sub").textContent = "last 5 min, " + num(t.requests, 0) + " requests";
    setTile("t-ttft", ms(t.ttft_ms_p95), "");
    setTile("t-rt", ms(t.response_time_ms_p95), "");
  }

  function alertNode(a) {
    const labels = Object.entries(a.labels || {}).map(([k, v]) => k + "=" + v).join(", ");
    const since = a.state === "resolved" ? "resolved " + ago(a.resolved_at) : (a.state === "firing" ? "firing since " : "pending since ") + timeOf(a.since || a.fired_at || a.started_at) + " UTC";
    return el("div", { class: "alert", "data-state": a.state },
      el("span", { class: "badge " + (a.state === "firing" ? "bad" : a.state === "pending" ? "warn" : "ok"), text: a.state }),
      el("span", { class: "rule", text: a.rule }),
      el("span", { class: "meta", text: (a.severity || "") + (labels ? " · " + labels : "") + " · " + since }),
      a.id !== null && a.id !== undefined ? el("button", { type: "button", class: "link", onclick: () => openAlert(a.id), text: "transitions" }) : null,
      el("span", { class: "msg", text: a.message || "" }));
  }

  function renderAlertList(box, alerts, emptyText) {
    box.replaceChildren(...(alerts.length ? alerts.map(alertNode) : [el("p", { class: "note", text: emptyText })]));
  }

  function renderAlerts(frame) {
    const open = frame.alerts || [];
    renderAlertList($("#alerts-open"), open, frame.status.alerts_enabled ? "No alert is firing or pending." : "Alerts are disabled (alerts.enabled).");
    const key = open.map((a) => a.id + a.state).join(",");
    if (key !== state.resolvedKey) { state.resolvedKey = key; loadResolved(); }
  }

  function renderModels() {
    const frame = state.frame;
    const rows = new Map();
    const row = (name) => {
      if (!rows.has(name)) rows.set(name, { name });
      return rows.get(name);
    };
    for (const m of (state.summary && state.summary.models) || []) if (m.model) row(m.model).summary = m;
    for (const m of (state.inventory && state.inventory.models) || []) row(m.model_name).info = m;
    if (frame) {
      for (const [n, l] of Object.entries(frame.live || {})) if (n !== "(unknown)") row(n).live = l;
      for (const l of frame.loaded || []) row(l.model).loaded = l;
    }
    const list = $("#models-list");
    list.replaceChildren(...Array.from(rows.keys()).map((n) => el("option", { value: n })));
    const body = $("#models-table tbody");
    if (!rows.size) {
      body.replaceChildren(el("tr", {}, el("td", { class: "empty", colspan: 13, text: "No model seen yet." })));
      return;
    }
    const inventoryOn = !!(state.inventory && state.inventory.enabled);
    // Busiest first; a flood of mistyped names cannot make the table endless.
    const sorted = Array.from(rows.values()).sort((a, b) =>
      ((b.summary && b.summary.requests) || 0) - ((a.summary && a.summary.requests) || 0) || a.name.localeCompare(b.name));
    const shown = sorted.slice(0, MAX_MODELS);
    $("#models-more").textContent = sorted.length > MAX_MODELS ? (sorted.length - MAX_MODELS) + " more models with fewer requests are not shown." : "";
    body.replaceChildren(...shown.map((r) => {
      const s = r.summary || {};
      const info = r.info || {};
      const live = r.live || {};
      const loadedNow = frame && inventoryOn ? !!r.loaded : info.loaded;
      const vram = r.loaded ? r.loaded.size_vram_bytes : info.size_vram_bytes;
      const expires = r.loaded ? r.loaded.expires_at : info.expires_at;
      return el("tr", { "data-model": r.name },
        el("td", { class: "wrap model", text: r.name }),
        el("td", { class: "num", text: s.requests === undefined ? "–" : num(s.requests, 0) }),
        el("td", { class: "num", text: pct(s.error_rate) }),
        el("td", { class: "num", text: ms(s.ttft_ms_p50) }),
        el("td", { class: "num", text: ms(s.ttft_ms_p95) }),
        el("td", { class: "num", text: s.tokens_per_second_p50 ? num(s.tokens_per_second_p50, 1) + " tok/s" : "–" }),
        el("td", { class: "num", text: live.in_flight ? String(live.in_flight) : "0" }),
        el("td", { class: "num", text: live.waiting ? String(live.waiting) : "0" }),
        el("td", {}, inventoryOn ? el("span", { class: "badge " + (loadedNow ? "ok" : "muted"), text: loadedNow ? "loaded" : "no" }) : "–"),
        el("td", { class: "num", text: loadedNow ? bytes(vram) : "–" }),
        el("td", { text: loadedNow && expires ? ago(expires) : "–", title: expires || null }),
        el("td", { text: info.model_version ? info.model_version.slice(0, 12) : "–", title: info.model_version || null }),
        el("td", {}, actions(r.name, loadedNow)));
    }));
  }

  function actions(model, loaded) {
    const keep = el("select", { "aria-label": "Keep " + model + " loaded for" },
      ...[["5m", "5 min"], ["30m", "30 min"], ["2h", "2 h"], ["24h", "24 h"], ["-1", "forever"]].map(([v, t]) => el("option", { value: v, text: t })));
    keep.value = "30m";
    const call = (what, extra, button) => modelAction(what, { model, ...extra }, button);
    return el("div", { class: "actions" },
      loaded
        ? el("button", { type: "button", "data-action": "unload", onclick: (e) => call("unload", {}, e.currentTarget), text: "Unload" })
        : el("button", { type: "button", "data-action": "load", onclick: (e) => call("load", {}, e.currentTarget), text: "Load" }),
      el("button", { type: "button", "data-action": "keep", onclick: (e) => call("keep", { keep_alive: keep.value === "-1" ? -1 : keep.value }, e.currentTarget), text: "Keep" }),
      keep,
      el("button", { type: "button", "data-action": "pull", onclick: (e) => call("pull", {}, e.currentTarget), text: "Pull" }));
  }

  async function modelAction(what, body, button) {
    const out = $("#action-result");
    button.disabled = true;
    out.textContent = what + " " + body.model + "…";
    try {
      const resp = await fetch(`${API}/models/${what}`, {
        method: "POST", credentials: "same-origin",
        headers: { "Content-Type": "application/json", Accept: "application/json" },
        body: JSON.stringify(body),
      });
      let answer = null;
      try { answer = await resp.json(); } catch (e) { answer = null; }
      if (resp.ok && answer && answer.ok !== false) {
        out.textContent = what + " " + body.model + ": " + (resp.status === 202 ? "started" : "done");
      } else {
        out.textContent = what + " " + body.model + " failed: " + (answer && answer.error ? answer.error : "HTTP " + resp.status);
      }
    } catch (e) {
      out.textContent = what + " " + body.model + " failed: " + e.message;
    } finally {
      button.disabled = false;
      setTimeout(loadModels, 500);
    }
  }

  function knownModel(name) {
    return ((state.summary && state.summary.models) || []).some((m) => m.model === name);
  }

  let modelsTimer = null;
  function refreshModelsSoon() {
    // A model the table has no figures for yet: reload the summary, at most every 3 s.
    if (modelsTimer !== null) return;
    modelsTimer = setTimeout(() => { modelsTimer = null; loadModels(); }, 3000);
  }

  function updateEmpty() {
    const empty = !state.seenAny && (!state.frame || state.frame.seq === 0);
    $("#empty").hidden = !empty;
    if (empty) {
      $("#empty-cmd").textContent = "export OLLAMA_HOST=" + location.host + "\nollama run llama3.2";
      $("#empty-url").textContent = location.origin;
    }
  }

  // -- per upstream and per instance (docs/dashboard.md, "Upstreams and instances") -------------------

  // From raw rows (the rollups keep neither), so over the chart window up to its last hour. A table is shown
  // only when its column has several values in the window; the panel only when one of them is.
  async function loadHosts() {
    const which = WINDOWS[state.window].seconds <= 3600 ? state.window : "1h";
    const dims = [["upstream", "#upstreams"], ["instance", "#instances"]];
    const answers = await Promise.allSettled(dims.map(([by]) =>
      api(`${API}/summary?` + new URLSearchParams({ window: which, by, per_model: "false" }))));
    let any = false;
    dims.forEach(([by, id], i) => {
      const a = answers[i];
      const groups = a.status === "fulfilled" ? a.value.groups || [] : [];
      $(id + "-wrap").hidden = groups.length < 2;
      if (groups.length < 2) return;
      any = true;
      $(id + "-table tbody").replaceChildren(...groups.map((g) => el("tr", { "data-name": g[by] || "" },
        el("td", { class: "wrap", text: g[by] || "(none)" }),
        el("td", { class: "num", text: num(g.requests, 0) }),
        el("td", { class: "num", text: num(g.failed, 0) }),
        el("td", { class: "num", text: pct(g.error_rate) }),
        el("td", { class: "num", text: ms(g.ttft_ms_p50) }),
        el("td", { class: "num", text: ms(g.ttft_ms_p95) }),
        el("td", { class: "num", text: g.tokens_per_second_avg ? num(g.tokens_per_second_avg, 1) + " tok/s" : "–" }),
        el("td", { class: "num", text: num(g.completion_tokens, 0) }))));
    });
    $("#hosts").hidden = !any;
    $("#hosts-window").textContent = "(last " + which.replace("m", " min").replace("h", " h") + ")";
  }

  // -- usage (docs/usage.md, "Reports") -------------------------------------------------------------

  function usd(v) {
    if (v === null || v === undefined) return "–";
    return "$" + num(v, v !== 0 && Math.abs(v) < 1 ? 4 : 2);
  }

  async function loadUsage() {
    const by = $("#usage-by").value;
    const tbody = $("#usage-table tbody");
    let data;
    try {
      data = await api(`${API}/usage?` + new URLSearchParams({ by, window: "30d", limit: "50" }));
    } catch (e) {
      $("#usage-note").textContent = "Usage cannot be read now: " + e.message;
      return;
    }
    $("#usage-group").textContent = { model: "Model", key: "API key", team: "Team", user: "User" }[by];
    const name = (r) => (r[by] === null ? "(none)" : by === "key" && r.key_name ? r.key_name : r[by]);
    const cells = (r, label) => [
      el("td", { text: label, title: by === "key" && r.key ? r.key : null }),
      el("td", { class: "num", text: num(r.requests, 0) }),
      el("td", { class: "num", text: num(r.failed, 0) }),
      el("td", { class: "num", text: num(r.rate_limited, 0) }),
      el("td", { class: "num", text: num(r.prompt_tokens, 0) }),
      el("td", { class: "num", text: num(r.completion_tokens, 0) }),
      el("td", { class: "num", text: usd(r.cost_usd) }),
      el("td", { class: "num", text: usd(r.cloud_equiv_usd) }),
      el("td", { class: "num", text: usd(r.energy_cost_usd) }),
      el("td", { class: "num", text: r.quota_used_percent === undefined ? "–" : num(r.quota_used_percent, 1) + " %" }),
    ];
    const rows = data.rows.map((r) => el("tr", {}, ...cells(r, name(r))));
    if (data.rows.length) rows.push(el("tr", { class: "total" }, ...cells(data.total, "Total")));
    tbody.replaceChildren(...rows);
    const quotas = (data.quotas || []).filter((q) => q.limits.length);
    const notes = quotas.map((q) => `${q.subject} ${q.name}: ` + q.limits.map((l) => `${l.limit} ${num(l.percent, 1)} %`).join(", "));
    $("#usage-note").textContent = data.rows.length ? (notes.length ? "Quotas: " + notes.join("; ") : "") : "No usage in the last 30 days";
  }

  // -- content analysis (docs/content.md, "API") ----------------------------------------------------

  function topLanguages(langs, n) {
    const entries = Object.entries(langs || {}).slice(0, n);  // the API sends them most frequent first
    return entries.length ? entries.map(([lang, count]) => `${lang} ${num(count, 0)}`).join(", ") : "–";
  }

  async function loadContent() {
    const which = state.window;
    let data;
    try {
      data = await api(`${API}/content?` + new URLSearchParams({ window: which, by: "model" }));
    } catch (e) {
      $("#content-note").textContent = "Content analysis cannot be read now: " + e.message;
      return;
    }
    if (which !== state.window) return;  // a newer window was chosen meanwhile
    $("#content-window").textContent = "last " + which;
    const o = data.overall;
    const groups = data.groups || [];
    $("#content-overall").textContent = o.analysed
      ? `${num(o.analysed, 0)} analysed · unsafe ${pct(o.unsafe_rate)} · PII ${pct(o.pii_rate)} · languages: ${topLanguages(o.languages, 3)}`
      : "";
    $("#content-table tbody").replaceChildren(...groups.map((g) => el("tr", {},
      el("td", { text: g.model === null ? "(none)" : g.model }),
      el("td", { class: "num", text: num(g.analysed, 0) }),
      el("td", { class: "num", text: num(g.failed, 0) }),
      el("td", { class: "num", text: pct(g.unsafe_rate) }),
      el("td", { class: "num", text: pct(g.pii_rate) }),
      el("td", { text: topLanguages(g.languages, 3) }))));
    $("#content-note").textContent = !data.enabled
      ? "Content analysis is off (content.enabled)" + (o.analysed ? "; these are earlier results" : "")
      : o.analysed ? "" : `Nothing analysed in the last ${which}`;
  }

  // -- drill-down ----------------------------------------------------------------------------------

  function kvTable(obj) {
    return el("table", { class: "data kv" }, el("tbody", {}, ...Object.entries(obj).map(([k, v]) =>
      el("tr", {}, el("td", { text: k }), el("td", { text: v === null || v === undefined ? "–" : typeof v === "object" ? JSON.stringify(v) : String(v) })))));
  }

  async function openDialog(title, load) {
    const dlg = $("#detail");
    $("#detail-title").textContent = title;
    const body = $("#detail-body");
    body.replaceChildren(el("p", { class: "note", text: "Loading…" }));
    if (!dlg.open) dlg.showModal();
    try {
      body.replaceChildren(...(await load()));
    } catch (e) {
      body.replaceChildren(el("p", { class: "note", text: "Could not load: " + e.message }));
    }
  }

  function openRequest(id) {
    openDialog("Request " + id, async () => {
      const d = await api(`${API}/requests/${encodeURIComponent(id)}`);
      const parts = [kvTable(d.request)];
      if (d.errors && d.errors.length) {
        parts.push(el("h3", { text: "Errors" }));
        for (const e of d.errors) parts.push(kvTable(e));
      }
      if (d.text) {
        parts.push(el("h3", { text: "Prompt" }), el("pre", { text: d.text.prompt_text || "" }));
        parts.push(el("h3", { text: "Response" }), el("pre", { text: d.text.response_text || "" }));
      } else {
        parts.push(el("p", { class: "note", text: "Prompt and response text are not stored (storage.store_text is off)." }));
      }
      return parts;
    });
  }

  function openAlert(id) {
    openDialog("Alert " + id, async () => {
      const a = await api(`${API}/alerts/${encodeURIComponent(id)}`);
      const { transitions, ...rest } = a;
      const rows = (transitions || []).map((t) => el("tr", {}, el("td", { text: t.at }), el("td", { text: t.from_state + " → " + t.to_state }), el("td", { class: "num", text: t.value === null ? "–" : num(t.value) })));
      return [el("h3", { text: "Transitions" }),
        el("table", { class: "data" }, el("thead", {}, el("tr", {}, el("th", { text: "At (UTC)" }), el("th", { text: "Change" }), el("th", { class: "num", text: "Value" }))), el("tbody", {}, ...rows)),
        el("h3", { text: "Alert" }), kvTable(rest)];
    });
  }

  // -- the live stream -----------------------------------------------------------------------------

  function mergeMinutes(points) {
    if (!WINDOWS[state.window].live || !points || !points.length) return;
    for (const p of points) {
      const t = p.bucket_start_s;
      const i = state.series.findIndex((s) => s.t === t);
      if (i >= 0) {
        // After a restart memory holds less than the database: keep the larger (stored) bucket then.
        if ((p.requests || 0) >= (state.series[i].requests || 0)) state.series[i] = { ...p, t };
      } else if (!state.series.length || t > state.series[state.series.length - 1].t) {
        state.series.push({ ...p, t });
      }
    }
    const oldest = Date.now() / 1000 - WINDOWS[state.window].seconds - 60;
    while (state.series.length && state.series[0].t < oldest) state.series.shift();
  }

  function mergeSystem(sys) {
    if (!sys) return;
    if (sys.gpu) state.gpuState = sys.gpu;
    const latest = sys.latest;
    if (!latest || !WINDOWS[state.window].live) return;
    const p = systemPoint(latest);
    const last = state.system[state.system.length - 1];
    if (!last || p.t > last.t) state.system.push(p);
    const oldest = Date.now() / 1000 - WINDOWS[state.window].seconds;
    while (state.system.length && state.system[0].t < oldest) state.system.shift();
  }

  function onFrame(frame) {
    const first = state.frame === null;
    state.frame = frame;
    renderStatus(frame);
    renderTiles(frame);
    renderLive(frame);
    renderAlerts(frame);
    addLiveRows(frame.requests);
    mergeMinutes(frame.minutes);
    mergeSystem(frame.system);
    drawAll();
    const modelsKey = JSON.stringify([frame.live, frame.loaded]);
    if (first || frame.requests.length || modelsKey !== state.modelsKey) renderModels();
    state.modelsKey = modelsKey;
    if (frame.requests.some((r) => r.model_name && !knownModel(r.model_name))) refreshModelsSoon();
    updateEmpty();
  }

  function connect() {
    const source = new EventSource(`${API}/live`, { withCredentials: true });
    source.onopen = () => {
      setStatus("st-live", "ok", "connected");
      $("#banner-disconnected").hidden = true;
      if (state.wasDown) {
        // Frames sent while the page was away are gone: reload what they would have added.
        state.wasDown = false;
        loadRequests();
        loadHistory();
        loadModels();
      }
    };
    source.onerror = () => {
      setStatus("st-live", "bad", "disconnected");
      $("#banner-disconnected").hidden = false;
      state.wasDown = true;
      if (source.readyState === EventSource.CLOSED) {
        // Refused (503: too many pages, or 401: the session ended). A cheap JSON call tells which: on 401
        // api() goes to the login form; otherwise try the stream again.
        api(`${API}/models`).then(() => setTimeout(connect, 3000), () => setTimeout(connect, 3000));
      }
    };
    source.onmessage = (event) => {
      let frame;
      try { frame = JSON.parse(event.data); } catch (e) { return; }
      onFrame(frame);
    };
  }

  // -- controls ------------------------------------------------------------------------------------

  function selectWindow(name) {
    state.window = name;
    for (const b of document.querySelectorAll(".windows button")) b.setAttribute("aria-pressed", String(b.dataset.window === name));
    loadHistory();
    loadModels();
    loadHosts();
    loadContent();
  }

  function debounce(fn, delay) {
    let t = null;
    return () => { clearTimeout(t); t = setTimeout(fn, delay); };
  }

  function start() {
    for (const b of document.querySelectorAll(".windows button")) b.addEventListener("click", () => selectWindow(b.dataset.window));
    const refilter = debounce(loadRequests, 300);
    $("#f-model").addEventListener("input", refilter);
    $("#f-endpoint").addEventListener("input", refilter);
    $("#f-failed").addEventListener("change", loadRequests);
    $("#filters").addEventListener("submit", (e) => { e.preventDefault(); loadRequests(); });
    $("#detail-close").addEventListener("click", () => $("#detail").close());
    matchMedia("(prefers-color-scheme: dark)").addEventListener("change", buildCharts);
    let width = window.innerWidth;
    window.addEventListener("resize", debounce(() => { if (window.innerWidth !== width) { width = window.innerWidth; buildCharts(); } }, 200));
    buildCharts();
    loadHistory();
    loadModels();
    loadRequests();
    loadResolved();
    loadUsage();
    loadContent();
    loadHosts();
    $("#usage-by").addEventListener("change", loadUsage);
    $("#usage-form").addEventListener("submit", (e) => { e.preventDefault(); loadUsage(); });
    connect();
    // History the live frames do not carry: long windows, model figures, inventory.
    setInterval(() => { if (!WINDOWS[state.window].live) loadHistory(); }, 60000);
    setInterval(loadModels, 15000);
    setInterval(loadUsage, 60000);
    setInterval(loadContent, 15000);
    setInterval(loadHosts, 15000);
  }

  document.addEventListener("DOMContentLoaded", start);
})();
