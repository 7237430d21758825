"""Sticky champion/challenger assignment: a key hashes to a bucket, the weight to a threshold."""

from __future__ import annotations

import hashlib
import random
from typing import Any

import orjson

from stagegate.serving.inference_log.records import Role

BUCKETS = 10_000


def bucket(model: str, key: str) -> int:
    """The key's bucket in [0, BUCKETS): sha256(model + key), first 8 bytes, big-endian."""
    digest = hashlib.sha256((model + key).encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


def threshold(challenger_weight: float) -> int:
    """Buckets below this go to the challenger.

    Raising the weight only moves keys from the champion to the challenger, never back.
    """
    return round(challenger_weight * BUCKETS)


def assign(model: str, key: str | None, challenger_threshold: int, rng: random.Random) -> Role:
    """Champion or challenger for this request; no key means an independent draw."""
    if challenger_threshold <= 0:
        return Role.champion
    if challenger_threshold >= BUCKETS:
        return Role.challenger
    b = rng.randrange(BUCKETS) if key is None else bucket(model, key)
    return Role.challenger if b < challenger_threshold else Role.champion


def key_hash(key: str | None) -> str | None:
    """What the inference log keeps instead of the key: sha256 hex."""
    return None if key is None else hashlib.sha256(key.encode()).hexdigest()


def key_from_field(parsed: Any, field: str) -> str | None:
    """The assignment key in a top-level JSON field; strings as-is, other scalars as JSON."""
    if not isinstance(parsed, dict):
        return None
    value = parsed.get(field)
    if value is None:
        return None
    if isinstance(value, str):
        return value
    return orjson.dumps(value).decode()
