"""Where model servers run: local processes (`local.py`) or Kubernetes (`kubernetes/`)."""
