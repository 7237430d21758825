// Model: versions on a stage timeline, current traffic, evidence charts, and what served
// production at a chosen time.

import { ApiError, download, get } from "../api.js";
import { lineChart, timeline } from "../charts.js";
import type { Series, Window } from "../charts.js";
import { h, link, modelHref, percent, when } from "../dom.js";
import type { Context } from "../main.js";
import type { Deployment, DriftHistory, Evaluation, Experiment, Fleet, ModelSummary, Production } from "../types.js";

async function findModel(name: string): Promise<ModelSummary> {
  for (let offset = 0; ; offset += 200) {
    const page = await get<{ data: ModelSummary[]; count: number }>("/models", { offset, limit: 200 });
    const found = page.data.find((m) => m.name === name);
    if (found) return found;
    if (offset + 200 >= page.count) throw new ApiError(404, `model ${name} not found`, "not_found");
  }
}

async function optional<T>(p: Promise<T>): Promise<T | null> {
  try {
    return await p;
  } catch (err) {
    if (err instanceof ApiError && err.status === 404) return null;
    throw err;
  }
}

function empty(id: string, text: string): HTMLElement {
  return h("p", { class: "muted", "data-empty-chart": id }, text);
}

function shadowChart(evals: Evaluation[], minAgreement: number | null): Element {
  const points = evals
    .filter((e) => e.kind === "shadow" && typeof e.summary.agreement === "number")
    .map((e) => ({
      x: Date.parse(e.created_at),
      y: e.summary.agreement as number,
      title: `${when(e.created_at)}: agreement ${percent(e.summary.agreement as number)} over ${e.sample_size} comparisons (${e.passed ? "passed" : "failed"})`,
      attrs: { "data-evaluation": String(e.id), "data-passed": String(e.passed), "data-sample-size": String(e.sample_size) },
    }));
  if (!points.length) return empty("shadow", "No shadow report with compared answers yet.");
  return lineChart([{ name: "agreement", points }], {
    id: "shadow",
    title: "Shadow agreement with the champion",
    xLabel: "report time (UTC)",
    yLabel: "agreement",
    xTime: true,
    yMax: 1,
    thresholds: minAgreement === null ? [] : [{ y: minAgreement, label: `min ${percent(minAgreement, 0)}` }],
  });
}

function experimentChart(exp: Experiment | null): Element {
  if (!exp || !exp.looks.length) return empty("experiment", "No canary experiment for this version.");
  const points = exp.looks
    .filter((l) => l.estimate !== null)
    .map((l) => ({
      x: l.n_treatment + l.n_control,
      y: l.estimate as number,
      lo: l.lower,
      hi: l.upper,
      title: `${l.n_treatment + l.n_control} units: effect ${l.estimate} [${l.lower ?? "…"}, ${l.upper ?? "…"}] → ${l.action}`,
      attrs: { "data-action": l.action, "data-at": l.at },
    }));
  const d = exp.decision;
  const decision = h(
    "p",
    { id: "experiment-decision", "data-action": d ? d.action : "continue" },
    d ? h("strong", { class: d.passed ? "ok" : "bad" }, `Decision: ${d.action}`) : h("strong", {}, "Still running"),
    d ? ` at ${when(d.decided_at)}: ${d.reason}` : ` (${exp.looks.length} looks so far)`,
  );
  const chart = points.length
    ? lineChart([{ name: "effect", points }], {
        id: "experiment",
        title: "Experiment: effect (canary − champion) and always-valid interval as samples grow",
        xLabel: "units (canary + champion)",
        yLabel: "effect",
        zero: true,
        interval: true,
      })
    : empty("experiment", "No look has an estimate yet.");
  return h("div", {}, chart, decision);
}

function reportButton(url: string, id: number): HTMLElement {
  return h("button", { type: "button", "data-report": url, onclick: () => void download(url, `drift-report-${id}.html`) }, "HTML report");
}

function driftChart(history: DriftHistory | null): Element {
  const checks = [...(history?.checks ?? [])].reverse(); // oldest first
  const byColumn = new Map<string, Series>();
  for (const c of checks) {
    const at = Date.parse(c.window_end ?? c.created_at);
    for (const col of c.columns) {
      if (col.score === null) continue;
      const series = byColumn.get(col.column) ?? { name: col.column, points: [] };
      series.points.push({
        x: at,
        y: col.score,
        title: `${col.column} at ${when(c.window_end ?? c.created_at)}: ${col.test ?? "score"} ${col.score}${col.drifted ? " (drifted)" : ""}`,
        attrs: { "data-check": String(c.id), "data-drifted": String(col.drifted), "data-report": c.report_url ?? "" },
        onClick: c.report_url ? () => void download(c.report_url as string, `drift-report-${c.id}.html`) : undefined,
      });
      byColumn.set(col.column, series);
    }
  }
  if (!byColumn.size) return empty("drift", "No drift check with per-feature scores yet.");
  const chart = lineChart([...byColumn.values()], {
    id: "drift",
    title: "Drift: per-feature score over time (click a point for its report)",
    xLabel: "window end (UTC)",
    yLabel: "score",
    xTime: true,
  });
  const table = h(
    "table",
    { id: "drift-checks" },
    h("thead", {}, h("tr", {}, ...["Window end", "Verdict", "Rows", "Drifted features", "Report"].map((t) => h("th", {}, t)))),
    h(
      "tbody",
      {},
      ...(history?.checks ?? []).map((c) =>
        h(
          "tr",
          { "data-check": c.id },
          h("td", {}, when(c.window_end ?? c.created_at)),
          h("td", { class: c.verdict === "drift" ? "bad" : "" }, c.verdict),
          h("td", {}, String(c.sample_size)),
          h("td", {}, c.drifted_features.join(", ") || "-"),
          h("td", {}, c.report_url ? reportButton(c.report_url, c.id) : "-"),
        ),
      ),
    ),
  );
  return h("div", {}, chart, table);
}

