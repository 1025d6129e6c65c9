"""The refinements' hand-written Adam against torch.optim.Adam (an independent implementation)."""

from __future__ import annotations

import pytest
import torch

from hydraopt.merge.adam import Adam, cosine_lr


@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.8, 0.999), (0.5, 0.99)])
def test_adam_follows_torch_optim_adam(betas):
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(3, 4, generator=gen), torch.randn(5, generator=gen)]
    target = [torch.randn(3, 4, generator=gen), torch.randn(5, generator=gen)]
    ours = [p.clone() for p in start]
    theirs = [p.clone().requires_grad_() for p in start]
    adam = Adam(ours, betas=betas)
    optim = torch.optim.Adam(theirs, lr=0.1, betas=betas)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(optim, T_max=12)
    for step in range(12):
        # An L1 loss, like the refinement's: sign gradients of constant size.
        adam.step(
            [torch.sign(p - t) for p, t in zip(ours, target, strict=True)], cosine_lr(0.1, step, 12)
        )
        optim.zero_grad()
        sum((p - t).abs().sum() for p, t in zip(theirs, target, strict=True)).backward()
        optim.step()
        sched.step()
    for p, q in zip(ours, theirs, strict=True):
        torch.testing.assert_close(p, q.detach(), rtol=1e-5, atol=1e-6)
