// The orchestrator's dashboard: log in with a one-time token, then draw the snapshot the
// orchestrator streams once a second (server-sent events over fetch, so a refusal's status
// is seen). Everything from the server is written with textContent, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

const pct = (x) => (x === undefined || x === null ? "–" : `${Math.round(x * 100)}%`);
const secs = (x) => (x === undefined || x === null ? "–" : x < 1 ? `${Math.round(x * 1000)} ms` : `${x.toFixed(2)} s`);
function bytes(n) {
  if (n === undefined || n === null) return "–";
  const units = ["B", "kB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 999.5 && i < units.length - 1) { n /= 1000; i += 1; }
  return `${n < 10 && i ? n.toFixed(1) : Math.round(n)} ${units[i]}`;
}
const rate = (n) => (n === undefined || n === null ? "–" : `${bytes(n)}/s`);

function showLogin(why) {
  $("main").hidden = true;
  $("logout").hidden = true;
  $("login").hidden = false;
  if (why) $("login-why").textContent = why;
  setLink(false, "logged out");
}

function setLink(on, text) {
  const link = $("link");
  link.className = `pill ${on ? "on" : "off"}`;
  link.textContent = text;
}

async function redeem(token) {
  history.replaceState(null, "", location.pathname); // the token leaves the address bar at once
  const r = await fetch("/dashboard/session", {
    method: "POST", credentials: "same-origin",
    headers: { "Content-Type": "application/json" }, body: JSON.stringify({ token }),
  });
  if (r.status !== 204) {
    let message = `login refused (${r.status})`;
    try { message = (await r.json()).error.message; } catch (e) { /* keep the status */ }
    return message;
  }
  return null;
}

async function follow() {
  let delay = 1000;
  for (;;) {
    let r;
    try {
      r = await fetch("/dashboard/events", { credentials: "same-origin", cache: "no-store" });
    } catch (e) {
      setLink(false, "orchestrator unreachable, retrying…");
      await new Promise((ok) => setTimeout(ok, delay));
      delay = Math.min(delay * 2, 15000);
      continue;
    }
    if (r.status === 401) { showLogin(); return; }
    if (!r.ok) { setLink(false, `error ${r.status}, retrying…`); await new Promise((ok) => setTimeout(ok, delay)); continue; }
    delay = 1000;
    $("login").hidden = true;
    $("main").hidden = false;
    $("logout").hidden = false;
    setLink(true, "live");
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      let chunk;
      try { chunk = await reader.read(); } catch (e) { break; }
      if (chunk.done) break;
      buffer += decoder.decode(chunk.value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const message = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        let event = "message", data = "";
        for (const line of message.split("\n")) {
          if (line.startsWith("event: ")) event = line.slice(7);
          else if (line.startsWith("data: ")) data += line.slice(6);
        }
        if (event === "logout") { showLogin("You logged out."); return; }
        if (data) draw(JSON.parse(data));
      }
    }
    setLink(false, "reconnecting…");
    await new Promise((ok) => setTimeout(ok, delay));
  }
}

function chart(svg, series, max) {
  svg.replaceChildren();
  const ns = "http://www.w3.org/2000/svg";
  for (const [values, cls] of series) {
    if (!values.length) continue;
    const n = values.length;
    const points = values.map((v, i) => `${(300 * i) / Math.max(1, n - 1)},${80 - (78 * v) / max - 1}`).join(" ");
    const line = document.createElementNS(ns, "polyline");
    line.setAttribute("points", points);
    line.setAttribute("class", cls);
    svg.appendChild(line);
  }
}

function cell(row, text, cls) { row.appendChild(el("td", text, cls)); }

