// Generate tab: POST /v1/generate with "stream": true; text is appended as each event arrives.

import { streamEvents } from "./api.js";
import { $, bindRunStop, fillModels, numberOrUndefined, showError } from "./dom.js";
import { RunStats } from "./runstats.js";

/** "a|b|\n" -> ["a", "b", "\n"]: `|` separates stop strings, `\n` and `\t` are escapes. */
export function parseStops(text) {
  return text.split("|").map((s) => s.replace(/\\n/g, "\n").replace(/\\t/g, "\t")).filter((s) => s.length > 0);
}

export function setupGenerate() {
  const output = $("gen-text");
  const status = $("gen-stats");
  bindRunStop($("gen-form"), $("gen-stop"), async (signal) => {
    const stop = parseStops($("gen-stop-strings").value);
    const body = {
      model: $("gen-model").value || undefined,
      prompt: $("gen-prompt").value,
      temperature: numberOrUndefined($("gen-temperature")),
      top_p: numberOrUndefined($("gen-top-p")),
      max_tokens: numberOrUndefined($("gen-max-tokens")),
      seed: numberOrUndefined($("gen-seed")),
      stop: stop.length ? stop : undefined,
      ignore_eos: $("gen-ignore-eos").checked,
    };
    $("gen-prompt-echo").textContent = body.prompt;
    output.textContent = "";
    status.textContent = "waiting for the first token…";
    const stats = new RunStats();
    let usage = null;
    let finishReason = null;
    try {
      for await (const event of streamEvents("/v1/generate", body, signal)) {
        if (event.text) {
          output.append(event.text);
          stats.textArrived();
        }
        if (event.finish_reason) finishReason = event.finish_reason;
        if (event.usage) usage = event.usage;
      }
    } catch (e) {
      status.textContent = stats.summary({ stopped: e.name === "AbortError" });
      throw e;
    }
    status.textContent = stats.summary({ usage, finishReason });
  }, (e) => showError($("gen-error"), e));
}

export function updateGenerateModels(models) {
  fillModels($("gen-model"), models, "generate");
}
