"""hydraopt: compress many LoRA adapters into one shared A plus a few task heads.

The public API is small on purpose (see README.md):

- :func:`load_adapter_set` — read and validate K PEFT LoRA (or VeRA) adapter dirs.
- :func:`merge_adapter_set` — run a registered merge method over every module.
- :func:`save_bundle` / :func:`load_bundle` — the compact on-disk result (LoRA);
  :func:`load_any_bundle` reads a LoRA or a VeRA bundle.
- :func:`export_peft_adapters` — one standard PEFT adapter dir per task.
- :func:`list_methods` — the registry of merge methods (names = CLI names).
- :func:`load_model` — a base model with a bundle installed, any task per batch row
  (:mod:`hydraopt.runtime`; loading a model needs the ``eval`` extra).
"""

from hydraopt.engine import merge_adapter_set
from hydraopt.errors import HydraoptError
from hydraopt.io.bundle import load_any_bundle, load_bundle, save_bundle
from hydraopt.io.export import export_peft_adapters
from hydraopt.io.peft import load_adapter_set
from hydraopt.merge.registry import get_method, list_methods
from hydraopt.runtime import load_model
from hydraopt.version import __version__

__all__ = [
    "HydraoptError",
    "__version__",
    "export_peft_adapters",
    "get_method",
    "list_methods",
    "load_adapter_set",
    "load_any_bundle",
    "load_bundle",
    "load_model",
    "merge_adapter_set",
    "save_bundle",
]
