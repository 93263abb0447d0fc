// Structured tab: a JSON schema in -> /v1/chat/completions with response_format json_schema; the output is
// parsed and checked against the schema here (a small checker for the keywords below) and shown with the result.

import { postJson } from "./api.js";
import { $, bindRunStop, el, fillModels, numberOrUndefined, showError } from "./dom.js";

/** Where `value` breaks `schema` (type, enum, const, properties, required, additionalProperties: false,
 * items, min/maxItems, min/maxLength, minimum/maximum), or [] when it matches. */
export function schemaErrors(schema, value, path = "$") {
  const errors = [];
  const type = Array.isArray(value) ? "array" : value === null ? "null" : typeof value;
  const types = schema.type === undefined ? null : [].concat(schema.type);
  const isInteger = type === "number" && Number.isInteger(value);
  if (types && !types.some((t) => t === type || (t === "integer" && isInteger) || (t === "number" && type === "number"))) {
    return [`${path}: expected ${types.join(" or ")}, got ${type}`];
  }
  if (schema.enum && !schema.enum.some((v) => JSON.stringify(v) === JSON.stringify(value))) errors.push(`${path}: not in enum`);
  if ("const" in schema && JSON.stringify(schema.const) !== JSON.stringify(value)) errors.push(`${path}: not the const`);
  if (type === "string") {
    if (schema.minLength !== undefined && [...value].length < schema.minLength) errors.push(`${path}: shorter than minLength`);
    if (schema.maxLength !== undefined && [...value].length > schema.maxLength) errors.push(`${path}: longer than maxLength`);
  }
  if (type === "number") {
    if (schema.minimum !== undefined && value < schema.minimum) errors.push(`${path}: below minimum`);
    if (schema.maximum !== undefined && value > schema.maximum) errors.push(`${path}: above maximum`);
  }
  if (type === "array") {
    if (schema.minItems !== undefined && value.length < schema.minItems) errors.push(`${path}: fewer than minItems`);
    if (schema.maxItems !== undefined && value.length > schema.maxItems) errors.push(`${path}: more than maxItems`);
    if (schema.items) value.forEach((v, i) => errors.push(...schemaErrors(schema.items, v, `${path}[${i}]`)));
  }
  if (type === "object") {
    const props = schema.properties || {};
    for (const key of schema.required || []) if (!(key in value)) errors.push(`${path}: missing ${key}`);
    for (const [key, v] of Object.entries(value)) {
      if (key in props) errors.push(...schemaErrors(props[key], v, `${path}.${key}`));
      else if (schema.additionalProperties === false) errors.push(`${path}: unexpected ${key}`);
    }
  }
  return errors;
}

export function setupStructured() {
  bindRunStop($("st-form"), null, async (signal) => {
    let schema;
    try {
      schema = JSON.parse($("st-schema").value);
    } catch (e) {
      throw new Error(`the schema is not JSON: ${e.message}`);
    }
    $("st-stats").textContent = "generating…";
    $("st-output").textContent = "";
    $("st-check").textContent = "";
    const started = performance.now();
    const out = await postJson("/v1/chat/completions", {
      model: $("st-model").value || undefined,
      messages: [{ role: "user", content: $("st-prompt").value }],
      max_tokens: numberOrUndefined($("st-max-tokens")),
      temperature: 0.7,
      response_format: { type: "json_schema", json_schema: { name: "playground", schema } },
    }, signal);
    const choice = out.choices[0];
    $("st-output").textContent = choice.message.content;
    let verdict;
    try {
      const errors = schemaErrors(schema, JSON.parse(choice.message.content));
      verdict = errors.length ? `does not match the schema: ${errors.slice(0, 3).join("; ")}` : "valid JSON, matches the schema";
    } catch (e) {
      verdict = `not valid JSON (${choice.finish_reason === "length" ? "cut by max tokens" : e.message})`;
    }
    $("st-check").replaceChildren(el("strong", { text: verdict }));
    $("st-stats").textContent = `${out.usage.completion_tokens} tokens · ${Math.round(performance.now() - started)} ms · finish: ${choice.finish_reason}`;
  }, (e) => {
    showError($("st-error"), e);
    if (e) $("st-stats").textContent = "";
  });
}

export function updateStructuredModels(models) {
  const count = fillModels($("st-model"), models, "generate");
  $("st-run").disabled = count === 0;
}
