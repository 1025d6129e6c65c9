"""VeRA adapters applied in memory: the counterpart of ``apply_lora_factors`` for VeRA.

VeRA (Kopiczko et al., ICLR 2024) freezes two random projections shared by every module, A
(r, k_max) and B (d_max, r), and learns two vectors per module, so module ``k -> d`` computes
``W x + diag(λb) B[:d] diag(λd) A[:, :k] x``. PEFT keeps the projections once per model
(``VeraModel.vera_A`` / ``vera_B``); every layer reads slices of those very tensors.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import torch
from peft import PeftModel, VeraConfig
from peft.tuners.vera import VeraLayer, VeraModel

from hydraopt.eval.linear_layers import linear_module, module_name
from hydraopt.kinds.peft_inject import inject

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@dataclass(frozen=True)
class VeraWeights:
    """A VeRA adapter as in-memory tensors: shared projections and two vectors per module.

    Module ``m`` (a linear layer ``k -> d``) computes ``W x + diag(λb) B[:d] diag(λd) A[:, :k] x``,
    as PEFT's VeRA layer does (Kopiczko et al., ICLR 2024). A and B are sliced per module, so
    they must be at least as large as the largest targeted module.

    Attributes:
        vera_A: (r, k_max) shared down-projection.
        vera_B: (d_max, r) shared up-projection.
        lambdas: module name -> ``(λb (d,), λd (r,))``; names as in
            :func:`hydraopt.kinds.lora.apply.apply_lora_factors`.
    """

    vera_A: torch.Tensor
    vera_B: torch.Tensor
    lambdas: Mapping[str, tuple[torch.Tensor, torch.Tensor]]

    def apply(self, model: PreTrainedModel) -> PeftModel:
        """:func:`apply_vera_weights` (what :func:`~hydraopt.eval.generate.applied_adapter` calls)."""
        return apply_vera_weights(model, self)


def apply_vera_weights(
    model: PreTrainedModel, weights: VeraWeights, *, adapter_name: str = "default"
) -> PeftModel:
    """Apply a VeRA adapter given as in-memory tensors, writing no files.

    A PEFT VeRA adapter is injected into exactly the named modules and the given projections and
    vectors are copied in (cast to the model's dtype). The result is the same model as one that
    ``PeftModel.from_pretrained`` builds from a VeRA dir holding these tensors.

    Args:
        model: A base model (wrapped in place). Not a ``PeftModel``: PEFT keeps one pair of
            projections per model, shared by all its VeRA adapters.
        weights: Projections and per-module vectors.
        adapter_name: Name of the adapter inside the ``PeftModel``.

    Returns:
        The ``PeftModel`` in eval mode with the adapter active and frozen.

    Raises:
        ValueError: If ``model`` is already a ``PeftModel``, ``weights.lambdas`` is empty, names
            a module that is not a linear layer of the model, or holds tensors whose shapes do
            not fit it or the projections.
    """
    if isinstance(model, PeftModel):
        raise ValueError("apply VeRA weights to a bare base model (remove_adapters first)")
    if not weights.lambdas:
        raise ValueError("weights.lambdas is empty: give at least one module's (λb, λd)")
    a, b = weights.vera_A, weights.vera_B  # (r, k_max), (d_max, r)
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1] or a.shape[0] < 1:
        raise ValueError(
            f"need vera_A (r, k) and vera_B (d, r) with r >= 1, got {tuple(a.shape)}, "
            f"{tuple(b.shape)}"
        )
    rank = int(a.shape[0])
    lambdas = {module_name(name): pair for name, pair in weights.lambdas.items()}
    for name, (lambda_b, lambda_d) in lambdas.items():
        _check_vera_vectors(model, name, lambda_b, lambda_d, a, b)
    config = VeraConfig(
        r=rank,
        target_modules=sorted(lambdas),
        save_projection=True,
        vera_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        inference_mode=True,
    )
    # Injection draws throw-away projections from PEFT's own generator and a throw-away λd from
    # the global RNG (all overwritten below).
    peft_model = inject(model, config, adapter_name)
    with torch.no_grad():
        # PEFT sizes its projections for the largest targeted module; the given ones may be
        # larger (made for more modules), and every layer only reads the leading block.
        vera_a, vera_b = vera_projections(peft_model, adapter_name)
        vera_a.copy_(a[:, : vera_a.shape[1]])  # (r, k_max of the targeted modules)
        vera_b.copy_(b[: vera_b.shape[0]])  # (d_max of the targeted modules, r)
        for name, (lambda_b, lambda_d) in lambdas.items():
            layer = cast(VeraLayer, model.get_submodule(name))
            layer.vera_lambda_b[adapter_name].copy_(lambda_b)  # (d,)
            layer.vera_lambda_d[adapter_name].copy_(lambda_d)  # (r,)
    for parameter in peft_model.parameters():
        parameter.requires_grad_(False)
    return peft_model.eval()


def vera_projections(
    peft_model: PeftModel, adapter_name: str = "default"
) -> tuple[torch.Tensor, torch.Tensor]:
    """VeRA's shared ``(A (r, k_max), B (d_max, r))`` buffers in a PEFT VeRA model.

    Every VeRA layer reads these very tensors (sliced to its own shape), so writing into them
    changes every module at once.
    """
    tuner = peft_model.base_model
    if not isinstance(tuner, VeraModel):
        raise ValueError(f"{type(tuner).__name__} is not a PEFT VeRA model")
    return tuner.vera_A[adapter_name], tuner.vera_B[adapter_name]


def vera_layers(peft_model: PeftModel) -> dict[str, VeraLayer]:
    """VeRA layers by module name in the base model, sorted by name."""
    base = peft_model.get_base_model()
    found = {name: m for name, m in base.named_modules() if isinstance(m, VeraLayer)}
    return dict(sorted(found.items()))


def _check_vera_vectors(
    base: torch.nn.Module,
    name: str,
    lambda_b: torch.Tensor,
    lambda_d: torch.Tensor,
    vera_a: torch.Tensor,
    vera_b: torch.Tensor,
) -> None:
    """Validate one module's VeRA vectors against the model and the projections."""
    module = linear_module(base, name)
    rank = vera_a.shape[0]
    if lambda_b.shape != (module.out_features,) or lambda_d.shape != (rank,):
        raise ValueError(
            f"{name}: need λb ({module.out_features},) and λd ({rank},) for a linear layer "
            f"{module.in_features} -> {module.out_features} and r = {rank}, got "
            f"{tuple(lambda_b.shape)}, {tuple(lambda_d.shape)}"
        )
    if vera_a.shape[1] < module.in_features or vera_b.shape[0] < module.out_features:
        raise ValueError(
            f"{name}: projections A {tuple(vera_a.shape)} / B {tuple(vera_b.shape)} are smaller "
            f"than the linear layer {module.in_features} -> {module.out_features}"
        )
