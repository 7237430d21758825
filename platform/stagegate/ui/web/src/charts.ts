// Hand-rolled SVG charts. Every drawn point carries its data (data-x, data-y, data-lo,
// data-hi), so a reader's tools and the browser tests can check what was drawn.

import { s } from "./dom.js";

export interface Point {
  x: number;
  y: number;
  lo?: number | null;
  hi?: number | null;
  title?: string;
  attrs?: Record<string, string>;
  onClick?: () => void;
}

export interface Series {
  name: string;
  points: Point[];
}

export interface ChartOptions {
  id: string;
  title: string;
  xLabel: string;
  yLabel: string;
  xTime?: boolean;
  yMin?: number;
  yMax?: number;
  thresholds?: { y: number; label: string }[];
  zero?: boolean;
  interval?: boolean;
}

const W = 820;
const H = 280;
const M = { l: 56, r: 150, t: 24, b: 40 };
export const PALETTE = [
  "#2f5fd0", "#d9822b", "#7b5cc4", "#1f8a4c", "#c0392b", "#0f8b8d", "#8c6d1f", "#d6336c",
  "#495057", "#5c7cfa",
];

function extent(values: number[], fallback: [number, number]): [number, number] {
  const finite = values.filter((v) => Number.isFinite(v));
  if (!finite.length) return fallback;
  let lo = Math.min(...finite);
  let hi = Math.max(...finite);
  if (lo === hi) {
    // One point: an hour either side of an instant (epoch ms), a tenth of a plain value.
    const pad = Math.abs(lo) > 1e11 ? 3_600_000 : Math.abs(lo) * 0.1 || 1;
    lo -= pad;
    hi += pad;
  }
  return [lo, hi];
}

function tickLabel(v: number, time: boolean, span: number): string {
  if (time) {
    const iso = new Date(v).toISOString();
    return span > 2 * 86400_000 ? iso.slice(5, 10) : iso.slice(11, 16);
  }
  if (Math.abs(v) >= 1000) return v.toFixed(0);
  return Number(v.toPrecision(3)).toString();
}

export function lineChart(series: Series[], o: ChartOptions): SVGSVGElement {
  const all = series.flatMap((se) => se.points);
  const ys = all.flatMap((p) => [p.y, p.lo ?? p.y, p.hi ?? p.y]);
  for (const t of o.thresholds ?? []) ys.push(t.y);
  if (o.zero) ys.push(0);
  const [x0, x1] = extent(all.map((p) => p.x), [0, 1]);
  let [y0, y1] = extent(ys, [0, 1]);
  if (o.yMin !== undefined) y0 = Math.min(y0, o.yMin);
  if (o.yMax !== undefined) y1 = Math.max(y1, o.yMax);
  const pad = (y1 - y0) * 0.05;
  y0 -= pad;
  y1 += pad;
  const sx = (x: number): number => M.l + ((x - x0) / (x1 - x0 || 1)) * (W - M.l - M.r);
  const sy = (y: number): number => H - M.b - ((y - y0) / (y1 - y0 || 1)) * (H - M.t - M.b);

  const svg = s("svg", {
    class: "chart",
    viewBox: `0 0 ${W} ${H}`,
    role: "img",
    "aria-label": o.title,
    "data-chart": o.id,
    "data-points": all.length,
  });
  svg.appendChild(s("title", {}, o.title));
  for (let i = 0; i <= 4; i++) {
    const yv = y0 + ((y1 - y0) * i) / 4;
    const xv = x0 + ((x1 - x0) * i) / 4;
    svg.append(
      s("line", { class: "grid", x1: M.l, x2: W - M.r, y1: sy(yv), y2: sy(yv) }),
      s("text", { x: M.l - 6, y: sy(yv) + 4, "text-anchor": "end" }, tickLabel(yv, false, 0)),
      s("text", { x: sx(xv), y: H - M.b + 16, "text-anchor": "middle" }, tickLabel(xv, !!o.xTime, x1 - x0)),
    );
  }
  svg.append(
    s("line", { class: "axis", x1: M.l, x2: M.l, y1: M.t, y2: H - M.b }),
    s("line", { class: "axis", x1: M.l, x2: W - M.r, y1: H - M.b, y2: H - M.b }),
    s("text", { x: (M.l + W - M.r) / 2, y: H - 6, "text-anchor": "middle" }, o.xLabel),
    s("text", { x: 12, y: M.t - 8 }, o.yLabel),
  );
  if (o.zero && y0 < 0 && y1 > 0) {
    svg.append(s("line", { class: "zero", x1: M.l, x2: W - M.r, y1: sy(0), y2: sy(0) }));
  }
  for (const t of o.thresholds ?? []) {
    svg.append(
      s("line", { class: "threshold", "data-threshold": t.y, x1: M.l, x2: W - M.r, y1: sy(t.y), y2: sy(t.y) }),
      s("text", { x: W - M.r + 4, y: sy(t.y) + 4 }, t.label),
    );
  }
  series.forEach((se, i) => {
    const color = PALETTE[i % PALETTE.length];
    const g = s("g", { class: "series", "data-series": se.name, "data-count": se.points.length });
    const pts = [...se.points].sort((a, b) => a.x - b.x);
    const bounded = pts.filter((p) => p.lo !== null && p.lo !== undefined && p.hi !== null && p.hi !== undefined);
    if (o.interval && bounded.length > 1) {
      const upper = bounded.map((p) => `${sx(p.x)},${sy(p.hi as number)}`);
      const lower = bounded.reverse().map((p) => `${sx(p.x)},${sy(p.lo as number)}`);
      g.append(s("polygon", { class: "band", fill: color, points: [...upper, ...lower].join(" ") }));
    }
    if (pts.length > 1) {
      g.append(s("polyline", { class: "line", stroke: color, points: pts.map((p) => `${sx(p.x)},${sy(p.y)}`).join(" ") }));
    }
    for (const p of pts) {
      if (o.interval && p.lo !== null && p.lo !== undefined && p.hi !== null && p.hi !== undefined) {
        g.append(s("line", { class: "whisker", stroke: color, x1: sx(p.x), x2: sx(p.x), y1: sy(p.lo), y2: sy(p.hi) }));
      }
      const dot = s(
        "circle",
        {
          class: p.onClick ? "point clickable" : "point",
          cx: sx(p.x),
          cy: sy(p.y),
          r: 4,
          fill: color,
          "data-series": se.name,
          "data-x": o.xTime ? new Date(p.x).toISOString() : p.x,
          "data-y": p.y,
          "data-lo": p.lo ?? null,
          "data-hi": p.hi ?? null,
          ...(p.attrs ?? {}),
        },
        s("title", {}, p.title ?? `${se.name}: ${p.y}`),
      );
      if (p.onClick) dot.addEventListener("click", p.onClick);
      g.append(dot);
    }
    svg.append(g);
  });
  const legend = s("g", { class: "legend" });
  series.slice(0, 14).forEach((se, i) => {
    const y = M.t + i * 16;
    legend.append(
      s("rect", { x: W - M.r + 10, y: y - 8, width: 10, height: 10, fill: PALETTE[i % PALETTE.length] }),
      s("text", { x: W - M.r + 24, y: y + 1 }, se.name),
    );
  });
  if (series.length > 14) legend.append(s("text", { x: W - M.r + 10, y: M.t + 14 * 16 }, `+${series.length - 14} more`));
  svg.append(legend);
  return svg;
}

