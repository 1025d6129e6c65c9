"""Exact parameter and byte accounting.

K separate adapters store K * r * (d + k) parameters per module; a bundle stores one A' (r * k)
and M heads (M * d * r). The routing table (K small integers per module) is reported but, as in
the paper, not counted in S.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from hydraopt.types import ModuleSpec


def adapters_params(modules: Iterable[ModuleSpec], num_tasks: int) -> int:
    """Parameters of K separate LoRA adapters."""
    return sum(num_tasks * m.r * (m.d + m.k) for m in modules)


def bundle_params(modules: Iterable[ModuleSpec], heads: Mapping[str, int]) -> int:
    """Parameters of a bundle with ``heads[name]`` heads in module ``name``."""
    return sum(heads[m.name] * m.d * m.r + m.r * m.k for m in modules)


def storage_report(
    modules: Iterable[ModuleSpec],
    num_tasks: int,
    heads: Mapping[str, int],
    bytes_per_param: int = 2,
) -> dict[str, Any]:
    """Parameters, bytes and S % (bundle over separate adapters), exact.

    Args:
        modules: the adapted modules.
        num_tasks: K.
        heads: module name -> M of that module.
        bytes_per_param: storage dtype size (2 for fp16/bf16, 4 for fp32).
    """
    mods = list(modules)
    full = adapters_params(mods, num_tasks)
    merged = bundle_params(mods, heads)
    return {
        "adapters_params": full,
        "bundle_params": merged,
        "storage_percent": 100.0 * merged / full,
        "saved_percent": 100.0 - 100.0 * merged / full,
        "bytes_per_param": bytes_per_param,
        "adapters_bytes": full * bytes_per_param,
        "bundle_bytes": merged * bytes_per_param,
        "routing_entries": num_tasks * len(mods),
    }
