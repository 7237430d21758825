"""Evidently's HTML reports, stored beside the inference log under `_reports/`.

The leading underscore keeps them out of every discovery of the log (pyarrow's and our
globs). A report is found only through the evaluation that names its path and digest, so
what the API serves is what the check wrote: a path is never taken from a request.
"""

from __future__ import annotations

import gzip
import hashlib
import posixpath

from stagegate.errors import NotFoundError
from stagegate.serving.inference_log.format import is_object_store, open_root, segment

REPORTS_DIR = "_reports"


def save(log_url: str, model: str, name: str, html: str) -> tuple[str, str]:
    """Write the report gzipped (Evidently's pages are about 4 MB of mostly inline script, about
    a third of that compressed); returns (path relative to the log root, sha256 of the file)."""
    data = gzip.compress(html.encode(), compresslevel=6, mtime=0)
    relative = f"{REPORTS_DIR}/{segment('model', model)}/{name}.html.gz"
    fs, root = open_root(log_url)
    if not is_object_store(fs):  # an object store has no folders (s3fs would make a bucket)
        fs.makedirs(posixpath.dirname(f"{root}/{relative}"), exist_ok=True)
    fs.pipe_file(f"{root}/{relative}", data)  # small: sent whole (one PUT), then read whole
    return relative, hashlib.sha256(data).hexdigest()


def load(log_url: str, relative: str, sha256: str) -> bytes:
    """The report's HTML, if the file is still the one the check wrote."""
    normal = posixpath.normpath(relative)
    if not normal.startswith(f"{REPORTS_DIR}/") or normal != relative:
        raise NotFoundError("no such report")
    fs, root = open_root(log_url)
    try:
        with fs.open(f"{root}/{relative}", "rb") as f:
            data: bytes = f.read()
    except FileNotFoundError as exc:
        raise NotFoundError("the report file is gone from the inference log") from exc
    if hashlib.sha256(data).hexdigest() != sha256:
        raise NotFoundError("the report file was changed after the check wrote it")
    return gzip.decompress(data)
