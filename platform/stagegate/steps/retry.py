"""Retry only what may pass: `RetryableError`s (an unreachable server), never a bad request.

`only_retryable` has the shape of a Prefect task `retry_condition_fn`.
"""

from __future__ import annotations

from typing import Any

from stagegate.errors import RetryableError

RETRY_DELAYS_S = [1, 2, 4, 8]


def only_retryable(_task: Any, _task_run: Any, state: Any) -> bool:
    try:
        state.result()
    except RetryableError:
        return True
    except Exception:
        return False
    return False


# Keyword arguments for a Prefect `@task`: retry RetryableErrors on the schedule above.
RETRYING: dict[str, Any] = {
    "retries": len(RETRY_DELAYS_S),
    "retry_delay_seconds": RETRY_DELAYS_S,
    "retry_condition_fn": only_retryable,
}
