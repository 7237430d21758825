"""`--device`: which accelerator a PyTorch model runs on. torch is imported only when needed."""

from __future__ import annotations

import importlib
import re
from types import ModuleType

from stagegate.errors import InvalidInput

_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def parse_device(spec: str) -> str:
    """`auto`, `cpu`, `cuda` or `cuda:N`, normalised; anything else is refused."""
    device = spec.strip().lower()
    if not _DEVICE.match(device):
        raise InvalidInput(f"--device must be auto, cpu, cuda or cuda:N, not {spec!r}")
    return device


def _torch() -> ModuleType | None:
    try:
        return importlib.import_module("torch")
    except ImportError:
        return None


def check_device(spec: str) -> str:
    """Refuse at startup a CUDA device this machine cannot give, before the port opens."""
    device = parse_device(spec)
    if not device.startswith("cuda"):
        return device
    torch = _torch()
    if torch is None:
        raise InvalidInput(f"--device {device} needs PyTorch, which is not installed")
    if not torch.cuda.is_available():
        raise InvalidInput(f"--device {device}: PyTorch sees no CUDA device on this machine")
    index = int(device.partition(":")[2] or 0)
    count = int(torch.cuda.device_count())
    if index >= count:
        raise InvalidInput(f"--device {device}: this machine has {count} CUDA device(s)")
    return device


def resolve_device(spec: str) -> str:
    """The concrete device: `auto` is `cuda` when torch sees a GPU, else `cpu`."""
    device = check_device(spec)
    if device != "auto":
        return device
    torch = _torch()
    return "cuda" if torch is not None and torch.cuda.is_available() else "cpu"
