"""Validation of a bundle read from disk: ``bundle.json`` and its tensors are untrusted input.

Bundles are files people share. Before anything indexes a tensor with a routing entry or turns
a task name into a directory, the whole bundle is checked here, once, for every reader (export,
inspect, the serving runtime): field types, a task list of safe unique names, every module in
``modules`` present in the tensors with the shapes ``modules`` gives, routing complete and in
range (a negative index would silently pick another task's head); then the kind's own tensors
and fields (:mod:`hydraopt.kinds.lora.check_bundle`, :mod:`hydraopt.kinds.vera.check_bundle`),
with :func:`check_tensor` for each: floating point, the shape ``modules`` implies, finite. Each
problem is one :class:`HydraoptError` naming the bundle and the field.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeAlias, TypeGuard

import torch

from hydraopt.errors import HydraoptError
from hydraopt.io.dtypes import DTYPES
from hydraopt.io.names import check_task_names
from hydraopt.kinds.names import KIND_TRAITS, LEGACY_BUNDLE_KIND

ADAPTER_KINDS = tuple(KIND_TRAITS)

# A kind's own checks of its tensors and fields: (meta, tensors, tasks, modules, where), run after
# the kind-independent ones below (so tasks, modules and routing are already sound).
KindCheck: TypeAlias = Callable[
    [dict[str, Any], Mapping[str, torch.Tensor], list[str], list[dict[str, Any]], Any], None
]


def is_int(x: Any) -> TypeGuard[int]:
    """A JSON integer (``true`` is not one, although Python's bool is an int)."""
    return isinstance(x, int) and not isinstance(x, bool)


def is_number(x: Any) -> TypeGuard[float]:
    """A JSON number (int or float, not a bool)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_bundle_header(meta: dict[str, Any], where: str | Path) -> None:
    """The fields a reader dispatches on: ``format_version`` an integer >= 1, a known kind."""
    version = meta.get("format_version")
    if not is_int(version) or version < 1:
        raise HydraoptError(f"{where}: format_version must be an integer >= 1, got {version!r}")
    kind = meta.get("adapter_kind", LEGACY_BUNDLE_KIND)
    if kind not in ADAPTER_KINDS:
        raise HydraoptError(f"{where}: adapter_kind must be one of {ADAPTER_KINDS}, got {kind!r}")


def check_bundle(
    meta: dict[str, Any],
    tensors: Mapping[str, torch.Tensor],
    where: str | Path,
    check_kind: KindCheck,
) -> None:
    """Refuse a bundle whose metadata and tensors are not what its writer produces.

    Args:
        meta: ``bundle.json`` as parsed (format name already checked).
        tensors: every tensor of ``tensors.safetensors``, as stored.
        where: the bundle directory, for messages.
        check_kind: the bundle's kind's checks of its own tensors and fields
            (:meth:`hydraopt.kinds.base.AdapterKind.check_bundle_tensors`).

    Raises:
        HydraoptError: the first problem found, in one line.
    """
    check_bundle_header(meta, where)
    tasks = _check_common_fields(meta, where)
    _check_report_fields(meta, len(tasks), where)
    modules = _check_modules(meta, where)
    _check_routing(meta, modules, len(tasks), where)
    check_kind(meta, tensors, tasks, modules, where)


JSON_NAMES = {dict: "an object", list: "a list", str: "a string", int: "an integer"}
JSON_NAMES.update({float: "a number", bool: "a boolean", type(None): "null"})


def require_field(meta: dict[str, Any], key: str, kind: type, where: Any) -> Any:
    """``meta[key]``, refused unless it is of the JSON type ``kind``."""
    value = meta.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        found = "missing" if key not in meta else JSON_NAMES.get(type(value), type(value).__name__)
        raise HydraoptError(
            f"{where}: bundle.json field {key!r} must be {JSON_NAMES[kind]}, found {found}"
        )
    return value


def _check_common_fields(meta: dict[str, Any], where: Any) -> list[str]:
    """Fields every kind has; returns the task names."""
    require_field(meta, "method", str, where)
    require_field(meta, "config", dict, where)
    require_field(meta, "base_model", str, where)
    require_field(meta, "storage", dict, where)
    tasks = require_field(meta, "tasks", list, where)
    if not tasks:
        raise HydraoptError(f"{where}: bundle.json lists no tasks")
    check_task_names(tasks, f"{where}")
    configs = require_field(meta, "adapter_configs", dict, where)
    for task in tasks:
        if not isinstance(configs.get(task), dict):
            raise HydraoptError(f"{where}: adapter_configs has no object for task {task!r}")
    if "extra" in meta:
        require_field(meta, "extra", dict, where)
    if "dtype" in meta and meta["dtype"] not in DTYPES:
        raise HydraoptError(
            f"{where}: dtype must be one of {sorted(DTYPES)}, got {meta['dtype']!r}"
        )
    return tasks


STORAGE_NUMBERS: tuple[str, ...] = ("adapters_params", "bundle_params", "storage_percent")
STORAGE_NUMBERS += ("saved_percent", "bytes_per_param", "adapters_bytes", "bundle_bytes")
STORAGE_NUMBERS += ("routing_entries",)  # every field the typed StorageReport is built from
EXTRA_TYPES: dict[str, type] = {"merge_seconds": float, "error_distance": str, "seed": int}
OPTIONAL_EXTRA = ("merge_seconds", "seed")  # null in a bundle built in memory without them


def _check_report_fields(meta: dict[str, Any], K: int, where: Any) -> None:
    """What reports print (storage numbers, timings, per-task errors): of the types they use.

    Not needed to rebuild the adapters, but inspect, sweep and evaluate format and index them,
    so a bundle.json edited by hand must not turn a report into a traceback.
    """
    storage, extra = meta["storage"], meta.get("extra", {})
    for key in STORAGE_NUMBERS:
        value = storage.get(key)
        # saved_percent alone may be negative: a bundle larger than the separate adapters is
        # valid (shared_basis at K = 1, or a --rank above theirs) and merge writes it.
        low = -math.inf if key == "saved_percent" else 0
        if not is_number(value) or not math.isfinite(value) or value < low:
            what = "a finite number" + (" >= 0" if low == 0 else "")
            raise HydraoptError(f"{where}: storage.{key} must be {what}, got {value!r}")
    for key, kind in EXTRA_TYPES.items():
        value = extra.get(key)
        ok = is_number(value) if kind is float else isinstance(value, kind)
        if value is None and key in OPTIONAL_EXTRA:
            continue
        if key in extra and (not ok or isinstance(value, bool)):
            raise HydraoptError(f"{where}: extra.{key} must be {JSON_NAMES[kind]}, got {value!r}")
    for key in ("errors", "zero_errors"):
        table = extra.get(key, {})
        rows = table.values() if isinstance(table, dict) else [None]
        if any(not isinstance(r, list) or len(r) != K or not all(map(is_number, r)) for r in rows):
            raise HydraoptError(
                f"{where}: extra.{key} must map each module to one number per task ({K})"
            )
    sources = extra.get("sources", {})
    if not isinstance(sources, dict) or not all(isinstance(v, str) for v in sources.values()):
        raise HydraoptError(f"{where}: extra.sources must map tasks to directory paths")


def _check_modules(meta: dict[str, Any], where: Any) -> list[dict[str, Any]]:
    """``modules``: a non-empty list of {name, d, k, r, heads} with positive integer sizes."""
    modules = require_field(meta, "modules", list, where)
    if not modules:
        raise HydraoptError(f"{where}: bundle.json lists no modules")
    seen: set[str] = set()
    for m in modules:
        if not isinstance(m, dict) or not isinstance(m.get("name"), str) or not m["name"]:
            raise HydraoptError(f"{where}: every entry of modules needs a name, got {m!r:.80}")
        for key in ("d", "k", "r", "heads"):
            if not is_int(m.get(key)) or m[key] < 1:
                raise HydraoptError(
                    f"{where}: module {m['name']!r}: {key} must be an integer >= 1, "
                    f"got {m.get(key)!r}"
                )
        if m["name"] in seen:
            raise HydraoptError(f"{where}: module {m['name']!r} is listed twice")
        seen.add(m["name"])
    return modules


def _check_routing(meta: dict[str, Any], modules: list[dict[str, Any]], K: int, where: Any) -> None:
    """One head index per task for every module, each in [0, heads)."""
    routing = require_field(meta, "routing", dict, where)
    for m in modules:
        route = routing.get(m["name"])
        if not isinstance(route, list) or len(route) != K:
            got = f"{len(route)} entries" if isinstance(route, list) else repr(route)
            raise HydraoptError(
                f"{where}: routing of {m['name']!r} must list one head per task ({K}), got {got}"
            )
        for x in route:
            if not is_int(x) or not 0 <= x < m["heads"]:
                raise HydraoptError(
                    f"{where}: routing of {m['name']!r} holds {x!r}; entries must be integers "
                    f"in [0, {m['heads']})"
                )


def check_tensor(
    tensors: Mapping[str, torch.Tensor], key: str, shape: tuple[int, ...], where: Any
) -> torch.Tensor:
    """``tensors[key]`` exists, has ``shape``, a floating dtype and only finite values."""
    t = tensors.get(key)
    if t is None:
        raise HydraoptError(f"{where}: tensors.safetensors has no tensor {key!r}")
    if not t.is_floating_point():
        raise HydraoptError(f"{where}: tensor {key!r} is {t.dtype}; bundles hold floating point")
    if tuple(t.shape) != shape:
        raise HydraoptError(
            f"{where}: tensor {key!r} has shape {tuple(t.shape)} but bundle.json implies {shape}"
        )
    if not bool(torch.isfinite(t).all()):
        raise HydraoptError(f"{where}: tensor {key!r} contains NaN or Inf values")
    return t
