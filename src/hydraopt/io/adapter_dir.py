"""One PEFT adapter directory on disk, whatever its kind: config, weights file, tensors.

The kind packages (:mod:`hydraopt.kinds`) build on these to read their own keys; nothing here
knows what a LoRA or a VeRA key looks like. Writing goes through :func:`write_task_adapters`,
which every kind's export uses (one dir per task, atomically).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from hydraopt.errors import HydraoptError
from hydraopt.io.atomic import atomic_dir, mark_export
from hydraopt.io.dtypes import DTYPES
from hydraopt.io.names import check_task_names, select_tasks
from hydraopt.io.validate import check_floating, load_pickled_tensors
from hydraopt.types import AdapterInfo, Bundle, ModuleSpec, VeraBundle

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"


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
    return read_adapter_tensors(info, [key], pickled)[0]


def read_adapter_tensors(
    info: AdapterInfo, keys: Sequence[str], pickled: dict[str, torch.Tensor] | None = None
) -> list[torch.Tensor]:
    """:func:`read_adapter_tensor` of several keys, the weights file opened once (at K = 1,000
    adapters of 128 tensors each, an open per tensor cost 50 us more than a read)."""
    if pickled is not None:
        raw = [pickled[key] for key in keys]
    else:
        raw, key = [], keys[0]
        try:
            with safe_open(str(info.weights_file), framework="pt") as f:
                for key in keys:
                    raw.append(f.get_tensor(key))
        except (SafetensorError, OSError) as e:
            raise HydraoptError(f"{info.weights_file}: cannot read {key}: {e}") from e
    out = []
    for key, t in zip(keys, raw, strict=True):
        check_floating(t, f"{info.weights_file} [{key}]")
        t = t.to(torch.float32)
        check_finite(t, f"{info.weights_file} [{key}]")
        out.append(t)
    return out


def check_finite(tensor: torch.Tensor, what: str) -> None:
    """Refuse NaN/Inf weights: they would poison every shared factor they touch."""
    # A NaN or an infinity makes the sum non-finite, so a finite sum clears the tensor at a
    # seventh of isfinite's cost (measured on 32 x 2048 factors); a non-finite sum may also come
    # from finite values overflowing, so it is decided by the exact check.
    if bool(torch.isfinite(tensor.sum())):
        return
    if not bool(torch.isfinite(tensor).all()):
        raise HydraoptError(f"{what} contains NaN or Inf values; the adapter is corrupt")


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


def task_names(dirs: Sequence[Path], names: Sequence[str] | None) -> list[str]:
    """One unique task name per adapter dir: ``names``, or by default the dirs' names."""
    tasks = list(names) if names is not None else [d.name for d in dirs]
    if len(tasks) != len(dirs):
        raise HydraoptError(f"{len(dirs)} adapters but {len(tasks)} names")
    if len(set(tasks)) != len(tasks):
        # The same dir listed twice (often a folder and one of its children) is a slip, not
        # two tasks: say so rather than suggest renaming it.
        seen: set[Path] = set()
        for d in dirs:
            if d.resolve() in seen:
                raise HydraoptError(f"{d}: adapter dir given twice; list each adapter once")
            seen.add(d.resolve())
        raise HydraoptError(
            f"task names must be unique, got {tasks}; pass explicit names (--names)"
        )
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


def first_difference(a: set[str], b: set[str]) -> str:
    """A short description of how two name sets differ, for error messages."""
    only_a, only_b = sorted(a - b), sorted(b - a)
    parts = []
    if only_a:
        parts.append(f"only in the first: {only_a[:3]}{' ...' if len(only_a) > 3 else ''}")
    if only_b:
        parts.append(f"only in the other: {only_b[:3]}{' ...' if len(only_b) > 3 else ''}")
    return "; ".join(parts)


def peft_type_of(d: Path) -> str:
    """The upper-cased ``peft_type`` of an adapter dir, or "" if its config cannot be read.

    Only a hint for dispatching; the full loaders report unreadable configs properly.
    """
    try:
        return str(json.loads((d / CONFIG_NAME).read_text()).get("peft_type", "")).upper()
    except (OSError, ValueError, AttributeError, RecursionError):
        return ""


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


def write_task_adapters(
    bundle: Bundle | VeraBundle,
    out: str | Path,
    state_dict: Callable[[str, torch.dtype], dict[str, torch.Tensor]],
    config_overrides: dict[str, Any],
    tasks: list[str] | None,
    force: bool,
    dtype: str | None,
) -> dict[str, Path]:
    """Write ``out/<task>/`` PEFT adapter dirs of either kind (atomically, all or nothing).

    Each holds ``state_dict(task, dtype)`` as ``adapter_model.safetensors``, the task's original
    ``adapter_config.json`` with ``inference_mode: true`` and ``config_overrides``, and
    ``hydraopt_export.json`` (provenance: method, config, the task's head per module).

    Args:
        bundle: the bundle the state dicts come from (for configs and provenance).
        out: parent directory to create; refused if it exists unless ``force``.
        state_dict: the PEFT-format tensors of one task in a torch dtype.
        config_overrides: config entries the export sets on top of the original config.
        tasks: subset of tasks to export (default all).
        force: replace an existing ``out``.
        dtype: dtype name of the files; default the bundle's storage dtype when it was loaded
            from disk, float32 for an in-memory bundle.
    """
    name = dtype or bundle.provenance.dtype or "float32"
    if name not in DTYPES:
        raise HydraoptError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}")
    selected = select_tasks(bundle.tasks, tasks)
    out = Path(out)
    with atomic_dir(out, force=force) as tmp:
        mark_export(tmp, selected)
        for task in selected:
            d = tmp / task
            d.mkdir()
            save_file(
                state_dict(task, DTYPES[name]),
                str(d / SAFETENSORS_NAME),
                metadata={"format": "pt"},
            )
            config = {**bundle.adapter_configs[task], "inference_mode": True, **config_overrides}
            (d / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
            provenance = {
                "exported_by": f"hydraopt {bundle.provenance.library_version}",
                "method": bundle.method,
                "config": bundle.config,
                "task": task,
                "heads": bundle.routing_of(task),
            }
            (d / "hydraopt_export.json").write_text(json.dumps(provenance, indent=2) + "\n")
    return {task: out / task for task in selected}
