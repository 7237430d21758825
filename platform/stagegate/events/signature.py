"""Verification of MLflow webhook deliveries: HMAC-SHA256 signature and timestamp window."""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass

from stagegate.errors import StagegateError


class InvalidDelivery(StagegateError):
    """The delivery is not from our registry (bad signature, stale, malformed headers)."""

    code = "invalid_delivery"


@dataclass(frozen=True)
class DeliveryHeaders:
    delivery_id: str
    timestamp: int
    signature: str


def sign(secret: str, delivery_id: str, timestamp: int, body: bytes) -> str:
    """The `x-mlflow-signature` value MLflow 3 sends: `v1,<base64 HMAC-SHA256>`."""
    message = f"{delivery_id}.{timestamp}.".encode() + body
    mac = hmac.new(secret.encode(), message, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def parse_headers(headers: dict[str, str]) -> DeliveryHeaders:
    delivery_id = headers.get("x-mlflow-delivery-id", "")
    raw_ts = headers.get("x-mlflow-timestamp", "")
    signature = headers.get("x-mlflow-signature", "")
    if not delivery_id or not raw_ts or not signature:
        raise InvalidDelivery("missing x-mlflow-delivery-id, -timestamp or -signature header")
    if len(delivery_id) > 100:
        raise InvalidDelivery("x-mlflow-delivery-id is too long")
    try:
        timestamp = int(raw_ts)
    except ValueError:
        raise InvalidDelivery("x-mlflow-timestamp is not unix seconds") from None
    return DeliveryHeaders(delivery_id, timestamp, signature)


def verify(
    secret: str, headers: DeliveryHeaders, body: bytes, *, now: float, max_skew_s: int
) -> None:
    """Raise InvalidDelivery unless the signature matches and the timestamp is fresh."""
    expected = sign(secret, headers.delivery_id, headers.timestamp, body)
    # Compare in constant time, and before the timestamp so timing says nothing about it.
    if not hmac.compare_digest(expected.encode(), headers.signature.encode()):
        raise InvalidDelivery("signature does not match")
    if abs(now - headers.timestamp) > max_skew_s:
        raise InvalidDelivery(f"timestamp is more than {max_skew_s} s from now")
