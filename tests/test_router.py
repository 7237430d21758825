"""The traffic router as a real process, in front of real (tiny) HTTP model servers."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import uvicorn
import yaml
from prometheus_client.parser import text_string_to_metric_families

from stagegate.serving.inference_log.records import InferenceRecord
from stagegate.serving.router.assign import assign, threshold

pytestmark = pytest.mark.slow  # every test here runs real processes

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 20.0
CLI = [sys.executable, "-m", "stagegate.cli"]
BODY = {"inputs": [[0.1, 0.2, 0.3]]}


# --- the in-memory inference log, used inside the router process ---------------------------


class MemoryLog:
    """An `InferenceLogWriter` that keeps records in memory; close() dumps them as JSON lines
    (so the test process can read what the router process logged)."""

    def __init__(self, dump: Path) -> None:
        self.dump = dump
        self.records: list[InferenceRecord] = []
        self.closed = False

    def append(self, record: InferenceRecord) -> None:
        self.records.append(record)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        # The raw body (bytes) goes out as text: orjson writes no bytes.
        lines = [orjson.dumps(dataclasses.asdict(r), default=_text) for r in self.records]
        self.dump.write_bytes(b"\n".join(lines) + b"\n" if lines else b"")


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    raise TypeError(type(value).__name__)


def router_main() -> None:
    """The router subprocess: `python -c 'from tests.test_router import router_main; ...' ARGS`."""
    from stagegate.serving.router.config import FilePolicySource
    from stagegate.serving.router.server import Router, serve

    args = json.loads(sys.argv[1])
    router = Router(
        FilePolicySource(args["policy"]),
        MemoryLog(Path(args["dump"])),
        shadow_queue_size=args["queue"],
        shadow_workers=args["workers"],
        poll_interval_s=args["poll"],
        shadow_drain_s=0.5,
    )
    serve(router, host="127.0.0.1", port=args["port"], log_level="warning")


# --- upstreams: tiny real model servers on a background event loop --------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ModelApp:
    """Answers `{"predictions": [version]}`; `mode` "error" answers 500; `delay_s` sleeps first."""

    def __init__(self, version: int, mode: str, delay_s: float) -> None:
        self.version = version
        self.mode = mode
        self.delay_s = delay_s
        self.hits = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        self.hits += 1
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        status, payload = 200, {"predictions": [self.version], "version": self.version}
        if self.mode == "error":
            status, payload = 500, {"error": "boom"}
        body = orjson.dumps(payload)
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


@dataclasses.dataclass
class Upstream:
    url: str
    app: ModelApp | None = None


class StaleServer:
    """Answers the first request on a connection; at the next one it closes without a byte,
    like a backend whose keep-alive timeout fired just as the request went out."""

    def __init__(self) -> None:
        self.requests = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        served = False
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                await reader.readexactly(length)
                self.requests += 1
                if served:
                    break
                served = True
                body = b'{"predictions":[7]}'
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def close_delimited(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """An old-style answer: no Content-Length, the body ends when the connection does."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    await reader.readexactly(length)
    writer.write(b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{"predictions":[9]}')
    await writer.drain()
    writer.close()


class Upstreams:
    """Real HTTP servers (uvicorn, raw ASGI) sharing one event loop in a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self._servers: list[tuple[uvicorn.Server, concurrent.futures.Future[None]]] = []
        self._raw: list[asyncio.Server] = []

    def start(
        self, version: int, *, mode: str = "ok", delay_s: float = 0.0, keep_alive_s: int = 5
    ) -> Upstream:
        app = ModelApp(version, mode, delay_s)
        port = free_port()
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=port,
            lifespan="off",
            log_config=None,
            log_level="warning",
            access_log=False,
            timeout_keep_alive=keep_alive_s,
        )
        server = uvicorn.Server(config)
        future = asyncio.run_coroutine_threadsafe(server.serve(), self.loop)
        self._servers.append((server, future))
        deadline = time.monotonic() + START_TIMEOUT_S
        while not server.started:
            assert not future.done(), future.exception()
            assert time.monotonic() < deadline, "upstream did not start"
            time.sleep(0.01)
        return Upstream(f"http://127.0.0.1:{port}", app)

    def start_raw(self, handler: Callable[..., Any]) -> Upstream:
        """A hand-written HTTP server: `handler(reader, writer)` per connection."""
        port = free_port()
        server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(handler, "127.0.0.1", port), self.loop
        ).result(10)
        self._raw.append(server)
        return Upstream(f"http://127.0.0.1:{port}")

    @staticmethod
    def dead() -> Upstream:
        """Nothing listens there: connection refused."""
        return Upstream(f"http://127.0.0.1:{free_port()}")

    def close(self) -> None:
        for server, _ in self._servers:
            server.should_exit = True
        for _, future in self._servers:
            future.result(10)
        for raw in self._raw:
            raw.close()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def upstreams() -> Iterator[Upstreams]:
    ups = Upstreams()
    yield ups
    ups.close()


@pytest.fixture(scope="module")
def v1(upstreams: Upstreams) -> Upstream:
    return upstreams.start(1)


@pytest.fixture(scope="module")
def v2(upstreams: Upstreams) -> Upstream:
    return upstreams.start(2)


# --- the router process ----------------------------------------------------------------------


def policy(
    model: str,
    champion: Upstream,
    challenger: Upstream | None = None,
    weight: float = 0.0,
    *,
    champion_version: int = 1,
    challenger_version: int = 2,
    shadow: Upstream | None = None,
    **extra: Any,
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "model": model,
        "champion": {"version": champion_version, "url": champion.url},
        "challenger_weight": weight,
        **extra,
    }
    if challenger is not None:
        out["challenger"] = {"version": challenger_version, "url": challenger.url}
    if shadow is not None:
        out["shadow"] = {"version": 3, "url": shadow.url}
        out.setdefault("shadow_fraction", 1.0)
    return out


def write_config(path: Path, *policies: dict[str, Any]) -> None:
    """Atomically, as a deploy tool would (rename over the old file)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump({"policies": list(policies)}))
    os.replace(tmp, path)


