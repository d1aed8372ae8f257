// fedgate dashboard: vanilla JS, no build step, nothing fetched from elsewhere.
// Reads the gateway's own JSON API with the API key the user gives (kept in
// sessionStorage; `#key=...&model=...` in the URL fragment works too and is then
// removed from the address bar). Everything is rendered with textContent and DOM
// nodes, never as HTML source: data from the fleet is never interpreted as markup.
"use strict";

const REFRESH_MS = 5000;
const KEY_STORE = "fedgate.apiKey";
const SVG_NS = "http://www.w3.org/2000/svg";
const app = { key: null, model: null, busy: false };

// -- DOM helpers ---------------------------------------------------------------------
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v !== null && v !== undefined) node.setAttribute(k, v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function svg(tag, attrs, ...children) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v !== null && v !== undefined) node.setAttribute(k, String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function setBody(sectionId, ...nodes) {
  const body = document.querySelector(`#${sectionId} .body`);
  body.replaceChildren(...nodes.flat().filter((n) => n));
}

function setText(id, text) {
  document.getElementById(id).textContent = text;
}

function fmt(x, digits = 3) {
  return x === null || x === undefined || Number.isNaN(x) ? "—" : Number(x).toFixed(digits);
}

function clock(ts) {
  if (!ts) return "—";
  const d = new Date(ts * 1000);
  return [d.getHours(), d.getMinutes(), d.getSeconds()]
    .map((n) => String(n).padStart(2, "0")).join(":");
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "—";
  if (seconds < 90) return `${seconds.toFixed(1)} s`;
  if (seconds < 5400) return `${(seconds / 60).toFixed(1)} min`;
  return `${(seconds / 3600).toFixed(1)} h`;
}

function badge(text, cls) {
  return el("span", { class: `badge ${cls || ""}` }, text);
}

function table(headers, rows, numeric = []) {
  const head = el("tr", {}, headers.map((h, i) => el("th", numeric.includes(i) ? { class: "num" } : {}, h)));
  const body = rows.map((cells) => el("tr", {},
    cells.map((c, i) => el("td", numeric.includes(i) ? { class: "num" } : {}, c))));
  return el("div", { class: "scroll" }, el("table", {}, el("thead", {}, head), el("tbody", {}, body)));
}

function message(text, cls = "empty") {
  return el("p", { class: cls }, text);
}

// -- API -----------------------------------------------------------------------------
class ApiError extends Error {
  constructor(status, text) {
    super(text);
    this.status = status;
  }
}

async function api(path) {
  const resp = await fetch(path, {
    headers: { Authorization: `Bearer ${app.key}`, Accept: "application/json" },
    cache: "no-store",
  });
  if (!resp.ok) {
    let text = resp.statusText;
    try { text = (await resp.json()).error || text; } catch (_) { /* not JSON */ }
    throw new ApiError(resp.status, text);
  }
  return resp.json();
}

function modelPath(suffix) {
  return `/v1/models/${encodeURIComponent(app.model)}/${suffix}`;
}

// -- charts --------------------------------------------------------------------------
function niceMax(value) {
  if (!(value > 0)) return 1;
  const step = 10 ** Math.floor(Math.log10(value));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * step >= value) return m * step;
  return 10 * step;
}

function ticks(lo, hi, n) {
  const out = [];
  for (let i = 0; i <= n; i++) out.push(lo + ((hi - lo) * i) / n);
  return out;
}

// A round's gate metric (the model's own: accuracy, mae, ...), older records: accuracy.
function metricOf(rounds) {
  const last = rounds.filter((r) => r.metric).pop();
  return last ? { name: last.metric, higher: last.higher_is_better !== false }
    : { name: "accuracy", higher: true };
}

function withMetric(r) {
  return { ...r, accuracy: r.value ?? r.accuracy, serving_accuracy: r.serving_value ?? r.serving_accuracy };
}

