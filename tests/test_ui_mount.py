"""The web UI's mount: static pages under /ui with their security headers, outside the API
(no OpenAPI entry), and the demo users file: written 0600, served only in dev mode to this
machine."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine

from stagegate.api.app import create_app
from stagegate.demo import PEOPLE, write_demo_users
from stagegate.events.sink import MemorySink
from stagegate.settings import Settings
from stagegate.ui import CSP, STATIC, UiApp, demo_users_path

LOCAL = ("127.0.0.1", 50000)
SECRETS = {name: f"sg_test_{name}" for name in PEOPLE}


def ui_client(settings: Settings, engine: Engine, *, client: tuple[str, int] = LOCAL) -> TestClient:
    return TestClient(create_app(settings, engine=engine, sink=MemorySink()), client=client)


def test_pages_are_served_with_a_strict_csp_and_no_api_route(
    settings: Settings, engine: Engine
) -> None:
    assert (STATIC / "index.html").is_file(), "run `make ui` first"
    c = ui_client(settings, engine)
    r = c.get("/ui", follow_redirects=False)  # pages load their assets relative to /ui/
    assert r.is_redirect
    assert r.headers["location"].endswith("/ui/")
    page = c.get("/ui/")
    assert page.status_code == 200
    assert page.headers["content-security-policy"] == CSP
    assert "script-src 'self'" in CSP
    assert "https:" not in CSP
    assert '<script type="module" src="js/main.js">' in page.text
    script = c.get("/ui/js/main.js")
    assert script.status_code == 200
    assert "javascript" in script.headers["content-type"]
    # A mount, not an API route: the OpenAPI document and the route audit never see it.
    assert not [p for p in c.get("/api/openapi.json").json()["paths"] if p.startswith("/ui")]
    assert c.get("/ui/nope.js").status_code == 404


def test_an_unbuilt_ui_answers_503_with_the_fix(settings: Settings, tmp_path: Path) -> None:
    c = TestClient(UiApp(settings, directory=tmp_path / "empty"), client=LOCAL)
    r = c.get("/index.html")
    assert r.status_code == 503
    assert "make ui" in r.text


def test_demo_users_file_is_private_and_lists_the_demo_people(settings: Settings) -> None:
    path = write_demo_users(settings, SECRETS)
    assert path == demo_users_path(settings)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    doc = json.loads(path.read_text())
    assert [(u["name"], u["role"], u["token"]) for u in doc] == [
        (n, PEOPLE[n].value, SECRETS[n]) for n in SECRETS
    ]
    assert {u["role"] for u in doc} >= {"author", "approver", "viewer", "admin"}
    path.chmod(0o644)  # a loose older file is tightened when rewritten
    write_demo_users(settings, SECRETS)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_prod_mode_never_writes_demo_tokens(settings: Settings) -> None:
    prod = settings.model_copy(update={"mode": "prod"})
    with pytest.raises(ValueError, match="prod"):
        write_demo_users(prod, SECRETS)
    assert not demo_users_path(prod).exists()


def test_demo_users_are_served_only_in_dev_mode_to_this_machine(
    settings: Settings, engine: Engine
) -> None:
    assert ui_client(settings, engine).get("/ui/demo-users.json").status_code == 404  # none yet
    write_demo_users(settings, SECRETS)
    r = ui_client(settings, engine).get("/ui/demo-users.json")
    assert r.status_code == 200
    assert r.headers["cache-control"] == "no-store"
    assert {u["name"] for u in r.json()} == set(PEOPLE)
    remote = ui_client(settings, engine, client=("203.0.113.9", 40000))
    assert remote.get("/ui/demo-users.json").status_code == 404
    prod = settings.model_copy(update={"mode": "prod"})
    assert ui_client(prod, engine).get("/ui/demo-users.json").status_code == 404
