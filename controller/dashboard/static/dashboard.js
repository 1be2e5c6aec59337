// The dashboard's own script: the plugin filter, the live stream of a plugin's page, the
// token (kept in this tab's sessionStorage) and the swap actions. No library.
"use strict";

const TOKEN_KEY = "blackhole.dashboard.token";

function token() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

function setupToken() {
  const form = document.getElementById("token-form");
  const field = document.getElementById("token");
  if (!form || !field) return;
  field.value = token();
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    if (field.value) sessionStorage.setItem(TOKEN_KEY, field.value.trim());
    else sessionStorage.removeItem(TOKEN_KEY);
    field.setAttribute("aria-invalid", "false");
  });
}

function setupFilter() {
  const field = document.querySelector("[data-filter]");
  const table = document.getElementById(field ? field.dataset.filter : "");
  if (!field || !table) return;
  field.addEventListener("input", () => {
    const words = field.value.toLowerCase().split(/\s+/).filter(Boolean);
    for (const row of table.tBodies[0].rows) {
      const text = row.textContent.toLowerCase();
      row.hidden = !words.every((w) => text.includes(w));
    }
  });
}

function applyActions(allowed) {
  for (const button of document.querySelectorAll("[data-action]")) {
    const on = Boolean(allowed[button.dataset.action]);
    button.disabled = !on;
    button.title = on ? "" : "does not apply to this plugin now";
  }
}

function setupLive() {
  const root = document.querySelector("[data-live]");
  if (!root || !window.EventSource) return;
  const state = document.getElementById("stream-state");
  const stream = new EventSource(root.dataset.live);
  stream.addEventListener("open", () => { state.textContent = "live"; });
  stream.addEventListener("error", () => { state.textContent = "reconnecting…"; });
  stream.addEventListener("gone", () => {
    state.textContent = "the plugin is gone";
    stream.close();
  });
  stream.addEventListener("sections", (event) => {
    const message = JSON.parse(event.data);
    for (const [id, html] of Object.entries(message.sections)) {
      const element = document.getElementById(id);
      if (element) element.innerHTML = html;  // rendered and escaped by the server
    }
    applyActions(message.actions);
    state.textContent = "live";
  });
}

async function act(plugin, action, outcome) {
  const headers = {};
  if (token()) headers.Authorization = "Bearer " + token();
  outcome.className = "pending";
  outcome.textContent = `Asking to ${action}…`;
  let answer = await fetch(
    `/api/plugins/${encodeURIComponent(plugin)}/swap/${action}`,
    { method: "POST", headers, credentials: "omit" },
  );
  let body = await answer.json();
  if (!answer.ok) {
    outcome.className = "refused";
    outcome.textContent = `Refused (${answer.status}): ${body.error}`;
    if (answer.status === 401 || answer.status === 403) {
      document.getElementById("token").setAttribute("aria-invalid", "true");
    }
    return;
  }
  const id = body.request;
  outcome.textContent = `Requested ${action} (request ${id}); waiting for the controller…`;
  for (;;) {
    answer = await fetch(`/api/requests/${id}?wait=25`);
    body = await answer.json();
    if (!answer.ok) {
      outcome.className = "refused";
      outcome.textContent = `Request ${id}: ${body.error}`;
      return;
    }
    if (body.outcome && body.outcome !== "Pending") break;
  }
  outcome.className = body.outcome === "Done" ? "done" : "refused";
  outcome.textContent = `${action}: ${body.outcome}` + (body.message ? ` — ${body.message}` : "");
}

function setupActions() {
  const root = document.querySelector("[data-plugin]");
  const outcome = document.getElementById("outcome");
  if (!root || !outcome) return;
  for (const button of document.querySelectorAll("[data-action]")) {
    button.addEventListener("click", () => {
      const action = button.dataset.action;
      const plugin = root.dataset.plugin;
      if (!window.confirm(`${action[0].toUpperCase() + action.slice(1)} the swap of ${plugin}?`)) {
        outcome.className = "";
        outcome.textContent = `${action}: not asked.`;
        return;
      }
      act(plugin, action, outcome).catch((error) => {
        outcome.className = "refused";
        outcome.textContent = `${action}: ${error}`;
      });
    });
  }
}

// Ages as bhctl get shows them (45s, 3m, 2h, 1d), kept current here: the server sends a
// part of the page again only when its data changes.
function age(since) {
  const seconds = Math.max(0, Math.floor((Date.now() - Date.parse(since)) / 1000));
  for (const [unit, size] of [["d", 86400], ["h", 3600], ["m", 60]]) {
    if (seconds >= size) return Math.floor(seconds / size) + unit;
  }
  return seconds + "s";
}

function setupAges() {
  setInterval(() => {
    for (const element of document.querySelectorAll("time[datetime]")) {
      element.textContent = age(element.getAttribute("datetime"));
    }
  }, 1000);
}

setupToken();
setupAges();
setupFilter();
setupLive();
setupActions();
