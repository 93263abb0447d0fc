// Small DOM helpers shared by the tabs.

export const $ = (id) => document.getElementById(id);

/** An element with attributes (class, text, dataset keys as data-*) and children. */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "text") node.textContent = value;
    else if (name === "class") node.className = value;
    else node.setAttribute(name, value === true ? "" : value);
  }
  node.append(...children);
  return node;
}

/** Fill a <select> with the models that can do `task`, keeping the current choice when it is still there. */
export function fillModels(select, models, task) {
  const current = select.value;
  const names = models.filter((m) => m.tasks.includes(task)).map((m) => m.id);
  select.replaceChildren(...names.map((id) => el("option", { value: id, text: id })));
  if (names.includes(current)) select.value = current;
  return names.length;
}

/** Show a failure in a panel's alert line; `null` clears it. */
export function showError(node, error) {
  node.textContent = error ? (error.message || String(error)) : "";
  node.hidden = !error;
}

/** A number field's value, or undefined when it is empty (so the server's default applies). */
export function numberOrUndefined(input) {
  return input.value.trim() === "" ? undefined : Number(input.value);
}

/** A form's submit runs `run(signal)` once at a time; the Stop button (when there is one) aborts it. */
export function bindRunStop(form, stopButton, run, onError) {
  const runButton = form.querySelector("button[type=submit]");
  let controller = null;
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (controller) return;
    controller = new AbortController();
    runButton.disabled = true;
    if (stopButton) stopButton.disabled = false;
    onError(null);
    try {
      await run(controller.signal);
    } catch (e) {
      if (e.name !== "AbortError") onError(e);
    } finally {
      controller = null;
      runButton.disabled = false;
      if (stopButton) stopButton.disabled = true;
    }
  });
  if (stopButton) stopButton.addEventListener("click", () => controller && controller.abort());
}
