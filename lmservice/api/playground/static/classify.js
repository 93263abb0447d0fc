// Classify tab: one text per line -> POST /v1/classify; per line the label and a bar per class probability.

import { postJson } from "./api.js";
import { $, bindRunStop, el, fillModels, showError } from "./dom.js";

function percent(p) {
  return `${(100 * p).toFixed(1)}%`;
}

function resultCard(text, result) {
  const bars = Object.entries(result.scores).map(([label, p]) => {
    const fill = el("span", { class: "fill" });
    fill.style.width = percent(p); // CSSOM, not a style attribute: allowed by the page's CSP
    return el("li", { class: label === result.label ? "bar-row best" : "bar-row" },
      el("span", { class: "bar-label", text: label }),
      el("span", { class: "bar", "aria-hidden": "true" }, fill),
      el("span", { class: "bar-value", text: percent(p) }));
  });
  return el("li", { class: "result" },
    el("p", { class: "result-text", text }),
    el("p", { class: "result-label" }, "label: ", el("strong", { text: result.label })),
    el("ul", { class: "bars", "aria-label": `probabilities for: ${text}` }, ...bars));
}

export function setupClassify() {
  const results = $("cls-results");
  bindRunStop($("cls-form"), null, async (signal) => {
    const texts = $("cls-text").value.split("\n").map((t) => t.trim()).filter((t) => t);
    if (!texts.length) throw new Error("type at least one line of text");
    $("cls-stats").textContent = "classifying…";
    const started = performance.now();
    const out = await postJson("/v1/classify", { model: $("cls-model").value || undefined, text: texts }, signal);
    results.replaceChildren(...out.results.map((r, i) => resultCard(texts[i], r)));
    $("cls-stats").textContent =
      `${out.results.length} texts · ${out.usage.prompt_tokens} tokens · ${Math.round(performance.now() - started)} ms · model ${out.model}`;
  }, (e) => {
    showError($("cls-error"), e);
    if (e) $("cls-stats").textContent = "";
  });
}

export function updateClassifyModels(models) {
  const count = fillModels($("cls-model"), models, "classify");
  $("cls-none").hidden = count > 0;
  $("cls-run").disabled = count === 0;
}
