// Small line charts drawn as inline SVG, by hand (no library).

const NS = "http://www.w3.org/2000/svg";

function svg(tag, attrs = {}) {
  const el = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  return el;
}

function niceMax(v) {
  if (v <= 0) return 1;
  const p = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 2, 2.5, 5, 10]) if (v <= m * p) return m * p;
  return 10 * p;
}

// points: [[t_ms, value], ...]; draws the last windowMs up to now into container.
export function lineChart(container, points, { windowMs = 300000, unit = "", now = Date.now(),
  digits = 0 } = {}) {
  const W = 480;
  const H = 120;
  const L = 36;
  const B = 16;
  const T = 8;
  const R = 8;
  const from = now - windowMs;
  const shown = points.filter(([t]) => t >= from);
  const top = niceMax(Math.max(0, ...shown.map(([, v]) => v)));
  const x = (t) => L + ((t - from) / windowMs) * (W - L - R);
  const y = (v) => T + (1 - v / top) * (H - T - B);
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, class: "linechart", role: "img" });
  const title = svg("title");
  const latest = shown.length ? shown[shown.length - 1][1] : null;
  title.textContent = latest === null ? "no data yet" : `now ${latest.toFixed(digits)} ${unit}`;
  root.append(title);
  for (const frac of [0, 0.5, 1]) {
    const v = top * frac;
    root.append(svg("line", { x1: L, x2: W - R, y1: y(v), y2: y(v), class: "grid" }));
    const label = svg("text", { x: L - 4, y: y(v) + 3, class: "axis", "text-anchor": "end" });
    label.textContent = Number.isInteger(v) ? String(v) : v.toFixed(1);
    root.append(label);
  }
  for (const [i, text] of [[0, `-${Math.round(windowMs / 60000)} min`], [1, "now"]]) {
    const label = svg("text", { x: i ? W - R : L, y: H - 3, class: "axis",
      "text-anchor": i ? "end" : "start" });
    label.textContent = text;
    root.append(label);
  }
  if (shown.length > 1) {
    const d = shown.map(([t, v], i) => `${i ? "L" : "M"}${x(t).toFixed(1)},${y(v).toFixed(1)}`).join("");
    const base = y(0).toFixed(1);
    root.append(svg("path", { d: `${d}L${x(shown[shown.length - 1][0]).toFixed(1)},${base}` +
      `L${x(shown[0][0]).toFixed(1)},${base}Z`, class: "area" }));
    root.append(svg("path", { d, class: "line" }));
  }
  if (latest !== null) {
    const label = svg("text", { x: W - R, y: T + 10, class: "now", "text-anchor": "end" });
    label.textContent = `${latest.toFixed(digits)} ${unit}`;
    root.append(label);
  }
  container.replaceChildren(root);
}
