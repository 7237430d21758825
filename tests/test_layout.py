"""The source folder must not shadow the standard library's `platform` module."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_platform_folder_has_no_init() -> None:
    assert not (ROOT / "platform" / "__init__.py").exists()


@pytest.mark.slow
def test_stdlib_platform_still_imports_from_repo_root() -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import platform, stagegate; print(platform.system(), platform.python_version())",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert out[0] == __import__("platform").system()
    assert out[1].startswith("3.11")
