"""Read K PEFT LoRA adapter dirs into a validated, lazily-read :class:`AdapterSet`.

Only headers are read up front (shapes, key names, configs); tensors are read per module group
when the engine asks for them, so memory stays bounded by a few modules however large K is.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from safetensors import SafetensorError, safe_open

from hydraopt.errors import HydraoptError
from hydraopt.io.keys import lora_key, module_sort_key, parse_lora_key
from hydraopt.io.names import check_task_names
from hydraopt.io.validate import (
    check_finite,
    check_floating,
    check_lora_config,
    first_difference,
    load_pickled_tensors,
    lora_scale,
    module_rank_alpha,
)
from hydraopt.types import AdapterInfo, LoraStack, ModuleSpec

if TYPE_CHECKING:
    from hydraopt.vera.load import VeraAdapterSet

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"


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
        pickled = self._pickled.get(info.task)
        a = read_adapter_tensor(info, lora_key(module, "A"), pickled)
        b = read_adapter_tensor(info, lora_key(module, "B"), pickled)
        return a, b


def select_modules(modules: Sequence[ModuleSpec], names: Sequence[str]) -> tuple[ModuleSpec, ...]:
    """The named ``modules``, in their order; refuses a name that is not among them."""
    wanted = set(names)
    missing = wanted - {m.name for m in modules}
    if missing:
        raise HydraoptError(f"unknown modules: {sorted(missing)[:3]}")
    return tuple(m for m in modules if m.name in wanted)


def read_adapter_tensor(
    info: AdapterInfo, key: str, pickled: dict[str, torch.Tensor] | None = None
) -> torch.Tensor:
    """One tensor of an adapter's weights file (or of its already-read pickle), float32, finite.

    fp16/bf16 inputs are upcast here so every merge accumulates in float32.
    """
    if pickled is not None:
        t = pickled[key]
    else:
        try:
            with safe_open(str(info.weights_file), framework="pt") as f:
                t = f.get_tensor(key)
        except (SafetensorError, OSError) as e:
            raise HydraoptError(f"{info.weights_file}: cannot read {key}: {e}") from e
    check_floating(t, f"{info.weights_file} [{key}]")
    t = t.to(torch.float32)
    check_finite(t, f"{info.weights_file} [{key}]")
    return t


def expand_adapter_dirs(paths: Sequence[str | Path]) -> list[Path]:
    """Adapter dirs as given, with a folder *of* adapter dirs expanded to its children (sorted).

    Users arrive with "a folder of PEFT adapters"; ``hydraopt merge adapters/`` should just work.
    """
    out: list[Path] = []
    for p in map(Path, paths):
        children = (
            sorted(c for c in p.iterdir() if (c / CONFIG_NAME).is_file()) if p.is_dir() else []
        )
        if p.is_dir() and not (p / CONFIG_NAME).is_file() and children:
            out.extend(children)
        else:
            out.append(p)
    return out


def load_adapter_set(
    paths: Sequence[str | Path],
    names: Sequence[str] | None = None,
    *,
    allow_pickle: bool = False,
    check_values: bool = True,
    base_model: str | Path | None = None,
) -> AdapterSet | VeraAdapterSet:
    """Read and validate K PEFT LoRA adapter dirs, or K PEFT VeRA adapter dirs.

    The adapters' ``peft_type`` decides: all ``VERA`` gives a
    :class:`~hydraopt.vera.load.VeraAdapterSet` (see :func:`~hydraopt.vera.load.load_vera_adapter_set`),
    otherwise every adapter must be LoRA; a mix is refused.

    Args:
        paths: adapter directories (``adapter_config.json`` + ``adapter_model.safetensors``), or
            folders holding such directories.
        names: task names, default the directory names.
        allow_pickle: accept ``adapter_model.bin`` (read with ``weights_only=True``).
        check_values: scan every tensor for NaN/Inf now, so a corrupt adapter is refused before
            any work (each tensor is read once more later; cheap next to the merge).
        base_model: VeRA only: a local base model dir whose layer shapes give each module's
            input features (default: the adapters' ``base_model_name_or_path`` if local).

    Raises:
        HydraoptError: on any mismatch (base model, modules, ranks, shapes), unsupported feature,
            missing/corrupt file or non-finite value.
    """
    if len(paths) == 0:
        raise HydraoptError("no adapters given")
    dirs = expand_adapter_dirs(paths)
    tasks = task_names(dirs, names)
    vera = [d for d in dirs if peft_type_of(d) == "VERA"]
    if vera and len(vera) != len(dirs):
        lora = next(d for d in dirs if d not in vera)
        raise HydraoptError(
            f"{vera[0]} is a VeRA adapter but {lora} is {peft_type_of(lora) or 'not'} one; "
            "LoRA and VeRA adapters cannot be merged together"
        )
    if vera:
        from hydraopt.vera.load import load_vera_adapter_set  # vera.load imports this module

        return load_vera_adapter_set(
            dirs, tasks, allow_pickle=allow_pickle, check_values=check_values, base_model=base_model
        )

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
        for spec in modules:
            for info in infos:
                aset._read_pair(info, spec.name)
    return aset


def task_names(dirs: Sequence[Path], names: Sequence[str] | None) -> list[str]:
    """One unique task name per adapter dir: ``names``, or by default the dirs' names."""
    tasks = list(names) if names is not None else [d.name for d in dirs]
    if len(tasks) != len(dirs):
        raise HydraoptError(f"{len(dirs)} adapters but {len(tasks)} names")
    if len(set(tasks)) != len(tasks):
        raise HydraoptError(f"task names must be unique, got {tasks}; pass explicit names")
    return check_task_names(
        tasks,
        "task names" if names is not None else "adapter dir names (pass names to choose others)",
    )


def check_same_modules(
    first: AdapterInfo, info: AdapterInfo, ours: set[str], theirs: set[str]
) -> None:
    """Refuse two adapters whose target modules differ, naming the first difference."""
    if theirs != ours:
        raise HydraoptError(
            f"{info.path}: target modules differ from {first.path} "
            f"({first_difference(ours, theirs)})"
        )


def peft_type_of(d: Path) -> str:
    """The upper-cased ``peft_type`` of an adapter dir, or "" if its config cannot be read.

    Only a hint for dispatching; the full loaders report unreadable configs properly.
    """
    try:
        return str(json.loads((d / CONFIG_NAME).read_text()).get("peft_type", "")).upper()
    except (OSError, ValueError, AttributeError, RecursionError):
        return ""


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


def read_adapter_files(
    d: Path, *, check_config: Callable[[dict[str, Any], Path], None], allow_pickle: bool
) -> tuple[dict[str, Any], Path, dict[str, tuple[int, ...]], dict[str, torch.Tensor] | None]:
    """The raw parts of one PEFT adapter dir, LoRA or VeRA alike (key checks are the caller's).

    Args:
        d: the adapter dir.
        check_config: the kind's config check (``check_lora_config``, ``check_vera_config``),
            run before the weights are opened so an unsupported adapter is named as such.
        allow_pickle: accept ``adapter_model.bin`` (read with ``weights_only=True``).

    Returns:
        (``adapter_config.json`` as a dict, the weights file, key -> tensor shape from its
        header, the tensors themselves for a pickle (safetensors are read lazily: ``None``)).
    """
    if not d.is_dir():
        raise HydraoptError(f"{d}: adapter directory not found")
    cfg_path = d / CONFIG_NAME
    if not cfg_path.is_file():
        raise HydraoptError(f"{d}: missing {CONFIG_NAME} (is this a PEFT adapter dir?)")
    try:
        config: dict[str, Any] = json.loads(cfg_path.read_text())
    except OSError as e:
        raise HydraoptError(f"{cfg_path}: cannot read the adapter config ({e})") from e
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise HydraoptError(f"{cfg_path}: not valid JSON ({e})") from e
    check_config(config, d)

    st_path, bin_path = d / SAFETENSORS_NAME, d / PICKLE_NAME
    if st_path.is_file():
        try:
            with safe_open(str(st_path), framework="pt") as f:
                raw = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 - safe_open is not a dict
        except (SafetensorError, OSError, ValueError) as e:
            raise HydraoptError(f"{st_path}: corrupt safetensors file ({e})") from e
        return config, st_path, raw, None
    if not bin_path.is_file():
        raise HydraoptError(f"{d}: missing {SAFETENSORS_NAME}")
    if not allow_pickle:
        raise HydraoptError(
            f"{d}: only {PICKLE_NAME} (a pickle) found; convert it to safetensors or pass "
            "--allow-pickle to read it with torch.load(weights_only=True)"
        )
    tensors = load_pickled_tensors(bin_path)
    return config, bin_path, {k: tuple(v.shape) for k, v in tensors.items()}, tensors
