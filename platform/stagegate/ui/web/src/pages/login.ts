// Sign in with a bearer token; in the embedded stack, pick one of the demo's people.

import { ApiError } from "../api.js";
import { h } from "../dom.js";
import { signIn } from "../main.js";

interface DemoUser {
  name: string;
  role: string;
  token: string;
}

export async function loginPage(view: HTMLElement): Promise<void> {
  const input = h("input", { type: "password", id: "token", autocomplete: "off", placeholder: "sg_…", "aria-label": "API token" });
  const message = h("p", { class: "error", id: "login-error" });
  const go = async (secret: string): Promise<void> => {
    message.textContent = "";
    try {
      await signIn(secret.trim());
    } catch (err) {
      message.textContent = err instanceof ApiError ? err.message : String(err);
    }
  };
  const form = h(
    "form",
    { id: "login-form" },
    h("label", { for: "token" }, "API token (from `stagegate token create`)"),
    input,
    h("button", { type: "submit", class: "primary" }, "Sign in"),
  );
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    void go(input.value);
  });
  const demo = h("div", { class: "demo-users", id: "demo-users" });
  view.replaceChildren(
    h(
      "section",
      { class: "card login" },
      h("h1", {}, "Sign in"),
      form,
      message,
      h("p", { class: "muted" }, "The token stays in this tab's session storage and is sent only as a bearer header."),
      demo,
    ),
  );
  view.dataset.page = "login";
  // Only the embedded stack (dev mode, this machine) serves its demo people.
  const r = await fetch("demo-users.json", { credentials: "omit", cache: "no-store" });
  if (r.ok) {
    const users = (await r.json()) as DemoUser[];
    demo.append(
      h("h2", {}, "Demo users"),
      ...users.map((u) =>
        h("button", { type: "button", "data-user": u.name, onclick: () => void go(u.token) }, `${u.name} (${u.role})`),
      ),
    );
  }
  view.dataset.ready = "true";
}
