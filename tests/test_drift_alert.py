"""Drift alerts: signed, retried with backoff, every attempt recorded, once per alarm, and
never sent to a host the outbound allow-list refuses. The receiver is a real HTTP server."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from sqlalchemy.engine import Engine

from stagegate.db import transaction
from stagegate.events import alert
from stagegate.events.sink import MemorySink
from stagegate.governance import alarms, audit
from stagegate.lifecycle.policy import DriftActions
from stagegate.settings import AlertSettings
from tests.factories import Factory
from tests.test_drift_step import World, frame

SECRET = "s" * 40


class Receiver:
    """Answers the queued statuses in order (then 200), and keeps what it received."""

    def __init__(self) -> None:
        self.statuses: list[int] = []
        self.received: list[tuple[dict[str, str], bytes]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.received.append((dict(self.headers), body))
                self.send_response(outer.statuses.pop(0) if outer.statuses else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/drift"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()
    r.server.server_close()


@pytest.fixture
def world(engine: Engine, factory: Factory, sink: MemorySink, tmp_path) -> World:  # type: ignore[no-untyped-def]
    w = World(engine, factory, sink, str(tmp_path))
    w.current = frame(2, shift=30, new_category=True)
    return w


def _with_alerts(world: World, url: str, **settings: object) -> None:
    world.drift(actions=DriftActions(alert_url=url, emit_event=False))
    base = {"secret": SECRET, "allow_private_hosts": True, "backoff_s": 0.01}
    world.monitor = world.monitor.__class__(
        **{**world.monitor.__dict__, "alerts": AlertSettings(**{**base, **settings})}
    )


def _actions(world: World) -> list[str]:
    with transaction(world.engine) as s:
        rows = audit.entries(s, entity_id="fraud/2", offset=0, limit=100)
    return [r.action for r in reversed(rows) if r.action.startswith("drift.alert")]


def test_an_alert_is_signed_retried_recorded_and_sent_once_per_alarm(
    world: World, receiver: Receiver
) -> None:
    _with_alerts(world, receiver.url)
    receiver.statuses = [503, 500]
    outcome = world.check()
    assert outcome.actions["alert"] == "delivered: HTTP 200"
    assert len(receiver.received) == 3
    headers, body = receiver.received[-1]
    assert alert.verify(
        SECRET, headers["X-Stagegate-Timestamp"], body, headers["X-Stagegate-Signature"]
    )
    assert not alert.verify(
        "another secret", headers["X-Stagegate-Timestamp"], body, headers["X-Stagegate-Signature"]
    )
    assert headers["X-Stagegate-Delivery"] == outcome.alarm_id
    assert headers["Host"] == receiver.url.split("/")[2]  # sent to the checked address
    assert b'"drifted_features":["amount","channel"]' in body
    assert _actions(world) == [
        "drift.alert_attempt",
        "drift.alert_attempt",
        "drift.alert_attempt",
        "drift.alert_delivered",
    ]
    with transaction(world.engine) as s:
        [alarm] = alarms.list_for(s, "fraud", 2)
    assert (alarm.alert_status, alarm.alert_attempts) == ("delivered", 3)
    world.check()  # the same window; the alarm has had its alert
    assert len(receiver.received) == 3


def test_a_refusing_receiver_is_not_retried_and_a_dead_one_fails_after_the_attempts(
    world: World, receiver: Receiver
) -> None:
    _with_alerts(world, receiver.url, attempts=3)
    receiver.statuses = [400]
    assert world.check().actions["alert"].startswith("failed: 1 attempts, last: HTTP 400")
    dead = "http://127.0.0.1:9/nobody-listens"
    result = alert.send_alert(
        dead,
        {"x": 1},
        delivery_id="d",
        settings=AlertSettings(secret=SECRET, allow_private_hosts=True, attempts=3, backoff_s=0),
    )
    assert result.status == "failed"
    assert [a.error is not None for a in result.attempts] == [True, True, True]


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://[::ffff:127.0.0.1]:{port}/hooks/drift",
        "http://127.0.0.1:{port}/hooks/drift",
        "http://user:pw@example.org@127.0.0.1:{port}/hooks/drift",
        "http://127.0.0.1:{port}/hooks/%2e%2e/admin",
    ],
)
def test_an_alert_to_a_refused_address_is_never_sent(
    world: World, receiver: Receiver, url: str
) -> None:
    port = receiver.server.server_address[1]
    _with_alerts(world, url.format(port=port), allow_private_hosts=False)
    outcome = world.check()
    assert outcome.actions["alert"].startswith("refused: alert URL refused")
    assert receiver.received == []
    assert _actions(world) == ["drift.alert_refused"]


def test_no_alert_leaves_unsigned(world: World, receiver: Receiver) -> None:
    _with_alerts(world, receiver.url, secret=None)
    assert world.check().actions["alert"].startswith("refused: no alert secret")
    assert receiver.received == []


def test_a_policy_refuses_an_alert_url_that_is_not_http_and_the_sender_too() -> None:
    with pytest.raises(ValueError, match="http"):
        DriftActions(alert_url="file:///etc/passwd")
    sent = alert.send_alert(
        "file:///etc/passwd", {}, delivery_id="d", settings=AlertSettings(secret=SECRET)
    )
    assert sent.status == "refused"
    assert sent.attempts == ()
