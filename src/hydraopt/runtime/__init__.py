"""Serving a bundle: one base model, the shared factors held once, any task per batch row.

- :func:`load_model` — a base model with a bundle installed (:class:`RuntimeModel`).
- :func:`shared_factors` — the one function that reads bundle internals (every kind reduces to
  A' + heads + routing per module).
- :func:`generate_batch` / :class:`SamplingParams` — decode a batch that mixes tasks and settings.
"""

from hydraopt.runtime.factors import ModuleFactors, SharedFactors, shared_factors
from hydraopt.runtime.generation import Generation, SamplingParams, generate_batch
from hydraopt.runtime.model import RuntimeModel, check_base_model, load_model

__all__ = [
    "Generation",
    "ModuleFactors",
    "RuntimeModel",
    "SamplingParams",
    "SharedFactors",
    "check_base_model",
    "generate_batch",
    "load_model",
    "shared_factors",
]
