"""Signed alert webhooks: one JSON POST, retried with backoff, every attempt reported.

The body is signed with HMAC-SHA256 over `{timestamp}.{body}` (the scheme of the MLflow
webhooks Stagegate receives), so a receiver can refuse forgeries and stale replays. The
delivery id is stable for one alarm: a receiver drops a repeat after a crash-and-retry.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import orjson

from stagegate.errors import InvalidInput
from stagegate.outbound import resolve_url
from stagegate.settings import AlertSettings

SIGNATURE_HEADER = "X-Stagegate-Signature"
TIMESTAMP_HEADER = "X-Stagegate-Timestamp"
DELIVERY_HEADER = "X-Stagegate-Delivery"


@dataclass(frozen=True)
class Attempt:
    number: int
    status_code: int | None
    error: str | None

    @property
    def delivered(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


@dataclass(frozen=True)
class AlertResult:
    """`delivered`, `failed` (every attempt failed) or `refused` (never sent: the URL or the
    missing secret), with each attempt made."""

    status: str
    reason: str
    attempts: tuple[Attempt, ...] = ()


def sign(secret: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return "v1=" + mac.hexdigest()


def verify(secret: str, timestamp: str, body: bytes, signature: str) -> bool:
    """What a receiver checks (the demo's receiver and the tests use it)."""
    try:
        expected = sign(secret, int(timestamp), body)
    except ValueError:
        return False
    return hmac.compare_digest(expected, signature)


def send_alert(
    url: str,
    payload: dict[str, Any],
    *,
    delivery_id: str,
    settings: AlertSettings,
    on_attempt: Callable[[Attempt], None] = lambda _a: None,
    sleep: Callable[[float], None] = time.sleep,
) -> AlertResult:
    """POST `payload` to `url` until a 2xx or the attempts run out.

    The URL is checked against the outbound allow-list before every attempt (a host's
    addresses can change between attempts), and the request goes to the address that was
    checked, not to a second lookup of the name (DNS rebinding): the name travels in `Host`
    and, for https, as the TLS server name the certificate is verified against. Redirects are
    not followed: a redirect could lead anywhere the check refuses."""
    if not settings.secret:
        return AlertResult("refused", "no alert secret is configured (STAGEGATE_ALERTS__SECRET)")
    body = orjson.dumps(payload)
    attempts: list[Attempt] = []
    delay = settings.backoff_s
    for number in range(1, settings.attempts + 1):
        try:
            target = resolve_url(
                url,
                allow_private=settings.allow_private_hosts,
                allowed_hosts=frozenset(settings.allowed_hosts),
            )
        except InvalidInput as exc:
            return AlertResult("refused", f"alert URL refused: {exc.detail}", tuple(attempts))
        timestamp = int(time.time())
        headers = {
            "Host": target.host_header,
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign(settings.secret, timestamp, body),
            TIMESTAMP_HEADER: str(timestamp),
            DELIVERY_HEADER: delivery_id,
        }
        try:
            response = httpx.post(url, content=body, headers=headers, timeout=settings.timeout_s)
            attempt = Attempt(number, response.status_code, None)
        except httpx.HTTPError as exc:
            attempt = Attempt(number, None, f"{type(exc).__name__}: {exc}"[:500])
        attempts.append(attempt)
        on_attempt(attempt)
        if attempt.delivered:
            return AlertResult("delivered", f"HTTP {attempt.status_code}", tuple(attempts))
        if (
            attempt.status_code is not None
            and 400 <= attempt.status_code < 500
            and (attempt.status_code not in (408, 429))
        ):
            break  # the receiver refuses this alert; trying again would not change its mind
        if number < settings.attempts:
            sleep(delay)
            delay *= 2
    last = attempts[-1]
    why = f"HTTP {last.status_code}" if last.status_code is not None else str(last.error)
    return AlertResult("failed", f"{len(attempts)} attempts, last: {why}", tuple(attempts))
