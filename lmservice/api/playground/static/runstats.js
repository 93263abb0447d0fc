// Timing of one streamed run as the page sees it: time to first text, and decode speed.

export class RunStats {
  constructor() {
    this.startedAt = performance.now();
    this.firstAt = null; // first event that carried text
    this.lastAt = null;
    this.numUpdates = 0;
  }

  /** Call for every event that added text. */
  textArrived() {
    const now = performance.now();
    if (this.firstAt === null) this.firstAt = now;
    this.lastAt = now;
    this.numUpdates += 1;
  }

  /**
   * One line for the status area. `usage` is the server's (absent when the run was stopped).
   * tok/s counts the tokens after the first over the time after the first, so it measures decoding and
   * does not mix in the queueing and prefill that TTFT already shows.
   */
  summary({ usage, finishReason, stopped } = {}) {
    const parts = [];
    if (stopped) parts.push("stopped");
    parts.push(this.firstAt === null ? "no text" : `TTFT ${Math.round(this.firstAt - this.startedAt)} ms`);
    const tokens = usage ? usage.completion_tokens : null;
    if (tokens !== null) parts.push(`${tokens} tokens`);
    const decodeS = this.firstAt === null ? 0 : (this.lastAt - this.firstAt) / 1000;
    if (tokens !== null && tokens > 1 && decodeS > 0) parts.push(`${((tokens - 1) / decodeS).toFixed(1)} tok/s`);
    parts.push(`${this.numUpdates} updates`);
    parts.push(`${((performance.now() - this.startedAt) / 1000).toFixed(2)} s`);
    if (finishReason) parts.push(`finish: ${finishReason}`);
    return parts.join(" · ");
  }
}