// One chart, two y axes: the gate metric (left, zoomed to the data) and loss (right, from 0).
function roundsChart(rounds) {
  const metric = metricOf(rounds);
  const bounded = metric.name.endsWith("accuracy");  // a share in [0, 1]
  rounds = rounds.map(withMetric);
  const W = 1100, H = 260, L = 48, R = 52, T = 26, B = 34;
  const xs = rounds.map((r) => r.round);
  const x0 = Math.min(...xs), x1 = Math.max(...xs);
  const values = (keys) => rounds.flatMap((r) => keys.map((k) => r[k]))
    .filter((v) => v !== null && v !== undefined);
  const accs = values(["accuracy", "serving_accuracy"]);
  const accLo = !bounded ? 0
    : accs.length ? Math.max(0, Math.floor((Math.min(...accs) - 0.02) * 20) / 20) : 0;
  const accHi = !bounded ? niceMax(Math.max(0, ...accs))
    : accs.length ? Math.min(1, Math.ceil((Math.max(...accs) + 0.01) * 20) / 20) : 1;
  const lossMax = niceMax(Math.max(0, ...values(["loss"])));
  const px = (x) => (x1 === x0 ? (L + W - R) / 2 : L + ((x - x0) * (W - L - R)) / (x1 - x0));
  const py = (f) => T + (1 - f) * (H - T - B);
  const pyAcc = (y) => py((y - accLo) / (accHi - accLo || 1));
  const pyLoss = (y) => py(y / lossMax);
  const g = svg("svg", { class: "chart", id: "rounds-chart", viewBox: `0 0 ${W} ${H}`, role: "img",
    "aria-label": `${metric.name} and loss per round` });
  for (const f of ticks(0, 1, 4)) {
    g.append(svg("line", { class: "grid", x1: L, x2: W - R, y1: py(f), y2: py(f) }));
    g.append(svg("text", { x: L - 6, y: py(f) + 4, "text-anchor": "end" },
      (accLo + f * (accHi - accLo)).toFixed(3)));
    g.append(svg("text", { x: W - R + 6, y: py(f) + 4 }, (f * lossMax).toPrecision(2)));
  }
  for (const r of rounds.filter((r) => r.outcome === "failed")) {
    g.append(svg("text", { class: "failed-mark", x: px(r.round), y: H - B - 6, "text-anchor": "middle" },
      "×", svg("title", {}, `round ${r.round} failed: ${r.reason}`)));
  }
  g.append(svg("line", { class: "axis", x1: L, x2: W - R, y1: H - B, y2: H - B }));
  const step = Math.max(1, Math.ceil(xs.length / 20));
  xs.forEach((x, i) => {
    if (i % step === 0 || i === xs.length - 1) {
      g.append(svg("text", { x: px(x), y: H - B + 16, "text-anchor": "middle" }, x));
    }
  });
  g.append(svg("text", { x: (L + W - R) / 2, y: H - 4, "text-anchor": "middle" }, "round"));
  const series = [
    { key: "accuracy", cls: "acc", y: pyAcc, label: `candidate ${metric.name} (left)` },
    { key: "serving_accuracy", cls: "serving", y: pyAcc, label: `serving ${metric.name} (left)` },
    { key: "loss", cls: "loss", y: pyLoss, label: "candidate loss (right)" },
  ];
  series.forEach((s, i) => {
    const pts = rounds.filter((r) => r[s.key] !== null && r[s.key] !== undefined);
    if (pts.length > 1) {
      g.append(svg("polyline", { class: `series ${s.cls}`,
        points: pts.map((r) => `${px(r.round)},${s.y(r[s.key])}`).join(" ") }));
    }
    for (const r of pts) {
      const held = r.outcome !== "released";
      g.append(svg("circle", { class: `pt ${s.cls}${held ? " held" : ""}`, cx: px(r.round),
        cy: s.y(r[s.key]), r: 4, "stroke-width": 2, "data-round": r.round },
      svg("title", {}, `round ${r.round} ${r.outcome}: ${s.label.replace(/ \(.*/, "")} ${fmt(r[s.key])}`)));
    }
    const lx = L + 10 + i * 230;
    g.append(svg("line", { class: `series ${s.cls}`, x1: lx, x2: lx + 22, y1: 12, y2: 12 }));
    g.append(svg("text", { class: "legend", x: lx + 28, y: 16 }, s.label));
  });
  g.append(svg("text", { class: "legend", x: W - R, y: 16, "text-anchor": "end" },
    "hollow: held back, ×: failed"));
  return g;
}

