// The keys page (admin): rbees-orcd's API keys (GET /v2/keys: names, scopes, limits, never a
// key), making one (POST /v2/keys: the key is shown once, here, and kept nowhere: not in
// storage, not in the list), revoking one (POST /v2/keys/{name}/revoke, after a second
// click) and the usage per key, model and day (GET /v2/usage). A key without the admin scope
// gets 403 from these routes: the page says so.

import { ApiError, getJSON, postJSON } from "./api.js";
import { $, ago, badge, h } from "./util.js";

const COLUMNS = ["name", "scopes", "models", "limits", "expires", "state", "created", ""];

function note(text) {
  $("#keys-note").textContent = text;
}

function state(k) {
  if (k.revoked_at) return "revoked";
  if (k.expires_at && k.expires_at <= Date.now() / 1000) return "expired";
  return "live";
}

function limits(k) {
  const parts = [];
  if (k.rpm) parts.push(`${k.rpm} req/min`);
  if (k.tpm) parts.push(`${k.tpm} tok/min`);
  if (k.max_jobs) parts.push(`${k.max_jobs} jobs`);
  return parts.join(" · ") || "–";
}

function when(epochSeconds) {
  return epochSeconds ? new Date(epochSeconds * 1000).toISOString().slice(0, 16).replace("T", " ") : "never";
}

// Revoking takes two clicks: the first arms the button, the second revokes.
function revokeButton(name) {
  return h("button", { type: "button", class: "small danger", dataset: { revoke: name },
    onclick: async (e) => {
      const button = e.currentTarget;
      if (button.dataset.armed !== "1") {
        button.dataset.armed = "1";
        button.textContent = `Revoke ${name}?`;
        return;
      }
      button.disabled = true;
      try {
        await postJSON(`/v2/keys/${encodeURIComponent(name)}/revoke`);
        note(`Revoked ${name}: its next request gets 401.`);
      } catch (err) {
        note(`Could not revoke ${name}: ${err.code}: ${err.message}`);
      }
      await refreshKeys();
    } }, "Revoke");
}

function keyRow(k) {
  const st = state(k);
  return h("tr", { dataset: { key: k.name, state: st } },
    h("td", {}, k.name),
    h("td", {}, (k.scopes || []).join(", ")),
    h("td", {}, (k.models || []).join(", ") || "any"),
    h("td", {}, limits(k)),
    h("td", {}, when(k.expires_at)),
    h("td", {}, badge(st, st === "live" ? "ready" : "failed")),
    h("td", {}, ago(k.created_at)),
    h("td", {}, st === "live" ? revokeButton(k.name) : ""));
}

function usageTable(rows) {
  if (!rows.length) return h("p", { class: "empty" }, "No usage yet: it is counted when a key's jobs end.");
  const totals = new Map();
  for (const r of rows) {
    const t = totals.get(r.key) || { requests: 0, prompt: 0, completion: 0 };
    t.requests += r.requests;
    t.prompt += r.prompt_tokens;
    t.completion += r.completion_tokens;
    totals.set(r.key, t);
  }
  return [
    h("table", { class: "usage-totals" },
      h("thead", {}, h("tr", {}, ["key", "requests", "prompt tokens", "completion tokens"].map((t) => h("th", {}, t)))),
      h("tbody", {}, [...totals].map(([key, t]) => h("tr", { dataset: { usageKey: key } },
        h("td", {}, key), h("td", { class: "num" }, t.requests), h("td", { class: "num" }, t.prompt),
        h("td", { class: "num" }, t.completion))))),
    h("table", { class: "usage" },
      h("thead", {}, h("tr", {}, ["day", "key", "model", "requests", "prompt", "completion"].map((t) => h("th", {}, t)))),
      h("tbody", {}, rows.map((r) => h("tr", {},
        h("td", {}, r.day), h("td", {}, r.key), h("td", {}, r.model), h("td", { class: "num" }, r.requests),
        h("td", { class: "num" }, r.prompt_tokens), h("td", { class: "num" }, r.completion_tokens))))),
  ];
}

function forbidden(err) {
  if (err instanceof ApiError && err.status === 403) {
    $("#keys").replaceChildren(h("p", { class: "empty", id: "keys-forbidden" },
      "This page needs an admin key (or rbees-orcd's token): the key in use lacks the admin scope."));
    $("#usage").replaceChildren();
    return true;
  }
  return false;
}

export async function refreshKeys() {
  let keys;
  let usage;
  try {
    [keys, usage] = await Promise.all([getJSON("/v2/keys"), getJSON("/v2/usage")]);
  } catch (err) {
    if (forbidden(err)) return;
    throw err;
  }
  const list = keys.keys || [];
  $("#keys").replaceChildren(list.length
    ? h("table", { class: "keys" },
      h("thead", {}, h("tr", {}, COLUMNS.map((t) => h("th", {}, t)))),
      h("tbody", {}, list.map(keyRow)))
    : h("p", { class: "empty" }, "No API keys yet. Make one below (or rbees keys create NAME --scope inference)."));
  $("#usage").replaceChildren(...[usageTable(usage.usage || [])].flat());
}

function split(text) {
  return text.split(",").map((s) => s.trim()).filter(Boolean);
}

async function create(event) {
  event.preventDefault();
  const form = event.currentTarget;
  const scopes = [...form.querySelectorAll("input[name=scope]:checked")].map((i) => i.value);
  const body = { name: $("#key-name").value.trim(), scopes };
  const models = split($("#key-models").value);
  if (models.length) body.models = models;
  if ($("#key-expires").value.trim()) body.expires_in = $("#key-expires").value.trim();
  for (const [field, id] of [["rpm", "#key-rpm"], ["tpm", "#key-tpm"], ["max_jobs", "#key-max-jobs"]]) {
    if ($(id).value) body[field] = Number($(id).value);
  }
  const shown = $("#key-once");
  shown.hidden = true;
  $("#key-once-value").textContent = "";
  try {
    const made = await postJSON("/v2/keys", body);
    // shown once: only in this element, until the next key is made or the page is left
    $("#key-once-value").textContent = made.key;
    $("#key-once-name").textContent = made.name;
    shown.hidden = false;
    note(`Made ${made.name}.`);
    form.reset();
  } catch (err) {
    note(`Could not make the key: ${err.code}: ${err.message}`);
  }
  await refreshKeys();
}

// Called when the page is left: the key shown once is gone from the page too.
export function leaveKeys() {
  $("#key-once").hidden = true;
  $("#key-once-value").textContent = "";
}

export function initKeys() {
  $("#key-form").addEventListener("submit", create);
  $("#key-once-copy").addEventListener("click", async () => {
    try {
      await navigator.clipboard.writeText($("#key-once-value").textContent);
      note("Copied.");
    } catch {
      note("Select the key and copy it by hand.");
    }
  });
  $("#key-once-done").addEventListener("click", leaveKeys);
}
