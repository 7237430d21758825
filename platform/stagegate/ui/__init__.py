"""The web UI: its built static files (`make ui` builds them from `web/`), mounted at /ui.

A mount, not API routes: it carries no data, and every page reads the API with the bearer
token the browser keeps in its tab's session storage.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

from starlette.responses import FileResponse, PlainTextResponse, Response
from starlette.staticfiles import StaticFiles
from starlette.types import Message, Receive, Scope, Send

from stagegate.settings import Settings

STATIC = Path(__file__).parent / "static"
DEMO_USERS = "demo-users.json"  # under settings.home, written by `stagegate demo` (dev only)

# Same origin only, no inline script or style, nothing from a CDN; the pages may not be framed.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


def demo_users_path(settings: Settings) -> Path:
    return settings.home / DEMO_USERS


def _loopback(scope: Scope) -> bool:
    client = scope.get("client")
    if not client:
        return False
    try:
        return ipaddress.ip_address(client[0]).is_loopback
    except ValueError:
        return False


class UiApp:
    """Static files with the UI's security headers, plus the demo users of the embedded
    stack: served only outside prod mode and only to a client on this machine."""

    def __init__(self, settings: Settings, directory: Path = STATIC) -> None:
        self.settings = settings
        self.directory = directory
        self.files = StaticFiles(directory=directory, html=True, check_dir=False)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        rest = path[len(root) :] if path.startswith(root) else path
        response: Response | None = None
        if scope["type"] != "http":
            response = PlainTextResponse("not found", status_code=404)
        elif rest == f"/{DEMO_USERS}":
            response = self._demo_users(scope)
        elif not (self.directory / "index.html").is_file():
            response = PlainTextResponse(
                "The web UI is not built: run `make ui` (npm) in the repository.", status_code=503
            )
        if response is not None:
            await response(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [(k.lower().encode(), v.encode()) for k, v in HEADERS.items()]
                message = {**message, "headers": headers}
            await send(message)

        await self.files(scope, receive, send_with_headers)

    def _demo_users(self, scope: Scope) -> Response:
        file = demo_users_path(self.settings)
        if self.settings.mode == "prod" or not _loopback(scope) or not file.is_file():
            return PlainTextResponse("not found", status_code=404)
        return FileResponse(
            file, media_type="application/json", headers={"Cache-Control": "no-store", **HEADERS}
        )
