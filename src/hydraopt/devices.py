"""Checking the device a run asks for, before any work is done on it.

``torch.device("cuda")`` is a valid object on a machine without CUDA; the failure comes later,
deep in the first generator or copy, with a multi-line message. These checks turn every unusable
device into one line up front.
"""

from __future__ import annotations

from hydraopt.errors import HydraoptError

SUPPORTED_TYPES = ("cpu", "cuda")


def check_device(name: str) -> None:
    """Refuse a device that is unknown, not supported by hydraopt, or absent on this machine.

    Args:
        name: a torch device string: ``cpu``, ``cuda`` or ``cuda:N``.
    """
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise HydraoptError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type not in SUPPORTED_TYPES:
        raise HydraoptError(f"device {name!r}: hydraopt runs on cpu or cuda, not {device.type}")
    if device.type != "cuda":
        return
    if not torch.cuda.is_available():
        built = "without CUDA" if torch.version.cuda is None else "with CUDA, but no GPU is visible"
        raise HydraoptError(
            f"device {name!r}: CUDA is not available (torch built {built}); use cpu"
        )
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise HydraoptError(
            f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)"
        )
