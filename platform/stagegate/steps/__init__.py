"""Idempotent steps the flows run: each joins the registry and the governance database."""
