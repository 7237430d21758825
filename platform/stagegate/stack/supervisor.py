"""The embedded stack's services, supervised under `settings.home`."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from stagegate import supervise
from stagegate.settings import Settings
from stagegate.stack.secrets import load_secrets
from stagegate.stack.specs import default_specs, service_urls
from stagegate.supervise import ServiceSpec, ServiceStatus


def up(
    settings: Settings,
    *,
    services: Sequence[str] | None = None,
    timeout_s: float = 120,
    on_event: Callable[[str], None] | None = None,
    specs: Sequence[ServiceSpec] | None = None,
) -> dict[str, ServiceStatus]:
    """Start what is not running yet and wait until all are healthy (see `supervise.up`)."""
    chosen = specs if specs is not None else default_specs(settings, load_secrets(settings))
    return supervise.up(
        settings.home, chosen, services=services, timeout_s=timeout_s, on_event=on_event
    )


def down(settings: Settings, *, timeout_s: float = 15) -> list[str]:
    """Stop the model servers the flows started, then every service of the stack."""
    served = supervise.down(settings.serving_root, timeout_s=timeout_s)
    return served + supervise.down(settings.home, timeout_s=timeout_s)


def status(
    settings: Settings, *, specs: Sequence[ServiceSpec] | None = None
) -> dict[str, ServiceStatus]:
    """Each service's state, read from the pid files (works from any process)."""
    urls = {s.name: s.url for s in specs} if specs is not None else service_urls(settings)
    return supervise.status(settings.home, urls)
