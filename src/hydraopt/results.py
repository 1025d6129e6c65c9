"""Typed results of a merge: one record per merged module, the storage report, the provenance.

They replace anonymous tuples and free-form dicts: a merged LoRA module is ``MergedModule(A,
heads, routing)``, a VeRA one ``MergedVeraModule(lambda_b, lambda_d, routing)`` (not a tuple
whose first two entries mean different things per kind); storage and provenance are dataclasses
whose ``to_dict`` gives the bundle.json entries, key for key, in the format's order
(docs/bundle-format.md).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import torch

from hydraopt.errors import HydraoptError


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


class FactoredView(NamedTuple):
    """A module as :class:`LoraView` but with a shared left factor kept apart where the bundle
    stores one (see ``factored_view``): ΔW'_i = basis @ heads[routing[i]] @ A'.

    Attributes:
        A: (r, k) float32 shared A'.
        heads: (M, d, r) float32 without a basis; (M, R, r) heads in it with one.
        routing: (K,) int64 head index per task.
        basis: None, or (d, R) float32 shared left factor (``shared_basis``'s U), so that a reader
            holds it once instead of inside K products.
    """

    A: torch.Tensor
    heads: torch.Tensor
    routing: torch.Tensor
    basis: torch.Tensor | None


@dataclass(frozen=True)
class MergedModule:
    """One module of a LoRA bundle.

    Attributes:
        A: (r, k) shared A'.
        heads: (M, d, r) the B' heads, LoRA scale folded in.
        routing: (K,) int64 head index per task.
    """

    A: torch.Tensor
    heads: torch.Tensor
    routing: torch.Tensor

    layout: ClassVar[str] = "factors"  # bundle.json ``tensor_layout`` (absent = this one)

    @property
    def num_heads(self) -> int:
        return int(self.heads.shape[0])

    @property
    def num_params(self) -> int:
        """Stored parameters: r k + M d r."""
        return self.A.numel() + self.heads.numel()

    def cast(self, dtype: torch.dtype) -> MergedModule:
        """The factors in ``dtype`` (the routing stays int64)."""
        return MergedModule(self.A.to(dtype), self.heads.to(dtype), self.routing)

    def bundle_tensors(self) -> dict[str, torch.Tensor]:
        """The module's tensors in ``tensors.safetensors``, by key suffix (``<module>.A``)."""
        return {"A": self.A, "heads": self.heads}

    def module_meta(self) -> dict[str, Any]:
        """The module's entries in bundle.json ``modules`` after name, d, k, r."""
        return {"heads": self.num_heads}

    def peft_scale(self, original: float) -> float:
        """The LoRA scale an exported adapter of this module is written for (see export)."""
        return original

    def factored_view(self) -> FactoredView:
        """A' and heads as they are (float32); no shared left factor to keep apart."""
        return FactoredView(self.A.float(), self.heads.float(), self.routing, None)

    @staticmethod
    def tensor_shapes(module: dict[str, Any], num_tasks: int) -> dict[str, tuple[int, ...]]:
        """Key suffix -> shape that a checked bundle.json ``modules`` entry implies."""
        return {
            "A": (module["r"], module["k"]),
            "heads": (module["heads"], module["d"], module["r"]),
        }

    @classmethod
    def from_tensors(
        cls, tensors: dict[str, torch.Tensor], module: dict[str, Any], routing: torch.Tensor
    ) -> MergedModule:
        """The record from its (checked) tensors by suffix."""
        return cls(tensors["A"], tensors["heads"], routing)


@dataclass(frozen=True)
class MergedBasisModule:
    """One module of a shared-basis LoRA bundle: ΔW'_i = U S_i Vᵀ (:mod:`hydraopt.merge.shared_basis`).

    Every task has its own core, so in LoRA form (A' = Vᵀ, heads U S_i) M = K and the routing
    is the identity; readers that only know A' and heads (runtime, export) use those properties.

    Attributes:
        U: (d, R) shared left basis.
        V: (k, R) shared right basis.
        cores: (K, R, R) full cores or (K, R) diagonal ones, LoRA scale folded in.
        routing: (K,) int64, the identity.
    """

    U: torch.Tensor
    V: torch.Tensor
    cores: torch.Tensor
    routing: torch.Tensor

    layout: ClassVar[str] = "shared_basis"

    @property
    def rank(self) -> int:
        """R of this module."""
        return int(self.U.shape[1])

    @property
    def core(self) -> str:
        """``full`` or ``diagonal``."""
        return "diagonal" if self.cores.dim() == 2 else "full"

    @property
    def A(self) -> torch.Tensor:
        """Vᵀ (R, k): the shared A' of the LoRA form."""
        return self.V.transpose(0, 1)

    @property
    def heads(self) -> torch.Tensor:
        """U S_i (K, d, R): one head per task over A' = Vᵀ."""
        if self.cores.dim() == 2:
            return self.U[None] * self.cores[:, None, :]
        return self.U[None] @ self.cores

    @property
    def num_heads(self) -> int:
        return int(self.cores.shape[0])

    @property
    def num_params(self) -> int:
        """Stored parameters: d R + k R + K R² (full) or K R (diagonal)."""
        return self.U.numel() + self.V.numel() + self.cores.numel()

    def cast(self, dtype: torch.dtype) -> MergedBasisModule:
        """The factors in ``dtype`` (the routing stays int64)."""
        return MergedBasisModule(
            self.U.to(dtype), self.V.to(dtype), self.cores.to(dtype), self.routing
        )

    def bundle_tensors(self) -> dict[str, torch.Tensor]:
        return {"U": self.U, "V": self.V, "cores": self.cores}

    def module_meta(self) -> dict[str, Any]:
        return {"heads": self.num_heads, "rank": self.rank, "core": self.core}

    def peft_scale(self, original: float) -> float:
        """1: the export sets lora_alpha = R per module (rank_pattern/alpha_pattern), so PEFT's
        scale is exactly 1 and B = U S_i is written undivided."""
        return 1.0

    def factored_view(self) -> FactoredView:
        """A' = Vᵀ, U apart as the ``basis`` and the K cores (R, R) as heads (float32), so a
        reader holds d R + K R² numbers instead of the K d R of the heads U S_i."""
        cores = self.cores.float()
        full = torch.diag_embed(cores) if cores.dim() == 2 else cores  # (K, R, R)
        return FactoredView(self.A.float(), full, self.routing, self.U.float())

    @staticmethod
    def tensor_shapes(module: dict[str, Any], num_tasks: int) -> dict[str, tuple[int, ...]]:
        R, core = module.get("rank"), module.get("core")
        if not isinstance(R, int) or isinstance(R, bool) or R < 1:
            raise HydraoptError(f"module {module['name']!r}: rank must be an integer >= 1")
        if core not in ("full", "diagonal"):
            raise HydraoptError(f"module {module['name']!r}: core must be 'full' or 'diagonal'")
        if module["heads"] != num_tasks:
            raise HydraoptError(f"module {module['name']!r}: heads must equal K = {num_tasks}")
        cores = (num_tasks, R, R) if core == "full" else (num_tasks, R)
        return {"U": (module["d"], R), "V": (module["k"], R), "cores": cores}

    @classmethod
    def from_tensors(
        cls, tensors: dict[str, torch.Tensor], module: dict[str, Any], routing: torch.Tensor
    ) -> MergedBasisModule:
        return cls(tensors["U"], tensors["V"], tensors["cores"], routing)


LoraRecord = MergedModule | MergedBasisModule
# bundle.json ``tensor_layout`` -> the record that writes, checks and reads it.
LORA_LAYOUTS: dict[str, type[MergedModule] | type[MergedBasisModule]] = {
    cls.layout: cls for cls in (MergedModule, MergedBasisModule)
}


@dataclass(frozen=True)
class MergedVeraModule:
    """One module of a VeRA bundle: one vector shared by every task, M rows of the other.

    Attributes:
        lambda_b: (Mb, d) λb rows.
        lambda_d: (Md, r) λd rows; Mb == 1 or Md == 1.
        routing: (K,) int64 index into the side with M rows (all zeros when M = 1).
    """

    lambda_b: torch.Tensor
    lambda_d: torch.Tensor
    routing: torch.Tensor

    @property
    def num_heads(self) -> int:
        """M: the rows of the routed vector."""
        return max(int(self.lambda_b.shape[0]), int(self.lambda_d.shape[0]))

    def cast(self, dtype: torch.dtype) -> MergedVeraModule:
        """The vectors in ``dtype`` (the routing stays int64)."""
        return MergedVeraModule(self.lambda_b.to(dtype), self.lambda_d.to(dtype), self.routing)


@dataclass(frozen=True)
class StorageReport:
    """Exact parameter and byte accounting of a bundle against K separate adapters.

    Attributes:
        adapters_params: parameters of the K separate adapters.
        bundle_params: parameters of the bundle (the routing table is not counted, as in the paper).
        storage_percent: S = 100 * bundle_params / adapters_params.
        saved_percent: 100 - S.
        bytes_per_param: the storage dtype's size.
        adapters_bytes: adapters_params * bytes_per_param.
        bundle_bytes: bundle_params * bytes_per_param.
        routing_entries: K per module.
        projection_params: VeRA only: the shared frozen projections (reported, not counted).
    """

    adapters_params: int
    bundle_params: int
    storage_percent: float
    saved_percent: float
    bytes_per_param: int
    adapters_bytes: int
    bundle_bytes: int
    routing_entries: int
    projection_params: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """The bundle.json ``storage`` entry (``projection_params`` only where there is one)."""
        out = dataclasses.asdict(self)
        if self.projection_params is None:
            del out["projection_params"]
        return out

    def __getitem__(self, key: str) -> Any:
        """``report["storage_percent"]``: the bundle.json key, for code that reads the JSON form."""
        if key not in self.to_dict():
            raise KeyError(key)
        return getattr(self, key)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StorageReport:
        """Read a bundle.json ``storage`` entry."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(frozen=True)
class Provenance:
    """How a bundle was made, and the errors measured on the way (bundle.json ``extra``).

    Attributes:
        library_version: hydraopt version that merged it.
        seed: root of every generator.
        device: where it was merged.
        merge_seconds: wall time of the merge.
        error_distance: the distance of ``errors`` and ``zero_errors``.
        errors: module -> per task f(ΔW_i, ΔW'_i), the hard-routed error.
        zero_errors: module -> per task f(ΔW_i, 0), the error of storing nothing.
        sources: task -> the adapter dir it was merged from.
        in_features_source: VeRA only: where each module's input features came from.
        dtype: the storage dtype a loaded bundle was read from (None in memory; not written).
    """

    library_version: str | None = None
    seed: int | None = None
    device: str | None = None
    merge_seconds: float | None = None
    error_distance: str = "mae"
    errors: dict[str, list[float]] = field(default_factory=dict)
    zero_errors: dict[str, list[float]] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    in_features_source: str | None = None
    dtype: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The bundle.json ``extra`` entry, in the format's key order."""
        out = dataclasses.asdict(self)
        del out["dtype"]
        if self.in_features_source is None:
            del out["in_features_source"]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], dtype: str | None = None) -> Provenance:
        """Read a bundle.json ``extra`` entry (unknown keys of other versions are dropped)."""
        names = {f.name for f in dataclasses.fields(cls)} - {"dtype"}
        return cls(**{k: v for k, v in data.items() if k in names}, dtype=dtype)
