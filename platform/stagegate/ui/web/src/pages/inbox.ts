// Approvals inbox: every pending transition, with its gates and what the caller may do.

import { ApiError, get, post } from "../api.js";
import { h, link, modelHref, when } from "../dom.js";
import type { Context } from "../main.js";
import type { Allowed, Page, Transition } from "../types.js";

const NOT_SAID: Allowed = { allowed: false, reason: "the API did not say whether you may act" };

function actionable(t: Transition): boolean {
  const a = t.allowed_actions;
  return !!a && (a.approve.allowed || a.reject.allowed);
}

export function transitionCard(t: Transition): HTMLElement {
  const allowed = t.allowed_actions ?? { approve: NOT_SAID, reject: NOT_SAID };
  const comment = h("textarea", { "data-comment": "", "aria-label": "Comment", placeholder: "Comment (kept in the audit log)" });
  const error = h("p", { class: "error", "data-error": "" });
  const card = h("section", { class: "card transition", "data-transition": t.id, "data-status": t.status });
  const decide = async (decision: "approve" | "reject", button: HTMLButtonElement): Promise<void> => {
    button.disabled = true;
    error.textContent = "";
    try {
      const updated = await post<Transition>(`/transitions/${encodeURIComponent(t.id)}/approvals`, {
        decision,
        comment: comment.value || null,
      });
      card.replaceWith(transitionCard(updated));
    } catch (err) {
      error.textContent = err instanceof ApiError ? err.message : String(err);
      button.disabled = false;
    }
  };
  const control = (decision: "approve" | "reject", label: string, cls: string): HTMLElement[] => {
    const a = allowed[decision];
    const button = h("button", { type: "button", class: cls, "data-action": decision, disabled: !a.allowed, title: a.reason ?? null }, label);
    button.addEventListener("click", () => void decide(decision, button));
    if (a.allowed) return [button];
    return [button, h("span", { class: "reason", "data-reason-for": decision }, a.reason ?? "not allowed")];
  };
  card.append(
    h(
      "h2",
      {},
      link(modelHref(t.model, t.version), `${t.model} v${t.version}`),
      `: ${t.from_stage} → ${t.to_stage} `,
      h("span", { class: `badge status-${t.status}`, "data-field": "status" }, t.status),
    ),
    h("p", {}, `Requested by ${t.requested_by} at ${when(t.created_at)}: `, h("em", {}, t.reason)),
    t.status_reason ? h("p", { class: "muted", "data-field": "status-reason" }, t.status_reason) : "",
    h("h3", {}, "Gates"),
    h(
      "ul",
      { class: "gates" },
      ...t.gates.map((g) =>
        h("li", { class: g.passed ? "passed" : "failed", "data-gate": g.gate, "data-passed": String(g.passed) }, h("strong", {}, g.gate), `: ${g.reason}`),
      ),
    ),
    t.approvals.length
      ? h(
          "ul",
          { class: "approvals" },
          ...t.approvals.map((a) =>
            h(
              "li",
              { "data-approver": a.approver, "data-decision": a.decision },
              `${a.approver} (${a.role}): ${a.decision} at ${when(a.created_at)}`,
              a.comment ? ` “${a.comment}”` : "",
            ),
          ),
        )
      : h("p", { class: "muted" }, "No decisions yet."),
    comment,
    h("div", { class: "actions" }, ...control("approve", "Approve", "primary"), ...control("reject", "Reject", "danger")),
    error,
    h(
      "p",
      {},
      link(`#/lineage/${encodeURIComponent(t.model)}/${t.version}`, "lineage"),
      " · ",
      link(`#/card/${encodeURIComponent(t.model)}/${t.version}`, "model card"),
    ),
  );
  return card;
}

export async function inboxPage(ctx: Context): Promise<void> {
  const page = await get<Page<Transition>>("/transitions", { status: "pending", limit: 200 });
  const all = [...page.data].sort((a, b) => Number(actionable(b)) - Number(actionable(a)));
  const mine = all.filter(actionable);
  // Everything pending by default, so people see what waits on others and why they can't act.
  const onlyMine = ctx.route.query.get("mine") === "1";
  const items = onlyMine ? mine : all;
  const toggle = h("input", { type: "checkbox", id: "only-mine", checked: onlyMine });
  toggle.addEventListener("change", () => {
    location.hash = toggle.checked ? "#/inbox?mine=1" : "#/inbox";
  });
  ctx.view.replaceChildren(
    h("h1", {}, "Approvals"),
    h(
      "p",
      { id: "inbox-summary", "data-pending": all.length, "data-actionable": mine.length },
      `${all.length} pending; you (${ctx.me.name}, ${ctx.me.role}) may act on ${mine.length}. `,
      h("label", {}, toggle, " only those I may act on"),
    ),
    ...(items.length ? items.map(transitionCard) : [h("p", { class: "muted" }, "Nothing is waiting for you.")]),
  );
}
