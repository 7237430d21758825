# Stagegate's own processes: the governance API (default command) and `stagegate worker`.
# MLflow, Prefect and PostgreSQL are expected to run elsewhere (see docs/architecture.md).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    STAGEGATE_HOME=/var/lib/stagegate \
    STAGEGATE_PROJECT_DIR=/app \
    STAGEGATE_API__HOST=0.0.0.0

WORKDIR /app

# Dependencies first, from the lock, so code changes reuse this layer.
COPY requirements.lock ./
RUN pip install --no-cache-dir uv==0.13.9 \
 && uv pip install --system --no-cache -r requirements.lock

COPY pyproject.toml README.md LICENSE prefect.yaml ./
COPY platform ./platform
COPY flows ./flows
RUN uv pip install --system --no-cache --no-deps . \
 && useradd --system --uid 10001 --home-dir /var/lib/stagegate --create-home stagegate

USER 10001
EXPOSE 8765
HEALTHCHECK --interval=30s --timeout=5s CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8765/api/health', timeout=4)"]

# Migrate, then serve. `docker run IMAGE stagegate worker` runs the flow worker instead.
CMD ["sh", "-c", "stagegate db upgrade && exec uvicorn stagegate.api.app:create_app --factory --host 0.0.0.0 --port 8765"]