// Grouped bars: p50, p90, p99 latency (ms) per version.
function latencyChart(rows) {
  const W = 540, H = 230, L = 52, R = 12, T = 26, B = 34;
  const keys = [["p50_ms", "p50"], ["p90_ms", "p90"], ["p99_ms", "p99"]];
  const top = niceMax(Math.max(0, ...rows.flatMap((r) => keys.map(([k]) => r[k] || 0))));
  const py = (v) => T + (1 - v / top) * (H - T - B);
  const g = svg("svg", { class: "chart", id: "latency-chart", viewBox: `0 0 ${W} ${H}`, role: "img",
    "aria-label": "latency per version" });
  for (const t of ticks(0, top, 4)) {
    g.append(svg("line", { class: "grid", x1: L, x2: W - R, y1: py(t), y2: py(t) }));
    g.append(svg("text", { x: L - 6, y: py(t) + 4, "text-anchor": "end" }, `${+t.toPrecision(3)}`));
  }
  g.append(svg("text", { x: 4, y: 14 }, "ms"));
  const slot = (W - L - R) / Math.max(1, rows.length);
  const bw = Math.min(36, (slot * 0.8) / keys.length);
  rows.forEach((r, i) => {
    const cx = L + slot * (i + 0.5);
    keys.forEach(([k, cls], j) => {
      const v = r[k] || 0;
      const x = cx + (j - keys.length / 2) * bw;
      g.append(svg("rect", { class: `bar ${cls}`, x, y: py(v), width: bw - 2, height: H - B - py(v) },
        svg("title", {}, `version ${r.version} ${cls}: ${fmt(r[k], 2)} ms`)));
      g.append(svg("text", { class: "value", x: x + (bw - 2) / 2, y: py(v) - 3,
        "text-anchor": "middle" }, fmt(r[k], 1)));
    });
    g.append(svg("text", { x: cx, y: H - B + 16, "text-anchor": "middle" }, `v${r.version}`));
  });
  g.append(svg("line", { class: "axis", x1: L, x2: W - R, y1: H - B, y2: H - B }));
  keys.forEach(([, cls], j) => {
    g.append(svg("rect", { class: `bar ${cls}`, x: W - R - 170 + j * 58, y: 6, width: 12, height: 12 }));
    g.append(svg("text", { class: "legend", x: W - R - 154 + j * 58, y: 16 }, cls));
  });
  return g;
}

// -- sections ------------------------------------------------------------------------
function health(e) {
  if (e.ejected) return badge(`ejected ${fmt(e.ejected_for_s, 0)} s`, "bad");
  if (e.failures > 0) return badge(`${e.failures} failure(s)`, "warn");
  if (e.last_seen_s > 2.5) return badge("heartbeat late", "warn");
  const ready = Object.values(e.models).some((m) => m.ready.length);
  return ready ? badge("healthy", "ok") : badge("nothing ready", "warn");
}

function loaded(e) {
  const out = [];
  for (const [model, st] of Object.entries(e.models)) {
    out.push(el("span", { class: "muted" }, `${model} `));
    for (const v of st.ready) out.push(badge(`v${v}`, "ok"));
    for (const [v, reason] of Object.entries(st.failed || {})) {
      out.push(el("span", { class: "badge bad", title: reason }, `v${v} failed`));
    }
  }
  return out;
}

