"""What a benchmark's numbers depend on besides the code: the CPU's kernels and the precision path.

The default merge's refinement runs its dense products in bfloat16 where bfloat16 is fast
(AVX-512 BF16 / AMX CPUs, CUDA) and in float32 elsewhere (AVX2-only x86, ARM):
:func:`hydraopt.devices.resolve_precision`. The two paths differ ~2x in speed, so every speed
figure says which one it took, and on which CPU (issue 22). ``--refine-precision float32``
reproduces the float32 path on any machine.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from hydraopt.devices import fast_bfloat16, resolve_precision

PRECISION_CHOICES = ("auto", "float32", "bfloat16")


def cpu_record(device: str = "cpu") -> dict[str, Any]:
    """The machine facts a speed figure depends on.

    Returns:
        cpu_capability: ``torch.backends.cpu.get_cpu_capability()`` (the ATen kernels' ISA:
        AVX2, AVX512, ...); fast_bfloat16: the rule ``refine_precision=auto`` follows;
        auto_precision: what ``auto`` resolves to here; load_average: 1/5/15-minute load when
        the run started (the machine may be shared).
    """
    return {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "fast_bfloat16": fast_bfloat16(torch.device(device)),
        "auto_precision": resolve_precision("auto", torch.device(device)),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def precision_path(refine_precision: str, device: str = "cpu") -> str:
    """The dtype the refinement's products run in for a ``refine_precision`` setting."""
    return resolve_precision(refine_precision, torch.device(device))


def describe(record: dict[str, Any]) -> str:
    """One line for a log: capability, bf16 rule, load."""
    load = record["load_average"]
    load_text = "n/a" if load is None else " ".join(f"{x:.2f}" for x in load)
    return (
        f"cpu capability {record['cpu_capability']}, fast bfloat16 {record['fast_bfloat16']} "
        f"(auto -> {record['auto_precision']}), load average {load_text}"
    )
