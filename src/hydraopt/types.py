"""Core value types shared by io/, merge/ and the engine: the adapted modules, the adapters'
provenance and the merged bundles in memory (LoRA's and VeRA's, with the LoRA view every reader
uses).

The batched tensors a merge reads and returns (``LoraStack``, ``MergedStack``, ...) live in
:mod:`hydraopt.stacks` and are importable from here too; the per-module records, provenance and
storage report in :mod:`hydraopt.results`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from hydraopt.quantize import QuantizedTensor
from hydraopt.results import (
    FactoredView,
    LoraRecord,
    LoraView,
    MergedVeraModule,
    Provenance,
    StorageReport,
)

# The merge's batched tensors live in hydraopt.stacks; importable from here as before.
from hydraopt.stacks import (
    LoraStack,
    Measured,
    MergedStack,
    MergedVeraStack,
    MergeOutput,
    VeraStack,
)

__all__ = [
    "AdapterInfo",
    "Bundle",
    "LoraStack",
    "LoraView",
    "Measured",
    "MergeOutput",
    "MergedStack",
    "MergedVeraStack",
    "ModuleSpec",
    "VeraBundle",
    "VeraStack",
]


@dataclass(frozen=True)
class ModuleSpec:
    """One adapted linear module, e.g. ``model.layers.7.self_attn.q_proj``.

    Attributes:
        name: module path inside the base model (PEFT's key without prefix and suffix).
        d: output features (rows of B and of ΔW).
        k: input features (columns of A and of ΔW).
        r: LoRA rank of this module (same for every adapter, validated on load).
    """

    name: str
    d: int
    k: int
    r: int

    @property
    def shape_key(self) -> tuple[int, int, int]:
        """Modules with equal keys can be stacked into one batch."""
        return (self.d, self.k, self.r)


@dataclass(frozen=True)
class AdapterInfo:
    """One input adapter as found on disk.

    Attributes:
        task: task name (the directory name unless given).
        path: adapter directory.
        config: the raw ``adapter_config.json`` (kept verbatim so export can reuse it).
        weights_file: the tensor file inside ``path``.
    """

    task: str
    path: Path
    config: dict[str, Any]
    weights_file: Path


@dataclass(frozen=True)
class Bundle:
    """A merged set of adapters: shared A' per module, heads, routing and provenance.

    Attributes:
        method: registry name of the merge method.
        config: the method's resolved config as a plain dict.
        tasks: task names, in routing order.
        base_model: ``base_model_name_or_path`` shared by every input adapter.
        modules: the adapted modules, in a stable order.
        merged: module name -> its :class:`MergedModule` (A' (r, k), heads (M, d, r), routing)
            or, for ``shared_basis``, :class:`MergedBasisModule` (U, V, cores; A' and heads as
            properties), one layout per bundle.
        adapter_configs: task -> original ``adapter_config.json`` (for export).
        scales: task -> module -> the original LoRA scale (export divides heads by it).
        storage: exact parameter accounting (:class:`StorageReport`).
        provenance: seed, library version, timings, measured errors (:class:`Provenance`).
        quantized: tensor name (as in ``tensors.safetensors``) -> its 8- or 4-bit codes and
            scales; empty for a 16-bit bundle. ``merged`` then holds the dequantized values.
    """

    method: str
    config: dict[str, Any]
    tasks: tuple[str, ...]
    base_model: str
    modules: tuple[ModuleSpec, ...]
    merged: dict[str, LoraRecord]
    adapter_configs: dict[str, dict[str, Any]]
    scales: dict[str, dict[str, float]]
    storage: StorageReport
    provenance: Provenance = field(default_factory=Provenance)
    quantized: dict[str, QuantizedTensor] = field(default_factory=dict)

    kind: ClassVar[str] = "lora"  # the adapter kind (hydraopt.kinds.registry.get_kind)

    @property
    def num_heads(self) -> int:
        """Largest number of heads over modules (every module has the same M for our methods)."""
        return max(m.num_heads for m in self.merged.values())

    @property
    def extra(self) -> dict[str, Any]:
        """The provenance as bundle.json's ``extra`` dict (plus ``dtype`` once loaded), for
        readers of the format; code reads :attr:`provenance`."""
        return {**self.provenance.to_dict(), "dtype": self.provenance.dtype}

    def routing_of(self, task: str) -> dict[str, int]:
        """The head index ``task`` uses in each module."""
        i = self.tasks.index(task)
        return {name: int(m.routing[i]) for name, m in self.merged.items()}

    def task_factors(self, task: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The routed (A', B') of one task per module, scale folded into B'."""
        i = self.tasks.index(task)
        return {name: (m.A, m.heads[int(m.routing[i])]) for name, m in self.merged.items()}

    def lora_view(self) -> dict[str, LoraView]:
        """Per module the merge in LoRA form: A' (r, k), heads (M, d, r) scale folded in, routing.

        A LoRA bundle already is that form (float32 as loaded). Every bundle kind has this
        method, so a reader that applies ΔW'_i = heads[routing[i]] @ A' serves any kind.
        """
        return {
            name: LoraView(m.A.float(), m.heads.float(), m.routing)
            for name, m in self.merged.items()
        }

    def factored_view(self) -> dict[str, FactoredView]:
        """As :meth:`lora_view`, with a record's shared left factor kept apart where it has one
        (``shared_basis``'s U), so that a reader holds it once, not folded into K heads."""
        return {name: m.factored_view() for name, m in self.merged.items()}


@dataclass(frozen=True)
class VeraBundle:
    """A merged set of VeRA adapters: per module the λb and λd rows, routing and provenance.

    Mirrors :class:`Bundle` (same metadata fields, ``merged`` values keep the routing third) so
    that reports read both; the projections travel with it so that export is self-contained.

    Attributes:
        method: registry name of the merge method.
        config: the method's resolved config as a plain dict.
        tasks: task names, in routing order.
        base_model: ``base_model_name_or_path`` shared by every input adapter.
        modules: the adapted modules (d = len λb, k = input features, r).
        merged: module name -> its :class:`MergedVeraModule` (λb rows, λd rows, routing).
        projections: (``vera_A`` (r, max_in), ``vera_B`` (max_out, r)), as PEFT stores them.
        adapter_configs: task -> original ``adapter_config.json`` (for export).
        storage: exact parameter accounting (:class:`StorageReport`, projections reported).
        provenance: seed, library version, timings, measured errors (:class:`Provenance`).
    """

    method: str
    config: dict[str, Any]
    tasks: tuple[str, ...]
    base_model: str
    modules: tuple[ModuleSpec, ...]
    merged: dict[str, MergedVeraModule]
    projections: tuple[torch.Tensor, torch.Tensor]
    adapter_configs: dict[str, dict[str, Any]]
    storage: StorageReport
    provenance: Provenance = field(default_factory=Provenance)
    quantized: dict[str, QuantizedTensor] = field(default_factory=dict)  # as in Bundle

    kind: ClassVar[str] = "vera"  # the adapter kind (hydraopt.kinds.registry.get_kind)

    @property
    def num_heads(self) -> int:
        """M: the most rows either vector has in any module."""
        return max(m.num_heads for m in self.merged.values())

    @property
    def extra(self) -> dict[str, Any]:
        """The provenance as bundle.json's ``extra`` dict (see :attr:`Bundle.extra`)."""
        return {**self.provenance.to_dict(), "dtype": self.provenance.dtype}

    def routing_of(self, task: str) -> dict[str, int]:
        """The row index ``task`` uses in each module (0 where M = 1)."""
        i = self.tasks.index(task)
        return {name: int(m.routing[i]) for name, m in self.merged.items()}

    def task_vectors(self, task: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The routed (λb (d,), λd (r,)) of one task per module."""
        i = self.tasks.index(task)
        out = {}
        for name, m in self.merged.items():
            route = int(m.routing[i])
            out[name] = (
                m.lambda_b[route if m.lambda_b.shape[0] > 1 else 0],
                m.lambda_d[route if m.lambda_d.shape[0] > 1 else 0],
            )
        return out

    def factored_view(self) -> dict[str, FactoredView]:
        """:meth:`lora_view` with no basis: a VeRA merge has no shared left factor to keep
        apart (its λb rows scale B per task)."""
        return {name: FactoredView(*view, None) for name, view in self.lora_view().items()}

    def lora_view(self) -> dict[str, LoraView]:
        """Per module the merge in LoRA form: A' (r, k), heads (M, d, r), routing (K,).

        Through :meth:`MergedVeraStack.as_lora` with the module's projection slices
        ``vera_A[:, :k]`` and ``vera_B[:d, :]`` (PEFT's slices), so ΔW'_i = heads[routing[i]] @ A'
        is the task's VeRA update diag(λb) B diag(λd) A.
        """
        vera_a, vera_b = self.projections
        out = {}
        for spec in self.modules:
            m = self.merged[spec.name]
            routing = m.routing
            merged = MergedVeraStack(
                m.lambda_b[None].float(), m.lambda_d[None].float(), routing[None]
            )
            a, heads = merged.as_lora(
                vera_a[:, : spec.k].float(), vera_b[: spec.d, :].float()
            )  # (1, r, k), (1, M, d, r)
            out[spec.name] = LoraView(a[0].contiguous(), heads[0].contiguous(), routing)
        return out
