"""HTTP routers: thin, they call governance services and shape responses."""
