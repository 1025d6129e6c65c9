"""Run a registered merge method over every module of an adapter set (LoRA or VeRA).

The work is cut into chunks of same-shaped modules (:mod:`hydraopt.engine_chunks`) that run in
this process or as Ray tasks (:mod:`hydraopt.engine_ray`); the set's kind picks the method's
entry point and the bundle type (:mod:`hydraopt.kinds`); the method is always looked up by name
in the one registry.
"""

from __future__ import annotations

import time
from typing import Any

from hydraopt.engine_chunks import (
    DEFAULT_CHUNK_ELEMENTS,
    EngineOptions,
    chunk_generator,
    iter_merged,
    merge_chunk,
    plan_chunks,
    plan_module_configs,
)
from hydraopt.errors import HydraoptError
from hydraopt.io.dtypes import DTYPES
from hydraopt.kinds.registry import get_kind
from hydraopt.merge.base import build_config, method_heads
from hydraopt.merge.registry import get_method
from hydraopt.progress import ProgressArg, as_callback
from hydraopt.results import Provenance
from hydraopt.types import Bundle, VeraBundle
from hydraopt.version import __version__

__all__ = [
    "DEFAULT_CHUNK_ELEMENTS",
    "EngineOptions",
    "chunk_generator",
    "iter_merged",
    "merge_adapter_set",
    "merge_chunk",
    "plan_chunks",
    "resolve_config",
]


def resolve_config(
    method: str, options: dict[str, Any] | Any, num_tasks: int, kind: str = "lora"
) -> Any:
    """The method's typed config from options (or a config as is), checked against K.

    Args:
        kind: the adapters' kind (``lora`` or ``vera``, an adapter set's ``kind``); picks the
            method's config class for it.
    """
    method_obj = get_method(method)
    config_class = get_kind(kind).config_class(method_obj)
    if isinstance(options, dict):
        if method_obj.takes_heads and options.get("heads") is None:
            raise HydraoptError(
                f"{method} needs heads = M, 1 <= M <= K = {num_tasks} "
                "(1 = smallest, K = most faithful)"
            )
        config = build_config(config_class, options)
    elif isinstance(options, config_class):
        config = options
    else:
        raise TypeError(f"options must be a dict or a {config_class.__name__}")
    method_heads(method_obj, config, num_tasks)  # refuse an impossible M before any work
    return config


def merge_adapter_set(
    aset: Any,
    method: str = "hydraopt",
    options: dict[str, Any] | Any = None,
    *,
    engine: EngineOptions | None = None,
    progress: ProgressArg = None,
    bytes_per_param: int = 2,
) -> Bundle | VeraBundle:
    """Merge every module of ``aset`` with the registered ``method``.

    Args:
        aset: validated adapters (:func:`hydraopt.load_adapter_set`), LoRA or VeRA; a VeRA set
            gives a :class:`VeraBundle`.
        method: registry name (``hydraopt``, ``ties``, ...).
        options: the method's config fields (e.g. ``{"heads": 2, "distance": "mae"}``), or a
            config instance of the method.
        engine: seed, device and memory budget.
        progress: ``True`` shows progress on stderr (a bar on a terminal, a plain line every
            30 s in a log or notebook); a callable is told how many modules just finished;
            ``None``/``False``: silent.
        bytes_per_param: storage dtype size used in the byte accounting.

    Returns:
        An in-memory :class:`Bundle` (use :func:`hydraopt.save_bundle` to write it).
    """
    engine = engine or EngineOptions()
    K = len(aset.tasks)
    config = resolve_config(method, options or {}, K, aset.kind)
    progress = as_callback(progress, len(aset.modules), f"merge {method}", "module")
    start = time.perf_counter()
    merged: dict[str, Any] = {}
    errors: dict[str, list[float]] = {}
    zero_errors: dict[str, list[float]] = {}
    # Methods that plan per module (a rank per module for a budget) do it before any merge.
    configs = plan_module_configs(aset, method, config, engine)
    if engine.engine == "ray":
        from hydraopt.engine_ray import iter_merged_ray

        results = iter_merged_ray(aset, method, config, engine, configs)
    else:
        results = iter_merged(aset, method, config, engine, configs)
    keep = DTYPES[engine.result_dtype] if engine.result_dtype else None
    for done, result in results:
        for name, module in result.items():
            merged[name] = module.merged.cast(keep) if keep is not None else module.merged
            errors[name] = module.errors
            zero_errors[name] = module.zero_errors
        if progress is not None:
            progress(done)
    seconds = time.perf_counter() - start
    provenance = Provenance(
        library_version=__version__,
        seed=engine.seed,
        device=engine.device,
        merge_seconds=seconds,
        error_distance=engine.error_distance,
        errors={m.name: errors[m.name] for m in aset.modules},
        zero_errors={m.name: zero_errors[m.name] for m in aset.modules},
        sources={info.task: str(info.path) for info in aset.adapters},
    )
    # Only the fields that applied (resolved), so the bundle says what ran.
    kind = get_kind(aset.kind)
    recorded = kind.applied_config(get_method(method), config, K, str(engine.device))
    return kind.build_bundle(aset, method, recorded, merged, provenance, bytes_per_param)
