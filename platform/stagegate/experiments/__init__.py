"""Experiment statistics: sequential A/B tests, variance reduction and off-policy estimates.

Pure NumPy and SciPy: arrays in, numbers out. Reading logs and recording decisions is the
job of `stagegate.steps`."""
