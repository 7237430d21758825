// Audit log: filters, paging, and whether the hash chain verifies.

import { get } from "../api.js";
import { h, when } from "../dom.js";
import type { Context } from "../main.js";
import type { AuditEntry, AuditVerify, Page } from "../types.js";

const FILTERS: [string, string, string][] = [
  ["action", "Action", "transition.requested"],
  ["actor", "Actor", "alice"],
  ["entity_type", "Entity type", "transition"],
  ["entity_id", "Entity id", ""],
  ["since", "Since (ISO, with zone)", "2026-01-01T00:00:00Z"],
  ["until", "Until (ISO, with zone)", ""],
];
const LIMIT = 50;

export async function auditPage(ctx: Context): Promise<void> {
  const q = ctx.route.query;
  const offset = Math.max(0, Number(q.get("offset")) || 0);
  const params: Record<string, string | number> = { offset, limit: LIMIT };
  for (const [key] of FILTERS) if (q.get(key)) params[key] = q.get(key) as string;
  const [page, verify] = await Promise.all([get<Page<AuditEntry>>("/audit", params), get<AuditVerify>("/audit/verify")]);

  const go = (changes: Record<string, string | number | null>): void => {
    const next = new URLSearchParams(q);
    for (const [k, v] of Object.entries(changes)) {
      if (v === null || v === "") next.delete(k);
      else next.set(k, String(v));
    }
    location.hash = `#/audit?${next.toString()}`;
  };
  const inputs = FILTERS.map(([key, label, hint]) => h("input", { name: key, value: q.get(key) ?? "", placeholder: hint, "aria-label": label }));
  const form = h(
    "form",
    { class: "filters", id: "audit-filters" },
    ...FILTERS.map(([, label], i) => h("label", {}, label, inputs[i])),
    h("button", { type: "submit", class: "primary" }, "Filter"),
    h("button", { type: "button", onclick: () => (location.hash = "#/audit") }, "Clear"),
  );
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    go({ ...Object.fromEntries(inputs.map((i) => [i.name, i.value.trim()])), offset: null });
  });
  const banner = h(
    "p",
    { id: "audit-verify", "data-ok": String(verify.ok), "data-rows": verify.rows, class: verify.ok ? "ok" : "bad" },
    verify.ok
      ? `Chain verified: ${verify.rows} rows, head ${verify.head_hash.slice(0, 16)}…`
      : `Chain BROKEN at row ${verify.first_bad_seq}: ${verify.reason}`,
  );
  const rows = page.data.map((e) =>
    h(
      "tr",
      { "data-seq": e.seq, "data-action": e.action, "data-actor": e.actor },
      h("td", {}, String(e.seq)),
      h("td", {}, when(e.at)),
      h("td", {}, e.actor),
      h("td", {}, e.action),
      h("td", {}, `${e.entity_type} ${e.entity_id}`),
      h("td", { class: "mono" }, JSON.stringify(e.data).slice(0, 160)),
    ),
  );
  const pager = h(
    "div",
    { class: "actions", id: "audit-pager", "data-offset": offset, "data-count": page.data.length },
    h("button", { type: "button", "data-page": "prev", disabled: offset === 0, onclick: () => go({ offset: Math.max(0, offset - LIMIT) }) }, "← Newer"),
    h("span", {}, page.data.length ? `rows ${offset + 1}–${offset + page.data.length}` : "no rows"),
    h("button", { type: "button", "data-page": "next", disabled: page.data.length < LIMIT, onclick: () => go({ offset: offset + LIMIT }) }, "Older →"),
  );
  ctx.view.replaceChildren(
    h("h1", {}, "Audit log"),
    banner,
    form,
    h(
      "table",
      { id: "audit" },
      h("thead", {}, h("tr", {}, ...["Seq", "At", "Actor", "Action", "Entity", "Data"].map((t) => h("th", {}, t)))),
      h("tbody", {}, ...rows),
    ),
    pager,
  );
}
