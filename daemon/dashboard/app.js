// The dashboard: polls the node's /status and /api/* and redraws. Everything peers sent
// (messages, peer ids, reasons) is untrusted, so it goes into the page as text nodes only.
"use strict";

const POLL_MS = 3000;        // status poll
const LINEAGE_EVERY = 5;     // also refetch lineage and credits every N polls, besides on a new head
const LINEAGE_LIMIT = 200;
const ROW_H = 28, LANE_W = 14; // lineage graph geometry (px), matches .row height in app.css
const MAX_ROUNDS = 200;      // rounds of status history kept in the browser

const state = { status: null, lineage: null, credits: null, selected: null, head: null, polls: 0, rounds: new Map(), charts: {} };

// ---------------------------------------------------------------------------- helpers

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k === "onclick") node.addEventListener("click", v);
    else node.setAttribute(k, v);
  }
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

async function getJSON(url) {
  const r = await fetch(url, { cache: "no-store" });
  let body = null;
  try { body = await r.json(); } catch (e) { /* not JSON: reported below */ }
  if (!r.ok) throw new Error((body && body.error) || `${url}: HTTP ${r.status}`);
  return body;
}

const short = (id) => (id ? String(id).slice(0, 10) : "-");
const num = (x, digits = 4) => (typeof x === "number" && isFinite(x) ? Number(x.toPrecision(digits)).toString() : "-");
function bytes(n) {
  if (typeof n !== "number") return "-";
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return i ? `${n.toFixed(1)} ${units[i]}` : `${n} B`;
}
const when = (t) => (t ? new Date(t * 1000).toLocaleTimeString() : "-");

// A peer as people read it: its short id, and the name it chose for itself when we know one
// (from the node's swarm view, else the leaderboard). Names are not unique: the id always shows.
function nameOf(peer) {
  const seen = ((state.status && state.status.swarm && state.status.swarm.peers) || []).find((p) => p.peer_id === peer);
  if (seen && seen.name) return seen.name;
  const credit = ((state.credits && state.credits.peers) || []).find((c) => c.peer === peer);
  return credit ? credit.name : null;
}
function who(peer, name = nameOf(peer)) {
  return el("span", { class: "peer", title: String(peer || "") }, el("code", {}, short(peer)), name ? el("span", { class: "name" }, name) : null);
}

function table(node, headers, rows, empty = "nothing yet") {
  node.replaceChildren(
    el("thead", {}, el("tr", {}, headers.map((h) => el("th", { class: h.num ? "num" : "" }, h.label)))),
    el("tbody", {}, rows.length ? rows.map((r) => el("tr", {}, r.map((c, i) => el("td", { class: headers[i].num ? "num" : "" }, c))))
                                : el("tr", {}, el("td", { colspan: headers.length, class: "muted" }, empty))),
  );
}

// ---------------------------------------------------------------------------- header

function renderNode(s) {
  const head = s.head || {};
  const facts = [
    ["node", short(s.peer_id)], ["event", s.event || "-"], ["round", s.round ?? "-"], ["phase", s.phase || "-"],
    ["head", short(head.id)], ["eval loss", num(head.eval_loss)], ["up", `${Math.round(s.uptime_s || 0)} s`],
  ];
  document.getElementById("node").replaceChildren(...facts.map(([k, v]) => el("div", {}, el("dt", {}, k), el("dd", {}, v))));
}

// ---------------------------------------------------------------------------- lineage graph

// Lanes as `git log --graph` draws them: a version sits in the lane that waits for it; its first
// parent takes over that lane, other parents get a free lane.
function layout(versions) {
  const lanes = [];
  return versions.map((v) => {
    let col = lanes.indexOf(v.id);
    if (col < 0) { col = lanes.indexOf(null); if (col < 0) { col = lanes.length; lanes.push(null); } }
    for (let i = 0; i < lanes.length; i++) if (i !== col && lanes[i] === v.id) lanes[i] = null; // lanes that merge here
    const before = lanes.slice();
    lanes[col] = v.parents[0] ?? null;
    for (const p of v.parents.slice(1)) {
      if (lanes.includes(p)) continue;
      const free = lanes.indexOf(null);
      if (free < 0) lanes.push(p); else lanes[free] = p;
    }
    return { v, col, before, after: lanes.slice() };
  });
}

