"""LoRA adapter configs: the checks before any merge work starts, and the scale of each module.

Each check raises :class:`HydraoptError` naming the adapter and what to do. Config values are
checked as strictly as a bundle (:mod:`hydraopt.io.check_bundle`): a config is a file from
anywhere, and a string or NaN ``lora_alpha`` must not reach the arithmetic. Features whose
weights do not merge as a plain B @ A (DoRA's magnitude vector, ``modules_to_save`` copies,
trained biases) are refused by name: PEFT's own ``add_weighted_adapter`` silently drops or
mis-merges them today, and a silent wrong merge is worse than a clear refusal.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from hydraopt.errors import HydraoptError
from hydraopt.io.check_bundle import is_int
from hydraopt.io.keys import match_pattern_key
from hydraopt.io.validate import check_config_object, check_config_values

SUPPORTED_PEFT_TYPES = ("LORA",)
# init_lora_weights values after which the saved A, B are the whole update (ΔW = s B A on the
# unchanged base). PiSSA, OLoRA, CorDA and LoftQ instead subtract their initial B0 A0 from (or
# quantize) the *base* weights, which PEFT redoes from the base model on every load, so the
# adapter's real update s (B A - B0 A0) is not in its files; merging s B A would be silently
# wrong (PEFT's docs: convert them with save_pretrained(path_initial_model_for_weight_conversion)).
PLAIN_INITS = ("gaussian", "eva", "orthogonal", "mica")  # and true / false / null
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")


def check_lora_config(config: dict[str, Any], path: Path) -> None:
    """Refuse configs whose adapters are not plain LoRA factor pairs, or whose values are not
    what PEFT itself would accept (see :func:`check_config_values`)."""
    check_config_object(config, path)
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type not in SUPPORTED_PEFT_TYPES:
        raise HydraoptError(
            f"{path}: peft_type is {peft_type or 'missing'}; hydraopt merges LORA adapters"
        )
    if config.get("use_dora"):
        raise HydraoptError(
            f"{path}: DoRA adapters are not supported (the magnitude vector does not merge as B @ A)"
        )
    if config.get("modules_to_save"):
        raise HydraoptError(
            f"{path}: modules_to_save={config['modules_to_save']} is not supported "
            "(full module copies cannot be shared through A'); retrain without it"
        )
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        raise HydraoptError(f"{path}: trained biases (bias/lora_bias) are not supported")
    if config.get("target_parameters"):
        raise HydraoptError(f"{path}: target_parameters adapters are not supported")
    if config.get("trainable_token_indices"):
        raise HydraoptError(f"{path}: trainable_token_indices adapters are not supported")
    check_init(config.get("init_lora_weights", True), path)
    r = config.get("r")
    if not is_int(r) or r <= 0:
        raise HydraoptError(f"{path}: adapter_config.json has no valid rank r (got {r!r})")
    check_config_values(config, path)


def check_init(init: Any, path: Path) -> None:
    """Refuse adapters whose update is relative to base weights their init changed."""
    # null: PEFT skips its init (like false)
    if (
        init is None
        or isinstance(init, bool)
        or (isinstance(init, str) and init.lower() in PLAIN_INITS)
    ):
        return
    if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
        raise HydraoptError(
            f"{path}: init_lora_weights={init!r} changes the base weights, so the update is not "
            "B @ A alone; convert it to a plain LoRA first (PEFT: save_pretrained(..., "
            "path_initial_model_for_weight_conversion=...))"
        )
    raise HydraoptError(f"{path}: init_lora_weights={init!r} is not a LoRA init hydraopt knows")


def module_rank_alpha(config: dict[str, Any], module: str) -> tuple[int, float]:
    """The (r, lora_alpha) PEFT uses for ``module``, honouring rank_pattern/alpha_pattern."""
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    r_key = match_pattern_key(rank_pattern, module)
    a_key = match_pattern_key(alpha_pattern, module)
    r = int(rank_pattern[r_key]) if r_key is not None else int(config["r"])
    alpha = float(alpha_pattern[a_key]) if a_key is not None else float(config.get("lora_alpha", 8))
    return r, alpha


def lora_scale(config: dict[str, Any], module: str) -> float:
    """PEFT's scaling for ``module``: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    r, alpha = module_rank_alpha(config, module)
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
