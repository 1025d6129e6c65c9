"""The systems an evaluation compares: zero-shot, per-task LoRA or VeRA adapters, merged bundles.

A system answers one question per task: which adapter, if any, goes on the base model. Each also
has a label (a row of the results table), a storage share S % (the x axis of the trade-off plot)
and a content-based cache id per task, so cached generations follow the weights rather than the
paths: renaming a directory keeps its cache, retraining or re-merging invalidates it.

- :class:`ZeroShot`: the bare base model (S = 0).
- :class:`PerTaskLora`: one PEFT LoRA adapter dir per task (S = 100). Dirs written by
  ``hydraopt export`` are ordinary PEFT dirs and are evaluated through this class.
- :class:`PerTaskVera`: the same for PEFT VeRA dirs (S = 100: the paper's Table 3 measures VeRA
  merges against separate VeRAs). Merged VeRA adapters exported as PEFT VeRA dirs go here too.
- :class:`~hydraopt.eval.quantized_lora.QuantizedLora`: the per-task LoRA dirs kept separate,
  each A and B quantized at 8 or 4 bits (S from their exact bytes).
- :class:`BundleSystem`: a bundle dir, LoRA or VeRA; each task's routed head (LoRA) or routed
  vectors with the shared projections (VeRA) are applied in memory, writing no files (S from the
  bundle's storage accounting). Generations equal those of the bundle's PEFT export.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from hydraopt.errors import HydraoptError
from hydraopt.io.bundle import TENSORS_NAME, load_any_bundle
from hydraopt.kinds.lora.config import check_init
from hydraopt.kinds.registry import KINDS, get_kind, kind_of_peft_type
from hydraopt.merge.base import SweepPoints
from hydraopt.merge.registry import get_method, list_methods
from hydraopt.types import Bundle, VeraBundle

if TYPE_CHECKING:
    from hydraopt.eval.generate import AppliedWeights, LoraFactorMap

# Fields of adapter_config.json that do not change what the adapter computes at inference.
# `hydraopt export` sets inference_mode=True on a copy of the original config; leaving it out of
# the cache id lets an export and its original share a cache when their weights are equal.
_INFERENCE_IRRELEVANT_CONFIG = frozenset({"inference_mode"})

_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
_CHUNK = 1 << 20


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def text_sha256(*parts: str) -> str:
    """Hex SHA-256 of strings joined by NUL, which no part contains as a separator."""
    return hashlib.sha256("\0".join(parts).encode("utf-8")).hexdigest()


class System(Protocol):
    """Something to evaluate on every task: a label, a storage share and an adapter per task."""

    @property
    def label(self) -> str:
        """Row label of the results table."""
        ...

    @property
    def kind(self) -> str:
        """``"zero-shot"``, ``"lora"``, ``"lora-quantized"``, ``"vera"`` or ``"bundle"``."""
        ...

    @property
    def method(self) -> str:
        """Plot group: ``"zero-shot"``, ``"lora"``, ``"vera"`` or the bundle's merge method."""
        ...

    @property
    def storage_percent(self) -> float:
        """Parameters stored, as % of K separate adapters."""
        ...

    def check_tasks(self, tasks: Iterable[str]) -> None:
        """Raise :class:`HydraoptError` if the system has nothing for one of ``tasks``."""
        ...

    def cache_id(self, task: str) -> str:
        """Hex digest of everything (besides the base model) that decides the task's outputs."""
        ...

    def adapter(self, task: str) -> None | Path | LoraFactorMap | AppliedWeights:
        """What :func:`hydraopt.eval.generate.applied_adapter` applies for ``task``."""
        ...

    def describe(self) -> dict[str, Any]:
        """JSON-ready summary for the results file."""
        ...


@dataclass(frozen=True)
class ZeroShot:
    """The base model without any adapter. Its outputs depend on the base model only, which the
    harness keys the cache on anyway, so the cache id is a constant per task."""

    label: str = "zero-shot"

    kind = "zero-shot"
    method = "zero-shot"
    storage_percent = 0.0

    def check_tasks(self, tasks: Iterable[str]) -> None:
        """Every task can be run zero-shot."""

    def cache_id(self, task: str) -> str:
        """Constant per task (see the class docstring)."""
        return text_sha256("zero-shot", task)

    def adapter(self, task: str) -> None:
        """No adapter."""
        return None

    def describe(self) -> dict[str, Any]:
        """Label, kind and storage."""
        return {"label": self.label, "kind": self.kind, "storage_percent": 0.0}


