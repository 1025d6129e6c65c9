"""A generator of varied, real PEFT adapters: the configurations users arrive with.

Every adapter is written by PEFT itself (``get_peft_model`` on a tiny random Llama, then
``save_pretrained``), with its LoRA factors (and DoRA magnitudes, biases, ``modules_to_save``
copies where the config makes them) drawn from an explicit generator so that ΔW ≠ 0 (PEFT's
default init makes B = 0). ``variant(name)`` builds one named variation;
``VARIANTS`` lists them with the behaviour the docs promise (docs/adapter-inputs.md).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def build_adapter(
    base: Path,
    out: Path,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    randomize: bool = True,
    safe_serialization: bool = True,
    adapter_name: str = "default",
    **config: Any,
) -> Path:
    """One real PEFT LoRA adapter dir at ``out`` on the tiny base model at ``base``.

    ``config`` goes to ``LoraConfig`` (defaults: r 4, alpha 8, q/k/v/o). With ``randomize`` every
    trainable tensor of the adapter (A, B, DoRA magnitude, biases, saved module copies) is
    redrawn from ``seed``; without it PEFT's own init stays (PiSSA, OLoRA, gaussian).
    """
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(base)
    cfg = LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": TARGETS, **config})
    peft_model = get_peft_model(model, cfg, adapter_name=adapter_name)
    if randomize:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, p in sorted(peft_model.named_parameters()):
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    peft_model.save_pretrained(out, safe_serialization=safe_serialization)
    if adapter_name != "default":  # PEFT saves non-default adapters under out/<name>/
        out = out / adapter_name
    if dtype != torch.float32:
        from safetensors.torch import load_file, save_file

        f = out / "adapter_model.safetensors"
        save_file({k: v.to(dtype) for k, v in load_file(str(f)).items()}, str(f))
    return out


def build_vera(base: Path, out: Path, *, seed: int = 0, **config: Any) -> Path:
    """One real PEFT VeRA adapter dir (projections saved), λ's redrawn from ``seed``."""
    from peft import VeraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(base)
    cfg = VeraConfig(**{"r": 8, "target_modules": ["q_proj", "o_proj"], **config})
    peft_model = get_peft_model(model, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(peft_model.named_parameters()):
            if p.requires_grad and "vera_lambda" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    peft_model.save_pretrained(out)
    return out


def edit_json(path: Path, **changes: Any) -> None:
    """Rewrite keys of a JSON file in place."""
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def peft_delta_weights(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """PEFT's own ΔW per module (``get_delta_weight``) of an adapter dir, float32."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), str(adapter))
    out = {}
    for name, module in model.base_model.model.named_modules():
        factors = getattr(module, "lora_A", None) or getattr(module, "vera_lambda_d", {})
        if hasattr(module, "get_delta_weight") and "default" in factors:
            out[name] = module.get_delta_weight("default").detach().float()
    return out


def peft_logits(base: Path, adapter: Path | None, ids: torch.Tensor) -> torch.Tensor:
    """Logits of ``ids`` under the base model with ``adapter`` loaded by PEFT (or none)."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(base)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    with torch.inference_mode():
        return model(input_ids=ids).logits.float()
