"""hydraopt: compress many LoRA adapters into one shared A plus a few task heads.

The public API is small on purpose (see README.md):

- :func:`load_adapter_set` — read and validate K PEFT LoRA (or VeRA) adapter dirs.
- :func:`merge_adapter_set` — run a registered merge method over every module.
- :func:`save_bundle` / :func:`load_bundle` — the compact on-disk result (LoRA);
  :func:`load_any_bundle` reads a LoRA or a VeRA bundle.
- :func:`export_peft_adapters` — one standard PEFT adapter dir per task.
- :func:`list_methods` — the registry of merge methods (names = CLI names).
- :func:`load_base_model` — a base model and its tokenizer from local files (default: the
  packaged SmolLM2-135M-Instruct), ready for ``PeftModel.from_pretrained`` (needs the ``eval``
  extra).
- :func:`load_model` — a base model with a bundle installed, any task per batch row
  (:mod:`hydraopt.runtime`; loading a model needs the ``eval`` extra).

Names are imported on first use (module ``__getattr__``, PEP 562): ``import hydraopt`` and
``hydraopt --help`` then cost milliseconds instead of the seconds torch takes to import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from hydraopt.errors import HydraoptError
from hydraopt.threads import apply_thread_defaults
from hydraopt.version import __version__

# Before anything loads torch: OpenMP reads OMP_WAIT_POLICY once, when torch loads it.
apply_thread_defaults()

if TYPE_CHECKING:  # the static view of the lazy names below
    from hydraopt.engine import merge_adapter_set
    from hydraopt.eval.model import load_base_model
    from hydraopt.io.bundle import load_any_bundle, load_bundle, save_bundle
    from hydraopt.io.export import export_peft_adapters
    from hydraopt.io.peft import load_adapter_set
    from hydraopt.merge.registry import get_method, list_methods
    from hydraopt.runtime import load_model

# public name -> module that defines it
_LAZY = {
    "merge_adapter_set": "hydraopt.engine",
    "load_any_bundle": "hydraopt.io.bundle",
    "load_bundle": "hydraopt.io.bundle",
    "save_bundle": "hydraopt.io.bundle",
    "export_peft_adapters": "hydraopt.io.export",
    "load_adapter_set": "hydraopt.io.peft",
    "get_method": "hydraopt.merge.registry",
    "list_methods": "hydraopt.merge.registry",
    "load_base_model": "hydraopt.eval.model",
    "load_model": "hydraopt.runtime",
}

__all__ = [
    "HydraoptError",
    "__version__",
    "export_peft_adapters",
    "get_method",
    "list_methods",
    "load_adapter_set",
    "load_any_bundle",
    "load_base_model",
    "load_bundle",
    "load_model",
    "merge_adapter_set",
    "save_bundle",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'hydraopt' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
