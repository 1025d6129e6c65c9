"""LoRA adapters applied in memory (PEFT LoRA layers filled with given factors, no files).

The counterpart for VeRA is :mod:`hydraopt.kinds.vera.apply`.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from typing import cast

import torch
from peft import LoraConfig, PeftModel
from peft.tuners.lora import LoraLayer
from transformers import PreTrainedModel

from hydraopt.eval.linear_layers import linear_module, module_name
from hydraopt.kinds.peft_inject import inject

# module name (as in `base_model.named_modules()`) -> (A (r, k), B (d, r), scale); the LoRA delta
# of that module is scale * B @ A, as in PEFT where scale = lora_alpha / r.
LoraFactorMap = Mapping[str, tuple[torch.Tensor, torch.Tensor, float]]


def apply_lora_factors(
    model: PreTrainedModel | PeftModel,
    factors: LoraFactorMap,
    *,
    adapter_name: str = "default",
) -> PeftModel:
    """Apply a LoRA given as in-memory tensors, writing no files.

    A PEFT LoRA adapter is injected into exactly the named modules, with per-module rank and
    ``lora_alpha = scale * r`` (so PEFT's ``scaling = lora_alpha / r`` equals ``scale``), and the
    given A and B are copied in (cast to the module's dtype). The result is the same model as one
    that ``PeftModel.from_pretrained`` builds from an adapter dir holding these tensors.

    Args:
        model: A base model (wrapped in place) or a ``PeftModel`` (the adapter is added).
        factors: module name -> ``(A (r, k), B (d, r), scale)``. Names are as in the base
            model's ``named_modules()`` (e.g. ``model.layers.0.self_attn.q_proj``); a leading
            ``base_model.model.`` (PEFT's key prefix) is accepted too.
        adapter_name: Name of the adapter inside the ``PeftModel``.

    Returns:
        The ``PeftModel`` in eval mode with the adapter active and frozen.

    Raises:
        ValueError: If ``factors`` is empty, names a module that is not a linear layer of the
            model, or holds tensors whose shapes do not fit it.
    """
    if not factors:
        raise ValueError("factors is empty: give at least one module's (A, B, scale)")
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    normalized = {module_name(name): triple for name, triple in factors.items()}
    ranks = {name: _check_factors(base, name, a, b) for name, (a, b, _) in normalized.items()}
    config = _lora_config_for(ranks, {name: float(s) for name, (_, _, s) in normalized.items()})
    if isinstance(model, PeftModel):
        # add_adapter draws a throw-away init too (overwritten below): keep the caller's RNG.
        with torch.random.fork_rng(devices=[]):
            model.add_adapter(adapter_name, config)
        peft_model = model
    else:
        peft_model = inject(model, config, adapter_name)
    peft_model.set_adapter(adapter_name)
    with torch.no_grad():
        for name, (a, b, _) in normalized.items():
            lora_a, lora_b = lora_weights(base.get_submodule(name), adapter_name)
            lora_a.copy_(a)  # (r, k), cast to the model's dtype
            lora_b.copy_(b)  # (d, r)
    for parameter in peft_model.parameters():
        parameter.requires_grad_(False)
    return peft_model.eval()


def lora_layers(peft_model: PeftModel) -> dict[str, LoraLayer]:
    """LoRA layers by module name in the base model, sorted by name."""
    base = peft_model.get_base_model()
    found = {name: m for name, m in base.named_modules() if isinstance(m, LoraLayer)}
    return dict(sorted(found.items()))


def lora_weights(layer: object, adapter_name: str = "default") -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(A (r, k), B (d, r))`` weight parameters of one adapter in a PEFT LoRA layer."""
    if not isinstance(layer, LoraLayer):
        raise ValueError(f"{type(layer).__name__} is not a PEFT LoRA layer")
    lora_a = cast(torch.nn.Linear, layer.lora_A[adapter_name])
    lora_b = cast(torch.nn.Linear, layer.lora_B[adapter_name])
    return lora_a.weight, lora_b.weight


def _check_factors(base: torch.nn.Module, name: str, a: torch.Tensor, b: torch.Tensor) -> int:
    """Validate one module's factors against the model; return the rank."""
    module = linear_module(base, name)
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1] or a.shape[0] < 1:
        raise ValueError(
            f"{name}: need A (r, k) and B (d, r) with r >= 1, got A {tuple(a.shape)}, "
            f"B {tuple(b.shape)}"
        )
    if a.shape[1] != module.in_features or b.shape[0] != module.out_features:
        raise ValueError(
            f"{name}: A {tuple(a.shape)} / B {tuple(b.shape)} do not fit a linear layer "
            f"{module.in_features} -> {module.out_features}"
        )
    return int(a.shape[0])


def _lora_config_for(ranks: Mapping[str, int], scales: Mapping[str, float]) -> LoraConfig:
    """A LoraConfig targeting exactly these modules, with per-module rank and alpha."""
    rank, _ = Counter(ranks.values()).most_common(1)[0]
    alphas = {name: scales[name] * ranks[name] for name in ranks}
    alpha, _ = Counter(alphas.values()).most_common(1)[0]
    # PEFT matches pattern keys as regexes against the module name; escape the dots.
    rank_pattern = {re.escape(n): r for n, r in ranks.items() if r != rank}
    alpha_pattern = {re.escape(n): a for n, a in alphas.items() if a != alpha}
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,  # type: ignore[arg-type]  # PEFT annotates int; it computes alpha / r
        lora_dropout=0.0,
        target_modules=sorted(ranks),
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        bias="none",
        task_type="CAUSAL_LM",
        inference_mode=True,
    )
