"""The fused CPU kernels against torch's plain formulas, on small inputs with the awkward cases
(signed zeros, exact ties, heads without tasks, several modules, both dtypes)."""

from __future__ import annotations

import pytest
import torch

from hydraopt.merge import kernels

pytest.importorskip("numba")


def plain_sign_sums(approx, targets, routing):
    """S_c = sum_{i -> c} sign(X_c - T_i) and mean |X_route(i) - T_i|, in float64 torch."""
    G, K = routing.shape
    errors = approx[torch.arange(G)[:, None], routing].double() - targets.double()
    signs = torch.zeros(approx.shape, dtype=torch.float64)
    for g in range(G):
        for i in range(K):
            signs[g, routing[g, i]] += torch.sign(errors[g, i])
    return signs, errors.abs().mean(dim=(2, 3))


def awkward_inputs(G, M, K, d, k, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    targets = torch.randn(G, K, d, k, generator=gen).to(dtype)
    approx = torch.randn(G, M, d, k, generator=gen).to(dtype)
    approx[..., 0] = 0.0
    targets[..., 0] = -0.0  # +0 against -0: equal, sign 0
    targets[:, :, :, 1] = approx[:, :1, :, 1]  # exact ties with head 0
    targets[:, :, :, 2] = -targets[:, :, :, 3]  # negative values of every magnitude
    routing = torch.randint(0, M, (G, K), generator=gen)
    return approx, targets, routing


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    "G,M,K,d,k",
    [(1, 1, 5, 7, 300), (3, 2, 5, 9, 1000), (1, 5, 5, 8, 8), (2, 3, 8, 4, 5000), (2, 4, 2, 3, 7)],
)
def test_head_sign_sums_equal_the_plain_formula(dtype, G, M, K, d, k):
    # d * k > kernels.BLOCK in two cases: work items split a module
    approx, targets, routing = awkward_inputs(G, M, K, d, k, dtype, seed=G * 100 + M * 10 + K)
    want_s, want_l = plain_sign_sums(approx, targets, routing)
    signs, loss = kernels.head_sign_sums(approx, targets, routing)
    assert signs.dtype == dtype and loss.dtype == torch.float64
    assert torch.equal(signs.double(), want_s)  # integers: exact in either dtype
    assert torch.allclose(loss, want_l, rtol=1e-12, atol=0)  # float64 sums of the same values
    # M = 4 with K = 2: two heads have no task and get zero sums.
    out = torch.full_like(approx, 7.0)
    only_signs, none = kernels.head_sign_sums(approx, targets, routing, with_loss=False, out=out)
    assert none is None and only_signs is out and torch.equal(out, signs)
    no_signs, loss2 = kernels.head_sign_sums(approx, targets, routing, with_signs=False)
    assert no_signs is None and torch.equal(loss2, loss)
    # Targets mapped to keys once (what the refinement loop passes): the same results.
    keyed = kernels.order_keys(targets)
    keyed_signs, keyed_loss = kernels.head_sign_sums(approx, keyed, routing)
    assert torch.equal(keyed_signs, signs) and torch.equal(keyed_loss, loss)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_order_keys_order_like_the_floats(dtype):
    values = torch.randn(4000, generator=torch.Generator().manual_seed(1)) * 10.0 ** torch.randint(
        -30, 30, (4000,), generator=torch.Generator().manual_seed(2)
    )
    values = torch.cat([values, torch.tensor([0.0, -0.0, 1e-40, -1e-40])]).to(dtype)
    # int16 keys (bfloat16) or the float32 values themselves: either way they order like values.
    keys = kernels.order_keys(values[None, None, None]).keys.reshape(-1).double()
    i, j = torch.randint(0, values.numel(), (2, 20000), generator=torch.Generator().manual_seed(3))
    v = values.double()
    assert torch.equal(torch.sign(keys[i] - keys[j]), torch.sign(v[i] - v[j]))
    assert keys[-4] == keys[-3] == 0  # +0 and -0: one key


def test_head_sign_sums_reject_mismatched_inputs():
    approx, targets, routing = awkward_inputs(1, 2, 3, 4, 5, torch.float32, seed=0)
    with pytest.raises(ValueError, match="dtype"):
        kernels.head_sign_sums(approx, targets.bfloat16(), routing)
    with pytest.raises(ValueError, match="out"):
        kernels.head_sign_sums(approx, targets, routing, out=torch.empty(1, 2, 4, 4))


@pytest.mark.parametrize("K,M", [(5, 1), (6, 2), (8, 3), (2, 3)])
def test_medians_equal_a_sort(K, M):
    gen = torch.Generator().manual_seed(K * M)
    delta = torch.randn(2, K, 5, 3000, generator=gen)  # 15000 > MEDIAN_BLOCK elements
    delta[:, :, 0, :10] = 1.0  # ties
    routing = torch.randint(0, M, (2, K), generator=gen)
    got = kernels.medians(delta, routing, M)
    for g in range(2):
        for c in range(M):
            members = (routing[g] == c).nonzero().flatten()
            if members.numel() == 0:
                assert torch.equal(got[g, c], torch.zeros(5, 3000))
                continue
            ordered = delta[g, members].sort(dim=0).values
            n = members.numel()
            assert torch.equal(got[g, c], 0.5 * (ordered[(n - 1) // 2] + ordered[n // 2]))


def test_fused_available_only_on_the_cpu():
    assert kernels.fused_available("cpu")
    assert not kernels.fused_available("meta")
