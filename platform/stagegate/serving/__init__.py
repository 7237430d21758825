"""The data plane: model server, traffic router, inference log, and serving backends."""