function renderFleet(data) {
  const edges = data.edges;
  const ejected = edges.filter((e) => e.ejected).length;
  setText("fleet-summary", `${edges.length} edge(s), ${edges.length - ejected} admitted, ${ejected} ejected`);
  if (!edges.length) return setBody("fleet", message("no edge has sent a heartbeat"));
  const rows = edges.map((e) => [
    el("span", { class: "edge-id" }, e.edge_id), e.device, health(e), el("span", {}, loaded(e)),
    String(e.outstanding), String(e.pending), String(e.served), `${fmt(e.last_seen_s, 1)} s ago`,
    el("span", { class: "mono muted" }, e.url),
  ]);
  setBody("fleet", table(
    ["edge", "device", "health", "versions loaded", "outstanding", "pending (Triton)", "served",
      "heartbeat", "url"], rows, [4, 5, 6]));
}

function servedBy(edges, model) {
  const out = new Map();
  for (const e of edges) {
    for (const v of (e.models[model] || { ready: [] }).ready) {
      out.set(v, [...(out.get(v) || []), e.edge_id]);
    }
  }
  return out;
}

function renderVersions(data, edges, routing) {
  const lineage = new Map(data.versions.map((v) => [v.version, v]));
  const served = servedBy(edges, app.model);
  const all = [...new Set([...lineage.keys(), ...served.keys()])].sort((a, b) => a - b);
  setText("versions-summary", `${all.length} version(s) of ${app.model}`);
  if (!all.length) return setBody("versions", message("no released version yet"));
  const split = routing && routing.split;
  const role = (v) => {
    if (split && split.stable === v) return badge("stable", "ok");
    if (split && split.candidate === v) return badge(`candidate ${fmt(split.candidate_weight * 100, 0)}%`, "warn");
    if (!split && routing && routing.default_version === v) return badge("default", "ok");
    return null;
  };
  const chain = el("div", { class: "chain" }, all.flatMap((v, i) => {
    const l = lineage.get(v);
    const node = el("span", { class: `node${served.has(v) ? " serving" : ""}`,
      title: l ? `from v${l.parent_version} in round ${l.round}` : "bootstrap" }, `v${v}`);
    return i ? [el("span", { class: "arrow" }, l && l.parent_version !== all[i - 1] ? `⇢ (from v${l.parent_version})` : "→"), node] : [node];
  }));
  const rows = all.slice().reverse().map((v) => {
    const l = lineage.get(v);
    const edgesOf = served.get(v) || [];
    return [
      el("strong", {}, `v${v}`), el("span", {}, role(v)),
      l ? (l.parent_version ? `v${l.parent_version}` : "—") : "—",
      l && l.round ? String(l.round) : (l || v !== 1 ? "—" : "bootstrap"),
      l ? l.strategy : "—",
      l ? (l.contributors || []).map((c) => c.edge_id).join(", ") || "—" : "—",
      l ? String(l.samples) : "—",
      fmt(l && (l.value ?? l.accuracy)), fmt(l && l.loss),
      edgesOf.length ? edgesOf.join(", ") : el("span", { class: "muted" }, "none"),
      l ? clock(l.created_ts) : "—",
      el("span", { class: "mono muted" }, l ? l.digest.slice(0, 12) : ""),
    ];
  });
  setBody("versions", chain, table(
    ["version", "role", "parent", "round", "strategy", "contributors", "samples",
      metricOf([...lineage.values()]).name, "loss", "served by", "created", "digest"],
    rows, [6, 7, 8]));
}

function outcome(o) {
  return badge(o, o === "released" ? "ok" : o === "held" ? "warn" : "bad");
}

