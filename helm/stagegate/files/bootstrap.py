"""Migrate the governance database and register the router's token (the API's init container
runs this with `python -c`). Both steps are idempotent; a replica that loses a race on the
first install exits non-zero and its restart finds the work done."""

import os
import sys

from stagegate.db import make_engine, transaction
from stagegate.errors import StagegateError
from stagegate.governance import tokens
from stagegate.lifecycle.stages import Role
from stagegate.migrate import upgrade
from stagegate.settings import get_settings

ROUTER_IDENTITY = "stagegate-router"  # the name the router's polls are recorded under


def main() -> None:
    settings = get_settings()
    upgrade(settings.database_url)
    engine = make_engine(settings.database_url)
    try:
        with transaction(engine) as session:
            added = tokens.ensure_token(
                session,
                name=ROUTER_IDENTITY,
                role=Role.service,
                secret=os.environ["STAGEGATE_ROUTER_TOKEN"],
                actor="stagegate",
            )
    except StagegateError as exc:
        sys.exit(f"cannot register the {ROUTER_IDENTITY} token: {exc.detail}")
    finally:
        engine.dispose()
    print(f"database at head; {ROUTER_IDENTITY} token {'registered' if added else 'present'}")


if __name__ == "__main__":  # `python -c` runs it as __main__
    main()
