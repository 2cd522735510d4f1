// The batches page: OpenAI batches (GET /v1/batches) with their progress, request counts and
// status, cancel (POST /v1/batches/{id}/cancel) and their output and error files
// (GET /v1/files/{id}/content, saved by the browser). A key with `inference` alone sees its
// own batches, an admin key or the operator token every one.

import { getJSON, postJSON, request } from "./api.js";
import { $, ago, badge, h, meter } from "./util.js";

const FINAL = new Set(["completed", "failed", "expired", "cancelled"]);

function note(text) {
  $("#batches-note").textContent = text;
}

async function cancel(batchId, button) {
  button.disabled = true;
  try {
    await postJSON(`/v1/batches/${encodeURIComponent(batchId)}/cancel`);
    note(`Cancelling ${batchId}.`);
  } catch (err) {
    note(`Could not cancel ${batchId}: ${err.code}: ${err.message}`);
    button.disabled = false;
  }
  await refreshBatches();
}

// A file's bytes, saved under its batch's name (a link cannot carry the token).
async function download(fileId, name) {
  try {
    const res = await request(`/v1/files/${encodeURIComponent(fileId)}/content`);
    const url = URL.createObjectURL(await res.blob());
    const a = h("a", { href: url, download: name });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10_000);
  } catch (err) {
    note(`Could not download ${fileId}: ${err.code}: ${err.message}`);
  }
}

function fileButton(fileId, label, batchId) {
  if (!fileId) return "";
  return h("button", { type: "button", class: "small ghost", dataset: { file: fileId },
    onclick: () => download(fileId, `${batchId}_${label}.jsonl`) }, label);
}

function row(b) {
  const c = b.request_counts || { total: 0, completed: 0, failed: 0 };
  const done = c.completed + c.failed;
  const meta = b.metadata || {};
  const where = [meta.rbees_window ? `window ${meta.rbees_window}` : "",
    meta.rbees_pools ? `pools ${meta.rbees_pools}` : ""].filter(Boolean).join(" · ");
  const stop = FINAL.has(b.status) || b.status === "cancelling" ? ""
    : h("button", { type: "button", class: "small danger", dataset: { cancel: b.id },
      onclick: (e) => cancel(b.id, e.currentTarget) }, "Cancel");
  return h("tr", { dataset: { batch: b.id, status: b.status } },
    h("td", { title: b.id }, b.id.replace(/^batch_/, "").slice(0, 10)),
    h("td", {}, badge(b.status)),
    h("td", {}, b.endpoint),
    h("td", {}, meter(done, c.total, `${done} / ${c.total} answered`)),
    h("td", { class: "num", dataset: { counts: "" } },
      `${c.completed} ok · ${c.failed} failed · ${c.total - done} to go`),
    h("td", {}, where || "–"),
    h("td", {}, ago(b.created_at)),
    h("td", {}, fileButton(b.output_file_id, "output", b.id),
      fileButton(b.error_file_id, "errors", b.id), stop));
}

export async function refreshBatches() {
  const page = await getJSON("/v1/batches?limit=100");
  const batches = page.data || [];
  if (!batches.length) {
    $("#batches").replaceChildren(h("p", { class: "empty" },
      "No batches. Make one with the openai client (files.create, batches.create) or rbees batches submit FILE.jsonl."));
    return;
  }
  const running = batches.filter((b) => !FINAL.has(b.status)).length;
  $("#batches").replaceChildren(
    h("p", { class: "muted" }, `${batches.length} batch(es), ${running} not finished`),
    h("table", { class: "batches" },
      h("thead", {}, h("tr", {}, ["batch", "status", "endpoint", "progress", "requests",
        "where / when", "created", ""].map((t) => h("th", {}, t)))),
      h("tbody", {}, batches.map(row))));
}
