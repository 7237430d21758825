// Model card: the JSON card rendered, with JSON and Markdown downloads.

import { download, get } from "../api.js";
import { h, link, modelHref, when } from "../dom.js";
import type { Context } from "../main.js";

type Doc = Record<string, unknown>;

function value(v: unknown): Node {
  if (v === null || v === undefined) return document.createTextNode("-");
  if (Array.isArray(v)) {
    if (!v.length) return document.createTextNode("none");
    return h("ul", {}, ...v.map((x) => h("li", {}, value(x))));
  }
  if (typeof v === "object") {
    return h("dl", {}, ...Object.entries(v as Doc).flatMap(([k, x]) => [h("dt", {}, k), h("dd", {}, value(x))]));
  }
  return document.createTextNode(String(v));
}

function table(id: string, rows: Doc[], columns: string[]): HTMLElement {
  if (!rows.length) return h("p", { class: "muted", id }, "None.");
  return h(
    "table",
    { id },
    h("thead", {}, h("tr", {}, ...columns.map((c) => h("th", {}, c)))),
    h(
      "tbody",
      {},
      ...rows.map((r) =>
        h("tr", {}, ...columns.map((c) => h("td", {}, typeof r[c] === "string" && /\d{4}-\d\d-\d\dT/.test(r[c] as string) ? when(r[c] as string) : value(r[c])))),
      ),
    ),
  );
}

export async function cardPage(ctx: Context, name: string, version: number): Promise<void> {
  const enc = encodeURIComponent(name);
  const path = `/models/${enc}/versions/${version}/card`;
  const card = await get<Doc>(path, { format: "json" });
  const evidence = (card.evidence as Doc[] | undefined) ?? [];
  ctx.view.replaceChildren(
    h("h1", {}, `Model card: ${name} v${version}`),
    h(
      "div",
      { class: "actions" },
      h("button", { type: "button", id: "download-json", onclick: () => void download(`/api/v1${path}?format=json`, `${name}-v${version}-card.json`) }, "Download JSON"),
      h("button", { type: "button", id: "download-md", onclick: () => void download(`/api/v1${path}?format=md`, `${name}-v${version}-card.md`) }, "Download Markdown"),
      link(modelHref(name, version), "model page"),
      link(`#/lineage/${enc}/${version}`, "lineage"),
    ),
    h(
      "section",
      { class: "card card-doc", id: "card", "data-model": String(card.model), "data-version": String(card.version), "data-stage": String(card.stage) },
      h("p", {}, `Stage `, h("strong", {}, String(card.stage)), `; digest `, h("code", {}, String(card.digest ?? "-")), `; generated ${when(card.generated_at as string)}`),
      h("h2", {}, "Lineage"),
      value(card.lineage),
      h("h2", {}, "Approvals"),
      table("card-approvals", (card.approvals as Doc[] | undefined) ?? [], ["from_stage", "to_stage", "approver", "role", "decision", "comment", "created_at"]),
      h("h2", {}, "Evidence"),
      table("card-evidence", evidence, ["kind", "passed", "reason", "sample_size", "created_at"]),
      h("h2", {}, "Production history"),
      table("card-production", (card.production_history as Doc[] | undefined) ?? [], ["role", "started_at", "ended_at", "digest"]),
    ),
  );
}
