"""Run a registered merge method over every module of an :class:`AdapterSet`.

Modules are grouped by shape and merged in chunks whose dense size stays under a memory budget, so
memory is bounded by a few modules at a time whatever K and the model size. Each chunk gets its own
generator seeded from (seed, first module name), so results do not depend on which process or in
what order chunks run.

The same path merges VeRA adapter sets: the set's kind picks the method's entry point
(``merge`` or ``merge_vera``) and the bundle type; the method is always looked up by name in the
one registry.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, overload

import torch

from hydraopt.devices import check_device
from hydraopt.errors import HydraoptError
from hydraopt.io.bundle import DTYPES
from hydraopt.io.peft import AdapterSet
from hydraopt.merge.base import MergeContext, build_config, config_class_for, config_to_dict
from hydraopt.merge.refine import FactorTargets, Targets, distance_to_zero, hard_routed_error
from hydraopt.merge.registry import get_method
from hydraopt.progress import ProgressArg, as_callback
from hydraopt.storage import storage_report, vera_storage_report
from hydraopt.types import Bundle, ModuleSpec, VeraBundle
from hydraopt.vera.load import VeraAdapterSet
from hydraopt.version import __version__

DEFAULT_CHUNK_ELEMENTS = 2**22  # dense (G, K, d, k) floats per chunk: 16 MiB in float32; larger
# chunks were measured slower on CPU (allocator churn and cache misses in the refinement loop)


@dataclass(frozen=True)
class EngineOptions:
    """How to run a merge (not what to compute: that is the method's config).

    Attributes:
        seed: root of every generator.
        device: ``cpu`` or ``cuda``.
        chunk_elements: memory budget of one chunk, counted as G * K * d * k.
        error_distance: distance used for the hard-routed error stored in the bundle.
        engine: ``local`` (this process) or ``ray`` (module groups as Ray tasks).
        address: Ray cluster address (``None``: start a local Ray instance).
        ray_cpus: CPUs of a local Ray instance.
        ray_threads: torch threads inside each Ray task.
        result_dtype: dtype the merged factors are kept in as chunks finish (``float16``,
            ``bfloat16``, ``float32``; ``None``: as computed, float32). The CLI keeps them in
            the bundle's storage dtype: at M = K the result grows with K and, held in float32,
            would be the largest thing in memory (twice what gets written).
    """

    seed: int = 0
    device: str = "cpu"
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS
    error_distance: str = "mae"
    engine: Literal["local", "ray"] = "local"
    address: str | None = None
    ray_cpus: int | None = None
    ray_threads: int = 1
    result_dtype: str | None = None

    def __post_init__(self) -> None:
        check_device(self.device)
        if self.result_dtype is not None and self.result_dtype not in DTYPES:
            raise HydraoptError(
                f"result_dtype must be one of {sorted(DTYPES)} or None, got {self.result_dtype!r}"
            )


def plan_chunks(
    modules: Sequence[ModuleSpec], num_tasks: int, chunk_elements: int
) -> list[list[ModuleSpec]]:
    """Same-shaped modules, in order, cut so that G * K * d * k <= chunk_elements (G >= 1)."""
    groups: dict[tuple[int, int, int], list[ModuleSpec]] = {}
    for m in modules:
        groups.setdefault(m.shape_key, []).append(m)
    chunks: list[list[ModuleSpec]] = []
    for mods in groups.values():
        per = max(1, chunk_elements // (num_tasks * mods[0].d * mods[0].k))
        chunks.extend(mods[i : i + per] for i in range(0, len(mods), per))
    return chunks


def chunk_generator(seed: int, first_module: str, device: str) -> torch.Generator:
    """A generator that depends only on the seed and the chunk's first module."""
    derived = (seed * 1_000_003 + zlib.crc32(first_module.encode())) % (2**63)
    return torch.Generator(device=device).manual_seed(derived)


ChunkResult = dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[float], list[float]]]


def merge_chunk(
    aset: AdapterSet | VeraAdapterSet,
    chunk: Sequence[ModuleSpec],
    method_name: str,
    config: Any,
    options: EngineOptions,
) -> ChunkResult:
    """Merge one chunk; returns module -> (A', heads, routing, error per task, zero error per task).

    For a VeRA set the first two are the λb rows (Mb, d) and the λd rows (Md, r).
    """
    method = get_method(method_name)
    context = MergeContext(num_tasks=len(aset.tasks), num_factor_tensors=2 * len(aset.modules))
    gen = chunk_generator(options.seed, chunk[0].name, options.device)
    if isinstance(aset, VeraAdapterSet):
        vera = aset.load_stack(chunk).to(options.device)
        merged = method.merge_vera(vera, config, generator=gen, context=context)
        stored = (merged.lambda_b, merged.lambda_d, merged.routing)
        with torch.no_grad():
            delta: Targets = vera.delta()
            # Errors in LoRA form (ΔW'_i = heads[route] @ A'), the same measure as for LoRA bundles.
            a, heads = merged.as_lora(vera.A, vera.B)
    else:
        stack = aset.load_stack(chunk).to(options.device)
        out = method.merge(stack, config, generator=gen, context=context)
        stored = (out.A, out.heads, out.routing)
        if out.measured is not None and out.measured.distance == options.error_distance:
            return _chunk_result(chunk, stored, out.measured.error, out.measured.zero)
        # The updates stay factored: errors are formed a few tasks at a time (memory flat in K).
        delta, a, heads = FactorTargets(stack.A, stack.scaled_B), out.A, out.heads
    with torch.no_grad():
        err = hard_routed_error(delta, a, heads, stored[2], options.error_distance)
        # f(ΔW, 0): the error of storing nothing, the yardstick for "relative error".
        zero = distance_to_zero(delta, options.error_distance)
    return _chunk_result(chunk, stored, err, zero)


