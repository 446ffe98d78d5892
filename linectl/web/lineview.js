// linectl live line view: draws the flow from /events' snapshot, then applies its updates.
// Plain JavaScript and SVG, no libraries: the page works with no internet.
"use strict";

const NS = "http://www.w3.org/2000/svg";
const BOX_W = 150, BOX_H = 100, GAP = 32, VGAP = 18, PAD = 30, TOP = 22, ROW_GAP = 46;
const CONDITIONS = {
  working: { label: "running", stroke: "#2e9d4f", fill: "#e3f4e8" },
  starved: { label: "starved", stroke: "#d9a300", fill: "#fff5d6" },
  blocked: { label: "blocked", stroke: "#e4731c", fill: "#fde7d6" },
  faulted: { label: "faulted", stroke: "#d63a3a", fill: "#fadcdc" },
  disconnected: { label: "disconnected", stroke: "#8a4fd3", fill: "#ece2f8" },
  out_of_service: { label: "out of service", stroke: "#8d96a0", fill: "#eceef0" },
  idle: { label: "idle", stroke: "#5b8fd0", fill: "#e4eefa" },
};

const view = { model: null, boxes: {}, updates: 0, ready: false, lastSeq: 0 };
window.lineview = view; // for tests and curious operators

function el(tag, attrs, parent, text) {
  const node = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  if (parent) parent.appendChild(node);
  return node;
}

// --- layout: sizes first, then positions --------------------------------------------------

function measure(node) {
  if (node.kind === "station") return (node.size = { w: BOX_W, h: BOX_H });
  if (node.kind === "seq") {
    const sizes = node.steps.map(measure);
    return (node.size = {
      w: sizes.reduce((a, s) => a + s.w, 0) + GAP * (sizes.length - 1),
      h: Math.max(...sizes.map((s) => s.h)),
    });
  }
  const sizes = node.branches.map(measure);
  return (node.size = {
    w: Math.max(...sizes.map((s) => s.w)) + 2 * PAD,
    h: TOP + sizes.reduce((a, s) => a + s.h, 0) + VGAP * (sizes.length - 1),
  });
}

// Draws ``node`` with its top-left corner at (x, y) inside a band of height ``h``; returns the
// points where the flow enters and leaves it.
function place(node, x, y, h, g) {
  const midY = y + h / 2;
  if (node.kind === "station") {
    drawStation(node.name, x, midY - BOX_H / 2, g);
    return { inX: x, outX: x + BOX_W, y: midY };
  }
  if (node.kind === "seq") {
    let cx = x, prev = null;
    for (const step of node.steps) {
      const at = place(step, cx, y, h, g);
      if (prev) edge(g, prev.outX, prev.y, at.inX, at.y, true);
      prev = at;
      cx += step.size.w + GAP;
    }
    return { inX: x, outX: x + node.size.w, y: midY };
  }
  // route or fork: branches stacked, split on the left, merge on the right
  const inner = node.size.h - TOP;
  let by = midY - inner / 2 + TOP;
  const left = x, right = x + node.size.w;
  const splitX = left + 10, mergeX = right - 10;
  const points = [];
  for (const b of node.branches) {
    const at = place(b, left + PAD, by, b.size.h, g);
    points.push(at);
    edge(g, splitX, midY, at.inX, at.y, true);
    edge(g, at.outX, at.y, mergeX, midY, false);
    by += b.size.h + VGAP;
  }
  const top = midY - inner / 2 + TOP - 4;
  if (node.kind === "fork") {
    el("rect", { class: "join-bar", x: splitX - 3, y: points[0].y - 14, width: 6,
      height: points[points.length - 1].y - points[0].y + 28, rx: 2 }, g);
    el("rect", { class: "join-bar", x: mergeX - 3, y: points[0].y - 14, width: 6,
      height: points[points.length - 1].y - points[0].y + 28, rx: 2 }, g);
    el("text", { class: "node-label", x: left + PAD, y: top - 4 }, g, "fork · join");
  } else {
    for (const px of [splitX, mergeX]) {
      el("path", { class: "route-node",
        d: `M${px - 8},${midY} L${px},${midY - 8} L${px + 8},${midY} L${px},${midY + 8} Z` }, g);
    }
    el("text", { class: "node-label", x: left + PAD, y: top - 4 }, g,
      `route · ${node.policy.replace(/_/g, " ")}`);
  }
  return { inX: left, outX: right, y: midY, split: splitX, merge: mergeX };
}

