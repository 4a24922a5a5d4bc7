// edgetl console: plain JavaScript, no framework, no CDN. Every call goes to this server's JSON API.
"use strict";

const $ = (sel) => document.querySelector(sel);
const SVGNS = "http://www.w3.org/2000/svg";
const state = { token: null, classes: [], queue: [], selected: 0, skipped: new Set(), thumbs: new Map(),
                labelled: 0 };

function readToken() {
  const m = location.hash.match(/token=([^&]+)/);
  if (m) {
    sessionStorage.setItem("edgetl-token", decodeURIComponent(m[1]));
    history.replaceState(null, "", location.pathname);  // keep the token out of the address bar
  }
  state.token = sessionStorage.getItem("edgetl-token");
}

async function api(method, path, body, raw) {
  const headers = {};
  if (state.token) headers["Authorization"] = "Bearer " + state.token;
  let payload;
  if (raw !== undefined) { payload = raw; headers["Content-Type"] = "application/octet-stream"; }
  else if (body !== undefined) { payload = JSON.stringify(body); headers["Content-Type"] = "application/json"; }
  const res = await fetch(path, { method, headers, body: payload, credentials: "same-origin" });
  const type = res.headers.get("content-type") || "";
  const data = type.startsWith("application/json") ? await res.json() : await res.blob();
  if (!res.ok) throw new Error((data && data.error) || res.status + " " + res.statusText);
  return data;
}

