// The models page: the catalog and where each model is, starting and stopping workers
// (POST /v2/pools/{id}/workers, .../workers/{wid}/stop) and downloads with progress
// (POST /v2/pools/{id}/models/download, the pool's SSE relayed by rbees-orcd).

import { getJSON, postJSON, readSSE, request } from "./api.js";
import { workerTable } from "./dashboard.js";
import { $, bytes, h } from "./util.js";

let pools = [];
let models = [];
let downloading = false;

function note(text) {
  $("#models-note").textContent = text;
}

function devicesOf(pool) {
  const out = pool && pool.cpu ? ["cpu"] : [];
  for (const gpu of (pool && pool.gpus) || []) out.push(`${gpu.backend || "cuda"}:${gpu.index ?? 0}`);
  return out;
}

// Replace a select's options, keeping the chosen value when it is still offered.
function fill(select, values, labels = values) {
  const same = select.options.length === values.length
    && [...select.options].every((o, i) => o.value === values[i] && o.textContent === labels[i]);
  if (same) return; // rebuilding would close a list the user has open
  const keep = select.value;
  select.replaceChildren(...values.map((v, i) => h("option", { value: v }, labels[i])));
  if (values.includes(keep)) select.value = keep;
}

function refreshForm() {
  const modelSel = $("#start-model");
  fill(modelSel, models.map((m) => m.id), models.map((m) => `${m.id} — ${m.name}`));
  const poolSel = $("#start-pool");
  fill(poolSel, pools.map((p) => p.pool_id), pools.map((p) => `${p.pool_id} (${p.status})`));
  const pool = pools.find((p) => p.pool_id === poolSel.value);
  fill($("#start-device"), devicesOf(pool));
  $("#start-worker").disabled = !pools.length || !models.length;
  $("#download").disabled = !pools.length || !models.length || downloading;
}

async function startWorker(event) {
  event.preventDefault();
  const poolId = $("#start-pool").value;
  const body = { model_ref: $("#start-model").value, device: $("#start-device").value,
    slots: Number($("#start-slots").value) || 1 };
  // an embedding model (the catalog's kind) runs on an embedding worker
  const chosen = models.find((m) => m.id === body.model_ref);
  if (chosen && chosen.kind === "embedding") body.embedding = true;
  const button = $("#start-worker");
  button.disabled = true;
  note(`Starting ${body.model_ref} on ${poolId} (${body.device})…`);
  try {
    const started = await postJSON(`/v2/pools/${encodeURIComponent(poolId)}/workers`, body);
    note(`Started ${started.worker_id} on ${poolId}: ${started.state}.`);
    $("#models-note").dataset.started = started.worker_id;
  } catch (err) {
    note(`The pool refused: ${err.code}: ${err.message}`);
  } finally {
    button.disabled = false;
    refreshModels().catch(() => {});
  }
}

async function download() {
  const poolId = $("#start-pool").value;
  const model = $("#start-model").value;
  const bar = $("#download-progress");
  downloading = true;
  refreshForm();
  bar.hidden = false;
  bar.removeAttribute("value");
  note(`Downloading ${model} to ${poolId}…`);
  try {
    const res = await request(`/v2/pools/${encodeURIComponent(poolId)}/models/download`, {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ model }) });
    await readSSE(res, (batch) => {
      for (const e of batch) {
        const d = e.data || {};
        if (e.event === "progress" && d.bytes_total) {
          bar.max = d.bytes_total;
          bar.value = d.bytes_done;
          note(`Downloading ${model} to ${poolId}: ${bytes(d.bytes_done)} / ${bytes(d.bytes_total)}` +
            (d.rate_bps ? ` at ${bytes(d.rate_bps)}/s` : ""));
        } else if (e.event === "end") {
          note(`Downloaded ${model} to ${poolId}: ${d.path || ""}`);
          return false;
        } else if (e.event === "error") {
          note(`Download failed: ${d.code}: ${d.message}`);
          return false;
        }
      }
      return true;
    });
  } catch (err) {
    note(`Download refused: ${err.code}: ${err.message}`);
  } finally {
    downloading = false;
    bar.hidden = true;
    refreshForm();
    refreshModels().catch(() => {});
  }
}

function pick(modelId) {
  $("#start-model").value = modelId;
  $("#start-model").focus();
}

function catalogTable() {
  const where = (list) => (list.length ? list.map((p) => h("span", { class: "badge b-pool" }, p)) : "–");
  return h("table", { class: "catalog" },
    h("thead", {}, h("tr", {}, ["id", "name", "downloaded on", "loaded on", ""].map((t) => h("th", {}, t)))),
    h("tbody", {}, models.map((m) => h("tr", { dataset: { model: m.id } },
      h("td", {}, h("code", {}, m.id)), h("td", {}, m.name),
      h("td", {}, where(m.downloaded)), h("td", {}, where(m.loaded)),
      h("td", {}, h("button", { type: "button", class: "small ghost", onclick: () => pick(m.id) },
        "choose"))))));
}

export async function refreshModels() {
  const [catalog, poolList] = await Promise.all([getJSON("/v2/models"), getJSON("/v2/pools")]);
  models = catalog.models;
  pools = poolList.pools;
  refreshForm();
  $("#catalog").replaceChildren(catalogTable());
  $("#model-workers").replaceChildren(workerTable(pools));
}

export function initModels() {
  const form = h("form", { id: "start-form", class: "start-form" },
    h("label", {}, "Model ", h("select", { id: "start-model" })),
    h("label", {}, "Pool ", h("select", { id: "start-pool",
      onchange: () => refreshForm() })),
    h("label", {}, "Device ", h("select", { id: "start-device" })),
    h("label", {}, "Slots ", h("input", { id: "start-slots", type: "number", min: 1, max: 64,
      value: 1 })),
    h("button", { id: "start-worker", type: "submit" }, "Start worker"),
    h("button", { id: "download", type: "button", class: "ghost", onclick: download },
      "Download to pool"),
    h("progress", { id: "download-progress", hidden: true }));
  form.addEventListener("submit", startWorker);
  $("#catalog").before(form);
}
