"""Checks on adapter configs and tensors shared by every adapter kind, and on user options.

Config values are checked as strictly as a bundle (:mod:`hydraopt.io.check_bundle`): a config
is a file from anywhere, and a string or NaN ``lora_alpha`` must not reach the arithmetic. Each
check raises :class:`HydraoptError` in one line naming the file and what is wrong.
"""

from __future__ import annotations

import math
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from hydraopt.errors import HydraoptError
from hydraopt.io.check_bundle import JSON_NAMES, is_int, is_number


def check_config_object(config: Any, path: Path) -> None:
    """adapter_config.json must hold a JSON object (PEFT reads it as keyword arguments)."""
    if not isinstance(config, dict):
        found = JSON_NAMES.get(type(config), type(config).__name__)
        raise HydraoptError(f"{path}: adapter_config.json must hold a JSON object, found {found}")


def check_config_values(config: dict[str, Any], path: Path) -> None:
    """Refuse config values that would give a traceback later or a non-finite merge.

    ``lora_alpha`` and every ``alpha_pattern`` value: a finite non-zero number (zero makes the
    scale 0 and export divides by it; NaN poisons every head). ``rank_pattern`` values: positive
    integers. Pattern keys: regexes PEFT can compile. Flags: booleans; the base model: a string.
    """
    if "lora_alpha" in config:
        check_alpha(config["lora_alpha"], "lora_alpha", path)
    for key in ("use_rslora", "fan_in_fan_out"):
        if config.get(key) is not None and not isinstance(config[key], bool):
            raise HydraoptError(f"{path}: {key} must be true or false, got {config[key]!r}")
    check_base_model_field(config, path)
    for key, check_value in (("rank_pattern", check_rank), ("alpha_pattern", check_alpha)):
        pattern = config.get(key)
        if pattern is None:
            continue
        if not isinstance(pattern, dict):
            raise HydraoptError(f"{path}: {key} must be an object of regex -> value")
        for regex, value in pattern.items():
            try:
                re.compile(rf"(.*\.)?({regex})$")
            except re.error as e:
                raise HydraoptError(
                    f"{path}: {key} key {regex!r} is not a valid regex ({e})"
                ) from e
            check_value(value, f"{key}[{regex!r}]", path)


def check_base_model_field(config: dict[str, Any], path: Path) -> None:
    """``base_model_name_or_path``: missing, null or a string (bundles record it)."""
    base = config.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        raise HydraoptError(f"{path}: base_model_name_or_path must be a string, got {base!r}")


def check_alpha(value: Any, what: str, path: Path) -> None:
    if not is_number(value) or not math.isfinite(value) or value == 0:
        raise HydraoptError(f"{path}: {what} must be a finite non-zero number, got {value!r}")


def check_rank(value: Any, what: str, path: Path) -> None:
    if not is_int(value) or value <= 0:
        raise HydraoptError(f"{path}: {what} must be a positive integer, got {value!r}")


def check_vera_config_values(config: dict[str, Any], path: Path) -> None:
    """VeRA config values used in arithmetic or comparisons: integers, booleans, a string."""
    key = config.get("projection_prng_key")
    if key is not None and not is_int(key):
        raise HydraoptError(f"{path}: projection_prng_key must be an integer, got {key!r}")
    for flag in ("save_projection", "fan_in_fan_out"):
        if config.get(flag) is not None and not isinstance(config[flag], bool):
            raise HydraoptError(f"{path}: {flag} must be true or false, got {config[flag]!r}")
    if isinstance(config.get("r"), bool):
        raise HydraoptError(
            f"{path}: adapter_config.json has no valid rank r (got {config['r']!r})"
        )
    check_base_model_field(config, path)


def check_floating(tensor: torch.Tensor, what: str) -> None:
    """Refuse integer or boolean weights instead of silently casting them to float."""
    if not tensor.is_floating_point():
        raise HydraoptError(f"{what} is {tensor.dtype}; adapter weights must be floating point")


def load_pickled_tensors(path: Path) -> dict[str, torch.Tensor]:
    """An ``adapter_model.bin`` read with ``torch.load(weights_only=True)``: tensors only.

    A pickle that holds code or objects beyond tensors is refused in one line of our own (torch's
    message runs to several lines and suggests ``weights_only=False``, which would run the code).
    """
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols: not the user's news
            warnings.simplefilter("ignore")
            tensors = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise HydraoptError(
            f"{path}: refused: not a plain pickle of tensors (corrupt, or it holds code or "
            "objects besides weights); convert it to safetensors from a source you trust"
        ) from e
    except Exception as e:  # noqa: BLE001 - torch raises many types for corrupt files
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise HydraoptError(f"{path}: not a readable PyTorch weights file ({first})") from e
    if not isinstance(tensors, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()
    ):
        raise HydraoptError(f"{path}: expected a dict of name -> tensor, found something else")
    return tensors


POSITIVE_OPTIONS = ("lr", "temperature", "refine_lr")  # step sizes and a softmax temperature


def check_option_values(options: dict[str, Any]) -> None:
    """Method options given by the user: numbers finite, step sizes and temperatures > 0.

    NaN compares false with everything, so range checks written as ``x <= 0`` let it through;
    an Adam learning rate <= 0 fails inside torch with a traceback.
    """
    for name, value in options.items():
        values = value if isinstance(value, (tuple, list)) else (value,)
        for v in values:
            if isinstance(v, float) and not math.isfinite(v):
                raise HydraoptError(f"{name} must be a finite number, got {v}")
            if name in POSITIVE_OPTIONS and v is not None and not v > 0:
                raise HydraoptError(f"{name} must be > 0, got {v}")
