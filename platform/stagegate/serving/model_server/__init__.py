"""The model server: an MLflow pyfunc behind MLflow's scoring formats, with micro-batching."""
