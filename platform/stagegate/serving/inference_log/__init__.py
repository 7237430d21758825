"""The inference log: one Parquet record per answer, read back by Arrow or DuckDB, with labels."""