function renderLineage() {
  const data = state.lineage;
  const box = document.getElementById("lineage");
  if (!data) return;
  document.getElementById("lineage-note").textContent =
    `${data.branch}: ${data.versions.length} newest${data.truncated ? ` (of more)` : ""}`;
  const rows = layout(data.versions);
  const width = LANE_W * Math.max(1, ...rows.map((r) => Math.max(r.before.length, r.after.length))) + LANE_W;
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("width", width);
  svg.setAttribute("height", rows.length * ROW_H);
  const x = (c) => LANE_W / 2 + c * LANE_W + 2, y = (r) => r * ROW_H + ROW_H / 2;
  const line = (x1, y1, x2, y2) => {
    const l = document.createElementNS(ns, "line");
    Object.entries({ x1, y1, x2, y2, stroke: "#8a94a8", "stroke-width": 1.5 }).forEach(([k, v]) => l.setAttribute(k, v));
    svg.append(l);
  };
  rows.forEach((r, i) => {
    const next = rows[i + 1];
    r.after.forEach((id, lane) => {
      if (id === null) return;
      const from = r.v.parents.includes(id) ? r.col : lane; // edges out of this version start at its dot
      const nextLane = next ? (next.v.id === id ? next.col : next.before.indexOf(id)) : -1;
      if (nextLane >= 0) line(x(from), y(i), x(nextLane), y(i + 1));
      else line(x(from), y(i), x(from), y(i) + ROW_H / 2); // parent beyond the listed versions
    });
    const dot = document.createElementNS(ns, "circle");
    Object.entries({ cx: x(r.col), cy: y(i), r: 5, fill: r.v.id === state.selected ? "#2f6fdf" : "#fff", stroke: "#2f6fdf", "stroke-width": 2 })
      .forEach(([k, v]) => dot.setAttribute(k, v));
    svg.append(dot);
  });
  const list = el("div", { style: `margin-left:${width}px` }, rows.map(({ v }) => {
    const loss = v.metrics && v.metrics.eval_loss;
    return el("div", { class: "row" + (v.id === state.selected ? " selected" : ""), "data-id": v.id, onclick: () => select(v.id) },
      el("code", {}, short(v.id)),
      v.refs.map((r) => el("span", { class: "ref" }, r)),
      v.round !== null ? el("span", { class: "badge" }, `r${v.round}`) : null,
      el("span", {}, v.message.split("\n")[0].slice(0, 60)),
      loss !== undefined ? el("span", { class: "badge" }, `loss ${num(loss)}`) : null,
      v.contributors ? el("span", { class: "badge" }, `${v.contributors} contrib`) : null,
      v.ci_votes ? el("span", { class: "badge ok" }, `CI ✓${v.ci_votes}`) : null,
      v.screened ? el("span", { class: "badge bad" }, `${v.screened} screened`) : null);
  }));
  box.replaceChildren(svg, list);
  box.style.height = `${rows.length * ROW_H}px`;
}

// ---------------------------------------------------------------------------- version details

async function select(id) {
  state.selected = id;
  renderLineage();
  const box = document.getElementById("details");
  box.replaceChildren(el("p", { class: "muted" }, `loading ${short(id)}…`));
  try {
    const v = await getJSON(`/api/version/${id}`);
    if (state.selected !== id) return;
    renderVersion(v, null);
    const diff = await getJSON(`/api/diff/${id}?top=10`).catch((e) => ({ error: e.message }));
    if (state.selected === id) renderVersion(v, diff);
  } catch (e) {
    box.replaceChildren(el("p", { class: "bad" }, e.message));
  }
}

