"""Where policies come from (`PolicySource`), and hot reload by atomic swap (`PolicyStore`)."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import httpx
import orjson
import yaml
from pydantic import ValidationError

from stagegate.errors import InvalidInput, RetryableError, StagegateError
from stagegate.serving.policy import Arm, RouterConfig, TrafficPolicy
from stagegate.serving.router.assign import threshold
from stagegate.serving.router.upstream import Target

log = logging.getLogger("stagegate.router")


class RejectedPolicy(InvalidInput):
    """The source changed to something unusable; `fingerprint` lets the store log it once."""

    def __init__(self, detail: str, fingerprint: str | None) -> None:
        super().__init__(detail)
        self.fingerprint = fingerprint


class PolicySource(Protocol):
    """Where a router's config lives: a file now, the governance API later."""

    def describe(self) -> str:
        """For logs and /policies: the path or URL."""
        ...

    async def fetch(self, since: str | None) -> tuple[str, RouterConfig] | None:
        """The config and its fingerprint, or None when unchanged since `since`.

        `since=None` forces a full load. Raises `RejectedPolicy` for an unreadable source or an
        invalid config (any other `StagegateError` for a passing failure, e.g. a network error);
        the caller keeps its old config.
        """
        ...


def parse_config(raw: bytes, *, yaml_ok: bool = True) -> RouterConfig:
    """A RouterConfig from JSON or YAML bytes."""
    try:
        data: Any = yaml.safe_load(raw) if yaml_ok else orjson.loads(raw)
    except (yaml.YAMLError, orjson.JSONDecodeError) as exc:
        raise InvalidInput(f"not valid {'YAML' if yaml_ok else 'JSON'}: {exc}") from None
    try:
        return RouterConfig.model_validate(data)
    except ValidationError as exc:
        raise InvalidInput(f"invalid router config: {exc}") from None


class FilePolicySource:
    """A JSON or YAML file; its fingerprint is (inode, size, mtime), so renames count too."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def describe(self) -> str:
        return str(self.path)

    async def fetch(self, since: str | None) -> tuple[str, RouterConfig] | None:
        try:
            st = os.stat(self.path)  # a local stat is microseconds: fine on the loop
        except OSError as exc:
            raise RejectedPolicy(f"cannot read {self.path}: {exc}", "unreadable") from None
        fingerprint = f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"
        if fingerprint == since:
            return None
        try:
            # Reading and validating may take milliseconds for a big file: keep it off the loop.
            return fingerprint, await asyncio.to_thread(self._load)
        except InvalidInput as exc:
            raise RejectedPolicy(exc.detail, fingerprint) from None

    def _load(self) -> RouterConfig:
        try:
            raw = self.path.read_bytes()
        except OSError as exc:
            raise InvalidInput(f"cannot read {self.path}: {exc}") from None
        return parse_config(raw, yaml_ok=self.path.suffix.lower() != ".json")


class UrlPolicySource:
    """The governance API's traffic endpoint (`GET /api/v1/traffic`); its ETag is the
    fingerprint, so an unchanged config costs a 304 and no parsing."""

    def __init__(self, url: str, *, token: str | None = None, timeout_s: float = 5.0) -> None:
        self.url = url
        self.token = token if token is not None else os.environ.get("STAGEGATE_ROUTER_TOKEN")
        self.timeout_s = timeout_s

    def describe(self) -> str:
        return self.url

    async def fetch(self, since: str | None) -> tuple[str, RouterConfig] | None:
        headers = {"accept": "application/json"}
        if self.token:
            headers["authorization"] = f"Bearer {self.token}"
        if since:
            headers["if-none-match"] = since
        try:
            async with httpx.AsyncClient(timeout=self.timeout_s, trust_env=False) as client:
                response = await client.get(self.url, headers=headers)
        except httpx.HTTPError as exc:  # passing: keep serving the old config
            raise RetryableError(f"cannot reach {self.url}: {exc}") from None
        if response.status_code == 304:
            return None
        if response.status_code in (401, 403, 404):
            raise RejectedPolicy(
                f"{self.url} answered {response.status_code}: {response.text[:200]}",
                f"http-{response.status_code}",
            )
        if response.status_code != 200:
            raise RetryableError(f"{self.url} answered {response.status_code}")
        fingerprint = response.headers.get("etag") or f"len-{len(response.content)}"
        try:
            return fingerprint, parse_config(response.content, yaml_ok=False)
        except InvalidInput as exc:
            raise RejectedPolicy(exc.detail, fingerprint) from None


def policy_source(spec: str) -> PolicySource:
    """A file path or an http(s) URL."""
    if spec.startswith(("http://", "https://")):
        return UrlPolicySource(spec)
    return FilePolicySource(spec)


@dataclass(frozen=True, slots=True)
class Route:
    """One model's policy, compiled for the hot path."""

    policy: TrafficPolicy
    champion: Target
    challenger: Target | None
    shadow: Target | None
    challenger_threshold: int
    timeout_s: float
    shadow_timeout_s: float
    # The key only matters when both arms get traffic: parse the body for it only then.
    needs_key: bool

    @classmethod
    def compile(cls, policy: TrafficPolicy) -> Route:
        def target(arm: Arm | None) -> Target | None:
            return None if arm is None else Target.from_url(str(arm.url))

        champion = target(policy.champion)
        assert champion is not None
        cut = threshold(policy.challenger_weight) if policy.challenger is not None else 0
        return cls(
            policy=policy,
            champion=champion,
            challenger=target(policy.challenger),
            shadow=target(policy.shadow),
            challenger_threshold=cut,
            timeout_s=policy.timeout_ms / 1000,
            shadow_timeout_s=policy.shadow_timeout_ms / 1000,
            needs_key=0 < cut < 10_000,
        )


