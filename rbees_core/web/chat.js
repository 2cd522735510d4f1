// The chat page: conversations kept in localStorage, replies streamed token by token from
// POST /v2/tasks + GET /v2/tasks/{id}/events, stopped with POST /v2/tasks/{id}/cancel.

import { ApiError, getJSON, postJSON, readSSE, request } from "./api.js";
import { renderInto } from "./render.js";
import { $, h, load, num, save } from "./util.js";

const KEY = "rbees.chat.v1";
const MAX_CONVERSATIONS = 100;
const DEFAULTS = { model: "", temperature: 0.7, max_tokens: 256, seed: "", system: "",
  markdown: true };

const state = load(KEY, null) || { conversations: [], current: null };
state.settings = { ...DEFAULTS, ...(state.settings || {}) };
let live = null; // the reply being streamed: {reply, controller, stopped, jobId}
const elements = new WeakMap(); // message -> its DOM parts
let saveTimer = null;

function persist(now = false) {
  clearTimeout(saveTimer);
  if (now) save(KEY, state);
  else saveTimer = setTimeout(() => save(KEY, state), 400);
}

function current() {
  return state.conversations.find((c) => c.id === state.current) || null;
}

function newConversation() {
  const conv = { id: `c${Date.now().toString(36)}${Math.random().toString(36).slice(2, 6)}`,
    title: "New conversation", created: Date.now(), messages: [] };
  state.conversations.unshift(conv);
  state.conversations.length = Math.min(state.conversations.length, MAX_CONVERSATIONS);
  state.current = conv.id;
  persist(true);
  return conv;
}

function renderList() {
  const list = $("#conv-list");
  list.replaceChildren(...state.conversations.map((c) => h("li",
    { class: c.id === state.current ? "active" : "" },
    h("button", { type: "button", class: "conv-title", title: c.title,
      onclick: () => select(c.id) }, c.title),
    h("button", { type: "button", class: "ghost conv-delete", title: "Delete",
      "aria-label": `Delete ${c.title}`, onclick: () => remove(c.id) }, "×"))));
}

function select(id) {
  if (live) return;
  state.current = id;
  persist(true);
  renderList();
  renderConversation();
}

function remove(id) {
  if (live && current() && current().id === id) return;
  state.conversations = state.conversations.filter((c) => c.id !== id);
  if (state.current === id) state.current = state.conversations[0]?.id || null;
  persist(true);
  renderList();
  renderConversation();
}

function metaText(m) {
  const meta = m.meta || {};
  const parts = [];
  if (meta.status) parts.push(meta.status);
  if (meta.tokens) parts.push(`${meta.tokens} tokens`);
  if (meta.ttft_ms !== undefined && meta.ttft_ms !== null) parts.push(`first token ${num(meta.ttft_ms, 0)} ms`);
  if (meta.tokens_per_s) parts.push(`${num(meta.tokens_per_s)} tok/s`);
  if (meta.stop_reason) parts.push(`stop: ${meta.stop_reason}`);
  if (meta.where) parts.push(meta.where);
  if (meta.error && meta.error.code !== "CANCELLED") parts.push(`${meta.error.code}: ${meta.error.message}`);
  return parts.join(" · ");
}

function why(m) {
  const out = h("pre", { class: "why" });
  const details = h("details", { class: "why-box" }, h("summary", {}, "why"), out);
  details.addEventListener("toggle", async () => {
    if (!details.open || !m.job_id) return;
    out.textContent = "…";
    try {
      const d = await getJSON(`/v2/tasks/${encodeURIComponent(m.job_id)}/decision`);
      out.textContent = d.explanation;
    } catch (err) {
      out.textContent = `${err.code || "ERROR"}: ${err.message}`;
    }
  });
  return details;
}

function messageView(m) {
  const content = h("div", { class: "content" });
  const meta = h("div", { class: "meta" });
  const who = m.role === "user" ? "You" : m.model || "assistant";
  const view = h("div", { class: `msg ${m.role}`, dataset: m.job_id ? { job: m.job_id } : {} },
    h("div", { class: "who" }, who), content, meta);
  if (m.role === "assistant" && m.job_id) view.append(why(m));
  elements.set(m, { view, content, meta });
  update(m);
  return view;
}

