// The API client: same origin, bearer token from the tab's session storage, never a cookie.

const KEY = "stagegate.token";

export const token = {
  get: (): string | null => sessionStorage.getItem(KEY),
  set: (value: string): void => sessionStorage.setItem(KEY, value),
  clear: (): void => sessionStorage.removeItem(KEY),
};

export class ApiError extends Error {
  constructor(
    readonly status: number,
    message: string,
    readonly code: string | null,
  ) {
    super(message);
  }
}

type Query = Record<string, string | number | boolean | null | undefined>;

export function withQuery(path: string, query: Query = {}): string {
  const params = new URLSearchParams();
  for (const [k, v] of Object.entries(query)) {
    if (v !== null && v !== undefined && v !== "") params.set(k, String(v));
  }
  const qs = params.toString();
  return qs ? `${path}?${qs}` : path;
}

async function send(path: string, init: RequestInit = {}, secret?: string): Promise<Response> {
  const auth = secret ?? token.get();
  const headers = new Headers(init.headers);
  if (auth) headers.set("Authorization", `Bearer ${auth}`);
  const r = await fetch(path, { ...init, headers, credentials: "omit", cache: "no-store" });
  if (r.ok) return r;
  let message = `${r.status} ${r.statusText}`;
  let code: string | null = null;
  try {
    const body = await r.json();
    code = body.code ?? null;
    if (typeof body.detail === "string") message = body.detail;
    else if (Array.isArray(body.detail))
      message = body.detail.map((d: { loc: unknown[]; msg: string }) => `${d.loc.join(".")}: ${d.msg}`).join("; ");
  } catch {
    // not JSON: keep the status line
  }
  if (r.status === 401 && secret === undefined) {
    token.clear();
    window.dispatchEvent(new CustomEvent("stagegate:signed-out", { detail: message }));
  }
  throw new ApiError(r.status, message, code);
}

export async function get<T>(path: string, query: Query = {}, secret?: string): Promise<T> {
  const r = await send(withQuery(`/api/v1${path}`, query), {}, secret);
  return (await r.json()) as T;
}

export async function post<T>(path: string, body: unknown): Promise<T> {
  const r = await send(`/api/v1${path}`, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
  return (await r.json()) as T;
}

/** Fetch with the token and save the answer as a file (a plain link would carry no token). */
export async function download(path: string, filename: string): Promise<void> {
  const r = await send(path);
  const url = URL.createObjectURL(await r.blob());
  const a = document.createElement("a");
  a.href = url;
  a.download = filename;
  document.body.appendChild(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}
