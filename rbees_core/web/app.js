// rbees web UI: pages by URL hash (#/chat, #/dashboard, #/models, #/batches, #/keys) and the
// poll loop.

import { askToken, onConnection, token } from "./api.js";
import { refreshBatches } from "./batches.js";
import { initChat, loadModels } from "./chat.js";
import { refreshDashboard, sampleMetrics } from "./dashboard.js";
import { initKeys, leaveKeys, refreshKeys } from "./keys.js";
import { initModels, refreshModels } from "./models.js";
import { $ } from "./util.js";

const PAGES = ["chat", "dashboard", "models", "batches", "keys"];
const POLL_MS = 1500;
let page = "chat";
let polling = false;

function route() {
  const want = (location.hash.match(/^#\/(\w+)/) || [])[1];
  if (page === "keys" && want !== "keys") leaveKeys(); // a key shown once goes with the page
  page = PAGES.includes(want) ? want : "chat";
  for (const name of PAGES) $(`#page-${name}`).hidden = name !== page;
  for (const a of document.querySelectorAll("nav a")) {
    a.classList.toggle("active", a.dataset.page === page);
    if (a.dataset.page === page) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  document.title = `rbees · ${page}`;
  if (page === "chat") loadModels();
  tick();
}

async function tick() {
  if (polling) return;
  polling = true;
  try {
    await sampleMetrics();
    if (page === "dashboard") await refreshDashboard();
    else if (page === "models") await refreshModels();
    else if (page === "batches") await refreshBatches();
    else if (page === "keys") await refreshKeys();
  } catch (err) {
    // shown by the connection badge; the next tick tries again
  } finally {
    polling = false;
  }
}

function connection(state, detail) {
  const el = $("#conn");
  el.dataset.state = state;
  el.textContent = { ok: "connected", auth: "token needed", down: "unreachable" }[state] || state;
  el.title = detail || "";
}

function start() {
  onConnection(connection);
  $("#token-button").addEventListener("click", () => {
    askToken(token() ? "Replace or forget the token kept in this browser."
      : "No token is kept in this browser.", { optional: true }).then(() => tick());
  });
  initChat();
  initModels();
  initKeys();
  window.addEventListener("hashchange", route);
  route();
  setInterval(tick, POLL_MS);
  document.body.dataset.ready = "1";
}

start();
