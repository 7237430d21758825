"""Prod mode refuses development defaults, all named in one error."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from stagegate.settings import (
    ApiSettings,
    DatabaseSettings,
    MlflowSettings,
    Settings,
    WebhookSettings,
)

STRONG = "s" * 32
PG = DatabaseSettings(url="postgresql+psycopg://sg@db.internal/stagegate")


def prod(**overrides: object) -> Settings:
    fields: dict[str, object] = {
        "mode": "prod",
        "webhook": WebhookSettings(secret=STRONG),
        "db": PG,
        "api": ApiSettings(public_url="https://stagegate.example.com"),
        "mlflow": MlflowSettings(tracking_uri="https://mlflow.example.com"),
    }
    fields.update(overrides)
    return Settings.model_validate(fields)


def test_a_well_configured_prod_passes() -> None:
    assert prod().mode == "prod"


@pytest.mark.parametrize(
    ("override", "complaint"),
    [
        ({"webhook": WebhookSettings()}, "WEBHOOK__SECRET must be set"),
        ({"webhook": WebhookSettings(secret="x")}, "at least 32 bytes"),
        ({"webhook": WebhookSettings(secret="")}, "at least 32 bytes"),
        ({"db": DatabaseSettings()}, "not SQLite"),
        ({"api": ApiSettings(public_url="http://10.0.0.5:8765")}, "API__PUBLIC_URL uses plain"),
        (
            {"mlflow": MlflowSettings(tracking_uri="http://mlflow:5000")},
            "TRACKING_URI uses plain http",
        ),
    ],
)
def test_prod_refuses_development_defaults(override: dict[str, object], complaint: str) -> None:
    with pytest.raises(ValidationError, match=complaint):
        prod(**override)


def test_dev_mode_keeps_its_defaults() -> None:
    settings = Settings()
    assert settings.database_url.startswith("sqlite")