export interface Window {
  role: string;
  start: number;
  end: number | null;
  transition: string | null;
}

/** Each version's deployment windows on one time axis: a row per version, a bar per window. */
export function timeline(rows: { version: number; stage: string; windows: Window[] }[], now: number): SVGSVGElement {
  const rowH = 26;
  const height = M.t + rows.length * rowH + M.b;
  const starts = rows.flatMap((r) => r.windows.map((w) => w.start));
  const [x0, x1raw] = extent([...starts, now], [now - 3600_000, now]);
  const x1 = Math.max(x1raw, now);
  const sx = (x: number): number => 90 + ((x - x0) / (x1 - x0 || 1)) * (W - 90 - 30);
  const svg = s("svg", {
    class: "chart timeline",
    viewBox: `0 0 ${W} ${height}`,
    role: "img",
    "aria-label": "Stage timeline",
    "data-chart": "timeline",
    "data-points": rows.reduce((n, r) => n + r.windows.length, 0),
  });
  rows.forEach((r, i) => {
    const y = M.t + i * rowH;
    svg.append(
      s("line", { class: "grid", x1: 90, x2: W - 30, y1: y + rowH / 2, y2: y + rowH / 2 }),
      s("text", { x: 8, y: y + rowH / 2 + 4 }, `v${r.version} · ${r.stage}`),
    );
    for (const w of r.windows) {
      const end = w.end ?? now;
      svg.append(
        s(
          "rect",
          {
            class: `window role-${w.role}`,
            x: sx(w.start),
            y: y + 5,
            width: Math.max(2, sx(end) - sx(w.start)),
            height: rowH - 10,
            "data-version": r.version,
            "data-role": w.role,
            "data-start": new Date(w.start).toISOString(),
            "data-end": w.end === null ? null : new Date(w.end).toISOString(),
          },
          s("title", {}, `v${r.version} ${w.role} from ${new Date(w.start).toISOString()} to ${w.end === null ? "now" : new Date(w.end).toISOString()}`),
        ),
      );
    }
  });
  for (let i = 0; i <= 4; i++) {
    const xv = x0 + ((x1 - x0) * i) / 4;
    svg.append(s("text", { x: sx(xv), y: height - 16, "text-anchor": "middle" }, tickLabel(xv, true, x1 - x0)));
  }
  ["champion", "challenger", "shadow"].forEach((role, i) => {
    svg.append(
      s("rect", { class: `role-${role}`, x: 90 + i * 110, y: height - 12, width: 10, height: 10 }),
      s("text", { x: 104 + i * 110, y: height - 3 }, role),
    );
  });
  return svg;
}
