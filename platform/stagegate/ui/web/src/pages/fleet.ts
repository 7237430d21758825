// Fleet: every model at a glance, and the inventory figures.

import { get } from "../api.js";
import { duration, h, link, modelHref, percent, when } from "../dom.js";
import type { Context } from "../main.js";
import type { Fleet, RoleHolder } from "../types.js";

function holder(r: RoleHolder | null): HTMLElement {
  return r ? h("span", { title: `since ${when(r.since)}` }, `v${r.version}`) : h("span", { class: "muted" }, "-");
}

function figure(id: string, label: string, value: string, ...extra: (Node | string)[]): HTMLElement {
  return h("div", { class: "figure", "data-figure": id }, h("div", { class: "value" }, value), h("div", { class: "label" }, label), ...extra);
}

export async function fleetPage(ctx: Context): Promise<void> {
  const fleet = await get<Fleet>("/fleet");
  const lt = fleet.lead_time_s;
  const rej = fleet.rejected;
  const figures = h(
    "div",
    { class: "figures" },
    figure("models", "models", String(fleet.models.length)),
    figure("pending", "pending approvals", String(fleet.pending_approvals), h("div", {}, link("#/inbox", "open the inbox"))),
    figure("lead-median", `lead time median (${lt.samples} versions)`, duration(lt.median)),
    figure("lead-p90", "lead time p90", duration(lt.p90)),
    figure("rejected", `share rejected (${rej.versions} versions)`, percent(rej.share)),
  );
  const reasons = rej.reasons.length
    ? h(
        "table",
        { id: "rejection-reasons" },
        h("thead", {}, h("tr", {}, h("th", {}, "Rejection reason"), h("th", {}, "Count"))),
        h("tbody", {}, ...rej.reasons.map((r) => h("tr", { "data-reason": r.reason }, h("td", {}, r.reason), h("td", {}, String(r.count))))),
      )
    : h("p", { class: "muted" }, "No rejections.");
  const rows = fleet.models.map((m) =>
    h(
      "tr",
      { "data-model": m.name },
      h("td", {}, link(modelHref(m.name), m.name)),
      h("td", {}, String(m.versions)),
      h("td", { "data-role": "champion" }, holder(m.champion)),
      h("td", { "data-role": "challenger" }, holder(m.challenger)),
      h("td", { "data-role": "shadow" }, holder(m.shadow)),
      h(
        "td",
        { "data-traffic": "", "data-challenger-weight": m.traffic.challenger_weight, "data-shadow-fraction": m.traffic.shadow_fraction },
        `challenger ${percent(m.traffic.challenger_weight, 0)} · shadow ${percent(m.traffic.shadow_fraction, 0)}`,
      ),
      h("td", { "data-pending": m.pending_approvals }, String(m.pending_approvals)),
      h(
        "td",
        { "data-drift": m.drift.status },
        h("span", { class: `badge ${m.drift.status}` }, m.drift.status),
        m.drift.open_alarms ? ` ${m.drift.open_alarms} open alarm(s)` : "",
        h("div", { class: "muted" }, `checked ${when(m.drift.last_checked)}`),
      ),
    ),
  );
  ctx.view.replaceChildren(
    h("h1", {}, "Fleet"),
    figures,
    h(
      "table",
      { id: "fleet" },
      h(
        "thead",
        {},
        h("tr", {}, ...["Model", "Versions", "Champion", "Challenger", "Shadow", "Live traffic", "Pending", "Drift"].map((t) => h("th", {}, t))),
      ),
      h("tbody", {}, ...rows),
    ),
    rows.length ? "" : h("p", { class: "muted" }, "No models registered yet."),
    h("h2", {}, "Why versions were rejected"),
    reasons,
  );
}