function edge(g, x1, y1, x2, y2, arrow) {
  const mx = (x1 + x2) / 2;
  const d = y1 === y2 ? `M${x1},${y1} L${x2},${y2}`
    : `M${x1},${y1} C${mx},${y1} ${mx},${y2} ${x2},${y2}`;
  el("path", { class: "edge", d, "marker-end": arrow ? "url(#arrow)" : "" }, g);
}

function drawStation(name, x, y, g) {
  const cap = view.model.stations[name].capacity;
  const s = el("g", { class: "station", id: `st-${name}`, transform: `translate(${x},${y})` }, g);
  const title = el("title", {}, s);
  const box = el("rect", { class: "box", width: BOX_W, height: BOX_H }, s);
  el("text", { class: "name", x: 10, y: 19 }, s, name);
  const state = el("text", { class: "state", x: 10, y: 38 }, s);
  const slots = [];
  const size = Math.min(14, (BOX_W - 20 - 4 * (cap - 1)) / cap);
  for (let i = 0; i < cap; i++) {
    slots.push(el("rect", { class: "slot", x: 10 + i * (size + 4), y: 48, width: size,
      height: size, rx: 2 }, s));
  }
  const units = el("text", { class: "units", x: 10, y: 78 }, s);
  const count = el("text", { class: "count", x: 10, y: 93 }, s);
  const flagBg = el("rect", { class: "flagbg", x: BOX_W - 92, y: -10, width: 96, height: 19,
    rx: 9.5, visibility: "hidden" }, s);
  const flag = el("text", { class: "flag", x: BOX_W - 44, y: 4, "text-anchor": "middle",
    visibility: "hidden" }, s, "◆ constraint");
  view.boxes[name] = { g: s, box, state, slots, units, count, title, flag, flagBg };
}

// --- state onto the drawing ---------------------------------------------------------------

function shownCondition(st) {
  // Starved with nothing in the line is not waiting on anyone: it is idle.
  if (st.condition === "starved" && view.model.counts.wip === 0) return "idle";
  return st.condition;
}

function paintStation(name) {
  const st = view.model.stations[name], b = view.boxes[name];
  if (!st || !b) return;
  const cond = shownCondition(st);
  const look = CONDITIONS[cond] || CONDITIONS.disconnected;
  b.g.dataset.condition = cond;
  b.g.dataset.state = st.state_name;
  b.g.dataset.inService = String(st.in_service);
  b.box.setAttribute("fill", look.fill);
  b.box.setAttribute("stroke", look.stroke);
  const draining = !st.in_service && cond !== "out_of_service" ? " · draining" : "";
  b.state.textContent = `${st.state_name} · ${look.label}${draining}`;
  b.slots.forEach((r, i) => r.classList.toggle("full", i < st.units.length));
  const shown = st.units.slice(0, 1).join(" ");
  b.units.textContent = st.units.length > 1 ? `${shown} +${st.units.length - 1}` : shown;
  b.count.textContent = `${st.cycles} cyc · ${st.rejected} rej · ${st.faults} faults`;
  b.title.textContent = `${name} (PLC ${st.plc || "?"}): ${st.state_name}, ${look.label}` +
    `\nunits: ${st.units.join(", ") || "none"} (${st.load}/${st.capacity} slots)` +
    `\n${st.passed} passed, ${st.rejected} rejected, ${st.faults} faults`;
}