def _chunk_result(
    chunk: Sequence[ModuleSpec],
    stored: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    err: torch.Tensor,
    zero: torch.Tensor,
) -> ChunkResult:
    """Per module: the stored tensors (G-batched, split here) on the CPU and the errors as floats."""
    first, second, routing = stored
    return {
        spec.name: (
            first[g].detach().float().cpu().contiguous(),
            second[g].detach().float().cpu().contiguous(),
            routing[g].cpu().contiguous(),
            [float(e) for e in err[g].cpu()],
            [float(z) for z in zero[g].cpu()],
        )
        for g, spec in enumerate(chunk)
    }


def iter_merged(
    aset: AdapterSet | VeraAdapterSet, method_name: str, config: Any, options: EngineOptions
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (modules done in this chunk, chunk result) chunk by chunk (local engine)."""
    for chunk in plan_chunks(aset.modules, len(aset.tasks), options.chunk_elements):
        yield len(chunk), merge_chunk(aset, chunk, method_name, config, options)


def check_heads(method: str, config: Any, heads: int, num_tasks: int) -> None:
    """Refuse an impossible M before any work (the methods check again for direct callers)."""
    asked = getattr(config, "heads", None)
    if asked is not None and asked > num_tasks:
        raise HydraoptError(f"--heads {asked} exceeds the number of adapters K = {num_tasks}")
    if asked is not None and asked != heads:
        raise HydraoptError(f"{method} stores {heads} head(s); got --heads {asked}")


def resolve_config(
    method: str, options: dict[str, Any] | Any, num_tasks: int, kind: str = "lora"
) -> Any:
    """The method's typed config from options (or a config as is), checked against K.

    Args:
        kind: the adapters' kind (``lora`` or ``vera``, an adapter set's ``kind``); picks the
            method's config class for it.
    """
    method_obj = get_method(method)
    config_class = config_class_for(method_obj, kind)
    if isinstance(options, dict):
        config = build_config(config_class, options)
    elif isinstance(options, config_class):
        config = options
    else:
        raise TypeError(f"options must be a dict or a {config_class.__name__}")
    check_heads(method, config, method_obj.num_heads(config, num_tasks), num_tasks)
    return config


@overload
def merge_adapter_set(
    aset: AdapterSet,
    method: str = ...,
    options: dict[str, Any] | Any = ...,
    *,
    engine: EngineOptions | None = ...,
    progress: ProgressArg = ...,
    bytes_per_param: int = ...,
) -> Bundle: ...


@overload
def merge_adapter_set(
    aset: VeraAdapterSet,
    method: str = ...,
    options: dict[str, Any] | Any = ...,
    *,
    engine: EngineOptions | None = ...,
    progress: ProgressArg = ...,
    bytes_per_param: int = ...,
) -> VeraBundle: ...


def merge_adapter_set(
    aset: AdapterSet | VeraAdapterSet,
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
    merged: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    errors: dict[str, list[float]] = {}
    zero_errors: dict[str, list[float]] = {}
    if engine.engine == "ray":
        from hydraopt.engine_ray import iter_merged_ray

        results = iter_merged_ray(aset, method, config, engine)
    else:
        results = iter_merged(aset, method, config, engine)
    keep = DTYPES[engine.result_dtype] if engine.result_dtype else None
    for done, result in results:
        for name, (a, heads, routing, err, zero) in result.items():
            if keep is not None:
                a, heads = a.to(keep), heads.to(keep)
            merged[name] = (a, heads, routing)
            errors[name] = err
            zero_errors[name] = zero
        if progress is not None:
            progress(done)
    seconds = time.perf_counter() - start
    extra = {
        "library_version": __version__,
        "seed": engine.seed,
        "device": engine.device,
        "merge_seconds": seconds,
        "error_distance": engine.error_distance,
        "errors": {m.name: errors[m.name] for m in aset.modules},
        "zero_errors": {m.name: zero_errors[m.name] for m in aset.modules},
        "sources": {info.task: str(info.path) for info in aset.adapters},
    }
    if isinstance(aset, VeraAdapterSet):
        return _vera_bundle(aset, method, config, merged, extra, bytes_per_param)
    heads = {name: int(h.shape[0]) for name, (_, h, _) in merged.items()}
    return Bundle(
        method=method,
        config=config_to_dict(config),
        tasks=aset.tasks,
        base_model=aset.base_model,
        modules=aset.modules,
        merged={m.name: merged[m.name] for m in aset.modules},
        adapter_configs={info.task: info.config for info in aset.adapters},
        scales=aset.scales,
        storage=storage_report(aset.modules, K, heads, bytes_per_param),
        extra=extra,
    )


def _vera_bundle(
    aset: VeraAdapterSet,
    method: str,
    config: Any,
    merged: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    extra: dict[str, Any],
    bytes_per_param: int,
) -> VeraBundle:
    vera_a, vera_b = aset.projections
    rows_b = {name: int(b.shape[0]) for name, (b, _, _) in merged.items()}
    rows_d = {name: int(d.shape[0]) for name, (_, d, _) in merged.items()}
    storage = vera_storage_report(
        aset.modules,
        len(aset.tasks),
        rows_b,
        rows_d,
        vera_a.numel() + vera_b.numel(),
        bytes_per_param,
    )
    return VeraBundle(
        method=method,
        config=config_to_dict(config),
        tasks=aset.tasks,
        base_model=aset.base_model,
        modules=aset.modules,
        merged={m.name: merged[m.name] for m in aset.modules},
        projections=aset.projections,
        adapter_configs={info.task: info.config for info in aset.adapters},
        storage=storage,
        extra={**extra, "in_features_source": aset.in_features_source},
    )
