# One image for all of Stagegate's processes, each its own command (docs/helm.md):
#   API (default)  stagegate db upgrade && uvicorn stagegate.api.app:create_app --factory ...
#   worker         stagegate worker
#   router         stagegate router --policy http://API/api/v1/traffic --host 0.0.0.0
#   model server   stagegate serve-model models:/NAME/VERSION --host 0.0.0.0
# MLflow, Prefect and PostgreSQL are expected to run elsewhere (see docs/architecture.md).
#
# BASE picks the Python the image runs on. The default is slim CPython; for GPU model servers
# pass a CUDA PyTorch base, whose torch the image then uses (requirements.lock has no torch):
#   docker build --build-arg BASE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime -t stagegate:cuda .
# Both stages use the same BASE, so the venv's interpreter links stay valid in the final image.
ARG BASE=python:3.11-slim-bookworm

# -- ui: the web UI compiled with the locked npm packages (docs/ui.md) -------------------------
FROM node:20-bookworm-slim AS ui
WORKDIR /src/platform/stagegate/ui/web
COPY platform/stagegate/ui/web/package.json platform/stagegate/ui/web/package-lock.json ./
RUN npm ci --no-audit --no-fund
COPY platform/stagegate/ui/web ./
RUN npm run build

# -- build: uv and the build backend live here only ------------------------------------------
FROM ${BASE} AS build
SHELL ["/bin/sh", "-eu", "-c"]
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# requirements.lock is resolved for Python 3.11: refuse any other base early, and say why.
RUN python -c "import sys; v = sys.version_info[:2]; assert v == (3, 11), \
f'BASE must carry Python 3.11 (requirements.lock), not {v}'"
RUN python -m pip install --no-cache-dir uv==0.13.9 \
 && python -m venv --system-site-packages /opt/venv
WORKDIR /src
# Dependencies first, from the lock, so code changes reuse this layer.
COPY requirements.lock ./
RUN uv pip install --python /opt/venv/bin/python --no-cache -r requirements.lock
COPY pyproject.toml README.md LICENSE ./
COPY platform ./platform
COPY --from=ui /src/platform/stagegate/ui/static ./platform/stagegate/ui/static
RUN uv pip install --python /opt/venv/bin/python --no-cache --no-deps .

# -- runtime: the venv, the flows and a non-root user; no uv, no compilers --------------------
FROM ${BASE} AS runtime
LABEL org.opencontainers.image.title="stagegate" \
      org.opencontainers.image.description="Stagegate API, worker, router and model server" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/var/lib/stagegate \
    STAGEGATE_HOME=/var/lib/stagegate \
    STAGEGATE_PROJECT_DIR=/app \
    STAGEGATE_API__HOST=0.0.0.0
RUN groupadd --system --gid 10001 stagegate \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/stagegate --create-home \
    --shell /usr/sbin/nologin stagegate
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
# The worker serves the deployments of prefect.yaml, whose entrypoints live in flows/.
COPY prefect.yaml ./
COPY flows ./flows

USER 10001:10001
EXPOSE 8765 8080
# One check for every command: STAGEGATE_HEALTH_URL names what to probe, e.g. the router's
# http://127.0.0.1:8080/health, or file:///var/lib/stagegate/run/worker.ready for the worker.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ.get('STAGEGATE_HEALTH_URL', 'http://127.0.0.1:8765/api/health'), timeout=4).close()"]

# Migrate, then serve the API. Other processes: `docker run IMAGE stagegate worker`, etc.
CMD ["sh", "-c", "stagegate db upgrade && exec uvicorn stagegate.api.app:create_app --factory --host 0.0.0.0 --port 8765"]
