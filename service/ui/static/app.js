// tunepool dashboard: relative times, the live jobs table, the Pool page, and the job page's live
// charts, events, checkpoints and overlays. Plain browser JavaScript, no build step; charts are uPlot's.
"use strict";

const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const CHART_TITLES = {
  loss: "Objective (training loss)",
  nll: "NLL (training)",
  token_accuracy: "Token accuracy (training)",
  valid_loss: "Validation loss",
};
const PALETTE = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#ca8a04"];

function relativeTime(ts) {
  const s = Math.max(0, Date.now() / 1000 - ts);
  if (s < 60) return `${Math.floor(s)} s ago`;
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
  return `${Math.floor(s / 86400)} d ago`;
}

function refreshTimes(root = document) {
  for (const el of root.querySelectorAll("time[data-ts]")) {
    const ts = Number(el.dataset.ts);
    el.textContent = relativeTime(ts);
    el.title = new Date(ts * 1000).toLocaleString();
  }
}

async function getJSON(url) {
  const response = await fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } });
  if (response.redirected && response.url.includes("/ui/login")) {
    window.location = response.url; // the key was revoked or the session ended
    throw new Error("signed out");
  }
  if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
  return response.json();
}

// --- the jobs table: re-rendered by the server every few seconds while any shown job is active
function startJobsTable() {
  const body = document.getElementById("job-rows");
  if (!body) return;
  const active = () => [...body.querySelectorAll("tr[data-status]")].some((r) => !TERMINAL.has(r.dataset.status));
  setInterval(async () => {
    if (!active() || document.hidden) return;
    const response = await fetch(body.dataset.refresh, { credentials: "same-origin" });
    if (response.ok && !response.redirected) {
      body.innerHTML = await response.text();
      refreshTimes(body);
    }
  }, 3000);
}

// --- the Pool page: share bars sized from their data (the CSP allows no inline style), and the
// whole page re-rendered by the server every few seconds
function sizeShareBars(root = document) {
  const percent = (v) => `${Math.min(100, Math.max(0, Number(v) * 100))}%`;
  for (const bar of root.querySelectorAll(".bar[data-share]")) {
    bar.querySelector(".bar-share").style.width = percent(bar.dataset.share);
    bar.querySelector(".bar-fair").style.left = percent(bar.dataset.fair);
  }
}

function startPoolPage() {
  const body = document.getElementById("pool-body");
  if (!body) return;
  sizeShareBars(body);
  setInterval(async () => {
    if (document.hidden) return;
    const response = await fetch(body.dataset.refresh, { credentials: "same-origin" });
    if (response.ok && !response.redirected) {
      body.innerHTML = await response.text();
      refreshTimes(body);
      sizeShareBars(body);
    }
  }, 5000);
}

// --- the job page
class JobSeries {
  // One job's metric rows, fetched incrementally (?after_step=), polled until the job has ended.
  constructor(id, color) {
    this.id = id;
    this.color = color;
    this.label = id;
    this.rows = [];
    this.job = null;
    this.checkpoints = [];
  }
  get lastStep() {
    return this.rows.length ? this.rows[this.rows.length - 1].step : 0;
  }
  get finished() {
    return this.job !== null && TERMINAL.has(this.job.status);
  }
  async update() {
    const data = await getJSON(`/ui/jobs/${encodeURIComponent(this.id)}/data?after_step=${this.lastStep}`);
    this.job = data.job;
    this.label = data.label;
    this.checkpoints = data.checkpoints;
    this.rows.push(...data.metrics);
    return data.metrics.length;
  }
  column(metric) {
    return [this.rows.map((r) => r.step), this.rows.map((r) => r[metric] ?? null)];
  }
}

class JobCharts {
  constructor(elements) {
    this.elements = elements; // one <div data-metric> per chart
    this.series = []; // JobSeries, the page's job first
    this.plots = new Map();
    this.log = false;
  }
  // uPlot wants one shared x array: join each job's (steps, values) on step, gaps as null.
  tableFor(metric) {
    const tables = this.series.map((s) => s.column(metric));
    return tables.length === 1 ? tables[0] : uPlot.join(tables);
  }
  hasValues(metric) {
    return this.series.some((s) => s.rows.some((r) => r[metric] !== null && r[metric] !== undefined));
  }
  render(rebuild = false) {
    for (const el of this.elements) {
      const metric = el.dataset.metric;
      let plot = this.plots.get(metric);
      if (!this.hasValues(metric)) {
        if (plot) plot.destroy();
        this.plots.delete(metric);
        el.innerHTML = `<h3>${CHART_TITLES[metric]}</h3><p class="muted">No ${metric === "valid_loss" ? "validation data" : "metrics"} yet.</p>`;
        continue;
      }
      const data = this.tableFor(metric);
      if (plot && !rebuild) {
        plot.setData(data);
        continue;
      }
      if (plot) plot.destroy();
      el.innerHTML = "";
      const opts = {
        title: CHART_TITLES[metric],
        width: Math.max(320, el.clientWidth || 480),
        height: 220,
        // Log scale (not for accuracy, which can be 0): DFT's objective next to SFT's is 10-20x smaller.
        scales: { x: { time: false }, y: this.log && metric !== "token_accuracy" ? { distr: 3 } : {} },
        axes: [{ label: "step" }, { size: 64, values: (u, ticks) => ticks.map((v) => (v == null ? "" : +v.toPrecision(4))) }],
        series: [
          { label: "step" },
          ...this.series.map((s) => ({ label: s.label, stroke: s.color, width: 2, spanGaps: true, points: { show: s.rows.length < 40 } })),
        ],
      };
      plot = new uPlot(opts, data, el);
      this.plots.set(metric, plot);
    }
  }
}

