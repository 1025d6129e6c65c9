"""Read K PEFT VeRA adapter dirs into a validated, lazily-read :class:`VeraAdapterSet` (the io edge).

PEFT saves a VeRA adapter as ``base_model.model.<module>.vera_lambda_b`` (d,) and
``.vera_lambda_d`` (r,) per module, plus the shared projections ``base_model.vera_A``
(r, max_in) and ``base_model.vera_B`` (max_out, r) when ``save_projection`` is true (PEFT's
default). Without them the projections are regenerated from ``projection_prng_key`` exactly as
PEFT does (:mod:`hydraopt.kinds.vera.projections`), which needs max_in and max_out.

Input features per module are not stored in the adapter. They come, in this order, from the base
model's safetensors headers (``base_model=`` or the adapters' ``base_model_name_or_path`` when it
is a local dir or in the Hugging Face cache), else from the *assumption* that every targeted
module reads the projection's full width max_in: true for Llama-style attention (q/k/v/o all read
hidden_size), false for MLP down projections, which are refused unless base shapes are given.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from hydraopt.errors import HydraoptError
from hydraopt.io.adapter_dir import (
    check_finite,
    check_same_modules,
    read_adapter_files,
    read_adapter_tensor,
    select_modules,
    task_names,
)
from hydraopt.io.keys import PEFT_PREFIX, module_sort_key
from hydraopt.io.validate import check_vera_config_values
from hydraopt.kinds.vera.projections import vera_projections
from hydraopt.kinds.vera.shapes import module_shapes
from hydraopt.types import AdapterInfo, ModuleSpec, VeraStack

PROJECTION_KEYS = {"A": "base_model.vera_A", "B": "base_model.vera_B"}
_LAMBDA_KEY = re.compile(r"^(?P<module>.+)\.vera_lambda_(?P<vec>b|d)$")


def lambda_key(module: str, vec: str) -> str:
    """The PEFT key of ``vera_lambda_b`` (vec="b") or ``vera_lambda_d`` (vec="d") of ``module``."""
    return f"{PEFT_PREFIX}{module}.vera_lambda_{vec}"


@dataclass(frozen=True)
class VeraAdapterSet:
    """K validated VeRA adapters over the same modules, sharing one pair of projections.

    Attributes:
        adapters: one :class:`AdapterInfo` per task, in task order.
        modules: every adapted module, natural order (d = len λb, k = input features, r).
        base_model: the shared ``base_model_name_or_path``.
        projections: (``vera_A`` (r, max_in), ``vera_B`` (max_out, r)) float32.
        in_features_source: where each module's k came from (``base model <path>`` or
            ``assumed: k = max_in``), recorded in bundles.
    """

    kind: ClassVar[str] = "vera"

    adapters: tuple[AdapterInfo, ...]
    modules: tuple[ModuleSpec, ...]
    base_model: str
    projections: tuple[torch.Tensor, torch.Tensor]
    in_features_source: str
    _pickled: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(a.task for a in self.adapters)

    def select(self, names: Sequence[str]) -> VeraAdapterSet:
        """The same adapters restricted to the named modules."""
        return dataclasses.replace(self, modules=select_modules(self.modules, names))

    def load_stack(self, modules: Sequence[ModuleSpec]) -> VeraStack:
        """Read λb, λd of ``modules`` (all the same shape) for every task, as float32."""
        specs = list(modules)
        if len({m.shape_key for m in specs}) != 1:
            raise ValueError("load_stack needs modules of one shape")
        d, k, r = specs[0].shape_key
        vec_b, vec_d = [], []
        for spec in specs:
            pairs = [self._read_vectors(info, spec.name) for info in self.adapters]
            vec_b.append(torch.stack([b for b, _ in pairs]))
            vec_d.append(torch.stack([v for _, v in pairs]))
        vera_a, vera_b = self.projections
        return VeraStack(
            lambda_b=torch.stack(vec_b),  # (G, K, d)
            lambda_d=torch.stack(vec_d),  # (G, K, r)
            A=vera_a[:, :k].contiguous(),  # (r, k): PEFT's slice for in_features = k
            B=vera_b[:d, :].contiguous(),  # (d, r)
        )

    def _read_vectors(self, info: AdapterInfo, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        b = read_adapter_tensor(info, lambda_key(module, "b"), self._pickled.get(info.task))
        v = read_adapter_tensor(info, lambda_key(module, "d"), self._pickled.get(info.task))
        return b, v


def check_vera_config(config: dict[str, Any], path: Path) -> None:
    """Refuse VeRA configs whose weights are more than the λ vectors and the projections."""
    if str(config.get("peft_type", "")).upper() != "VERA":
        raise HydraoptError(f"{path}: peft_type is {config.get('peft_type')!r}, expected VERA")
    if config.get("modules_to_save"):
        raise HydraoptError(
            f"{path}: modules_to_save={config['modules_to_save']} is not supported "
            "(full module copies cannot be shared); retrain without it"
        )
    if config.get("bias", "none") != "none":
        raise HydraoptError(f"{path}: trained biases (bias={config['bias']!r}) are not supported")
    r = config.get("r")
    if not isinstance(r, int) or r <= 0:
        raise HydraoptError(f"{path}: adapter_config.json has no valid rank r (got {r!r})")
    check_vera_config_values(config, path)


def load_vera_adapter_set(
    paths: Sequence[str | Path],
    names: Sequence[str] | None = None,
    *,
    allow_pickle: bool = False,
    check_values: bool = True,
    base_model: str | Path | None = None,
) -> VeraAdapterSet:
    """Read and validate K PEFT VeRA adapter dirs (usually via :func:`hydraopt.load_adapter_set`).

    Args:
        paths: adapter directories (already expanded, see ``expand_adapter_dirs``).
        names: task names, default the directory names.
        allow_pickle: accept ``adapter_model.bin`` (read with ``weights_only=True``).
        check_values: scan every vector for NaN/Inf now.
        base_model: a local model dir whose safetensors headers give each module's
            (out, in) features; default the adapters' ``base_model_name_or_path`` if it is local
            or cached, else k = max_in is assumed (see module doc).

    Raises:
        HydraoptError: on any mismatch between the adapters (base model, rank, projection key,
            save_projection, saved projections, modules, shapes), an unsupported feature, a
            missing/corrupt file or a non-finite value.
    """
    dirs = [Path(p) for p in paths]
    tasks = task_names(dirs, names)
    headers = [
        _read_header(t, d, allow_pickle=allow_pickle) for t, d in zip(tasks, dirs, strict=True)
    ]
    infos = [h[0] for h in headers]
    first, lengths0 = infos[0], headers[0][1]
    for info, lengths, _ in headers[1:]:
        _check_same_setup(first, info)
        check_same_modules(first, info, set(lengths0), set(lengths))
        for mod, shape in lengths.items():
            if shape != lengths0[mod]:
                raise HydraoptError(
                    f"{info.path}: {mod} has λb/λd lengths {shape} but {first.path} has "
                    f"{lengths0[mod]} (adapters of different base models?)"
                )
    r = int(first.config["r"])
    pickled = {info.task: tensors for info, _, tensors in headers if tensors is not None}
    saved = _saved_projections(infos, pickled)
    shapes, source = module_shapes(first, lengths0, saved, base_model)
    max_out = max(out for out, _ in shapes.values())
    max_in = max(k for _, k in shapes.values())
    if saved is not None:
        vera_a, vera_b = saved
        if vera_a.shape[1] < max_in or vera_b.shape[0] < max_out:
            raise HydraoptError(
                f"{first.path}: saved projections vera_A {tuple(vera_a.shape)} / vera_B "
                f"{tuple(vera_b.shape)} are smaller than the modules need ({max_in} inputs, "
                f"{max_out} outputs)"
            )
    else:
        # PEFT regenerates them on a CPU generator from the key; so do we, bit for bit.
        vera_a, vera_b = vera_projections(
            int(first.config.get("projection_prng_key", 0)), r, max_in, max_out
        )
    modules = tuple(
        ModuleSpec(name=m, d=shapes[m][0], k=shapes[m][1], r=r)
        for m in sorted(lengths0, key=module_sort_key)
    )
    aset = VeraAdapterSet(
        adapters=tuple(infos),
        modules=modules,
        base_model=first.config.get("base_model_name_or_path") or "",
        projections=(vera_a.contiguous(), vera_b.contiguous()),
        in_features_source=source,
        _pickled=pickled,
    )
    if check_values:
        check_finite(vera_a, f"{first.weights_file} [vera_A]")
        check_finite(vera_b, f"{first.weights_file} [vera_B]")
        for spec in modules:
            for info in infos:
                aset._read_vectors(info, spec.name)
    return aset


def _check_same_setup(first: AdapterInfo, info: AdapterInfo) -> None:
    """Everything that makes two VeRAs share one pair of projections must be equal."""
    a, b = first.config, info.config
    checks = (
        ("base_model_name_or_path", "base model", ""),
        ("r", "rank r", None),
        ("projection_prng_key", "projection_prng_key", 0),
        ("save_projection", "save_projection", True),
        ("fan_in_fan_out", "fan_in_fan_out", False),
    )
    for key, what, default in checks:
        if _setting(a, key, default) != _setting(b, key, default):
            raise HydraoptError(
                f"{info.path}: {what} {b.get(key, default)!r} differs from {first.path}'s "
                f"{a.get(key, default)!r}; VeRA adapters merge only when they share their "
                "projections (same base model, r, projection_prng_key, save_projection)"
            )


def _setting(config: dict[str, Any], key: str, default: Any) -> Any:
    """A config value with PEFT's default for a missing or null entry."""
    value = config.get(key)
    return default if value is None else value