@dataclass(frozen=True)
class PerTaskAdapters:
    """One PEFT adapter dir per task, applied by PEFT from disk; base of one class per kind.

    Subclasses fix ``kind``: the first part of the cache id, and what ``adapter_config.json``'s
    ``peft_type`` must map to (:func:`adapter_kind`), so a dir of the wrong kind is refused by
    name rather than mislabelled in the table.

    Attributes:
        root: Folder holding ``<task>/`` adapter dirs, or ``None`` when ``dirs`` lists them all.
        dirs: Explicit task -> adapter dir; these win over ``root``.
        label: Row label.
    """

    root: Path | None = None
    dirs: Mapping[str, Path] = field(default_factory=dict)
    label: str = "adapters"

    kind: ClassVar[str]
    method: ClassVar[str]
    # Separate adapters are the reference the storage share is measured against.
    storage_percent: ClassVar[float] = 100.0

    def __post_init__(self) -> None:
        if self.root is None and not self.dirs:
            raise HydraoptError(f"system {self.label!r}: give an adapter root or task->dir map")

    def adapter_dir(self, task: str) -> Path:
        """The task's adapter dir (not checked; see :meth:`check_tasks`)."""
        if task in self.dirs:
            return Path(self.dirs[task])
        if self.root is None:
            raise HydraoptError(
                f"system {self.label!r} has no adapter for task {task!r} "
                f"(it has {sorted(self.dirs)})"
            )
        return Path(self.root) / task

    def check_tasks(self, tasks: Iterable[str]) -> None:
        """Every task needs a dir with ``adapter_config.json`` of this kind and a weights file."""
        for task in tasks:
            directory = self.adapter_dir(task)
            if not (directory / "adapter_config.json").is_file():
                raise HydraoptError(
                    f"system {self.label!r}: no PEFT adapter for task {task!r} at {directory} "
                    f"(expected {directory}/adapter_config.json)"
                )
            found = adapter_kind(directory)
            if found != self.kind:
                raise HydraoptError(
                    f"system {self.label!r}: {directory} is a {found} adapter, not {self.kind}; "
                    f"pass its root as --system {found}=ROOT"
                )
            _weights_file(directory)

    def cache_id(self, task: str) -> str:
        """SHA-256 of the kind, task name, the weights file and the inference-relevant config."""
        directory = self.adapter_dir(task)
        config = json.loads((directory / "adapter_config.json").read_text(encoding="utf-8"))
        relevant = {k: v for k, v in config.items() if k not in _INFERENCE_IRRELEVANT_CONFIG}
        return text_sha256(
            self.kind,
            task,
            file_sha256(_weights_file(directory)),
            json.dumps(relevant, sort_keys=True),
        )

    def adapter(self, task: str) -> Path:
        """The task's PEFT adapter dir."""
        return self.adapter_dir(task)

    def describe(self) -> dict[str, Any]:
        """Label, kind, storage and where the adapters are."""
        return {
            "label": self.label,
            "kind": self.kind,
            "storage_percent": self.storage_percent,
            "root": str(self.root) if self.root is not None else None,
            "dirs": {task: str(path) for task, path in self.dirs.items()},
        }


@dataclass(frozen=True)
class PerTaskLora(PerTaskAdapters):
    """One PEFT LoRA adapter dir per task (see :class:`PerTaskAdapters`)."""

    label: str = "LoRA"

    kind = "lora"
    method = "lora"

    def check_tasks(self, tasks: Iterable[str]) -> None:
        super().check_tasks(tasks)
        for task in tasks:  # PiSSA & co. rewrite the shared base in place; unload keeps it
            config = json.loads((self.adapter_dir(task) / "adapter_config.json").read_text())
            check_init(config.get("init_lora_weights", True), self.adapter_dir(task))


@dataclass(frozen=True)
class PerTaskVera(PerTaskAdapters):
    """One PEFT VeRA adapter dir per task (see :class:`PerTaskAdapters`).

    PEFT builds the VeRA layers from the dir (the saved projections included), exactly as
    ``PeftModel.from_pretrained`` does; :func:`hydraopt.kinds.vera.apply.apply_vera_weights` is the
    in-memory equivalent and gives the same logits.
    """

    label: str = "VeRA"

    kind = "vera"
    method = "vera"


# Separate adapters per task, by adapter kind (``--system KIND=ROOT``).
PER_TASK_SYSTEMS: dict[str, type[PerTaskAdapters]] = {
    cls.kind: cls for cls in (PerTaskLora, PerTaskVera)
}


def adapter_kind(directory: str | Path) -> str:
    """The system kind (``"lora"`` / ``"vera"``) of a PEFT adapter dir, from its config.

    Raises:
        HydraoptError: If the config is unreadable or names another PEFT type.
    """
    path = Path(directory) / "adapter_config.json"
    try:
        peft_type = json.loads(path.read_text(encoding="utf-8")).get("peft_type")
    except (OSError, json.JSONDecodeError, AttributeError) as error:
        raise HydraoptError(f"cannot read {path}: {error}") from error
    kind = kind_of_peft_type(peft_type) if isinstance(peft_type, str) else None
    if kind is None:
        raise HydraoptError(
            f"{path}: peft_type {peft_type!r} is not evaluated here "
            f"(supported: {sorted(k.peft_type for k in KINDS.values())})"
        )
    return kind.name


