// Lineage of a version as a graph: dataset → run → version → transitions and approvals →
// deployments → reports, and the versions that consume it.

import { download, get } from "../api.js";
import { h, link, modelHref, s, when } from "../dom.js";
import type { Context } from "../main.js";
import type { Lineage } from "../types.js";

interface Node {
  id: string;
  kind: string;
  label: string;
  detail: string;
  col: number;
  href?: string;
  onClick?: () => void;
}

const COLUMNS = ["inputs", "run", "version", "transitions", "approvals", "deployments", "reports / consumers"];
const NODE_W = 150;
const NODE_H = 38;
const GAP_X = 30;
const GAP_Y = 12;

// The whole text is in the node's tooltip and in the table below.
function clip(text: string, max = 23): string {
  return text.length > max ? `${text.slice(0, max - 1)}…` : text;
}

export async function lineagePage(ctx: Context, name: string, version: number): Promise<void> {
  const enc = encodeURIComponent(name);
  const lin = await get<Lineage>(`/models/${enc}/versions/${version}/lineage`);
  const v = lin.version;
  const nodes: Node[] = [];
  const edges: [string, string][] = [];
  const versionId = `version:${v.model}/${v.version}`;
  const runId = `run:${v.run_id ?? "unknown"}`;
  v.datasets.forEach((d, i) => {
    nodes.push({ id: `dataset:${i}`, kind: "dataset", label: `${d.context ?? "dataset"}: ${d.name}`, detail: `${d.source} (digest ${d.digest})`, col: 0 });
    edges.push([`dataset:${i}`, runId]);
  });
  v.depends_on.forEach((u) => {
    const id = `upstream:${u.model}/${u.version}`;
    nodes.push({ id, kind: "upstream", label: `${u.model} v${u.version}`, detail: "upstream version", col: 0, href: `#/lineage/${encodeURIComponent(u.model)}/${u.version}` });
    edges.push([id, versionId]);
  });
  nodes.push({ id: runId, kind: "run", label: `run ${(v.run_id ?? "unknown").slice(0, 12)}`, detail: v.source, col: 1 });
  edges.push([runId, versionId]);
  nodes.push({ id: versionId, kind: "version", label: `${v.model} v${v.version}`, detail: `${v.stage}; digest ${(v.digest ?? "-").slice(0, 12)}; by ${v.creator ?? "?"}`, col: 2, href: modelHref(v.model, v.version) });
  for (const t of lin.transitions) {
    const tid = `transition:${t.id}`;
    nodes.push({ id: tid, kind: "transition", label: `${t.from_stage} → ${t.to_stage}`, detail: `${t.status}, requested by ${t.requested_by} at ${when(t.created_at)}`, col: 3 });
    edges.push([versionId, tid]);
    for (const a of t.approvals) {
      const aid = `approval:${a.id}`;
      nodes.push({ id: aid, kind: "approval", label: `${a.decision}: ${a.approver}`, detail: `${a.role} at ${when(a.created_at)}${a.comment ? `: ${a.comment}` : ""}`, col: 4 });
      edges.push([tid, aid]);
    }
  }
  lin.deployments.forEach((d, i) => {
    const did = `deployment:${i}`;
    nodes.push({ id: did, kind: "deployment", label: `${d.role} on ${d.backend}`, detail: `${when(d.started_at)} → ${d.ended_at ? when(d.ended_at) : "now"}`, col: 5 });
    edges.push([nodes.some((n) => n.id === `transition:${d.transition_id}`) ? `transition:${d.transition_id}` : versionId, did]);
  });
  for (const r of lin.drift) {
    const rid = `report:${r.evaluation_id}`;
    const url = r.report_url;
    nodes.push({
      id: rid,
      kind: "report",
      label: `drift check: ${r.verdict}`,
      detail: `${when(r.window_end ?? r.window_start)}${r.drifted_features.length ? `; drifted ${r.drifted_features.join(", ")}` : ""}`,
      col: 6,
      onClick: url ? () => void download(url, `drift-report-${r.evaluation_id}.html`) : undefined,
    });
    edges.push([versionId, rid]);
  }
  for (const c of lin.consumers) {
    const cid = `consumer:${c.model}/${c.version}`;
    nodes.push({ id: cid, kind: "consumer", label: `${c.model} v${c.version}`, detail: `consumes this version (${c.stage ?? "?"})`, col: 6, href: `#/lineage/${encodeURIComponent(c.model)}/${c.version}` });
    edges.push([versionId, cid]);
  }

  const perCol = new Map<number, number>();
  const pos = new Map<string, { x: number; y: number }>();
  for (const n of nodes) {
    const row = perCol.get(n.col) ?? 0;
    perCol.set(n.col, row + 1);
    pos.set(n.id, { x: 10 + n.col * (NODE_W + GAP_X), y: 30 + row * (NODE_H + GAP_Y) });
  }
  const height = 40 + Math.max(1, ...perCol.values()) * (NODE_H + GAP_Y);
  const width = 20 + COLUMNS.length * (NODE_W + GAP_X);
  const svg = s("svg", { class: "chart graph", viewBox: `0 0 ${width} ${height}`, "data-chart": "lineage", "data-nodes": nodes.length, "data-edges": edges.length });
  COLUMNS.forEach((c, i) => svg.append(s("text", { x: 10 + i * (NODE_W + GAP_X), y: 16 }, c)));
  for (const [from, to] of edges) {
    const a = pos.get(from);
    const b = pos.get(to);
    if (!a || !b) continue;
    const x1 = a.x + NODE_W;
    const y1 = a.y + NODE_H / 2;
    const x2 = b.x;
    const y2 = b.y + NODE_H / 2;
    const mid = (x1 + x2) / 2;
    svg.append(s("path", { class: "edge", d: `M${x1},${y1} C${mid},${y1} ${mid},${y2} ${x2},${y2}`, "data-from": from, "data-to": to }));
  }
  for (const n of nodes) {
    const p = pos.get(n.id) as { x: number; y: number };
    const g = s(
      "g",
      { class: `node kind-${n.kind}`, "data-node": n.id, "data-kind": n.kind, transform: `translate(${p.x},${p.y})` },
      s("title", {}, `${n.label}\n${n.detail}`),
      s("rect", { width: NODE_W, height: NODE_H }),
      s("text", { x: 6, y: 15 }, clip(n.label)),
      s("text", { x: 6, y: 30, class: "muted" }, clip(n.detail)),
    );
    if (n.href) {
      const a = s("a", { href: n.href });
      a.append(g);
      svg.append(a);
    } else {
      if (n.onClick) g.addEventListener("click", n.onClick);
      svg.append(g);
    }
  }
  ctx.view.replaceChildren(
    h("h1", {}, `Lineage of ${name} v${version}`),
    h("p", {}, link(modelHref(name, version), "model page"), " · ", link(`#/card/${enc}/${version}`, "model card")),
    h("section", { class: "card" }, svg),
    h(
      "section",
      { class: "card" },
      h("h2", {}, "Nodes"),
      h(
        "table",
        { id: "lineage-nodes" },
        h("tbody", {}, ...nodes.map((n) => h("tr", { "data-node": n.id }, h("td", {}, n.kind), h("td", {}, n.href ? link(n.href, n.label) : n.label), h("td", {}, n.detail)))),
      ),
    ),
  );
}