function paintConstraint() {
  const c = view.model.constraint || {};
  for (const [name, b] of Object.entries(view.boxes)) {
    const on = name === c.station;
    b.g.classList.toggle("constraint", on);
    b.flag.setAttribute("visibility", on ? "visible" : "hidden");
    b.flagBg.setAttribute("visibility", on ? "visible" : "hidden");
  }
  let text = c.station ? c.station : "measuring…";
  if (c.shifting && c.shifting.length > 1) text += ` (shifting: ${c.shifting.join(", ")})`;
  text += ` · predicted ${c.predicted}`;
  document.getElementById("constraint").textContent = text;
}

function paintCounts() {
  const c = view.model.counts;
  document.getElementById("wip").textContent = `${c.wip}/${c.max_wip}`;
  document.getElementById("released").textContent = c.released;
  document.getElementById("finished").textContent = c.finished;
  document.getElementById("quarantined").textContent = c.quarantined;
  document.getElementById("paused").hidden = !c.paused;
}

function fmtRate(v) { return v === null || v === undefined ? "–" : v.toFixed(1); }

function paintThroughput() {
  const t = view.model.throughput;
  document.getElementById("rate-measured").textContent = fmtRate(t.measured_per_h);
  document.getElementById("rate-predicted").textContent = fmtRate(t.predicted_per_h);
  const svg = document.getElementById("spark");
  svg.replaceChildren();
  const n = t.buckets_per_h.length;
  const top = Math.max(t.predicted_per_h * 1.25, ...t.buckets_per_h, 1);
  const w = 240 / n;
  t.buckets_per_h.forEach((v, i) => {
    const h = (v / top) * 60;
    el("rect", { class: "bar", x: i * w + 1, y: 64 - h, width: w - 2, height: h }, svg);
  });
  const py = 64 - (t.predicted_per_h / top) * 60;
  el("line", { class: "pred", x1: 0, x2: 240, y1: py, y2: py }, svg);
}

function paintQuarantine() {
  const list = document.getElementById("quarantine");
  const units = view.model.quarantine;
  document.getElementById("q-count").textContent = units.length ? `${units.length} units` : "";
  list.replaceChildren();
  if (!units.length) {
    const li = document.createElement("li");
    li.className = "empty";
    li.textContent = "No unit in quarantine.";
    list.appendChild(li);
    return;
  }
  for (const u of units.slice().reverse()) {
    const li = document.createElement("li");
    li.dataset.serial = u.serial;
    const s = document.createElement("span");
    s.className = "serial";
    s.textContent = u.serial;
    const r = document.createElement("span");
    r.className = "reason";
    r.textContent = u.reason;
    const b = document.createElement("button");
    b.textContent = "Release";
    b.title = `Put ${u.serial} back into the line where it failed`;
    b.addEventListener("click", () => release(u.serial, b));
    li.append(s, r, b);
    list.appendChild(li);
  }
}

// --- operator action ----------------------------------------------------------------------

async function release(serial, button) {
  const message = document.getElementById("q-message");
  message.textContent = "";
  button.disabled = true;
  const headers = { "Content-Type": "application/json" };
  const token = sessionStorage.getItem("linectl-token") || document.getElementById("token").value;
  if (token) headers.Authorization = `Bearer ${token}`;
  try {
    const reply = await fetch("/release", { method: "POST", headers,
      body: JSON.stringify({ serial }) });
    if (reply.status === 401) {
      document.getElementById("token-row").hidden = false;
      sessionStorage.removeItem("linectl-token");
      message.textContent = "This line needs the operator token: enter it, then release again.";
    } else if (!reply.ok) {
      const body = await reply.json().catch(() => ({}));
      message.textContent = body.error || `release failed (${reply.status})`;
    } else if (token) {
      sessionStorage.setItem("linectl-token", token);
    }
  } catch (err) {
    message.textContent = `release failed: ${err}`;
  } finally {
    button.disabled = false;
  }
}

// --- the stream ---------------------------------------------------------------------------

