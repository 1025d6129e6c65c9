"""LoRA's part of fine-tuning (:mod:`hydraopt.eval.finetune`): its start, fingerprint and saved keys.

The LoRA A matrices are drawn per module from a ``torch.Generator`` seeded by (seed, module
name), independent of the task and of the global RNG, so every task's adapter starts from the
SAME A for the same seed. HydraOpt relies on this: adapters that share their initial A keep
similar A's after training, which is what makes one shared A' a good fit.
"""

from __future__ import annotations

import hashlib
import math

import torch
from peft import LoraConfig, PeftModel
from transformers import PreTrainedModel

from hydraopt.eval.finetune_config import FinetuneConfig
from hydraopt.kinds.base import FinetuneRecipe
from hydraopt.kinds.lora.apply import lora_layers, lora_weights
from hydraopt.kinds.peft_inject import inject


def init_lora_model(model: PreTrainedModel, config: FinetuneConfig) -> PeftModel:
    """Wrap ``model`` in a trainable LoRA adapter whose A matrices depend only on the seed.

    Each module's A is drawn like PEFT's default (``kaiming_uniform_(a=sqrt(5))``, i.e.
    U(-1/sqrt(k), 1/sqrt(k))) but from a generator seeded by ``(config.seed, module name)``;
    B starts at zero, so the adapter starts as the identity update.

    Args:
        model: The base model (wrapped in place).
        config: Rank, alpha, dropout, target modules and seed.

    Returns:
        The ``PeftModel``, LoRA parameters trainable, base parameters frozen.
    """
    lora_config = LoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=list(config.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = inject(model, lora_config)  # PEFT's own init is replaced below
    with torch.no_grad():
        for name, layer in lora_layers(peft_model).items():
            generator = torch.Generator().manual_seed(module_seed(config.seed, name))
            lora_a, lora_b = lora_weights(layer)  # (r, k), (d, r)
            torch.nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5), generator=generator)
            lora_b.zero_()
    return peft_model


def module_seed(seed: int, module_name: str) -> int:
    """A 63-bit seed from (seed, module name), stable across processes and platforms."""
    digest = hashlib.sha256(f"{seed}:{module_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def lora_A_fingerprint(peft_model: PeftModel, adapter_name: str = "default") -> str:
    """sha256 over every module's A (float32, sorted by module name).

    Recorded before training in ``training.json`` as ``init_A_sha256``: adapters with equal
    fingerprints started from the same A.
    """
    digest = hashlib.sha256()
    for name, layer in lora_layers(peft_model).items():
        weight = lora_weights(layer, adapter_name)[0].detach().to(torch.float32).contiguous()
        digest.update(name.encode())
        digest.update(weight.numpy().tobytes())
    return digest.hexdigest()


def saves_lora_key(key: str) -> bool:
    """Whether a ``state_dict`` key is one of a LoRA adapter's saved tensors (A and B)."""
    return "lora_" in key


RECIPE = FinetuneRecipe(init_lora_model, "init_A_sha256", lora_A_fingerprint, saves_lora_key)
