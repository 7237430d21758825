"""The embedded stack's services, supervised under `settings.home`."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from stagegate import supervise
from stagegate.settings import Settings
from stagegate.stack.secrets import load_secrets
from stagegate.stack.specs import default_specs, service_urls
from stagegate.supervise import WATCHDOG, ServiceSpec, ServiceStatus, WatchPolicy


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


def watch(
    settings: Settings,
    *,
    specs: Sequence[ServiceSpec] | None = None,
    policy: WatchPolicy | None = None,
    on_event: Callable[[str], None] | None = None,
) -> ServiceStatus:
    """Start the watchdog that restarts crashed services of the stack (see `supervise.watch`).

    The model servers under `serving_root` are not watched: converge and reconcile own them.
    """
    chosen = specs if specs is not None else default_specs(settings, load_secrets(settings))
    return supervise.watch(settings.home, chosen, policy=policy, on_event=on_event)


def watchdog_status(settings: Settings) -> ServiceStatus:
    return supervise.watchdog_status(settings.home)


def down(settings: Settings, *, timeout_s: float = 15) -> list[str]:
    """Stop the watchdog, then the model servers the flows started, then the services."""
    watchdog = supervise.down(settings.home, timeout_s=timeout_s, names=[WATCHDOG])
    served = supervise.down(settings.serving_root, timeout_s=timeout_s)
    return watchdog + served + supervise.down(settings.home, timeout_s=timeout_s)


def status(
    settings: Settings, *, specs: Sequence[ServiceSpec] | None = None
) -> dict[str, ServiceStatus]:
    """Each service's state, read from the pid files (works from any process)."""
    urls = {s.name: s.url for s in specs} if specs is not None else service_urls(settings)
    return supervise.status(settings.home, urls)
