// The live dashboard: pools, devices, workers, queue, recent jobs and two small charts.
// Polled: GET /v2/pools, GET /v2/tasks?limit=20, GET /metrics.

import { getJSON, parseMetrics, postJSON, request } from "./api.js";
import { lineChart } from "./charts.js";
import { $, ago, badge, bytes, h, meter, num } from "./util.js";

const WINDOW_MS = 5 * 60 * 1000;
const series = { tps: [], queue: [] };
let lastTokens = null; // [t_ms, tokens counted so far]
// job_id -> {text: explanation (null while loading), replay: what another policy would have
// done (GET /v2/tasks/{id}/replay: null while loading, a string on error), policy}
const openWhy = new Map();
export const latest = { pools: [], metrics: {} };

function metricValue(samples, name, labels = {}) {
  let total = 0;
  for (const s of samples) {
    if (s.name !== name) continue;
    if (Object.entries(labels).every(([k, v]) => s.labels[k] === v)) total += s.value;
  }
  return total;
}

// One sample of /metrics for the charts; runs whatever page is shown.
export async function sampleMetrics() {
  const res = await request("/metrics");
  const samples = parseMetrics(await res.text());
  const now = Date.now();
  // every token is either a job's first (ttft) or follows another (time per token)
  const tokens = metricValue(samples, "rbees_ttft_seconds_count")
    + metricValue(samples, "rbees_time_per_token_seconds_count");
  if (lastTokens !== null && now > lastTokens[0]) {
    const rate = Math.max(0, tokens - lastTokens[1]) / ((now - lastTokens[0]) / 1000);
    series.tps.push([now, rate]);
  }
  lastTokens = [now, tokens];
  const interactive = metricValue(samples, "rbees_queue_depth", { lane: "interactive" });
  const batch = metricValue(samples, "rbees_queue_depth", { lane: "batch" });
  series.queue.push([now, interactive + batch]);
  for (const s of Object.values(series)) while (s.length && s[0][0] < now - WINDOW_MS) s.shift();
  latest.metrics = { interactive, batch, running: metricValue(samples, "rbees_jobs_running"),
    tps: series.tps.length ? series.tps[series.tps.length - 1][1] : 0 };
}

function stat(label, value, id) {
  return h("div", { class: "stat", dataset: { stat: id } },
    h("span", { class: "stat-value" }, value), h("span", { class: "stat-label" }, label));
}

function deviceRows(pool) {
  const rows = [];
  const cpu = pool.cpu;
  if (cpu) {
    const used = cpu.ram_total_bytes - cpu.ram_free_bytes;
    rows.push(h("div", { class: "device", dataset: { device: "cpu" } },
      h("div", { class: "device-name" }, h("strong", {}, "cpu"), ` ${cpu.name || ""} · ${cpu.cores} cores`),
      meter(used, cpu.ram_total_bytes,
        `RAM ${bytes(used)} / ${bytes(cpu.ram_total_bytes)} used` +
        (cpu.ram_reserved_bytes ? `, ${bytes(cpu.ram_reserved_bytes)} reserved` : ""),
        cpu.ram_reserved_bytes || 0)));
  }
  for (const gpu of pool.gpus || []) {
    const name = `${gpu.backend || "gpu"}:${gpu.index ?? 0}`;
    const used = gpu.memory_total_bytes - gpu.memory_free_bytes;
    const extra = [];
    if (gpu.utilization !== null && gpu.utilization !== undefined) extra.push(`${Math.round(gpu.utilization * 100)}% busy`);
    if (gpu.temperature_c) extra.push(`${gpu.temperature_c} °C`);
    if (gpu.power_w) extra.push(`${num(gpu.power_w, 0)} W`);
    rows.push(h("div", { class: "device", dataset: { device: name } },
      h("div", { class: "device-name" }, h("strong", {}, name), ` ${gpu.name || ""}`,
        extra.length ? ` · ${extra.join(" · ")}` : ""),
      meter(used, gpu.memory_total_bytes,
        `VRAM ${bytes(used)} / ${bytes(gpu.memory_total_bytes)} used` +
        (gpu.memory_reserved_bytes ? `, ${bytes(gpu.memory_reserved_bytes)} reserved` : ""),
        gpu.memory_reserved_bytes || 0)));
  }
  return rows;
}

