// Dashboard tab: /metrics read every second while the page is visible, the last five minutes drawn as small
// live charts. Counters become rates between two reads; gauges are drawn as read.

import { getText } from "./api.js";
import { drawLines } from "./chart.js";
import { $, el } from "./dom.js";
import { parseMetrics, total, totalBy } from "./prometheus.js";

const INTERVAL_MS = 1000;
const WINDOW_MS = 5 * 60 * 1000;
const NUM_COLORS = 6;

/** One read of /metrics, reduced to what the charts need. */
function snapshot(text) {
  const m = parseMetrics(text);
  return {
    t: Date.now(),
    // NOTE: lmservice_generation_tokens_total grows only when a request ends; the latency histograms count
    // every token as it is streamed (its first in TTFT, each later one in the inter-token latency), so
    // their counts give a live rate. batch_tokens sums the tokens of every engine step, prompts included.
    generatedTokens: total(m, "lmservice_time_to_first_token_seconds_count")
      + total(m, "lmservice_inter_token_latency_seconds_count"),
    stepTokens: total(m, "lmservice_batch_tokens_sum"),
    running: total(m, "lmservice_num_requests_running"),
    waiting: total(m, "lmservice_num_requests_waiting"),
    kvUsage: total(m, "lmservice_kv_cache_usage_perc"),
    prefixHits: total(m, "lmservice_prefix_cache_hits_total"),
    prefixQueries: total(m, "lmservice_prefix_cache_queries_total"),
    requestsByModel: totalBy(m, "lmservice_requests_total", "model"),
  };
}

// A counter's rate between two reads; null when it went down (the server restarted).
function rate(prev, cur, get) {
  const delta = get(cur) - get(prev);
  return delta < 0 ? null : delta / ((cur.t - prev.t) / 1000);
}

const fixed = (digits) => (v) => (v === null ? "–" : v.toFixed(digits));

// Each card: its series, each a value of (previous read, this read) and how the latest value is shown.
const CARDS = [
  {
    id: "tokens", title: "Tokens / s", minTop: 10, series: [
      { name: "generated", value: (p, c) => rate(p, c, (s) => s.generatedTokens), format: fixed(1) },
      { name: "processed", value: (p, c) => rate(p, c, (s) => s.stepTokens), format: fixed(1) },
    ],
  },
  {
    id: "requests", title: "Requests", minTop: 4, series: [
      { name: "running", value: (p, c) => c.running, format: fixed(0) },
      { name: "waiting", value: (p, c) => c.waiting, format: fixed(0) },
    ],
  },
  {
    id: "kv", title: "KV-cache usage (%)", minTop: 100, series: [
      { name: "used", value: (p, c) => 100 * c.kvUsage, format: fixed(1) },
    ],
  },
  {
    id: "prefix", title: "Prefix-cache hit rate (%)", minTop: 100, series: [
      {
        name: "hits", format: fixed(1),
        value: (p, c) => {
          const queries = c.prefixQueries - p.prefixQueries;
          return queries > 0 ? (100 * (c.prefixHits - p.prefixHits)) / queries : null;
        },
      },
    ],
  },
];

export function setupDashboard() {
  const cards = $("dash-cards");
  const reads = []; // snapshots inside the window (plus one before it, for the first rate)
  const points = new Map(); // "card/series" -> [[t, value]]
  let timer = null;
  let busy = false;

  const chartFor = {};
  for (const card of [...CARDS, { id: "models", title: "Finished requests / s by model" }]) {
    const values = el("p", { class: "now", id: `dash-${card.id}-now` });
    const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
    svg.setAttribute("role", "img");
    svg.setAttribute("aria-labelledby", `dash-${card.id}-title dash-${card.id}-now`);
    const scale = el("p", { class: "scale", id: `dash-${card.id}-scale` });
    cards.append(el("article", { class: "card", "data-card": card.id },
      el("h3", { id: `dash-${card.id}-title`, text: card.title }), values, svg, scale));
    chartFor[card.id] = { svg, values, scale };
  }

  function series(key) {
    if (!points.has(key)) points.set(key, []);
    return points.get(key);
  }

  function valueLine(name, text, colorIndex) {
    return el("span", { class: `value c${colorIndex % NUM_COLORS}`, "data-series": name },
      el("span", { class: "swatch", "aria-hidden": "true" }), `${name} `, el("strong", { text }));
  }

  function render(now) {
    for (const card of CARDS) {
      const chart = chartFor[card.id];
      const drawn = card.series.map((s, i) => ({ cls: `c${i}`, points: series(`${card.id}/${s.name}`) }));
      const top = drawLines(chart.svg, drawn, { now, windowMs: WINDOW_MS, minTop: card.minTop });
      chart.values.replaceChildren(...card.series.map((s, i) => {
        const last = drawn[i].points.length ? drawn[i].points[drawn[i].points.length - 1][1] : null;
        return valueLine(s.name, s.format(last), i);
      }));
      chart.scale.textContent = `last 5 min · top ${top}`;
    }
    // Requests by model: one line per model seen, its rate drawn and its total count shown.
    const chart = chartFor.models;
    const latest = reads[reads.length - 1];
    const models = Object.keys(latest.requestsByModel).sort();
    const drawn = models.map((m, i) => ({ cls: `c${i % NUM_COLORS}`, points: series(`models/${m}`) }));
    const top = drawLines(chart.svg, drawn, { now, windowMs: WINDOW_MS, minTop: 1 });
    chart.values.replaceChildren(...(models.length
      ? models.map((m, i) => valueLine(m, `${latest.requestsByModel[m]}`, i))
      : [el("span", { class: "muted", text: "no model requests yet" })]));
    chart.scale.textContent = `last 5 min · top ${top} req/s · totals since start`;
  }

  function record(cur) {
    const prev = reads[reads.length - 1];
    reads.push(cur);
    if (!prev) return;
    for (const card of CARDS) for (const s of card.series) series(`${card.id}/${s.name}`).push([cur.t, s.value(prev, cur)]);
    for (const model of Object.keys(cur.requestsByModel)) {
      series(`models/${model}`).push([cur.t, rate(prev, cur, (s) => s.requestsByModel[model] || 0)]);
    }
    const start = cur.t - WINDOW_MS;
    while (reads.length > 2 && reads[1].t < start) reads.shift();
    for (const list of points.values()) while (list.length && list[0][0] < start) list.shift();
  }

  async function tick() {
    if (busy || document.visibilityState !== "visible") return;
    busy = true;
    try {
      record(snapshot(await getText("/metrics")));
      render(Date.now());
      $("dash-status").textContent = `updated ${new Date().toLocaleTimeString()}`;
      $("dash-error").hidden = true;
    } catch (e) {
      $("dash-error").textContent = `cannot read /metrics: ${e.message}`;
      $("dash-error").hidden = false;
    } finally {
      busy = false;
    }
  }

  return {
    /** Start reading (once the page may: it has the key it needs); it reads while the page is visible. */
    start() {
      if (timer === null) {
        timer = setInterval(tick, INTERVAL_MS);
        tick();
      }
    },
  };
}
