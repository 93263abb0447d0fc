// Translate tab: the language pairs of the loaded translate models; one sentence per line, streamed (with beam
// search, the default, each translation arrives whole when its search ends).

import { postJson, streamEvents } from "./api.js";
import { $, bindRunStop, el, numberOrUndefined, showError } from "./dom.js";

let pairsLoaded = null; // the promise of the current model list's pairs

/**
 * A translate model's {source, target}. /v1/models does not list languages (yet), so when a model's entry
 * has none the page asks the model itself: a one-token translation answers with its card's languages.
 */
async function languagesOf(model) {
  if (model.languages) return model.languages;
  const out = await postJson("/v1/translate", { model: model.id, text: "a", max_tokens: 1 });
  return { source: out.source, target: out.target };
}

async function loadPairs(models) {
  const select = $("tr-pair");
  const translators = models.filter((m) => m.tasks.includes("translate"));
  $("tr-none").hidden = translators.length > 0;
  $("tr-run").disabled = translators.length === 0;
  const pairs = await Promise.all(translators.map(async (m) => ({ model: m.id, ...(await languagesOf(m)) })));
  select.replaceChildren(...pairs.map((p) => el("option", {
    value: p.model, "data-source": p.source, "data-target": p.target,
    text: `${p.source} → ${p.target} (${p.model})`,
  })));
}

export function setupTranslate() {
  bindRunStop($("tr-form"), $("tr-stop"), async (signal) => {
    const texts = $("tr-text").value.split("\n").map((t) => t.trim()).filter((t) => t);
    if (!texts.length) throw new Error("type at least one sentence");
    const option = $("tr-pair").selectedOptions[0];
    if (!option) throw new Error("no translation model is loaded");
    const lines = texts.map(() => el("li", { class: "translation" }));
    $("tr-output").replaceChildren(...lines);
    $("tr-stats").textContent = "translating…";
    const started = performance.now();
    const body = {
      model: option.value, source: option.dataset.source, target: option.dataset.target, text: texts,
      max_tokens: numberOrUndefined($("tr-max-tokens")), num_beams: numberOrUndefined($("tr-beams")),
    };
    let usage = null;
    try {
      for await (const event of streamEvents("/v1/translate", body, signal)) {
        if (event.text && event.index !== undefined) lines[event.index].append(event.text);
        if (event.usage) usage = event.usage;
      }
    } catch (e) {
      $("tr-stats").textContent = e.name === "AbortError" ? "stopped" : "";
      throw e;
    } finally {
      for (const line of lines) line.textContent = line.textContent.trim();
    }
    const beams = body.num_beams === undefined ? "" : ` · ${body.num_beams} beam${body.num_beams === 1 ? "" : "s"}`;
    $("tr-stats").textContent = `${texts.length} sentences · ${usage ? usage.completion_tokens : "?"} tokens${beams} · `
      + `${Math.round(performance.now() - started)} ms`;
    $("tr-output").lang = option.dataset.target;
  }, (e) => showError($("tr-error"), e));
}

/** Called when the Translate tab is shown: the pairs are looked up once per model list. */
export function showTranslate(models) {
  if (!pairsLoaded) {
    pairsLoaded = loadPairs(models).catch((e) => {
      pairsLoaded = null;
      showError($("tr-error"), e);
    });
  }
}

export function updateTranslateModels() {
  pairsLoaded = null;
}
