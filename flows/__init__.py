"""Prefect flows: thin wrappers that add retries, triggers and schedules to `stagegate.steps`."""
