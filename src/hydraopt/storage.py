"""Exact parameter and byte accounting.

K separate adapters store K * r * (d + k) parameters per module; a bundle stores one A' (r * k)
and M heads (M * d * r). The routing table (K small integers per module) is reported but, as in
the paper, not counted in S. K separate VeRA adapters store K * (d + r) per module and a VeRA
bundle Mb * d + Md * r (one of Mb, Md is 1); their frozen projections are not counted.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

from hydraopt.results import StorageReport
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
) -> StorageReport:
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
    return _report(full, merged, bytes_per_param, num_tasks * len(mods))


def records_storage_report(
    modules: Iterable[ModuleSpec], num_tasks: int, bundle_params: int, bytes_per_param: int = 2
) -> StorageReport:
    """As :func:`storage_report`, from the bundle's stored parameters counted by its records
    (``num_params``: M d r + r k per module; d R + k R + K R² for a shared basis)."""
    mods = list(modules)
    return _report(
        adapters_params(mods, num_tasks), bundle_params, bytes_per_param, num_tasks * len(mods)
    )


def _report(
    full: int,
    merged: int,
    bytes_per_param: int,
    routing_entries: int,
    projection_params: int | None = None,
) -> StorageReport:
    return StorageReport(
        adapters_params=full,
        bundle_params=merged,
        storage_percent=100.0 * merged / full,
        saved_percent=100.0 - 100.0 * merged / full,
        bytes_per_param=bytes_per_param,
        adapters_bytes=full * bytes_per_param,
        bundle_bytes=merged * bytes_per_param,
        routing_entries=routing_entries,
        projection_params=projection_params,
    )


def quantized_storage_report(report: StorageReport, stored_bytes: int) -> StorageReport:
    """``report`` of the same bundle stored in ``stored_bytes`` (8/4-bit codes + scales, and any
    16-bit tensors), measured against the K separate adapters at 16 bits.

    Parameters stay as counted; bytes become what ``tensors.safetensors`` holds for the counted
    tensors (headers aside), and S % = 100 * bundle_bytes / adapters_bytes is then a ratio of
    bytes, the reference being 2 bytes per parameter of the separate adapters.
    """
    reference = 2 * report.adapters_params
    return dataclasses.replace(
        report,
        storage_percent=100.0 * stored_bytes / reference,
        saved_percent=100.0 - 100.0 * stored_bytes / reference,
        bytes_per_param=2,
        adapters_bytes=reference,
        bundle_bytes=stored_bytes,
    )


def vera_adapters_params(modules: Iterable[ModuleSpec], num_tasks: int) -> int:
    """Trained parameters of K separate VeRA adapters: K * (d + r) per module (λb and λd)."""
    return sum(num_tasks * (m.d + m.r) for m in modules)


def vera_bundle_params(
    modules: Iterable[ModuleSpec], rows_b: Mapping[str, int], rows_d: Mapping[str, int]
) -> int:
    """Parameters of a VeRA bundle with ``rows_b[name]`` λb and ``rows_d[name]`` λd rows."""
    return sum(rows_b[m.name] * m.d + rows_d[m.name] * m.r for m in modules)


def vera_storage_report(
    modules: Iterable[ModuleSpec],
    num_tasks: int,
    rows_b: Mapping[str, int],
    rows_d: Mapping[str, int],
    projection_params: int,
    bytes_per_param: int = 2,
) -> StorageReport:
    """S % of a VeRA bundle over K separate VeRAs, exact, with ``projection_params`` reported.

    The frozen projections (``projection_params`` = r * (max_in + max_out)) are reported but not
    counted on either side: every task shares the same ones (one ``projection_prng_key``) and
    PEFT can regenerate them, so storing K VeRAs needs them once, like the bundle. With M = 1
    this gives the paper's 20 % for K = 5 (Table 3); docs/methods.md compares its M > 1 steps.
    """
    mods = list(modules)
    full = vera_adapters_params(mods, num_tasks)
    merged = vera_bundle_params(mods, rows_b, rows_d)
    return _report(full, merged, bytes_per_param, num_tasks * len(mods), projection_params)
