"""One way into PEFT's model wrappers for every kind: the caller's RNG and stderr untouched."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from peft import PeftModel, get_peft_model


@contextmanager
def quiet_peft() -> Iterator[None]:
    """Drop the FutureWarning PEFT's ``PeftModel`` constructor triggers on every wrap.

    It reads transformers' deprecated ``is_gradient_checkpointing`` property; the warning says
    nothing about the user's input and would reach every ``hydraopt`` command's stderr. Only that
    message is filtered, and only inside the block.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")
        yield


def inject(model: torch.nn.Module, config: Any, adapter_name: str = "default") -> PeftModel:
    """``get_peft_model(model, config, adapter_name=...)`` without its two side effects.

    Injection draws a throw-away init from the global RNG (every caller overwrites the weights), so
    ``fork_rng`` keeps the caller's global RNG stream untouched; :func:`quiet_peft` keeps stderr.
    """
    with torch.random.fork_rng(devices=[]), quiet_peft():
        return get_peft_model(model, config, adapter_name=adapter_name)
