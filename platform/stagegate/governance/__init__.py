"""Governance records and services: tokens, versions, transitions, approvals, audit, lineage."""
