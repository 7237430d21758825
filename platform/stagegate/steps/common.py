"""What every step shares."""

from __future__ import annotations

from stagegate.governance.tokens import Principal
from stagegate.lifecycle.stages import Role

# The identity steps act under: it requests transitions and appears in the audit log.
SERVICE = Principal("stagegate", Role.service)