function say(text, kind) {
  const el = $("#message");
  el.textContent = text;
  el.className = kind || "";
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

async function thumb(id) {
  if (!state.thumbs.has(id)) {
    state.thumbs.set(id, api("GET", "/api/image/" + id).then((blob) => URL.createObjectURL(blob)).catch(() => ""));
  }
  return state.thumbs.get(id);
}

function img(id, alt) {
  const node = el("img", { alt: alt || "", class: "thumb" });
  thumb(id).then((url) => { if (url) node.src = url; });
  return node;
}

const pct = (p) => (p === null || p === undefined) ? "n/a" : (100 * p).toFixed(1) + "%";

// ------------------------------------------------------------------------------------------------------ status
async function loadInfo() {
  const info = await api("GET", "/api/info");
  state.classes = info.classes;
  $("#status").textContent = `head ${info.current_head || "none"} · ${info.classes.length} classes · ` +
    `${info.selected.backend}/${info.selected.precision} · watcher ${info.watcher}` +
    (info.inbox ? "" : " · no inbox (start with --inbox DIR for the queue)");
}

// ------------------------------------------------------------------------------------------------------- queue
async function loadQueue() {
  let q;
  try { q = await api("GET", "/api/queue?limit=30"); }
  catch (e) { $("#queue").replaceChildren(el("p", { class: "hint" }, e.message)); return; }
  state.classes = q.classes;
  state.queue = q.items.filter((it) => !state.skipped.has(it.id));
  state.selected = Math.min(state.selected, Math.max(0, state.queue.length - 1));
  $("#queue-length").textContent = `(${q.length} unlabelled, head ${q.head_version})`;
  renderQueue();
}

function renderQueue() {
  const box = $("#queue");
  box.replaceChildren();
  state.queue.forEach((it, i) => {
    const buttons = el("div", { class: "buttons" });
    state.classes.forEach((c, k) => {
      const key = k < 10 ? ` [${(k + 1) % 10}]` : "";
      buttons.append(el("button", { type: "button", class: "label-btn", "data-class": c,
                                     onclick: () => submitLabel(it.id, c) }, c + key));
    });
    const top = it.top_k.map((t) => `${t.label} ${pct(t.probability)}`).join(", ");
    const meta = el("div", { class: "meta" },
      el("div", {}, el("b", {}, it.predicted), it.unknown ? el("span", { class: "unknown" }, " unknown") : ""),
      el("div", {}, top),
      el("div", {}, it.placed_by === "novelty" ? el("span", { class: "unknown" }, "novel: unlike every class") :
                    it.placed_by === "typical" ? "typical of a region no label covers yet" :
                    `margin ${it.margin.toFixed(3)} between the two likeliest`),
      el("div", { class: "hint" }, it.file));
    const row = el("div", { class: "item" + (i === state.selected ? " selected" : ""), "data-id": it.id,
                            onclick: () => { state.selected = i; renderQueue(); } },
      img(it.id, it.file), meta, buttons);
    box.append(row);
  });
  if (!state.queue.length) box.append(el("p", { class: "hint" }, "nothing to label"));
  $("#labelled-count").textContent = `${state.labelled} labelled in this session`;
}

async function submitLabel(id, label) {
  try {
    await api("POST", "/api/label", { id, label });
    state.labelled += 1;
    state.queue = state.queue.filter((it) => it.id !== id);
    if (!state.classes.includes(label)) state.classes.push(label);
    renderQueue();
    say(`labelled ${label}`, "ok");
    if (state.queue.length < 5) loadQueue();
  } catch (e) { say(e.message, "error"); }
}

function labelSelectedAsNew() {
  const name = $("#new-class").value.trim();
  const it = state.queue[state.selected];
  if (!name || !it) { say("type a class name and select an image", "error"); return; }
  submitLabel(it.id, name);
}

async function train() {
  const btn = $("#train-btn");
  btn.disabled = true;
  say("training …");
  try {
    const r = await api("POST", "/api/train", { force: $("#force").checked });
    $("#train-result").textContent = `${r.version}: ${r.promoted ? "promoted" : "kept as a candidate"} — ${r.reason}`;
    say(`trained ${r.version} on ${r.labelled_images} labelled images`, "ok");
    state.skipped.clear();
    await refreshAll();
  } catch (e) { say(e.message, "error"); }
  finally { btn.disabled = false; }
}

async function addClass() {
  const name = $("#new-class").value.trim();
  try {
    const r = await api("POST", "/api/add-class", { name, force: $("#force").checked });
    $("#train-result").textContent = `${r.version}: ${r.promoted ? "promoted" : "kept as a candidate"} — ${r.reason}`;
    await refreshAll();
  } catch (e) { say(e.message, "error"); }
}

// ----------------------------------------------------------------------------------------------------- predict
async function upload(file) {
  const box = $("#predict-result");
  box.replaceChildren(el("span", {}, "classifying …"));
  try {
    const r = await api("POST", "/api/predict?top_k=3", undefined, await file.arrayBuffer());
    const pic = el("img", { alt: file.name });
    pic.src = URL.createObjectURL(file);
    const lines = r.top_k.map((t) => el("div", {}, `${t.label}: ${pct(t.probability)}`));
    box.replaceChildren(pic, el("div", { id: "predicted-label" }, el("b", {}, r.label), " ", pct(r.probability),
      r.unknown ? el("span", { class: "unknown" }, " unknown") : ""), ...lines,
      el("div", { class: "hint" }, `head ${r.head_version}` + (r.novelty !== undefined ?
        ` · novelty ${r.novelty.toFixed(3)}` : "")));
  } catch (e) { box.replaceChildren(el("span", { class: "unknown" }, e.message)); }
}

// ----------------------------------------------------------------------------------------------------- history
async function loadHistory() {
  const { history } = await api("GET", "/api/history");
  const body = $("#history tbody");
  body.replaceChildren();
  for (const r of history.slice().reverse()) {
    const agree = r.operator_agreement ? `${pct(r.operator_agreement.accuracy)} of ${r.operator_agreement.n}` : "";
    const action = r.status === "current" ? "" :
      el("button", { type: "button", class: r.status === "candidate" ? "promote-btn" : "rollback-to-btn",
                     onclick: () => (r.status === "candidate" ? promote(r.version) : rollback(r.version)) },
         r.status === "candidate" ? "promote" : "make current");
    body.append(el("tr", { class: r.status, "data-version": r.version },
      el("td", {}, r.version), el("td", {}, r.status), el("td", {}, r.head || ""),
      el("td", {}, r.classes.length), el("td", {}, pct(r.metrics.val_accuracy)), el("td", {}, agree),
      el("td", {}, action)));
  }
  drawHistory(history);
}

async function rollback(to) {
  try {
    const r = await api("POST", "/api/rollback", to ? { to } : {});
    say(`current head is now ${r.current}`, "ok");
    await refreshAll();
  } catch (e) { say(e.message, "error"); }
}

async function promote(version) {
  try {
    const r = await api("POST", "/api/promote", { version });
    say(`current head is now ${r.current}`, "ok");
    await refreshAll();
  } catch (e) { say(e.message, "error"); }
}

// ------------------------------------------------------------------------------------------------------ charts
function svg(tag, attrs, text) {
  const node = document.createElementNS(SVGNS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function drawHistory(history) {
  const chart = $("#history-chart");
  chart.replaceChildren();
  const rows = history.filter((r) => r.metrics.val_accuracy !== null && r.metrics.val_accuracy !== undefined);
  const W = 460, H = 140, L = 34, B = 20;
  chart.append(svg("text", { x: 2, y: 10 }, "held-out accuracy per version"));
  if (!rows.length) return;
  const bw = Math.min(40, (W - L) / rows.length - 4);
  rows.forEach((r, i) => {
    const acc = r.metrics.val_accuracy, h = (H - B - 16) * acc, x = L + i * (bw + 4);
    chart.append(svg("rect", { x, y: H - B - h, width: bw, height: h,
                               fill: r.status === "current" ? "#27ae60" : r.status === "candidate" ? "#f1c40f" : "#95a5a6" }));
    chart.append(svg("text", { x: x + bw / 2, y: H - B - h - 2, "text-anchor": "middle" }, (100 * acc).toFixed(0)));
    chart.append(svg("text", { x: x + bw / 2, y: H - 6, "text-anchor": "middle" }, r.version));
  });
}

async function loadConfusion() {
  const c = await api("GET", "/api/confusion");
  const chart = $("#confusion");
  chart.replaceChildren();
  const n = c.classes.length;
  if (!n) { chart.setAttribute("height", 30); chart.append(svg("text", { x: 4, y: 16 }, "no labels yet")); return; }
  const L = 90, T = 90, size = Math.min(34, (460 - L) / n);
  chart.setAttribute("height", T + n * size + 10);
  const max = Math.max(1, ...c.matrix.flat());
  c.classes.forEach((name, i) => {
    chart.append(svg("text", { x: L - 4, y: T + i * size + size / 2 + 3, "text-anchor": "end" }, name.slice(0, 14)));
    chart.append(svg("text", { x: L + i * size + size / 2, y: T - 4,
                               transform: `rotate(-60 ${L + i * size + size / 2} ${T - 4})` }, name.slice(0, 14)));
    c.matrix[i].forEach((v, j) => {
      const shade = Math.round(255 - 200 * v / max);
      chart.append(svg("rect", { x: L + j * size, y: T + i * size, width: size - 1, height: size - 1,
                                 fill: i === j ? `rgb(${shade},255,${shade})` : `rgb(255,${shade},${shade})` }));
      if (v) chart.append(svg("text", { x: L + j * size + size / 2, y: T + i * size + size / 2 + 3,
                                        "text-anchor": "middle" }, v));
    });
  });
  chart.append(svg("text", { x: 2, y: 10 }, `rows: operator's label · columns: head's prediction · ${c.n} labels`));
}

async function loadDrift() {
  const d = await api("GET", "/api/drift");
  $("#drift-status").textContent = d.score === null ? "no inbox images yet" :
    `drift ${d.score.toFixed(3)} (threshold ${d.threshold === null ? "n/a" : d.threshold.toFixed(3)}) — ` +
    (d.drifted ? "DRIFTED: label and retrain" : "no drift") +
    (d.unknown_fraction === null ? "" : ` · ${pct(d.unknown_fraction)} of recent images unknown`);
  const chart = $("#drift");
  chart.replaceChildren();
  const pts = d.series;
  if (!pts.length) return;
  const W = 460, H = 180, L = 34, B = 16, T = 8;
  const hi = Math.max(d.threshold || 0, ...pts.map((p) => p.drift)) * 1.1 || 1;
  const x = (i) => L + (W - L - 4) * (pts.length > 1 ? i / (pts.length - 1) : 0);
  const y = (v) => T + (H - T - B) * (1 - v / hi);
  chart.append(svg("line", { x1: L, y1: y(0), x2: W - 4, y2: y(0), stroke: "#999" }));
  chart.append(svg("text", { x: 2, y: y(hi / 1.1) + 4 }, (hi / 1.1).toFixed(2)));
  chart.append(svg("text", { x: 2, y: y(0) }, "0"));
  if (d.threshold !== null) {
    chart.append(svg("line", { x1: L, y1: y(d.threshold), x2: W - 4, y2: y(d.threshold), stroke: "#c0392b",
                               "stroke-dasharray": "4 3" }));
    chart.append(svg("text", { x: W - 6, y: y(d.threshold) - 3, "text-anchor": "end", fill: "#c0392b" }, "threshold"));
  }
  chart.append(svg("polyline", { points: pts.map((p, i) => `${x(i)},${y(p.drift)}`).join(" "), fill: "none",
                                 stroke: "#2c3e50", "stroke-width": 1.5 }));
  chart.append(svg("text", { x: L, y: H - 2 }, `last ${pts.length} inbox images, oldest left`));
}

async function loadResults() {
  const { results } = await api("GET", "/api/results?limit=24");
  const box = $("#results");
  box.replaceChildren();
  for (const r of results) {
    box.append(el("div", { class: "result" }, r.status === "ok" ? img(r.id, r.file) : el("div", { class: "thumb" }),
      el("div", {}, r.status === "ok" ? el("b", {}, r.label) : el("span", { class: "unknown" }, r.status)),
      el("div", {}, r.status === "ok" ? pct(r.probability) : ""),
      r.unknown ? el("div", { class: "unknown" }, "unknown") : ""));
  }
  if (!results.length) box.append(el("p", { class: "hint" }, "no inbox images yet"));
}

async function refreshAll() {
  const jobs = [loadInfo(), loadQueue(), loadHistory(), loadConfusion(), loadDrift(), loadResults()];
  for (const r of await Promise.allSettled(jobs)) if (r.status === "rejected") say(r.reason.message, "error");
}

// ---------------------------------------------------------------------------------------------------- keyboard
function onKey(ev) {
  if (ev.target.tagName === "INPUT" || ev.ctrlKey || ev.metaKey || ev.altKey) return;
  const it = state.queue[state.selected];
  if (/^[0-9]$/.test(ev.key)) {
    const k = ev.key === "0" ? 9 : Number(ev.key) - 1;
    if (it && k < state.classes.length) submitLabel(it.id, state.classes[k]);
  } else if (ev.key === "j") { state.selected = Math.min(state.selected + 1, state.queue.length - 1); renderQueue(); }
  else if (ev.key === "k") { state.selected = Math.max(state.selected - 1, 0); renderQueue(); }
  else if (ev.key === "s" && it) { state.skipped.add(it.id); state.queue.splice(state.selected, 1); renderQueue(); }
  else if (ev.key === "n") { ev.preventDefault(); $("#new-class").focus(); }
  else if (ev.key === "t") train();
  else return;
  ev.preventDefault();
}

document.addEventListener("DOMContentLoaded", () => {
  readToken();
  $("#upload-input").addEventListener("change", (ev) => { if (ev.target.files[0]) upload(ev.target.files[0]); });
  $("#train-btn").addEventListener("click", train);
  $("#rollback-btn").addEventListener("click", () => rollback());
  $("#new-class-btn").addEventListener("click", labelSelectedAsNew);
  $("#add-class-btn").addEventListener("click", addClass);
  document.addEventListener("keydown", onKey);
  if (!state.token) say("no token: state changes will be refused — open the address printed at start (…/#token=…)",
                        "error");
  refreshAll();
  setInterval(() => { loadInfo().catch(() => {}); loadResults().catch(() => {}); loadDrift().catch(() => {}); },
              5000);
});