function renderRounds(data) {
  const rounds = data.rounds;
  const open = data.open;
  const openText = open && open.state === "open"
    ? `round ${open.round} open (${open.mode}, from v${open.base_version}, deadline ${clock(open.deadline_ts)})`
    : "no round open";
  setText("rounds-summary", `${rounds.length} closed; ${openText}`);
  if (!rounds.length) return setBody("rounds", message(`no closed round yet; ${openText}`));
  const contributors = (r) => r.secure  // securely aggregated: per-edge counts stay on the edges
    ? `${r.survivors ?? "?"} in the sum, ${r.dropped ?? "?"} dropped`
    : (r.contributors || []).map((c) => `${c.edge_id} (${c.samples})`).join(", ") || "—";
  const metric = metricOf(rounds).name;
  // which evaluation decided the gate, on how many samples
  const evaluation = (r) => r.evaluation ? `${r.evaluation} (${r.eval_samples ?? "?"})` : "—";
  const rows = rounds.slice().reverse().map(withMetric).map((r) => [
    String(r.round), r.secure ? `${r.mode}, secure` : r.mode, outcome(r.outcome), r.reason,
    r.released_version ? `v${r.base_version} → v${r.released_version}` : `v${r.base_version}`,
    contributors(r),
    fmt(r.accuracy), fmt(r.loss), fmt(r.serving_accuracy), evaluation(r),
    duration(r.closed_ts - r.opened_ts), clock(r.closed_ts),
  ]);
  setBody("rounds", roundsChart(rounds), el("div", { class: "rows" }, table(
    ["round", "mode", "outcome", "reason", "version", "contributors (samples)", metric,
      "loss", `serving ${metric}`, "evaluation", "took", "closed"], rows, [6, 7, 8])));
}

const ACTIVE = new Set(["pending", "staging", "canary"]);

function stateBadge(state) {
  const cls = { promoted: "ok", canary: "warn", staging: "warn", pending: "muted", rolled_back: "bad", failed: "bad" };
  return badge(state.replace("_", " "), cls[state] || "");
}

function pct(x) {
  return x === null || x === undefined ? "—" : `${(x * 100).toFixed(x < 0.1 ? 1 : 0)}%`;
}

function rate(stats) {
  return stats && stats.requests ? `${pct(stats.errors / stats.requests)} (${stats.errors} of ${stats.requests})` : "—";
}

function p99(stats) {
  return stats && stats.p99_s !== null && stats.p99_s !== undefined ? `${fmt(stats.p99_s * 1000, 1)} ms` : "—";
}

// One row per gate: threshold, what the candidate and the stable version show now.
function gateTable(r) {
  const g = r.spec.gates;
  const obs = r.observation;
  const c = obs ? obs.candidate : null, s = obs ? obs.stable : null;
  const off = el("span", { class: "muted" }, "off");
  const rows = [
    ["error rate (5xx)", g.max_error_rate === null ? off : `≤ ${pct(g.max_error_rate)}`, rate(c), rate(s)],
    ["p99 latency", g.max_p99_ratio === null ? off : `≤ ${g.max_p99_ratio}× stable (ignored below ${g.p99_floor_ms} ms)`, p99(c), p99(s)],
    ["label accuracy", g.min_accuracy === null ? off : `≥ ${pct(g.min_accuracy)} after ${g.min_labels} labels`,
      c && c.labelled ? `${pct(c.correct / c.labelled)} (${c.correct} of ${c.labelled})` : "—", "—"],
    metricRow(g, obs),
    ["requests per stage", `≥ ${r.spec.min_requests} in ${r.spec.window_s} s`, c ? String(c.requests) : "—", s ? String(s.requests) : "—"],
  ];
  return table(["gate", "threshold", `candidate v${r.version}`, `stable v${r.stable}`], rows);
}

