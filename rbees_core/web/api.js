// Talking to rbees-orcd: the bearer token, JSON calls, error envelopes and SSE streams.
//
// Every call goes to this page's own origin. A 401 opens the token dialog once (calls that
// meet a 401 meanwhile wait for the same answer) and the call is retried with the token.

import { $ } from "./util.js";

const TOKEN_KEY = "rbees.token";
let asking = null;
let memoryToken = "";
const listeners = new Set();

export class ApiError extends Error {
  constructor(status, code, message, details = {}) {
    super(message);
    this.status = status;
    this.code = code;
    this.details = details;
  }
}

// The key or token is kept in sessionStorage (this tab, until it closes), never in
// localStorage, where it would outlive the session on a shared machine (issue 25); one an
// older version left in localStorage is removed.
try {
  localStorage.removeItem(TOKEN_KEY);
} catch {
  // storage disabled
}

export function token() {
  try {
    return sessionStorage.getItem(TOKEN_KEY) || "";
  } catch {
    return "";
  }
}

export function setToken(value) {
  try {
    if (value) sessionStorage.setItem(TOKEN_KEY, value);
    else sessionStorage.removeItem(TOKEN_KEY);
  } catch {
    // storage disabled: the token lives for this page only
  }
  memoryToken = value || "";
}

function currentToken() {
  return token() || memoryToken;
}

// Connection state for the header: "ok", "auth", "down".
export function onConnection(fn) {
  listeners.add(fn);
}

function connection(state, detail = "") {
  for (const fn of listeners) fn(state, detail);
}

// Opens the token dialog; resolves with the token given, or null when the user closes a
// dialog they opened themselves (optional: true). A 401 cannot be dismissed.
export function askToken(why, { optional = false } = {}) {
  if (asking) return asking;
  const dialog = $("#token-dialog");
  const form = $("#token-form");
  const input = $("#token-input");
  $("#token-why").textContent = why ||
    "rbees-orcd asks for an API key (rbees keys create) or its token. " +
    "It is kept in this tab until it closes.";
  input.value = "";
  asking = new Promise((resolve) => {
    const done = (value) => {
      form.removeEventListener("submit", submit);
      $("#token-forget").removeEventListener("click", forget);
      dialog.removeEventListener("cancel", cancel);
      if (dialog.open) dialog.close();
      asking = null;
      resolve(value);
    };
    const submit = (event) => {
      event.preventDefault();
      const value = input.value.trim();
      if (!value) return;
      setToken(value);
      done(value);
    };
    const forget = () => {
      setToken("");
      input.value = "";
      if (optional) done(null);
    };
    const cancel = (event) => {
      event.preventDefault(); // without a token the API is unusable
      if (optional) done(null);
    };
    form.addEventListener("submit", submit);
    $("#token-forget").addEventListener("click", forget);
    dialog.addEventListener("cancel", cancel);
    if (!dialog.open) dialog.showModal();
    input.focus();
  });
  return asking;
}

async function errorOf(res) {
  let body = null;
  try {
    body = await res.json();
  } catch {
    // not JSON: the status says enough
  }
  const err = body && typeof body.error === "object" && body.error ? body.error : {};
  const code = typeof err.code === "string" ? err.code : `HTTP_${res.status}`;
  const message = typeof err.message === "string" ? err.message : res.statusText || code;
  return new ApiError(res.status, code.toUpperCase(), message, err.details || {});
}

// fetch() with the token; answers the Response of a 2xx, throws ApiError otherwise.
// A 401 asks for the token (again, if the one sent was refused) and retries.
export async function request(path, options = {}) {
  for (;;) {
    const headers = new Headers(options.headers || {});
    const tok = currentToken();
    if (tok) headers.set("Authorization", `Bearer ${tok}`);
    let res;
    try {
      res = await fetch(path, { ...options, headers });
    } catch (exc) {
      if (exc && exc.name === "AbortError") throw exc;
      connection("down", String(exc && exc.message));
      throw new ApiError(0, "UNREACHABLE", "rbees-orcd does not answer");
    }
    if (res.status === 401) {
      connection("auth");
      await askToken(tok ? "That token was refused. Enter the right one." : undefined);
      continue;
    }
    if (res.status === 403) connection("ok"); // a known credential without the scope
    if (!res.ok) throw await errorOf(res);
    connection("ok");
    return res;
  }
}

export async function getJSON(path, options = {}) {
  return (await request(path, options)).json();
}

export async function postJSON(path, body, options = {}) {
  const res = await request(path, {
    ...options,
    method: "POST",
    headers: { "Content-Type": "application/json", ...(options.headers || {}) },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await res.text();
  return text ? JSON.parse(text) : {};
}

function parseFrame(frame) {
  const out = { id: null, event: "message", data: "" };
  const data = [];
  for (const line of frame.split("\n")) {
    if (!line || line.startsWith(":")) continue;
    const i = line.indexOf(":");
    const field = i < 0 ? line : line.slice(0, i);
    let value = i < 0 ? "" : line.slice(i + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "id") out.id = Number(value);
    else if (field === "event") out.event = value;
    else if (field === "data") data.push(value);
  }
  out.data = data.join("\n");
  try {
    out.data = out.data ? JSON.parse(out.data) : {};
  } catch {
    // keep the raw text
  }
  return out;
}

// Reads an SSE response; calls onBatch with the events of each chunk that arrives, so a
// caller redraws once per chunk, not once per token.
export async function readSSE(res, onBatch) {
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value.replace(/\r\n?/g, "\n");
    const batch = [];
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const frame = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      if (frame.trim()) batch.push(parseFrame(frame));
    }
    if (batch.length && onBatch(batch) === false) {
      await reader.cancel();
      break;
    }
  }
}

// Prometheus text -> [{name, labels, value}]
export function parseMetrics(text) {
  const out = [];
  const re = /^([A-Za-z_:][\w:]*)(?:\{([^}]*)\})?\s+(\S+)/;
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const m = re.exec(line);
    if (!m) continue;
    const labels = {};
    for (const part of (m[2] || "").matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) labels[part[1]] = part[2];
    out.push({ name: m[1], labels, value: Number(m[3]) });
  }
  return out;
}
