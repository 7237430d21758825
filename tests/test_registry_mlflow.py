"""`MlflowRegistry` against a real `mlflow server` (see `tests/fixtures/mlflow_server.py`)."""

from __future__ import annotations

import getpass
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from stagegate.errors import InvalidInput, NotFoundError, PermanentError, RetryableError
from stagegate.lifecycle.stages import Stage
from stagegate.registry import mlflow as adapter
from stagegate.registry.mlflow import MlflowRegistry, parse_depends_on
from stagegate.registry.protocol import DEPENDS_ON_TAG, STAGE_TAG, ModelRegistry, VersionRef
from tests.fixtures.mlflow_server import MlflowServer, free_port, register_sklearn_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"
EVENTS: list[Any] = [
    "model_version.created",
    "model_version_tag.set",
    "model_version_alias.created",
]


@dataclass(frozen=True)
class Trained:
    name: str
    v1: int
    run1: str
    v2: int
    run2: str
    source: str


@pytest.fixture(scope="module")
def client(mlflow_server: MlflowServer) -> MlflowClient:
    return MlflowClient(tracking_uri=mlflow_server.url, registry_uri=mlflow_server.url)


@pytest.fixture(scope="module")
def trained(mlflow_server: MlflowServer, client: MlflowClient) -> Trained:
    """Two real versions of `churn`: v1 with a dataset and a commit, v2 trained differently."""
    v1, run1 = register_sklearn_model(
        mlflow_server.url, "churn", n_estimators=5, tags={"mlflow.source.git.commit": COMMIT}
    )
    v2, run2 = register_sklearn_model(mlflow_server.url, "churn", n_estimators=7, log_dataset=False)
    source = str(client.get_model_version("churn", str(v1)).source)
    return Trained("churn", v1, run1, v2, run2, source)


_counter = iter(range(1, 10_000))


def _cheap_version(
    client: MlflowClient, trained: Trained, name: str, tags: dict[str, str] | None = None
) -> int:
    """A new version pointing at churn v1's logged model: no training, ~20 ms."""
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name)
    model_id = trained.source.removeprefix("models:/")  # 3.x sources are logged models
    mv = client.create_model_version(
        name, trained.source, run_id=trained.run1, tags=tags, model_id=model_id
    )
    return int(mv.version)


@pytest.fixture
def fresh_name() -> str:
    return f"model-{next(_counter)}"


def test_is_a_model_registry(mlflow_registry: MlflowRegistry) -> None:
    registry: ModelRegistry = mlflow_registry
    assert registry is mlflow_registry


def test_get_version_joins_the_run(mlflow_registry: MlflowRegistry, trained: Trained) -> None:
    got = mlflow_registry.get_version("churn", trained.v1)

    assert (got.name, got.version, got.run_id) == ("churn", trained.v1, trained.run1)
    assert got.source.startswith("models:/")
    assert got.creator == getpass.getuser()  # version user_id is empty: the run's mlflow.user
    assert abs(got.created_at - datetime.now(UTC)) < timedelta(minutes=10)
    assert set(got.metrics) == {"accuracy"}
    assert 0.5 < got.metrics["accuracy"] <= 1.0
    assert got.params["n_estimators"] == "5"
    assert got.code_commit == COMMIT
    assert len(got.datasets) == 1
    dataset = got.datasets[0]
    assert dataset.name == "training"
    assert dataset.context == "training"
    assert dataset.digest
    assert dataset.source
    assert got.depends_on == ()
    assert got.aliases == ()


def test_get_version_without_dataset(mlflow_registry: MlflowRegistry, trained: Trained) -> None:
    got = mlflow_registry.get_version("churn", trained.v2)

    assert got.run_id == trained.run2
    assert got.datasets == ()
    assert got.params["n_estimators"] == "7"


def test_get_version_not_found(mlflow_registry: MlflowRegistry, trained: Trained) -> None:
    with pytest.raises(NotFoundError):
        mlflow_registry.get_version("churn", 999)
    with pytest.raises(NotFoundError):
        mlflow_registry.get_version("no-such-model", 1)
    with pytest.raises(NotFoundError):
        mlflow_registry.artifact_digest("no-such-model", 1)


@pytest.mark.parametrize("name", ["../x", "a/b", "", "-lead", "x" * 129, "a..b"])
def test_invalid_names_never_reach_mlflow(mlflow_registry: MlflowRegistry, name: str) -> None:
    with pytest.raises(InvalidInput):
        mlflow_registry.get_version(name, 1)
    with pytest.raises(InvalidInput):
        mlflow_registry.artifact_digest(name, 1)
    with pytest.raises(InvalidInput):
        mlflow_registry.mirror_stage(name, 1, Stage.production)


@pytest.mark.parametrize("version", [0, -1, True])
def test_invalid_versions(mlflow_registry: MlflowRegistry, version: int) -> None:
    with pytest.raises(InvalidInput):
        mlflow_registry.get_version("churn", version)