class RouterProc:
    """A router subprocess with an in-memory log dumped at exit."""

    def __init__(self, tmp: Path, policies: list[dict[str, Any]], **opts: Any) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        self.policy_path = tmp / "policy.yaml"
        self.dump = tmp / "records.jsonl"
        self.log_path = tmp / "router.log"
        write_config(self.policy_path, *policies)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = {
            "policy": str(self.policy_path),
            "port": self.port,
            "dump": str(self.dump),
            "queue": opts.get("queue", 1000),
            "workers": opts.get("workers", 8),
            "poll": opts.get("poll", 1.0),
        }
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    "from tests.test_router import router_main; router_main()",
                    json.dumps(args),
                ],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def wait_ready(self) -> RouterProc:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log()
            with contextlib.suppress(OSError):
                self.health()
                return self
            time.sleep(0.05)
        raise AssertionError(f"router did not start:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(self, path: str) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=5) as resp:
            return bytes(resp.read())

    def health(self) -> dict[str, Any]:
        return dict(orjson.loads(self.get("/health")))

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of `name` whose labels include `labels`."""
        total = 0.0
        for family in text_string_to_metric_families(self.get("/metrics").decode()):
            for sample in family.samples:
                if sample.name == name and labels.items() <= sample.labels.items():
                    total += sample.value
        return total

    def wait_generation(self, generation: int, timeout_s: float = 5.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.health()["generation"] < generation:
            assert time.monotonic() < deadline, f"no reload to generation {generation}"
            time.sleep(0.05)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"router ignored SIGTERM:\n{self.log()}") from None

    def records(self) -> list[dict[str, Any]]:
        assert self.proc.poll() is not None, "stop() first"
        return [orjson.loads(line) for line in self.dump.read_bytes().splitlines()]


@pytest.fixture
def start_router(tmp_path: Path) -> Iterator[Callable[..., RouterProc]]:
    started: list[RouterProc] = []

    def start(*policies: dict[str, Any], wait: bool = True, **opts: Any) -> RouterProc:
        proc = RouterProc(tmp_path / f"router{len(started)}", list(policies), **opts)
        started.append(proc)
        return proc.wait_ready() if wait else proc

    yield start
    for proc in started:
        if proc.proc.poll() is None:
            proc.proc.kill()
            proc.proc.wait()


# --- the client --------------------------------------------------------------------------------


@dataclasses.dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    latency_s: float

    @property
    def version(self) -> int:
        return int(self.headers["x-stagegate-version"])


async def post(
    session: aiohttp.ClientSession,
    url: str,
    model: str,
    *,
    key: str | None = None,
    body: Any = BODY,
    headers: dict[str, str] | None = None,
) -> Answer:
    h = {"content-type": "application/json", **(headers or {})}
    if key is not None:
        h["x-stagegate-key"] = key
    started = time.perf_counter()
    async with session.post(
        f"{url}/models/{model}/invocations", data=orjson.dumps(body), headers=h
    ) as resp:
        data = await resp.read()
    elapsed = time.perf_counter() - started
    return Answer(resp.status, {k.lower(): v for k, v in resp.headers.items()}, data, elapsed)


def post_many(
    url: str,
    model: str,
    keys: list[str | None],
    *,
    concurrency: int = 16,
    body: Any = BODY,
) -> list[Answer]:
    """One request per key, `concurrency` at a time; answers in key order."""

    async def go() -> list[Answer]:
        sem = asyncio.Semaphore(concurrency)
        async with aiohttp.ClientSession() as session:

            async def one(key: str | None) -> Answer:
                async with sem:
                    return await post(session, url, model, key=key, body=body)

            return await asyncio.gather(*(one(k) for k in keys))

    return asyncio.run(go())


def post_one(url: str, model: str, **kwargs: Any) -> Answer:
    async def go() -> Answer:
        async with aiohttp.ClientSession() as session:
            return await post(session, url, model, **kwargs)

    return asyncio.run(go())


def expected_version(model: str, key: str, weight: float) -> int:
    return 2 if assign(model, key, threshold(weight), random.Random()) == "challenger" else 1


# --- assignment -----------------------------------------------------------------------------


def test_same_key_same_arm_and_the_split_follows_the_weight(
    start_router: Callable[..., RouterProc], v1: Upstream, v2: Upstream
) -> None:
    router = start_router(policy("fraud", v1, v2, 0.3))

    repeated = [f"user-{i}" for i in range(20)] * 10  # 200 requests, 20 keys
    answers = post_many(router.url, "fraud", list(repeated))
    assert {a.status for a in answers} == {200}
    by_key: dict[str, set[int]] = {}
    for key, answer in zip(repeated, answers, strict=True):
        by_key.setdefault(key, set()).add(answer.version)
        assert orjson.loads(answer.body)["version"] == answer.version
    assert all(len(versions) == 1 for versions in by_key.values())
    # The documented hash decides, so another router (or an analysis job) agrees.
    assert all(vs == {expected_version("fraud", k, 0.3)} for k, vs in by_key.items())

    keys: list[str | None] = [f"customer-{i}" for i in range(2000)]
    split = Counter(a.version for a in post_many(router.url, "fraud", keys))
    assert abs(split[2] / 2000 - 0.3) < 0.035, split

    unkeyed = Counter(a.version for a in post_many(router.url, "fraud", [None] * 400))
    assert abs(unkeyed[2] / 400 - 0.3) < 0.1, unkeyed


def test_key_from_a_json_field_and_the_header_wins(
    start_router: Callable[..., RouterProc], v1: Upstream, v2: Upstream
) -> None:
    router = start_router(policy("churn", v1, v2, 0.5, assignment_field="customer_id"))
    keys = [f"c{i}" for i in range(40)]
    a_champion = next(k for k in keys if expected_version("churn", k, 0.5) == 1)
    a_challenger = next(k for k in keys if expected_version("churn", k, 0.5) == 2)

    for key in keys[:20]:
        body = {"customer_id": key, "inputs": [[1.0]]}
        via_field = post_many(router.url, "churn", [None] * 5, body=body)
        assert {a.version for a in via_field} == {expected_version("churn", key, 0.5)}
    numeric = post_many(router.url, "churn", [None] * 5, body={"customer_id": 42, "inputs": []})
    assert {a.version for a in numeric} == {expected_version("churn", "42", 0.5)}

    body = {"customer_id": a_challenger, "inputs": [[1.0]]}
    assert post_one(router.url, "churn", key=a_champion, body=body).version == 1


# --- headers and errors ---------------------------------------------------------------------


def test_headers_request_ids_and_unknown_models(
    start_router: Callable[..., RouterProc], v1: Upstream
) -> None:
    router = start_router(policy("fraud", v1))

    answer = post_one(router.url, "fraud", headers={"x-request-id": "req-42.a:b"})
    assert answer.status == 200
    assert answer.headers["content-type"] == "application/json"
    assert answer.headers["x-stagegate-version"] == "1"
    assert answer.headers["x-stagegate-role"] == "champion"
    # The client's id is kept as a prefix; the router's own part makes it unique.
    client_id, _, own = answer.headers["x-request-id"].partition("~")
    assert client_id == "req-42.a:b"
    assert len(own) == 16
    again = post_one(router.url, "fraud", headers={"x-request-id": "req-42.a:b"})
    assert again.headers["x-request-id"] != answer.headers["x-request-id"]
    assert orjson.loads(answer.body) == {"predictions": [1], "version": 1}

    for insane in ("has space", "x" * 200, "semi;colon"):
        generated = post_one(router.url, "fraud", headers={"x-request-id": insane})
        assert generated.status == 200
        rid = generated.headers["x-request-id"]
        assert len(rid) == 32
        assert int(rid, 16) >= 0

    missing = post_one(router.url, "nope")
    assert missing.status == 404
    assert set(orjson.loads(missing.body)) == {"detail", "code"}
    assert orjson.loads(missing.body)["code"] == "not_found"
    assert router.metric("stagegate_router_unknown_model_total") == 1

    assert orjson.loads(router.get("/policies"))["policies"][0]["model"] == "fraud"
    metrics = router.get("/metrics").decode()
    for name in (
        "stagegate_router_requests_total",
        "stagegate_router_upstream_latency_seconds_bucket",
        "stagegate_router_policy_reloads_total",
    ):
        assert name in metrics
    assert router.stop() == 0


# --- shadows --------------------------------------------------------------------------------


def test_a_slow_failing_or_dead_shadow_never_changes_the_answer(
    start_router: Callable[..., RouterProc], upstreams: Upstreams, v1: Upstream, v2: Upstream
) -> None:
    shadows = {
        "slow": upstreams.start(3, delay_s=2.0),
        "error": upstreams.start(3, mode="error"),
        "dead": upstreams.dead(),
    }
    with_shadows = [
        policy(f"m-{name}", v1, v2, 0.5, shadow=up, shadow_timeout_ms=3000)
        for name, up in shadows.items()
    ]
    without = [policy(f"m-{name}", v1, v2, 0.5) for name in shadows]
    shadowed = start_router(*with_shadows, wait=False)
    baseline = start_router(*without)
    shadowed.wait_ready()

    keys: list[str | None] = [f"k{i}" for i in range(60)]
    for name in shadows:
        model = f"m-{name}"
        got = post_many(shadowed.url, model, keys, concurrency=8)
        want = post_many(baseline.url, model, keys, concurrency=8)
        assert [a.status for a in got] == [200] * len(keys)
        assert [(a.body, a.version) for a in got] == [(a.body, a.version) for a in want]
        assert max(a.latency_s for a in got) < 0.5, name  # the 2 s shadow is never waited for

    time.sleep(0.3)  # let the quick shadows finish
    assert shadowed.metric("stagegate_router_shadow_total", model="m-error", outcome="failed") == 60
    assert shadowed.metric("stagegate_router_shadow_total", model="m-dead", outcome="failed") == 60
    assert shadowed.stop() == 0
    shadow_records = [r for r in shadowed.records() if r["role"] == "shadow"]
    assert {r["status"] for r in shadow_records if r["model"] == "m-error"} == {500}
    assert {r["status"] for r in shadow_records if r["model"] == "m-dead"} == {599}


def test_mirrors_beyond_the_queue_are_dropped_and_counted(
    start_router: Callable[..., RouterProc], upstreams: Upstreams, v1: Upstream
) -> None:
    slow = upstreams.start(3, delay_s=2.0)
    router = start_router(policy("fraud", v1, shadow=slow), queue=2, workers=1)
    answers = post_many(router.url, "fraud", [None] * 30, concurrency=4)
    assert {a.status for a in answers} == {200}
    # One in flight, two queued: everything else is dropped, never waited for.
    assert router.metric("stagegate_router_shadow_total", outcome="dropped") >= 27
    assert router.health()["shadow_queued"] <= 2


# --- fallback -------------------------------------------------------------------------------


def test_a_failing_challenger_falls_back_to_the_champion_and_both_are_logged(
    start_router: Callable[..., RouterProc], upstreams: Upstreams, v1: Upstream
) -> None:
    slow = upstreams.start(2, delay_s=0.5)
    assert slow.app is not None
    challengers = {"error": upstreams.start(2, mode="error"), "timeout": slow}
    challengers["dead"] = upstreams.dead()
    policies = [
        policy(f"m-{name}", v1, up, 1.0, timeout_ms=200) for name, up in challengers.items()
    ]
    policies.append(policy("m-strict", v1, challengers["error"], 1.0, fallback_to_champion=False))
    router = start_router(*policies)

    for name in challengers:
        answers = post_many(router.url, f"m-{name}", [f"u{i}" for i in range(5)], concurrency=5)
        assert [(a.status, a.version) for a in answers] == [(200, 1)] * 5, name
        assert {a.headers["x-stagegate-role"] for a in answers} == {"champion"}
    strict = post_one(router.url, "m-strict", key="u1")
    assert (strict.status, strict.version, strict.headers["x-stagegate-role"]) == (
        500,
        2,
        "challenger",
    )

    reasons = {"error": "5xx", "timeout": "timeout", "dead": "error"}
    for name, reason in reasons.items():
        labels = {"model": f"m-{name}", "reason": reason}
        assert router.metric("stagegate_router_fallbacks_total", **labels) == 5
    assert slow.app.hits == 5  # a timeout is not retried
    assert router.metric("stagegate_router_stale_connection_retries_total") == 0
    assert router.stop() == 0

    records = router.records()
    for name, status in (("error", 500), ("timeout", 599), ("dead", 599)):
        mine = [r for r in records if r["model"] == f"m-{name}"]
        assert Counter((r["role"], r["status"]) for r in mine) == {
            ("challenger", status): 5,
            ("champion", 200): 5,
        }
        by_request = Counter(r["request_id"] for r in mine)
        assert set(by_request.values()) == {2}
    record = next(r for r in records if r["model"] == "m-error" and r["role"] == "champion")
    key = record["key_hash"]
    assert key in {hashlib.sha256(f"u{i}".encode()).hexdigest() for i in range(5)}
    assert record["inputs"] == BODY
    assert record["output"] == [1]
    assert record["latency_ms"] > 0
    assert record["at"].endswith("+00:00")
    failed = next(r for r in records if r["model"] == "m-error" and r["role"] == "challenger")
    assert failed["output"] is None


# --- hot reload -----------------------------------------------------------------------------


class Load:
    """A small concurrent load in a thread, until stopped; every answer is kept."""

    def __init__(self, url: str, model: str, workers: int = 4) -> None:
        self.answers: list[Answer] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=asyncio.run, args=(self._run(url, model, workers),))
        self._thread.start()

    async def _run(self, url: str, model: str, workers: int) -> None:
        async with aiohttp.ClientSession() as session:

            async def worker() -> None:
                while not self._stop.is_set():
                    try:
                        self.answers.append(await post(session, url, model))
                    except aiohttp.ClientError as exc:
                        self.errors.append(repr(exc))

            await asyncio.gather(*(worker() for _ in range(workers)))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


def test_hot_reload_by_file_change_and_sighup_drops_nothing(
    start_router: Callable[..., RouterProc], v1: Upstream, v2: Upstream
) -> None:
    router = start_router(policy("fraud", v1), poll=0.2)
    load = Load(router.url, "fraud")
    try:
        time.sleep(0.3)
        write_config(router.policy_path, policy("fraud", v2, champion_version=2))
        router.wait_generation(2)
        time.sleep(0.3)
        after_change = len(load.answers)
    finally:
        load.stop()
    assert load.errors == []
    assert {a.status for a in load.answers} == {200}
    assert load.answers[-1].version == 2
    assert after_change > 10

    # SIGHUP reloads even when polling would not notice (same inode, size and mtime).
    sighup = start_router(policy("fraud", v1), poll=3600)
    st = sighup.policy_path.stat()
    load = Load(sighup.url, "fraud")
    try:
        text = (
            sighup.policy_path.read_text()
            .replace(v1.url, v2.url)
            .replace("version: 1", "version: 2")
        )
        sighup.policy_path.write_text(text)
        os.utime(sighup.policy_path, ns=(st.st_atime_ns, st.st_mtime_ns))
        time.sleep(0.2)
        assert sighup.health()["generation"] == 1
        sighup.proc.send_signal(signal.SIGHUP)
        sighup.wait_generation(2)
        time.sleep(0.2)
    finally:
        load.stop()
    assert load.errors == []
    assert {a.status for a in load.answers} == {200}
    assert load.answers[-1].version == 2
    assert sighup.metric("stagegate_router_policy_reloads_total", result="ok") == 1


def test_an_invalid_policy_is_rejected_and_the_old_one_stays(
    start_router: Callable[..., RouterProc], v1: Upstream, v2: Upstream
) -> None:
    router = start_router(policy("fraud", v1), poll=0.1)
    before = router.get("/policies")

    router.policy_path.write_text("policies: [ {model: fraud, champion: {version: 0")  # bad YAML
    deadline = time.monotonic() + 5
    while router.metric("stagegate_router_policy_reloads_total", result="rejected") < 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    # Valid YAML, invalid policy: a challenger weight without a challenger.
    write_config(router.policy_path, policy("fraud", v2, weight=0.5))
    while router.metric("stagegate_router_policy_reloads_total", result="rejected") < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.3)  # a rejected file is reported once, not at every poll
    assert router.metric("stagegate_router_policy_reloads_total", result="rejected") == 2
    router.proc.send_signal(signal.SIGHUP)  # an explicit reload tries again
    while router.metric("stagegate_router_policy_reloads_total", result="rejected") < 3:
        assert time.monotonic() < deadline
        time.sleep(0.05)

    assert router.get("/policies") == before
    assert router.health()["generation"] == 1
    assert post_one(router.url, "fraud").version == 1
    assert "rejected" in router.log()


def test_an_invalid_policy_at_start_is_a_clear_cli_error(tmp_path: Path) -> None:
    bad = tmp_path / "policy.yaml"
    bad.write_text("policies: [{model: x}]")
    result = subprocess.run(
        [*CLI, "router", "--policy", str(bad), "--port", "1"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert "invalid router config" in result.stderr


# --- draining -------------------------------------------------------------------------------


def test_sigterm_drains_in_flight_requests_and_flushes_the_log(
    start_router: Callable[..., RouterProc], upstreams: Upstreams
) -> None:
    slow = upstreams.start(1, delay_s=0.3)
    assert slow.app is not None
    router = start_router(policy("fraud", slow))
    answers: list[tuple[float, Answer]] = []
    refused: list[str] = []
    sent_at: list[float] = []

    async def client() -> None:
        # A new connection per request: after SIGTERM a request is either accepted and
        # answered, or refused at connect.
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def worker() -> None:
                while True:
                    try:
                        answer = await post(session, router.url, "fraud")
                    except aiohttp.ClientConnectionError as exc:
                        refused.append(repr(exc))
                        return
                    answers.append((time.monotonic(), answer))

            async def terminate() -> None:
                await asyncio.sleep(1.0)
                sent_at.append(time.monotonic())
                router.proc.send_signal(signal.SIGTERM)

            await asyncio.gather(terminate(), *(worker() for _ in range(12)))

    asyncio.run(client())
    assert router.proc.wait(15) == 0
    assert [a.status for _, a in answers if a.status != 200] == []
    finished_after = [a for t, a in answers if t > sent_at[0]]
    assert len(finished_after) >= 6  # the in-flight ones were answered, not cut
    assert slow.app.hits == len(answers)  # whatever reached the model was answered
    logged = {r["request_id"] for r in router.records()}
    assert {a.headers["x-request-id"] for _, a in answers} <= logged
    assert len(refused) == 12


def test_the_cli_serves_and_exits_0_on_sigterm(tmp_path: Path, v1: Upstream) -> None:
    path = tmp_path / "policy.json"
    path.write_text(json.dumps({"policies": [policy("fraud", v1)]}))
    port = free_port()
    proc = subprocess.Popen(
        [*CLI, "router", "--policy", str(path), "--port", str(port), "--log-level", "warning"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert proc.poll() is None
            assert time.monotonic() < deadline
            try:
                answer = post_one(f"http://127.0.0.1:{port}", "fraud")
                break
            except aiohttp.ClientConnectionError:
                time.sleep(0.05)
        assert (answer.status, answer.version) == (200, 1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()


# --- stale keep-alive connections ------------------------------------------------------------


def test_a_stale_keep_alive_connection_is_retried_once_on_a_fresh_one(
    start_router: Callable[..., RouterProc], upstreams: Upstreams
) -> None:
    stale = StaleServer()
    stale_up = upstreams.start_raw(stale.handle)
    quick_close = upstreams.start(1, keep_alive_s=1)
    old_style = upstreams.start_raw(close_delimited)
    router = start_router(
        policy("stale", stale_up), policy("idle", quick_close), policy("old", old_style)
    )

    answers = [post_one(router.url, "stale") for _ in range(3)]
    assert [a.status for a in answers] == [200, 200, 200]
    assert router.metric("stagegate_router_stale_connection_retries_total") == 2
    assert stale.requests == 5  # 1, then 2 per request: the failed send and its one retry

    # The real thing: uvicorn closes connections idle for over 1 s.
    assert post_one(router.url, "idle").status == 200
    time.sleep(1.5)
    assert post_one(router.url, "idle").status == 200

    # (Chunked answers come from ModelApp; here a body that ends with the connection.)
    for _ in range(2):
        answer = post_one(router.url, "old")
        assert (answer.status, orjson.loads(answer.body)) == (200, {"predictions": [9]})
    assert router.metric("stagegate_router_stale_connection_retries_total") == 2
