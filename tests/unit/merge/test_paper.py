"""The paper solver against what its first AdamW step must do, worked out by hand.

At the start B' = 0, so ΔW' = 0 whatever A' and C' are: their gradients are zero, and the first
AdamW step only decays them (p <- p (1 - lr wd)). B' moves by lr in the direction of -sign(grad),
Adam's first step being m / sqrt(v) = g / |g|; for the MAE the gradient of head c is
-norm / (d k) * sum_{i} w_ic sign(ΔW_i) A'ᵀ.
"""

from __future__ import annotations

import math

import pytest
import torch

from hydraopt.merge.paper import init_params, paper_solve

G, K, d, k, r = 2, 3, 5, 4, 2
LR, WD = 0.01, 0.1
NORM = 1 / (K * 2)  # the paper's 1 / (K J), J = 2 factor tensors per adapter


def first_adam_step(direction: torch.Tensor) -> torch.Tensor:
    """AdamW's first step on a parameter at 0 whose gradient is -NORM / (d k) * direction:
    m̂ = g, sqrt(v̂) = |g|, so the step is -lr g / (|g| + eps)."""
    g = -NORM / (d * k) * direction
    return -LR * g / (g.abs() + 1e-8)


def targets(seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(G, K, d, k, generator=gen, dtype=torch.float64)


def solve(delta, M, epochs, seed=7, temperature=0.2):
    return paper_solve(
        delta,
        r,
        M,
        distance="mae",
        epochs=epochs,
        lr=LR,
        weight_decay=WD,
        temperature=temperature,
        num_factor_tensors=2,
        generator=torch.Generator().manual_seed(seed),
    )


def start(M, seed=7):
    return init_params(
        G,
        K,
        M,
        d,
        r,
        k,
        generator=torch.Generator().manual_seed(seed),
        device="cpu",
        dtype=torch.float64,
    )


def test_init_is_kaiming_uniform_a_zero_b_and_random_logits():
    a, b, c = start(2)
    bound = 1 / math.sqrt(k)  # kaiming_uniform_(a=sqrt(5)) with fan_in = k
    assert a.shape == (G, r, k) and a.abs().max() <= bound
    assert b.shape == (G, 2, d, r) and not b.any()
    assert c is not None and c.shape == (G, K, 2)
    assert start(K)[2] is None  # M = K: head i is task i, nothing to route


def test_zero_epochs_return_the_start_and_m_equals_k_routes_to_itself():
    delta = targets()
    a, heads, routing = solve(delta, K, epochs=0)
    a0, b0, _ = start(K)
    assert torch.equal(a, a0) and torch.equal(heads, b0)
    assert torch.equal(routing, torch.arange(K).expand(G, K))


def test_first_step_with_separate_heads_by_hand():
    delta = targets(1)
    a, heads, _ = solve(delta, K, epochs=1)
    a0, _, _ = start(K)
    assert torch.allclose(a, a0 * (1 - LR * WD), rtol=1e-12)  # zero gradient: decay only
    # grad of head i: -norm/(d k) sign(ΔW_i) A0ᵀ (about lr sign(sign(ΔW_i) A0ᵀ) after the step).
    direction = torch.sign(delta) @ a0.transpose(1, 2)[:, None]  # (G, K, d, r)
    assert torch.allclose(heads, first_adam_step(direction), rtol=1e-9, atol=0)


def test_first_step_with_routed_heads_by_hand():
    delta = targets(2)
    M, T = 2, 0.2
    a, heads, routing = solve(delta, M, epochs=1, temperature=T)
    a0, _, c0 = start(M)
    assert c0 is not None
    # C' gets no gradient at B' = 0: decay only, so the routing is the argmax of the start's.
    assert torch.equal(routing, (c0 * (1 - LR * WD)).argmax(-1))
    assert torch.allclose(a, a0 * (1 - LR * WD), rtol=1e-12)
    weights = torch.softmax(c0 / T, dim=-1)  # (G, K, M)
    direction = torch.einsum(
        "gkm,gkdr->gmdr", weights, torch.sign(delta) @ a0.transpose(1, 2)[:, None]
    )
    assert torch.allclose(heads, first_adam_step(direction), rtol=1e-9, atol=0)


@pytest.mark.parametrize("M", [1, 3])
def test_many_epochs_lower_the_loss_from_its_start(M):
    delta = targets(3)
    a, heads, routing = solve(delta, M, epochs=60)
    approx = heads[torch.arange(G)[:, None], routing] @ a[:, None]
    start_mae = delta.abs().mean()  # ΔW' = 0 at the start
    assert (delta - approx).abs().mean() < start_mae