def test_depends_on_from_the_version_tag(
    mlflow_registry: MlflowRegistry, client: MlflowClient, trained: Trained, fresh_name: str
) -> None:
    good = _cheap_version(
        client, trained, fresh_name, tags={DEPENDS_ON_TAG: "embedder:3, tokenizer:1"}
    )
    bad = _cheap_version(client, trained, fresh_name, tags={DEPENDS_ON_TAG: "embedder"})

    assert mlflow_registry.get_version(fresh_name, good).depends_on == (
        VersionRef("embedder", 3),
        VersionRef("tokenizer", 1),
    )
    with pytest.raises(InvalidInput, match=r"stagegate\.depends_on.*'embedder'"):
        mlflow_registry.get_version(fresh_name, bad)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("", ()),
        ("  ", ()),
        ("a:1", (VersionRef("a", 1),)),
        ("a:1,b.c-d_e:20", (VersionRef("a", 1), VersionRef("b.c-d_e", 20))),
        (" a : 2 ,b:3 ", (VersionRef("a", 2), VersionRef("b", 3))),
    ],
)
def test_parse_depends_on(value: str, expected: tuple[VersionRef, ...]) -> None:
    assert parse_depends_on(value, model="self") == expected


@pytest.mark.parametrize(
    "value",
    ["a", "a:", ":1", "a:0", "a:-1", "a:1.5", "a:x", "a:1,", "a:1,,b:2", "../x:1", "a:1,a:2",
     "self:1", "a:1:2", "a:\u0661"],
)  # fmt: skip
def test_parse_depends_on_rejects(value: str) -> None:
    with pytest.raises(InvalidInput, match=r"stagegate\.depends_on"):
        parse_depends_on(value, model="self")


