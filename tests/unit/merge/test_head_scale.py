"""HydraOpt's head-magnitude calibration (``head_scale``): heads times the factor, nothing else
changed, and the errors a bundle reports measured after it."""

from __future__ import annotations

import pytest
import torch
from helpers import random_stack

from hydraopt.errors import HydraoptError
from hydraopt.merge.base import MergeContext
from hydraopt.merge.hydraopt_config import HydraOptConfig
from hydraopt.merge.registry import get_method

CTX = MergeContext(num_tasks=3, num_factor_tensors=8)


def merge(config: HydraOptConfig):
    stack = random_stack(K=3, seed=7)
    return get_method("hydraopt").merge(
        stack, config, generator=torch.Generator().manual_seed(0), context=CTX
    ), stack


@pytest.mark.parametrize(
    "options", [{"heads": 1}, {"heads": 2}, {"heads": 1, "solver": "paper", "epochs": 5}]
)
def test_heads_are_scaled_and_nothing_else(options: dict) -> None:
    plain, _ = merge(HydraOptConfig(**options, head_scale=1.0))
    scaled, stack = merge(HydraOptConfig(**options, head_scale=1.5))
    assert torch.equal(scaled.A, plain.A)
    assert torch.equal(scaled.routing, plain.routing)
    assert torch.equal(scaled.heads, plain.heads * 1.5)
    # The refinement's own measurement no longer describes the result: the engine measures.
    assert scaled.measured is None
    # Scaling the head by c scales ΔW' by c: check against the updates directly.
    want = torch.einsum("gmdr,grk->gmdk", plain.heads, plain.A) * 1.5
    got = torch.einsum("gmdr,grk->gmdk", scaled.heads, scaled.A)
    torch.testing.assert_close(got, want)
    assert stack.A.shape[1] == 3


@pytest.mark.parametrize(
    ("options", "K", "want"),
    [
        ({"heads": 1}, 3, 1.5),  # one head shared by several tasks: the val-chosen default
        ({"heads": 1}, 1, 1.0),  # M = K = 1: the head is the task's own
        ({"heads": 2}, 3, 1.0),
        ({"heads": 3}, 3, 1.0),
        ({"heads": 1, "solver": "paper"}, 3, 1.0),  # the paper solver stays the paper's
        ({"heads": 1, "head_scale": 1.0}, 3, 1.0),  # the paper's objective, selectable
        ({"heads": 2, "head_scale": 1.25}, 3, 1.25),
    ],
)
def test_default_head_scale_resolves_per_setting(options: dict, K: int, want: float) -> None:
    assert HydraOptConfig(**options).resolved_head_scale(K) == want


def test_default_merge_at_one_head_is_the_calibrated_one() -> None:
    default, _ = merge(HydraOptConfig(heads=1))
    explicit, _ = merge(HydraOptConfig(heads=1, head_scale=1.5))
    plain, _ = merge(HydraOptConfig(heads=1, head_scale=1.0))
    assert torch.equal(default.heads, explicit.heads)
    assert torch.equal(default.heads, plain.heads * 1.5)
    # M > 1 is untouched by the default.
    two, _ = merge(HydraOptConfig(heads=2))
    two_plain, _ = merge(HydraOptConfig(heads=2, head_scale=1.0))
    assert torch.equal(two.heads, two_plain.heads)


def test_bad_head_scale_is_refused() -> None:
    with pytest.raises(HydraoptError, match="head_scale must be > 0"):
        HydraOptConfig(heads=1, head_scale=0.0)