function build(snapshot) {
  view.model = snapshot;
  view.boxes = {};
  document.getElementById("line-name").textContent = snapshot.line;
  document.title = `${snapshot.line} · linectl`;
  const svg = document.getElementById("diagram");
  svg.replaceChildren();
  const defs = el("defs", {}, svg);
  const marker = el("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 9, refY: 5,
    markerWidth: 7, markerHeight: 7, orient: "auto-start-reverse" }, defs);
  el("path", { d: "M0,0 L10,5 L0,10 z", fill: "#97a4b2" }, marker);
  const g = el("g", {}, svg);
  // Top-level steps wrap into rows as wide as the panel, so a long line stays readable.
  const steps = snapshot.flow.steps;
  steps.forEach(measure);
  const maxW = Math.max(document.getElementById("flow").clientWidth - 20, 700);
  const rows = [[]];
  let w = 0;
  for (const s of steps) {
    if (rows[rows.length - 1].length && w + s.size.w > maxW) { rows.push([]); w = 0; }
    rows[rows.length - 1].push(s);
    w += s.size.w + GAP;
  }
  let y = 14, prev = null, width = 0;
  for (const row of rows) {
    const h = Math.max(...row.map((s) => s.size.h));
    let x = 12;
    for (const s of row) {
      const at = place(s, x, y, h, g);
      if (prev) {
        if (prev.y < y) {
          const down = y - ROW_GAP / 2;
          el("path", { class: "edge", "marker-end": "url(#arrow)",
            d: `M${prev.outX},${prev.y} L${prev.outX + 14},${prev.y} L${prev.outX + 14},${down}` +
              ` L${at.inX - 14},${down} L${at.inX - 14},${at.y} L${at.inX},${at.y}` }, g);
        } else edge(g, prev.outX, prev.y, at.inX, at.y, true);
      }
      prev = at;
      x += s.size.w + GAP;
      width = Math.max(width, x);
    }
    y += h + ROW_GAP;
  }
  svg.setAttribute("width", width - GAP + 16);
  svg.setAttribute("height", y);
  const legend = document.getElementById("legend");
  legend.replaceChildren();
  for (const look of Object.values(CONDITIONS)) {
    const span = document.createElement("span");
    const swatch = document.createElement("i");
    swatch.style.background = look.stroke; // CSSOM, which the page's CSP allows
    span.append(swatch, look.label);
    legend.appendChild(span);
  }
  repaint();
}

function repaint() {
  Object.keys(view.boxes).forEach(paintStation);
  paintCounts();
  paintConstraint();
  paintThroughput();
  paintQuarantine();
}

function apply(update) {
  const m = view.model;
  const idleBefore = m.counts.wip === 0;
  for (const [name, st] of Object.entries(update.stations)) {
    m.stations[name] = { ...m.stations[name], ...st };
    paintStation(name);
  }
  if (update.counts) {
    m.counts = update.counts;
    paintCounts();
    if ((m.counts.wip === 0) !== idleBefore) Object.keys(view.boxes).forEach(paintStation);
  }
  if (update.quarantine) { m.quarantine = update.quarantine; paintQuarantine(); }
  if (update.constraint) { m.constraint = update.constraint; paintConstraint(); }
  if (update.throughput) { m.throughput = update.throughput; paintThroughput(); }
  view.updates += 1;
  view.lastSeq = update.seq;
}

function connect() {
  const live = document.getElementById("live");
  const source = new EventSource("/events");
  source.addEventListener("snapshot", (e) => {
    build(JSON.parse(e.data));
    view.ready = true;
    view.loadedAt = performance.now();
    live.className = "live on";
    live.textContent = "live";
  });
  source.addEventListener("update", (e) => { if (view.model) apply(JSON.parse(e.data)); });
  source.onerror = () => {
    live.className = "live off";
    live.textContent = "reconnecting";
  };
  view.source = source;
}

// Leaving the page frees its stream at once (the server bounds how many it serves); coming
// back from the back/forward cache reconnects to a fresh snapshot.
window.addEventListener("pagehide", () => { if (view.source) view.source.close(); });
window.addEventListener("pageshow", (e) => { if (e.persisted) connect(); });

let resizeTimer = null;
window.addEventListener("resize", () => {
  clearTimeout(resizeTimer);
  resizeTimer = setTimeout(() => { if (view.model) build(view.model); }, 200);
});
connect();
