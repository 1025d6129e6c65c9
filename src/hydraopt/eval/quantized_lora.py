"""The K separate LoRA adapters stored at 8 or 4 bits, as an evaluation system (issue 19).

The honest alternative to merging is to keep every task's adapter, quantized: each A_i and B_i
group-wise at ``bits`` with the bundles' quantizer (:func:`hydraopt.quantize.quantize`, one
float16 scale per ``group_size`` values, the same call as the sweep's separate points,
:func:`hydraopt.quantized_bundle.separate_point`). The system applies the *dequantized*
factors in memory with the adapter's own LoRA scale, i.e. what a reader of the quantized file
would run.

S % is exact bytes: per task and module the codes and scales of A and B
(:func:`hydraopt.quantize.quantized_nbytes`, what safetensors stores for the two tensors of each,
headers aside) over the same adapters at 16 bits (2 bytes per value) -- the accounting of the
sweep's separate points. The cache id hashes the codes and scales themselves, so cached
generations follow the quantized weights: another width, group size or quantizer gets its own.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from hydraopt.errors import HydraoptError
from hydraopt.io.peft import load_adapter_set
from hydraopt.kinds.registry import get_kind
from hydraopt.quantize import QuantizedTensor, dequantize, quantize, quantized_nbytes
from hydraopt.quantized_bundle import DEFAULT_GROUP_SIZE, check_bits
from hydraopt.types import ModuleSpec

if TYPE_CHECKING:
    from hydraopt.kinds.lora.apply import LoraFactorMap


@dataclass(frozen=True)
class QuantizedAdapter:
    """One task's LoRA adapter with A and B quantized.

    Attributes:
        factors: module -> (A codes+scales (r, k), B codes+scales (d, r), LoRA scale).
        modules: the adapter's modules, natural order.
    """

    factors: dict[str, tuple[QuantizedTensor, QuantizedTensor, float]]
    modules: tuple[ModuleSpec, ...]

    @property
    def nbytes(self) -> int:
        """Exact stored bytes: codes and scales of every A and B."""
        return sum(a.nbytes + b.nbytes for a, b, _ in self.factors.values())

    def dequantized(self) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
        """``{module: (A (r, k), B (d, r), scale)}`` in float32, as the file reads back."""
        return {n: (dequantize(a), dequantize(b), s) for n, (a, b, s) in self.factors.items()}

    def sha256(self) -> str:
        """Hex SHA-256 of every module's name, LoRA scale, and A's and B's codes and scales."""
        digest = hashlib.sha256()
        for name, (a, b, scale) in self.factors.items():
            digest.update(json.dumps([name, scale, a.bits, a.group_size]).encode("utf-8"))
            for q in (a, b):
                digest.update(json.dumps(list(q.shape)).encode("utf-8"))
                digest.update(q.codes.numpy().tobytes())
                digest.update(q.scales.numpy().tobytes())
        return digest.hexdigest()


def quantize_lora_adapter(aset: Any, task: str, bits: int, group_size: int) -> QuantizedAdapter:
    """Quantize one task's A and B in every module of a LoRA adapter set.

    Args:
        aset: LoRA adapters (:func:`hydraopt.load_adapter_set`), ``task`` among them.
        task: the task whose adapter to quantize.
        bits: 8 or 4.
        group_size: values per float16 scale.

    Raises:
        ValueError: bad bits or group size, adapters that are not LoRA, an unknown task.
    """
    if bits == 16:
        raise ValueError("16 bits is the adapter itself; quantize at 8 or 4")
    check_bits(bits, group_size)
    if not get_kind(aset.kind).separate_factors:
        raise ValueError(f"separate quantized adapters are LoRA adapters, not {aset.kind}")
    k = list(aset.tasks).index(task)
    factors: dict[str, tuple[QuantizedTensor, QuantizedTensor, float]] = {}
    with torch.no_grad():
        for spec in aset.modules:
            stack = aset.load_stack([spec])  # A (1, K, r, k), B (1, K, d, r), float32
            factors[spec.name] = (
                quantize(stack.A[0, k], bits, group_size),  # (r, k)
                quantize(stack.B[0, k], bits, group_size),  # (d, r)
                float(aset.scales[task][spec.name]),
            )
    return QuantizedAdapter(factors, tuple(aset.modules))


def separate_nbytes(modules: Iterable[ModuleSpec], bits: int, group_size: int) -> int:
    """Exact bytes of one adapter's A and B in every module at ``bits`` (16: 2 per value)."""
    if bits == 16:
        return sum(2 * m.r * (m.d + m.k) for m in modules)
    return sum(
        quantized_nbytes(m.r * m.k, bits, group_size)
        + quantized_nbytes(m.d * m.r, bits, group_size)
        for m in modules
    )


