// Chat tab: a conversation over POST /v1/chat/completions, streamed. The server renders the messages with
// the model's chat template (or its plain "role: content" one, docs/api.md); the page keeps the history.

import { streamEvents } from "./api.js";
import { $, bindRunStop, el, fillModels, numberOrUndefined, showError } from "./dom.js";
import { RunStats } from "./runstats.js";

// With the plain template the model would go on to write the user's next turn: end the reply there.
const STOP_AT_NEXT_TURN = ["\nuser:"];

export function setupChat() {
  const transcript = $("chat-transcript");
  const status = $("chat-stats");
  let messages = [];

  function bubble(role, text) {
    const content = el("div", { class: "content", text });
    transcript.append(el("li", { class: `msg ${role}` }, el("span", { class: "role", text: role }), content));
    transcript.scrollTop = transcript.scrollHeight;
    return content;
  }

  bindRunStop($("chat-form"), $("chat-stop"), async (signal) => {
    const input = $("chat-input");
    const text = input.value.trim();
    if (!text) return;
    const system = $("chat-system").value.trim();
    if (messages.length === 0 && system) messages.push({ role: "system", content: system });
    messages.push({ role: "user", content: text });
    bubble("user", text);
    input.value = "";
    const reply = bubble("assistant", "");
    const body = {
      model: $("chat-model").value || undefined,
      messages,
      temperature: numberOrUndefined($("chat-temperature")),
      max_tokens: numberOrUndefined($("chat-max-tokens")),
      stop: STOP_AT_NEXT_TURN,
      stream_options: { include_usage: true },
    };
    status.textContent = "waiting for the first token…";
    const stats = new RunStats();
    let usage = null;
    let finishReason = null;
    try {
      for await (const event of streamEvents("/v1/chat/completions", body, signal)) {
        for (const choice of event.choices) {
          if (choice.delta && choice.delta.content) {
            reply.append(choice.delta.content);
            stats.textArrived();
          }
          if (choice.finish_reason) finishReason = choice.finish_reason;
        }
        if (event.usage) usage = event.usage;
        transcript.scrollTop = transcript.scrollHeight;
      }
    } catch (e) {
      status.textContent = stats.summary({ stopped: e.name === "AbortError" });
      throw e;
    } finally {
      // What was shown is what the conversation continues from, also after Stop.
      messages.push({ role: "assistant", content: reply.textContent });
    }
    status.textContent = stats.summary({ usage, finishReason });
  }, (e) => showError($("chat-error"), e));

  $("chat-clear").addEventListener("click", () => {
    messages = [];
    transcript.replaceChildren();
    status.textContent = "";
    showError($("chat-error"), null);
    $("chat-input").focus();
  });
  // Enter sends, Shift+Enter is a new line (the usual chat convention).
  $("chat-input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("chat-form").requestSubmit();
    }
  });
}

export function updateChatModels(models) {
  fillModels($("chat-model"), models, "generate");
}
