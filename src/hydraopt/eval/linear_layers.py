"""The linear layers of a base model that adapters (LoRA, VeRA) target, by module name."""

from __future__ import annotations

import torch

# PEFT state-dict keys start with this; accepted on module names so raw PEFT keys work too.
_PEFT_PREFIX = "base_model.model."


def module_name(name: str) -> str:
    """A module name as in ``named_modules()``: PEFT's ``base_model.model.`` key prefix dropped."""
    return name[len(_PEFT_PREFIX) :] if name.startswith(_PEFT_PREFIX) else name


def linear_module(base: torch.nn.Module, name: str) -> torch.nn.Linear:
    """The linear layer ``name`` of ``base``: what an adapter (LoRA or VeRA) may target.

    Raises:
        ValueError: If there is no such module or it is not an ``nn.Linear``.
    """
    try:
        module = base.get_submodule(name)
    except AttributeError as error:
        raise ValueError(f"the model has no module {name!r}") from error
    if not isinstance(module, torch.nn.Linear):
        raise ValueError(f"module {name!r} is a {type(module).__name__}, not nn.Linear")
    return module