@dataclass(frozen=True)
class BundleSystem:
    """A merged bundle (LoRA or VeRA); each task's routed weights are applied in memory.

    Build it with :func:`bundle_system`, which loads the bundle and hashes its tensor file once.

    Attributes:
        path: The bundle dir.
        bundle: The loaded bundle (tensors as float32, from the stored dtype).
        tensors_sha256: SHA-256 of its ``tensors.safetensors``.
        label: Row label.
    """

    path: Path
    bundle: Bundle | VeraBundle = field(repr=False, compare=False)
    tensors_sha256: str
    label: str

    kind = "bundle"

    @property
    def method(self) -> str:
        """The bundle's merge method (registry name)."""
        return self.bundle.method

    @property
    def storage_percent(self) -> float:
        """From the bundle's own storage accounting."""
        return float(self.bundle.storage.storage_percent)

    def check_tasks(self, tasks: Iterable[str]) -> None:
        """Every task must be one the bundle was merged from."""
        missing = [task for task in tasks if task not in self.bundle.tasks]
        if missing:
            raise HydraoptError(
                f"bundle {self.path} ({self.label!r}) lacks task(s) {missing}; it holds "
                f"{list(self.bundle.tasks)}: drop those --tasks or merge a bundle that has them"
            )

    def cache_id(self, task: str) -> str:
        """SHA-256 of the task, the tensor file and the task's head index in every module.

        Routing lives in ``bundle.json``, not in the tensor file, and picks the head, so it is
        part of the id; the rest of ``bundle.json`` (timings, provenance) is not.
        """
        route = self.bundle.routing_of(task)
        return text_sha256("bundle", task, self.tensors_sha256, json.dumps(route, sort_keys=True))

    def adapter(self, task: str) -> LoraFactorMap | AppliedWeights:
        """The task's weights as :func:`~hydraopt.eval.generate.applied_adapter` takes them.

        LoRA: ``{module: (A', B', 1.0)}`` (the bundle's heads already carry the LoRA scale).
        VeRA: the shared projections and the task's routed (λb, λd) per module, the very numbers
        the bundle's PEFT export holds (see the kind's ``task_weights``).
        """
        return get_kind(self.bundle.kind).task_weights(self.bundle, task)

    def describe(self) -> dict[str, Any]:
        """Label, kind, storage, path, the merge method with its config, and the stored widths."""
        return {
            "label": self.label,
            "kind": self.kind,
            "storage_percent": self.storage_percent,
            "path": str(self.path),
            "method": self.method,
            "heads": self.bundle.num_heads,
            "config": self.bundle.config,
            "tasks": list(self.bundle.tasks),
            # Stored widths, widest first; [] = not quantized (16-bit or float32 factors).
            "bits": sorted({q.bits for q in self.bundle.quantized.values()}, reverse=True),
        }


def bundle_label(bundle: Bundle | VeraBundle) -> str:
    """Default row label: the method's label (``"hydraopt M=2"``, ``"ties"``, with its storage
    point for a method that has several: ``"shared_basis 10 %"``); the bare method name for a
    method this version does not know; a quantized bundle's bit widths appended
    (``"ties 4-bit"``), as ``hydraopt.sweep`` labels its runs; a budget-mode bundle by its
    goal (``"hydraopt budget 20 % 8/4-bit"``)."""
    label = bundle.method
    budget, max_error = bundle.config.get("budget"), bundle.config.get("max_error")
    known = bundle.method in list_methods()
    if known and get_method(bundle.method).takes_heads and (budget or max_error) is not None:
        # Budget mode (issue 19): M (and width) per module, so the goal names the row.
        goal = f"budget {budget:g} %" if budget is not None else f"max error {max_error:g}"
        label = f"{bundle.method} {goal}"
    elif known:
        method = get_method(bundle.method)
        label = method.label(bundle.num_heads)
        # Several storage points of one method (shared_basis R=8, 10 %) need their own rows.
        if isinstance(method, SweepPoints):
            label = f"{label} {method.point_label(bundle.config)}"
    widths = sorted({q.bits for q in bundle.quantized.values()}, reverse=True)
    return f"{label} {'/'.join(map(str, widths))}-bit" if widths else label


def bundle_system(path: str | Path, label: str | None = None) -> BundleSystem:
    """Load a bundle dir as a system.

    Args:
        path: A dir written by :func:`hydraopt.save_bundle` (a LoRA or a VeRA bundle).
        label: Row label; default :func:`bundle_label`.

    Raises:
        HydraoptError: If ``path`` is not a readable bundle.
    """
    path = Path(path)
    bundle = load_any_bundle(path)
    return BundleSystem(
        path=path,
        bundle=bundle,
        tensors_sha256=file_sha256(path / TENSORS_NAME),
        label=label or bundle_label(bundle),
    )


def check_unique_labels(systems: Iterable[System]) -> None:
    """Labels name table rows and cache nothing, but two equal ones would make rows ambiguous."""
    seen: set[str] = set()
    for system in systems:
        if system.label in seen:
            raise HydraoptError(
                f"two systems are labelled {system.label!r}; give one a label (--system KIND=DIR:LABEL)"
            )
        seen.add(system.label)


def _weights_file(directory: Path) -> Path:
    for name in _WEIGHT_FILES:
        if (directory / name).is_file():
            return directory / name
    raise HydraoptError(f"{directory} has no adapter weights (expected one of {_WEIGHT_FILES})")