function renderVersion(v, diff) {
  const link = (id) => el("a", { onclick: () => select(id) }, short(id));
  const m = v.merge || {};
  const facts = [
    ["id", el("code", {}, v.id)], ["parents", v.parents.length ? v.parents.map(link) : "none (root)"],
    ["round", v.round ?? "-"], ["time", when(v.time)], ["author", el("code", {}, short(v.author))],
    ["message", v.message], ["tensors", `${v.n_tensors} (${bytes(v.total_bytes)})`],
    ["metrics", Object.entries(v.metrics).map(([k, x]) => `${k}=${num(x, 6)}`).join("  ") || "-"],
  ];
  if (v.merge) facts.push(["merge", `${m.method || "?"} ${JSON.stringify(m.params || {})}`], ["outer", JSON.stringify(m.outer || {})]);
  const parts = [el("dl", {}, facts.map(([k, x]) => [el("dt", {}, k), el("dd", {}, x)]))];

  const deltas = Array.isArray(m.deltas) ? m.deltas : [];
  parts.push(el("h3", {}, `Contributors (${v.contributors.length})`));
  const t1 = el("table");
  table(t1, [{ label: "peer" }, { label: "delta" }, { label: "weight", num: true }],
    deltas.map((d) => [who(d[0]), el("code", {}, short(d[1])), num(d[2], 6)]));
  parts.push(t1);

  parts.push(el("h3", {}, "CI votes"));
  const votes = (v.ci && v.ci.votes) || [];
  const t2 = el("table");
  table(t2, [{ label: "voter" }, { label: "valid" }, { label: "metrics" }],
    votes.map((x) => [el("code", {}, short(x.voter)), el("span", { class: x.valid ? "ok" : "bad" }, x.valid ? "yes" : (x.error || "no")),
      Object.entries(x.metrics || {}).map(([k, y]) => `${k}=${num(y, 6)}`).join(" ")]));
  parts.push(t2);

  const left = [...v.screened.map((s) => ["merge screen", s]), ...v.excluded.map((s) => ["proposer", s])];
  parts.push(el("h3", {}, `Deltas left out (${left.length})`));
  const t3 = el("table");
  table(t3, [{ label: "by" }, { label: "peer" }, { label: "reason" }], left.map(([by, s]) => [by, el("code", {}, short(s.peer)), s.reason]), "none");
  parts.push(t3);

  parts.push(el("h3", {}, "Diff to parent"));
  if (!diff) parts.push(el("p", { class: "muted" }, "computing…"));
  else if (diff.error) parts.push(el("p", { class: "bad" }, diff.error));
  else if (!diff.parent) parts.push(el("p", { class: "muted" }, "a root version has no parent"));
  else {
    const tot = diff.totals;
    parts.push(el("p", {}, `${diff.tensors_moved} tensors changed; L2 ${num(tot.l2_change)}, relative ${num(tot.relative_change)}, `
      + `${num(100 * tot.changed_fraction, 3)}% of entries`));
    const t4 = el("table");
    table(t4, [{ label: "tensor" }, { label: "status" }, { label: "L2", num: true }, { label: "relative", num: true }],
      diff.tensors.map((t) => [el("code", {}, t.name), t.status, num(t.l2_change), num(t.relative_change)]));
    parts.push(t4);
  }
  document.getElementById("details").replaceChildren(...parts);
}

// ---------------------------------------------------------------------------- charts

function chart(key, nodeId, series, data, yFmt) {
  const node = document.getElementById(nodeId);
  if (typeof uPlot === "undefined") { node.textContent = "charting library did not load"; return; }
  if (!data[0].length) { if (!state.charts[key]) node.replaceChildren(el("p", { class: "muted" }, "no data yet")); return; }
  if (!state.charts[key]) {
    node.replaceChildren();
    const opts = {
      width: Math.max(300, node.clientWidth), height: 220, scales: { x: { time: false } },
      series: [{ label: "round" }, ...series.map((s) => ({ ...s, width: 2, points: { show: true, size: 5 }, value: (u, v) => (v == null ? "-" : yFmt(v)) }))],
      // rounds are whole numbers: no ticks in between
      axes: [{ label: "round", incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000] }, { values: (u, vals) => vals.map(yFmt), size: 70 }],
    };
    state.charts[key] = new uPlot(opts, data, node);
  } else {
    state.charts[key].setData(data);
  }
}

function renderLoss() {
  const versions = (state.lineage ? state.lineage.versions : []).filter((v) => v.metrics && typeof v.metrics.eval_loss === "number").slice().reverse();
  // x is the round when every charted version has one, in order; else the version's position
  const byRound = versions.length && versions.every((v, i) => v.round !== null && (i === 0 || v.round > versions[i - 1].round));
  const xs = versions.map((v, i) => (byRound ? v.round : i));
  chart("loss", "loss-chart", [{ label: "eval loss", stroke: "#2f6fdf" }], [xs, versions.map((v) => v.metrics.eval_loss)], (v) => num(v));
}

function renderRounds() {
  const rounds = [...state.rounds.values()].sort((a, b) => a.round - b.round);
  const withBytes = rounds.filter((r) => typeof r.bytes_sent === "number");
  chart("bytes", "bytes-chart", [{ label: "sent", stroke: "#2f6fdf" }, { label: "received", stroke: "#e39b2d" }],
    [withBytes.map((r) => r.round), withBytes.map((r) => r.bytes_sent), withBytes.map((r) => r.bytes_received)], bytes);
  const parts = ["training", "communication", "merge", "waiting"];
  const timed = rounds.filter((r) => typeof r.total_s === "number").slice(-15).reverse();
  const box = document.getElementById("times");
  const legend = el("div", { class: "legend" }, parts.map((p) => el("span", {}, el("i", { class: `seg ${p}` }), p)));
  const t = el("table");
  table(t, [{ label: "round" }, { label: "total", num: true }, { label: "split" }], timed.map((r) => {
    const bar = el("div", { class: "bar", title: parts.map((p) => `${p} ${num(r[`${p}_s`], 3)} s`).join(", ") },
      parts.map((p) => el("div", { class: `seg ${p}`, style: `width:${(100 * (r[`${p}_s`] || 0)) / (r.total_s || 1)}%` })));
    return [r.round, `${num(r.total_s, 3)} s`, el("span", {}, bar)];
  }));
  t.querySelectorAll("tbody td:last-child").forEach((td) => td.classList.add("barcell"));
  box.replaceChildren(legend, t);
}