function renderCheckpoints(job, checkpoints) {
  const body = document.getElementById("checkpoint-rows");
  if (!checkpoints.length) return;
  const fmt = (v) => (typeof v === "number" ? v.toFixed(4) : "–");
  body.innerHTML = "";
  for (const c of [...checkpoints].reverse()) {
    const row = document.createElement("tr");
    const href = `/ui/jobs/${encodeURIComponent(job)}/checkpoints/${encodeURIComponent(c.id)}/content`;
    row.innerHTML = `<td>${c.step}</td><td>${fmt(c.metrics.train_loss)}</td><td>${fmt(c.metrics.valid_loss)}</td>
      <td><a class="download" download href="${href}">Download (tar)</a></td>`;
    body.appendChild(row);
  }
}

function renderJob(job) {
  const status = document.getElementById("job-status");
  status.textContent = job.status;
  status.className = `status status-${job.status}`;
  document.getElementById("job").dataset.status = job.status;
  const p = job.progress;
  let text = `${p.steps_completed}/${p.total_steps ?? "?"} steps`;
  if (p.tokens_per_sec) text += ` · ${Math.round(p.tokens_per_sec)} tokens/s`;
  if (job.estimated_finish && !TERMINAL.has(job.status)) text += ` · ETA ${new Date(job.estimated_finish * 1000).toLocaleTimeString()}`;
  if (job.queue_position) text += ` · #${job.queue_position} in queue`;
  document.getElementById("job-progress").textContent = text;
  if (TERMINAL.has(job.status)) document.getElementById("cancel-form")?.remove();
}

function followEvents(jobId) {
  const list = document.getElementById("events");
  const source = new EventSource(`/ui/jobs/${encodeURIComponent(jobId)}/events`);
  source.onmessage = (message) => {
    const event = JSON.parse(message.data);
    const item = document.createElement("li");
    item.className = `event level-${event.level}`;
    const when = document.createElement("time");
    when.dataset.ts = event.created_at;
    when.textContent = new Date(event.created_at * 1000).toLocaleTimeString();
    item.append(when, " ", event.message);
    list.prepend(item); // newest first
  };
  source.addEventListener("end", () => source.close());
}

function startJobPage() {
  const page = document.getElementById("job");
  if (!page) return;
  const jobId = page.dataset.jobId;
  const charts = new JobCharts([...document.querySelectorAll(".chart[data-metric]")]);
  const main = new JobSeries(jobId, PALETTE[0]);
  charts.series.push(main);
  window.tunepool = { charts, main }; // for people poking at the page (and the browser tests)

  const tick = async () => {
    let changed = 0;
    for (const s of charts.series) if (!s.finished) changed += await s.update();
    renderJob(main.job);
    renderCheckpoints(jobId, main.checkpoints);
    if (changed) charts.render();
    if (charts.series.some((s) => !s.finished)) setTimeout(tick, 2000);
  };
  main.update().then(() => {
    renderJob(main.job);
    renderCheckpoints(jobId, main.checkpoints);
    charts.render(true);
    page.dataset.chartsReady = "1";
    if (!main.finished) setTimeout(tick, 2000);
  });

  for (const box of document.querySelectorAll(".overlay-toggle")) {
    box.addEventListener("change", async () => {
      if (box.checked) {
        const other = new JobSeries(box.value, PALETTE[charts.series.length % PALETTE.length]);
        await other.update();
        charts.series.push(other);
        if (!other.finished) setTimeout(tick, 2000);
      } else {
        charts.series = charts.series.filter((s) => s.id !== box.value);
      }
      charts.render(true);
      page.dataset.overlays = String(charts.series.length - 1);
    });
  }
  // Attached here, not inline: the pages' Content-Security-Policy allows no inline script.
  const cancelForm = document.getElementById("cancel-form");
  cancelForm?.addEventListener("submit", (e) => {
    if (!window.confirm(cancelForm.dataset.confirm)) e.preventDefault();
  });
  document.getElementById("log-scale")?.addEventListener("change", (e) => {
    charts.log = e.target.checked;
    charts.render(true);
  });
  followEvents(jobId);
}

document.addEventListener("DOMContentLoaded", () => {
  refreshTimes();
  setInterval(refreshTimes, 15000);
  startJobsTable();
  startPoolPage();
  startJobPage();
});
