"""The digest of a model's artifact tree: the registry records it, the model server checks it.

Both sides must hash the same way, so the one definition lives here, beside the other shared
plumbing (`db`, `errors`), importing nothing of Stagegate.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

_CHUNK = 1 << 20


def tree_digest(root: Path, *, skip: frozenset[str] = frozenset()) -> str:
    """sha256 over (relative posix path, NUL, bytes, NUL) of every file, sorted by path;
    `skip` names relative paths that are not part of the artifact."""
    files = sorted(
        (rel, path)
        for path in root.rglob("*")
        if path.is_file() and (rel := path.relative_to(root).as_posix()) not in skip
    )
    digest = hashlib.sha256()
    for rel, path in files:
        digest.update(rel.encode("utf-8"))
        digest.update(b"\0")
        with path.open("rb") as fh:
            while chunk := fh.read(_CHUNK):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()
