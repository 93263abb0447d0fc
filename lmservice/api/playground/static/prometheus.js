// The Prometheus text format (what /metrics serves), read into {name -> [{labels, value}]}.

const SAMPLE = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)/;
const LABEL = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g;

function unescape(value) {
  return value.replace(/\\(.)/g, (_, c) => (c === "n" ? "\n" : c));
}

export function parseMetrics(text) {
  const samples = new Map();
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const match = SAMPLE.exec(line);
    if (!match) continue;
    const labels = {};
    for (const [, name, value] of (match[2] || "").matchAll(LABEL)) labels[name] = unescape(value);
    if (!samples.has(match[1])) samples.set(match[1], []);
    samples.get(match[1]).push({ labels, value: Number(match[3]) });
  }
  return samples;
}

/** Sum of a metric's samples whose labels pass `keep` (0 when the metric is absent). */
export function total(samples, name, keep = () => true) {
  return (samples.get(name) || []).filter((s) => keep(s.labels)).reduce((sum, s) => sum + s.value, 0);
}

/** Sum of a metric's samples grouped by one label's value. */
export function totalBy(samples, name, label) {
  const sums = {};
  for (const s of samples.get(name) || []) {
    const key = s.labels[label];
    if (key) sums[key] = (sums[key] || 0) + s.value;
  }
  return sums;
}