// ---------------------------------------------------------------------------- tables

// Every peer the node heard of (its status's `swarm` section): what each announced (name, device,
// addresses) and what the node saw of it (rounds, delivery rate, whether it could dial it).
function renderPeers() {
  const s = state.status || {};
  const offences = (s.exclusions && s.exclusions.offences) || {};
  const offence = (p) => { const o = offences[p]; return o === undefined ? "0" : (typeof o === "object" ? JSON.stringify(o) : String(o)); };
  const swarm = s.swarm && Array.isArray(s.swarm.peers) ? s.swarm : null;
  document.getElementById("peers-note").textContent = swarm
    ? `${swarm.known} known to this node${swarm.truncated ? " (not all shown)" : ""}` : "in the current round";
  if (!swarm) { // a node without the swarm section: the current round's members
    table(document.getElementById("peers"), [{ label: "peer" }, { label: "offences", num: true }],
      (s.peers || []).map((p) => [who(p), offence(p)]));
    return;
  }
  table(document.getElementById("peers"),
    [{ label: "peer" }, { label: "device" }, { label: "samples/s", num: true }, { label: "round", num: true },
     { label: "delta", num: true }, { label: "merged", num: true }, { label: "reach" }, { label: "dial" }, { label: "offences", num: true }],
    swarm.peers.map((p) => [
      el("span", { class: p.departed ? "muted" : "" }, who(p.peer_id, p.name), p.self ? " (this node)" : p.departed ? " (left)" : ""),
      p.device || "?", num(p.samples_per_s, 4), p.round ?? "-", p.delta_round ?? "-", p.merged_round ?? "-",
      el("span", { title: (p.addrs || []).join("\n") }, p.reachability), p.dial, offence(p.peer_id)]));
}

function renderCredits() {
  const c = state.credits;
  if (!c) return;
  document.getElementById("credits-note").textContent = `over the newest ${c.versions} versions${c.truncated ? " (older ones not counted)" : ""}`;
  table(document.getElementById("credits"),
    [{ label: "peer" }, { label: "samples trained", num: true }, { label: "samples merged", num: true }, { label: "accepted", num: true },
     { label: "screened", num: true }, { label: "excluded", num: true }, { label: "proposed", num: true }],
    c.peers.map((p) => [who(p.peer, p.name), num(p.samples_trained, 6), num(p.samples_merged, 6), p.deltas_accepted,
      el("span", { class: p.deltas_screened ? "bad" : "" }, p.deltas_screened), p.deltas_excluded, p.versions_proposed]));
}

// ---------------------------------------------------------------------------- polling

async function refreshLineage() {
  try {
    [state.lineage, state.credits] = await Promise.all([getJSON(`/api/lineage?limit=${LINEAGE_LIMIT}`), getJSON("/api/credits")]);
  } catch (e) {
    document.getElementById("lineage-note").textContent = e.message;
    return;
  }
  renderLineage();
  renderLoss();
  renderCredits();
  if (!state.selected && state.lineage.head) select(state.lineage.head);
}

async function poll() {
  const live = document.getElementById("live");
  try {
    const s = await getJSON("/status");
    state.status = s;
    for (const r of s.history || []) state.rounds.set(r.round, r);
    while (state.rounds.size > MAX_ROUNDS) state.rounds.delete(state.rounds.keys().next().value);
    renderNode(s);
    const head = s.head && s.head.id;
    if (head !== state.head || state.polls % LINEAGE_EVERY === 0) {
      state.head = head;
      await refreshLineage();
    }
    renderPeers();
    renderRounds();
    live.className = "live ok";
    live.textContent = `live · ${new Date().toLocaleTimeString()}`;
  } catch (e) {
    live.className = "live err";
    live.textContent = `node not answering (${e.message})`;
  }
  state.polls++;
  setTimeout(poll, POLL_MS);
}

window.addEventListener("resize", () => {
  for (const [key, u] of Object.entries(state.charts)) {
    const node = u.root.parentNode;
    if (node) u.setSize({ width: Math.max(300, node.clientWidth), height: 220 });
  }
});

poll();
