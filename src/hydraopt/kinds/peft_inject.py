"""One way into PEFT's ``get_peft_model`` for every kind: the caller's RNG and stderr untouched."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from peft import PeftModel, get_peft_model


def inject(model: torch.nn.Module, config: Any, adapter_name: str = "default") -> PeftModel:
    """``get_peft_model(model, config, adapter_name=...)`` without its two side effects.

    Injection draws a throw-away init from the global RNG (every caller overwrites the weights), so
    ``fork_rng`` keeps the caller's global RNG stream untouched. PEFT's constructor also reads
    transformers' deprecated ``is_gradient_checkpointing`` property, whose FutureWarning would reach
    every ``hydraopt`` command's stderr without saying anything about the user's input.
    """
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")
        return get_peft_model(model, config, adapter_name=adapter_name)
