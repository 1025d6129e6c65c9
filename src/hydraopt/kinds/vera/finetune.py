"""VeRA's part of fine-tuning (:mod:`hydraopt.eval.finetune`): its start, fingerprint and saved keys.

VeRA's frozen projections A and B come from PEFT's own generator seeded by
``FinetuneConfig.projection_prng_key`` (not by ``seed``): every task shares them, as merging VeRA
adapters requires; its trained vectors start at constants (λb = 0, λd = ``d_initial``).
"""

from __future__ import annotations

import hashlib

import torch
from peft import PeftModel, VeraConfig, get_peft_model
from transformers import PreTrainedModel

from hydraopt.eval.finetune_config import FinetuneConfig
from hydraopt.kinds.base import FinetuneRecipe
from hydraopt.kinds.vera.apply import vera_projections


def init_vera_model(model: PreTrainedModel, config: FinetuneConfig) -> PeftModel:
    """Wrap ``model`` in a trainable VeRA adapter whose projections depend only on the PRNG key.

    PEFT draws the shared projections A (vera_r, k_max) and B (d_max, vera_r) from a
    ``torch.Generator`` seeded by ``projection_prng_key`` (Kaiming uniform) and saves them with
    the adapter (``save_projection=True``), so a saved adapter does not depend on PEFT
    regenerating them identically elsewhere. The trained vectors start at constants, so the
    adapter starts as the identity update whatever the seed.

    Args:
        model: The base model (wrapped in place).
        config: ``vera_r``, ``vera_dropout``, ``d_initial``, ``projection_prng_key`` and the
            target modules.

    Returns:
        The ``PeftModel``, λb and λd of every module trainable, everything else frozen.
    """
    vera_config = VeraConfig(
        r=config.vera_r,
        target_modules=list(config.target_modules),
        projection_prng_key=config.projection_prng_key,
        save_projection=True,
        vera_dropout=config.vera_dropout,
        d_initial=config.d_initial,
        bias="none",
        task_type="CAUSAL_LM",
    )
    # PEFT draws a throw-away λd from the global RNG before filling it with d_initial; fork_rng
    # keeps the caller's global stream untouched.
    with torch.random.fork_rng(devices=[]):
        return get_peft_model(model, vera_config)


def vera_projection_fingerprint(peft_model: PeftModel, adapter_name: str = "default") -> str:
    """sha256 over VeRA's shared projections A and B (float32).

    Recorded in ``training.json`` as ``projection_sha256``: VeRA adapters with equal
    fingerprints share their frozen projections and can be merged vector by vector.
    """
    digest = hashlib.sha256()
    for name, weight in zip("AB", vera_projections(peft_model, adapter_name), strict=True):
        digest.update(name.encode())
        digest.update(weight.detach().to(torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def saves_vera_key(key: str) -> bool:
    """Whether a ``state_dict`` key is one of a VeRA adapter's saved tensors.

    λb/λd of every module, and the shared projections once (PEFT saves them from
    base_model.vera_A / vera_B; the per-layer references to them are not separate tensors).
    """
    return "vera_lambda_" in key or key.startswith(("base_model.vera_A.", "base_model.vera_B."))


RECIPE = FinetuneRecipe(
    init_vera_model, "projection_sha256", vera_projection_fingerprint, saves_vera_key
)