function metricRow(g, obs) {
  // the label gates on the model's own metric (tallies carry its sum: score / labelled)
  const name = obs && obs.metric ? obs.metric.name : "metric";
  const parts = [];
  if (g.min_metric !== null && g.min_metric !== undefined) parts.push(`≥ ${g.min_metric}`);
  if (g.max_metric !== null && g.max_metric !== undefined) parts.push(`≤ ${g.max_metric}`);
  if (g.metric_margin !== null && g.metric_margin !== undefined) {
    parts.push(`at most ${g.metric_margin} worse than stable (${obs && obs.metric ? obs.metric.direction : "?"} is better)`);
  }
  const value = (v) => (v && v.labelled ? `${(v.score / v.labelled).toFixed(3)} (${v.labelled} labels)` : "—");
  const c = obs ? obs.candidate : null, s = obs ? obs.stable : null;
  return [`label ${name}`, parts.length ? `${parts.join(", ")} after ${g.min_labels} labels` : el("span", { class: "muted" }, "off"), value(c), value(s)];
}

function renderSplit(routing) {
  if (!routing) return null;
  const s = routing.split;
  const text = s
    ? `stable v${s.stable}` + (s.candidate ? `, candidate v${s.candidate} at ${pct(s.candidate_weight)}` : "")
    : `no split: unversioned requests go to v${routing.default_version ?? "—"} (newest served)`;
  return el("p", { class: "note" }, `Traffic: ${text}`);
}

function rolloutError(err, split) {
  const noApi = err.status === 404 && /^not found$/i.test(err.message);
  const text = noApi ? "no rollout API in this gateway"
    : err.status === 403 ? "reading rollouts needs an admin key"
      : `rollouts: ${err.message}`;
  setText("rollout-summary", noApi ? "no rollout API" : err.status === 403 ? "admin key needed" : `error ${err.status || ""}`);
  setBody("rollout", message(text, noApi || err.status === 403 ? "empty" : "error-text"), split);
}

