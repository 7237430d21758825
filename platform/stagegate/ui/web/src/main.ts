// The app shell: sign-in, the navigation and a hash router (the hash never holds a token).

import { ApiError, get, token } from "./api.js";
import { h } from "./dom.js";
import { auditPage } from "./pages/audit.js";
import { cardPage } from "./pages/card.js";
import { fleetPage } from "./pages/fleet.js";
import { inboxPage } from "./pages/inbox.js";
import { lineagePage } from "./pages/lineage.js";
import { loginPage } from "./pages/login.js";
import { modelPage } from "./pages/model.js";
import type { Me } from "./types.js";

export interface Route {
  parts: string[];
  query: URLSearchParams;
}

export interface Context {
  me: Me;
  route: Route;
  view: HTMLElement;
}

const NAV: [string, string][] = [
  ["fleet", "Fleet"],
  ["inbox", "Approvals"],
  ["audit", "Audit log"],
];

let me: Me | null = null;

function parse(hash: string): Route {
  const [path, qs] = hash.replace(/^#\/?/, "").split("?", 2);
  return {
    parts: path.split("/").filter(Boolean).map(decodeURIComponent),
    query: new URLSearchParams(qs ?? ""),
  };
}

function header(route: Route): void {
  const nav = document.getElementById("nav") as HTMLElement;
  const who = document.getElementById("who") as HTMLElement;
  nav.replaceChildren(
    ...(me ? NAV.map(([key, label]) => h("a", { href: `#/${key}`, class: route.parts[0] === key ? "active" : null }, label)) : []),
  );
  who.replaceChildren(
    ...(me
      ? [
          h("span", { "data-me": me.name, "data-role": me.role }, `${me.name} (${me.role})`),
          h("button", { type: "button", id: "sign-out", onclick: signOut }, "Sign out"),
        ]
      : []),
  );
}

function signOut(): void {
  token.clear();
  me = null;
  location.hash = "#/login";
  void render();
}

export async function signIn(secret: string): Promise<void> {
  me = await get<Me>("/me", {}, secret);
  token.set(secret);
  // A deep link (#/inbox) survives signing in; a bare visit lands on the fleet.
  const route = parse(location.hash);
  if (!route.parts.length || route.parts[0] === "login") location.hash = "#/fleet";
  else await render();
}

async function render(): Promise<void> {
  const view = document.getElementById("view") as HTMLElement;
  const route = parse(location.hash);
  if (!me && token.get()) {
    try {
      me = await get<Me>("/me");
    } catch {
      me = null;
    }
  }
  if (!me) {
    header(route);
    await loginPage(view);
    return;
  }
  if (!route.parts.length || route.parts[0] === "login") route.parts = ["fleet"];
  header(route);
  const ctx: Context = { me, route, view };
  view.replaceChildren(h("p", { class: "muted" }, "Loading…"));
  view.dataset.page = route.parts[0];
  view.removeAttribute("data-ready");
  try {
    const [page, ...rest] = route.parts;
    if (page === "fleet") await fleetPage(ctx);
    else if (page === "models" && rest[0]) await modelPage(ctx, rest[0]);
    else if (page === "inbox") await inboxPage(ctx);
    else if (page === "lineage" && rest[1]) await lineagePage(ctx, rest[0], Number(rest[1]));
    else if (page === "card" && rest[1]) await cardPage(ctx, rest[0], Number(rest[1]));
    else if (page === "audit") await auditPage(ctx);
    else view.replaceChildren(h("h1", {}, "Not found"), h("p", {}, `No page at ${location.hash}`));
  } catch (err) {
    const text = err instanceof ApiError ? `${err.status}: ${err.message}` : String(err);
    view.replaceChildren(h("h1", {}, "Something went wrong"), h("p", { class: "error" }, text));
  }
  // Tests and people alike can tell a finished page from a loading one.
  view.dataset.ready = "true";
}

window.addEventListener("hashchange", () => void render());
window.addEventListener("stagegate:signed-out", () => {
  me = null;
  location.hash = "#/login";
});
void render();