def _saved_projections(
    infos: list[AdapterInfo], pickled: dict[str, dict[str, torch.Tensor]]
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The projections every adapter saved (refused if any two differ), or None if not saved."""
    if not bool(infos[0].config.get("save_projection", True)):
        return None
    ref: tuple[torch.Tensor, torch.Tensor] | None = None
    for info in infos:
        pair = tuple(
            read_adapter_tensor(info, PROJECTION_KEYS[x], pickled.get(info.task))
            for x in ("A", "B")
        )
        if ref is None:
            ref = (pair[0], pair[1])
        elif any(
            p.shape != q.shape or not torch.equal(p, q) for p, q in zip(pair, ref, strict=True)
        ):
            raise HydraoptError(
                f"{info.path}: its saved vera_A/vera_B differ from {infos[0].path}'s although "
                "both use the same projection_prng_key; VeRAs with different projections "
                "cannot share merged vectors"
            )
    return ref


def _read_header(
    task: str, d: Path, *, allow_pickle: bool
) -> tuple[AdapterInfo, dict[str, tuple[int, int]], dict[str, torch.Tensor] | None]:
    """Config + per-module (len λb, len λd) of one VeRA dir, validated on its own."""
    config, weights_file, raw, tensors = read_adapter_files(
        d, check_config=check_vera_config, allow_pickle=allow_pickle
    )
    r = int(config["r"])
    save_projection = bool(config.get("save_projection", True))
    vectors: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, shape in raw.items():
        if key in PROJECTION_KEYS.values():
            continue
        body = key.removeprefix(PEFT_PREFIX)
        m = _LAMBDA_KEY.match(body)
        if m is None:
            raise HydraoptError(
                f"{weights_file}: unsupported tensor {key!r} (only vera_lambda_b/d and the "
                "vera_A/vera_B projections merge; biases and modules_to_save are refused)"
            )
        if len(shape) != 1:
            raise HydraoptError(f"{weights_file}: {key} has shape {shape}, expected a vector")
        vectors.setdefault(m.group("module"), {})[m.group("vec")] = shape
    if not vectors:
        raise HydraoptError(f"{weights_file}: no VeRA vectors found")
    present = [k for k in PROJECTION_KEYS.values() if k in raw]
    if save_projection and len(present) != 2:
        raise HydraoptError(
            f"{weights_file}: save_projection is true but vera_A/vera_B are missing; "
            "the file is incomplete"
        )
    if not save_projection and present:
        raise HydraoptError(
            f"{weights_file}: save_projection is false but the file holds {present}; "
            "fix adapter_config.json"
        )
    if save_projection:
        a_shape, b_shape = raw[PROJECTION_KEYS["A"]], raw[PROJECTION_KEYS["B"]]
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != r or b_shape[1] != r:
            raise HydraoptError(
                f"{weights_file}: vera_A {a_shape} / vera_B {b_shape} do not have rank r = {r}"
            )
    lengths = {}
    for module, vec in vectors.items():
        if set(vec) != {"b", "d"}:
            raise HydraoptError(
                f"{weights_file}: {module} lacks vera_lambda_{'d' if 'b' in vec else 'b'}"
            )
        if vec["d"][0] != r:
            raise HydraoptError(
                f"{weights_file}: {module} has len(λd) = {vec['d'][0]} but the config says "
                f"r = {r}; λd must have one entry per rank"
            )
        lengths[module] = (int(vec["b"][0]), int(vec["d"][0]))
    info = AdapterInfo(task=task, path=d, config=config, weights_file=weights_file)
    return info, lengths, tensors
