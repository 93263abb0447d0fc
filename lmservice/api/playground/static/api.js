// The page's only way to the server: the public HTTP API, with the tab's API key when it has one.

const KEY_STORAGE = "lmservice.apiKey"; // sessionStorage: the key lives as long as this tab, never on disk

export const apiKey = {
  get: () => sessionStorage.getItem(KEY_STORAGE),
  set: (key) => sessionStorage.setItem(KEY_STORAGE, key),
  clear: () => sessionStorage.removeItem(KEY_STORAGE),
};

/** A failure the server reported in its one error shape ({"error": {"message", ...}}), or a network failure. */
export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function headers(json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  const key = apiKey.get();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

async function send(method, path, body, signal) {
  let response;
  try {
    response = await fetch(path, {
      method, signal, headers: headers(body !== undefined), body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError(0, `cannot reach the server (${e.message})`);
  }
  if (!response.ok) throw await errorOf(response);
  return response;
}

async function errorOf(response) {
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) message = body.error.message;
  } catch {
    // not JSON: keep the status line
  }
  return new ApiError(response.status, message);
}

export async function getJson(path, signal) {
  return (await send("GET", path, undefined, signal)).json();
}

export async function getText(path, signal) {
  return (await send("GET", path, undefined, signal)).text();
}

export async function postJson(path, body, signal) {
  return (await send("POST", path, body, signal)).json();
}

/**
 * POST `body` with "stream": true and yield each SSE event's JSON as it arrives, until `data: [DONE]`.
 * An error event ({"error": ...}, sent when a stream fails after it started) is thrown as an ApiError.
 * Aborting `signal` closes the connection, which is what makes the server abort the request and free its
 * KV blocks (docs/api.md, Streaming).
 */
export async function* streamEvents(path, body, signal) {
  const response = await send("POST", path, { ...body, stream: true }, signal);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const frame = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = frame.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("");
        if (data === "[DONE]") return;
        if (!data) continue;
        const event = JSON.parse(data);
        if (event.error) throw new ApiError(0, event.error.message);
        yield event;
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

/** The models the server lists (GET /v1/models), each {id, parent, tasks, ...}. */
export async function listModels() {
  return (await getJson("/v1/models")).data;
}