function update(m) {
  const parts = elements.get(m);
  if (!parts) return;
  if (m.role === "user") parts.content.textContent = m.content;
  else renderInto(parts.content, m.content, state.settings.markdown ? "markdown" : "text");
  parts.meta.textContent = m.role === "assistant" ? metaText(m) : "";
  parts.view.classList.toggle("pending", Boolean(m.pending));
  parts.view.classList.toggle("failed", Boolean(m.meta && m.meta.error && m.meta.error.code !== "CANCELLED"));
  if (m.job_id) parts.view.dataset.job = m.job_id;
  if (m.role === "assistant" && m.job_id && !parts.view.querySelector(".why-box")) parts.view.append(why(m));
}

function renderConversation() {
  const box = $("#messages");
  const conv = current();
  if (!conv || !conv.messages.length) {
    box.replaceChildren(h("p", { class: "empty" }, "Pick a model, then say something."));
    return;
  }
  box.replaceChildren(...conv.messages.map(messageView));
  box.scrollTop = box.scrollHeight;
}

function setBusy(busy) {
  $("#send").disabled = busy;
  $("#stop").hidden = !busy;
  $("#stop").disabled = false;
}

function history(conv, reply) {
  const out = [];
  if (state.settings.system.trim()) out.push({ role: "system", content: state.settings.system });
  for (const m of conv.messages) {
    if (m === reply || !m.content) continue;
    out.push({ role: m.role, content: m.content });
  }
  return out;
}

async function send(text) {
  const model = $("#model").value;
  if (live || !text.trim() || !model) return;
  const conv = current() || newConversation();
  conv.messages.push({ role: "user", content: text });
  if (conv.title === "New conversation") conv.title = text.trim().slice(0, 48);
  const reply = { role: "assistant", model, content: "", pending: true,
    meta: { status: "submitting" } };
  conv.messages.push(reply);
  const s = state.settings;
  const body = { model, messages: history(conv, reply), max_tokens: Number(s.max_tokens),
    temperature: Number(s.temperature), priority: "interactive" };
  if (String(s.seed).trim() !== "") body.seed = Number(s.seed);
  persist(true);
  renderList();
  renderConversation();
  live = { reply, controller: new AbortController(), stopped: false, jobId: null };
  setBusy(true);
  try {
    const accepted = await postJSON("/v2/tasks", body);
    reply.job_id = live.jobId = accepted.job_id;
    reply.meta.status = `queued, position ${accepted.queue_position}`;
    update(reply);
    persist(true);
    if (live.stopped) await cancelJob(accepted.job_id);
    else await follow(reply, live);
  } catch (err) {
    if (!(err && err.name === "AbortError") && !live.stopped) {
      reply.meta.status = "failed";
      reply.meta.error = { code: err.code || "ERROR", message: err.message };
    }
  } finally {
    if (live && live.stopped) reply.meta.status = "stopped";
    reply.pending = false;
    live = null;
    setBusy(false);
    update(reply);
    persist(true);
    loadModels(); // where models are loaded may have changed
  }
}

async function follow(reply, run) {
  const path = `/v2/tasks/${encodeURIComponent(reply.job_id)}/events?cancel_on_disconnect=true`;
  const res = await request(path, { signal: run.controller.signal,
    headers: { Accept: "text/event-stream" } });
  let text = "";
  let tokens = 0;
  let ended = false;
  const box = $("#messages");
  await readSSE(res, (batch) => {
    if (run.stopped) return false; // nothing is drawn after Stop
    let terminal = false;
    const meta = reply.meta;
    for (const e of batch) {
      const d = e.data || {};
      if (e.event === "queued") meta.status = `queued, position ${d.queue_position}`;
      else if (e.event === "dispatched") {
        meta.status = "dispatched";
        meta.where = `${d.worker_id} on ${d.pool_id}`;
      } else if (e.event === "started") meta.status = "generating";
      else if (e.event === "token") {
        text += d.t;
        tokens += 1;
      } else if (e.event === "metrics") meta.tokens_per_s = d.tokens_per_s;
      else if (e.event === "end") {
        terminal = true;
        meta.status = "done";
        meta.stop_reason = d.stop_reason;
        meta.ttft_ms = d.ttft_ms;
        if (d.decode_ms > 0) meta.tokens_per_s = (d.tokens_out / d.decode_ms) * 1000;
        tokens = d.tokens_out ?? tokens;
      } else if (e.event === "error") {
        terminal = true;
        meta.status = d.code === "CANCELLED" ? "stopped" : "failed";
        meta.error = { code: d.code, message: d.message };
      }
    }
    const stick = box.scrollHeight - box.scrollTop - box.clientHeight < 40;
    reply.content = text;
    meta.tokens = tokens;
    update(reply);
    if (stick) box.scrollTop = box.scrollHeight;
    persist();
    ended = terminal;
    return !terminal;
  });
  if (!ended && !run.stopped) reply.meta.status = "the stream broke off";
}

