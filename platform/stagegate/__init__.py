"""Stagegate: gated promotion of MLflow model versions, with approvals, audit and lineage."""

__version__ = "0.1.0"