@dataclass(frozen=True)
class QuantizedLora:
    """The per-task LoRA adapters of ``root/<task>/`` kept separate, each quantized at ``bits``.

    Attributes:
        root: folder of ``<task>/`` PEFT LoRA adapter dirs.
        tasks: the tasks evaluated: S % counts their adapters.
        bits: 8 or 4.
        group_size: values per float16 scale.
        label: row label (default ``"LoRA 4-bit"``).
    """

    root: Path
    tasks: tuple[str, ...]
    bits: int
    group_size: int = DEFAULT_GROUP_SIZE
    label: str = ""
    # task -> its quantized adapter, built on first use (cache_id, then adapter).
    _quantized: dict[str, QuantizedAdapter] = field(default_factory=dict, repr=False, compare=False)
    _modules_of: dict[str, tuple[ModuleSpec, ...]] = field(
        default_factory=dict, repr=False, compare=False
    )

    kind = "lora-quantized"
    method = "lora"  # one plot curve with the 16-bit separate adapters

    def __post_init__(self) -> None:
        try:
            if self.bits == 16:
                raise ValueError("bits must be 8 or 4 (16-bit separate adapters: --system lora=)")
            check_bits(self.bits, self.group_size)
        except ValueError as e:
            raise HydraoptError(f"separate LoRA adapters at {self.bits} bits: {e}") from None
        if not self.tasks:
            raise HydraoptError("separate quantized LoRA adapters need the tasks they cover")
        if not self.label:
            object.__setattr__(self, "label", f"LoRA {self.bits}-bit")

    def _adapter_set(self, tasks: Iterable[str]) -> Any:
        dirs = [Path(self.root) / t for t in tasks]
        missing = [str(d) for d in dirs if not (d / "adapter_config.json").is_file()]
        if missing:
            raise HydraoptError(
                f"system {self.label!r}: no PEFT adapter at {missing[0]} "
                f"(expected {missing[0]}/adapter_config.json)"
            )
        aset = load_adapter_set(dirs, list(tasks), check_values=False)
        if not get_kind(aset.kind).separate_factors:
            raise HydraoptError(
                f"system {self.label!r}: {self.root} holds {aset.kind} adapters; only LoRA "
                f"adapters are evaluated quantized and separate"
            )
        return aset

    def check_tasks(self, tasks: Iterable[str]) -> None:
        """Every task must be one of ``self.tasks``, with a LoRA adapter dir under ``root``."""
        wanted = list(tasks)
        extra = [t for t in wanted if t not in self.tasks]
        if extra:
            raise HydraoptError(f"system {self.label!r} covers {list(self.tasks)}, not {extra}")
        # Adapters of several tasks may be of other ranks or modules: read each on its own.
        for task in self.tasks:
            self._adapter_set([task])

    @property
    def nbytes(self) -> int:
        """Exact stored bytes of the ``tasks``' adapters at ``bits``."""
        return sum(
            separate_nbytes(self._modules(t), self.bits, self.group_size) for t in self.tasks
        )

    @property
    def reference_nbytes(self) -> int:
        """The same adapters at 16 bits: the 100 % of S %."""
        return sum(separate_nbytes(self._modules(t), 16, self.group_size) for t in self.tasks)

    @property
    def storage_percent(self) -> float:
        """Exact bytes over the 16-bit bytes of the same adapters, in %."""
        return 100.0 * self.nbytes / self.reference_nbytes

    def _modules(self, task: str) -> tuple[ModuleSpec, ...]:
        if task not in self._modules_of:  # headers only: no tensor is read
            self._modules_of[task] = tuple(self._adapter_set([task]).modules)
        return self._modules_of[task]

    def quantized(self, task: str) -> QuantizedAdapter:
        """The task's quantized adapter (quantized once, then kept)."""
        if task not in self._quantized:
            aset = self._adapter_set([task])
            self._quantized[task] = quantize_lora_adapter(aset, task, self.bits, self.group_size)
        return self._quantized[task]

    def cache_id(self, task: str) -> str:
        """SHA-256 of the kind, the task and the quantized factors (codes, scales, LoRA scale)."""
        return hashlib.sha256(
            "\0".join((self.kind, task, self.quantized(task).sha256())).encode("utf-8")
        ).hexdigest()

    def adapter(self, task: str) -> LoraFactorMap:
        """``{module: (deq A, deq B, LoRA scale)}`` for :func:`~hydraopt.eval.generate.applied_adapter`."""
        return self.quantized(task).dequantized()

    def describe(self) -> dict[str, Any]:
        """Label, kind, storage (bytes and %), root, bits and group size."""
        return {
            "label": self.label,
            "kind": self.kind,
            "storage_percent": self.storage_percent,
            "bytes": self.nbytes,
            "reference_bytes": self.reference_nbytes,
            "root": str(self.root),
            "tasks": list(self.tasks),
            "bits": self.bits,
            "group_size": self.group_size,
        }
