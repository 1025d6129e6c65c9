"""The one interface every adapter kind implements (PEFT's one-package-per-tuner, for merging).

A kind (LoRA, VeRA) knows its PEFT config and key layout, how to read K adapter dirs into a lazy
adapter set, which config a merge method takes for it and which of the method's entry points to
call, what its bundle tensors and PEFT export look like, how its storage is counted and how a
bundle's task is applied to a model in memory. Everything outside :mod:`hydraopt.kinds` talks to
the kind through :func:`hydraopt.kinds.registry.get_kind`, never by ``isinstance``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from hydraopt.merge.base import MergeContext, MergeMethod
from hydraopt.merge.targets import Targets
from hydraopt.results import LoraRecord, MergedVeraModule, Provenance
from hydraopt.types import Measured, ModuleSpec


@dataclass(frozen=True)
class GroupMerge:
    """What the engine gets back from merging one chunk of G same-shaped modules.

    Attributes:
        stored: the kind's bundle tensors, G-batched, routing last: LoRA (A' (G, r, k),
            heads (G, M, d, r), routing (G, K)), or the shared basis's (U (G, d, R), V (G, k, R),
            cores, routing); VeRA (λb rows (G, Mb, d), λd rows (G, Md, r), routing (G, K)).
        targets: the K original updates, dense (G, K, d, k) or factored, for error measurement.
        lora_a: (G, r, k) the merge in LoRA form (every kind reduces to it): ΔW'_i =
            lora_heads[routing[i]] @ lora_a.
        lora_heads: (G, M, d, r).
        record_type: the kind's per-module record, built from one module's slice of ``stored``.
        measured: errors the method measured itself, or None.
    """

    stored: tuple[torch.Tensor, ...]
    targets: Targets
    lora_a: torch.Tensor
    lora_heads: torch.Tensor
    record_type: Callable[..., LoraRecord | MergedVeraModule]  # record_type(*slices, routing)
    measured: Measured | None = None

    @property
    def routing(self) -> torch.Tensor:
        """(G, K) head index per module and task."""
        return self.stored[-1]


@dataclass(frozen=True)
class FinetuneRecipe:
    """What fine-tuning (:mod:`hydraopt.eval.finetune`) needs from a kind: how to start an
    adapter and which of its weights to save; the data, loss, optimiser and saving are shared.

    Attributes:
        init: ``(model, FinetuneConfig) -> PeftModel``: wraps the base model in a fresh
            trainable adapter.
        fingerprint_key: ``training.json`` key of ``fingerprint``'s digest.
        fingerprint: ``PeftModel -> str``: digest of what every task must share (LoRA's
            initial A, VeRA's projections).
        saves: whether a ``state_dict`` key is one of the adapter's saved tensors.
    """

    init: Callable[[Any, Any], Any]
    fingerprint_key: str
    fingerprint: Callable[[Any], str]
    saves: Callable[[str], bool]


class AdapterKind(Protocol):
    """One adapter kind. ``name`` is the adapter set's ``kind`` and a bundle's ``adapter_kind``."""

    name: str
    display_name: str  # as users write it: "LoRA", "VeRA"
    peft_type: str  # adapter_config.json's peft_type
    frozen_tensors: tuple[str, ...]  # bundle tensors kept as they are: never quantized, not counted
    # Name suffixes (``<module>.<suffix>``) of tensors stacked over tasks whose per-task block
    # need not fill whole quantization groups: quantized with groups restarting per task, so
    # that no task's values share a scale with another's (see hydraopt.quantize).
    task_stacked: tuple[str, ...]
    # Whether the K separate adapters are factor pairs (A, B) that are stored, quantized and
    # counted in bytes as such: the yardstick of byte budgets and of the separate-quantized
    # baselines. VeRA's trainable part is its λ vectors, another yardstick.
    separate_factors: bool

    def load_adapter_set(
        self,
        dirs: Sequence[Path],
        tasks: Sequence[str],
        *,
        allow_pickle: bool,
        check_values: bool,
        base_model: str | Path | None,
    ) -> Any:
        """K validated adapter dirs of this kind as a lazy adapter set."""
        ...

    def config_class(self, method: MergeMethod) -> type:
        """The config class ``method`` takes for this kind (refuses a method that has none)."""
        ...

    def applied_config(
        self, method: MergeMethod, config: Any, num_tasks: int, device: str
    ) -> dict[str, Any]:
        """The fields of ``config`` (this kind's config for ``method``) that applied to a merge
        of K = ``num_tasks`` adapters, resolved: what the bundle records as its ``config``."""
        ...

    def merge_group(
        self,
        method: MergeMethod,
        aset: Any,
        chunk: Sequence[ModuleSpec],
        config: Any,
        *,
        generator: torch.Generator,
        context: MergeContext,
        device: str,
    ) -> GroupMerge:
        """Read ``chunk``'s tensors and run the method's entry point for this kind."""
        ...

    def build_bundle(
        self,
        aset: Any,
        method: str,
        config: dict[str, Any],
        merged: dict[str, Any],
        provenance: Provenance,
        bytes_per_param: int,
    ) -> Any:
        """The in-memory bundle of a finished merge (with its storage accounting)."""
        ...

    def save_bundle(self, bundle: Any, out: str | Path, *, dtype: str, force: bool) -> Path:
        """Write the bundle dir atomically."""
        ...

    def load_bundle(self, path: Path, meta: dict[str, Any]) -> Any:
        """Read the bundle dir whose checked ``bundle.json`` is ``meta``."""
        ...

    def check_bundle_tensors(
        self,
        meta: dict[str, Any],
        tensors: Mapping[str, torch.Tensor],
        tasks: list[str],
        modules: list[dict[str, Any]],
        where: Any,
    ) -> None:
        """Refuse a bundle read from disk whose tensors or kind-specific fields are not what
        :meth:`save_bundle` writes (run by :func:`hydraopt.io.check_bundle.check_bundle` after
        the kind-independent checks, on every read); one :class:`HydraoptError` per problem."""
        ...

    def bundle_tensors(self, bundle: Any, dtype: str) -> dict[str, torch.Tensor]:
        """The bundle's tensors by name, as a 16-bit (or float32) bundle stores them."""
        ...

    def with_tensors(
        self, bundle: Any, tensors: dict[str, torch.Tensor], quantized: dict[str, Any]
    ) -> Any:
        """``bundle`` with its stored tensors replaced by ``tensors`` and ``quantized`` attached
        (how a quantized bundle holds its dequantized factors)."""
        ...

    def export_adapters(
        self,
        bundle: Any,
        out: str | Path,
        *,
        tasks: list[str] | None,
        force: bool,
        dtype: str | None,
    ) -> dict[str, Path]:
        """One PEFT adapter dir of this kind per task."""
        ...

    def task_weights(self, bundle: Any, task: str) -> Any:
        """What :func:`hydraopt.eval.generate.applied_adapter` applies for ``task`` in memory."""
        ...

    def finetune_recipe(self) -> FinetuneRecipe:
        """How :func:`hydraopt.eval.finetune.finetune` starts, fingerprints and saves this kind."""
        ...

    def show_storage(self, aset: Any) -> list[dict[str, Any]]:
        """``hydraopt inspect`` of adapters: print what a merge would store for M = 1..K."""
        ...

    def show_similarity(
        self, aset: Any, module_filter: str | None, plot: Path | None
    ) -> dict[str, Any]:
        """``hydraopt inspect`` of adapters: print how alike the tasks' trained factors are."""
        ...
