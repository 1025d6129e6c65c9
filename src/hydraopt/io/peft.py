"""Read K PEFT adapter dirs, of whichever kind their configs name, into a validated adapter set.

The kind (LoRA, VeRA) comes from the configs' ``peft_type``; the kind's package reads the rest
(:mod:`hydraopt.kinds`). ``AdapterSet`` and the file names are re-exported here for callers that
read adapter dirs directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydraopt.errors import HydraoptError
from hydraopt.io.adapter_dir import (
    CONFIG_NAME,
    PICKLE_NAME,
    SAFETENSORS_NAME,
    expand_adapter_dirs,
    task_names,
)
from hydraopt.kinds.lora.load import AdapterSet
from hydraopt.kinds.registry import kind_of_dirs

__all__ = ["CONFIG_NAME", "PICKLE_NAME", "SAFETENSORS_NAME", "AdapterSet", "load_adapter_set"]


def load_adapter_set(
    paths: Sequence[str | Path],
    names: Sequence[str] | None = None,
    *,
    allow_pickle: bool = False,
    check_values: bool = True,
    base_model: str | Path | None = None,
) -> Any:
    """Read and validate K PEFT LoRA adapter dirs, or K PEFT VeRA adapter dirs.

    The adapters' ``peft_type`` decides: all ``VERA`` gives a
    :class:`~hydraopt.kinds.vera.load.VeraAdapterSet`, otherwise every adapter must be LoRA
    (an :class:`~hydraopt.kinds.lora.load.AdapterSet`); a mix is refused.

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
    return kind_of_dirs(dirs).load_adapter_set(
        dirs, tasks, allow_pickle=allow_pickle, check_values=check_values, base_model=base_model
    )
