"""Core value types shared by io/, merge/ and the engine.

Tensors are batched over a leading group axis G (same-shaped modules merged together), then the
task axis K. Scales are kept separate from the factors so that each method can decide how to use
them (HydraOpt folds them into B; PEFT's classic merges split sqrt(w * s) over A and B).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, NamedTuple, Protocol

import torch

from hydraopt.quantize import QuantizedTensor
from hydraopt.results import (
    LoraRecord,
    MergedModule,
    MergedVeraModule,
    Provenance,
    StorageReport,
)


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
class LoraStack:
    """K adapters' factors for G same-shaped modules.

    Attributes:
        A: (G, K, r, k) float32.
        B: (G, K, d, r) float32, *without* the LoRA scale.
        scale: (G, K) float32, ΔW_gi = scale_gi * B_gi @ A_gi.
    """

    A: torch.Tensor
    B: torch.Tensor
    scale: torch.Tensor

    @property
    def scaled_B(self) -> torch.Tensor:
        """B with the scale folded in, (G, K, d, r)."""
        return self.B * self.scale[:, :, None, None]

    def delta(self) -> torch.Tensor:
        """Dense updates ΔW, (G, K, d, k). Only for small shapes, tests and refinement."""
        return self.scaled_B @ self.A

    def to(self, device: torch.device | str) -> LoraStack:
        return LoraStack(self.A.to(device), self.B.to(device), self.scale.to(device))


@dataclass(frozen=True)
class MergedStack:
    """The result of a merge for G same-shaped modules.

    Every method returns this shape: one shared A', M heads (scale folded in) and a routing table
    that names the head each task uses in each module. Classic merges have M = 1 and route every
    task to head 0; "A-only" merges have M = K and the identity routing.

    Attributes:
        A: (G, r, k) shared A'.
        heads: (G, M, d, r) the B' heads, LoRA scale folded in (ΔW'_gi = heads[g, routing[g, i]] @ A[g]).
        routing: (G, K) int64 head index per module and task.
        measured: errors the method already measured on the way (its final evaluation), so the
            engine need not form the K updates again to report them; None if it measured none.
    """

    A: torch.Tensor
    heads: torch.Tensor
    routing: torch.Tensor
    measured: Measured | None = None

    # The per-module record a bundle keeps (built from one module's slice of ``stored()``).
    record_type: ClassVar[type[LoraRecord]] = MergedModule

    def stored(self) -> tuple[torch.Tensor, ...]:
        """The bundle tensors, G-batched, routing last: (A', heads, routing)."""
        return (self.A, self.heads, self.routing)

    def delta(self) -> torch.Tensor:
        """Dense routed updates, (G, K, d, k)."""
        g_idx = torch.arange(self.heads.shape[0], device=self.heads.device)[:, None]
        routed = self.heads[g_idx, self.routing]  # (G, K, d, r)
        return routed @ self.A[:, None]


class MergeOutput(Protocol):
    """What a merge method returns for G modules, as the engine reads it: the LoRA form (A',
    heads, routing) for errors and serving, ``stored()`` and ``record_type`` for the bundle.

    :class:`MergedStack` for most methods; ``shared_basis`` returns its U, V and cores.
    """

    record_type: ClassVar[type[LoraRecord]]

    @property
    def A(self) -> torch.Tensor: ...  # (G, r, k)

    @property
    def heads(self) -> torch.Tensor: ...  # (G, M, d, r)

    @property
    def routing(self) -> torch.Tensor: ...  # (G, K)

    @property
    def measured(self) -> Measured | None: ...

    def stored(self) -> tuple[torch.Tensor, ...]: ...


@dataclass(frozen=True)
class Measured:
    """Per-task errors of a merge result, measured by the method with one distance.

    Attributes:
        distance: registry name of f.
        error: (G, K) f(ΔW_i, ΔW'_i), the hard-routed error of the returned result.
        zero: (G, K) f(ΔW_i, 0), the error of storing nothing.
    """

    distance: str
    error: torch.Tensor
    zero: torch.Tensor


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


@dataclass(frozen=True)
class VeraStack:
    """K VeRA adapters' trained vectors for G same-shaped modules, with the frozen projections.

    VeRA (Kopiczko et al., ICLR 2024) updates a module by ΔW = diag(λb) B diag(λd) A, where A and B
    are random projections shared by every module and task (PEFT stores one ``vera_A`` (r, max_in)
    and ``vera_B`` (max_out, r); a module uses the slices A[:, :k] and B[:d, :]) and only the
    vectors λb (d) and λd (r) are trained per module. There is no scale factor.

    Attributes:
        lambda_b: (G, K, d) float32.
        lambda_d: (G, K, r) float32.
        A: (r, k) the module's slice of ``vera_A`` (the same for every module of the group).
        B: (d, r) the module's slice of ``vera_B``.
    """

    lambda_b: torch.Tensor
    lambda_d: torch.Tensor
    A: torch.Tensor
    B: torch.Tensor

    def delta(self) -> torch.Tensor:
        """Dense updates ΔW, (G, K, d, k). Only for small shapes, tests and refinement."""
        left = self.lambda_b[..., :, None] * self.B  # (G, K, d, r)
        right = self.lambda_d[..., :, None] * self.A  # (G, K, r, k)
        return left @ right

    def to(self, device: torch.device | str) -> VeraStack:
        return VeraStack(
            self.lambda_b.to(device), self.lambda_d.to(device), self.A.to(device), self.B.to(device)
        )


@dataclass(frozen=True)
class MergedVeraStack:
    """The result of a VeRA merge for G same-shaped modules.

    One of the two vectors has a single row per module (shared by every task); the other has M
    rows and ``routing`` names the row each task uses. With M = 1 both have one row.

    Attributes:
        lambda_b: (G, Mb, d).
        lambda_d: (G, Md, r); Mb == 1 or Md == 1.
        routing: (G, K) int64 index into the side with M rows (all zeros when M = 1).
    """

    lambda_b: torch.Tensor
    lambda_d: torch.Tensor
    routing: torch.Tensor

    def routed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each task's (λb (G, K, d), λd (G, K, r))."""
        g_idx = torch.arange(self.routing.shape[0], device=self.routing.device)[:, None]
        zeros = torch.zeros_like(self.routing)
        b_idx = self.routing if self.lambda_b.shape[1] > 1 else zeros
        d_idx = self.routing if self.lambda_d.shape[1] > 1 else zeros
        return self.lambda_b[g_idx, b_idx], self.lambda_d[g_idx, d_idx]

    def as_lora(self, A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The same updates as (A' (G, r, k), heads (G, M, d, r)) with ΔW'_i = heads[route(i)] @ A'.

        Lets LoRA-space tools (hard-routed errors) measure a VeRA merge without a second copy.
        """
        if self.lambda_d.shape[1] == 1:  # λd shared: it folds into A', λb rows make the heads
            a = self.lambda_d[:, 0, :, None] * A  # (G, r, k)
            return a, self.lambda_b[..., :, None] * B  # (G, Mb, d, r)
        a = A.expand(self.lambda_b.shape[0], *A.shape)  # (G, r, k)
        heads = self.lambda_b[:, :, :, None] * B * self.lambda_d[:, :, None, :]  # (G, Md, d, r)
        return a, heads

    def to(self, device: torch.device | str) -> MergedVeraStack:
        return MergedVeraStack(
            self.lambda_b.to(device), self.lambda_d.to(device), self.routing.to(device)
        )


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


class LoraView(NamedTuple):
    """One module of a bundle in LoRA form, whatever the bundle's kind (see ``lora_view``).

    A named tuple: ``a, heads, routing = bundle.lora_view()[name]`` works as well as the names.

    Attributes:
        A: (r, k) float32 shared A'.
        heads: (M, d, r) float32, any scale folded in.
        routing: (K,) int64 head index per task.
    """

    A: torch.Tensor
    heads: torch.Tensor
    routing: torch.Tensor
