"""Make the chart's credentials Secret once (the pre-install Job runs this with `python -c`).

An existing Secret is kept, and only keys it lacks are added, so an upgrade never rotates a
token the database already knows. Needs `create` on Secrets and `get`/`patch` on this one.
"""

import json
import os
import secrets
import sys

from cryptography.fernet import Fernet
from kubernetes import client, config
from kubernetes.client.rest import ApiException

CONFLICT = 409


def fresh() -> dict[str, str]:
    return {
        "webhook-secret": secrets.token_urlsafe(32),
        "router-token": "sg_" + secrets.token_urlsafe(32),  # tokens.PREFIX: the API checks it
        "alert-secret": secrets.token_urlsafe(32),
        "mlflow-fernet-key": Fernet.generate_key().decode(),
        "postgres-password": secrets.token_hex(24),  # hex: safe inside a database URL
    }


def main() -> None:
    name = os.environ["SECRET_NAME"]
    namespace = os.environ["SECRET_NAMESPACE"]
    labels = json.loads(os.environ.get("SECRET_LABELS", "{}"))
    config.load_incluster_config()
    core = client.CoreV1Api()
    values = fresh()
    body = client.V1Secret(
        metadata=client.V1ObjectMeta(name=name, namespace=namespace, labels=labels),
        type="Opaque",
        string_data=values,
    )
    try:
        core.create_namespaced_secret(namespace, body)
    except ApiException as exc:
        if exc.status != CONFLICT:
            sys.exit(f"cannot create Secret {namespace}/{name}: {exc.status} {exc.reason}")
    else:
        print(f"created Secret {namespace}/{name} with {', '.join(sorted(values))}")
        return
    have = core.read_namespaced_secret(name, namespace).data or {}
    missing = {k: v for k, v in values.items() if k not in have}
    if missing:
        core.patch_namespaced_secret(name, namespace, {"stringData": missing})
    added = ", ".join(sorted(missing)) or "nothing"
    print(f"kept Secret {namespace}/{name}; added {added}")


if __name__ == "__main__":  # `python -c` runs it as __main__
    main()