async function cancelJob(jobId) {
  try {
    await postJSON(`/v2/tasks/${encodeURIComponent(jobId)}/cancel`);
  } catch (err) {
    if (!(err instanceof ApiError)) throw err;
  }
}

async function stop() {
  if (!live || live.stopped) return;
  live.stopped = true;
  $("#stop").disabled = true;
  live.reply.meta.status = "stopping";
  update(live.reply);
  if (live.jobId) await cancelJob(live.jobId);
  if (live) live.controller.abort();
}

// A reply that was streaming when the page went away: its job was cancelled with the
// stream (cancel_on_disconnect); replay what it produced.
async function resume() {
  for (const conv of state.conversations) {
    for (const m of conv.messages) {
      if (!m.pending) continue;
      m.pending = false;
      if (!m.job_id) {
        m.meta = { ...(m.meta || {}), status: "interrupted" };
        continue;
      }
      const run = { reply: m, controller: new AbortController(), stopped: false };
      follow(m, run).catch(() => {}).finally(() => {
        update(m);
        persist(true);
      });
    }
  }
}

export async function loadModels() {
  const select = $("#model");
  let ids = [];
  let where = {};
  try {
    ids = (await getJSON("/v1/models")).data.map((m) => m.id);
    const catalog = await getJSON("/v2/models");
    where = Object.fromEntries(catalog.models.map((m) => [m.id, m]));
    // embedding models do not chat
    ids = ids.filter((id) => !(where[id] && where[id].kind === "embedding"));
  } catch (err) {
    if (!ids.length) return;
  }
  const has = (id, key) => where[id] && where[id][key] && where[id][key].length > 0;
  const rank = (id) => (has(id, "loaded") ? 0 : has(id, "downloaded") ? 1 : 2);
  ids.sort((a, b) => rank(a) - rank(b) || a.localeCompare(b));
  const want = ids.includes(state.settings.model) ? state.settings.model : ids[0] || "";
  select.replaceChildren(...ids.map((id) => h("option", { value: id, selected: id === want },
    id + (has(id, "loaded") ? " · loaded" : has(id, "downloaded") ? " · downloaded" : ""))));
  select.value = want;
  state.settings.model = want;
}

function bindSetting(id, key, parse = (v) => v) {
  const input = $(`#${id}`);
  if (input.type === "checkbox") input.checked = Boolean(state.settings[key]);
  else input.value = state.settings[key];
  input.addEventListener("change", () => {
    state.settings[key] = input.type === "checkbox" ? input.checked : parse(input.value);
    persist(true);
    if (key === "markdown") renderConversation();
  });
}

export function initChat() {
  bindSetting("model", "model");
  bindSetting("temperature", "temperature", Number);
  bindSetting("max-tokens", "max_tokens", Number);
  bindSetting("seed", "seed");
  bindSetting("system", "system");
  bindSetting("markdown", "markdown");
  const prompt = $("#prompt");
  $("#composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = prompt.value;
    if (!text.trim() || live) return;
    prompt.value = "";
    send(text);
  });
  prompt.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("#composer").requestSubmit();
    }
  });
  $("#stop").addEventListener("click", stop);
  $("#new-conv").addEventListener("click", () => {
    if (live) return;
    newConversation();
    renderList();
    renderConversation();
    prompt.focus();
  });
  renderList();
  renderConversation();
  resume();
}
