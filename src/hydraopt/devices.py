"""The device a run asks for: checked before any work is done on it, and what it does fast.

``torch.device("cuda")`` is a valid object on a machine without CUDA; the failure comes later,
deep in the first generator or copy, with a multi-line message. These checks turn every unusable
device into one line up front.

The hardware questions (does this CPU have fast bfloat16?) live here, outside the pure tensor
core: ``merge/`` is told a precision, it never reads /proc/cpuinfo itself.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from hydraopt.errors import HydraoptError

if TYPE_CHECKING:
    import torch

Precision = Literal["float32", "bfloat16"]
PRECISION_NAMES: tuple[str, ...] = ("float32", "bfloat16")

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


def fast_bfloat16(device: torch.device) -> bool:
    """Whether bfloat16 matmuls are fast on ``device`` (else they can be 10x *slower* than fp32).

    CUDA: the device says. CPU: only with AVX-512 BF16 or AMX (read from /proc/cpuinfo, so on
    other systems we stay in float32, the safe choice).
    """
    import torch

    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type != "cpu":
        return False
    return _cpu_has_bf16()


@functools.cache
def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> Precision:
    """``auto`` -> ``bfloat16`` where it is fast (see :func:`fast_bfloat16`), else ``float32``."""
    if precision == "auto":
        return "bfloat16" if fast_bfloat16(device) else "float32"
    if precision not in PRECISION_NAMES:
        raise ValueError(f"precision must be auto, float32 or bfloat16, got {precision!r}")
    return precision  # type: ignore[return-value]
