// The node's own page: GET /v1/node as server-sent events (about once a second), drawn with
// textContent only (names come from the node's data and are never parsed as HTML), and the
// owner's lending switch (POST /v1/node/lending).
"use strict";

(() => {
  const HISTORY = 60; // samples in the CPU chart: a minute at one event a second
  const history = [];
  let switching = false; // a switch is on its way: the stream's older state must not flip it back
  let linked = false; // to an orchestrator, as of the last event

  const $ = (id) => document.getElementById(id);
  const setText = (id, value) => { $(id).textContent = value; };
  const percent = (fraction) => `${Math.round(fraction * 100)}%`;
  const count = (n) => Number(n || 0).toLocaleString("en");
  const gib = (bytes) => `${(bytes / 2 ** 30).toFixed(1)} GiB`;
  const clamp = (x) => Math.max(0, Math.min(1, x));
  const since = (seconds) => new Date(seconds * 1000).toLocaleString();

  function element(tag, text, className) {
    const el = document.createElement(tag);
    if (text !== undefined) el.textContent = text;
    if (className) el.className = className;
    return el;
  }

  function renderLending(lending, fragmentsRunning, linked) {
    const box = $("lending-switch");
    box.checked = !lending.paused;
    box.disabled = switching;
    let state;
    if (lending.paused) {
      state = "Paused by you" + (lending.since ? ` since ${since(lending.since)}` : "") + ": nothing new is taken.";
      if (fragmentsRunning) state += ` ${fragmentsRunning} fragment(s) for others finish first.`;
    } else {
      state = linked ? "Lending: the swarm may place work here, within its share." : "Lending, once linked to a swarm.";
    }
    if (!lending.saved) state += " (Could not be saved: it holds until the node stops.)";
    setText("lending-state", state);
  }

  function renderGpus(gpus) {
    const list = $("gpus");
    if (!gpus.length) {
      list.replaceChildren(element("li", "none", "muted"));
      return;
    }
    list.replaceChildren(...gpus.map((gpu) => element("li",
      `${gpu.name}: ${percent(gpu.util)} busy, ${gib(gpu.mem_used)} of ${gib(gpu.mem_total)}`)));
  }

  function renderModels(models) {
    $("models").replaceChildren(...models.map((m) => {
      const row = element("tr");
      const state = m.busy ? "running" : m.loaded ? "loaded" : "on disk";
      row.append(element("td", m.name), element("td", m.tags.join(", ")), element("td", state),
        element("td", count(m.waiting), "num"), element("td", m.threads ?? "–", "num"),
        element("td", count(m.tokens_generated), "num"));
      return row;
    }));
  }

  function renderChart() {
    const svg = $("cpu-chart");
    const lines = [["total", (s) => s.total], ["owner", (s) => s.owner], ["ours", (s) => s.ours],
      ["share", (s) => s.share]];
    const offset = HISTORY - history.length;
    svg.replaceChildren(...lines.map(([name, pick]) => {
      const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
      line.setAttribute("class", name);
      line.setAttribute("points", history.map((s, i) => `${offset + i},${100 - clamp(pick(s)) * 100}`).join(" "));
      return line;
    }));
  }

  function render(node) {
    const g = node.governor;
    const swarm = node.swarm;
    setText("node-name", node.name);
    document.title = `Dragon node ${node.name}`;
    setText("owner-load", percent(g.owner_load));
    $("owner-busy").hidden = !g.owner_busy;
    setText("cpu-total", percent(g.cpu_total));
    setText("cpus", g.cpus);
    setText("cpu-ours", percent(g.cpu_ours));
    setText("share-in-force", percent(g.share_in_force));
    setText("threads", g.threads);
    setText("local-share", percent(g.local_share));
    setText("swarm-share", percent(g.share));
    setText("mechanism", g.mechanism);
    setText("mechanism-reason", g.mechanism_reason);
    setText("ram-available", gib(g.ram_available));
    setText("ram-total", gib(g.ram_total));
    $("ram-bar").style.width = percent(clamp(1 - g.ram_available / g.ram_total));
    renderGpus(g.gpus);

    if (!swarm) {
      setText("swarm-state", "not linked");
      setText("orchestrator", "this node serves only its owner (no --orchestrator)");
    } else {
      setText("swarm-state", swarm.refused ? "refused" : swarm.connected ? "connected" : "connecting…");
      setText("orchestrator", swarm.refused ? `${swarm.orchestrator}: ${swarm.refused}` : swarm.orchestrator);
    }
    const running = swarm ? swarm.fragments_running : 0;
    setText("fragments-running", count(running));
    const served = node.served;
    const requests = (origin) => Object.values(served[origin].requests).reduce((a, b) => a + b, 0);
    setText("swarm-requests", count(requests("swarm")));
    setText("swarm-tokens", count(served.swarm.generation_tokens));
    setText("swarm-prompt-tokens", count(served.swarm.prompt_tokens));
    setText("owner-requests", count(requests("owner")));
    setText("owner-tokens", count(served.owner.generation_tokens));
    linked = Boolean(swarm && swarm.connected);
    if (!switching) renderLending(node.lending, running, linked);
    renderModels(node.models);

    history.push({ total: g.cpu_total, owner: g.owner_load, ours: g.cpu_ours, share: g.share_in_force });
    if (history.length > HISTORY) history.shift();
    renderChart();
  }

  async function switchLending() {
    const box = $("lending-switch");
    const paused = !box.checked;
    const error = $("lending-error");
    switching = true;
    box.disabled = true;
    error.hidden = true;
    try {
      const response = await fetch("/v1/node/lending", {
        method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ paused }),
      });
      const body = await response.json();
      if (!response.ok) throw new Error(body.error ? body.error.message : `HTTP ${response.status}`);
      switching = false;
      renderLending(body, body.fragments_running, linked);
    } catch (err) {
      switching = false;
      box.checked = paused; // back to what the node still holds
      box.disabled = false;
      error.textContent = `The switch failed: ${err.message}`;
      error.hidden = false;
    }
  }

  function connect() {
    const events = new EventSource("/v1/node/events");
    const pill = $("stream-state");
    events.onopen = () => { pill.textContent = "live"; pill.className = "pill on"; };
    events.onerror = () => { pill.textContent = "reconnecting…"; pill.className = "pill off"; };
    events.onmessage = (message) => render(JSON.parse(message.data));
  }

  $("lending-switch").addEventListener("change", switchLending);
  connect();
})();
