"""The governance REST API: app factory, auth, error mapping, routers."""
