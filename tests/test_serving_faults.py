"""Serving faults with real processes: two `stagegate serve-model` servers and `stagegate router`.

One scikit-learn model is saved once (`mlflow.sklearn.save_model`, no MLflow server) and served
twice, as the champion (version 1) and the challenger (version 2): the versions are only labels
in the policy. The tests are ordered so that only test 4 restarts a server (each one still
(re)starts what it needs when run alone). Every process runs in a process group of its own,
and teardown SIGKILLs every group, so nothing outlives the module.

What is measured (the summary line each test prints, `pytest -s`, gives the numbers):

1. SIGTERM the router under load: every accepted request is answered, and logged exactly once.
2. SIGKILL the challenger under load: answers keep coming (fallback), from version 1.
3. A shadow that refuses connections: the client sees nothing, the log records every miss.
4. Restart the champion between two bursts: the router's pooled connections to the old process
   are dead; the next burst sees no error.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from stagegate.serving.inference_log.writer import read_records
from stagegate.serving.router.assign import assign, threshold

pytestmark = pytest.mark.slow  # every test here runs real processes

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "stagegate.cli"]
START_TIMEOUT_S = 60.0  # a model server imports mlflow before it answers: seconds on 2 cores
STOP_TIMEOUT_S = 15.0
MODEL = "faults"
COLUMNS = [f"f{i}" for i in range(20)]
ROWS = 2
BODY = orjson.dumps(
    {
        "dataframe_split": {
            "columns": COLUMNS,
            "data": [[round(0.1 * (r + 1) * (c - 9.5), 3) for c in range(20)] for r in range(ROWS)],
        }
    }
)
CONCURRENCY = 8


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_get(url: str) -> tuple[int | None, bytes]:
    """Status and body; (None, b"") when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return int(resp.status), bytes(resp.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), b""
    except OSError:
        return None, b""