export function workerTable(pools, { stopButton = true } = {}) {
  const rows = [];
  for (const pool of pools) {
    for (const w of pool.workers || []) {
      const total = w.slots_total || 0;
      const free = w.slots_free ?? total;
      const stop = stopButton && !["stopped", "failed", "stopping"].includes(w.state)
        ? h("button", { type: "button", class: "small danger", "data-stop": w.worker_id,
          onclick: (e) => stopWorker(pool.pool_id, w.worker_id, e.currentTarget) }, "Stop")
        : "";
      rows.push(h("tr", { dataset: { worker: w.worker_id, pool: pool.pool_id } },
        h("td", {}, w.worker_id), h("td", {}, pool.pool_id), h("td", {}, w.model_ref),
        h("td", {}, w.device), h("td", {}, badge(w.state)),
        h("td", {}, meter(total - free, total, `${total - free} / ${total} busy`)),
        h("td", {}, bytes(w.memory_bytes)), h("td", {}, stop)));
    }
  }
  if (!rows.length) return h("p", { class: "empty" }, "No workers. The scheduler starts one when a job needs it, or start one on the Models page.");
  return h("table", { class: "workers" },
    h("thead", {}, h("tr", {}, ["worker", "pool", "model", "device", "state", "slots", "memory", ""].map((t) => h("th", {}, t)))),
    h("tbody", {}, rows));
}

export async function stopWorker(poolId, workerId, button) {
  if (button) button.disabled = true;
  const note = $("#models-note");
  try {
    await postJSON(`/v2/pools/${encodeURIComponent(poolId)}/workers/${encodeURIComponent(workerId)}/stop`);
    note.textContent = `Stopping ${workerId} on ${poolId}.`;
  } catch (err) {
    note.textContent = `Could not stop ${workerId}: ${err.code}: ${err.message}`;
    if (button) button.disabled = false;
  }
}

function poolCard(pool) {
  return h("article", { class: "pool", dataset: { pool: pool.pool_id } },
    h("header", {},
      h("h3", {}, pool.pool_id), badge(pool.status),
      pool.draining ? badge("draining") : "",
      h("span", { class: "muted" }, ` ${pool.host}${pool.version ? ` · v${pool.version}` : ""} · `),
      h("span", { class: "heartbeat", title: new Date(pool.last_heartbeat_at * 1000).toISOString() },
        `last heartbeat ${ago(pool.last_heartbeat_at)}`)),
    h("div", { class: "devices" }, deviceRows(pool)));
}

function jobRate(j) {
  if (!j.tokens_out || !j.started_at || !j.finished_at) return null;
  const seconds = j.finished_at - j.started_at;
  return seconds > 0 ? j.tokens_out / seconds : null;
}

function jobsTable(jobs) {
  if (!jobs.length) return h("p", { class: "empty" }, "No jobs yet.");
  const rows = [];
  for (const j of jobs) {
    const outcome = j.error ? `${j.status} (${j.error.code})` : j.status;
    const waited = j.started_at ? (j.started_at - j.created_at) * 1000 : null;
    const btn = h("button", { type: "button", class: "small ghost", "data-why": j.job_id,
      onclick: () => toggleWhy(j.job_id) }, openWhy.has(j.job_id) ? "hide" : "why");
    rows.push(h("tr", { dataset: { job: j.job_id } },
      h("td", { title: j.job_id }, j.job_id.replace(/^job-/, "").slice(0, 8)),
      h("td", {}, j.model), h("td", {}, badge(outcome, j.status)), h("td", {}, j.priority),
      h("td", {}, j.worker_id ? `${j.worker_id}@${j.pool_id}` : "–"),
      h("td", { class: "num" }, waited === null ? "–" : `${num(waited, 0)} ms`),
      h("td", { class: "num" }, j.ttft_ms === null || j.ttft_ms === undefined ? "–" : `${num(j.ttft_ms, 0)} ms`),
      h("td", { class: "num" }, String(j.tokens_out ?? 0)),
      h("td", { class: "num" }, num(jobRate(j))),
      h("td", {}, ago(j.created_at)), h("td", {}, btn)));
    if (openWhy.has(j.job_id)) {
      const open = openWhy.get(j.job_id);
      rows.push(h("tr", { class: "why-row" }, h("td", { colspan: 11 },
        h("pre", { class: "why", dataset: { whyFor: j.job_id } }, open.text ?? "…"),
        replayView(j.job_id, open))));
    }
  }
  return h("table", { class: "jobs" },
    h("thead", {}, h("tr", {}, ["job", "model", "outcome", "lane", "where", "queued",
      "TTFT", "tokens", "tok/s", "age", ""].map((t) => h("th", {}, t)))),
    h("tbody", {}, rows));
}

