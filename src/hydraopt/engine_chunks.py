"""The local engine's unit of work: plan same-shaped module chunks and merge one of them.

Modules are grouped by shape and merged in chunks whose dense size stays under a memory budget, so
memory is bounded by a few modules at a time whatever K and the model size. Each chunk gets its own
generator seeded from (seed, first module name), so results do not depend on which process or in
what order chunks run. Both engines (this process, :mod:`hydraopt.engine_ray`) run these
functions; the adapter set's kind reads the chunk and picks the method's entry point.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import torch

from hydraopt.devices import check_device
from hydraopt.errors import HydraoptError
from hydraopt.io.dtypes import DTYPES
from hydraopt.kinds.base import GroupMerge
from hydraopt.kinds.registry import get_kind
from hydraopt.merge.base import MergeContext, ModulePlanner
from hydraopt.merge.measure import distance_to_zero, hard_routed_error
from hydraopt.merge.registry import get_method
from hydraopt.results import LoraRecord, MergedVeraModule
from hydraopt.types import ModuleSpec

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
    modules: Sequence[ModuleSpec],
    num_tasks: int,
    chunk_elements: int,
    configs: Mapping[str, Any] | None = None,
) -> list[list[ModuleSpec]]:
    """Same-shaped modules, in order, cut so that G * K * d * k <= chunk_elements (G >= 1).

    Args:
        configs: module name -> its own config (a method's plan, e.g. a rank per module):
            a chunk then also holds modules of one config only.
    """
    groups: dict[tuple[Any, ...], list[ModuleSpec]] = {}
    for m in modules:
        key = m.shape_key if configs is None else (*m.shape_key, configs[m.name])
        groups.setdefault(key, []).append(m)
    chunks: list[list[ModuleSpec]] = []
    for mods in groups.values():
        per = max(1, chunk_elements // (num_tasks * mods[0].d * mods[0].k))
        chunks.extend(mods[i : i + per] for i in range(0, len(mods), per))
    return chunks


def chunk_generator(seed: int, first_module: str, device: str) -> torch.Generator:
    """A generator that depends only on the seed and the chunk's first module."""
    derived = (seed * 1_000_003 + zlib.crc32(first_module.encode())) % (2**63)
    return torch.Generator(device=device).manual_seed(derived)


@dataclass(frozen=True)
class ModuleResult:
    """One merged module as a chunk returns it.

    Attributes:
        merged: the kind's record (:class:`~hydraopt.results.MergedModule`,
            :class:`~hydraopt.results.MergedBasisModule` or
            :class:`~hydraopt.results.MergedVeraModule`), float32 on the CPU.
        errors: per task, the hard-routed error f(ΔW_i, ΔW'_i).
        zero_errors: per task, f(ΔW_i, 0).
    """

    merged: LoraRecord | MergedVeraModule
    errors: list[float]
    zero_errors: list[float]


ChunkResult = dict[str, ModuleResult]


def merge_chunk(
    aset: Any,
    chunk: Sequence[ModuleSpec],
    method_name: str,
    config: Any,
    options: EngineOptions,
) -> ChunkResult:
    """Merge one chunk; returns module -> its :class:`ModuleResult` (record and errors)."""
    method = get_method(method_name)
    context = MergeContext(num_tasks=len(aset.tasks), num_factor_tensors=2 * len(aset.modules))
    gen = chunk_generator(options.seed, chunk[0].name, options.device)
    group = get_kind(aset.kind).merge_group(
        method, aset, chunk, config, generator=gen, context=context, device=options.device
    )
    measured = group.measured
    if measured is not None and measured.distance == options.error_distance:
        return _chunk_result(chunk, group, measured.error, measured.zero)
    with torch.no_grad():
        err = hard_routed_error(
            group.targets, group.lora_a, group.lora_heads, group.routing, options.error_distance
        )
        # f(ΔW, 0): the error of storing nothing, the yardstick for "relative error".
        zero = distance_to_zero(group.targets, options.error_distance)
    return _chunk_result(chunk, group, err, zero)


def _chunk_result(
    chunk: Sequence[ModuleSpec], group: GroupMerge, err: torch.Tensor, zero: torch.Tensor
) -> ChunkResult:
    """Per module: the kind's record (G-batched tensors split here, on the CPU), errors as floats."""
    *factors, routing = group.stored
    return {
        spec.name: ModuleResult(
            group.record_type(
                *(t[g].detach().float().cpu().contiguous() for t in factors),
                routing[g].cpu().contiguous(),
            ),
            [float(e) for e in err[g].cpu()],
            [float(z) for z in zero[g].cpu()],
        )
        for g, spec in enumerate(chunk)
    }


def iter_merged(
    aset: Any,
    method_name: str,
    config: Any,
    options: EngineOptions,
    configs: Mapping[str, Any] | None = None,
) -> Iterator[tuple[int, ChunkResult]]:
    """Yield (modules done in this chunk, chunk result) chunk by chunk (local engine).

    Args:
        configs: module name -> its config, where the method planned one per module
            (:func:`plan_module_configs`); ``config`` for every module otherwise.
    """
    chunks = plan_chunks(aset.modules, len(aset.tasks), options.chunk_elements, configs)
    # The next chunk is read in a thread while this one merges: reading is single-threaded file
    # work (at K = 1,000 at 1B shape 13 GB that the page cache cannot keep, a tenth of a merge),
    # and the merge's own threads leave a core idle a third of the time (measured 1.4 CPU s per
    # second on 2 cores). One chunk ahead: memory grows by one chunk's factors.
    with ThreadPoolExecutor(max_workers=1) as pool:
        ahead = _ReadAhead(aset, pool)
        for i, chunk in enumerate(chunks):
            if i + 1 < len(chunks):
                ahead.request(chunks[i + 1])
            own = config if configs is None else configs[chunk[0].name]
            yield len(chunk), merge_chunk(ahead, chunk, method_name, own, options)


class _ReadAhead:
    """An adapter set whose ``load_stack`` hands over the chunk read ahead in a thread (the set
    itself otherwise: every other attribute is the set's)."""

    def __init__(self, aset: Any, pool: ThreadPoolExecutor):
        self._aset, self._pool = aset, pool
        self._pending: dict[tuple[str, ...], Future[Any]] = {}

    def request(self, chunk: Sequence[ModuleSpec]) -> None:
        key = tuple(spec.name for spec in chunk)
        self._pending[key] = self._pool.submit(self._aset.load_stack, list(chunk))

    def load_stack(self, chunk: Sequence[ModuleSpec]) -> Any:
        pending = self._pending.pop(tuple(spec.name for spec in chunk), None)
        return pending.result() if pending is not None else self._aset.load_stack(chunk)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._aset, name)


def plan_module_configs(
    aset: Any, method_name: str, config: Any, options: EngineOptions
) -> dict[str, Any] | None:
    """One config per module where the method plans them (``plan_modules``), else None.

    A :class:`~hydraopt.merge.base.ModulePlanner` sees every module's shape before any merge, and, where
    ``needs_survey(config)`` (e.g. a storage budget spent across modules), every module's
    ``survey`` (e.g. its error at each rank), computed here chunk by chunk: the first of two
    passes over the adapters, always in this process.
    """
    method = get_method(method_name)
    if not isinstance(method, ModulePlanner):
        return None
    surveys: dict[str, torch.Tensor] | None = None
    if method.needs_survey(config):
        surveys = {}
        for chunk in plan_chunks(aset.modules, len(aset.tasks), options.chunk_elements):
            stack = aset.load_stack(chunk).to(options.device)
            with torch.no_grad():
                out = method.survey(stack, config)  # (G, ...)
            surveys.update({spec.name: out[g].cpu() for g, spec in enumerate(chunk)})
    return method.plan_modules(config, aset.modules, len(aset.tasks), surveys)