def metric(base_url: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` on `base_url/metrics` whose labels include `labels`."""
    status, text = http_get(base_url + "/metrics")
    assert status == 200
    total = 0.0
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                total += sample.value
    return total


# --- processes ---------------------------------------------------------------------------------


class Proc:
    """One `stagegate` CLI process, leader of its own process group; output to a log file."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.log = log
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
        with log.open("ab") as out:
            self.popen = subprocess.Popen(
                [*CLI, *args],
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a process group of its own: killpg takes it all
            )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def kill(self) -> None:
        """SIGKILL the whole group and reap the leader (idempotent)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(STOP_TIMEOUT_S)

    def wait_until(self, url: str, what: str) -> None:
        """Until GET `url` answers 200 (bounded), failing if the process dies first."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while http_get(url)[0] != 200:
            if not self.alive() or time.monotonic() > deadline:
                pytest.fail(f"{what} did not become healthy:\n{self.tail()}")
            time.sleep(0.05)


class ModelServer:
    """`stagegate serve-model PATH --port P --device cpu`; restartable on the same port."""

    def __init__(self, name: str, model_path: Path, logs: Path) -> None:
        self.name = name
        self.model_path = model_path
        self.logs = logs
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: Proc | None = None
        self.starts = 0

    def start(self) -> None:
        assert self.proc is None or not self.proc.alive()
        self.starts += 1
        args = ["serve-model", str(self.model_path), "--port", str(self.port), "--device", "cpu"]
        self.proc = Proc(args, self.logs / f"{self.name}-{self.starts}.log")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.alive()

    def wait_healthy(self) -> None:
        assert self.proc is not None
        self.proc.wait_until(self.url + "/health", f"model server {self.name}")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()


@dataclass
class Arms:
    champion: ModelServer  # version 1
    challenger: ModelServer  # version 2

    def ensure_up(self, *names: str) -> None:
        """(Re)start the named servers that are down, then wait until they are healthy."""
        servers = [getattr(self, name) for name in names or ("champion", "challenger")]
        for server in servers:
            if not server.alive():
                server.start()
        for server in servers:
            server.wait_healthy()


def _save_model(path: Path) -> None:
    import mlflow.sklearn
    import numpy as np
    import pandas as pd
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    features = pd.DataFrame(rng.normal(size=(300, len(COLUMNS))), columns=COLUMNS)
    target = (features["f0"] + features["f3"] > 0).astype(int)
    model = LogisticRegression().fit(features, target)
    mlflow.sklearn.save_model(model, str(path), input_example=features.head(3))


@pytest.fixture(scope="module")
def arms(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Arms]:
    base = tmp_path_factory.mktemp("serving-faults")
    _save_model(base / "model")
    both = Arms(
        ModelServer("champion", base / "model", base),
        ModelServer("challenger", base / "model", base),
    )
    try:
        both.ensure_up()  # started together, so they load in parallel
        yield both
    finally:
        both.champion.kill()
        both.challenger.kill()


class Router:
    """`stagegate router --policy FILE --port P --log-dir DIR`."""

    def __init__(self, tmp: Path, policy: dict[str, Any]) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        self.policy_path = tmp / "policy.json"
        self.policy_path.write_bytes(orjson.dumps({"policies": [policy]}))
        self.log_dir = tmp / "inference-log"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.invocations = f"{self.url}/models/{MODEL}/invocations"
        args = ["router", "--policy", str(self.policy_path), "--port", str(self.port)]
        args += ["--log-dir", str(self.log_dir), "--log-level", "warning"]
        self.proc = Proc(args, tmp / "router.log")
        self.proc.wait_until(self.url + "/health", "router")

    def metric(self, name: str, **labels: str) -> float:
        return metric(self.url, name, **labels)

    def terminate(self) -> int:
        """SIGTERM (to the router itself), then its exit code."""
        self.proc.popen.send_signal(signal.SIGTERM)
        try:
            return self.proc.popen.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"router ignored SIGTERM:\n{self.proc.tail()}")

    def records(self) -> list[dict[str, Any]]:
        assert not self.proc.alive(), "terminate() first: SIGTERM is what flushes the log"
        rows: list[dict[str, Any]] = read_records(str(self.log_dir), model=MODEL).to_pylist()
        return rows


@pytest.fixture
def start_router(tmp_path: Path) -> Iterator[Callable[[dict[str, Any]], Router]]:
    started: list[Router] = []

    def start(policy: dict[str, Any]) -> Router:
        router = Router(tmp_path / f"router{len(started)}", policy)
        started.append(router)
        return router

    yield start
    for router in started:
        router.proc.kill()


def policy(arms: Arms, **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"model": MODEL, "champion": {"version": 1, "url": arms.champion.url}}
    if extra.get("challenger_weight", 0) > 0:
        out["challenger"] = {"version": 2, "url": arms.challenger.url}
    return {**out, **extra}


# --- an aiohttp client (keep-alive), for the tests that count answers ---------------------------


@dataclass
class Reply:
    key: str
    rid: str
    started: float
    ended: float
    status: int | None  # None: no HTTP answer at all
    version: int | None
    role: str | None
    predictions: int  # how many predictions the body held
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.predictions == ROWS


async def _post(session: aiohttp.ClientSession, url: str, key: str) -> Reply:
    rid = uuid.uuid4().hex
    headers = {"content-type": "application/json", "x-stagegate-key": key, "x-request-id": rid}
    started = time.monotonic()
    try:
        async with session.post(url, data=BODY, headers=headers) as resp:
            body = await resp.read()
            version = resp.headers.get("x-stagegate-version")
            # The router logs under its own id, which keeps ours as a prefix.
            logged_as = resp.headers.get("x-request-id", "")
            assert logged_as.startswith(f"{rid}~"), logged_as
            reply = Reply(
                key,
                logged_as,
                started,
                time.monotonic(),
                resp.status,
                int(version) if version else None,
                resp.headers.get("x-stagegate-role"),
                0,
            )
            if resp.status == 200:
                reply.predictions = len(orjson.loads(body)["predictions"])
            return reply
    except (aiohttp.ClientError, TimeoutError) as exc:
        return Reply(key, rid, started, time.monotonic(), None, None, None, 0, repr(exc))


async def drive(
    url: str,
    *,
    prefix: str,
    count: int | None = None,
    duration_s: float | None = None,
    workers: int = CONCURRENCY,
) -> list[Reply]:
    """`workers` clients, one request at a time each, a fresh key per request; until `count`
    requests have been sent or `duration_s` has passed."""
    assert (count is None) != (duration_s is None)
    until = time.monotonic() + (duration_s if duration_s is not None else 60.0)
    replies: list[Reply] = []
    sent = 0
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def worker(w: int) -> None:
            nonlocal sent
            i = 0
            while time.monotonic() < until and (count is None or sent < count):
                sent += 1
                replies.append(await _post(session, url, f"{prefix}-{w}-{i}"))
                i += 1

        await asyncio.gather(*(worker(w) for w in range(workers)))
    return replies


def is_challengers(key: str, weight: float) -> bool:
    return assign(MODEL, key, threshold(weight), random.Random()) == "challenger"


# --- 1. SIGTERM to the router under load ---------------------------------------------------------


@dataclass
class Sent:
    """One request over a fresh connection, with when each step finished (monotonic)."""

    rid: str
    started: float
    connected: float | None = None  # None: the connection was refused, nothing was sent
    sent: float | None = None  # the whole request handed to the kernel
    ended: float = 0.0
    status: int | None = None  # None: no complete HTTP answer
    version: int | None = None
    role: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200


async def raw_post(port: int, key: str) -> Sent:
    """POST with `Connection: close`, reading until EOF, so each phase is observable:
    connect (refused = never accepted), send (timestamped), answer (complete or not)."""
    result = Sent(rid=uuid.uuid4().hex, started=time.monotonic())
    head = (
        f"POST /models/{MODEL}/invocations HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nX-Stagegate-Key: {key}\r\n"
        f"X-Request-Id: {result.rid}\r\nContent-Length: {len(BODY)}\r\nConnection: close\r\n\r\n"
    ).encode()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError as exc:
        result.ended = time.monotonic()
        result.error = repr(exc)
        return result
    result.connected = time.monotonic()
    try:
        writer.write(head + BODY)
        await writer.drain()
        result.sent = time.monotonic()
        raw = await asyncio.wait_for(reader.read(), 10)
    except (OSError, TimeoutError) as exc:
        result.error = repr(exc)
        raw = b""
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    result.ended = time.monotonic()
    head_bytes, _, body = raw.partition(b"\r\n\r\n")
    lines = head_bytes.decode("latin-1").split("\r\n")
    if not lines[0].startswith("HTTP/1.1 "):
        result.error = result.error or f"no answer ({len(raw)} bytes)"
        return result
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    if len(body) != int(headers.get("content-length", -1)):
        result.error = f"truncated answer ({len(body)} body bytes)"
        return result
    result.status = int(lines[0].split()[1])
    result.version = (
        int(headers["x-stagegate-version"]) if "x-stagegate-version" in headers else None
    )
    result.role = headers.get("x-stagegate-role")
    # The router logs under its own id, which keeps ours as a prefix.
    logged_as = headers.get("x-request-id", "")
    assert logged_as.startswith(f"{result.rid}~"), logged_as
    result.rid = logged_as
    return result


def test_sigterm_to_the_router_under_load_answers_and_logs_every_accepted_request(
    arms: Arms, start_router: Callable[[dict[str, Any]], Router]
) -> None:
    """How an outcome is told apart (t_sig: taken just before the signal is sent):

    - answered: a complete 200 (Content-Length honoured) -> the ledger.
    - refused: `open_connection` raised -> never accepted. Not a failure after t_sig; a worker
      stops at its first refusal (the listener is closed).
    - accepted and failed: the request was fully handed to the kernel before t_sig (so before
      shutdown could begin), yet no complete 200 came back. Must be none.
    - cut after t_sig: connected or sent after the signal, then closed without an answer (the
      listener's backlog reset at close). Not accepted; but the router must not have logged it
      (a logged request is one it answered).
    """
    arms.ensure_up()
    weight = 0.5
    router = start_router(policy(arms, challenger_weight=weight))
    marks: dict[str, float] = {}

    async def scenario() -> list[Sent]:
        results: list[Sent] = []
        hard_stop = time.monotonic() + 20  # bounded even if the router never stops

        async def client(w: int) -> None:
            i = 0
            while time.monotonic() < hard_stop:
                result = await raw_post(router.port, f"term-{w}-{i}")
                results.append(result)
                i += 1
                if result.connected is None:
                    return  # refused: the listener is gone

        async def terminate() -> None:
            await asyncio.sleep(1.5)
            marks["sig"] = time.monotonic()
            router.proc.popen.send_signal(signal.SIGTERM)

        await asyncio.gather(terminate(), *(client(w) for w in range(CONCURRENCY)))
        return results

    results = asyncio.run(scenario())
    code = router.proc.popen.wait(STOP_TIMEOUT_S)
    t_sig = marks["sig"]

    ledger = [r for r in results if r.ok]
    refused = [r for r in results if r.connected is None]
    accepted_failed = [r for r in results if not r.ok and r.sent is not None and r.sent < t_sig]
    bad_answers = [r for r in results if r.status is not None and not r.ok]
    early_refusals = [r for r in refused if r.started < t_sig]
    cut_late = [r for r in results if r.connected is not None and r.status is None]
    cut_late = [r for r in cut_late if r.sent is None or r.sent >= t_sig]
    drained = [r for r in ledger if r.ended > t_sig]

    records = router.records()
    answering = [r for r in records if r["role"] != "shadow"]
    per_request = Counter(r["request_id"] for r in answering)
    print(
        f"\n[router SIGTERM] sent={len(results)} ledger_200={len(ledger)} "
        f"answered_after_signal={len(drained)} refused={len(refused)} cut_after_signal="
        f"{len(cut_late)} accepted_failed={len(accepted_failed)} records={len(answering)} "
        f"duplicates={sum(c - 1 for c in per_request.values())} exit={code}"
    )
    for r in cut_late:  # when they went out, and how they ended
        print(f"  cut: connected {1000 * ((r.connected or 0) - t_sig):+.1f} ms, {r.error}")
    assert code == 0, router.proc.tail()
    assert accepted_failed == [], accepted_failed[:3]
    assert bad_answers == [], bad_answers[:3]
    assert early_refusals == []
    assert len(refused) == CONCURRENCY  # every client ended at a refusal, not the hard stop
    assert len(ledger) > 50
    assert drained, "nothing was in flight at the signal"

    # 0 lost records: each answered request has exactly one answering-arm record that matches
    # its answer; nothing the client did not receive was logged.
    assert max(per_request.values()) == 1
    assert set(per_request) == {r.rid for r in ledger}
    by_id = {r["request_id"]: r for r in answering}
    for sent in ledger:
        record = by_id[sent.rid]
        assert (record["role"], record["version"], record["status"]) == (
            sent.role,
            sent.version,
            200,
        )
    assert {r.version for r in ledger} == {1, 2}


# --- 2. the challenger dies under load -----------------------------------------------------------


def test_sigkill_of_the_challenger_under_load_is_covered_by_fallback(
    arms: Arms, start_router: Callable[[dict[str, Any]], Router]
) -> None:
    arms.ensure_up()
    weight = 0.5
    router = start_router(policy(arms, challenger_weight=weight, fallback_to_champion=True))
    marks: dict[str, float] = {}

    async def scenario() -> list[Reply]:
        async def killer() -> None:
            await asyncio.sleep(1.0)
            marks["kill"] = time.monotonic()
            await asyncio.to_thread(arms.challenger.kill)  # SIGKILL the group, then reap it
            marks["dead"] = time.monotonic()  # its sockets are closed by now

        replies, _ = await asyncio.gather(
            drive(router.invocations, prefix="kill", duration_s=4.0), killer()
        )
        return replies

    replies = asyncio.run(scenario())  # the challenger stays down: later tests do without it

    failures = [r for r in replies if not r.ok]
    before = [r for r in replies if r.ended < marks["kill"]]
    at_kill = [r for r in replies if r.started < marks["dead"] and r.ended >= marks["kill"]]
    after = [r for r in replies if r.started >= marks["dead"]]
    owed = [r for r in after if is_challengers(r.key, weight)]  # the challenger's keys
    fallbacks = router.metric("stagegate_router_fallbacks_total", model=MODEL)
    stale = router.metric("stagegate_router_stale_connection_retries_total")
    print(
        f"\n[kill challenger] requests={len(replies)} failures={len(failures)} "
        f"before={len(before)} at_kill={len(at_kill)} after={len(after)} "
        f"after_challenger_keys={len(owed)} fallbacks={fallbacks:g} stale_retries={stale:g}"
    )

    # The challenger was really serving its half before it died.
    assert {r.version for r in before if r.ok} == {1, 2}
    # Fallback covers refused and cut connections: at most the requests in flight may fail.
    assert len(failures) <= CONCURRENCY, failures[:3]
    # After the kill, every answer is the champion's: the challenger's keys fell back.
    assert len(after) >= 50
    assert [(r.status, r.version, r.role) for r in after if not r.ok] == []
    assert {(r.version, r.role) for r in after} == {(1, "champion")}
    assert owed, "no request after the kill was the challenger's to answer"
    assert fallbacks >= len(owed) > 0
    assert router.metric("stagegate_router_fallbacks_total", model=MODEL, reason="error") > 0
    assert router.terminate() == 0


# --- 3. a shadow that is down --------------------------------------------------------------------


def test_a_shadow_that_refuses_connections_costs_the_client_nothing(
    arms: Arms, start_router: Callable[[dict[str, Any]], Router]
) -> None:
    arms.ensure_up("champion")
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    router = start_router(policy(arms, shadow={"version": 3, "url": closed}, shadow_fraction=1.0))
    n = 500
    replies = asyncio.run(drive(router.invocations, prefix="shadow", count=n))
    assert len(replies) == n
    assert [r for r in replies if not r.ok] == []
    assert {(r.version, r.role) for r in replies} == {(1, "champion")}

    # Mirrors are fire-and-forget: wait (bounded) until each one is accounted for.
    deadline = time.monotonic() + 10
    while router.metric("stagegate_router_shadow_total", model=MODEL) < n:
        assert time.monotonic() < deadline, "shadow mirrors neither finished nor dropped"
        time.sleep(0.05)
    dropped = router.metric("stagegate_router_shadow_total", model=MODEL, outcome="dropped")
    failed = router.metric("stagegate_router_shadow_total", model=MODEL, outcome="failed")
    assert router.terminate() == 0

    records = router.records()
    champion = [r for r in records if r["role"] == "champion"]
    shadow = [r for r in records if r["role"] == "shadow"]
    print(
        f"\n[shadow down] requests={n} client_errors=0 champion_records={len(champion)} "
        f"shadow_records={len(shadow)} shadow_statuses={dict(Counter(r['status'] for r in shadow))}"
        f" failed={failed:g} dropped={dropped:g}"
    )
    assert (failed, dropped) == (n, 0)  # the queue (1000) holds them all: none dropped
    assert len(records) == 2 * n
    answered = {r.rid for r in replies}
    assert Counter(r["request_id"] for r in champion) == Counter(answered)
    assert {(r["version"], r["status"]) for r in champion} == {(1, 200)}
    assert Counter(r["request_id"] for r in shadow) == Counter(answered)
    assert {r["version"] for r in shadow} == {3}
    assert all(r["status"] == 599 or 500 <= r["status"] < 600 for r in shadow)
    assert all(r["output"] is None for r in shadow)


# --- 4. the champion restarts between two bursts -------------------------------------------------


def test_a_restarted_champion_leaves_no_stale_connection_error(
    arms: Arms, start_router: Callable[[dict[str, Any]], Router]
) -> None:
    arms.ensure_up("champion")
    router = start_router(policy(arms, timeout_ms=5000))
    burst = 200
    first = asyncio.run(drive(router.invocations, prefix="first", count=burst))
    assert [r for r in first if not r.ok] == []
    # The router now holds up to CONCURRENCY keep-alive connections to this process.
    old_pid = arms.champion.proc.pid if arms.champion.proc else None

    arms.champion.kill()
    arms.champion.start()  # the same port
    arms.champion.wait_healthy()
    assert arms.champion.proc is not None
    assert arms.champion.proc.pid != old_pid

    second = asyncio.run(drive(router.invocations, prefix="second", count=burst))
    stale = router.metric("stagegate_router_stale_connection_retries_total")
    reached = metric(arms.champion.url, "stagegate_model_requests_total")
    print(
        f"\n[champion restart] burst={burst} errors_first={sum(not r.ok for r in first)} "
        f"errors_second={sum(not r.ok for r in second)} stale_retries={stale:g} "
        f"new_server_requests={reached:g}"
    )
    assert [(r.status, r.error) for r in second if not r.ok] == []
    assert {(r.version, r.role) for r in second} == {(1, "champion")}
    # The promise: a dead pooled connection costs at most one retry on a fresh connection,
    # and only pooled connections can be stale. (In practice 0: the old process's FINs reach
    # the idle pooled connections first, so the pool drops them before they are reused.)
    assert stale <= CONCURRENCY
    assert reached == burst  # each request reached the new process exactly once
    assert router.metric("stagegate_router_requests_total", status="599") == 0
    assert router.terminate() == 0
