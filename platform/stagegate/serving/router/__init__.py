"""The traffic router: sticky A/B split, shadow mirroring, fallback, hot-reloaded policies."""
