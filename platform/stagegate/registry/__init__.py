"""The model registry boundary: a protocol, and the MLflow adapter (`mlflow.py`)."""
