"""Read K PEFT LoRA adapter dirs into a validated, lazily-read :class:`AdapterSet`.

Only headers are read up front (shapes, key names, configs); tensors are read per module group
when the engine asks for them, so memory stays bounded by a few modules however large K is.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from hydraopt.errors import HydraoptError
from hydraopt.io.adapter_dir import (
    check_same_modules,
    read_adapter_files,
    read_adapter_tensors,
    select_modules,
)
from hydraopt.io.keys import lora_key, module_sort_key, parse_lora_key
from hydraopt.kinds.lora.config import check_lora_config, lora_scale, module_rank_alpha
from hydraopt.types import AdapterInfo, LoraStack, ModuleSpec


@dataclass(frozen=True)
class AdapterSet:
    """K validated LoRA adapters over the same modules of the same base model.

    Attributes:
        adapters: one :class:`AdapterInfo` per task, in task order.
        modules: every adapted module, natural order.
        base_model: the shared ``base_model_name_or_path``.
        scales: task -> module -> LoRA scale (alpha/r or alpha/sqrt(r)).
    """

    kind: ClassVar[str] = "lora"

    adapters: tuple[AdapterInfo, ...]
    modules: tuple[ModuleSpec, ...]
    base_model: str
    scales: dict[str, dict[str, float]]
    _pickled: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(a.task for a in self.adapters)

    def select(self, names: Sequence[str]) -> AdapterSet:
        """The same adapters restricted to the named modules (for slices in tests and benchmarks)."""
        return dataclasses.replace(self, modules=select_modules(self.modules, names))

    def load_stack(self, modules: Sequence[ModuleSpec]) -> LoraStack:
        """Read the factors of ``modules`` (all the same shape) for every task.

        Returns:
            A :class:`LoraStack` with A (G, K, r, k), B (G, K, d, r) in float32 — fp16/bf16 inputs
            are upcast here so every merge accumulates in float32.
        """
        specs = list(modules)
        if len({m.shape_key for m in specs}) != 1:
            raise ValueError("load_stack needs modules of one shape")
        a_rows, b_rows, s_rows = [], [], []
        for spec in specs:
            a_k, b_k = [], []
            for info in self.adapters:
                a, b = self._read_pair(info, spec.name)
                a_k.append(a)
                b_k.append(b)
            a_rows.append(torch.stack(a_k))
            b_rows.append(torch.stack(b_k))
            s_rows.append([self.scales[info.task][spec.name] for info in self.adapters])
        return LoraStack(
            A=torch.stack(a_rows),  # (G, K, r, k)
            B=torch.stack(b_rows),  # (G, K, d, r)
            scale=torch.tensor(s_rows, dtype=torch.float32),  # (G, K)
        )

    def _read_pair(self, info: AdapterInfo, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        keys = [lora_key(module, "A"), lora_key(module, "B")]
        a, b = read_adapter_tensors(info, keys, self._pickled.get(info.task))
        return a, b


def load_lora_adapter_set(
    dirs: Sequence[Path],
    tasks: Sequence[str],
    *,
    allow_pickle: bool = False,
    check_values: bool = True,
) -> AdapterSet:
    """Read and validate K PEFT LoRA adapter dirs (usually via :func:`hydraopt.load_adapter_set`).

    Args:
        dirs: adapter directories (already expanded, see ``expand_adapter_dirs``).
        tasks: one unique task name per dir.
        allow_pickle: accept ``adapter_model.bin`` (read with ``weights_only=True``).
        check_values: scan every tensor for NaN/Inf now.

    Raises:
        HydraoptError: on any mismatch (base model, modules, ranks, shapes), unsupported feature,
            missing/corrupt file or non-finite value.
    """
    infos, shapes, pickled = [], [], {}
    for task, d in zip(tasks, dirs, strict=True):
        info, shape, tensors = _read_adapter_header(task, d, allow_pickle=allow_pickle)
        infos.append(info)
        shapes.append(shape)
        if tensors is not None:
            pickled[task] = tensors

    first = infos[0]
    base = first.config.get("base_model_name_or_path") or ""
    for info, shape in zip(infos[1:], shapes[1:], strict=True):
        other = info.config.get("base_model_name_or_path") or ""
        if other != base:
            raise HydraoptError(
                f"{info.path}: base model {other!r} differs from {first.path}'s {base!r}; "
                "adapters must be trained on the same base model"
            )
        check_same_modules(first, info, set(shapes[0]), set(shape))
        for mod, s in shape.items():
            (r, k), (d_out, _) = s
            (r0, k0), (d0, _) = shapes[0][mod]
            if (k, d_out) == (k0, d0) and r != r0:  # the common case: name it plainly
                raise HydraoptError(
                    f"{info.path}: {mod} has rank {r} but {first.path} has rank {r0}; "
                    "adapters of different ranks are not merged (A' has one rank per module)"
                )
            if s != shapes[0][mod]:
                raise HydraoptError(
                    f"{info.path}: {mod} has A/B shapes {s} but {first.path} has {shapes[0][mod]} "
                    "(mismatched ranks or base model shapes)"
                )
        if bool(info.config.get("fan_in_fan_out")) != bool(first.config.get("fan_in_fan_out")):
            raise HydraoptError(f"{info.path}: fan_in_fan_out differs from {first.path}")

    modules = []
    for mod in sorted(shapes[0], key=module_sort_key):
        (r, k), (d_out, r_b) = shapes[0][mod]
        modules.append(ModuleSpec(name=mod, d=d_out, k=k, r=r))
    scales = {
        info.task: {m.name: lora_scale(info.config, m.name) for m in modules} for info in infos
    }
    aset = AdapterSet(tuple(infos), tuple(modules), base, scales, pickled)
    if check_values:
        # Every tensor read (and checked) once now, each file opened once.
        keys = [lora_key(m.name, x) for m in modules for x in ("A", "B")]
        for info in infos:
            read_adapter_tensors(info, keys, pickled.get(info.task))
    return aset


def _read_adapter_header(
    task: str, d: Path, *, allow_pickle: bool
) -> tuple[AdapterInfo, dict[str, tuple[tuple[int, int], tuple[int, int]]], dict | None]:
    """Config + per-module (A shape, B shape) of one adapter dir, validated on its own."""
    config, weights_file, raw, tensors = read_adapter_files(
        d, check_config=check_lora_config, allow_pickle=allow_pickle
    )
    pairs: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, shape in raw.items():
        parsed = parse_lora_key(key)
        if parsed is None:
            raise HydraoptError(
                f"{weights_file}: unsupported tensor {key!r} (only lora_A/lora_B weights merge; "
                "DoRA magnitudes, biases, embeddings and modules_to_save are refused)"
            )
        module, factor = parsed
        if len(shape) != 2:
            raise HydraoptError(f"{weights_file}: {key} has shape {shape}, expected a matrix")
        pairs.setdefault(module, {})[factor] = shape
    if not pairs:
        raise HydraoptError(f"{weights_file}: no LoRA weights found")
    shapes = {}
    for module, fac in pairs.items():
        if set(fac) != {"A", "B"}:
            raise HydraoptError(f"{weights_file}: {module} lacks lora_{'B' if 'A' in fac else 'A'}")
        (r, k), (d_out, r_b) = fac["A"], fac["B"]
        cfg_r, _ = module_rank_alpha(config, module)
        if r != r_b or r != cfg_r:
            raise HydraoptError(
                f"{weights_file}: {module} has rank {r} (A) / {r_b} (B) but the config says {cfg_r}"
            )
        shapes[module] = ((r, k), (d_out, r_b))
    info = AdapterInfo(task=task, path=d, config=config, weights_file=weights_file)
    return info, shapes, tensors
