// A small live line chart in plain SVG: a few series of (time, value) points over a sliding window.
// Plain SVG rather than a charting library: six charts of at most a few hundred points need one <path> per
// series and nothing else, and there is then no vendored code to keep up to date.

const NS = "http://www.w3.org/2000/svg";
const WIDTH = 300;
const HEIGHT = 80;
const PAD = 2; // keeps a line at 0 or at the top fully visible

/** The smallest 1, 2 or 5 x 10^k at or above `value`. */
export function niceCeil(value) {
  if (!(value > 0)) return 1;
  const power = 10 ** Math.floor(Math.log10(value));
  for (const step of [1, 2, 5, 10]) if (step * power >= value) return step * power;
  return 10 * power;
}

function svgEl(tag, attrs) {
  const node = document.createElementNS(NS, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  return node;
}

/**
 * Draw `series` ([{cls, points: [[timeMs, value | null], ...]}]) into `svg` for the window
 * [now - windowMs, now]. A null value breaks the line (no data). The y axis runs from 0 to a round number
 * at or above both `minTop` and the largest value; that top is returned for the caption.
 */
export function drawLines(svg, series, { now, windowMs, minTop = 1 }) {
  const start = now - windowMs;
  let top = minTop;
  for (const s of series) for (const [t, v] of s.points) if (t >= start && v !== null && v > top) top = v;
  top = niceCeil(top);
  const x = (t) => ((t - start) / windowMs) * WIDTH;
  const y = (v) => HEIGHT - PAD - (v / top) * (HEIGHT - 2 * PAD);
  svg.setAttribute("viewBox", `0 0 ${WIDTH} ${HEIGHT}`);
  svg.setAttribute("preserveAspectRatio", "none");
  const children = [0.5, 1].map((f) => svgEl("line", {
    class: "grid", x1: 0, x2: WIDTH, y1: y(f * top), y2: y(f * top), "vector-effect": "non-scaling-stroke",
  }));
  for (const s of series) {
    let d = "";
    let pen = "M";
    for (const [t, v] of s.points) {
      if (t < start || v === null) {
        pen = "M";
        continue;
      }
      d += `${pen}${x(t).toFixed(1)},${y(v).toFixed(1)}`;
      pen = "L";
    }
    if (d) children.push(svgEl("path", { class: `line ${s.cls}`, d, "vector-effect": "non-scaling-stroke" }));
  }
  svg.replaceChildren(...children);
  return top;
}
