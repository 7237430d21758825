"""The local backend: model servers as supervised processes under one folder, on free ports."""

from __future__ import annotations

import re
import socket
import sys
from pathlib import Path

import httpx

from stagegate import supervise
from stagegate.errors import InvalidInput
from stagegate.serving.backends.protocol import DeploymentState, ServedVersion
from stagegate.supervise import HealthCheck, ServiceSpec, ServiceStatus

_KEY = re.compile(r"^(?P<model>.+)-v(?P<version>\d+)$")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class LocalBackend:
    """`stagegate serve-model` processes, one per version, with pid files under `root`.

    A crashed server is restarted by the next `deploy` (the flows and reconcile call it);
    `observe` reports it as not running until then.
    """

    name = "local"

    def __init__(
        self,
        root: Path,
        *,
        tracking_uri: str | None = None,
        host: str = "127.0.0.1",
        python: str = sys.executable,
    ) -> None:
        self.root = root
        self.tracking_uri = tracking_uri
        self.host = host
        self.python = python

    def _spec(self, served: ServedVersion, port: int) -> ServiceSpec:
        url = f"http://{self.host}:{port}"
        argv = [
            self.python,
            "-m",
            "stagegate.cli",
            "serve-model",
            served.model_uri,
            "--host",
            self.host,
            "--port",
            str(port),
            "--device",
            served.device,
            "--max-batch-rows",
            str(served.max_batch_rows),
            "--max-wait-ms",
            str(served.max_wait_ms),
        ]
        if self.tracking_uri:
            argv += ["--tracking-uri", self.tracking_uri]
        if served.digest:
            argv += ["--expect-digest", served.digest]
        return ServiceSpec(
            name=served.key,
            argv=argv,
            health_check=HealthCheck(url=url + "/health"),
            url=url,
            host=self.host,
            port=port,
        )

    def deploy(self, served: ServedVersion, *, timeout_s: float = 120) -> DeploymentState:
        if not _KEY.match(served.key):
            raise InvalidInput(f"bad deployment key {served.key!r}")
        current = self.observe(served.model, served.version)
        if current is not None and current.healthy:
            if _checked_digest(current) == served.digest or served.digest is None:
                return current
            # Started without (or with another) digest check: only a checked server is adopted.
            self.remove(served.model, served.version)
        statuses = supervise.up(
            self.root, [self._spec(served, free_port(self.host))], timeout_s=timeout_s
        )
        return _state(statuses[served.key])

    def observe(self, model: str, version: int) -> DeploymentState | None:
        key = f"{model}-v{version}"
        status = supervise.status(self.root).get(key)
        return _state(status) if status is not None else None

    def remove(self, model: str, version: int) -> bool:
        return bool(supervise.down(self.root, names=[f"{model}-v{version}"]))

    def list(self) -> list[DeploymentState]:
        return [_state(s) for s in supervise.status(self.root).values()]


def _state(status: ServiceStatus) -> DeploymentState:
    match = _KEY.match(status.name)
    model, version = (match["model"], int(match["version"])) if match else (status.name, 0)
    return DeploymentState(
        key=status.name,
        model=model,
        version=version,
        url=status.url,
        running=status.running,
        healthy=status.healthy,
        detail=f"pid {status.pid}" if status.pid else "not running",
    )


def _checked_digest(state: DeploymentState) -> str | None:
    """The digest the running server verified before loading (its `/version`), if any."""
    if state.url is None:
        return None
    try:
        info = httpx.get(f"{state.url}/version", timeout=5, trust_env=False).json()
    except (httpx.HTTPError, ValueError):
        return None
    checked = info.get("digest_checked") if isinstance(info, dict) else None
    return checked if isinstance(checked, str) else None
