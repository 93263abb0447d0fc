// The playground's entry point: the API-key gate, the tabs, and the model list every tab draws from.

import { ApiError, apiKey, listModels } from "./api.js";
import { setupChat, updateChatModels } from "./chat.js";
import { setupClassify, updateClassifyModels } from "./classify.js";
import { setupDashboard } from "./dashboard.js";
import { $, showError } from "./dom.js";
import { setupGenerate, updateGenerateModels } from "./generate.js";
import { setupStructured, updateStructuredModels } from "./structured.js";
import { setupTranslate, showTranslate, updateTranslateModels } from "./translate.js";

let models = [];
let dashboard = null;

// ---------------------------------------------------------------- tabs (WAI-ARIA tabs, automatic activation)

function tabs() {
  return [...document.querySelectorAll("[role=tab]")];
}

function selectTab(tab, { focus = false } = {}) {
  for (const other of tabs()) {
    const selected = other === tab;
    other.setAttribute("aria-selected", String(selected));
    other.tabIndex = selected ? 0 : -1;
    $(other.getAttribute("aria-controls")).hidden = !selected;
  }
  if (focus) tab.focus();
  history.replaceState(null, "", `#${tab.dataset.tab}`);
  if (tab.dataset.tab === "translate") showTranslate(models);
}

function setupTabs() {
  const list = tabs();
  for (const tab of list) {
    tab.addEventListener("click", () => selectTab(tab));
    tab.addEventListener("keydown", (event) => {
      const i = list.indexOf(tab);
      const next = { ArrowRight: i + 1, ArrowLeft: i - 1, Home: 0, End: list.length - 1 }[event.key];
      if (next === undefined) return;
      event.preventDefault();
      selectTab(list[(next + list.length) % list.length], { focus: true });
    });
  }
}

function initialTab() {
  const wanted = location.hash.slice(1);
  return tabs().find((t) => t.dataset.tab === wanted) || tabs()[0];
}

// ---------------------------------------------------------------- key gate and models

function showApp(visible) {
  $("app").hidden = !visible;
  $("key-gate").hidden = visible;
  $("forget-key").hidden = !apiKey.get();
}

/** Ask for the model list; a 401 means the server wants a key (or another one): show the gate. */
async function connect() {
  showError($("boot-error"), null);
  try {
    models = await listModels();
  } catch (e) {
    if (e instanceof ApiError && e.status === 401) {
      // The server's own words: "missing API key ..." or "invalid API key".
      showError($("key-error"), apiKey.get() ? e : null);
      apiKey.clear();
      showApp(false);
      $("key-input").focus();
      return;
    }
    showError($("boot-error"), new Error(`${e.message} — retrying…`));
    setTimeout(connect, 2000);
    return;
  }
  showError($("key-error"), null);
  updateGenerateModels(models);
  updateChatModels(models);
  updateClassifyModels(models);
  updateTranslateModels(models);
  updateStructuredModels(models);
  $("server-info").textContent = `${models.length} models: ${models.map((m) => m.id).join(", ")}`;
  showApp(true);
  selectTab(initialTab());
  dashboard.start(); // from now on, so the charts already hold what happened while other tabs were used
}

function setupKeyGate() {
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("key-input").value.trim();
    if (!key) return;
    apiKey.set(key);
    $("key-input").value = "";
    connect();
  });
  $("forget-key").addEventListener("click", () => {
    apiKey.clear();
    location.reload();
  });
}

setupTabs();
setupKeyGate();
setupGenerate();
setupChat();
setupClassify();
setupTranslate();
setupStructured();
dashboard = setupDashboard();
connect();