@dataclass(frozen=True, slots=True)
class RoutingTable:
    """An immutable snapshot: a request reads it once and keeps it to the end."""

    config: RouterConfig
    routes: dict[str, Route]
    generation: int
    loaded_at: datetime

    @classmethod
    def build(cls, config: RouterConfig, generation: int) -> RoutingTable:
        try:
            routes = {p.model: Route.compile(p) for p in config.policies}
        except ValueError as exc:
            raise InvalidInput(str(exc)) from None
        return cls(config, routes, generation, datetime.now(UTC))


class PolicyStore:
    """Holds the current table; reloads on demand (SIGHUP) and when the source changes."""

    def __init__(
        self, source: PolicySource, on_result: Callable[[str], None] | None = None
    ) -> None:
        self.source = source
        self._on_result = on_result
        self._fingerprint: str | None = None
        self._table: RoutingTable | None = None
        self._lock = asyncio.Lock()

    @property
    def table(self) -> RoutingTable:
        assert self._table is not None, "load() first"
        return self._table

    async def load(self) -> RoutingTable:
        """The first load: an invalid source is an error here, not a warning."""
        fetched = await self.source.fetch(None)
        assert fetched is not None
        self._fingerprint, config = fetched
        self._table = RoutingTable.build(config, 1)
        return self._table

    async def reload(self, *, force: bool = False) -> bool:
        """Swap in a changed config; True when swapped. Never raises for a bad config."""
        async with self._lock:
            try:
                fetched = await self.source.fetch(None if force else self._fingerprint)
                if fetched is None:
                    return False
                fingerprint, config = fetched
                # Remember even a rejected fingerprint: it is logged once, not every poll.
                self._fingerprint = fingerprint
                table = RoutingTable.build(config, self.table.generation + 1)
            except StagegateError as exc:
                if isinstance(exc, RejectedPolicy):
                    if exc.fingerprint == self._fingerprint and not force:
                        return False  # the same bad file as last poll: already reported
                    self._fingerprint = exc.fingerprint
                log.error("policy from %s rejected, keeping the old one: %s", self.describe(), exc)
                self._result("rejected")
                return False
            self._table = table  # one reference swap: requests in flight keep their snapshot
            log.info("policy generation %d loaded from %s", table.generation, self.describe())
            self._result("ok")
            return True

    async def watch(self, interval_s: float = 1.0) -> None:
        """Poll the source until cancelled."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.reload()
            except Exception:  # a bug in one poll must not end hot reload for good
                log.exception("policy reload from %s failed", self.describe())

    def describe(self) -> str:
        return self.source.describe()

    def _result(self, result: str) -> None:
        if self._on_result is not None:
            self._on_result(result)
