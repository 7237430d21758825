"""One error tree for the whole platform, mapped to HTTP in one place (`api/errors.py`)."""

from __future__ import annotations


class StagegateError(Exception):
    """Base of every error Stagegate raises on purpose. `code` is stable for clients."""

    code = "stagegate_error"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class NotFoundError(StagegateError):
    code = "not_found"


class ConflictError(StagegateError):
    """The world moved since the caller looked: a stage changed, a delivery was replayed."""

    code = "conflict"


class TransitionRejected(StagegateError):
    """A transition breaks a stage rule (not a gate: gates leave the transition pending)."""

    code = "transition_rejected"


class PermissionDenied(StagegateError):
    code = "permission_denied"


class InvalidInput(StagegateError):
    code = "invalid_input"


class RetryableError(StagegateError):
    """An infrastructure failure that may pass: flows retry these, the API answers 503."""

    code = "retryable"

    def __init__(self, detail: str, delay_s: float = 2.0) -> None:
        super().__init__(detail)
        self.delay_s = delay_s


class PermanentError(StagegateError):
    """An infrastructure failure that retrying will not fix (bad config, missing artifact)."""

    code = "permanent"


class NoReference(StagegateError):
    """A version has no reference data Stagegate can read; `detail` says why. The drift
    monitor reports the verdict "no reference" rather than failing."""

    code = "no_reference"
