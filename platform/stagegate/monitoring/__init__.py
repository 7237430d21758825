"""Drift monitor: compares a window of logged traffic with the reference data, as Arrow tables."""