def test_list_versions_pages_and_sees_new_versions(
    mlflow_registry: MlflowRegistry,
    client: MlflowClient,
    trained: Trained,
    fresh_name: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    before = mlflow_registry.list_versions()
    assert VersionRef("churn", trained.v1) in before
    assert VersionRef("churn", trained.v2) in before

    v1 = _cheap_version(client, trained, fresh_name)
    v2 = _cheap_version(client, trained, fresh_name)
    monkeypatch.setattr(adapter, "_SEARCH_PAGE_SIZE", 1)  # one version per page
    after = mlflow_registry.list_versions()

    assert set(after) - set(before) == {VersionRef(fresh_name, v1), VersionRef(fresh_name, v2)}
    assert after == sorted(after, key=lambda ref: (ref.name, ref.version))
    assert len(after) == len(set(after))


def test_artifact_digest(
    mlflow_registry: MlflowRegistry,
    trained: Trained,
    tmp_path: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(scratch))

    first = mlflow_registry.artifact_digest("churn", trained.v1)
    again = mlflow_registry.artifact_digest("churn", trained.v1)
    other = mlflow_registry.artifact_digest("churn", trained.v2)

    assert len(first) == 64
    assert int(first, 16) >= 0
    assert first == again
    assert first != other
    assert os.listdir(scratch) == []  # temp dirs removed


def test_predict_scores_rows_with_the_approved_artifact_only(
    mlflow_registry: MlflowRegistry, trained: Trained
) -> None:
    """The off-policy gate scores logged contexts with the candidate: one answer per row,
    from the artifact whose digest was recorded, and no other."""
    import pyarrow as pa
    from sklearn.datasets import make_classification

    features, _ = make_classification(n_samples=200, n_features=6, random_state=0)
    rows = pa.table({f"f{i}": features[:5, i] for i in range(6)})
    digest = mlflow_registry.artifact_digest("churn", trained.v1)
    answers = mlflow_registry.predict("churn", trained.v1, rows, digest=digest)
    assert len(answers) == 5
    assert set(answers) <= {0, 1}
    with pytest.raises(PermanentError, match="changed since it was recorded"):
        mlflow_registry.predict(
            "churn", trained.v1, rows, digest=mlflow_registry.artifact_digest("churn", trained.v2)
        )
    with pytest.raises(PermanentError, match="failed to score"):
        mlflow_registry.predict("churn", trained.v1, pa.table({"x": [1.0]}), digest=None)


def test_artifact_digest_of_same_model_files_matches(
    mlflow_registry: MlflowRegistry, client: MlflowClient, trained: Trained, fresh_name: str
) -> None:
    # A second registration of v1's logged model has the same files, so the same digest.
    version = _cheap_version(client, trained, fresh_name)
    assert mlflow_registry.artifact_digest(fresh_name, version) == mlflow_registry.artifact_digest(
        "churn", trained.v1
    )


def _aliases(client: MlflowClient, name: str) -> dict[str, str]:
    return dict(client.get_registered_model(name).aliases)


def _stage_tag(client: MlflowClient, name: str, version: int) -> str | None:
    return client.get_model_version(name, str(version)).tags.get(STAGE_TAG)


def test_mirror_stage_moves_aliases(
    mlflow_registry: MlflowRegistry,
    client: MlflowClient,
    trained: Trained,
    fresh_name: str,
) -> None:
    name = fresh_name
    v1 = _cheap_version(client, trained, name)
    v2 = _cheap_version(client, trained, name)

    mlflow_registry.mirror_stage(name, v1, Stage.production)
    assert _aliases(client, name) == {"champion": str(v1)}
    assert _stage_tag(client, name, v1) == "production"
    assert mlflow_registry.get_version(name, v1).aliases == ("champion",)

    mlflow_registry.mirror_stage(name, v2, Stage.canary)
    assert _aliases(client, name) == {"champion": str(v1), "challenger": str(v2)}

    mlflow_registry.mirror_stage(name, v2, Stage.production)
    assert _aliases(client, name) == {"champion": str(v2)}
    assert _stage_tag(client, name, v2) == "production"

    mlflow_registry.mirror_stage(name, v1, Stage.retired)
    assert _aliases(client, name) == {"champion": str(v2)}  # v1 no longer held it: untouched
    assert _stage_tag(client, name, v1) == "retired"

    mlflow_registry.mirror_stage(name, v2, Stage.rolled_back)
    assert _aliases(client, name) == {}
    assert _stage_tag(client, name, v2) == "rolled_back"


def test_mirror_stage_is_idempotent(
    mlflow_registry: MlflowRegistry,
    client: MlflowClient,
    trained: Trained,
    fresh_name: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    version = _cheap_version(client, trained, fresh_name)
    mlflow_registry.mirror_stage(fresh_name, version, Stage.shadow)

    def no_writes(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"unexpected registry write {args}")

    inner = mlflow_registry._client
    for method in (
        "set_model_version_tag",
        "set_registered_model_alias",
        "delete_registered_model_alias",
    ):
        monkeypatch.setattr(inner, method, no_writes)
    mlflow_registry.mirror_stage(fresh_name, version, Stage.shadow)

    assert _aliases(client, fresh_name) == {"shadow": str(version)}
    assert _stage_tag(client, fresh_name, version) == "shadow"


def test_mirror_stage_unknown_version(mlflow_registry: MlflowRegistry, trained: Trained) -> None:
    with pytest.raises(NotFoundError):
        mlflow_registry.mirror_stage("churn", 999, Stage.production)


@pytest.fixture
def no_webhooks(client: MlflowClient) -> Iterator[None]:
    yield
    for hook in client.list_webhooks():
        client.delete_webhook(hook.webhook_id)


@pytest.mark.usefixtures("no_webhooks")
def test_ensure_webhook_is_idempotent(
    mlflow_registry: MlflowRegistry, client: MlflowClient
) -> None:
    first = mlflow_registry.ensure_webhook("http://127.0.0.1:9/hooks/mlflow", "s3cret", EVENTS)
    second = mlflow_registry.ensure_webhook("http://127.0.0.1:9/hooks/mlflow", "s3cret", EVENTS)
    assert first == second

    moved = mlflow_registry.ensure_webhook(
        "http://127.0.0.1:10/hooks/mlflow", "other", ["model_version.created"]
    )
    assert moved == first

    hooks = [hook for hook in client.list_webhooks() if hook.name == "stagegate"]
    assert len(hooks) == 1
    assert hooks[0].url == "http://127.0.0.1:10/hooks/mlflow"
    assert [str(event) for event in hooks[0].events] == ["model_version.created"]
    assert hooks[0].status.is_active()


@pytest.mark.usefixtures("no_webhooks")
def test_ensure_webhook_reactivates_and_dedupes(
    mlflow_registry: MlflowRegistry, client: MlflowClient
) -> None:
    a = client.create_webhook(
        name="stagegate", url="http://127.0.0.1:9/a", events=EVENTS, status="DISABLED"
    )
    client.create_webhook(name="stagegate", url="http://127.0.0.1:9/b", events=EVENTS)
    client.create_webhook(name="someone-else", url="http://127.0.0.1:9/c", events=EVENTS)

    assert mlflow_registry.ensure_webhook("http://127.0.0.1:9/d", "s", EVENTS) == a.webhook_id

    hooks = {hook.name: hook for hook in client.list_webhooks()}
    assert len(list(client.list_webhooks())) == 2
    assert hooks["stagegate"].webhook_id == a.webhook_id
    assert hooks["stagegate"].status.is_active()
    assert hooks["stagegate"].url == "http://127.0.0.1:9/d"


@pytest.mark.usefixtures("no_webhooks")
def test_ensure_webhook_rejects_unknown_events(mlflow_registry: MlflowRegistry) -> None:
    with pytest.raises(InvalidInput):
        mlflow_registry.ensure_webhook("http://127.0.0.1:9/x", "s", ["model_version.exploded"])
    with pytest.raises(InvalidInput):
        mlflow_registry.ensure_webhook("http://127.0.0.1:9/x", "s", [])


def test_closed_port_is_retryable(monkeypatch: pytest.MonkeyPatch) -> None:
    # mlflow's own HTTP retries default to 7 with backoff (minutes); fail fast here.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    registry = MlflowRegistry(f"http://127.0.0.1:{free_port()}")

    with pytest.raises(RetryableError):
        registry.get_version("churn", 1)
    with pytest.raises(RetryableError):
        registry.list_versions()
    with pytest.raises(RetryableError):
        registry.artifact_digest("churn", 1)
    with pytest.raises(RetryableError):
        registry.ensure_webhook("http://127.0.0.1:9/x", "s", EVENTS)