function renderRollout(result, routing) {
  const split = renderSplit(routing);
  if (result.error) return rolloutError(result.error, split);
  const list = result.data.rollouts || [];
  const r = result.current;
  if (!r) {
    setText("rollout-summary", "none yet");
    return setBody("rollout", message("no rollout of this model yet"), split);
  }
  setText("rollout-summary", `${r.id}: v${r.stable} → v${r.version}`);
  const stages = (r.spec.stages || [r.spec.canary]);
  const facts = [
    ["state", stateBadge(r.state)],
    ["candidate", `v${r.version} over stable v${r.stable}`],
    ["stage", r.state === "canary" ? `${r.stage + 1} of ${stages.length}: ${pct(r.weight)} of traffic` : `stages ${stages.map((p) => `${p}%`).join(", ")}`],
    ["verdict", r.observation ? r.observation.verdict : r.reason || (r.gates_passed ? "gates passed" : "—")],
    ["started", `${clock(r.created_ts)} by ${r.actor}`],
  ];
  const kv = el("dl", { class: "kv" }, facts.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
  const events = (r.events || []).slice(-4).reverse().map((e) => [clock(e.ts), e.kind, e.message]);
  const older = list.filter((x) => x.id !== r.id).slice(0, 5)
    .map((x) => el("span", {}, `${x.id} v${x.version} `, stateBadge(x.state)));
  setBody("rollout", kv, gateTable(r), split,
    events.length ? table(["time", "event", ""], events) : null,
    older.length ? el("p", { class: "note" }, "earlier: ", older) : null);
}

// The rollout to show: the active one, else the newest; live detail (gates' observation)
// when it is active.
async function loadRollout() {
  const data = await api(modelPath("rollouts"));
  const list = data.rollouts || [];
  let current = list.find((r) => ACTIVE.has(r.state)) || list[0] || null;
  if (current && ACTIVE.has(current.state)) {
    current = await api(modelPath(`rollouts/${encodeURIComponent(current.id)}`));
  }
  return { data, current };
}

function renderLatency(data) {
  const rows = data.versions;
  if (!rows.length) return setBody("latency", message("no inference request answered yet"));
  setBody("latency", latencyChart(rows), table(
    ["version", "requests", "errors", "mean ms", "p50 ms", "p90 ms", "p99 ms"],
    rows.map((r) => [`v${r.version}`, String(r.requests), String(r.errors), fmt(r.mean_ms, 2),
      fmt(r.p50_ms, 2), fmt(r.p90_ms, 2), fmt(r.p99_ms, 2)]), [1, 2, 3, 4, 5, 6]));
}

// -- refresh -------------------------------------------------------------------------
function syncModels(edges) {
  const models = [...new Set(edges.flatMap((e) => Object.keys(e.models)))].sort();
  if (app.model && !models.includes(app.model)) models.unshift(app.model);
  if (!app.model && models.length) app.model = models[0];
  const select = document.getElementById("model");
  const current = [...select.options].map((o) => o.value).join("\n");
  if (current !== models.join("\n")) {
    select.replaceChildren(...models.map((m) => el("option", { value: m }, m)));
  }
  select.value = app.model || "";
}

function showError(sectionId, err) {
  setBody(sectionId, message(`${err.status ? `HTTP ${err.status}: ` : ""}${err.message}`, "error-text"));
}

function status(text, isError) {
  const node = document.getElementById("status");
  node.textContent = text;
  node.className = isError ? "error" : "";
}

async function refresh() {
  if (!app.key) {
    status("enter an API key to load the dashboard", true);
    return;
  }
  if (app.busy) return;
  app.busy = true;
  try {
    const fleet = await api("/v1/edges");
    renderFleet(fleet);
    syncModels(fleet.edges);
    if (!app.model) {
      status(`updated ${clock(Date.now() / 1000)}; no model served yet`);
      return;
    }
    const names = ["versions", "rounds", "rollouts", "routing", "latency"];
    const got = await Promise.allSettled(
      names.map((n) => (n === "rollouts" ? loadRollout() : api(modelPath(n)))));
    const res = Object.fromEntries(names.map((n, i) => [n, got[i]]));
    const ok = (n) => (res[n].status === "fulfilled" ? res[n].value : null);
    const routing = ok("routing");
    if (ok("versions")) renderVersions(ok("versions"), fleet.edges, routing); else showError("versions", res.versions.reason);
    if (ok("rounds")) renderRounds(ok("rounds")); else showError("rounds", res.rounds.reason);
    if (ok("latency")) renderLatency(ok("latency")); else showError("latency", res.latency.reason);
    renderRollout(ok("rollouts") || { error: res.rollouts.reason }, routing);
    const failed = names.filter((n) => n !== "rollouts" && res[n].status === "rejected");
    status(failed.length ? `updated ${clock(Date.now() / 1000)}; failed: ${failed.join(", ")}`
      : `updated ${clock(Date.now() / 1000)}`, failed.length > 0);
  } catch (err) {
    if (err.status === 401) {
      status(`API key refused: ${err.message}`, true);
    } else {
      status(`cannot reach the gateway: ${err.message}`, true);
    }
  } finally {
    app.busy = false;
  }
}

function readFragment() {
  const params = new URLSearchParams(location.hash.replace(/^#/, ""));
  if (params.get("key")) {
    sessionStorage.setItem(KEY_STORE, params.get("key"));
    params.delete("key");
    const rest = params.toString();
    history.replaceState(null, "", location.pathname + location.search + (rest ? `#${rest}` : ""));
  }
  if (params.get("model")) app.model = params.get("model");
}

function start() {
  readFragment();
  app.key = sessionStorage.getItem(KEY_STORE);
  document.getElementById("key-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const input = document.getElementById("key");
    if (input.value.trim()) {
      app.key = input.value.trim();
      sessionStorage.setItem(KEY_STORE, app.key);
      input.value = "";
      refresh();
    }
  });
  document.getElementById("forget").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_STORE);
    app.key = null;
    status("key forgotten", true);
  });
  document.getElementById("model").addEventListener("change", (ev) => {
    app.model = ev.target.value;
    refresh();
  });
  refresh();
  setInterval(refresh, REFRESH_MS);
}

document.addEventListener("DOMContentLoaded", start);
