"""The kernels registry: ``torch`` (reference, everywhere) and ``triton`` (lazy, CUDA).

``KVSHARE_KERNELS=torch|triton`` picks one; unset (or ``auto``), a CUDA device gets Triton
when it is installed and everything else the torch reference. Asking for ``triton`` where it
cannot run raises :class:`~kvshare.errors.KernelUnavailableError` (``TRITON_INTERPRET=1``
runs the Triton kernels on CPU tensors, for tests).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from functools import cache

import torch
from kvshare.kernels.ops import KernelOps
from kvshare.kernels.torch_ops import TorchOps

from kvshare.errors import KernelUnavailableError
from kvshare.registry import Registry

log = logging.getLogger("kvshare.kernels")
ENV = "KVSHARE_KERNELS"


def _triton() -> KernelOps:
    from kvshare.kernels.triton_ops import TritonOps  # lazy: triton is optional

    return TritonOps()


KERNELS: Registry[KernelOps] = Registry("kernel backend")
KERNELS.register("torch", TorchOps)
KERNELS.register("triton", _triton)


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """True when ``TRITON_INTERPRET=1``: Triton kernels run on CPU tensors (slowly)."""
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def _why_not_triton(device: torch.device) -> str | None:
    if not triton_installed():
        return "Triton is not installed (pip install triton)"
    if device.type != "cuda" and not interpreting():
        return f"Triton kernels need a CUDA device, not {device.type!r} (or TRITON_INTERPRET=1)"
    return None


@cache
def _create(name: str) -> KernelOps:
    return KERNELS.create(name)


@cache
def _log_once(message: str) -> None:
    log.info(message)


def kernels_for(device: torch.device | str, name: str = "auto") -> KernelOps:
    """The kernel backend ``name`` for tensors on ``device``; ``auto``: ``KVSHARE_KERNELS``
    (read per call) if set, else the fastest available there."""
    device = torch.device(device)
    if name == "auto":
        name = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if name == "auto":
        why = _why_not_triton(device) if device.type == "cuda" else "not a CUDA device"
        if why is not None:
            _log_once(f"kvshare kernels: torch ({why})")
            return _create("torch")
        return _create("triton")
    if name == "triton":
        why = _why_not_triton(device)
        if why is not None:
            raise KernelUnavailableError(
                f"{ENV}=triton: {why}; unset {ENV} or set {ENV}=torch to use the torch kernels"
            )
    return _create(name)