function productionPicker(name: string): HTMLElement {
  const input = h("input", { type: "datetime-local", id: "production-at", step: 1, "aria-label": "Time (your local time)" });
  const answer = h("div", { id: "production-answer" });
  const form = h("form", { class: "filters" }, h("label", {}, "What served production at (local time)", input), h("button", { type: "submit" }, "Show"));
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    void (async () => {
      answer.replaceChildren();
      const at = input.value ? new Date(input.value) : new Date();
      try {
        const p = await get<Production>(`/models/${encodeURIComponent(name)}/production`, { at: at.toISOString() });
        if (p.version === null) {
          answer.append(h("p", { "data-version": "" }, `No version served production at ${when(p.at)}.`));
          return;
        }
        answer.append(
          h(
            "p",
            { "data-version": p.version },
            h("strong", {}, `v${p.version}`),
            ` served production at ${when(p.at)} (from ${when(p.since)} to ${p.until ? when(p.until) : "now"}); digest `,
            h("code", {}, (p.digest ?? "-").slice(0, 12)),
          ),
          h(
            "p",
            { "data-approvers": p.approved_by.map((a) => a.approver).join(",") },
            "Approved by ",
            p.approved_by.length ? p.approved_by.map((a) => `${a.approver} (${a.role}) at ${when(a.created_at)}`).join(", ") : "nobody on record",
            p.transition ? ` in transition ${p.transition.id}` : "",
            " · ",
            link(`#/lineage/${encodeURIComponent(name)}/${p.version}`, "lineage"),
          ),
        );
      } catch (err) {
        answer.append(h("p", { class: "error" }, err instanceof ApiError ? err.message : String(err)));
      }
    })();
  });
  return h("section", { class: "card" }, h("h2", {}, "Production at a time"), form, answer);
}

export async function modelPage(ctx: Context, name: string): Promise<void> {
  const enc = encodeURIComponent(name);
  const [model, fleet, policy] = await Promise.all([
    findModel(name),
    get<Fleet>("/fleet"),
    optional(get<{ shadow?: { min_agreement?: number } }>(`/models/${enc}/policy`)),
  ]);
  const versions = [...model.versions].sort((a, b) => a.version - b.version);
  const deployments = await Promise.all(
    versions.map((v) => get<Deployment[]>(`/models/${enc}/versions/${v.version}/deployments`)),
  );
  const rows = versions.map((v, i) => ({
    version: v.version,
    stage: v.stage,
    windows: deployments[i].map(
      (d): Window => ({
        role: d.role,
        start: Date.parse(d.started_at),
        end: d.ended_at === null ? null : Date.parse(d.ended_at),
        transition: d.transition_id,
      }),
    ),
  }));
  const entry = fleet.models.find((m) => m.name === name);
  const wanted = Number(ctx.route.query.get("v"));
  const selected = versions.some((v) => v.version === wanted) ? wanted : (versions.at(-1)?.version ?? 1);

  const [evals, exp, drift] = await Promise.all([
    get<Evaluation[]>(`/models/${enc}/versions/${selected}/evaluations`),
    optional(get<Experiment>(`/models/${enc}/versions/${selected}/experiment`)),
    optional(get<DriftHistory>(`/models/${enc}/versions/${selected}/drift`)),
  ]);
  const picker = h("select", { id: "version-picker", "aria-label": "Version" }, ...versions.map((v) => h("option", { value: v.version, selected: v.version === selected }, `v${v.version} (${v.stage})`)));
  picker.addEventListener("change", () => {
    location.hash = modelHref(name, Number(picker.value));
  });
  const traffic = entry
    ? h(
        "p",
        { id: "traffic", "data-champion": entry.champion?.version ?? "", "data-challenger": entry.challenger?.version ?? "", "data-shadow": entry.shadow?.version ?? "", "data-challenger-weight": entry.traffic.challenger_weight, "data-shadow-fraction": entry.traffic.shadow_fraction },
        `Champion ${entry.champion ? `v${entry.champion.version}` : "-"} takes ${percent(1 - entry.traffic.challenger_weight, 0)} of live traffic; `,
        `challenger ${entry.challenger ? `v${entry.challenger.version}` : "-"} ${percent(entry.traffic.challenger_weight, 0)}; `,
        `shadow ${entry.shadow ? `v${entry.shadow.version}` : "-"} sees a mirrored ${percent(entry.traffic.shadow_fraction, 0)}. `,
        `Drift: ${entry.drift.status}.`,
      )
    : h("p", { id: "traffic" }, "Not in the fleet yet.");
  ctx.view.replaceChildren(
    h("h1", {}, `Model ${name}`),
    h("section", { class: "card" }, h("h2", {}, "Current traffic"), traffic),
    h("section", { class: "card" }, h("h2", {}, "Versions on the stage timeline"), timeline(rows, Date.now())),
    productionPicker(name),
    h(
      "section",
      { class: "card", id: "evidence", "data-version": selected },
      h("h2", {}, "Evidence for ", picker),
      h("p", {}, link(`#/lineage/${enc}/${selected}`, "lineage"), " · ", link(`#/card/${enc}/${selected}`, "model card")),
      h("h3", {}, "Shadow agreement"),
      shadowChart([...evals].reverse(), policy?.shadow?.min_agreement ?? null),
      h("h3", {}, "Canary experiment"),
      experimentChart(exp),
      h("h3", {}, "Drift"),
      driftChart(drift),
    ),
  );
}