function side(s) {
  return s.target ? `${s.action} ${s.target}` : s.action;
}

// "What the other policy would have done": each recorded decision of the job, re-decided by
// the chosen policy on the snapshot it was made from.
function replayView(jobId, open) {
  const box = h("div", { class: "replay", dataset: { replayFor: jobId } });
  const r = open.replay;
  if (r === null || r === undefined) return h("div", { class: "replay muted" }, "…");
  if (typeof r === "string") return h("div", { class: "replay muted" }, r);
  const select = h("select", { "aria-label": "policy", onchange: (e) => loadReplay(jobId, e.target.value) },
    r.policies.map((p) => h("option", { value: p, selected: p === r.policy }, p)));
  box.append(h("div", {}, "What ", select, " would have done:"));
  if (!r.rows.length) {
    box.append(h("p", { class: "muted" }, "No decision of this job kept its snapshot (past the retention, or made before it was recorded)."));
    return box;
  }
  box.append(h("ul", {}, r.rows.map((row) => h("li", { dataset: { change: row.change || "same" } },
    `${side(row.recorded)} (${row.recorded.policy}) → ${side(row.replayed)}`,
    row.change ? ` — ${row.change.replace("_", " ")}` : " — the same",
    row.replayed.summary ? h("div", { class: "muted" }, row.replayed.summary) : ""))));
  return box;
}

async function loadReplay(jobId, policy) {
  const open = openWhy.get(jobId);
  if (!open) return;
  open.replay = null;
  await refreshDashboard();
  const query = policy ? `?policy=${encodeURIComponent(policy)}` : "";
  try {
    open.replay = await getJSON(`/v2/tasks/${encodeURIComponent(jobId)}/replay${query}`);
  } catch (err) {
    open.replay = `${err.code}: ${err.message}`;
  }
  await refreshDashboard();
}

async function toggleWhy(jobId) {
  if (openWhy.has(jobId)) {
    openWhy.delete(jobId);
    await refreshDashboard();
    return;
  }
  const open = { text: null, replay: null };
  openWhy.set(jobId, open);
  await refreshDashboard();
  try {
    const d = await getJSON(`/v2/tasks/${encodeURIComponent(jobId)}/decision`);
    open.text = d.explanation;
  } catch (err) {
    open.text = `${err.code}: ${err.message}`;
  }
  await loadReplay(jobId, null);
}

export async function refreshDashboard() {
  const [pools, jobs] = await Promise.all([getJSON("/v2/pools"), getJSON("/v2/tasks?limit=20")]);
  latest.pools = pools.pools;
  const m = latest.metrics;
  const workers = pools.pools.flatMap((p) => p.workers || []);
  const ready = pools.pools.filter((p) => p.status === "ready").length;
  $("#stats").replaceChildren(
    stat("pools ready", `${ready} / ${pools.pools.length}`, "pools"),
    stat("workers ready", `${workers.filter((w) => ["ready", "busy"].includes(w.state)).length} / ${workers.length}`, "workers"),
    stat("queue: interactive", String(m.interactive ?? "–"), "queue-interactive"),
    stat("queue: batch", String(m.batch ?? "–"), "queue-batch"),
    stat("jobs running", String(m.running ?? "–"), "running"),
    stat("tokens/s", num(m.tps), "tps"));
  lineChart($("#chart-tps"), series.tps, { windowMs: WINDOW_MS, unit: "tok/s", digits: 1 });
  lineChart($("#chart-queue"), series.queue, { windowMs: WINDOW_MS, unit: "jobs" });
  $("#pools").replaceChildren(...(pools.pools.length ? pools.pools.map(poolCard)
    : [h("p", { class: "empty" }, "No pool has registered. Start one: rbees up, or pool-managerd --orchestrator URL.")]),
  h("h3", {}, "Workers"), workerTable(pools.pools));
  $("#jobs").replaceChildren(jobsTable(jobs.jobs));
}