function nodeRow(n) {
  const tr = el("tr");
  tr.dataset.node = n.name;
  tr.dataset.state = n.state;
  if (n.owner_busy) tr.className = "owner-busy";
  const name = el("td", n.name);
  if (n.owner_busy) name.appendChild(el("span", "owner busy", "badge"));
  if (n.net_busy) name.appendChild(el("span", "network busy", "badge"));
  if (n.lending_paused) name.appendChild(el("span", "paused", "badge paused"));
  if (n.cut_off) name.appendChild(el("span", "cut off", "badge cut"));
  tr.appendChild(name);
  const state = el("td");
  state.appendChild(el("span", n.state, `state ${n.state}`));
  tr.appendChild(state);
  if (n.state === "gone") {
    cell(tr, `last seen ${new Date(n.last_seen * 1000).toLocaleTimeString()}`);
    for (let i = 0; i < 5; i += 1) cell(tr, "");
    cell(tr, (n.models || []).join(", "));
    cell(tr, "", "num");
    cell(tr, n.tokens || 0, "num");
    return tr;
  }
  cell(tr, `${pct(n.cpu_total)} / ${pct(n.owner_load)} / ${pct(n.cpu_ours)}`);
  cell(tr, `${pct(n.share_in_force)} now, lends ${pct(n.share)}${n.cap_mechanism ? ` (${n.cap_mechanism})` : ""}`);
  cell(tr, `${bytes(n.ram_available)} of ${bytes(n.ram_total)}`);
  const gpus = (n.gpus || []).map((g) => `${g.name}: ${pct(g.util)}, ${bytes(g.mem_used)} of ${bytes(g.mem_total)}`);
  cell(tr, gpus.join("; ") || "–");
  cell(tr, `${rate(n.net_recv_bps)} / ${rate(n.net_sent_bps)}`);
  cell(tr, n.rtt_ms === undefined || n.rtt_ms === null ? "–" : `${n.rtt_ms.toFixed(1)} ms`, "num");
  const loaded = new Set(n.loaded || []);
  cell(tr, (n.models || []).map((m) => (loaded.has(m) ? `${m}*` : m)).join(", "));
  cell(tr, n.running, "num");
  cell(tr, n.tokens, "num");
  return tr;
}

function draw(s) {
  const g = s.glance;
  $("updated").textContent = `updated ${new Date(s.t * 1000).toLocaleTimeString()}`;
  $("nodes-live").textContent = g.nodes.live;
  $("nodes-stale").textContent = g.nodes.stale;
  $("nodes-gone").textContent = g.nodes.gone;
  $("requests-running").textContent = g.requests_running;
  $("queued").textContent = g.queued;
  $("fragments-running").textContent = g.fragments_running;
  $("tokens-per-s").textContent = g.tokens_per_s.toFixed(1);
  $("ttft-p50").textContent = secs(g.ttft_p50);
  $("ttft-p99").textContent = secs(g.ttft_p99);
  $("ttft-note").textContent = `${g.ttft_samples} request${g.ttft_samples === 1 ? "" : "s"}, last ${Math.round(g.ttft_window_s / 60)} min`;
  $("failovers").textContent = g.failovers;
  $("errors").textContent = g.errors;
  $("cpu-total").textContent = pct(g.cpu_total);
  $("cpu-ours").textContent = pct(g.cpu_ours);
  $("loop-p99").textContent = g.loop && g.loop.samples ? `${g.loop.p99_ms.toFixed(1)} ms` : "–";

  const se = s.series;
  const peakTokens = Math.max(1, ...se.tokens_per_s);
  chart($("chart-tokens"), [[se.tokens_per_s, "total"]], peakTokens);
  $("peak-tokens").textContent = peakTokens.toFixed(1);
  const peakQueue = Math.max(1, ...se.queue);
  chart($("chart-queue"), [[se.queue, "total"]], peakQueue);
  $("peak-queue").textContent = peakQueue;
  chart($("chart-cpu"), [[se.cpu_total, "total"], [se.cpu_ours, "ours"]], 1);

  $("models").tBodies[0].replaceChildren(...s.models.map((m) => {
    const tr = el("tr");
    tr.dataset.model = m.name;
    cell(tr, m.name);
    cell(tr, m.tags.join(", "));
    cell(tr, m.nodes, "num");
    cell(tr, `${m.loaded}${m.loaded_on.length ? ` (${m.loaded_on.join(", ")}${m.loaded > m.loaded_on.length ? ", …" : ""})` : ""}`);
    cell(tr, m.waiting, "num");
    return tr;
  }));
  $("nodes").tBodies[0].replaceChildren(...s.nodes.map(nodeRow));
  $("nodes-shown").textContent = s.nodes_total > s.nodes.length
    ? `(${s.nodes.length} of ${s.nodes_total} shown: working, owner-busy and stale first)` : `(${s.nodes_total})`;
  $("keys").tBodies[0].replaceChildren(...s.keys.map((k) => {
    const tr = el("tr");
    cell(tr, k.name);
    cell(tr, k.role);
    cell(tr, k.state);
    cell(tr, k.requests, "num");
    cell(tr, `${k.prompt_tokens} / ${k.completion_tokens}`, "num");
    cell(tr, k.refused, "num");
    return tr;
  }));
}

let following = false;

async function start() {
  const token = new URLSearchParams(location.hash.slice(1)).get("login");
  if (token) {
    const refused = await redeem(token);
    if (refused) { showLogin(refused); return; }
  }
  if (following) return;
  following = true;
  try { await follow(); } finally { following = false; }
}

$("logout").addEventListener("click", async () => {
  await fetch("/dashboard/logout", { method: "POST", credentials: "same-origin" });
  showLogin("You logged out.");
});
// A login link pasted into a tab already showing this page changes only the fragment: no reload.
window.addEventListener("hashchange", start);
start();
